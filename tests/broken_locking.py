"""Deliberately broken group lockers, for tests only: they prove that the concurrency
checks fail when the locking discipline of `ledger.service.groups` (one ordered
`SELECT ... FOR UPDATE` of every account of a group) is not followed."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from ledger.domain import LockedAccount
from ledger.service.locking import LOCKED_COLUMNS, locked_account

COLUMNS = ", ".join(column.key for column in LOCKED_COLUMNS)
EXISTING = "SELECT clock_timestamp() AS now, ARRAY(SELECT id FROM transfers WHERE id = ANY($1::text[])) AS existing"


async def lock_in_request_order(
    driver: asyncpg.Connection, account_ids: list[str], transfer_ids: list[str]
) -> tuple[dict[str, LockedAccount], datetime, list[str]]:
    """FOR UPDATE, but one account at a time in the order the group's requests name them
    (debit, then credit), so a group with A->B and one with B->A can each hold one lock
    and wait for the other."""
    accounts: dict[str, LockedAccount] = {}
    for account_id in account_ids:
        row = await driver.fetchrow(f"SELECT {COLUMNS} FROM accounts WHERE id = $1 FOR UPDATE", account_id)
        if row is not None:
            accounts[row["id"]] = locked_account(row)
    row = await driver.fetchrow(EXISTING, transfer_ids)
    return accounts, row["now"], list(row["existing"])


async def read_without_for_update(
    driver: asyncpg.Connection, account_ids: list[str], transfer_ids: list[str]
) -> tuple[dict[str, LockedAccount], datetime, list[str]]:
    """Ordered, but a plain SELECT: two groups decide on the same stale balances."""
    rows = await driver.fetch(f"SELECT {COLUMNS} FROM accounts WHERE id = ANY($1::text[]) ORDER BY id", account_ids)
    row = await driver.fetchrow(EXISTING, transfer_ids)
    return {r["id"]: locked_account(r) for r in rows}, row["now"], list(row["existing"])
