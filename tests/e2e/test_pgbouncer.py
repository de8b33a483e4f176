"""The service behind a real PgBouncer in transaction mode (LEDGER_DATABASE_POOLER=transaction,
README "Behind PgBouncer"): the concurrency suite through it with a server pool of
`SERVER_POOL` connections shared by the service's 40, and afterwards no named prepared
statement and no session setting on any of those server connections; the per-transaction
limits apply through it; and without the setting the same PgBouncer breaks the service,
so that these tests can fail.

PgBouncer is Debian's (`apt-get install pgbouncer`; `make test` installs it as root): without
it these tests are skipped on a developer's machine and fail under CI (`CI` set)."""

from __future__ import annotations

import asyncio
import inspect
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import asyncpg
import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger import migrate
from ledger.cluster.pgbouncer import PgBouncer, PgBouncerError, program
from ledger.database import create_engine
from ledger.service.unit_of_work import UnitOfWork
from tests import provision
from tests.conftest import serving_process
from tests.e2e import test_concurrency as concurrency
from tests.scenario import find_violations, run_bank_scenario

pytestmark = pytest.mark.slow

# Server connections per (database, user) pool: far fewer than the service's 30 + 10
# client connections, so that consecutive transactions of one client connection run on
# different server sessions all the time.
SERVER_POOL = 4
# What the service sends as session settings without LEDGER_DATABASE_POOLER (PgBouncer
# refuses them unless told to ignore them, which the teeth test does).
SESSION_SETTINGS = (
    "lock_timeout",
    "statement_timeout",
    "idle_in_transaction_session_timeout",
    "plan_cache_mode",
    "jit",
)


def _require_pgbouncer() -> None:
    try:
        program()
    except PgBouncerError as error:
        if os.environ.get("CI"):
            pytest.fail(str(error))
        pytest.skip(str(error))


def _bouncer(database: provision.LedgerDatabase, directory: Path, **options: object) -> PgBouncer:
    """A PgBouncer in front of the test database, for its owner and its serving role."""
    _require_pgbouncer()
    owner, service = urlsplit(database.owner_url), urlsplit(database.service_url)
    assert service.username and service.password and owner.username
    users = {
        service.username: unquote(service.password),
        # An owner without a password (trust, LEDGER_TEST_DATABASE_URL) gets one for
        # PgBouncer's own client authentication; upstream it is not asked for one.
        owner.username: unquote(owner.password or "") or secrets.token_urlsafe(16),
    }
    return PgBouncer(
        directory,
        upstream_host=service.hostname or "127.0.0.1",
        upstream_port=service.port or 5432,
        database=service.path.lstrip("/"),
        users=users,
        default_pool_size=SERVER_POOL,
        **options,  # type: ignore[arg-type]
    )


def _environment(database: provision.LedgerDatabase, bouncer: PgBouncer, directory: Path, pooler: str) -> dict:
    owner, service = urlsplit(database.owner_url).username, urlsplit(database.service_url).username
    assert owner and service
    return {
        **provision.server_environment(database, directory / "data"),
        "LEDGER_DATABASE_URL": bouncer.url(service),
        "LEDGER_DATABASE_POOLER": pooler,
        "LEDGER_POOL_SIZE": "30",
        "LEDGER_MAX_OVERFLOW": "10",
        "LEDGER_LOG_LEVEL": "info",
        # Tests write as the owner behind the service's back (see tests/conftest.py).
        "LEDGER_CHECKPOINT_INTERVAL_SECONDS": "0",
    }


@pytest.fixture(scope="module")
def bouncer(ledger_database: provision.LedgerDatabase, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgBouncer]:
    with _bouncer(ledger_database, tmp_path_factory.mktemp("pgbouncer") / "pgbouncer") as running:
        yield running


