"""API keys and roles: every endpoint against {no key, unknown key, poster, auditor,
admin}, with the exact status of each cell. In a database of its own, because once a key
exists the service requires one."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator

import pytest
from litestar.testing import AsyncTestClient

from ledger import migrate
from ledger.database import create_engine
from ledger.http.app import create_app
from ledger.service.keys import KeyRing, create_key
from ledger.settings import Settings
from tests import provision
from tests.conftest import REPOSITORY

ADMIN_KEY = "lk_test-admin-key-for-the-role-matrix-0123456789"


@pytest.fixture(scope="module")
def auth_database(postgres_server_url: str) -> Iterator[str]:
    with provision.migrated_database(postgres_server_url, "ledger_auth") as url:
        yield url


@pytest.fixture(scope="module")
async def keys(auth_database: str) -> dict[str, str]:
    engine = create_engine(Settings(database_url=auth_database))
    try:
        return {role: (await create_key(engine, role, f"{role} for tests"))[1] for role in ("poster", "auditor")}
    finally:
        await engine.dispose()


@pytest.fixture(scope="module")
async def auth_client(auth_database: str, keys: dict[str, str]) -> AsyncIterator[AsyncTestClient]:
    settings = Settings(database_url=auth_database, admin_key=ADMIN_KEY)
    async with AsyncTestClient(create_app(settings)) as client:
        yield client


CREDENTIALS = ("none", "unknown", "poster", "auditor", "admin")


def headers(credential: str, keys: dict[str, str]) -> dict[str, str]:
    if credential == "none":
        return {}
    key = {"unknown": "lk_not-a-key", "admin": ADMIN_KEY}.get(credential) or keys[credential]
    return {"Authorization": f"Bearer {key}"}


async def test_every_endpoint_against_every_role(auth_client: AsyncTestClient, keys: dict[str, str]) -> None:
    admin = headers("admin", keys)
    await auth_client.post(
        "/v1/accounts", json={"id": "m-bank", "currency": "EUR", "allow_negative_balance": True}, headers=admin
    )
    await auth_client.post("/v1/accounts", json={"id": "m-user", "currency": "EUR"}, headers=admin)
    await auth_client.post(
        "/v1/transfers",
        json={"id": "m-seed", "debit_account_id": "m-bank", "credit_account_id": "m-user", "amount": 10_000},
        headers=admin,
    )
    counter = iter(range(1_000_000))

    def fresh() -> str:
        return f"m{next(counter)}"

    # (method, path or path factory, body factory, status when allowed, roles allowed)
    moving = ("poster", "admin")
    reading = ("poster", "auditor", "admin")
    endpoints = [
        ("POST", lambda: "/v1/accounts", lambda: {"id": fresh(), "currency": "EUR"}, 201, moving),
        ("GET", lambda: "/v1/accounts", None, 200, reading),
        ("GET", lambda: "/v1/accounts/m-user", None, 200, reading),
        ("GET", lambda: "/v1/accounts/m-user/entries", None, 200, reading),
        ("GET", lambda: "/v1/accounts/m-user/balance", None, 200, reading),
        (
            "POST",
            lambda: "/v1/transfers",
            lambda: {"id": fresh(), "debit_account_id": "m-user", "credit_account_id": "m-bank", "amount": 1},
            201,
            moving,
        ),
        (
            "POST",
            lambda: "/v1/transfers/batch",
            lambda: {
                "transfers": [{"id": fresh(), "debit_account_id": "m-user", "credit_account_id": "m-bank", "amount": 1}]
            },
            200,
            moving,
        ),
        ("GET", lambda: "/v1/transfers", None, 200, reading),
        ("GET", lambda: "/v1/transfers/m-seed", None, 200, reading),
        ("POST", lambda: "/v1/transfers/m-seed/post", lambda: {}, 409, moving),
        ("POST", lambda: "/v1/transfers/m-seed/void", lambda: {}, 409, moving),
        ("POST", lambda: "/v1/transfers/m-seed/reverse", lambda: {"id": fresh(), "amount": 1}, 201, moving),
        ("GET", lambda: "/v1/balances", None, 200, reading),
        ("POST", lambda: "/v1/audit/verify", lambda: {}, 200, ("auditor", "admin")),
    ]
    failures = []
    for method, path, body, allowed_status, allowed in endpoints:
        for credential in CREDENTIALS:
            expected = 401 if credential in ("none", "unknown") else (allowed_status if credential in allowed else 403)
            kwargs = {"headers": headers(credential, keys)}
            if body is not None:
                kwargs["json"] = body()
            response = await auth_client.request(method, path(), **kwargs)
            if response.status_code != expected:
                failures.append((method, path(), credential, expected, response.status_code, response.text[:120]))
            elif expected in (401, 403):
                problem = response.json()
                assert problem["code"] == ("unauthenticated" if expected == 401 else "forbidden")
                if expected == 401:
                    assert response.headers["www-authenticate"].startswith("Bearer")
    assert failures == []

    for open_path in ("/health/live", "/metrics", "/schema/openapi.json"):
        assert (await auth_client.get(open_path)).status_code == 200


def test_keys_are_created_by_the_cli_shown_once_and_stored_as_hashes(auth_database: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ledger", "keys", "create", "--role", "auditor", "--name", "cli"],
        env={**os.environ, "LEDGER_DATABASE_URL": auth_database},
        capture_output=True,
        text=True,
        cwd=REPOSITORY,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert key.startswith("lk_") and len(key) > 40
    assert key not in result.stderr

    import asyncio

    from sqlalchemy import text

    async def stored() -> list:
        engine = create_engine(Settings(database_url=auth_database))
        try:
            async with engine.connect() as connection:
                return (await connection.execute(text("SELECT role, key_hash FROM api_keys WHERE name = 'cli'"))).all()
        finally:
            await engine.dispose()

    rows = asyncio.run(stored())
    assert [row.role for row in rows] == ["auditor"] and len(rows[0].key_hash) == 32
    assert key.encode() not in rows[0].key_hash


async def test_keys_created_while_serving_work_at_once_and_switch_authentication_on(postgres_server_url: str) -> None:
    """A service started with no key configured serves everyone; once a key is created
    (by another process), requests without a key are 401 within 0.1 s, and the new key
    works on its first use."""
    url = await asyncio.to_thread(provision.create_database, postgres_server_url, "ledger_auth_late")
    try:
        await asyncio.to_thread(migrate.upgrade, url)
        async with AsyncTestClient(create_app(Settings(database_url=url))) as client:
            assert (await client.get("/v1/accounts")).status_code == 200
            engine = create_engine(Settings(database_url=url))
            try:
                _, key = await create_key(engine, "auditor")
            finally:
                await engine.dispose()
            # Without a known key, a process looks for one at most every MISS_RELOAD_SECONDS.
            await asyncio.sleep(KeyRing.MISS_RELOAD_SECONDS * 1.5)
            assert (await client.get("/v1/accounts")).status_code == 401
            assert (await client.get("/v1/accounts", headers={"Authorization": f"Bearer {key}"})).status_code == 200
            forbidden = await client.post(
                "/v1/accounts", json={"currency": "EUR"}, headers={"Authorization": f"Bearer {key}"}
            )
            assert forbidden.status_code == 403
    finally:
        await asyncio.to_thread(provision.drop_database, postgres_server_url, url)
