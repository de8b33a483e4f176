"""The engine, its pool, and the database URL forms the service accepts."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from ledger.settings import Settings

_SCHEMES = {
    "postgres": "postgresql+asyncpg",
    "postgresql": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
}


class DatabaseUrlError(ValueError):
    """LEDGER_DATABASE_URL is not a PostgreSQL URL the service can use."""


def normalize_database_url(url: str) -> str:
    """Return the SQLAlchemy asyncpg form of a PostgreSQL URL.

    Operators paste the libpq form (`postgresql://user:pass@host:5432/db?sslmode=require`);
    SQLAlchemy needs the driver in the scheme and asyncpg spells `sslmode` as `ssl`.
    """
    parts = urlsplit(url.strip())
    scheme = _SCHEMES.get(parts.scheme.lower())
    if scheme is None:
        raise DatabaseUrlError(
            f"LEDGER_DATABASE_URL must start with postgresql://, postgres:// or postgresql+asyncpg://, got {parts.scheme!r}://"
        )
    query = []
    netloc = parts.netloc
    userinfo, at, hosts = netloc.rpartition("@")
    if "," in hosts:
        # libpq's multi-host form (`@db1:5432,db2:5432/ledger?target_session_attrs=
        # read-write`, how a client follows a failover to whichever server takes
        # writes): SQLAlchemy spells it as repeated `host=` parameters, which asyncpg
        # tries in order.
        query += [("host", host) for host in hosts.split(",") if host]
        netloc = f"{userinfo}{at}"
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        query.append(("ssl" if key == "sslmode" else key, value))
    return urlunsplit((scheme, netloc, parts.path, urlencode(query), parts.fragment))


def libpq_url(url: str) -> str:
    """The plain `postgresql://` form, for psql, pgbench and other libpq tools."""
    parts = urlsplit(normalize_database_url(url))
    pairs = parse_qsl(parts.query)
    hosts = [value for key, value in pairs if key == "host"]
    netloc = parts.netloc + ",".join(hosts) if len(hosts) > 1 else parts.netloc
    query = [
        ("sslmode" if key == "ssl" else key, value) for key, value in pairs if not (key == "host" and len(hosts) > 1)
    ]
    return urlunsplit(("postgresql", netloc, parts.path, urlencode(query), parts.fragment))


def server_settings(settings: Settings) -> dict[str, str]:
    """Per-connection PostgreSQL settings: nothing the service runs may wait forever.

    Behind a transaction pooler only what the pooler itself tracks and restores on every
    server session it hands over: PgBouncer (1.18) refuses any other startup parameter
    ("unsupported startup parameter"), or with `ignore_startup_parameters` drops it
    silently. The limits then come with every transaction instead (`transaction_settings`).
    """
    if settings.database_pooler == "transaction":
        return {"application_name": "ledger", "timezone": "UTC"}
    return {
        "application_name": "ledger",
        "lock_timeout": str(settings.lock_timeout_ms),
        "statement_timeout": str(settings.statement_timeout_ms),
        "idle_in_transaction_session_timeout": str(settings.idle_in_transaction_timeout_ms),
        # Timestamps leave the database in UTC whatever the server's default is.
        "timezone": "UTC",
        # Every statement the service prepares is a short index lookup or write whose best
        # plan does not depend on its parameters; planning each execution again (the
        # default for the first five, and whenever a custom plan looks cheaper) cost a
        # quarter of PostgreSQL's CPU per transfer (0.83 -> 0.62 ms, loadtest/README.md).
        "plan_cache_mode": "force_generic_plan",
        # No statement of the service is long enough to gain from JIT compilation, and a
        # generic plan over tables without statistics yet (a history just imported, a
        # server without autovacuum) can look expensive enough to trigger it: verification
        # paged at 0.5-1 s per page of 500 transfers, compiling each, against 15-50 ms
        # without (seen importing 100,000 transfers, tests/e2e/test_import.py).
        "jit": "off",
    }


def transaction_settings(settings: Settings) -> str:
    """The limits of `server_settings` as `SET LOCAL` statements, for a transaction pooler.

    Not `plan_cache_mode`: without named statements nothing is planned twice anyway.
    """
    return (
        f"SET LOCAL lock_timeout = {settings.lock_timeout_ms:d}; "
        f"SET LOCAL statement_timeout = {settings.statement_timeout_ms:d}; "
        f"SET LOCAL idle_in_transaction_session_timeout = {settings.idle_in_transaction_timeout_ms:d}"
    )


def with_transaction_settings(begin: str, settings_sql: str) -> str:
    """`BEGIN ...; <settings>; <whatever followed the BEGIN>`: the settings come first, so
    that a `SET LOCAL` the caller sends with its BEGIN (a group's shorter lock timeout)
    still wins."""
    head, _, rest = begin.partition(";")
    return f"{head}; {settings_sql}" + (f"; {rest.strip()}" if rest.strip() else "")


class TransactionPooledConnection(asyncpg.Connection):
    """An asyncpg connection for a pooler in transaction mode: every transaction the
    service starts, through SQLAlchemy (asyncpg's `Transaction.start`) or on the driver
    (`BEGIN` in ledger.service.groups), carries the session's limits as `SET LOCAL`s in
    the same simple-query message as its BEGIN: no extra round trip, and they hold on
    whichever server session the pooler picked. Subclassed per engine with the text."""

    transaction_settings_sql = ""

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:  # noqa: ASYNC109 (asyncpg's signature)
        if not args and query.lstrip()[:5].upper() == "BEGIN":
            query = with_transaction_settings(query, self.transaction_settings_sql)
        return await super().execute(query, *args, timeout=timeout)


def driver_arguments(settings: Settings) -> dict[str, Any]:
    """asyncpg's (and SQLAlchemy's asyncpg dialect's) connect arguments.

    With `LEDGER_DATABASE_POOLER=transaction` no named prepared statement is ever made: a
    pooler in transaction mode runs a client's next transaction on any server session,
    where the client's named statements do not exist, or another client's of the same
    name do (PgBouncer 1.18 has no prepared-statement support). asyncpg then uses the
    unnamed statement (`statement_cache_size=0`; SQLAlchemy's cache off and its names
    empty: `Connection.prepare(name="")` is the unnamed statement), and parses it again
    with each Bind, in the same message as the Execute, so that a statement run outside a
    transaction cannot be split across two server sessions either. Every statement then
    costs a Parse round trip more (its Describe); the hot path's group transaction goes
    from four round trips to six.
    """
    arguments: dict[str, Any] = {
        "server_settings": server_settings(settings),
        # A connection attempt to a dead host must not hang a request either.
        "timeout": settings.pool_timeout_seconds,
    }
    if settings.database_pooler == "transaction":
        arguments.update(
            unnamed_statement_arguments(),
            connection_class=type(
                "TransactionPooledConnection",
                (TransactionPooledConnection,),
                {"transaction_settings_sql": transaction_settings(settings)},
            ),
        )
    return arguments


def unnamed_statement_arguments() -> dict[str, Any]:
    """Connect arguments for asyncpg under SQLAlchemy that make no named prepared
    statement (see `driver_arguments`)."""
    return {"statement_cache_size": 0, "prepared_statement_cache_size": 0, "prepared_statement_name_func": _unnamed}


def _unnamed() -> str:
    return ""


def create_engine(
    settings: Settings,
    url: str | None = None,
    *,
    pool_size: int | None = None,
    max_overflow: int | None = None,
    pre_ping: bool | None = None,
) -> AsyncEngine:
    """Create the engine with every pool option passed explicitly from settings."""
    database_url = url or settings.database_url
    if not database_url:
        raise DatabaseUrlError("no database URL: set LEDGER_DATABASE_URL or use `ledger serve` for the embedded one")
    return create_async_engine(
        normalize_database_url(database_url),
        pool_size=settings.pool_size if pool_size is None else pool_size,
        max_overflow=settings.max_overflow if max_overflow is None else max_overflow,
        pool_timeout=settings.pool_timeout_seconds,
        pool_recycle=settings.pool_recycle_seconds,
        pool_pre_ping=settings.pool_pre_ping if pre_ping is None else pre_ping,
        # Statement parameters are amounts, ids and metadata: they stay out of error
        # messages, and so out of logs.
        hide_parameters=True,
        connect_args=driver_arguments(settings),
    )


def create_audit_engine(settings: Settings, url: str | None = None) -> AsyncEngine:
    """The small pool of audits and exports, apart from the one transfers use. Its
    connections are tested before use: audits are rare next to transfers, so the round
    trip costs nothing that matters, and they do not go through the unit of work, which
    is what re-runs transfers on a connection found dead after a database restart."""
    return create_engine(settings, url, pool_size=settings.audit_pool_size, max_overflow=0, pre_ping=True)


@dataclass(frozen=True)
class ListenTarget:
    """Where and how the event feed opens the one connection it LISTENs on
    (ledger.service.events). LISTEN is session state: through a pooler in transaction mode
    it would be lost, so there the feed needs `LEDGER_EVENTS_LISTEN_DATABASE_URL` (a
    direct URL), or does without (its tick wakes long-polls)."""

    dsn: str
    arguments: dict[str, Any]


LISTEN_APPLICATION_NAME = "ledger-events"


def listen_target(settings: Settings) -> ListenTarget | None:
    url = settings.events_listen_database_url
    if url is None and settings.database_pooler == "none":
        url = settings.database_url
    if not url:
        return None
    # asyncpg takes libpq's form itself, multi-host failover lists included.
    arguments = driver_arguments(replace(settings, database_pooler="none"))
    # Named apart from the pool's sessions in pg_stat_activity: an idle session that lives
    # as long as the process, which an operator should not take for a leak.
    arguments["server_settings"] = {**arguments["server_settings"], "application_name": LISTEN_APPLICATION_NAME}
    return ListenTarget(libpq_url(url), arguments)


@contextlib.asynccontextmanager
async def listen_connection(target: ListenTarget) -> AsyncIterator[asyncpg.Connection]:
    """A connection of its own, outside any pool. It is never reused: at the end, lost or
    not, it is terminated (the socket closed, no goodbye awaited). Returning it to a pool
    after its session was terminated made the pool's reset run on a dead protocol and log
    asyncpg's "cannot switch to state"; a graceful close waits on a server that may be
    gone. Its session state, the LISTEN, dies with it either way."""
    connection = await asyncpg.connect(target.dsn, **target.arguments)
    try:
        yield connection
    finally:
        connection.terminate()


def create_replica_engine(settings: Settings) -> AsyncEngine | None:
    """The streaming replica's pool (LEDGER_REPLICA_DATABASE_URL), or None without one
    (ledger.service.replica). Small and tested before use, like the audit pool; and it
    gives up fast, both connecting and waiting for a free connection
    (LEDGER_REPLICA_CONNECT_TIMEOUT_SECONDS instead of the pool timeout): a replica that
    is down or busy sends the read to the primary instead of holding the request."""
    if not settings.replica_database_url:
        return None
    impatient = replace(settings, pool_timeout_seconds=settings.replica_connect_timeout_seconds)
    return create_engine(
        impatient, settings.replica_database_url, pool_size=settings.replica_pool_size, max_overflow=0, pre_ping=True
    )


# -- the serving role -----------------------------------------------------------------
#
# The service serves as a member of `ledger_service` (granted by the migrations): what it
# must be able to do, and what it must not (README, "Database roles").
SERVICE_ROLE = "ledger_service"
LEDGER_TABLES = ("accounts", "transfers", "entries", "api_keys", "account_changes")
REQUIRED_PRIVILEGES = [
    ("alembic_version", "SELECT"),
    *((table, privilege) for table in LEDGER_TABLES for privilege in ("SELECT", "INSERT")),
]
REQUIRED_UPDATES = {
    "accounts": (
        "debits_posted", "credits_posted", "pending_debits", "pending_credits", "entries_count", "last_entry_hash",
        "last_entry_at",
        # Account controls (PATCH /v1/accounts/{id}): each change is sealed anew and kept
        # in the append-only account_changes, which verification folds and compares.
        "status", "overdraft_limit", "max_balance", "name", "metadata", "seal", "seal_key",
    ),
    "transfers": ("status", "posted_amount", "reversed_amount", "updated_at", "seal", "seal_key"),
    "api_keys": ("revoked_at", "revoked_by"),
}  # fmt: skip
FORBIDDEN_PRIVILEGES = [
    *((table, privilege) for table in LEDGER_TABLES for privilege in ("DELETE", "TRUNCATE", "TRIGGER")),
]
FORBIDDEN_UPDATES = {
    "entries": ("account_id", "sequence", "transfer_id", "amount", "balance_after", "created_at", "hash", "key_id"),
    "accounts": ("id", "currency", "allow_negative_balance", "created_at"),
    "account_changes": (
        "account_id", "sequence", "changed_at", "changed_by", "before", "after", "state", "hash", "key_id",
    ),
    "transfers": (
        "id", "debit_account_id", "credit_account_id", "amount", "currency", "pending", "code", "description",
        "metadata", "request_hash", "created_at", "timeout_seconds", "expires_at", "reversal_of", "missing_account",
        "imported_at",
    ),
    "api_keys": ("id", "role", "key_hash", "created_at", "created_by", "seal", "seal_key"),
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class RoleReport:
    role: str
    # Why the role is more powerful than serving needs (superuser, owner, DDL, DELETE...).
    privileged: list[str]
    # What it lacks to serve (the migrations' grants are missing).
    missing: list[str]


async def inspect_serving_role(connection: AsyncConnection) -> RoleReport:
    """Compare the connected role's privileges with what serving needs, in one query."""
    checks: dict[str, str] = {
        "superuser": "r.rolsuper",
        "CREATEROLE (it can grant itself any role)": "r.rolcreaterole",
        "owner (or member of the owner) of the ledger's tables": (
            "EXISTS (SELECT 1 FROM pg_class c WHERE c.relnamespace = current_schema()::regnamespace "
            f"AND c.relname IN ({', '.join(repr(t) for t in LEDGER_TABLES)}) "
            "AND pg_has_role(current_user, c.relowner, 'MEMBER'))"
        ),
        "CREATE on the schema (DDL)": "has_schema_privilege(current_schema(), 'CREATE')",
        "CREATE on the database (new schemas)": "has_database_privilege(current_database(), 'CREATE')",
    }
    for table, privilege in FORBIDDEN_PRIVILEGES:
        checks[f"{privilege} on {table}"] = f"has_table_privilege('{table}', '{privilege}')"
    for table, columns in FORBIDDEN_UPDATES.items():
        for column in columns:
            checks[f"UPDATE of {table}.{column}"] = f"has_column_privilege('{table}', '{column}', 'UPDATE')"
    needs: dict[str, str] = {}
    for table, privilege in REQUIRED_PRIVILEGES:
        needs[f"{privilege} on {table}"] = f"has_table_privilege('{table}', '{privilege}')"
    for table, columns in REQUIRED_UPDATES.items():
        for column in columns:
            needs[f"UPDATE of {table}.{column}"] = f"has_column_privilege('{table}', '{column}', 'UPDATE')"
    expressions = [*checks.values(), *needs.values()]
    query = f"SELECT current_user, {', '.join(expressions)} FROM pg_roles r WHERE r.rolname = current_user"
    row = (await connection.execute(text(query))).one()
    values = list(row[1:])
    privileged = [name for name, value in zip(checks, values[: len(checks)], strict=True) if value]
    missing = [name for name, value in zip(needs, values[len(checks) :], strict=True) if not value]
    return RoleReport(str(row[0]), privileged, missing)


def create_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    # expire_on_commit=False: results read inside a transaction stay usable after COMMIT,
    # when the handler encodes them.
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)
