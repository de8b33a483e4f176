"""How a transfer locks its accounts.

Every code path that locks accounts goes through `lock_accounts`: one
`SELECT ... FOR UPDATE` over all the ids, ordered by id. Two transfers that share
accounts therefore request the locks in the same order, and a cycle of waits (a
deadlock) cannot form, however the transfers point.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Protocol

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from ledger.domain import LockedAccount
from ledger.models import Account

LOCKED_COLUMNS = (
    Account.id,
    Account.currency,
    Account.allow_negative_balance,
    Account.debits_posted,
    Account.credits_posted,
    Account.pending_debits,
    Account.pending_credits,
    Account.entries_count,
    Account.last_entry_hash,
    Account.last_entry_at,
)


class AccountLocker(Protocol):
    async def __call__(
        self, session: AsyncSession, account_ids: Iterable[str]
    ) -> tuple[dict[str, LockedAccount], datetime]:
        """Lock the existing accounts among `account_ids`; return them and the database clock."""
        ...


async def lock_accounts(session: AsyncSession, account_ids: Iterable[str]) -> tuple[dict[str, LockedAccount], datetime]:
    ids = sorted(set(account_ids))
    locked = select(*LOCKED_COLUMNS).where(Account.id.in_(ids)).order_by(Account.id).with_for_update().subquery()
    # clock_timestamp() is read in the outer query, after the inner one was granted its
    # locks: entries get a time later than any entry committed before the lock was held.
    rows = (await session.execute(select(locked, func.clock_timestamp().label("now")))).mappings().all()
    now = rows[0]["now"] if rows else (await session.execute(select(func.clock_timestamp()))).scalar_one()
    return {row["id"]: locked_account(row) for row in rows}, now


def locked_account(row: object) -> LockedAccount:
    return LockedAccount(**{column.key: row[column.key] for column in LOCKED_COLUMNS})  # type: ignore[index]
