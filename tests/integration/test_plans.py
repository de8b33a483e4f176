"""The write path's plans find rows by key however the tables have grown since they were
made (`ledger.service.groups.GROUP_BEGIN`).

PostgreSQL keeps a prepared statement's generic plan (the service forces generic plans)
until the next ANALYZE of its tables. Planned on a new ledger's nearly empty tables, the
group lock statement scanned all of `transfers` to find the group's ids, and kept doing
so as the table grew, until autovacuum analyzed it: a fresh service ran about 25% slower
in its first minute, and forever on a server with autovacuum off."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from sqlalchemy import Select
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect

from ledger import migrate
from ledger.service import queries as queries_module
from ledger.service.events import LOCKED_BEGIN, MOVE_SQL
from ledger.service.groups import GROUP_BEGIN, GROUP_LOCK_SQL
from ledger.service.metadata import aggregate_parameters, aggregate_sql
from ledger.service.queries import LedgerQueries
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


# -- metadata filters and the aggregate (issue 15) -------------------------------------

ZERO_HASH = "decode(repeat('00', 32), 'hex')"
# 20,000 accounts, nine in ten tagged with one of 1,000 groups (20 accounts each); 40,000
# transfers, one in four tagged with one of 5,000 orders; a credit entry per transfer.
# Enough rows that without a usable index PostgreSQL scans the table.
METADATA_ROWS = (
    "INSERT INTO accounts (id, currency, allow_negative_balance, metadata, created_at, debits_posted, "
    "credits_posted, pending_debits, pending_credits, entries_count) "
    "SELECT 'a' || g, 'EUR', true, CASE WHEN g % 10 = 0 THEN '{}'::jsonb "
    "ELSE jsonb_build_object('group', 'g' || (g % 1000), 'tier', 'gold') END, now() - interval '1 day', "
    "0, 0, 0, 0, 0 FROM generate_series(1, 20000) g",
    "INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, currency, status, pending, "
    "metadata, request_hash, created_at, updated_at) "
    "SELECT 't' || g, 'a' || (1 + g % 20000), 'a' || (1 + (g + 7) % 20000), 1, 'EUR', 'posted', false, "
    "CASE WHEN g % 4 = 0 THEN jsonb_build_object('order', 'o' || (g % 5000)) ELSE '{}'::jsonb END, "
    f"{ZERO_HASH}, now() - interval '1 hour', now() - interval '1 hour' FROM generate_series(1, 40000) g",
    "INSERT INTO entries (account_id, sequence, transfer_id, amount, balance_after, created_at, hash, key_id) "
    "SELECT credit_account_id, row_number() OVER w, id, 1, row_number() OVER w, created_at, "
    f"{ZERO_HASH}, '' FROM transfers WINDOW w AS (PARTITION BY credit_account_id ORDER BY id)",
    "ANALYZE accounts, transfers, entries",
)


PREPARED = itertools.count()


def sql_literal(value: object) -> str:
    if isinstance(value, dict):
        value = json.dumps(value)
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


async def list_plan(connection: asyncpg.Connection, kind: str, *, generic: bool = False, **filters: object) -> str:
    """The plan the service runs a list with: the statement `LedgerQueries.<kind>` builds,
    compiled as the service's driver sends it, prepared, and planned as the service plans
    it: a custom plan when it asks for one (a metadata filter), else a generic plan
    (`plan_cache_mode = force_generic_plan` on every service connection); `generic=True`
    forces the generic one."""
    captured: list[tuple[Select, bool]] = []

    async def capture(statement: Select, *, custom_plan: bool = False) -> list:
        captured.append((statement, custom_plan))
        return []

    queries = LedgerQueries(None)  # type: ignore[arg-type]
    queries._rows = capture  # type: ignore[method-assign]
    await getattr(queries, kind)(limit=100, cursor=None, **filters)
    statement, custom_plan = captured[0]
    mode = "force_custom_plan" if custom_plan and not generic else "force_generic_plan"
    compiled = statement.compile(dialect=asyncpg_dialect())
    arguments = ", ".join(sql_literal(compiled.params[name]) for name in compiled.positiontup or ())
    name = f"listed_{next(PREPARED)}"
    await connection.execute(f"SET plan_cache_mode = {mode}")
    await connection.execute(f"PREPARE {name} AS {compiled.string}")
    rows = await connection.fetch(f"EXPLAIN (COSTS OFF) EXECUTE {name}({arguments})")
    return "\n".join(row[0] for row in rows)


def aggregate_plan_sql(metadata: dict[str, str] | None, as_of: datetime | None) -> str:
    """The aggregate's statement with its parameters written in, as a custom plan sees
    them (the service plans it with `force_custom_plan`)."""
    moment = datetime.now(UTC)
    parameters = aggregate_parameters("EUR", metadata, as_of, moment)
    sql = aggregate_sql(metadata, as_of)
    return re.sub(
        r"(?<!:):(currency|metadata|moment|as_of)\b",
        lambda match: sql_literal(
            parameters[match.group(1)].isoformat()  # type: ignore[union-attr]
            if isinstance(parameters[match.group(1)], datetime)
            else parameters[match.group(1)]
        ),
        sql,
    )


@pytest.fixture(scope="module")
async def metadata_database(postgres_server_url: str) -> AsyncIterator[str]:
    url = await asyncio.to_thread(provision.create_database, postgres_server_url, "ledger_plans_metadata")
    try:
        await asyncio.to_thread(migrate.upgrade, url)
        connection = await asyncpg.connect(url)
        try:
            for statement in METADATA_ROWS:
                await connection.execute(statement)
        finally:
            await connection.close()
        yield url
    finally:
        await asyncio.to_thread(provision.drop_database, postgres_server_url, url)


async def test_the_metadata_filters_find_rows_through_their_gin_indexes(
    metadata_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`metadata[KEY]=VALUE` on 20,000 accounts and 40,000 transfers, planned as the
    service plans them: a value few rows hold (20 accounts, 2 transfers, none) is read
    through `ix_accounts_metadata` / `ix_transfers_metadata`, never by reading the whole
    table; a value most accounts hold walks the list's own order and stops at the page's
    end. The teeth: planned generically (the service's default), the same statements
    walk the whole primary key for a rare value; and without the `metadata <> '{}'`
    literal (the partial indexes' predicate, which PostgreSQL does not infer from `@>`)
    no plan can use the index."""
    connection = await asyncpg.connect(metadata_database)
    no_filters = {"account_id": None, "status": None, "start": None, "end": None}
    try:
        for pairs in ({"group": "g7"}, {"group": "g7", "tier": "gold"}, {"group": "none"}):
            for currency in (None, "EUR"):
                plan = await list_plan(connection, "accounts", currency=currency, metadata=pairs)
                assert "ix_accounts_metadata" in plan and "Seq Scan on accounts" not in plan, plan
        for pairs in ({"order": "o17"}, {"order": "none"}):
            plan = await list_plan(connection, "transfers", **no_filters, metadata=pairs)
            assert "ix_transfers_metadata" in plan and "Seq Scan on transfers" not in plan, plan
        plan = await list_plan(connection, "accounts", currency=None, metadata={"tier": "gold"})
        assert "Index Scan using pk_accounts" in plan and "Seq Scan on accounts" not in plan, plan

        plan = await list_plan(connection, "accounts", generic=True, currency=None, metadata={"group": "g7"})
        assert "ix_accounts_metadata" not in plan, "the teeth lost their bite"
        plan = await list_plan(connection, "transfers", generic=True, **no_filters, metadata={"order": "o17"})
        assert "ix_transfers_metadata" not in plan, "the teeth lost their bite"
        monkeypatch.setattr(queries_module, "metadata_matches", lambda column, pairs: column.contains(dict(pairs)))
        plan = await list_plan(connection, "accounts", currency=None, metadata={"group": "g7"})
        assert "ix_accounts_metadata" not in plan, "the teeth lost their bite"
        plan = await list_plan(connection, "transfers", **no_filters, metadata={"order": "o17"})
        assert "ix_transfers_metadata" not in plan, "the teeth lost their bite"
    finally:
        await connection.close()


