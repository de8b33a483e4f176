"""Applying a batch of transfers in one database transaction, within the savepoint budget.

1. Read the outcomes already stored for the batch's ids (replays and conflicts).
2. Lock every account the new items touch, with one `SELECT ... FOR UPDATE` ordered by
   id: batches and single transfers all lock in that one global order, so none of them
   can deadlock with another.
3. Decide every item in memory, in order (`ledger.domain.decide_batch`): each item is a
   nested step on the account states, and a failed linked chain is undone by restoring
   the states from before it.
4. Write the outcome set-based, in one savepoint: all transfer rows in one INSERT, all
   journal entries and account totals in one more statement. If another request claimed
   one of the ids meanwhile (the INSERT skips it), roll back to the savepoint, read that
   outcome, and decide again: the locks are still held, so nothing else has changed.

However long the batch or its chains, a transaction opens at most `MAX_ATTEMPTS`
savepoints, far below the 64 subtransactions PostgreSQL caches per backend.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from ledger.domain import BatchItem, ItemDecision, LockedAccount, decide_batch
from ledger.models import Transfer
from ledger.service.locking import AccountLocker, lock_accounts
from ledger.service.queries import TRANSFER_COLUMNS
from ledger.service.records import TransferRecord
from ledger.service.unit_of_work import RetryableConflict, UnitOfWork

MAX_ATTEMPTS = 3

INSERT_TRANSFERS = text(
    """
    INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, currency, pending, status, code,
                           description, metadata, request_hash, created_at, updated_at)
    SELECT t.id, t.debit_account_id, t.credit_account_id, t.amount, t.currency, false, t.status, t.code,
           t.description, t.metadata, t.request_hash, t.created_at, t.created_at
    FROM unnest(CAST(:ids AS text[]), CAST(:debit_account_ids AS text[]), CAST(:credit_account_ids AS text[]),
                CAST(:amounts AS bigint[]), CAST(:currencies AS text[]), CAST(:statuses AS text[]),
                CAST(:codes AS text[]), CAST(:descriptions AS text[]), CAST(:metadata AS jsonb[]),
                CAST(:request_hashes AS bytea[]), CAST(:created_ats AS timestamptz[]))
         AS t(id, debit_account_id, credit_account_id, amount, currency, status, code, description, metadata,
              request_hash, created_at)
    ON CONFLICT (id) DO NOTHING
    RETURNING id
    """
)

WRITE_ENTRIES_AND_ACCOUNTS = text(
    """
    WITH new_entries AS (
        INSERT INTO entries (account_id, sequence, transfer_id, amount, balance_after, created_at, hash)
        SELECT * FROM unnest(CAST(:entry_account_ids AS text[]), CAST(:entry_sequences AS bigint[]),
                             CAST(:entry_transfer_ids AS text[]), CAST(:entry_amounts AS bigint[]),
                             CAST(:entry_balances AS bigint[]), CAST(:entry_created_ats AS timestamptz[]),
                             CAST(:entry_hashes AS bytea[]))
    )
    UPDATE accounts
    SET debits_posted = u.debits_posted,
        credits_posted = u.credits_posted,
        entries_count = u.entries_count,
        last_entry_hash = u.last_entry_hash,
        last_entry_at = u.last_entry_at
    FROM unnest(CAST(:account_ids AS text[]), CAST(:debits_posted AS bigint[]), CAST(:credits_posted AS bigint[]),
                CAST(:entries_counts AS bigint[]), CAST(:last_entry_hashes AS bytea[]),
                CAST(:last_entry_ats AS timestamptz[]))
         AS u(id, debits_posted, credits_posted, entries_count, last_entry_hash, last_entry_at)
    WHERE accounts.id = u.id
    """
)


@dataclass(frozen=True, slots=True)
class BatchResult:
    index: int
    id: str
    status: str  # created | replayed | rejected
    code: str | None
    transfer: TransferRecord | None


class _IdsClaimed(Exception):
    """Ids another request stored between our read and our insert."""

    def __init__(self, ids: set[str]) -> None:
        super().__init__(f"{len(ids)} ids claimed concurrently")
        self.ids = ids


class BatchService:
    def __init__(self, unit_of_work: UnitOfWork, locker: AccountLocker = lock_accounts) -> None:
        self._unit_of_work = unit_of_work
        self._lock = locker

    async def create(self, items: list[BatchItem]) -> list[BatchResult]:
        async def work(session: AsyncSession) -> list[BatchResult]:
            results = await self.apply(session, items)
            await session.commit()
            return results

        return await self._unit_of_work.run(work)

    async def apply(self, session: AsyncSession, items: list[BatchItem]) -> list[BatchResult]:
        """The batch's work inside the caller's transaction (which commits it)."""
        ids = sorted({item.request.id for item in items})
        stored = await _fetch(session, ids)
        new_items = [item for item in items if item.request.id not in stored]
        account_ids = {i.request.debit_account_id for i in new_items} | {i.request.credit_account_id for i in new_items}
        if account_ids:
            accounts, now = await self._lock(session, account_ids)
        else:
            accounts, now = {}, (await session.execute(select(func.clock_timestamp()))).scalar_one()

        for _ in range(MAX_ATTEMPTS):
            existing = {key: (record.request_hash, record.status != "rejected") for key, record in stored.items()}
            working = dict(accounts)
            decisions = decide_batch(items, existing, working, now)
            try:
                async with session.begin_nested():
                    await _write(session, items, decisions, accounts, working, now)
            except _IdsClaimed as claimed:
                stored.update(await _fetch(session, sorted(claimed.ids)))
                continue
            return _results(items, decisions, stored, now)
        # Ids keep being claimed under us: start the whole transaction again.
        raise RetryableConflict("batch ids kept being claimed by concurrent requests")


async def _fetch(session: AsyncSession, ids: list[str]) -> dict[str, TransferRecord]:
    if not ids:
        return {}
    rows = (await session.execute(select(*TRANSFER_COLUMNS).where(Transfer.id.in_(ids)))).mappings().all()
    return {row["id"]: TransferRecord.from_row(row) for row in rows}


async def _write(
    session: AsyncSession,
    items: list[BatchItem],
    decisions: list[ItemDecision],
    before: dict[str, LockedAccount],
    after: dict[str, LockedAccount],
    now: datetime,
) -> None:
    rows: dict[str, Any] = {
        key: []
        for key in (
            "ids",
            "debit_account_ids",
            "credit_account_ids",
            "amounts",
            "currencies",
            "statuses",
            "codes",
            "descriptions",
            "metadata",
            "request_hashes",
            "created_ats",
        )
    }
    entries: dict[str, list[Any]] = {
        key: []
        for key in (
            "entry_account_ids",
            "entry_sequences",
            "entry_transfer_ids",
            "entry_amounts",
            "entry_balances",
            "entry_created_ats",
            "entry_hashes",
        )
    }
    for decision in decisions:
        if decision.status != "created" and not decision.recorded:
            continue
        request = items[decision.index].request
        plan = decision.plan
        rows["ids"].append(request.id)
        rows["debit_account_ids"].append(request.debit_account_id)
        rows["credit_account_ids"].append(request.credit_account_id)
        rows["amounts"].append(request.amount)
        rows["currencies"].append(plan.currency if plan else request.currency)
        rows["statuses"].append("posted" if plan else "rejected")
        rows["codes"].append(decision.code)
        rows["descriptions"].append(request.description)
        rows["metadata"].append(json.dumps(request.metadata or {}))
        rows["request_hashes"].append(request.fingerprint())
        rows["created_ats"].append(plan.created_at if plan else now)
        for entry in plan.entries if plan else ():
            entries["entry_account_ids"].append(entry.account_id)
            entries["entry_sequences"].append(entry.sequence)
            entries["entry_transfer_ids"].append(request.id)
            entries["entry_amounts"].append(entry.amount)
            entries["entry_balances"].append(entry.balance_after)
            entries["entry_created_ats"].append(plan.created_at)
            entries["entry_hashes"].append(entry.hash)
    if not rows["ids"]:
        return
    inserted = set((await session.execute(INSERT_TRANSFERS, rows)).scalars().all())
    if len(inserted) != len(rows["ids"]):
        raise _IdsClaimed(set(rows["ids"]) - inserted)
    changed = [account for key, account in after.items() if account is not before.get(key)]
    if not changed:
        return
    await session.execute(
        WRITE_ENTRIES_AND_ACCOUNTS,
        {
            **entries,
            "account_ids": [a.id for a in changed],
            "debits_posted": [a.debits_posted for a in changed],
            "credits_posted": [a.credits_posted for a in changed],
            "entries_counts": [a.entries_count for a in changed],
            "last_entry_hashes": [a.last_entry_hash for a in changed],
            "last_entry_ats": [a.last_entry_at for a in changed],
        },
    )


def _results(
    items: list[BatchItem], decisions: list[ItemDecision], stored: dict[str, TransferRecord], now: datetime
) -> list[BatchResult]:
    written: dict[str, TransferRecord] = {}
    results: list[BatchResult] = []
    for decision in decisions:
        request = items[decision.index].request
        transfer: TransferRecord | None = None
        if decision.status == "created" or decision.recorded:
            plan = decision.plan
            transfer = TransferRecord(
                id=request.id,
                debit_account_id=request.debit_account_id,
                credit_account_id=request.credit_account_id,
                amount=request.amount,
                currency=plan.currency if plan else request.currency,
                pending=False,
                status="posted" if plan else "rejected",
                code=decision.code,
                description=request.description,
                metadata=request.metadata or {},
                created_at=plan.created_at if plan else now,
                updated_at=plan.created_at if plan else now,
                request_hash=request.fingerprint(),
            )
            written[request.id] = transfer
        elif decision.status == "replayed":
            original = stored.get(request.id) or written[request.id]
            transfer = original.as_created()
        code = decision.code
        if decision.status == "replayed" and transfer is not None:
            code = transfer.code
        results.append(BatchResult(decision.index, request.id, decision.status, code, transfer))
    return results
