"""Request and response bodies, as msgspec Structs with the contract's constraints.

Request structs forbid unknown fields, so a typo such as `ammount` or a forged `balance`
is a 400 rather than silently ignored. Text that PostgreSQL cannot store (NUL) or that is
not encodable as UTF-8 (lone surrogates) is refused here too, so it can never reach the
database as a 5xx.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Literal

import msgspec

from ledger.domain import IDENTIFIER_RE, MAX_AMOUNT

CURRENCY_RE = re.compile(r"[A-Z]{3}")

Identifier = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9._:-]+$",
        description="1 to 64 characters of [A-Za-z0-9._:-], not only dots, chosen by the client",
        examples=["order-1234:capture"],
    ),
]
Currency = Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}$", description="ISO 4217-style code", examples=["EUR"])]
Amount = Annotated[
    int, msgspec.Meta(ge=1, le=MAX_AMOUNT, description="Minor units (cents), a JSON integer", examples=[1250])
]
# PostgreSQL text cannot hold NUL: the pattern says so in the OpenAPI document too (the
# __post_init__ checks below give the clearer message).
NO_NUL = r"^[^\x00]*$"
MetadataKey = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=NO_NUL)]
MetadataValue = Annotated[str, msgspec.Meta(max_length=512, pattern=NO_NUL)]
Metadata = Annotated[
    dict[MetadataKey, MetadataValue],
    msgspec.Meta(max_length=16, description="Flat string to string map, at most 16 keys"),
]
Description = Annotated[str, msgspec.Meta(max_length=512, pattern=NO_NUL)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=NO_NUL)]
TimeoutSeconds = Annotated[int, msgspec.Meta(ge=1, le=2_592_000)]


def _check_identifier(field: str, value: str | None) -> None:
    # msgspec's pattern uses re.search, where `$` also matches before a final newline;
    # fullmatch closes that gap (PostgreSQL's CHECK would otherwise catch it as a 5xx).
    if value is not None and not IDENTIFIER_RE.fullmatch(value):
        raise ValueError(f"`{field}` must be 1 to 64 characters of [A-Za-z0-9._:-], not only dots")


def _check_text(field: str, value: str | None) -> None:
    if value is None:
        return
    if "\x00" in value:
        raise ValueError(f"`{field}` must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"`{field}` is not valid Unicode text") from error


def _check_metadata(metadata: dict[str, str] | None) -> None:
    for key, value in (metadata or {}).items():
        _check_text("metadata key", key)
        _check_text(f"metadata.{key}", value)


# `gt=-1` rather than `ge=0`: the same for integers, and Litestar's OpenAPI generator drops
# a bound of 0 (falsy), which would publish negative limits as schema-valid.
Limit = Annotated[
    int,
    msgspec.Meta(
        gt=-1, le=MAX_AMOUNT, description="Minor units, a JSON integer >= 0; null: no limit", examples=[50000]
    ),
]


class AccountCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Open an account. Without `id` the service picks one. `overdraft_limit` above 0
    (like `allow_negative_balance`) needs an admin key."""

    currency: Currency
    id: Identifier | None = None
    name: Name | None = None
    allow_negative_balance: bool = False
    metadata: Metadata | None = None
    overdraft_limit: Limit | None = None
    max_balance: Limit | None = None

    def __post_init__(self) -> None:
        _check_identifier("id", self.id)
        if not CURRENCY_RE.fullmatch(self.currency):
            raise ValueError("`currency` must be three upper-case letters")
        _check_text("name", self.name)
        _check_metadata(self.metadata)


class TransferCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Move `amount` from the debit account to the credit account, once per `id`."""

    id: Identifier
    debit_account_id: Identifier
    credit_account_id: Identifier
    amount: Amount
    currency: Currency | None = None
    pending: bool = False
    timeout_seconds: TimeoutSeconds | None = None
    description: Description | None = None
    metadata: Metadata | None = None
    imported_at: Annotated[
        datetime | None,
        msgspec.Meta(description="History import (admin only): when the transfer happened, RFC 3339 with offset"),
    ] = None

    def __post_init__(self) -> None:
        if self.imported_at is not None:
            if self.imported_at.tzinfo is None:
                raise ValueError("`imported_at` must carry a time zone offset (e.g. Z)")
            if self.pending:
                raise ValueError("`imported_at` applies to posted transfers only (an import is of settled history)")
            try:
                self.imported_at = self.imported_at.astimezone(UTC)
            except OverflowError as error:  # 0001-01-01T00:00:00+14:00 has no UTC form
                raise ValueError("`imported_at` has no UTC form (before year 1 or after 9999)") from error
        for field in ("id", "debit_account_id", "credit_account_id"):
            _check_identifier(field, getattr(self, field))
        if self.currency is not None and not CURRENCY_RE.fullmatch(self.currency):
            raise ValueError("`currency` must be three upper-case letters")
        if self.timeout_seconds is not None and not self.pending:
            raise ValueError("`timeout_seconds` applies to pending transfers only")
        _check_text("description", self.description)
        _check_metadata(self.metadata)


class PostPending(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Post a pending transfer: all of it, or `amount` of it (the rest is released)."""

    amount: Amount | None = None


class VoidPending(msgspec.Struct, forbid_unknown_fields=True):
    """A void takes no fields: send `{}`."""


