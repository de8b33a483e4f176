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
from typing import Generic, TypeVar

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


class Health(msgspec.Struct, kw_only=True):
    # "ok", or "unavailable" from a /health/ready that answered 503.
    status: str
    checks: dict[str, str] = msgspec.field(default_factory=dict)


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
