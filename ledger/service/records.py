"""What the service returns: plain records, independent of HTTP and of the ORM."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Generic, TypeVar

from ledger.domain import TransferPlan, TransferRequest

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class AccountRecord:
    id: str
    currency: str
    name: str | None
    allow_negative_balance: bool
    metadata: dict[str, str]
    created_at: datetime
    debits_posted: int
    credits_posted: int
    pending_debits: int
    pending_credits: int
    entries_count: int
    status: str = "open"
    overdraft_limit: int | None = None
    max_balance: int | None = None

    @property
    def posted(self) -> int:
        return self.credits_posted - self.debits_posted

    @property
    def available(self) -> int:
        return self.posted - self.pending_debits

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> AccountRecord:
        return cls(
            id=row["id"],
            currency=row["currency"],
            name=row["name"],
            allow_negative_balance=row["allow_negative_balance"],
            metadata=row["metadata"],
            created_at=row["created_at"],
            debits_posted=row["debits_posted"],
            credits_posted=row["credits_posted"],
            pending_debits=row["pending_debits"],
            pending_credits=row["pending_credits"],
            entries_count=row["entries_count"],
            status=row["status"],
            overdraft_limit=row["overdraft_limit"],
            max_balance=row["max_balance"],
        )


@dataclass(frozen=True, slots=True)
class TransferRecord:
    id: str
    debit_account_id: str
    credit_account_id: str
    amount: int
    currency: str | None
    pending: bool
    status: str
    code: str | None
    description: str | None
    metadata: dict[str, str]
    created_at: datetime
    updated_at: datetime
    request_hash: bytes
    timeout_seconds: int | None = None
    expires_at: datetime | None = None
    posted_amount: int | None = None
    reversal_of: str | None = None
    reversed_amount: int = 0
    # An account_not_found refusal: which of its accounts did not exist ("debit",
    # "credit" or "both"); None for every other row, and for refusals recorded before
    # revision 0006.
    missing_account: str | None = None
    # A transfer loaded by a history import: the time it happened (= created_at).
    imported_at: datetime | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> TransferRecord:
        return cls(
            id=row["id"],
            debit_account_id=row["debit_account_id"],
            credit_account_id=row["credit_account_id"],
            amount=row["amount"],
            currency=row["currency"],
            pending=row["pending"],
            status=row["status"],
            code=row["code"],
            description=row["description"],
            metadata=row["metadata"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            request_hash=row["request_hash"],
            timeout_seconds=row["timeout_seconds"],
            expires_at=row["expires_at"],
            posted_amount=row["posted_amount"],
            reversal_of=row["reversal_of"],
            reversed_amount=row["reversed_amount"],
            missing_account=row["missing_account"],
            imported_at=row.get("imported_at"),
        )

    def as_created(self) -> TransferRecord:
        """The transfer as its first answer showed it: a replay returns the original body."""
        if self.status == "rejected":
            return self
        return replace(
            self,
            status="pending" if self.pending else "posted",
            updated_at=self.created_at,
            posted_amount=None,
            reversed_amount=0,
        )


@dataclass(frozen=True, slots=True)
class TransferOutcome:
    """The answer to a transfer request: the id's record, and whether it is a replay."""

    transfer: TransferRecord
    replayed: bool


@dataclass(frozen=True, slots=True)
class AccountOutcome:
    account: AccountRecord
    created: bool


@dataclass(frozen=True, slots=True)
class EntryRecord:
    account_id: str
    sequence: int
    transfer_id: str
    amount: int
    balance_after: int
    created_at: datetime
    hash: bytes
    key_id: str
    # From the entry's transfer, not part of the hashed entry: the transfer's other
    # account (its debit account for a credit entry, its credit account for a debit
    # entry) and its description. None when the transfer row cannot be read.
    counterparty_account_id: str | None = None
    description: str | None = None


@dataclass(frozen=True, slots=True)
class BalanceRecord:
    account_id: str
    as_of: datetime
    posted: int
    sequence: int


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a keyset-paginated list; `next_cursor` is None on the last page."""

    items: list[T]
    next_cursor: str | None


def created_record(
    request: TransferRequest, plan: TransferPlan, fingerprint: bytes, *, reversal_of: str | None = None
) -> TransferRecord:
    """The row a decided transfer stores (`Writes.new_transfer`): answered from memory,
    never re-read."""
    return _stored(
        request, status=plan.status, code=None, currency=plan.currency,
        created_at=plan.recorded_at or plan.created_at, expires_at=plan.expires_at, request_hash=fingerprint,
        reversal_of=reversal_of, imported_at=request.imported_at,
    )  # fmt: skip


def rejected_record(
    request: TransferRequest,
    code: str,
    now: datetime,
    *,
    currency: str | None,
    missing_account: str | None = None,
    reversal_of: str | None = None,
    request_hash: bytes | None = None,
) -> TransferRecord:
    """A recorded refusal, as it is stored: in `currency` (`ledger.domain.refusal_currency`),
    with the accounts found missing for account_not_found."""
    return _stored(
        request, status="rejected", code=code, currency=currency, created_at=now, expires_at=None,
        request_hash=request_hash or request.fingerprint(), reversal_of=reversal_of, missing_account=missing_account,
    )  # fmt: skip


def _stored(
    request: TransferRequest,
    *,
    status: str,
    code: str | None,
    currency: str | None,
    created_at: datetime,
    expires_at: datetime | None,
    request_hash: bytes,
    reversal_of: str | None = None,
    missing_account: str | None = None,
    imported_at: datetime | None = None,
) -> TransferRecord:
    """A new transfer row, as stored."""
    return TransferRecord(
        id=request.id,
        debit_account_id=request.debit_account_id,
        credit_account_id=request.credit_account_id,
        amount=request.amount,
        currency=currency,
        pending=request.pending,
        status=status,
        code=code,
        description=request.description,
        metadata=request.metadata or {},
        created_at=created_at,
        updated_at=created_at,
        request_hash=request_hash,
        timeout_seconds=request.timeout_seconds if request.pending else None,
        expires_at=expires_at,
        reversal_of=reversal_of,
        missing_account=missing_account,
        imported_at=imported_at,
    )
