"""What the ledger answers, as msgspec Structs mirroring the JSON of `API.md`.

Unknown fields are ignored when decoding (msgspec's default), and fields the contract
added later, or that a newer server may stop sending with a value, have defaults: an old
client keeps working against a newer server. Statuses and codes are plain strings rather
than closed enumerations for the same reason.

`NewTransfer` is the one request-side type: a batch item.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

import msgspec

T = TypeVar("T")


class Balance(msgspec.Struct, kw_only=True):
    posted: int
    pending_debits: int
    pending_credits: int
    available: int


class Account(msgspec.Struct, kw_only=True):
    id: str
    currency: str
    name: str | None = None
    allow_negative_balance: bool = False
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    created_at: datetime
    balance: Balance
    entries_count: int = 0
    # Account controls (contract 1.1): None from a server that does not have them yet.
    status: str | None = None
    overdraft_limit: int | None = None
    max_balance: int | None = None
    # Set by the client, not sent by the server: True when this answer was a replay of an
    # earlier create with the same id (`Idempotent-Replayed: true`).
    replayed: bool = False


class Transfer(msgspec.Struct, kw_only=True):
    id: str
    debit_account_id: str
    credit_account_id: str
    amount: int
    currency: str | None = None
    # posted, pending, voided, expired or rejected
    status: str
    # The refusal reason of a rejected transfer, else None.
    code: str | None = None
    pending: bool = False
    posted_amount: int | None = None
    expires_at: datetime | None = None
    reversal_of: str | None = None
    description: str | None = None
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    created_at: datetime
    updated_at: datetime
    # History import (contract 1.1): when the transfer happened in the system it came
    # from, the time its entries carry; None for transfers made here.
    imported_at: datetime | None = None
    # Set by the client: True when the server answered with the outcome it had recorded
    # for this id before (`Idempotent-Replayed: true`).
    replayed: bool = False


class BatchItemResult(msgspec.Struct, kw_only=True):
    index: int
    id: str
    # created, replayed or rejected
    status: str
    code: str | None = None
    transfer: Transfer | None = None


class BatchResult(msgspec.Struct, kw_only=True):
    results: list[BatchItemResult]


class Entry(msgspec.Struct, kw_only=True):
    account_id: str | None = None
    sequence: int
    transfer_id: str
    # Signed: a credit is positive, a debit negative.
    amount: int
    balance_after: int
    created_at: datetime
    hash: str
    key_id: str = ""
    # The transfer's other account and its description (from servers that send them).
    counterparty_account_id: str | None = None
    description: str | None = None


class AccountBalance(msgspec.Struct, kw_only=True):
    account_id: str
    as_of: datetime
    posted: int
    sequence: int


class CurrencyTotals(msgspec.Struct, kw_only=True):
    currency: str
    debits: int
    credits: int
    difference: int


class TrialBalance(msgspec.Struct, kw_only=True):
    as_of: datetime
    balances: list[CurrencyTotals]


class AggregateBalance(msgspec.Struct, kw_only=True):
    """Balances summed over the matching accounts of one currency (`GET
    /v1/balances/aggregate`); the sums are Python ints of any size."""

    currency: str
    accounts: int
    posted: int
    pending_debits: int
    pending_credits: int
    available: int
    as_of: datetime


class AuditProblem(msgspec.Struct, kw_only=True):
    account_id: str | None = None
    sequence: int | None = None
    code: str
    detail: str = ""
    transfer_id: str | None = None


class AuditCheckpoint(msgspec.Struct, kw_only=True):
    taken_at: datetime
    key_id: str
    accounts: int
    transfers: int


class AuditReport(msgspec.Struct, kw_only=True):
    ok: bool
    accounts_checked: int
    entries_checked: int
    problems: list[AuditProblem] = msgspec.field(default_factory=list)
    problems_total: int = 0
    transfers_checked: int = 0
    checkpoint: AuditCheckpoint | None = None


class ApiKey(msgspec.Struct, kw_only=True):
    id: str
    role: str
    name: str | None = None
    created_at: datetime
    revoked_at: datetime | None = None
    created_by: str | None = None
    revoked_by: str | None = None


class CreatedApiKey(ApiKey, kw_only=True):
    # The key itself, in this answer only: the service keeps its SHA-256.
    key: str


class Event(msgspec.Struct, kw_only=True):
    """One change of the ledger, from the events feed (`GET /v1/events`) or a webhook
    delivery. `id` ("evt_<n>") is also a cursor: `after=event.id` resumes right after
    it, so storing the id of the last event processed is enough to resume."""

    id: str
    # account.created, account.changed, transfer.posted, transfer.pending,
    # transfer.rejected, transfer.voided, transfer.expired (and types a newer server adds)
    type: str
    created_at: datetime
    # The account or transfer as it was after the change, as JSON: kept undecoded so an
    # event of a type this client does not know still arrives whole.
    data: dict[str, Any] = msgspec.field(default_factory=dict)

    @property
    def transfer(self) -> Transfer | None:
        """`data` as a `Transfer` for a `transfer.*` event, else None. Raises
        `msgspec.ValidationError` when `data` is not a transfer."""
        if not self.type.startswith("transfer."):
            return None
        return msgspec.convert(self.data, Transfer)

    @property
    def account(self) -> Account | None:
        """`data` as an `Account` for an `account.*` event, else None. Raises
        `msgspec.ValidationError` when `data` is not an account."""
        if not self.type.startswith("account."):
            return None
        return msgspec.convert(self.data, Account)


class EventPage(msgspec.Struct, kw_only=True):
    data: list[Event]
    # Unlike other pages', never None: the position after this page, even an empty one
    # (then possibly the cursor that was sent). Pass it as `after` to continue.
    next_cursor: str


class Webhook(msgspec.Struct, kw_only=True):
    id: str
    url: str
    # The event types delivered; None: every type.
    types: list[str] | None = None
    # active; failing (deliveries to it keep failing: see `failing_since`, `last_error`);
    # deleted (in the answers to `delete_webhook`)
    status: str
    created_at: datetime
    failing_since: datetime | None = None
    last_error: str | None = None


class CreatedWebhook(Webhook, kw_only=True):
    # The signing secret ("whsec_..."), in the creation answer: keep it to check each
    # delivery with `ledger.client.webhooks.verify_signature`.
    secret: str


class WebhookDelivery(msgspec.Struct, kw_only=True):
    id: str
    event_id: str
    event_type: str
    # pending, delivered, failed or cancelled
    status: str
    attempts: int
    created_at: datetime
    last_attempt_at: datetime | None = None
    next_attempt_at: datetime | None = None
    delivered_at: datetime | None = None
    # The receiver's HTTP status at the last attempt; None when it gave none (no
    # connection, a timeout: see `last_error`) or was not tried yet.
    last_status_code: int | None = None
    last_error: str | None = None


class Health(msgspec.Struct, kw_only=True):
    # "ok", or "unavailable" from a /health/ready that answered 503.
    status: str
    checks: dict[str, str] = msgspec.field(default_factory=dict)


class AccountChange(msgspec.Struct, kw_only=True):
    """One change of an account (`GET /v1/accounts/{id}/changes`): which fields, their
    values before and after, when and by which key."""

    account_id: str
    sequence: int
    changed_at: datetime
    changed_by: str | None = None
    fields: list[str]
    before: dict[str, Any]
    after: dict[str, Any]
    hash: str


class Page(msgspec.Struct, Generic[T], kw_only=True):
    data: list[T]
    next_cursor: str | None = None


@dataclass(frozen=True, kw_only=True)
class NewTransfer:
    """A batch item. Without `id` the client generates one (see `BatchResult.results`
    for the ids sent); `linked=True` ties it to the next item."""

    debit_account_id: str
    credit_account_id: str
    amount: int
    id: str | None = None
    currency: str | None = None
    pending: bool = False
    timeout_seconds: int | None = None
    description: str | None = None
    metadata: dict[str, str] | None = None
    linked: bool = False
    # History import (admin only): the time the transfer's entries carry instead of now.
    imported_at: datetime | None = None
