"""Pure ledger rules: no I/O here, so they are unit-tested exhaustively.

What is decided here is decided before anything is written; PostgreSQL checks the same
invariants again (see `ledger.models`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime

from ledger.errors import TransferRefused

MAX_AMOUNT = 2**63 - 1  # PostgreSQL bigint
HASH_VERSION = "ledger-entry-v1"


@dataclass(frozen=True, slots=True)
class TransferRequest:
    id: str
    debit_account_id: str
    credit_account_id: str
    amount: int
    currency: str | None = None
    pending: bool = False
    timeout_seconds: int | None = None
    description: str | None = None
    metadata: dict[str, str] | None = None

    def fingerprint(self) -> bytes:
        """SHA-256 of the request's canonical JSON: equal iff the requests are the same.

        Defaults are applied first, so `"pending": false` and an absent `pending` are the
        same request; metadata keys are sorted, so their order does not matter.
        """
        canonical = [
            self.id,
            self.debit_account_id,
            self.credit_account_id,
            self.amount,
            self.currency,
            self.pending,
            self.timeout_seconds,
            self.description,
            sorted((self.metadata or {}).items()),
        ]
        return hashlib.sha256(json.dumps(canonical, separators=(",", ":"), ensure_ascii=False).encode()).digest()


@dataclass(frozen=True, slots=True)
class LockedAccount:
    """The fields of an account row the transfer decision needs, read under FOR UPDATE."""

    id: str
    currency: str
    allow_negative_balance: bool
    debits_posted: int
    credits_posted: int
    pending_debits: int
    pending_credits: int
    entries_count: int
    last_entry_hash: bytes | None
    last_entry_at: datetime | None

    @property
    def posted(self) -> int:
        return self.credits_posted - self.debits_posted

    @property
    def available(self) -> int:
        return self.posted - self.pending_debits


@dataclass(frozen=True, slots=True)
class EntryPlan:
    account_id: str
    sequence: int
    amount: int
    balance_after: int
    hash: bytes


@dataclass(frozen=True, slots=True)
class AccountUpdate:
    id: str
    debits_posted: int
    credits_posted: int
    entries_count: int
    last_entry_hash: bytes
    last_entry_at: datetime


@dataclass(frozen=True, slots=True)
class TransferPlan:
    """Everything a posted transfer writes, decided in memory under the account locks."""

    currency: str
    created_at: datetime
    entries: tuple[EntryPlan, EntryPlan]
    updates: tuple[AccountUpdate, AccountUpdate]


def check_accounts_different(request: TransferRequest) -> None:
    if request.debit_account_id == request.credit_account_id:
        raise TransferRefused(
            "accounts_must_be_different",
            f"debit_account_id and credit_account_id are both {request.debit_account_id!r}",
        )


def decide_transfer(request: TransferRequest, accounts: dict[str, LockedAccount], now: datetime) -> TransferPlan:
    """Decide a single posted transfer, or raise the refusal that will be recorded.

    `accounts` holds the rows found (and locked) for the two ids; `now` is the database
    clock read after the locks were granted.
    """
    check_accounts_different(request)
    debit = accounts.get(request.debit_account_id)
    credit = accounts.get(request.credit_account_id)
    missing = [i for i, a in ((request.debit_account_id, debit), (request.credit_account_id, credit)) if a is None]
    if missing:
        raise TransferRefused("account_not_found", f"no account with id {', '.join(repr(m) for m in missing)}")
    assert debit is not None and credit is not None
    currency = request.currency or debit.currency
    if debit.currency != currency or credit.currency != currency:
        raise TransferRefused(
            "currency_mismatch",
            f"transfer in {currency} between accounts in {debit.currency} ({debit.id}) and {credit.currency} ({credit.id})",
        )
    amount = request.amount
    if debit.debits_posted + amount > MAX_AMOUNT or credit.credits_posted + amount > MAX_AMOUNT:
        raise TransferRefused("balance_overflow", "an account's posted total would exceed 9223372036854775807")
    if not debit.allow_negative_balance and debit.available - amount < 0:
        raise TransferRefused(
            "insufficient_funds",
            f"account {debit.id!r} has {debit.available} available, the transfer needs {amount}",
        )

    # Entries of one account must be ordered in time as they are in sequence, so that a
    # balance "as of" an instant is the balance after a prefix of the journal. The lock
    # orders the transfers; the clock could step back, so never go below the last entry.
    created_at = max([now] + [a.last_entry_at for a in (debit, credit) if a.last_entry_at is not None])

    debit_entry = _entry(debit, request.id, -amount, created_at)
    credit_entry = _entry(credit, request.id, amount, created_at)
    return TransferPlan(
        currency=currency,
        created_at=created_at,
        entries=(debit_entry, credit_entry),
        updates=(
            AccountUpdate(
                debit.id,
                debit.debits_posted + amount,
                debit.credits_posted,
                debit_entry.sequence,
                debit_entry.hash,
                created_at,
            ),
            AccountUpdate(
                credit.id,
                credit.debits_posted,
                credit.credits_posted + amount,
                credit_entry.sequence,
                credit_entry.hash,
                created_at,
            ),
        ),
    )


def _entry(account: LockedAccount, transfer_id: str, amount: int, created_at: datetime) -> EntryPlan:
    sequence = account.entries_count + 1
    balance_after = account.posted + amount
    return EntryPlan(
        account_id=account.id,
        sequence=sequence,
        amount=amount,
        balance_after=balance_after,
        hash=entry_hash(account.last_entry_hash, account.id, sequence, transfer_id, amount, balance_after, created_at),
    )


def epoch_microseconds(moment: datetime) -> int:
    if moment.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def entry_hash(
    previous_hash: bytes | None,
    account_id: str,
    sequence: int,
    transfer_id: str,
    amount: int,
    balance_after: int,
    created_at: datetime,
) -> bytes:
    """SHA-256 of an entry's canonical form, chained to the account's previous entry.

    Canonical form (UTF-8), fields joined by "|":
    `ledger-entry-v1|account_id|sequence|transfer_id|amount|balance_after|created_at_us|previous_hash_hex`
    where integers are in decimal, `created_at_us` is microseconds since the Unix epoch
    and `previous_hash_hex` is the lower-case hex of the previous entry's hash, or empty
    for sequence 1. Identifiers cannot contain "|", so the form is unambiguous.
    """
    canonical = "|".join(
        (
            HASH_VERSION,
            account_id,
            str(sequence),
            transfer_id,
            str(amount),
            str(balance_after),
            str(epoch_microseconds(created_at)),
            previous_hash.hex() if previous_hash else "",
        )
    )
    return hashlib.sha256(canonical.encode()).digest()
