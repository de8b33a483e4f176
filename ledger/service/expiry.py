"""Expiry of pending transfers: lazily, by whoever next decides on their accounts, and
by a background sweeper.

Lazy: a transaction that has locked accounts releases the due reservations whose two
accounts it holds (`release_due`), so its decision sees the released funds. Reads show a
due reservation as expired and its funds as available (see `ledger.service.queries`).

Sweeper: claims due reservations with `SELECT ... FOR UPDATE SKIP LOCKED` in bounded
batches (so several processes sweep without stepping on each other), then takes their
accounts with `FOR UPDATE NOWAIT`. It is the only path that locks a transfer row before
accounts, and since it never waits for an account, it can never close a cycle of waits:
if an account is busy, it lets go and the next decision or sweep releases the funds.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from datetime import datetime

from sqlalchemy import text

from ledger.domain import LockedAccount, PendingTransfer, release
from ledger.integrity import ChainKey
from ledger.models import Transfer
from ledger.service.locking import LOCKED_COLUMNS, locked_account
from ledger.service.records import TransferRecord
from ledger.service.unit_of_work import Executor, UnitOfWork, sqlstate, translate
from ledger.service.writer import Writes, write

logger = logging.getLogger("ledger.expiry")

# A transfer's row as stored, which its change is sealed from (the seal itself aside).
STORED_TRANSFER_COLUMNS = tuple(c for c in Transfer.__table__.columns if c.key not in ("seal", "seal_key"))
_STORED = ", ".join(column.key for column in STORED_TRANSFER_COLUMNS)

DUE_AMONG = text(
    f"""
    SELECT {_STORED} FROM transfers
    WHERE status = 'pending' AND expires_at <= :now
      AND debit_account_id = ANY(CAST(:ids AS text[])) AND credit_account_id = ANY(CAST(:ids AS text[]))
    ORDER BY id
    FOR UPDATE
    """
)
CLAIM = text(
    f"""
    SELECT {_STORED}, clock_timestamp() AS now FROM transfers
    WHERE status = 'pending' AND expires_at <= clock_timestamp()
    ORDER BY expires_at
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
    """
)
LOCK_NOWAIT = text(
    f"""
    SELECT {", ".join(column.key for column in LOCKED_COLUMNS)} FROM accounts
    WHERE id = ANY(CAST(:ids AS text[])) ORDER BY id FOR UPDATE NOWAIT
    """
)


def pending_transfer(transfer: TransferRecord) -> PendingTransfer:
    return PendingTransfer(
        id=transfer.id,
        debit_account_id=transfer.debit_account_id,
        credit_account_id=transfer.credit_account_id,
        amount=transfer.amount,
        status=transfer.status,
        pending=transfer.pending,
        expires_at=transfer.expires_at,
        posted_amount=transfer.posted_amount,
    )


def expire(transfer: TransferRecord, accounts: dict[str, LockedAccount], now: datetime, writes: Writes) -> None:
    debit, credit = release(pending_transfer(transfer), accounts)
    accounts[debit.id] = debit
    accounts[credit.id] = credit
    writes.account(debit)
    writes.account(credit)
    writes.change_transfer(replace(transfer, status="expired", updated_at=now), "transfer.expired")


async def release_due(session: Executor, accounts: dict[str, LockedAccount], now: datetime, writes: Writes) -> set[str]:
    """Release the due reservations between locked accounts, in memory and into `writes`;
    return their ids."""
    if not any(account.has_due for account in accounts.values()):
        return set()
    rows = (await session.execute(DUE_AMONG, {"now": now, "ids": sorted(accounts)})).mappings().all()
    for row in rows:
        expire(TransferRecord.from_row(row), accounts, now, writes)
    return {row["id"] for row in rows}


async def sweep_once(unit_of_work: UnitOfWork, limit: int, key: ChainKey) -> int:
    """Release up to `limit` due reservations; return how many. Through the unit of work,
    like every other transaction: a connection left in doubt is discarded, never reused."""

    async def work(connection: Executor) -> int:
        claimed = (await connection.execute(CLAIM, {"limit": limit})).mappings().all()
        if not claimed:
            return 0
        now = claimed[0]["now"]
        ids = sorted({row["debit_account_id"] for row in claimed} | {row["credit_account_id"] for row in claimed})
        try:
            rows = (await connection.execute(LOCK_NOWAIT, {"ids": ids})).mappings().all()
        except Exception as error:
            if sqlstate(error) == "55P03":  # lock_not_available: an account is busy, let go
                return 0
            raise
        accounts = {row["id"]: locked_account(row) for row in rows}
        writes = Writes()
        for row in claimed:
            expire(TransferRecord.from_row(row), accounts, now, writes)
        await write(connection, writes, key)
        await connection.commit()
        return len(claimed)

    return await unit_of_work.run(work)


async def run_sweeper(unit_of_work: UnitOfWork, interval_seconds: float, limit: int, key: ChainKey) -> None:
    """Sweep forever (until cancelled): at once again while batches come back full."""
    while True:
        try:
            released = await sweep_once(unit_of_work, limit, key)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            # An outage must not kill the sweeper: log it and try again later.
            level = logging.WARNING if translate(error) is not None else logging.ERROR
            logger.log(level, "expiry sweep failed: %s", error)
            released = 0
        if released:
            logger.info("released %d expired reservations", released)
        if released < limit:
            await asyncio.sleep(interval_seconds)