async def test_the_aggregate_with_a_filter_reads_only_the_matching_accounts(metadata_database: str) -> None:
    """The aggregate over one group (20 of 20,000 accounts), now and as of an instant:
    the accounts come from `ix_accounts_metadata`, their journals and reservations
    through the per-account indexes; no table is scanned whole. The teeth: without the
    partial index's predicate the accounts are scanned, and without a filter too (the
    sum over a whole currency has to read it)."""
    connection = await asyncpg.connect(metadata_database)
    try:
        an_hour_ago = datetime.now(UTC) - timedelta(minutes=30)
        for as_of in (None, an_hour_ago):
            rows = await connection.fetch("EXPLAIN (COSTS OFF) " + aggregate_plan_sql({"group": "g7"}, as_of))
            plan = "\n".join(row[0] for row in rows)
            assert "ix_accounts_metadata" in plan, plan
            assert "Seq Scan" not in plan, plan
            without_predicate = aggregate_plan_sql({"group": "g7"}, as_of).replace("AND a.metadata <> '{}'::jsonb", "")
            rows = await connection.fetch("EXPLAIN (COSTS OFF) " + without_predicate)
            assert "Seq Scan on accounts" in "\n".join(row[0] for row in rows), "the teeth lost their bite"
            rows = await connection.fetch("EXPLAIN (COSTS OFF) " + aggregate_plan_sql(None, as_of))
            assert "Seq Scan on accounts" in "\n".join(row[0] for row in rows)
    finally:
        await connection.close()
