"""The event feed (`GET /v1/events`) and webhook subscriptions (`/v1/webhooks`)."""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.params import JSONBody, PathParameter, QueryParameter

from ledger.errors import InvalidRequest, WebhookNotFound
from ledger.http.auth import ADMIN, READ, principal
from ledger.http.body import decode_strict, path_identifier
from ledger.http.problems import READ_PROBLEMS, documented
from ledger.http.render import account_out, transfer_out
from ledger.http.schemas import (
    EVENT_CLASSES,
    IDENTIFIER_RE,
    DeliveryOut,
    DeliveryPage,
    EventOut,
    EventPage,
    WebhookCreate,
    WebhookCreatedOut,
    WebhookOut,
    WebhookPage,
    format_timestamp,
)
from ledger.service.events import EventRecord, event_id, parse_cursor, validate_types
from ledger.service.webhooks import DeliveryRecord, WebhookRecord

Limit = Annotated[int | None, QueryParameter(ge=1, le=1000, description="Page size, 1 to 1000 (default 100)")]
Cursor = Annotated[str | None, QueryParameter(max_length=512, description="Opaque cursor from next_cursor")]
After = Annotated[
    str | None,
    QueryParameter(
        max_length=64,
        description="A next_cursor, or an event id: the page starts right after it. "
        "Without it the feed starts at the oldest event kept.",
    ),
]
Types = Annotated[
    str | None,
    QueryParameter(max_length=512, description="Comma-separated event types, e.g. transfer.posted,transfer.voided"),
]
AccountFilter = Annotated[
    str | None, QueryParameter(max_length=64, description="Only events of this account (either side of a transfer)")
]
Wait = Annotated[
    float | None,
    QueryParameter(ge=0, le=30, description="Seconds to wait for an event when none is there yet (long-poll), 0 to 30"),
]
WebhookId = Annotated[str, PathParameter(description="The webhook's id (`wh_...`)")]


def event_out(event: EventRecord) -> EventOut:
    data = transfer_out(event.transfer) if event.transfer is not None else account_out(event.account)  # type: ignore[arg-type]
    return EVENT_CLASSES[event.type](id=event.id, created_at=format_timestamp(event.created_at), data=data)  # type: ignore[arg-type,return-value]


def render_event(event: EventRecord) -> bytes:
    """A webhook delivery's body: the event exactly as the feed shows it."""
    return msgspec.json.encode(event_out(event))


def _stamp(moment) -> str | None:  # type: ignore[no-untyped-def]
    return format_timestamp(moment) if moment is not None else None


def webhook_out(record: WebhookRecord) -> WebhookOut:
    return WebhookOut(
        id=record.id,
        url=record.url,
        types=record.types,
        status=record.status,
        created_at=format_timestamp(record.created_at),
        failing_since=_stamp(record.failing_since),
        last_error=record.last_error,
    )


def delivery_out(record: DeliveryRecord) -> DeliveryOut:
    return DeliveryOut(
        id=str(record.id),
        event_id=event_id(record.event_position),
        event_type=record.event_type,
        status=record.status,
        attempts=record.attempts,
        created_at=format_timestamp(record.created_at),
        last_attempt_at=_stamp(record.last_attempt_at),
        next_attempt_at=_stamp(record.next_attempt_at),
        delivered_at=_stamp(record.delivered_at),
        last_status_code=record.last_status_code,
        last_error=record.last_error,
    )