@pytest.fixture(scope="module")
def pooled_server_url(
    ledger_database: provision.LedgerDatabase, bouncer: PgBouncer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A real `ledger serve` whose every connection, migrations included, goes through
    PgBouncer in transaction mode."""
    directory = tmp_path_factory.mktemp("pooled-server")
    environment = _environment(ledger_database, bouncer, directory, "transaction")
    owner = urlsplit(ledger_database.owner_url).username
    assert owner
    environment["LEDGER_MIGRATION_DATABASE_URL"] = bouncer.url(owner)
    with serving_process(directory, environment) as (url, _log):
        yield url


async def server_sessions(bouncer: PgBouncer, user: str) -> list[dict]:
    """What each server connection of `user`'s pool holds: as many transactions open at
    once through PgBouncer as the pool has server connections, so each runs on a
    different one and together they cover every one of them."""
    connections = [
        await asyncpg.connect(bouncer.url(user), statement_cache_size=0, timeout=10) for _ in range(SERVER_POOL)
    ]
    try:
        for connection in connections:
            await connection.execute("BEGIN")
        rows = [
            dict(
                await connection.fetchrow(
                    "SELECT pg_backend_pid() AS pid, (SELECT count(*) FROM pg_prepared_statements) AS prepared, "
                    "current_setting('lock_timeout') AS lock_timeout, "
                    "current_setting('statement_timeout') AS statement_timeout"
                )
            )
            for connection in connections
        ]
        for connection in connections:
            await connection.execute("ROLLBACK")
    finally:
        for connection in connections:
            await connection.close()
    assert len({row["pid"] for row in rows}) == SERVER_POOL, rows
    return rows


async def session_defaults(database: provision.LedgerDatabase) -> tuple[str, str]:
    """The serving role's lock and statement timeouts in a session that set nothing."""
    connection = await asyncpg.connect(database.service_url)
    try:
        row = await connection.fetchrow(
            "SELECT current_setting('lock_timeout') AS l, current_setting('statement_timeout') AS s"
        )
        return row["l"], row["s"]
    finally:
        await connection.close()


SCENARIOS = [
    concurrency.test_64_clients_moving_money_both_ways_keep_every_invariant,
    concurrency.test_concurrent_batches_and_single_transfers_never_deadlock_and_conserve_money,
    concurrency.test_50_concurrent_posts_of_one_id_apply_once_and_all_agree,
    concurrency.test_concurrent_withdrawals_beyond_the_balance_never_overdraw,
    concurrency.test_racing_posts_voids_and_expiry_make_exactly_one_decision,
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda scenario: scenario.__name__.removeprefix("test_"))
async def test_the_concurrency_suite_through_pgbouncer(
    scenario: object, pooled_server_url: str, engine: AsyncEngine, uid: str
) -> None:
    """tests/e2e/test_concurrency.py, each test as it is, against the service behind
    PgBouncer: every invariant it checks holds there too."""
    arguments = {"server_url": pooled_server_url, "engine": engine, "uid": uid}
    assert callable(scenario)
    wanted = inspect.signature(scenario).parameters
    await scenario(**{name: value for name, value in arguments.items() if name in wanted})


async def test_no_named_prepared_statement_or_session_setting_is_left_on_any_server_connection(
    pooled_server_url: str, bouncer: PgBouncer, ledger_database: provision.LedgerDatabase, uid: str
) -> None:
    """After the service's traffic (the suite above, and a burst here), every server
    connection of its pool holds no prepared statement, and the timeouts the service
    set per transaction are gone with the transaction."""
    async with httpx.AsyncClient(base_url=pooled_server_url, headers=provision.API_HEADERS, timeout=30) as client:
        for name, negative in (("from", True), ("to", False)):
            body = {"id": f"ps-{uid}-{name}", "currency": "EUR", "allow_negative_balance": negative}
            assert (await client.post("/v1/accounts", json=body)).status_code == 201
        bodies = [
            {
                "id": f"ps-{uid}-{i}",
                "debit_account_id": f"ps-{uid}-from",
                "credit_account_id": f"ps-{uid}-to",
                "amount": 1,
            }
            for i in range(200)
        ]
        responses = await asyncio.gather(*(client.post("/v1/transfers", json=body) for body in bodies))
        assert {response.status_code for response in responses} == {201}
        assert (await client.get(f"/v1/accounts/ps-{uid}-to")).json()["balance"]["posted"] == 200
    service = urlsplit(ledger_database.service_url).username
    assert service
    sessions = await server_sessions(bouncer, service)
    assert [row["prepared"] for row in sessions] == [0] * SERVER_POOL, sessions
    defaults = await session_defaults(ledger_database)
    assert {(row["lock_timeout"], row["statement_timeout"]) for row in sessions} == {defaults}, sessions


async def test_the_per_transaction_limits_apply_through_pgbouncer(
    bouncer: PgBouncer, ledger_database: provision.LedgerDatabase
) -> None:
    """In every transaction the service starts through PgBouncer, through SQLAlchemy or on
    the driver (the hot path's own BEGIN), the limits are set; the hot path's shorter
    lock timeout still wins; an auditor's snapshot can still be chosen after them."""
    service = urlsplit(ledger_database.service_url).username
    assert service
    settings = provision.settings_for(
        bouncer.url(service), database_pooler="transaction", lock_timeout_ms=1500, statement_timeout_ms=7000,
        idle_in_transaction_timeout_ms=20000,
    )  # fmt: skip
    engine = create_engine(settings, pool_size=2, max_overflow=0)
    shown = "SELECT current_setting('lock_timeout'), current_setting('statement_timeout'), " \
        "current_setting('idle_in_transaction_session_timeout'), current_setting('TimeZone')"  # fmt: skip
    try:
        async with engine.begin() as connection:
            assert tuple((await connection.execute(text(shown))).one()) == ("1500ms", "7s", "20s", "UTC")
        async with engine.begin() as connection:
            await connection.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
            assert (await connection.execute(text("SHOW transaction_isolation"))).scalar_one() == "repeatable read"

        async def on_driver(driver: asyncpg.Connection) -> tuple:
            await driver.execute("BEGIN; SET LOCAL lock_timeout = 250")
            row = tuple(await driver.fetchrow(shown))
            await driver.execute("COMMIT")
            return row

        assert await UnitOfWork(engine.connect, settings).run_on_driver(on_driver) == ("250ms", "7s", "20s", "UTC")
    finally:
        await engine.dispose()


async def test_a_lock_held_elsewhere_fails_a_transfer_in_time_through_pgbouncer(
    pooled_server_url: str, database_url: str, uid: str
) -> None:
    """An account locked by someone else: the transfer is answered 503 lock_timeout after
    the service's lock timeout, not left waiting (the server session sets none itself)."""
    async with httpx.AsyncClient(base_url=pooled_server_url, headers=provision.API_HEADERS, timeout=30) as client:
        for name, negative in (("from", True), ("to", False)):
            body = {"id": f"lk-{uid}-{name}", "currency": "EUR", "allow_negative_balance": negative}
            assert (await client.post("/v1/accounts", json=body)).status_code == 201
        holder = await asyncpg.connect(database_url)
        try:
            await holder.execute("BEGIN")
            await holder.execute("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE", f"lk-{uid}-to")
            started = time.monotonic()
            body = {"id": f"lk-{uid}", "debit_account_id": f"lk-{uid}-from", "credit_account_id": f"lk-{uid}-to",
                    "amount": 5}  # fmt: skip
            response = await client.post("/v1/transfers", json=body)
            elapsed = time.monotonic() - started
        finally:
            await holder.close()
        assert response.status_code == 503 and response.json()["code"] == "lock_timeout", response.text
        # The group's 250 ms, then alone the service's 2 s (LEDGER_LOCK_TIMEOUT_MS).
        assert elapsed < 6, elapsed
        assert (await client.post("/v1/transfers", json=body)).status_code == 201


def test_migrations_run_through_pgbouncer_from_an_empty_database(
    bouncer: PgBouncer, postgres_server_url: str, ledger_database: provision.LedgerDatabase
) -> None:
    """Every migration, on a fresh database, through PgBouncer in transaction mode with
    the setting (no separate direct URL is needed for them)."""
    url = provision.create_database(postgres_server_url, prefix="ledger_pooled")
    try:
        owner = urlsplit(ledger_database.owner_url).username
        assert owner
        through = bouncer.url(owner, database=urlsplit(url).path.lstrip("/"))
        migrate.upgrade(through, pooler="transaction")
        migrate.upgrade(through, pooler="transaction")  # at head: nothing to do, no error

        async def revision() -> str:
            connection = await asyncpg.connect(url)
            try:
                return str(await connection.fetchval("SELECT version_num FROM alembic_version"))
            finally:
                await connection.close()

        assert asyncio.run(revision()) == migrate.head_revision()
    finally:
        provision.drop_database(postgres_server_url, url)


async def test_without_the_setting_the_same_pgbouncer_breaks_the_service(
    ledger_database: provision.LedgerDatabase, engine: AsyncEngine, tmp_path: Path, uid: str
) -> None:
    """The teeth: the same PgBouncer, told to drop the session settings it would refuse,
    and the service with LEDGER_DATABASE_POOLER=none: under the same load requests fail
    or named prepared statements are left behind on the server connections (asyncpg's
    statement cache), which the check above would catch."""
    with _bouncer(ledger_database, tmp_path / "pgbouncer", ignore_startup_parameters=SESSION_SETTINGS) as bouncer:
        environment = _environment(ledger_database, bouncer, tmp_path, "none")
        with serving_process(tmp_path, environment, check_errors=False) as (url, log_path):
            failed = ""
            try:
                report = await run_bank_scenario(url, engine, prefix=f"teeth-{uid}", clients=32, transfers=400)
                failed = "\n".join(await find_violations(report, engine))
            except (AssertionError, httpx.HTTPError) as error:
                failed = repr(error)
            service = urlsplit(ledger_database.service_url).username
            assert service
            try:
                prepared = sum(row["prepared"] for row in await server_sessions(bouncer, service))
            except (asyncpg.PostgresError, AssertionError) as error:
                prepared, failed = 0, failed + repr(error)
        log = log_path.read_text()
    broke = "PreparedStatement" in log or "prepared statement" in log
    assert failed or prepared or broke, (
        "the service without the setting worked through PgBouncer: the test has no teeth"
    )
    print(f"\nwithout the setting: {prepared} named statements left; failures: {failed[:300]!r}; log says so: {broke}")