class Reverse(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Reverse a posted transfer: a new transfer with its own `id`, of `amount` (default:
    all that is still reversible)."""

    id: Identifier
    amount: Amount | None = None

    def __post_init__(self) -> None:
        _check_identifier("id", self.id)


class BatchTransfer(TransferCreate, forbid_unknown_fields=True, kw_only=True):
    """A batch item: a transfer, plus `linked` to tie it to the next item."""

    linked: bool = False


class BatchCreate(msgspec.Struct, forbid_unknown_fields=True):
    """1 to 1000 transfers, applied in order (over 1000: 413 batch_too_large)."""

    transfers: Annotated[list[BatchTransfer], msgspec.Meta(min_length=1)]


class Balance(msgspec.Struct):
    posted: int
    pending_debits: int
    pending_credits: int
    available: int


class AccountOut(msgspec.Struct):
    id: str
    currency: str
    name: str | None
    allow_negative_balance: bool
    metadata: dict[str, str]
    created_at: str
    balance: Balance
    entries_count: int
    status: Literal["open", "frozen", "closed"]
    overdraft_limit: int | None
    max_balance: int | None


class AccountUpdate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Change an account (admin): only the fields present change. `null` removes a limit
    or the name; `metadata` replaces the whole map. Closing is final."""

    status: Literal["open", "frozen", "closed"] | msgspec.UnsetType = msgspec.UNSET
    overdraft_limit: Limit | msgspec.UnsetType | None = msgspec.UNSET
    max_balance: Limit | msgspec.UnsetType | None = msgspec.UNSET
    name: Name | msgspec.UnsetType | None = msgspec.UNSET
    metadata: Metadata | msgspec.UnsetType = msgspec.UNSET

    def __post_init__(self) -> None:
        if isinstance(self.name, str):
            _check_text("name", self.name)
        if isinstance(self.metadata, dict):
            _check_metadata(self.metadata)

    def changes(self) -> dict[str, object]:
        return {
            field: getattr(self, field) for field in self.__struct_fields__ if getattr(self, field) is not msgspec.UNSET
        }


class AccountChangeOut(msgspec.Struct):
    account_id: str
    sequence: int
    changed_at: str
    # The API key that made the change (its id), `LEDGER_ADMIN_KEY`, or `cli`.
    changed_by: str | None
    fields: list[str]
    before: dict[str, object]
    after: dict[str, object]
    hash: str


class AccountChangePage(msgspec.Struct):
    data: list[AccountChangeOut]
    next_cursor: str | None


class TransferOut(msgspec.Struct):
    id: str
    debit_account_id: str
    credit_account_id: str
    amount: int
    currency: str | None
    status: Literal["posted", "pending", "voided", "expired", "rejected"]
    code: str | None
    pending: bool
    posted_amount: int | None
    expires_at: str | None
    reversal_of: str | None
    description: str | None
    metadata: dict[str, str]
    created_at: str
    updated_at: str
    imported_at: str | None = None


class BatchResultOut(msgspec.Struct, omit_defaults=True):
    index: int
    id: str
    status: Literal["created", "replayed", "rejected"]
    code: str | None = None
    transfer: TransferOut | None = None


class BatchOut(msgspec.Struct):
    results: list[BatchResultOut]


class EntryOut(msgspec.Struct):
    account_id: str
    sequence: int
    transfer_id: str
    amount: int
    balance_after: int
    created_at: str
    hash: str
    # The chain key `hash` is an HMAC under ("" for the SHA-256 chain of old entries).
    key_id: str
    # From the entry's transfer, outside the hash: the transfer's other account and its
    # description (null when it has none).
    counterparty_account_id: str | None
    description: str | None


class AccountBalanceOut(msgspec.Struct):
    account_id: str
    as_of: str
    posted: int
    sequence: int


class AccountPage(msgspec.Struct):
    data: list[AccountOut]
    next_cursor: str | None


class TransferPage(msgspec.Struct):
    data: list[TransferOut]
    next_cursor: str | None


class EntryPage(msgspec.Struct):
    data: list[EntryOut]
    next_cursor: str | None


class AuditVerify(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Verify the whole ledger, or one account."""

    account_id: Identifier | None = None

    def __post_init__(self) -> None:
        _check_identifier("account_id", self.account_id)


class AuditProblemOut(msgspec.Struct, omit_defaults=True):
    account_id: str
    sequence: int | None
    code: str
    detail: str
    transfer_id: str | None = None


class CheckpointOut(msgspec.Struct):
    """The checkpoint the database was compared with (None when there is none yet)."""

    taken_at: str
    key_id: str
    accounts: int
    transfers: int


class AuditReportOut(msgspec.Struct):
    ok: bool
    accounts_checked: int
    entries_checked: int
    problems: list[AuditProblemOut]
    problems_total: int
    transfers_checked: int
    checkpoint: CheckpointOut | None


class CurrencyBalanceOut(msgspec.Struct):
    currency: str
    debits: int
    credits: int
    difference: int


class TrialBalanceOut(msgspec.Struct):
    as_of: str
    balances: list[CurrencyBalanceOut]


class AggregateBalanceOut(msgspec.Struct):
    """Balances summed over the matching accounts of one currency, from one snapshot. The
    sums are JSON integers of any size: they can pass the bigint range of one balance."""

    currency: str
    accounts: int
    posted: int
    pending_debits: int
    pending_credits: int
    available: int
    as_of: str


Role = Literal["admin", "poster", "auditor"]


class KeyCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A new API key with one role; the key itself is in the answer, once."""

    role: Role
    name: Name | None = None

    def __post_init__(self) -> None:
        _check_text("name", self.name)


class KeyOut(msgspec.Struct, kw_only=True):
    id: str
    role: str
    name: str | None
    created_at: str
    revoked_at: str | None
    created_by: str | None
    revoked_by: str | None


class KeyCreatedOut(KeyOut, kw_only=True):
    # Shown once: only its SHA-256 is stored.
    key: str


class KeyPage(msgspec.Struct):
    data: list[KeyOut]
    next_cursor: str | None


EventType = Literal[
    "account.created",
    "account.changed",
    "transfer.posted",
    "transfer.pending",
    "transfer.rejected",
    "transfer.voided",
    "transfer.expired",
]


class _AccountEvent(msgspec.Struct, tag_field="type", kw_only=True):
    # `evt_<position>`; also a cursor: `after=<id>` resumes right after this event.
    id: str
    created_at: str
    # The account as it was right after the change.
    data: AccountOut


class _TransferEvent(msgspec.Struct, tag_field="type", kw_only=True):
    # `evt_<position>`; also a cursor: `after=<id>` resumes right after this event.
    id: str
    created_at: str
    # The transfer as it was right after the change.
    data: TransferOut


class AccountCreatedEvent(_AccountEvent, tag="account.created"):
    pass


class AccountChangedEvent(_AccountEvent, tag="account.changed"):
    pass


class TransferPostedEvent(_TransferEvent, tag="transfer.posted"):
    pass


class TransferPendingEvent(_TransferEvent, tag="transfer.pending"):
    pass


class TransferRejectedEvent(_TransferEvent, tag="transfer.rejected"):
    pass


class TransferVoidedEvent(_TransferEvent, tag="transfer.voided"):
    pass


class TransferExpiredEvent(_TransferEvent, tag="transfer.expired"):
    pass


# An event: {"type", "id", "created_at", "data"}, `type` telling which object `data` is.
EventOut = (
    AccountCreatedEvent
    | AccountChangedEvent
    | TransferPostedEvent
    | TransferPendingEvent
    | TransferRejectedEvent
    | TransferVoidedEvent
    | TransferExpiredEvent
)
EVENT_CLASSES: dict[str, type[_AccountEvent] | type[_TransferEvent]] = {
    "account.created": AccountCreatedEvent,
    "account.changed": AccountChangedEvent,
    "transfer.posted": TransferPostedEvent,
    "transfer.pending": TransferPendingEvent,
    "transfer.rejected": TransferRejectedEvent,
    "transfer.voided": TransferVoidedEvent,
    "transfer.expired": TransferExpiredEvent,
}


class EventPage(msgspec.Struct):
    data: list[EventOut]
    # Never null: where to continue (a long-poll with it waits for the next event).
    next_cursor: str


class WebhookCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    url: Annotated[str, msgspec.Meta(min_length=1, max_length=2048)]
    types: Annotated[list[EventType], msgspec.Meta(min_length=1, max_length=16)] | None = None


class WebhookOut(msgspec.Struct, kw_only=True):
    id: str
    url: str
    types: list[str] | None
    # active | failing (a delivery ran out of retries; a later success clears it) | deleted
    status: str
    created_at: str
    failing_since: str | None
    last_error: str | None


class WebhookCreatedOut(WebhookOut, kw_only=True):
    # Shown once: the service derives it from its chain key and does not store it.
    secret: str


class WebhookPage(msgspec.Struct):
    data: list[WebhookOut]
    next_cursor: str | None


class DeliveryOut(msgspec.Struct, kw_only=True):
    id: str
    event_id: str
    event_type: str
    # pending (will be tried, again), delivered, failed (past the retry horizon),
    # cancelled (the subscription was deleted)
    status: str
    attempts: int
    created_at: str
    last_attempt_at: str | None
    next_attempt_at: str | None
    delivered_at: str | None
    last_status_code: int | None
    last_error: str | None


class DeliveryPage(msgspec.Struct):
    data: list[DeliveryOut]
    next_cursor: str | None


class FieldError(msgspec.Struct):
    field: str
    message: str


class Problem(msgspec.Struct, omit_defaults=True):
    """RFC 9457 problem details; `code` is the stable reason clients branch on."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    errors: list[FieldError] | None = None
    transfer_id: str | None = None


class Health(msgspec.Struct):
    status: str
    checks: dict[str, str] = msgspec.field(default_factory=dict)


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with microseconds, always: `2026-11-24T21:59:03.123456Z`."""
    # isoformat is several times faster than strftime, and this runs twice per transfer.
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def parse_timestamp(field: str, value: str) -> datetime:
    """Parse an RFC 3339 timestamp; an offset is required, so that no reader guesses a zone."""
    try:
        moment = datetime.fromisoformat(value.strip().replace("z", "Z"))
    except ValueError as error:
        raise ValueError(f"`{field}` must be an RFC 3339 timestamp such as 2026-11-24T21:59:03.123456Z") from error
    if moment.tzinfo is None:
        raise ValueError(f"`{field}` must carry a time zone offset, e.g. Z")
    try:
        # In UTC, as the database compares it; 0001-01-01T00:00:00+14:00 has no UTC form.
        return moment.astimezone(UTC)
    except OverflowError as error:
        raise ValueError(f"`{field}` is out of range") from error
