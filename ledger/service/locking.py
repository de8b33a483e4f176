"""How money-moving transactions lock accounts.

Every code path that locks accounts goes through `lock_accounts`: one
`SELECT ... FOR UPDATE` over all the ids, ordered by id. Two transactions that share
accounts therefore request the locks in the same order, and a cycle of waits (a
deadlock) cannot form, however the transfers point.

The same statement also locks the other account of every reservation of these accounts
that is past its expiry, so that the caller can release it (lazy expiry) under the
locks of both its accounts. Existing transfer rows are only ever locked after accounts,
except by the sweeper, which never waits for an account (see `ledger.service.expiry`).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Protocol

from sqlalchemy import text

from ledger.domain import LockedAccount
from ledger.models import Account
from ledger.service.unit_of_work import Executor

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
    Account.status,
    Account.overdraft_limit,
    Account.max_balance,
)

DUE = "t.status = 'pending' AND t.expires_at <= clock_timestamp()"

# clock_timestamp() and the due check are read in the outer query, after the inner one
# was granted its locks: entries get a time later than any entry committed before.
LOCK_SQL = f"""
    SELECT locked.*, clock_timestamp() AS now,
           EXISTS (SELECT 1 FROM transfers t
                   WHERE {DUE} AND (t.debit_account_id = locked.id OR t.credit_account_id = locked.id)) AS has_due
    FROM (
        SELECT {", ".join(column.key for column in LOCKED_COLUMNS)}
        FROM accounts
        -- One array of ids (an InitPlan), so that the rows are found through the primary
        -- key: an OR of the two conditions below made PostgreSQL scan the whole table.
        WHERE id = ANY(ARRAY(
            SELECT unnest($1::text[])
            UNION
            -- Counterparts of due reservations, one branch per index (an OR scanned every
            -- pending transfer).
            SELECT t.credit_account_id FROM transfers t WHERE {DUE} AND t.debit_account_id = ANY($1::text[])
            UNION
            SELECT t.debit_account_id FROM transfers t WHERE {DUE} AND t.credit_account_id = ANY($1::text[])
        ))
        ORDER BY id
        FOR UPDATE
    ) AS locked
    """
# The same statement for SQLAlchemy (named parameter) and for asyncpg (`$1`, the hot path).
LOCK = text(LOCK_SQL.replace("$1::text[]", "CAST(:ids AS text[])"))
CLOCK = text("SELECT clock_timestamp()")


class AccountLocker(Protocol):
    async def __call__(
        self, session: Executor, account_ids: Iterable[str]
    ) -> tuple[dict[str, LockedAccount], datetime]:
        """Lock the existing accounts among `account_ids`; return them and the database clock."""
        ...


async def lock_accounts(session: Executor, account_ids: Iterable[str]) -> tuple[dict[str, LockedAccount], datetime]:
    ids = sorted(set(account_ids))
    rows = (await session.execute(LOCK, {"ids": ids})).mappings().all()
    now = rows[0]["now"] if rows else (await session.execute(CLOCK)).scalar_one()
    return {row["id"]: locked_account(row) for row in rows}, now


def locked_account(row: object) -> LockedAccount:
    fields = {column.key: row[column.key] for column in LOCKED_COLUMNS}  # type: ignore[index]
    return LockedAccount(**fields, has_due=bool(row.get("has_due", False)))  # type: ignore[attr-defined]
