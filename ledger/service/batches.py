"""Applying a batch of transfers in one database transaction, within the savepoint budget.

1. Read the outcomes already stored for the batch's ids (replays and conflicts).
2. Lock every account the new items touch, with one `SELECT ... FOR UPDATE` ordered by
   id: batches and single transfers all lock in that one global order, so none of them
   can deadlock with another.
3. Decide every item in memory, in order (`ledger.domain.decide_batch`): each item is a
   nested step on the account states, and a failed linked chain is undone by restoring
   the states from before it.
4. Write the outcome set-based, in one savepoint and one statement (`writer`): all
   transfer rows, journal entries and account states. If another request claimed
   one of the ids meanwhile (the INSERT skips it), roll back to the savepoint, read that
   outcome, and decide again: the locks are still held, so nothing else has changed.

However long the batch or its chains, a transaction opens at most `MAX_ATTEMPTS`
savepoints, far below the 64 subtransactions PostgreSQL caches per backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select

from ledger.domain import BatchItem, ItemDecision, LockedAccount, decide_batch
from ledger.integrity import ChainKey
from ledger.models import Transfer
from ledger.service.expiry import release_due
from ledger.service.locking import AccountLocker, lock_accounts
from ledger.service.queries import TRANSFER_COLUMNS
from ledger.service.records import TransferRecord, created_record, rejected_record
from ledger.service.unit_of_work import Executor, RetryableConflict, UnitOfWork
from ledger.service.writer import IdsClaimed, Writes, write

MAX_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class BatchResult:
    index: int
    id: str
    status: str  # created | replayed | rejected
    code: str | None
    transfer: TransferRecord | None


class BatchService:
    def __init__(self, unit_of_work: UnitOfWork, key: ChainKey, locker: AccountLocker = lock_accounts) -> None:
        self._unit_of_work = unit_of_work
        self._key = key
        self._lock = locker

    async def create(self, items: list[BatchItem]) -> list[BatchResult]:
        for item in items:
            item.request.fingerprint()  # hashed now, not while the accounts are locked

        async def work(session: Executor) -> list[BatchResult]:
            results = await self.apply(session, items)
            await session.commit()
            return results

        return await self._unit_of_work.run(work)

    async def apply(self, session: Executor, items: list[BatchItem]) -> list[BatchResult]:
        """The batch's work inside the caller's transaction (which commits it)."""
        ids = sorted({item.request.id for item in items})
        stored = await _fetch(session, ids)
        new_items = [item for item in items if item.request.id not in stored]
        account_ids = {i.request.debit_account_id for i in new_items} | {i.request.credit_account_id for i in new_items}
        if account_ids:
            accounts, now = await self._lock(session, account_ids)
        else:
            accounts, now = {}, (await session.execute(select(func.clock_timestamp()))).scalar_one()
        expiries = Writes()
        await release_due(session, accounts, now, expiries)

        for _ in range(MAX_ATTEMPTS):
            existing = {key: (record.request_hash, record.status != "rejected") for key, record in stored.items()}
            working = dict(accounts)
            decisions = decide_batch(items, existing, working, now, self._key)
            written = _written(items, decisions, now)
            writes = _writes(written, decisions, items, accounts, working, expiries)
            try:
                async with session.begin_nested():
                    await write(session, writes, self._key)
            except IdsClaimed as claimed:
                stored.update(await _fetch(session, sorted(claimed.ids)))
                continue
            # The rows are exactly what was just written: answer from memory, without a
            # read while the locks are held.
            return _results(items, decisions, stored, written)
        # Ids keep being claimed under us: start the whole transaction again.
        raise RetryableConflict("batch ids kept being claimed by concurrent requests")


async def _fetch(session: Executor, ids: list[str]) -> dict[str, TransferRecord]:
    if not ids:
        return {}
    rows = (await session.execute(select(*TRANSFER_COLUMNS).where(Transfer.id.in_(ids)))).mappings().all()
    return {row["id"]: TransferRecord.from_row(row) for row in rows}


def _writes(
    written: dict[str, TransferRecord],
    decisions: list[ItemDecision],
    items: list[BatchItem],
    before: dict[str, LockedAccount],
    after: dict[str, LockedAccount],
    expiries: Writes,
) -> Writes:
    writes = Writes(changes=dict(expiries.changes))
    for decision in decisions:
        if decision.status != "created" and not decision.recorded:
            continue
        request = items[decision.index].request
        writes.new_transfer(written[request.id])
        if decision.plan is not None:
            writes.plan(request.id, decision.plan)
    # Final states only, of every account whose state changed (by expiry or by items).
    writes.accounts = {
        key: account for key, account in after.items() if account != before.get(key) or key in expiries.accounts
    }
    return writes


def _written(items: list[BatchItem], decisions: list[ItemDecision], now: datetime) -> dict[str, TransferRecord]:
    written: dict[str, TransferRecord] = {}
    for decision in decisions:
        request = items[decision.index].request
        if decision.status == "created" and decision.plan is not None:
            written[request.id] = created_record(request, decision.plan, request.fingerprint())
        elif decision.recorded and decision.code is not None:
            written[request.id] = rejected_record(request, decision.code, now)
    return written


def _results(
    items: list[BatchItem],
    decisions: list[ItemDecision],
    stored: dict[str, TransferRecord],
    written: dict[str, TransferRecord],
) -> list[BatchResult]:
    results: list[BatchResult] = []
    for decision in decisions:
        request = items[decision.index].request
        transfer: TransferRecord | None = None
        code = decision.code
        if decision.status == "created" or decision.recorded:
            transfer = written[request.id]
        elif decision.status == "replayed":
            transfer = (stored.get(request.id) or written[request.id]).as_created()
            code = transfer.code
        results.append(BatchResult(decision.index, request.id, decision.status, code, transfer))
    return results
