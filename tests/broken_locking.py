"""Deliberately broken account lockers, for tests only: they prove that the concurrency
checks fail when the locking discipline of `ledger.service.locking` is not followed."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from ledger.domain import LockedAccount
from ledger.models import Account
from ledger.service.locking import LOCKED_COLUMNS, locked_account


async def lock_in_request_order(
    session: AsyncSession, account_ids: Iterable[str]
) -> tuple[dict[str, LockedAccount], datetime]:
    """FOR UPDATE, but one account at a time in the order the request names them, so a
    transfer A->B and a transfer B->A can each hold one lock and wait for the other."""
    accounts: dict[str, LockedAccount] = {}
    for account_id in account_ids:
        statement = select(*LOCKED_COLUMNS).where(Account.id == account_id).with_for_update()
        row = (await session.execute(statement)).mappings().first()
        if row is not None:
            accounts[row["id"]] = locked_account(row)
    now = (await session.execute(select(func.clock_timestamp()))).scalar_one()
    return accounts, now


async def read_without_for_update(
    session: AsyncSession, account_ids: Iterable[str]
) -> tuple[dict[str, LockedAccount], datetime]:
    """Ordered, but a plain SELECT: two transfers decide on the same stale balance."""
    statement = (
        select(*LOCKED_COLUMNS, func.clock_timestamp().label("now"))
        .where(Account.id.in_(sorted(set(account_ids))))
        .order_by(Account.id)
    )
    rows = (await session.execute(statement)).mappings().all()
    now = rows[0]["now"] if rows else (await session.execute(select(func.clock_timestamp()))).scalar_one()
    return {row["id"]: locked_account(row) for row in rows}, now
