"""The client's events feed, webhook calls and webhook signatures, against a stand-in of
the server on `httpx.MockTransport`: `follow_events` goes where each `next_cursor` says
(an opaque string, not the last event's id), resumes after a stored event id, keeps
polling through empty pages unless told to stop, and gives each long poll a read timeout
longer than its `wait`; signatures are checked byte for byte, secret for secret, and in
time."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import msgspec
import pytest

from ledger.client import (
    Account,
    AsyncLedgerClient,
    ConnectionFailed,
    CursorExpired,
    DecisionRefused,
    Event,
    InvalidCursor,
    InvalidSignature,
    LedgerClient,
    OutcomeUnknown,
    Transfer,
    WebhookNotFound,
    WebhookUrlNotAllowed,
    _core,
    verify_signature,
)
from ledger.client.errors import CODE_CLASSES
from ledger.client.webhooks import SIGNATURE_HEADER, parse_event, sign

BASE_URL = "http://ledger.test"
FAST = {"base_backoff": 0.001, "max_backoff": 0.002}
STAMP = "2025-03-01T12:00:00Z"


def transfer_data(number: int, debit: str = "acc-1", credit: str = "acc-2") -> dict[str, Any]:
    return {
        "id": f"t-{number}",
        "debit_account_id": debit,
        "credit_account_id": credit,
        "amount": 100 + number,
        "currency": "EUR",
        "status": "posted",
        "metadata": {},
        "created_at": STAMP,
        "updated_at": STAMP,
        # A field this client does not know (a newer server).
        "settlement": {"batch": 7},
    }


def account_data(account_id: str) -> dict[str, Any]:
    return {
        "id": account_id,
        "currency": "EUR",
        "created_at": STAMP,
        "balance": {"posted": 5, "pending_debits": 0, "pending_credits": 0, "available": 5},
        "tier": "gold",
    }


def event(
    number: int, type: str = "transfer.posted", *, account: str = "acc-1", debit: str = "acc-1", credit: str = "acc-2"
) -> dict[str, Any]:
    payload = account_data(account) if type.startswith("account.") else transfer_data(number, debit, credit)
    return {"id": f"evt_{number}", "type": type, "created_at": STAMP, "data": payload}


def problem(status: int, code: str) -> httpx.Response:
    body = {"type": f"urn:ledger:problem:{code}", "title": code, "status": status, "detail": code, "code": code}
    return httpx.Response(status, json=body, headers={"content-type": "application/problem+json"})


class Feed:
    """The events feed: `after` is an event id or a cursor "c:<n>" (both mean "after event
    n"), and `next_cursor` is always a cursor, never an event id, so a client that does
    not follow it shows. `arrivals[k]` are events appended when request k comes in."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events = list(events)
        self.requests: list[httpx.Request] = []
        self.expired: set[str] = set()
        self.arrivals: dict[int, list[dict[str, Any]]] = {}
        # Statuses answered (instead of the page) to the requests of these numbers.
        self.failures: dict[int, int] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        number = len(self.requests)
        assert number <= 50, "still polling: the iterator does not stop"
        self.events.extend(self.arrivals.pop(number, []))
        if number in self.failures:
            return problem(self.failures[number], "unavailable")
        assert request.method == "GET" and request.url.path == "/v1/events"
        params = request.url.params
        position = 0
        if "after" in params:
            if params["after"] in self.expired:
                return problem(410, "cursor_expired")
            match = re.fullmatch(r"(?:evt_|c:)([0-9]+)", params["after"])
            if match is None:
                return problem(400, "invalid_cursor")
            position = int(match[1])
        types = params["types"].split(",") if "types" in params else None
        account = params.get("account_id")
        matching = [
            item
            for item in self.events
            if int(item["id"][4:]) > position
            and (types is None or item["type"] in types)
            and (account is None or account in _accounts_of(item["data"]))
        ]
        page = matching[: int(params.get("limit", "100"))]
        last = int(page[-1]["id"][4:]) if page else position
        return httpx.Response(200, json={"data": page, "next_cursor": f"c:{last}"})

    def sent(self, name: str) -> list[str | None]:
        return [request.url.params.get(name) for request in self.requests]


def _accounts_of(data: dict[str, Any]) -> set[str]:
    return {data.get("id"), data.get("debit_account_id"), data.get("credit_account_id")} - {None}


def client(handler: Callable[[httpx.Request], httpx.Response], **options: Any) -> LedgerClient:
    return LedgerClient(BASE_URL, "test-key", transport=httpx.MockTransport(handler), **{**FAST, **options})


def async_client(handler: Callable[[httpx.Request], httpx.Response], **options: Any) -> AsyncLedgerClient:
    return AsyncLedgerClient(BASE_URL, "test-key", transport=httpx.MockTransport(handler), **{**FAST, **options})


def ids(events: Iterator[Event] | list[Event]) -> list[str]:
    return [item.id for item in events]


# -- the feed ------------------------------------------------------------------------------


def test_follow_events_goes_where_each_next_cursor_says() -> None:
    feed = Feed([event(n) for n in range(1, 6)])
    with client(feed) as ledger:
        got = ids(ledger.follow_events(page_size=2, wait=0, stop_when_idle=True))
    assert got == ["evt_1", "evt_2", "evt_3", "evt_4", "evt_5"]
    # The cursors of the answers, not the last events' ids; the empty last page ends it.
    assert feed.sent("after") == [None, "c:2", "c:4", "c:5"]
    assert feed.sent("limit") == ["2", "2", "2", "2"]


async def test_async_follow_events_goes_where_each_next_cursor_says() -> None:
    feed = Feed([event(n) for n in range(1, 6)])
    async with async_client(feed) as ledger:
        got = [item.id async for item in ledger.follow_events(page_size=2, wait=0, stop_when_idle=True)]
    assert got == ["evt_1", "evt_2", "evt_3", "evt_4", "evt_5"]
    assert feed.sent("after") == [None, "c:2", "c:4", "c:5"]


def test_follow_events_resumes_right_after_a_stored_event_id() -> None:
    feed = Feed([event(n) for n in range(1, 6)])
    with client(feed) as ledger:
        got = ids(ledger.follow_events(after="evt_3", wait=0, stop_when_idle=True))
    assert got == ["evt_4", "evt_5"]
    assert feed.sent("after")[0] == "evt_3"


def test_follow_events_sends_types_account_and_wait_on_every_page() -> None:
    feed = Feed(
        [
            event(1, "account.created", account="acc-1"),
            event(2, debit="acc-1"),
            event(3, debit="acc-9", credit="acc-8"),  # another account's
            event(4, "transfer.voided", debit="acc-1"),  # another type
            event(5, debit="acc-2", credit="acc-1"),
        ]
    )
    with client(feed) as ledger:
        got = list(
            ledger.follow_events(
                types=["transfer.posted", "account.created"],
                account_id="acc-1",
                wait=7,
                page_size=1,
                stop_when_idle=True,
            )
        )
    assert ids(got) == ["evt_1", "evt_2", "evt_5"]
    assert len(feed.requests) == 4
    assert set(feed.sent("types")) == {"transfer.posted,account.created"}
    assert set(feed.sent("account_id")) == {"acc-1"}
    assert set(feed.sent("wait")) == {"7"}


def test_a_single_type_given_as_a_string_is_one_type() -> None:
    feed = Feed([event(1), event(2, "transfer.voided")])
    with client(feed) as ledger:
        page = ledger.list_events(types="transfer.voided")
    assert feed.sent("types") == ["transfer.voided"]
    assert ids(page.data) == ["evt_2"]
    assert page.next_cursor == "c:2"


def test_follow_events_keeps_polling_through_empty_pages_unless_told_to_stop() -> None:
    def scripted() -> Feed:
        feed = Feed([event(1), event(2)])
        feed.arrivals[3] = [event(3)]  # arrives while the third poll waits
        return feed

    following = scripted()
    with client(following) as ledger:
        got = ids(itertools.islice(ledger.follow_events(wait=0), 3))
    assert got == ["evt_1", "evt_2", "evt_3"]
    assert following.sent("after") == [None, "c:2", "c:2"]  # an empty page, then on

    stopping = scripted()
    with client(stopping) as ledger:
        got = ids(ledger.follow_events(wait=0, stop_when_idle=True))
    assert got == ["evt_1", "evt_2"]
    assert len(stopping.requests) == 2


def test_an_expired_cursor_raises_cursor_expired_at_once() -> None:
    feed = Feed([event(1)])
    feed.expired.add("evt_0")
    with client(feed) as ledger, pytest.raises(CursorExpired) as raised:
        next(ledger.follow_events(after="evt_0", wait=0))
    assert (raised.value.status, raised.value.code) == (410, "cursor_expired")
    assert len(feed.requests) == 1  # a decided answer: not retried
    assert CODE_CLASSES["cursor_expired"] is CursorExpired


def test_a_malformed_cursor_raises_invalid_cursor() -> None:
    with client(Feed([])) as ledger, pytest.raises(InvalidCursor):
        ledger.list_events(after="not a cursor")


def test_a_page_that_fails_is_retried_with_the_same_cursor() -> None:
    feed = Feed([event(n) for n in range(1, 4)])
    feed.failures[2] = 503
    with client(feed) as ledger:
        got = ids(ledger.follow_events(page_size=2, wait=0, stop_when_idle=True))
    assert got == ["evt_1", "evt_2", "evt_3"]
    assert feed.sent("after") == [None, "c:2", "c:2", "c:3"]


# -- long polls ----------------------------------------------------------------------------


def test_a_long_poll_may_take_longer_than_the_timeout_and_total_timeout() -> None:
    feed = Feed([])
    with client(feed, timeout=1, connect_timeout=1, total_timeout=5) as ledger:
        ledger.list_events(wait=30)
        next(ledger.follow_events(wait=20, stop_when_idle=True), None)
        ledger.list_events()
    polled, followed, plain = (request.extensions["timeout"] for request in feed.requests)
    assert feed.sent("wait") == ["30", "20", None]
    assert polled["read"] >= 30 + 5
    assert followed["read"] >= 20 + 5
    assert plain["read"] == 1  # only a long poll gets the extra time
    assert polled["connect"] == 1  # and a dead host still fails fast


async def test_an_async_long_poll_may_take_longer_than_the_timeout() -> None:
    feed = Feed([])
    async with async_client(feed, timeout=1, total_timeout=5) as ledger:
        await ledger.list_events(wait=30)
    assert feed.requests[0].extensions["timeout"]["read"] >= 30 + 5


def test_a_late_retry_asks_for_a_wait_the_call_can_still_read() -> None:
    now = [0.0]
    call = _core.list_events(after="c:1", limit=None, types=None, account_id=None, wait=30)
    attempts = _core.Attempts(call, _core.Settings(timeout=10, total_timeout=60), clock=lambda: now[0])
    first = attempts.request()
    assert first["params"]["wait"] == "30"
    assert first["timeout"].read >= 30 + 5
    now[0] = first["timeout"].read  # it timed out: no answer in wait + margin
    attempts.failed(httpx.ReadTimeout("quiet"))
    retry = attempts.request()
    left = 60 - now[0]
    waited = int(retry["params"]["wait"])
    assert 0 <= waited < 30
    assert waited < retry["timeout"].read <= left  # the server answers before the call ends
    assert retry["params"]["after"] == "c:1"


def test_a_long_poll_that_keeps_timing_out_ends_in_connection_failed() -> None:
    requests: list[httpx.Request] = []

    def silent(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        raise httpx.ReadTimeout("no answer", request=request)

    with client(silent, max_attempts=3) as ledger, pytest.raises(ConnectionFailed):
        ledger.list_events(wait=5)
    assert len(requests) == 3


# -- events --------------------------------------------------------------------------------


def test_an_event_decodes_its_transfer_or_account_and_tolerates_new_fields() -> None:
    page = {
        "data": [event(1), event(2, "account.created", account="acc-7"), event(3, "ledger.rotated")],
        "next_cursor": "c:3",
        "next_page_hint": 1,
    }
    with client(lambda request: httpx.Response(200, json=page)) as ledger:
        posted, opened, other = ledger.list_events().data
    assert posted.created_at == datetime(2025, 3, 1, 12, tzinfo=UTC)
    transfer = posted.transfer
    assert isinstance(transfer, Transfer)
    assert (transfer.id, transfer.amount, transfer.updated_at.tzinfo) == ("t-1", 101, UTC)
    assert posted.account is None
    account = opened.account
    assert isinstance(account, Account)
    assert (account.id, account.balance.posted) == ("acc-7", 5)
    assert opened.transfer is None
    assert (other.transfer, other.account) == (None, None)
    assert other.data["amount"] == 103  # an unknown type still arrives whole


def test_a_webhook_delivery_body_parses_as_an_event() -> None:
    parsed = parse_event(json.dumps(event(4, "transfer.pending")).encode())
    assert (parsed.id, parsed.type) == ("evt_4", "transfer.pending")
    assert parsed.transfer is not None and parsed.transfer.id == "t-4"


# -- webhooks ------------------------------------------------------------------------------

WEBHOOK = {
    "id": "wh_1",
    "url": "https://hooks.example/ledger",
    "types": None,
    "status": "active",
    "created_at": STAMP,
    "failing_since": None,
    "last_error": None,
    "paused": False,
}


def test_create_webhook_sends_url_and_types_and_reads_the_secret() -> None:
    bodies: list[dict[str, Any]] = []

    def server(request: httpx.Request) -> httpx.Response:
        assert (request.method, request.url.path) == ("POST", "/v1/webhooks")
        bodies.append(json.loads(request.content))
        return httpx.Response(201, json={**WEBHOOK, "types": bodies[-1].get("types"), "secret": "whsec_abc"})

    with client(server) as ledger:
        created = ledger.create_webhook("https://hooks.example/ledger", types="transfer.posted")
        everything = ledger.create_webhook("https://hooks.example/ledger")
    assert bodies == [
        {"url": "https://hooks.example/ledger", "types": ["transfer.posted"]},
        {"url": "https://hooks.example/ledger"},  # no types: the server's default, all
    ]
    assert (created.secret, created.types, created.status) == ("whsec_abc", ["transfer.posted"], "active")
    assert everything.types is None


def test_a_refused_webhook_url_raises_webhook_url_not_allowed() -> None:
    with client(lambda request: problem(422, "webhook_url_not_allowed")) as ledger:
        with pytest.raises(WebhookUrlNotAllowed) as raised:
            ledger.create_webhook("http://169.254.169.254/")
    assert isinstance(raised.value, DecisionRefused)
    assert raised.value.status == 422


def test_creating_a_webhook_is_not_sent_twice() -> None:
    requests: list[httpx.Request] = []

    def unavailable(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return problem(503, "unavailable")

    with client(unavailable) as ledger, pytest.raises(OutcomeUnknown):
        ledger.create_webhook("https://hooks.example/ledger")
    assert len(requests) == 1


def test_webhook_reads_deletes_and_deliveries() -> None:
    delivery = {
        "id": "whd_1",
        "event_id": "evt_9",
        "event_type": "transfer.posted",
        "status": "failed",
        "attempts": 3,
        "created_at": STAMP,
        "last_attempt_at": "2025-03-01T12:05:00+00:00",
        "next_attempt_at": None,
        "delivered_at": None,
        "last_status_code": None,
        "last_error": "connection refused",
        "signature_version": "v1",
    }
    failing = {**WEBHOOK, "id": "wh_2", "status": "failing", "failing_since": STAMP, "last_error": "timeout"}

    def server(request: httpx.Request) -> httpx.Response:
        route = (request.method, request.url.path, request.url.params.get("cursor"))
        answers = {
            ("GET", "/v1/webhooks", None): {"data": [WEBHOOK], "next_cursor": "p2"},
            ("GET", "/v1/webhooks", "p2"): {"data": [failing], "next_cursor": None},
            ("GET", "/v1/webhooks/wh_2", None): failing,
            ("DELETE", "/v1/webhooks/wh_2", None): failing,
            ("GET", "/v1/webhooks/wh_2/deliveries", None): {"data": [delivery], "next_cursor": None},
        }
        if route not in answers:
            return problem(404, "webhook_not_found")
        return httpx.Response(200, json=answers[route])

    with client(server) as ledger:
        assert [hook.id for hook in ledger.iter_webhooks()] == ["wh_1", "wh_2"]
        fetched = ledger.get_webhook("wh_2")
        assert (fetched.status, fetched.failing_since, fetched.last_error) == (
            "failing",
            datetime(2025, 3, 1, 12, tzinfo=UTC),
            "timeout",
        )
        assert ledger.delete_webhook("wh_2").id == "wh_2"
        (got,) = ledger.list_webhook_deliveries("wh_2").data
        assert (got.status, got.attempts, got.last_status_code, got.delivered_at) == ("failed", 3, None, None)
        assert got.last_attempt_at == datetime(2025, 3, 1, 12, 5, tzinfo=UTC)
        with pytest.raises(WebhookNotFound):
            ledger.get_webhook("wh_404")


# -- signatures ----------------------------------------------------------------------------

SECRET = "whsec_9fK2mQ"
BODY = json.dumps(event(1)).encode()
T = 1_740_830_400


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body_keyed_by_the_whole_secret() -> None:
    digest = hmac.new(SECRET.encode("utf-8"), f"{T}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert sign(SECRET, BODY, T) == f"t={T},v1={digest}"
    assert sign(SECRET, BODY, T + 0.9) == f"t={T},v1={digest}"  # whole seconds
    assert SIGNATURE_HEADER == "Ledger-Signature"


def test_a_signature_round_trips() -> None:
    verify_signature(SECRET, BODY, sign(SECRET, BODY, T), now=T + 1)
    verify_signature(SECRET, BODY, sign(SECRET, BODY, T), now=T + 300)  # the tolerance is inclusive


def test_a_tampered_body_is_rejected() -> None:
    header = sign(SECRET, BODY, T)
    tampered = BODY.replace(b'"amount": 101', b'"amount": 901')
    assert tampered != BODY
    with pytest.raises(InvalidSignature):
        verify_signature(SECRET, tampered, header, now=T)


def test_a_changed_timestamp_is_rejected() -> None:
    header = sign(SECRET, BODY, T).replace(f"t={T}", f"t={T + 1}")
    with pytest.raises(InvalidSignature):
        verify_signature(SECRET, BODY, header, now=T)


def test_another_secret_is_rejected() -> None:
    with pytest.raises(InvalidSignature):
        verify_signature("whsec_other", BODY, sign(SECRET, BODY, T), now=T)
    # The key is the whole secret, prefix included.
    with pytest.raises(InvalidSignature):
        verify_signature(SECRET, BODY, sign(SECRET.removeprefix("whsec_"), BODY, T), now=T)


@pytest.mark.parametrize("offset", [-301, 301, -86_400, 86_400])
def test_stale_and_future_timestamps_are_rejected(offset: int) -> None:
    header = sign(SECRET, BODY, T)
    with pytest.raises(InvalidSignature, match="timestamp"):
        verify_signature(SECRET, BODY, header, now=T + offset)
    verify_signature(SECRET, BODY, header, now=T + offset, tolerance_seconds=abs(offset))


def test_the_default_clock_is_now() -> None:
    old = sign(SECRET, BODY, 1_000_000_000)
    with pytest.raises(InvalidSignature, match="timestamp"):
        verify_signature(SECRET, BODY, old)
    verify_signature(SECRET, BODY, sign(SECRET, BODY, datetime.now(UTC).timestamp()))


def test_any_of_several_v1_signatures_may_match_and_other_schemes_are_ignored() -> None:
    rotating = sign(["whsec_old", "whsec_new"], BODY, T)
    assert rotating.count("v1=") == 2
    verify_signature("whsec_old", BODY, rotating, now=T)
    verify_signature("whsec_new", BODY, rotating, now=T)
    with pytest.raises(InvalidSignature):
        verify_signature("whsec_neither", BODY, rotating, now=T)
    good = sign(SECRET, BODY, T).split(",")[1]
    header = f"t={T}, v0=deadbeef, v1={'0' * 64},{good.upper().replace('V1=', 'v1=')} ,v2=whatever"
    verify_signature(SECRET, BODY, header, now=T)
    with pytest.raises(InvalidSignature):  # a scheme other than v1 is never accepted
        verify_signature(SECRET, BODY, f"t={T},v2={good[3:]}", now=T)


def signed_as(timestamp_text: str) -> str:
    """A v1 entry signed over `timestamp_text` exactly as written: a header that is only
    malformed, so that a lax parser would let it through."""
    message = f"{timestamp_text}.".encode() + BODY
    return "v1=" + hmac.new(SECRET.encode(), message, hashlib.sha256).hexdigest()


GOOD_V1 = signed_as(str(T))
ARABIC_INDIC_T = str(T).translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"))


@pytest.mark.parametrize(
    "header",
    [
        "",
        "garbage",
        GOOD_V1,  # no timestamp
        f"t={T}",  # no signature
        f"t={T},{GOOD_V1.replace('v1=', 'v0=')}",  # no v1 signature
        f"t=+{T},{GOOD_V1}",  # int() would read these timestamps
        f"t={T}.0,{signed_as(f'{T}.0')}",
        f"t=-{T},{signed_as(f'-{T}')}",
        f"t={ARABIC_INDIC_T},{GOOD_V1}",
        f"t={T},t={T + 1},{GOOD_V1}",  # which one was signed?
        f"t={T + 1},{GOOD_V1},t={T}",
        f"t={T},{GOOD_V1},v1",  # a part without "="
        f"t={T},,{GOOD_V1}",  # an empty part
        f"t={T},=x,{GOOD_V1}",  # a part without a scheme
    ],
)
def test_malformed_headers_are_rejected(header: str) -> None:
    # Only the header's form can be what rejects it: its timestamps are all in tolerance.
    with pytest.raises(InvalidSignature):
        verify_signature(SECRET, BODY, header, now=T, tolerance_seconds=10**12)


def test_the_well_formed_variants_of_those_headers_pass() -> None:
    verify_signature(SECRET, BODY, f"t={T},{GOOD_V1}", now=T)
    verify_signature(SECRET, BODY, f" t={T} , {GOOD_V1} ", now=T)


def test_a_non_ascii_signature_is_rejected_not_a_type_error() -> None:
    with pytest.raises(InvalidSignature):
        verify_signature(SECRET, BODY, f"t={T},v1=é{'a' * 63}", now=T)


def test_the_body_must_be_the_raw_bytes() -> None:
    with pytest.raises(TypeError):
        verify_signature(SECRET, BODY.decode(), sign(SECRET, BODY, T), now=T)  # type: ignore[arg-type]


def test_signature_errors_are_not_problem_answers() -> None:
    from ledger.client import LedgerError, ProblemError

    assert issubclass(InvalidSignature, LedgerError)
    assert not issubclass(InvalidSignature, ProblemError)
    with pytest.raises(msgspec.ValidationError):
        parse_event(b'{"id": "evt_1"}')
