"""The engine, its pool, and the database URL forms the service accepts."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

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
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        query.append(("ssl" if key == "sslmode" else key, value))
    return urlunsplit((scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))


def libpq_url(url: str) -> str:
    """The plain `postgresql://` form, for psql, pgbench and other libpq tools."""
    parts = urlsplit(normalize_database_url(url))
    query = [("sslmode" if key == "ssl" else key, value) for key, value in parse_qsl(parts.query)]
    return urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(query), parts.fragment))


def server_settings(settings: Settings) -> dict[str, str]:
    """Per-connection PostgreSQL settings: nothing the service runs may wait forever."""
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
    }


def create_engine(settings: Settings, url: str | None = None) -> AsyncEngine:
    """Create the engine with every pool option passed explicitly from settings."""
    database_url = url or settings.database_url
    if not database_url:
        raise DatabaseUrlError("no database URL: set LEDGER_DATABASE_URL or use `ledger serve` for the embedded one")
    return create_async_engine(
        normalize_database_url(database_url),
        pool_size=settings.pool_size,
        max_overflow=settings.max_overflow,
        pool_timeout=settings.pool_timeout_seconds,
        pool_recycle=settings.pool_recycle_seconds,
        pool_pre_ping=settings.pool_pre_ping,
        connect_args={
            "server_settings": server_settings(settings),
            # A connection attempt to a dead host must not hang a request either.
            "timeout": settings.pool_timeout_seconds,
        },
    )


def create_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    # expire_on_commit=False: results read inside a transaction stay usable after COMMIT,
    # when the handler encodes them.
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)
