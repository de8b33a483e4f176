"""The write path's plans find rows by key however the tables have grown since they were
made (`ledger.service.groups.GROUP_BEGIN`).

PostgreSQL keeps a prepared statement's generic plan (the service forces generic plans)
until the next ANALYZE of its tables. Planned on a new ledger's nearly empty tables, the
group lock statement scanned all of `transfers` to find the group's ids, and kept doing
so as the table grew, until autovacuum analyzed it: a fresh service ran about 25% slower
in its first minute, and forever on a server with autovacuum off."""

from __future__ import annotations

import asyncio

import asyncpg

from ledger import migrate
from ledger.service.events import LOCKED_BEGIN, MOVE_SQL
from ledger.service.groups import GROUP_BEGIN, GROUP_LOCK_SQL
from tests import provision

ACCOUNTS = "'{a1,a2,a3,a4,a5,a6,a7,a8}'"


async def plan_after_growth(owner_url: str, begin: str) -> str:
    """Prepare the group lock statement inside a transaction begun as `begin`, on nearly
    empty tables; grow `transfers` to 20,000 rows without ANALYZE; return the plan the
    prepared statement then runs with."""
    connection = await asyncpg.connect(owner_url, server_settings={"plan_cache_mode": "force_generic_plan"})
    try:
        await connection.execute(
            "INSERT INTO accounts (id, currency, allow_negative_balance, metadata, created_at, debits_posted, "
            "credits_posted, pending_debits, pending_credits, entries_count) "
            "SELECT 'a' || g, 'EUR', true, '{}', now(), 0, 0, 0, 0, 0 FROM generate_series(1, 500) g"
        )
        await connection.execute(begin)
        await connection.execute(f"PREPARE group_lock(text[], text[]) AS {GROUP_LOCK_SQL}")
        await connection.execute(f"EXECUTE group_lock({ACCOUNTS}, '{{t1}}')")  # planned now
        await connection.execute("COMMIT")
        await connection.execute(
            "INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, currency, status, pending, "
            "metadata, request_hash, created_at, updated_at) "
            "SELECT 't' || g, 'a' || (1 + g % 500), 'a' || (1 + (g + 7) % 500), 1, 'EUR', 'posted', false, '{}', "
            "decode(repeat('00', 32), 'hex'), now(), now() FROM generate_series(1, 20000) g"
        )
        await connection.execute(begin)
        rows = await connection.fetch(f"EXPLAIN (COSTS OFF) EXECUTE group_lock({ACCOUNTS}, '{{t1,t2}}')")
        await connection.execute("ROLLBACK")
        return "\n".join(row[0] for row in rows)
    finally:
        await connection.close()


async def test_the_group_lock_plan_made_on_empty_tables_still_uses_indexes(postgres_server_url: str) -> None:
    url = await asyncio.to_thread(provision.create_database, postgres_server_url, "ledger_plans")
    try:
        await asyncio.to_thread(migrate.upgrade, url)
        plan = await plan_after_growth(url, GROUP_BEGIN)
        assert "Seq Scan" not in plan, plan
    finally:
        await asyncio.to_thread(provision.drop_database, postgres_server_url, url)


async def test_without_it_the_plan_scans_the_grown_table(postgres_server_url: str) -> None:
    """The teeth: the same statement prepared in a plain transaction keeps scanning."""
    url = await asyncio.to_thread(provision.create_database, postgres_server_url, "ledger_plans")
    try:
        await asyncio.to_thread(migrate.upgrade, url)
        plan = await plan_after_growth(url, "BEGIN")
        assert "Seq Scan on transfers" in plan, plan
    finally:
        await asyncio.to_thread(provision.drop_database, postgres_server_url, url)


async def move_plan(owner_url: str, begin: str) -> str:
    """The sequencer's move (`ledger.service.events.MOVE_SQL`) prepared in a transaction
    begun as `begin` on an empty outbox, then run when the outbox holds 5,000 rows."""
    connection = await asyncpg.connect(owner_url, server_settings={"plan_cache_mode": "force_generic_plan"})
    try:
        await connection.execute(begin)
        await connection.execute(f"PREPARE move(int) AS {MOVE_SQL}")
        await connection.execute("EXECUTE move(5000)")  # planned now
        await connection.execute("COMMIT")
        await connection.execute(
            "INSERT INTO event_outbox (type, account_id, created_at) "
            "SELECT 'account.created', 'a' || g, now() FROM generate_series(1, 5000) g"
        )
        await connection.execute(begin)
        rows = await connection.fetch("EXPLAIN (COSTS OFF) EXECUTE move(100)")
        await connection.execute("ROLLBACK")
        return "\n".join(row[0] for row in rows)
    finally:
        await connection.close()


async def test_the_sequencer_finds_outbox_rows_through_its_index(postgres_server_url: str) -> None:
    """Planned on an empty outbox, the move would read the whole outbox heap (dead rows of
    earlier moves included) at every move; begun like the service begins it, it reads the
    first rows of the outbox's primary key. The teeth: in a plain transaction it scans."""
    url = await asyncio.to_thread(provision.create_database, postgres_server_url, "ledger_plans")
    try:
        await asyncio.to_thread(migrate.upgrade, url)
        plan = await move_plan(url, LOCKED_BEGIN)
        assert "Seq Scan on event_outbox" not in plan and "pk_event_outbox" in plan, plan
        assert "Seq Scan on event_outbox" in await move_plan(url, "BEGIN"), "the teeth lost their bite"
    finally:
        await asyncio.to_thread(provision.drop_database, postgres_server_url, url)
