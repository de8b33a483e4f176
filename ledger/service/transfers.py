"""Applying a transfer: where money moves.

One database transaction per transfer:

1. Read the id's record. If there is one, this is a replay (same request) or a
   conflict (other fields), and nothing else happens.
2. Lock both accounts with one ordered `SELECT ... FOR UPDATE` (see `locking`).
3. In a savepoint, decide in memory (`ledger.domain.decide_transfer`) and write the
   transfer, its two journal entries and the new account totals in one statement.
   A refusal, or a constraint the database enforces (the same invariants again), rolls
   back to the savepoint and the refusal is recorded instead, in the same transaction:
   the id's outcome is permanent either way. Losing a race on the same id (another
   request with the id committed first) also rolls back to the savepoint, and the
   winner's outcome is returned.
4. Commit.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession

from ledger.domain import TransferPlan, TransferRequest, check_accounts_different, decide_transfer
from ledger.errors import TransferExistsWithDifferentFields, TransferRefused
from ledger.models import Transfer
from ledger.service.locking import AccountLocker, lock_accounts
from ledger.service.queries import TRANSFER_COLUMNS
from ledger.service.records import TransferOutcome, TransferRecord
from ledger.service.unit_of_work import UnitOfWork, constraint_name, sqlstate

# The transfer, both journal lines and both account totals, in one round trip. The entries
# select from the inserted transfer so that they exist only if it does.
APPLY_TRANSFER = text(
    """
    WITH new_transfer AS (
        INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, currency, pending, status, code,
                               description, metadata, request_hash, created_at, updated_at)
        VALUES (:id, :debit_account_id, :credit_account_id, :amount, :currency, false, 'posted', NULL,
                :description, :metadata, :request_hash, :created_at, :created_at)
        RETURNING id
    ), new_entries AS (
        INSERT INTO entries (account_id, sequence, transfer_id, amount, balance_after, created_at, hash)
        SELECT e.account_id, e.sequence, new_transfer.id, e.amount, e.balance_after, :created_at, e.hash
        FROM new_transfer,
             (VALUES (CAST(:e1_account_id AS text), CAST(:e1_sequence AS bigint), CAST(:e1_amount AS bigint),
                      CAST(:e1_balance_after AS bigint), CAST(:e1_hash AS bytea)),
                     (:e2_account_id, :e2_sequence, :e2_amount, :e2_balance_after, :e2_hash))
                 AS e(account_id, sequence, amount, balance_after, hash)
    )
    UPDATE accounts
    SET debits_posted = u.debits_posted,
        credits_posted = u.credits_posted,
        entries_count = u.entries_count,
        last_entry_hash = u.last_entry_hash,
        last_entry_at = :created_at
    FROM (VALUES (CAST(:u1_id AS text), CAST(:u1_debits_posted AS bigint), CAST(:u1_credits_posted AS bigint),
                  CAST(:u1_entries_count AS bigint), CAST(:u1_hash AS bytea)),
                 (:u2_id, :u2_debits_posted, :u2_credits_posted, :u2_entries_count, :u2_hash))
         AS u(id, debits_posted, credits_posted, entries_count, last_entry_hash)
    WHERE accounts.id = u.id
    """
).bindparams(bindparam("metadata", type_=JSONB))

RECORD_REJECTION = text(
    """
    INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, currency, pending, status, code,
                           description, metadata, request_hash, created_at, updated_at)
    VALUES (:id, :debit_account_id, :credit_account_id, :amount, :currency, :pending, 'rejected', :code,
            :description, :metadata, :request_hash, clock_timestamp(), clock_timestamp())
    ON CONFLICT (id) DO NOTHING
    RETURNING *
    """
).bindparams(bindparam("metadata", type_=JSONB))

# A violated CHECK on these means the database caught what the Python decision should
# have: the refusal is recorded all the same, and the disagreement is a bug to look at.
CONSTRAINT_REFUSALS = {
    "ck_accounts_balance_not_negative": "insufficient_funds",
    "ck_transfers_accounts_different": "accounts_must_be_different",
}


class TransferService:
    def __init__(self, unit_of_work: UnitOfWork, locker: AccountLocker = lock_accounts) -> None:
        self._unit_of_work = unit_of_work
        self._lock = locker

    async def create(self, request: TransferRequest) -> TransferOutcome:
        async def work(session: AsyncSession) -> TransferOutcome:
            outcome = await self._create(session, request)
            await session.commit()
            return outcome

        return await self._unit_of_work.run(work)

    async def _create(self, session: AsyncSession, request: TransferRequest) -> TransferOutcome:
        fingerprint = request.fingerprint()
        existing = await fetch_transfer(session, request.id)
        if existing is not None:
            return replay(existing, fingerprint)

        try:
            async with session.begin_nested():
                # Refused before any lock: there is nothing to lock consistently.
                check_accounts_different(request)
                accounts, now = await self._lock(session, (request.debit_account_id, request.credit_account_id))
                plan = decide_transfer(request, accounts, now)
                await session.execute(APPLY_TRANSFER, apply_parameters(request, plan, fingerprint))
        except TransferRefused as refusal:
            return await record_rejection(session, request, refusal.reason, fingerprint)
        except sa_exc.IntegrityError as error:
            if sqlstate(error) == "23505" and constraint_name(error) == "pk_transfers":
                # Another request with this id committed between our read and our insert.
                winner = await fetch_transfer(session, request.id)
                assert winner is not None, "a unique violation on the id means a committed row"
                return replay(winner, fingerprint)
            reason = CONSTRAINT_REFUSALS.get(constraint_name(error) or "")
            if reason is None:
                raise
            return await record_rejection(session, request, reason, fingerprint)

        record = TransferRecord(
            id=request.id,
            debit_account_id=request.debit_account_id,
            credit_account_id=request.credit_account_id,
            amount=request.amount,
            currency=plan.currency,
            pending=False,
            status="posted",
            code=None,
            description=request.description,
            metadata=request.metadata or {},
            created_at=plan.created_at,
            updated_at=plan.created_at,
            request_hash=fingerprint,
        )
        return TransferOutcome(record, replayed=False)


def replay(existing: TransferRecord, fingerprint: bytes) -> TransferOutcome:
    if existing.request_hash != fingerprint:
        raise TransferExistsWithDifferentFields(
            f"transfer {existing.id!r} was already requested with different fields; use a new id for a new transfer"
        )
    return TransferOutcome(existing.as_created(), replayed=True)


async def fetch_transfer(session: AsyncSession, transfer_id: str) -> TransferRecord | None:
    row = (await session.execute(select(*TRANSFER_COLUMNS).where(Transfer.id == transfer_id))).mappings().first()
    return TransferRecord.from_row(row) if row is not None else None


async def record_rejection(
    session: AsyncSession, request: TransferRequest, reason: str, fingerprint: bytes
) -> TransferOutcome:
    row = (
        (
            await session.execute(
                RECORD_REJECTION,
                {
                    "id": request.id,
                    "debit_account_id": request.debit_account_id,
                    "credit_account_id": request.credit_account_id,
                    "amount": request.amount,
                    "currency": request.currency,
                    "pending": request.pending,
                    "code": reason,
                    "description": request.description,
                    "metadata": request.metadata or {},
                    "request_hash": fingerprint,
                },
            )
        )
        .mappings()
        .first()
    )
    if row is None:
        # A concurrent request recorded an outcome for this id first: that one stands.
        winner = await fetch_transfer(session, request.id)
        assert winner is not None
        return replay(winner, fingerprint)
    return TransferOutcome(TransferRecord.from_row(row), replayed=False)


def apply_parameters(request: TransferRequest, plan: TransferPlan, fingerprint: bytes) -> dict[str, Any]:
    parameters: dict[str, Any] = {
        "id": request.id,
        "debit_account_id": request.debit_account_id,
        "credit_account_id": request.credit_account_id,
        "amount": request.amount,
        "currency": plan.currency,
        "description": request.description,
        "metadata": request.metadata or {},
        "request_hash": fingerprint,
        "created_at": plan.created_at,
    }
    for index, entry in enumerate(plan.entries, start=1):
        parameters[f"e{index}_account_id"] = entry.account_id
        parameters[f"e{index}_sequence"] = entry.sequence
        parameters[f"e{index}_amount"] = entry.amount
        parameters[f"e{index}_balance_after"] = entry.balance_after
        parameters[f"e{index}_hash"] = entry.hash
    for index, update in enumerate(plan.updates, start=1):
        parameters[f"u{index}_id"] = update.id
        parameters[f"u{index}_debits_posted"] = update.debits_posted
        parameters[f"u{index}_credits_posted"] = update.credits_posted
        parameters[f"u{index}_entries_count"] = update.entries_count
        parameters[f"u{index}_hash"] = update.last_entry_hash
    return parameters
