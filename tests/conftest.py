"""Shared fixtures: a real PostgreSQL (see tests/provision.py), a migrated database for
the session, the app in-process, and a real server process for end-to-end tests."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger import migrate
from ledger.database import create_engine
from ledger.http.app import create_app
from ledger.settings import Settings
from tests import provision
from tests.watchdog import Watchdog

REPOSITORY = Path(__file__).resolve().parent.parent
WATCHDOG = Watchdog()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """A hung test stops the run with every stack printed (tests/watchdog.py)."""
    capture = item.config.pluginmanager.getplugin("capturemanager")
    timer = WATCHDOG.start(item.nodeid, capture.global_and_fixture_disabled if capture is not None else None)
    try:
        yield
    finally:
        timer.cancel()


@pytest.fixture(scope="session")
def postgres_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with provision.postgres_server(tmp_path_factory.mktemp("embedded-postgres")) as (url, source):
        print(f"\ntests use PostgreSQL from {source}", file=sys.stderr)
        yield url


@pytest.fixture(scope="session")
def service_login(postgres_server_url: str) -> Iterator[tuple[str, str]]:
    """The session's serving role: a login that is only a member of ledger_service."""
    role, password = provision.create_service_login(postgres_server_url)
    yield role, password
    provision.drop_service_login(postgres_server_url, role)


@pytest.fixture(scope="session")
def ledger_database(postgres_server_url: str, service_login: tuple[str, str]) -> Iterator[provision.LedgerDatabase]:
    """A fresh database for this test session, migrated to head by its owner."""
    url = provision.create_database(postgres_server_url)
    migrate.upgrade(url)
    yield provision.LedgerDatabase(url, provision.as_role(url, *service_login))
    provision.drop_database(postgres_server_url, url)


@pytest.fixture(scope="session")
def database_url(ledger_database: provision.LedgerDatabase) -> str:
    """The session database as its owner: for checking, or tampering with, what the
    service wrote."""
    return ledger_database.owner_url


@pytest.fixture(scope="session")
def service_database_url(ledger_database: provision.LedgerDatabase) -> str:
    """The session database as the serving role."""
    return ledger_database.service_url


@pytest.fixture(scope="session")
def settings(service_database_url: str) -> Settings:
    return provision.settings_for(service_database_url, pool_size=20, max_overflow=10, retry_after_seconds=1)


@pytest.fixture(scope="session")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """Direct database access as the owner, for checking what the service wrote."""
    engine = create_engine(Settings(database_url=database_url))
    yield engine
    await engine.dispose()


def authorized(client: AsyncTestClient) -> AsyncTestClient:
    """Every request of `client` carries the session's admin key."""
    client.headers.update(provision.API_HEADERS)
    return client


@pytest.fixture(scope="session")
async def client(settings: Settings) -> AsyncIterator[AsyncTestClient]:
    """The app in-process (lifespan included), for integration tests over HTTP semantics,
    with the admin key."""
    async with AsyncTestClient(create_app(settings)) as client:
        yield authorized(client)


@pytest.fixture(scope="session")
def api_headers() -> dict[str, str]:
    """What a client of a real server sends: the admin key."""
    return dict(provision.API_HEADERS)


@pytest.fixture
def uid() -> str:
    """A prefix unique to the test, so tests share the database without sharing rows."""
    return secrets.token_hex(4)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def server_url(server: tuple[str, Path]) -> str:
    return server[0]


@contextmanager
def serving_process(
    directory: Path, environment: dict[str, str], *arguments: str, check_errors: bool = True
) -> Iterator[tuple[str, Path]]:
    """A real `ledger serve` process with these LEDGER_* variables, ready: (URL, log file).
    On exit it is stopped with SIGTERM (it must stop within 20 s) and, with
    `check_errors`, its log must hold no error."""
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "ledger", "serve", "--port", str(port), *arguments],
            env={**os.environ, **environment},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPOSITORY,
        )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"ledger serve exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(f"{base_url}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"ledger serve did not become ready:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield base_url, log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail("ledger serve did not stop within 20 s of SIGTERM")
    if check_errors:
        output = log_path.read_text()
        assert '"level":"error"' not in output, f"the server logged an error:\n{output[-5000:]}"


@pytest.fixture(scope="session")
def server(
    ledger_database: provision.LedgerDatabase, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """A real `ledger serve` process over HTTP, on the session's database: (URL, log file)."""
    directory = tmp_path_factory.mktemp("server")
    environment = {
        **provision.server_environment(ledger_database, directory / "data"),
        "LEDGER_POOL_SIZE": "30",
        "LEDGER_MAX_OVERFLOW": "10",
        "LEDGER_LOG_LEVEL": "info",
        # Tests write to the shared database as its owner behind the service's back (a
        # race for an id held open, tampering); a periodic checkpoint falling in such a
        # window rightly logs "may have been tampered with", an error for this fixture.
        # Checkpoints are tested on services of their own.
        "LEDGER_CHECKPOINT_INTERVAL_SECONDS": "0",
    }
    with serving_process(directory, environment) as running:
        yield running
