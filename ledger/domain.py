"""Pure ledger rules: no I/O here, so they are unit-tested exhaustively.

What is decided here is decided before anything is written; PostgreSQL checks the same
invariants again (see `ledger.models`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from ledger.errors import DecisionRefused, TransferRefused
from ledger.integrity import ChainKey, entry_hash, microseconds

MAX_AMOUNT = 2**63 - 1  # PostgreSQL bigint
# Ids chosen by clients (accounts, transfers): the contract's rule, checked with fullmatch.
# Ids made only of dots are refused: `/v1/accounts/./entries` would be ambiguous.
IDENTIFIER_RE = re.compile(r"(?!\.+$)[A-Za-z0-9._:-]{1,64}")


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
    # History import (admin only): the transfer happened then; its entries carry that time.
    imported_at: datetime | None = None
    # Computed once: a batch needs it several times, and preferably before taking locks.
    _fingerprint: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def fingerprint(self) -> bytes:
        """SHA-256 of the request's canonical JSON: equal iff the requests are the same.

        Defaults are applied first, so `"pending": false` and an absent `pending` are the
        same request; metadata keys are sorted, so their order does not matter.
        """
        if self._fingerprint is None:
            object.__setattr__(self, "_fingerprint", self._canonical_hash())
        assert self._fingerprint is not None
        return self._fingerprint

    def _canonical_hash(self) -> bytes:
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
        # Only when set: the fingerprints of requests stored before imports existed stay valid.
        if self.imported_at is not None:
            canonical.append(epoch_microseconds(self.imported_at))
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
    # Account controls: `frozen` and `closed` accounts neither send nor receive; the
    # available balance may go down to -overdraft_limit (0 when null), and posted plus
    # pending credits may not pass max_balance (no bound when null).
    status: str = "open"
    overdraft_limit: int | None = None
    max_balance: int | None = None
    # Some pending transfer of this account is past its expiry but not yet released.
    has_due: bool = False

    @property
    def posted(self) -> int:
        return self.credits_posted - self.debits_posted

    @property
    def available(self) -> int:
        return self.posted - self.pending_debits

    @property
    def floor(self) -> int | None:
        """The lowest `available` allowed: None when the account may go negative freely."""
        if self.allow_negative_balance:
            return None
        return -(self.overdraft_limit or 0)

    @property
    def ceiling_room(self) -> int | None:
        """How much more may be credited (posted or pending) before max_balance; None: no bound."""
        if self.max_balance is None:
            return None
        return self.max_balance - self.posted - self.pending_credits


@dataclass(frozen=True, slots=True)
class EntryPlan:
    account_id: str
    sequence: int
    amount: int
    balance_after: int
    hash: bytes
    key_id: str


@dataclass(frozen=True, slots=True)
class TransferPlan:
    """Everything a decided transfer changes, computed in memory under the account locks:
    its status, the journal entries to append (none for a reservation) and the accounts'
    states after it."""

    currency: str
    # The time of its entries; for an import, the time it happened.
    created_at: datetime
    status: str  # "posted" | "pending"
    expires_at: datetime | None
    entries: tuple[EntryPlan, ...]
    accounts: tuple[LockedAccount, ...]
    # When the ledger records it, if not `created_at` (an import: the clock's time, so that
    # checkpoints, which count the transfers recorded up to their cut-off, stay exact).
    recorded_at: datetime | None = None


def check_accounts_different(request: TransferRequest) -> None:
    if request.debit_account_id == request.credit_account_id:
        raise TransferRefused(
            "accounts_must_be_different",
            f"debit_account_id and credit_account_id are both {request.debit_account_id!r}",
        )


def entry_time(now: datetime, *accounts: LockedAccount) -> datetime:
    """Entries of one account must be ordered in time as they are in sequence, so that a
    balance "as of" an instant is the balance after a prefix of the journal. The lock
    orders the transfers; the clock could step back, so never go below the last entry."""
    return max([now] + [a.last_entry_at for a in accounts if a.last_entry_at is not None])


def decide_transfer(
    request: TransferRequest, accounts: dict[str, LockedAccount], now: datetime, key: ChainKey
) -> TransferPlan:
    """Decide a new transfer (posted, or pending when `request.pending`), or raise the
    refusal that will be recorded.

    `accounts` holds the rows found (and locked) for the two ids; `now` is the database
    clock read after the locks were granted; `key` is the chain key new entries are
    hashed with.
    """
    check_accounts_different(request)
    debit = accounts.get(request.debit_account_id)
    credit = accounts.get(request.credit_account_id)
    missing = [i for i, a in ((request.debit_account_id, debit), (request.credit_account_id, credit)) if a is None]
    if missing:
        raise TransferRefused("account_not_found", f"no account with id {', '.join(repr(m) for m in missing)}")
    assert debit is not None and credit is not None
    check_status(debit, credit)
    currency = request.currency or debit.currency
    if debit.currency != currency or credit.currency != currency:
        raise TransferRefused(
            "currency_mismatch",
            f"transfer in {currency} between accounts in {debit.currency} ({debit.id}) and {credit.currency} ({credit.id})",
        )
    amount = request.amount
    if request.pending:
        overflows = debit.pending_debits + amount > MAX_AMOUNT or credit.pending_credits + amount > MAX_AMOUNT
    else:
        overflows = debit.debits_posted + amount > MAX_AMOUNT or credit.credits_posted + amount > MAX_AMOUNT
    if overflows:
        raise TransferRefused("balance_overflow", "an account's total would exceed 9223372036854775807")
    floor = debit.floor
    if floor is not None and debit.available - amount < floor:
        limit = f" (with an overdraft limit of {-floor})" if floor else ""
        raise TransferRefused(
            "insufficient_funds",
            f"account {debit.id!r} has {debit.available} available{limit}, the transfer needs {amount}",
        )
    room = credit.ceiling_room
    if room is not None and amount > room:
        raise TransferRefused(
            "exceeds_max_balance",
            f"account {credit.id!r} may hold at most {credit.max_balance} (posted and pending credits); "
            f"it can take {max(room, 0)} more, the transfer brings {amount}",
        )
    if request.imported_at is not None:
        check_imported_at(request.imported_at, now, debit, credit)

    if request.pending:
        expires_at = now + timedelta(seconds=request.timeout_seconds) if request.timeout_seconds else None
        return TransferPlan(
            currency=currency,
            created_at=now,
            status="pending",
            expires_at=expires_at,
            entries=(),
            accounts=(
                replace(debit, pending_debits=debit.pending_debits + amount),
                replace(credit, pending_credits=credit.pending_credits + amount),
            ),
        )
    if request.imported_at is not None:
        entries, new_debit, new_credit = post_entries(debit, credit, request.id, amount, request.imported_at, key)
        return TransferPlan(
            currency, request.imported_at, "posted", None, entries, (new_debit, new_credit), recorded_at=now
        )
    created_at = entry_time(now, debit, credit)
    entries, new_debit, new_credit = post_entries(debit, credit, request.id, amount, created_at, key)
    return TransferPlan(currency, created_at, "posted", None, entries, (new_debit, new_credit))


def check_status(debit: LockedAccount, credit: LockedAccount) -> None:
    """A closed account takes part in no transfer ever again; a frozen one in none until
    it is reopened (the debit account's state is named first)."""
    for code in ("closed", "frozen"):
        for account in (debit, credit):
            if account.status == code:
                raise TransferRefused(f"account_{code}", f"account {account.id!r} is {code}")


def check_imported_at(imported_at: datetime, now: datetime, *accounts: LockedAccount) -> None:
    """An imported transfer keeps each journal in time order (so `as_of` stays exact): it
    is not later than now, nor earlier than the last entry of either account."""
    if imported_at > now:
        raise TransferRefused("imported_at_out_of_order", "imported_at is in the future")
    for account in accounts:
        if account.last_entry_at is not None and imported_at < account.last_entry_at:
            raise TransferRefused(
                "imported_at_out_of_order",
                f"imported_at is earlier than the last entry of account {account.id!r} "
                f"({account.last_entry_at.isoformat()}): import each account's history in time order",
            )


def post_entries(
    debit: LockedAccount, credit: LockedAccount, transfer_id: str, amount: int, created_at: datetime, key: ChainKey
) -> tuple[tuple[EntryPlan, EntryPlan], LockedAccount, LockedAccount]:
    """The two journal entries of moving `amount` posted, and the accounts after them."""
    debit_entry = _entry(debit, transfer_id, -amount, created_at, key)
    credit_entry = _entry(credit, transfer_id, amount, created_at, key)
    # Built field by field rather than with dataclasses.replace, which inspects the
    # class on every call: this runs for every posted transfer.
    new_debit = LockedAccount(
        debit.id, debit.currency, debit.allow_negative_balance, debit.debits_posted + amount,
        debit.credits_posted, debit.pending_debits, debit.pending_credits, debit_entry.sequence,
        debit_entry.hash, created_at, debit.status, debit.overdraft_limit, debit.max_balance, debit.has_due,
    )  # fmt: skip
    new_credit = LockedAccount(
        credit.id, credit.currency, credit.allow_negative_balance, credit.debits_posted,
        credit.credits_posted + amount, credit.pending_debits, credit.pending_credits, credit_entry.sequence,
        credit_entry.hash, created_at, credit.status, credit.overdraft_limit, credit.max_balance, credit.has_due,
    )  # fmt: skip
    return (debit_entry, credit_entry), new_debit, new_credit


def _entry(account: LockedAccount, transfer_id: str, amount: int, created_at: datetime, key: ChainKey) -> EntryPlan:
    sequence = account.entries_count + 1
    balance_after = account.posted + amount
    return EntryPlan(
        account_id=account.id,
        sequence=sequence,
        amount=amount,
        balance_after=balance_after,
        hash=entry_hash(
            key, account.last_entry_hash, account.id, sequence, transfer_id, amount, balance_after, created_at
        ),
        key_id=key.id,
    )


# -- Two-phase transfers ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PendingTransfer:
    """The fields of a pending transfer's row that its post, void or expiry needs."""

    id: str
    debit_account_id: str
    credit_account_id: str
    amount: int
    status: str
    pending: bool
    expires_at: datetime | None
    posted_amount: int | None


def is_due(transfer: PendingTransfer, now: datetime) -> bool:
    return transfer.status == "pending" and transfer.expires_at is not None and transfer.expires_at <= now


def release(transfer: PendingTransfer, accounts: dict[str, LockedAccount]) -> tuple[LockedAccount, LockedAccount]:
    """The accounts after a reservation is released (void or expiry)."""
    debit = accounts[transfer.debit_account_id]
    credit = accounts[transfer.credit_account_id]
    return (
        replace(debit, pending_debits=debit.pending_debits - transfer.amount),
        replace(credit, pending_credits=credit.pending_credits - transfer.amount),
    )


def check_decision(transfer: PendingTransfer, decision: str, posted_amount: int | None) -> bool:
    """Validate a post or void of `transfer`. Return True when it repeats the decision
    already made (the caller answers as before), False when it is to be made now."""
    if not transfer.pending or transfer.status == "rejected":
        raise DecisionRefused("transfer_not_pending", f"transfer {transfer.id!r} is not a pending transfer")
    if transfer.status == "expired":
        raise DecisionRefused("pending_transfer_expired", f"transfer {transfer.id!r} expired")
    if transfer.status == "voided":
        if decision == "void":
            return True
        raise DecisionRefused("pending_transfer_already_voided", f"transfer {transfer.id!r} was voided")
    if transfer.status == "posted":
        if decision == "post" and (posted_amount or transfer.amount) == transfer.posted_amount:
            return True
        raise DecisionRefused("pending_transfer_already_posted", f"transfer {transfer.id!r} was posted")
    if decision == "post" and posted_amount is not None and posted_amount > transfer.amount:
        raise DecisionRefused(
            "exceeds_pending_amount", f"transfer {transfer.id!r} reserved {transfer.amount}, not {posted_amount}"
        )
    return False


def decide_post(
    transfer: PendingTransfer, amount: int, accounts: dict[str, LockedAccount], now: datetime, key: ChainKey
) -> TransferPlan:
    """Post `amount` (at most the reserved amount) of a pending transfer; the rest is released.

    Not refused when an account is frozen: the reservation was granted before the freeze
    and holds the money already (a card authorisation captured after the card was
    blocked: the merchant has delivered). A freeze stops new money movement, not the
    settlement of what was promised; an operator who wants a reservation not to post
    voids it. A closed account has no reservations (closing needs none). The limits hold
    without a check: posting frees the reservation's pending amounts and moves at most as
    much, and a limit cannot be changed to below what the account holds."""
    debit, credit = release(transfer, accounts)
    if debit.debits_posted + amount > MAX_AMOUNT or credit.credits_posted + amount > MAX_AMOUNT:
        raise DecisionRefused("balance_overflow", "an account's posted total would exceed 9223372036854775807")
    created_at = entry_time(now, debit, credit)
    entries, new_debit, new_credit = post_entries(debit, credit, transfer.id, amount, created_at, key)
    return TransferPlan(debit.currency, created_at, "posted", None, entries, (new_debit, new_credit))


def epoch_microseconds(moment: datetime) -> int:
    return microseconds(moment)


# -- Batches and linked chains -----------------------------------------------------------
#
# A batch is decided entirely in memory, in order, under the locks of every account it
# touches: each item is a nested step on the evolving account states, and a linked chain
# is a unit whose steps are undone together (by restoring a snapshot) when one fails.
# The database then receives the result in a few set-based statements, so a batch of any
# size costs the same handful of subtransactions (PostgreSQL caches 64 per backend).


@dataclass(frozen=True, slots=True)
class BatchItem:
    request: TransferRequest
    linked: bool = False


@dataclass(frozen=True, slots=True)
class ItemDecision:
    """One item's outcome. `status` is "created", "replayed" or "rejected"; `plan` is set
    for created items; `recorded` says whether a rejection is stored under the id (a
    conflict is not: the id already has its outcome)."""

    index: int
    id: str
    status: str
    code: str | None = None
    plan: TransferPlan | None = None
    recorded: bool = False
    # For a recorded refusal, what it is stored with: its currency (`refusal_currency`)
    # and, for account_not_found, which of its accounts did not exist (`missing_account`).
    currency: str | None = None
    missing_account: str | None = None


def chains(items: list[BatchItem]) -> list[tuple[int, int, bool]]:
    """Split a batch into units (start, end exclusive, open): a unit is one unlinked item,
    or a run of linked items closed by the next unlinked one. A run still linked at the
    end of the batch is open."""
    units: list[tuple[int, int, bool]] = []
    start = 0
    for index, item in enumerate(items):
        if not item.linked:
            units.append((start, index + 1, False))
            start = index + 1
    if start < len(items):
        units.append((start, len(items), True))
    return units


def apply_plan(accounts: dict[str, LockedAccount], plan: TransferPlan) -> None:
    """Advance the in-memory account states past a decided transfer."""
    for account in plan.accounts:
        accounts[account.id] = account


def decide_batch(
    items: list[BatchItem],
    existing: dict[str, tuple[bytes, bool]],
    accounts: dict[str, LockedAccount],
    now: datetime,
    key: ChainKey,
) -> list[ItemDecision]:
    """Decide every item of a batch in order.

    `existing` maps ids that already have an outcome to (request fingerprint, whether that
    outcome was a success); `accounts` (updated in place) holds the locked accounts.

    Rules, per unit (an unlinked item, or a chain):
    - an id that already has an outcome, with the same fields, is "replayed"; with other
      fields it is "rejected" with transfer_exists_with_different_fields (not recorded:
      the id keeps its outcome);
    - a new item is decided against the account states left by the items before it; a
      later item with the same id in the batch is a replay of it;
    - a chain succeeds only if every item does (a replayed refusal counts as a failure);
      otherwise its new items are undone and recorded as rejected: the failing item with
      its own code, the others with linked_transfer_failed;
    - a chain still open at the end of the batch records its new items as rejected with
      linked_chain_open, without deciding them.
    Replayed items are never undone: they were applied, or refused, by an earlier request.
    """
    decisions: list[ItemDecision] = []
    known = dict(existing)
    for start, end, is_open in chains(items):
        is_chain = end - start > 1 or is_open
        snapshot = dict(accounts)
        unit: list[ItemDecision] = []
        failed = False
        for index in range(start, end):
            request = items[index].request
            prior = known.get(request.id)
            if prior is not None:
                fingerprint, succeeded = prior
                if fingerprint != request.fingerprint():
                    unit.append(ItemDecision(index, request.id, "rejected", "transfer_exists_with_different_fields"))
                    failed = True
                else:
                    unit.append(ItemDecision(index, request.id, "replayed"))
                    failed = failed or not succeeded
            elif is_open:
                unit.append(ItemDecision(index, request.id, "rejected", "linked_chain_open", recorded=True))
            elif failed and is_chain:
                unit.append(ItemDecision(index, request.id, "rejected", "linked_transfer_failed", recorded=True))
            else:
                try:
                    plan = decide_transfer(request, accounts, now, key)
                except TransferRefused as refusal:
                    unit.append(ItemDecision(index, request.id, "rejected", refusal.reason, recorded=True))
                    failed = True
                else:
                    apply_plan(accounts, plan)
                    unit.append(ItemDecision(index, request.id, "created", plan=plan))
            if unit[-1].status == "created" or unit[-1].recorded:
                # A later copy of this id in the batch is a replay of this item.
                known[request.id] = (request.fingerprint(), unit[-1].status == "created")
        if is_chain and failed:
            # Undo the chain's applied steps: restore the states from before the chain.
            accounts.clear()
            accounts.update(snapshot)
            unit = [
                replace(d, status="rejected", code="linked_transfer_failed", plan=None, recorded=True)
                if d.status == "created"
                else d
                for d in unit
            ]
        for decision in unit:
            if decision.status == "created" or decision.recorded:
                request = items[decision.index].request
                known[request.id] = (request.fingerprint(), decision.status == "created")
        decisions.extend(recorded_refusal(d, items[d.index].request, accounts) if d.recorded else d for d in unit)
    return decisions


def recorded_refusal(
    decision: ItemDecision, request: TransferRequest, accounts: dict[str, LockedAccount]
) -> ItemDecision:
    """A recorded refusal with what the decision knew of its accounts (which exist, in
    what currency): stored with it, so that every replay says the same."""
    debit = accounts.get(request.debit_account_id)
    credit = accounts.get(request.credit_account_id)
    return replace(
        decision,
        currency=refusal_currency(request, debit.currency if debit else None, credit.currency if credit else None),
        missing_account=missing_account(request, accounts) if decision.code == "account_not_found" else None,
    )


def refusal_currency(request: TransferRequest, debit_currency: str | None, credit_currency: str | None) -> str | None:
    """The currency a refusal is recorded in: the one the request named; without one,
    the one the transfer would have had, its debit account's, when that account exists
    and the credit account, if it exists, agrees. None when that is unknown (no debit
    account) or ambiguous (the accounts are in different currencies)."""
    if request.currency is not None:
        return request.currency
    if debit_currency is None or credit_currency not in (None, debit_currency):
        return None
    return debit_currency


def missing_account(request: TransferRequest, accounts: dict[str, LockedAccount]) -> str | None:
    """Which of the request's accounts do not exist: "debit", "credit", "both", or None."""
    debit = request.debit_account_id not in accounts
    credit = request.credit_account_id not in accounts
    if debit and credit:
        return "both"
    return "debit" if debit else "credit" if credit else None
