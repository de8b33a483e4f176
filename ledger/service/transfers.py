"""Applying a transfer, and deciding on it later (post, void, reverse): where money moves.

Creating a transfer is one database transaction:

1. Lock both accounts with one ordered `SELECT ... FOR UPDATE` (see `locking`), and
   release their reservations that are past expiry (lazy expiry, see `expiry`).
2. In a savepoint, decide in memory (`ledger.domain.decide_transfer`) and write the
   transfer, its journal entries and the account states in one statement (`writer`).
   A refusal, or a constraint the database enforces (the same invariants again), rolls
   back to the savepoint and the refusal is recorded instead, in the same transaction:
   the id's outcome is permanent either way. If the id already has an outcome (a
   replay, or another request with the same id that got there first), the write stores
   nothing, the savepoint rolls back, and the stored outcome is returned: a replay when
   the request is the same, 409 when its fields differ.
3. Commit.

The common case runs on the asyncpg connection itself, in four round trips: BEGIN, the
same ordered lock statement, one write statement, COMMIT (`_create_fast`). It handles
only a new transfer that is decided as applied, on accounts with no reservation to
release. Anything else (a refusal, an existing id, a due reservation, a constraint the
database enforces) rolls the whole transaction back and takes the general path above,
which decides again under fresh locks and records the outcome in its savepoint: the two
paths share the lock statement and the decision, so they cannot disagree.

Post, void and reverse lock the accounts first too, then the transfer's row, so they
serialise with each other and with expiry: one decision wins, the others see it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from datetime import datetime

import asyncpg
from sqlalchemy import bindparam, select
from sqlalchemy import exc as sa_exc

from ledger.domain import (
    PendingTransfer,
    TransferRequest,
    check_decision,
    decide_post,
    decide_transfer,
    release,
)
from ledger.errors import DecisionRefused, TransferExistsWithDifferentFields, TransferNotFound, TransferRefused
from ledger.integrity import ChainKey
from ledger.models import Transfer
from ledger.service.expiry import STORED_TRANSFER_COLUMNS, pending_transfer, release_due
from ledger.service.locking import LOCK_SQL, AccountLocker, lock_accounts, locked_account
from ledger.service.queries import TRANSFER_COLUMNS
from ledger.service.records import TransferOutcome, TransferRecord, created_record, rejected_record
from ledger.service.unit_of_work import Executor, UnitOfWork, constraint_name
from ledger.service.writer import WRITE_ONE_SQL, IdsClaimed, Writes, write, write_one_arguments

# A violated CHECK on these means the database caught what the Python decision should
# have: the refusal is recorded all the same, and the disagreement is a bug to look at.
CONSTRAINT_REFUSALS = {
    "ck_accounts_balance_not_negative": "insufficient_funds",
    "ck_transfers_accounts_different": "accounts_must_be_different",
}

# The row as stored (not its effective status): its change is sealed from these values.
LOCK_TRANSFER = select(*STORED_TRANSFER_COLUMNS).where(Transfer.id == bindparam("id")).with_for_update()


class TransferService:
    def __init__(self, unit_of_work: UnitOfWork, key: ChainKey, locker: AccountLocker = lock_accounts) -> None:
        self._unit_of_work = unit_of_work
        self._key = key
        self._lock = locker
        # The driver path uses the standard lock statement; a substituted locker (tests
        # prove that a broken one is caught) must see every transfer.
        self._fast = locker is lock_accounts

    # -- create ---------------------------------------------------------------------

    async def create(self, request: TransferRequest) -> TransferOutcome:
        if self._fast:
            outcome = await self._unit_of_work.run_on_driver(lambda driver: _create_fast(driver, request, self._key))
            if outcome is not None:
                return outcome

        async def work(session: Executor) -> TransferOutcome:
            outcome = await self._create(session, request)
            await session.commit()
            return outcome

        return await self._unit_of_work.run(work)

    async def _create(self, session: Executor, request: TransferRequest) -> TransferOutcome:
        # No read of the id first: the write below stores the id only if it is new, and
        # otherwise rolls back to its savepoint and answers with the stored outcome. New
        # transfers (the common case) save a round trip; replays cost a lock instead.
        fingerprint = request.fingerprint()
        accounts, now = await self._lock(session, (request.debit_account_id, request.credit_account_id))
        writes = Writes()
        await release_due(session, accounts, now, writes)
        try:
            async with session.begin_nested():
                plan = decide_transfer(request, accounts, now, self._key)
                record = created_record(request, plan, fingerprint)
                writes.new_transfer(record)
                writes.plan(request.id, plan)
                await write(session, writes, self._key)
        except TransferRefused as refusal:
            return await record_rejection(session, request, refusal.reason, now, self._key)
        except IdsClaimed:
            return await replay_winner(session, request.id, fingerprint)
        except sa_exc.IntegrityError as error:
            reason = CONSTRAINT_REFUSALS.get(constraint_name(error) or "")
            if reason is None:
                raise
            return await record_rejection(session, request, reason, now, self._key)
        return TransferOutcome(record, replayed=False)

    # -- post and void --------------------------------------------------------------

    async def post(self, transfer_id: str, amount: int | None) -> TransferRecord:
        return await self._decide(transfer_id, "post", amount)

    async def void(self, transfer_id: str) -> TransferRecord:
        return await self._decide(transfer_id, "void", None)

    async def _decide(self, transfer_id: str, decision: str, amount: int | None) -> TransferRecord:
        async def work(session: Executor) -> TransferRecord:
            current = await fetch_transfer(session, transfer_id)
            if current is None:
                raise TransferNotFound(f"no transfer with id {transfer_id!r}")
            accounts, now = await self._lock(session, (current.debit_account_id, current.credit_account_id))
            writes = Writes()
            released = await release_due(session, accounts, now, writes)
            stored = TransferRecord.from_row(
                (await session.execute(LOCK_TRANSFER, {"id": transfer_id})).mappings().one()
            )
            pending = pending_transfer(stored)
            if transfer_id in released:
                pending = _with_status(pending, "expired")
            try:
                repeat = check_decision(pending, decision, amount)
            except DecisionRefused:
                # An expiry found on the way is kept: commit it, then refuse.
                await write(session, writes, self._key)
                await session.commit()
                raise
            if not repeat:
                if decision == "post":
                    posted = amount or pending.amount
                    plan = decide_post(pending, posted, accounts, now, self._key)
                    writes.plan(transfer_id, plan)
                    writes.change_transfer(
                        replace(stored, status="posted", posted_amount=posted, updated_at=plan.created_at)
                    )
                else:
                    for account in release(pending, accounts):
                        writes.account(account)
                    writes.change_transfer(replace(stored, status="voided", updated_at=now))
                await write(session, writes, self._key)
            record = await fetch_transfer(session, transfer_id)
            await session.commit()
            return record or _missing(transfer_id)

        return await self._unit_of_work.run(work)

    # -- reverse --------------------------------------------------------------------

    async def reverse(self, original_id: str, reversal_id: str, amount: int | None) -> TransferOutcome:
        """A new posted transfer in the opposite direction, idempotent by its own id."""
        fingerprint = hashlib.sha256(
            json.dumps(["reverse", original_id, reversal_id, amount], separators=(",", ":")).encode()
        ).digest()

        async def work(session: Executor) -> TransferOutcome:
            existing = await fetch_transfer(session, reversal_id)
            if existing is not None:
                return replay(existing, fingerprint)
            original = await fetch_transfer(session, original_id)
            if original is None:
                raise TransferNotFound(f"no transfer with id {original_id!r}")
            accounts, now = await self._lock(session, (original.debit_account_id, original.credit_account_id))
            writes = Writes()
            await release_due(session, accounts, now, writes)
            stored = TransferRecord.from_row(
                (await session.execute(LOCK_TRANSFER, {"id": original_id})).mappings().one()
            )
            posted = stored.posted_amount if stored.pending else stored.amount
            reversible = (posted or 0) - stored.reversed_amount if stored.status == "posted" else 0
            resolved = amount if amount is not None else reversible
            request = TransferRequest(
                id=reversal_id,
                debit_account_id=original.credit_account_id,
                credit_account_id=original.debit_account_id,
                amount=resolved if resolved > 0 else original.amount,
                currency=stored.currency,
                description=f"reversal of {original_id}",
            )
            try:
                async with session.begin_nested():
                    if stored.status != "posted":
                        raise TransferRefused("transfer_not_posted", f"transfer {original_id!r} is {stored.status}")
                    if resolved <= 0 or resolved > reversible:
                        raise TransferRefused(
                            "exceeds_reversible_amount",
                            f"{reversible} of transfer {original_id!r} can still be reversed",
                        )
                    plan = decide_transfer(request, accounts, now, self._key)
                    writes.new_transfer(created_record(request, plan, fingerprint, reversal_of=original_id))
                    writes.plan(reversal_id, plan)
                    writes.change_transfer(
                        replace(stored, reversed_amount=stored.reversed_amount + resolved, updated_at=plan.created_at)
                    )
                    await write(session, writes, self._key)
            except TransferRefused as refusal:
                outcome = await record_rejection(
                    session, request, refusal.reason, now, self._key, reversal_of=original_id, request_hash=fingerprint
                )
            except IdsClaimed:
                outcome = await replay_winner(session, reversal_id, fingerprint)
            else:
                outcome = TransferOutcome(await fetch_transfer(session, reversal_id) or _missing(reversal_id), False)
            await session.commit()
            return outcome

        return await self._unit_of_work.run(work)


async def _create_fast(driver: asyncpg.Connection, request: TransferRequest, key: ChainKey) -> TransferOutcome | None:
    """The common case in four round trips, or None (nothing written) for the general path."""
    await driver.execute("BEGIN")
    outcome = await _apply_fast(driver, request, key)
    await driver.execute("COMMIT" if outcome is not None else "ROLLBACK")
    return outcome


async def _apply_fast(driver: asyncpg.Connection, request: TransferRequest, key: ChainKey) -> TransferOutcome | None:
    rows = await driver.fetch(LOCK_SQL, sorted({request.debit_account_id, request.credit_account_id}))
    if len(rows) != 2 or any(row["has_due"] for row in rows):
        return None  # a missing account, one account on both sides, or a reservation to release
    accounts = {row["id"]: locked_account(row) for row in rows}
    try:
        plan = decide_transfer(request, accounts, rows[0]["now"], key)
    except TransferRefused:
        return None  # the general path records the refusal
    record = created_record(request, plan, request.fingerprint())
    try:
        written = await driver.fetchval(WRITE_ONE_SQL, *write_one_arguments(record, plan, key))
    except asyncpg.IntegrityConstraintViolationError:
        return None  # the database refused what the decision allowed: the general path records it
    if not written:
        return None  # the id has an outcome already (a replay, or a concurrent request got there first)
    return TransferOutcome(record, replayed=False)


def _with_status(transfer: PendingTransfer, status: str) -> PendingTransfer:
    return replace(transfer, status=status)


def _missing(transfer_id: str) -> TransferRecord:
    raise AssertionError(f"transfer {transfer_id!r} was just written but cannot be read back")


def replay(existing: TransferRecord, fingerprint: bytes) -> TransferOutcome:
    if existing.request_hash != fingerprint:
        raise TransferExistsWithDifferentFields(
            f"transfer {existing.id!r} was already requested with different fields; use a new id for a new transfer"
        )
    return TransferOutcome(existing.as_created(), replayed=True)


async def replay_winner(session: Executor, transfer_id: str, fingerprint: bytes) -> TransferOutcome:
    """Another request stored this id first (its commit is visible now): answer with it."""
    winner = await fetch_transfer(session, transfer_id)
    assert winner is not None, "a claimed id means a committed row"
    return replay(winner, fingerprint)


async def fetch_transfer(session: Executor, transfer_id: str) -> TransferRecord | None:
    row = (await session.execute(select(*TRANSFER_COLUMNS).where(Transfer.id == transfer_id))).mappings().first()
    return TransferRecord.from_row(row) if row is not None else None


async def record_rejection(
    session: Executor,
    request: TransferRequest,
    reason: str,
    now: datetime,
    key: ChainKey,
    *,
    reversal_of: str | None = None,
    request_hash: bytes | None = None,
) -> TransferOutcome:
    fingerprint = request_hash or request.fingerprint()
    record = rejected_record(request, reason, now, reversal_of=reversal_of, request_hash=fingerprint)
    writes = Writes()
    writes.new_transfer(record)
    try:
        async with session.begin_nested():
            await write(session, writes, key)
    except IdsClaimed:
        # A concurrent request recorded an outcome for this id first: that one stands.
        return await replay_winner(session, request.id, fingerprint)
    # As stored: answered from memory, as batches do, without a read under the locks.
    return TransferOutcome(record, replayed=False)
