"""Where money moves: new transfers through group commit, and decisions on existing ones
(post, void, reverse).

Creating transfers (single ones and batches) is `ledger.service.groups`: one write path,
which gathers the requests that arrive while a transaction is in flight into the next
one. A lone transfer is a group of one: four round trips (BEGIN, the ordered lock, one
write statement, COMMIT).

Post, void and reverse lock the accounts first too (the same ordered statement), then the
transfer's row, so they serialise with each other, with groups and with expiry: one
decision wins, the others see it. Each is one transaction; a refusal of a reversal is
recorded in a savepoint, so the id's outcome is permanent either way.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from datetime import datetime

from sqlalchemy import bindparam, select

from ledger.domain import (
    BatchItem,
    ItemDecision,
    PendingTransfer,
    TransferRequest,
    check_decision,
    decide_post,
    decide_transfer,
    recorded_refusal,
    release,
)
from ledger.errors import DecisionRefused, TransferExistsWithDifferentFields, TransferNotFound, TransferRefused
from ledger.integrity import ChainKey
from ledger.models import Transfer
from ledger.service.expiry import STORED_TRANSFER_COLUMNS, pending_transfer, release_due
from ledger.service.groups import BatchMember, BatchResult, GroupCommitter, TransferMember
from ledger.service.locking import AccountLocker, lock_accounts
from ledger.service.queries import TRANSFER_COLUMNS
from ledger.service.records import TransferOutcome, TransferRecord, created_record, rejected_record
from ledger.service.unit_of_work import Executor, UnitOfWork
from ledger.service.writer import IdsClaimed, Writes, write

# The row as stored (not its effective status): its change is sealed from these values.
LOCK_TRANSFER = select(*STORED_TRANSFER_COLUMNS).where(Transfer.id == bindparam("id")).with_for_update()


class TransferService:
    def __init__(
        self, unit_of_work: UnitOfWork, key: ChainKey, groups: GroupCommitter, locker: AccountLocker = lock_accounts
    ) -> None:
        self._unit_of_work = unit_of_work
        self._key = key
        self._groups = groups
        self._lock = locker

    # -- create ---------------------------------------------------------------------

    async def create(self, request: TransferRequest) -> TransferOutcome:
        """Apply a transfer once per id (in the next group); a 409 is raised."""
        request.fingerprint()  # hashed now, not while a group holds the locks
        return await self._groups.submit(TransferMember(request))

    async def create_batch(self, items: list[BatchItem]) -> list[BatchResult]:
        """Apply a batch's items in order (in the next group, whole)."""
        for item in items:
            item.request.fingerprint()
        return await self._groups.submit(BatchMember(items))

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
                        replace(stored, status="posted", posted_amount=posted, updated_at=plan.created_at),
                        "transfer.posted",
                    )
                else:
                    for account in release(pending, accounts):
                        writes.account(account)
                    writes.change_transfer(replace(stored, status="voided", updated_at=now), "transfer.voided")
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
                        replace(stored, reversed_amount=stored.reversed_amount + resolved, updated_at=plan.created_at),
                        None,
                    )
                    await write(session, writes, self._key)
            except TransferRefused as refusal:
                decided = recorded_refusal(
                    ItemDecision(0, reversal_id, "rejected", refusal.reason, recorded=True), request, accounts
                )
                outcome = await record_rejection(
                    session, request, decided, now, self._key, reversal_of=original_id, request_hash=fingerprint
                )
            except IdsClaimed:
                outcome = await replay_winner(session, reversal_id, fingerprint)
            else:
                outcome = TransferOutcome(await fetch_transfer(session, reversal_id) or _missing(reversal_id), False)
            await session.commit()
            return outcome

        return await self._unit_of_work.run(work)


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
    decision: ItemDecision,
    now: datetime,
    key: ChainKey,
    *,
    reversal_of: str | None = None,
    request_hash: bytes | None = None,
) -> TransferOutcome:
    """Record `decision`, a refusal with what it knew of the accounts (`recorded_refusal`)."""
    assert decision.code is not None
    fingerprint = request_hash or request.fingerprint()
    record = rejected_record(
        request, decision.code, now, currency=decision.currency, missing_account=decision.missing_account,
        reversal_of=reversal_of, request_hash=fingerprint,
    )  # fmt: skip
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