class EventController(Controller):
    path = "/v1/events"
    tags = ["events"]
    opt = READ

    @get("/", operation_id="listEvents", responses=documented(*READ_PROBLEMS, 410))
    async def list_events(
        self,
        state: State,
        after: After = None,
        limit: Limit = None,
        types: Types = None,
        account_id: AccountFilter = None,
        wait: Wait = None,
    ) -> EventPage:
        """Every committed change, once, in feed order: each account's events in the
        order of its journal, nothing from rolled-back work, never an event skipped by a
        transaction that committed late. Follow `next_cursor` (never null). With `wait`,
        an empty page is answered only after waiting that long for an event (long-poll).
        A cursor older than the retention answers 410 `cursor_expired`."""
        # An empty parameter (`?after=`, as a consumer's first URL often has) is no parameter.
        position = parse_cursor(after or None)
        wanted = validate_types([t.strip() for t in types.split(",")]) if types else None
        account_id = account_id or None
        if account_id is not None and not IDENTIFIER_RE.fullmatch(account_id):
            raise InvalidRequest(
                "account_id is not an account id", [{"field": "account_id", "message": "1 to 64 of [A-Za-z0-9._:-]"}]
            )
        page = await state.events.follow(
            position,
            limit or state.settings.default_page_size,
            wait_seconds=wait or 0.0,
            types=wanted,
            account_id=account_id,
        )
        return EventPage(data=[event_out(event) for event in page.items], next_cursor=page.next_cursor)


class WebhookController(Controller):
    path = "/v1/webhooks"
    tags = ["webhooks"]
    opt = ADMIN

    @post("/", operation_id="createWebhook", status_code=201, responses=documented(*READ_PROBLEMS, 413, 415, 422))
    async def create_webhook(
        self, request: Request, state: State, data: JSONBody[WebhookCreate]
    ) -> Response[WebhookCreatedOut]:
        """Subscribe a URL to events (all types, or `types`), from now on. The signing
        secret is in this answer only. The URL's host must be allowed by
        `LEDGER_WEBHOOK_ALLOWED_HOSTS` (loopback only by default): else 422
        `webhook_url_not_allowed`."""
        body = await decode_strict(request, WebhookCreate)
        record, secret = await state.webhooks.create(body.url, body.types, principal(request).key_id)
        out = WebhookCreatedOut(**msgspec.structs.asdict(webhook_out(record)), secret=secret)
        return Response(
            out, status_code=201, headers={"Location": f"/v1/webhooks/{record.id}", "Cache-Control": "no-store"}
        )

    @get("/", operation_id="listWebhooks", responses=documented(*READ_PROBLEMS))
    async def list_webhooks(self, state: State, limit: Limit = None, cursor: Cursor = None) -> WebhookPage:
        """Subscriptions not deleted, with their status: `failing` once a delivery ran out
        of retries, until one succeeds again."""
        page = await state.webhooks.list(limit or state.settings.default_page_size, cursor)
        return WebhookPage(data=[webhook_out(record) for record in page.items], next_cursor=page.next_cursor)

    @get("/{webhook_id:str}", operation_id="getWebhook", responses=documented(*READ_PROBLEMS, 404))
    async def get_webhook(self, state: State, webhook_id: WebhookId) -> WebhookOut:
        path_identifier(webhook_id, WebhookNotFound, "webhook")
        return webhook_out(await state.webhooks.get(webhook_id))

    @delete(
        "/{webhook_id:str}", operation_id="deleteWebhook", status_code=200, responses=documented(*READ_PROBLEMS, 404)
    )
    async def delete_webhook(self, state: State, webhook_id: WebhookId) -> WebhookOut:
        """Stop delivering to it; deliveries not made yet are cancelled."""
        path_identifier(webhook_id, WebhookNotFound, "webhook")
        return webhook_out(await state.webhooks.delete(webhook_id))

    @get(
        "/{webhook_id:str}/deliveries", operation_id="listWebhookDeliveries", responses=documented(*READ_PROBLEMS, 404)
    )
    async def list_deliveries(
        self, state: State, webhook_id: WebhookId, limit: Limit = None, cursor: Cursor = None
    ) -> DeliveryPage:
        """The subscription's deliveries, newest event first: attempts, last answer, next
        attempt."""
        path_identifier(webhook_id, WebhookNotFound, "webhook")
        page = await state.webhooks.deliveries(webhook_id, limit or state.settings.default_page_size, cursor)
        return DeliveryPage(data=[delivery_out(record) for record in page.items], next_cursor=page.next_cursor)
