"""API keys and roles: every endpoint against {no key, garbage, revoked, poster, auditor,
admin}, authentication that fails closed in every configuration, keys managed over HTTP
and from the CLI, and key rows the service did not write authenticating nobody. In a
database of its own, because it creates and revokes keys."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.database import create_engine
from ledger.http.app import create_app
from ledger.service.keys import CACHE_SECONDS, create_key
from ledger.settings import Settings
from tests import provision
from tests.conftest import REPOSITORY
from tests.integration.helpers import assert_problem


@pytest.fixture(scope="module")
def auth_database(postgres_server_url: str, service_login: tuple[str, str]) -> Iterator[provision.LedgerDatabase]:
    with provision.migrated_database(postgres_server_url, "ledger_auth", service_login) as database:
        yield database


@pytest.fixture(scope="module")
async def owner(auth_database: provision.LedgerDatabase) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(Settings(database_url=auth_database.owner_url))
    yield engine
    await engine.dispose()


@pytest.fixture(scope="module")
async def keys(auth_database: provision.LedgerDatabase) -> dict[str, str]:
    engine = create_engine(Settings(database_url=auth_database.service_url))
    try:
        made = {}
        for role in ("poster", "auditor", "admin"):
            made[role] = (await create_key(engine, provision.KEYRING.active, role, f"{role} for tests"))[1]
        record, made["revoked"] = await create_key(engine, provision.KEYRING.active, "admin", "revoked")
        async with engine.begin() as connection:
            await connection.execute(text("UPDATE api_keys SET revoked_at = now() WHERE id = :id"), {"id": record.id})
        return made
    finally:
        await engine.dispose()


@pytest.fixture(scope="module")
async def auth_client(auth_database: provision.LedgerDatabase, keys: dict[str, str]) -> AsyncIterator[AsyncTestClient]:
    # No LEDGER_ADMIN_KEY: every key here is a stored one.
    settings = provision.settings_for(auth_database.service_url, admin_key=None)
    async with AsyncTestClient(create_app(settings)) as client:
        yield client


@contextmanager
def captured(logger_name: str) -> Iterator[list[logging.LogRecord]]:
    """The records one logger emits (whatever the logging configuration propagates)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


CREDENTIALS = ("none", "garbage", "revoked", "poster", "auditor", "admin")
UNAUTHENTICATED = ("none", "garbage", "revoked")


def headers(credential: str, keys: dict[str, str]) -> dict[str, str]:
    if credential == "none":
        return {}
    key = "lk_not-a-key-at-all-but-long-enough" if credential == "garbage" else keys[credential]
    return {"Authorization": f"Bearer {key}"}


async def test_every_endpoint_against_every_credential(auth_client: AsyncTestClient, keys: dict[str, str]) -> None:
    """Each cell of the role table (ledger/http/auth.py) with its exact status: a missing,
    garbage or revoked key is 401 with a Bearer challenge, a wrong role 403, the right
    role gets the endpoint's own answer. Opening an account that may go negative is
    admin-only: a poster could otherwise mint money."""
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
        (
            "POST",
            lambda: "/v1/accounts",
            lambda: {"id": fresh(), "currency": "EUR", "allow_negative_balance": True},
            201,
            ("admin",),
        ),
        # An overdraft lets money out of an account that holds none: admin only, like
        # allow_negative_balance; a cap and a zero overdraft are anyone's who may open one.
        (
            "POST",
            lambda: "/v1/accounts",
            lambda: {"id": fresh(), "currency": "EUR", "overdraft_limit": 1},
            201,
            ("admin",),
        ),
        (
            "POST",
            lambda: "/v1/accounts",
            lambda: {"id": fresh(), "currency": "EUR", "overdraft_limit": 0, "max_balance": 10},
            201,
            moving,
        ),
        ("PATCH", lambda: "/v1/accounts/m-user", lambda: {"name": fresh()}, 200, ("admin",)),
        ("GET", lambda: "/v1/accounts/m-user/changes", None, 200, reading),
        (
            "POST",
            lambda: "/v1/transfers",
            lambda: {
                "id": fresh(),
                "debit_account_id": "m-user",
                "credit_account_id": "m-bank",
                "amount": 1,
                "imported_at": "2020-01-01T00:00:00Z",
            },
            422,  # an admin may import; this one is older than m-user's journal: imported_at_out_of_order
            ("admin",),
        ),
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
        ("GET", lambda: "/v1/balances/aggregate?currency=EUR&metadata[tier]=gold", None, 200, reading),
        ("POST", lambda: "/v1/audit/verify", lambda: {}, 200, ("auditor", "admin")),
        ("GET", lambda: "/v1/keys", None, 200, ("admin",)),
        ("POST", lambda: "/v1/keys", lambda: {"role": "auditor", "name": "matrix"}, 201, ("admin",)),
        ("DELETE", lambda: "/v1/keys/key_0000000000000000", None, 404, ("admin",)),
        ("GET", lambda: "/v1/events", None, 200, reading),
        ("GET", lambda: "/v1/webhooks", None, 200, ("admin",)),
        ("POST", lambda: "/v1/webhooks", lambda: {"url": "http://127.0.0.1:9/matrix"}, 201, ("admin",)),
        ("GET", lambda: "/v1/webhooks/wh_000000000000000000000000", None, 404, ("admin",)),
        ("GET", lambda: "/v1/webhooks/wh_000000000000000000000000/deliveries", None, 404, ("admin",)),
        ("DELETE", lambda: "/v1/webhooks/wh_000000000000000000000000", None, 404, ("admin",)),
    ]
    failures = []
    for method, path, body, allowed_status, allowed in endpoints:
        for credential in CREDENTIALS:
            expected = 401 if credential in UNAUTHENTICATED else (allowed_status if credential in allowed else 403)
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


async def test_a_poster_cannot_mint_money(auth_client: AsyncTestClient, keys: dict[str, str]) -> None:
    """The attack: a poster opens an account that may go negative and sends 10^18 from it.
    The account is refused (403), nothing is stored, so the transfer finds no account."""
    poster = headers("poster", keys)
    opened = await auth_client.post(
        "/v1/accounts", json={"id": "mint", "currency": "EUR", "allow_negative_balance": True}, headers=poster
    )
    assert_problem(opened, 403, "forbidden")
    await auth_client.post("/v1/accounts", json={"id": "minter", "currency": "EUR"}, headers=poster)
    spent = await auth_client.post(
        "/v1/transfers",
        json={"id": "mint-1", "debit_account_id": "mint", "credit_account_id": "minter", "amount": 10**18},
        headers=poster,
    )
    assert_problem(spent, 404, "account_not_found")
    assert (await auth_client.get("/v1/accounts/mint", headers=poster)).status_code == 404
    assert (await auth_client.get("/v1/accounts/minter", headers=poster)).json()["balance"]["posted"] == 0


async def test_keys_are_managed_over_http_and_revocation_takes_effect_within_5_s(
    auth_client: AsyncTestClient, keys: dict[str, str]
) -> None:
    """An admin creates a key (shown once, `no-store`), lists keys (never the key nor its
    hash), and revokes it: the key works at once, and answers 401 once the cache has
    reloaded (CACHE_SECONDS = 5). Revoking again answers the same; unknown ids are 404."""
    admin = headers("admin", keys)
    created = await auth_client.post("/v1/keys", json={"role": "poster", "name": "checkout"}, headers=admin)
    assert created.status_code == 201 and created.headers["cache-control"] == "no-store"
    body = created.json()
    key, key_id = body["key"], body["id"]
    assert key.startswith("lk_") and body["role"] == "poster" and body["revoked_at"] is None
    new_key = {"Authorization": f"Bearer {key}"}
    assert (await auth_client.get("/v1/accounts", headers=new_key)).status_code == 200

    listed = (await auth_client.get("/v1/keys", headers=admin)).json()["data"]
    mine = [k for k in listed if k["id"] == key_id]
    assert mine and "key" not in mine[0] and key not in str(listed)
    assert mine[0]["created_by"] == next(k["id"] for k in listed if k["name"] == "admin for tests")

    revoked = await auth_client.delete(f"/v1/keys/{key_id}", headers=admin)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    again = await auth_client.delete(f"/v1/keys/{key_id}", headers=admin)
    assert again.json()["revoked_at"] == revoked.json()["revoked_at"]
    assert_problem(await auth_client.delete("/v1/keys/key_nope", headers=admin), 404, "key_not_found")

    deadline = asyncio.get_running_loop().time() + CACHE_SECONDS + 1
    while (await auth_client.get("/v1/accounts", headers=new_key)).status_code != 401:
        assert asyncio.get_running_loop().time() < deadline, "a revoked key still worked after 5 s"
        await asyncio.sleep(0.2)
    assert_problem(await auth_client.post("/v1/keys", json={"role": "root"}, headers=admin), 400, "validation_error")


async def test_a_key_row_written_behind_the_services_back_authenticates_nobody(
    auth_client: AsyncTestClient, owner: AsyncEngine
) -> None:
    """The database's owner inserts an admin key of their choosing, hash and all: it has
    no seal under the chain key, so the service ignores it (401). With a copied seal of
    another row it does not verify either (the seal covers the row's id and hash)."""
    chosen = "lk_chosen-by-the-attacker-0123456789abcdef"
    digest = hashlib.sha256(chosen.encode()).digest()
    async with owner.begin() as connection:
        await connection.execute(
            text("INSERT INTO api_keys (id, role, key_hash) VALUES ('key_forged', 'admin', :hash)"), {"hash": digest}
        )
        await connection.execute(
            text(
                "INSERT INTO api_keys (id, role, key_hash, seal, seal_key) SELECT 'key_copied', 'admin', :hash, "
                "seal, seal_key FROM api_keys WHERE role = 'admin' AND seal IS NOT NULL LIMIT 1"
            ),
            {"hash": hashlib.sha256(b"x" + chosen.encode()).digest()},
        )
    forged = {"Authorization": f"Bearer {chosen}"}
    assert_problem(await auth_client.get("/v1/accounts", headers=forged), 401, "unauthenticated")


@pytest.fixture
def fresh_database(postgres_server_url: str, service_login: tuple[str, str]) -> Iterator[provision.LedgerDatabase]:
    with provision.migrated_database(postgres_server_url, "ledger_fresh", service_login) as database:
        yield database


async def test_a_fresh_database_with_no_key_refuses_everyone(fresh_database: provision.LedgerDatabase) -> None:
    """Fail closed: an app on a database that has never had a key, without
    LEDGER_ADMIN_KEY, answers 401 to every request, with or without a made-up key."""
    settings = provision.settings_for(fresh_database.service_url, admin_key=None)
    async with AsyncTestClient(create_app(settings)) as client:
        assert_problem(await client.get("/v1/accounts"), 401, "unauthenticated")
        for attempt in ("Bearer ", "Bearer garbage", "Basic YWRtaW46YWRtaW4=", "bearer lk_whatever"):
            response = await client.post("/v1/accounts", json={"currency": "EUR"}, headers={"Authorization": attempt})
            assert_problem(response, 401, "unauthenticated")
        assert (await client.get("/health/ready")).status_code == 200


async def test_revoking_every_key_locks_everyone_out_also_after_a_restart(
    fresh_database: provision.LedgerDatabase,
) -> None:
    """During an incident every key is revoked: revoked keys are refused at once by a new
    process (a restart), and nobody is let in, with or without a key."""
    database = fresh_database
    engine = create_engine(Settings(database_url=database.service_url))
    try:
        _, key = await create_key(engine, provision.KEYRING.active, "admin")
        async with engine.begin() as connection:
            await connection.execute(text("UPDATE api_keys SET revoked_at = now(), revoked_by = 'incident'"))
    finally:
        await engine.dispose()
    settings = provision.settings_for(database.service_url, admin_key=None)
    async with AsyncTestClient(create_app(settings)) as client:  # the restart
        assert_problem(await client.get("/v1/accounts"), 401, "unauthenticated")
        revoked = {"Authorization": f"Bearer {key}"}
        assert_problem(await client.get("/v1/accounts", headers=revoked), 401, "unauthenticated")


async def test_the_insecure_development_setting_is_explicit_and_forms_still_cannot_post(
    service_database_url: str,
) -> None:
    """LEDGER_INSECURE_DISABLE_AUTH=true makes every caller admin and logs a warning at
    start. Even then a cross-site form (urlencoded, multipart, text/plain, with an empty
    body or not) cannot move money: every POST needs Content-Type: application/json."""
    settings = provision.settings_for(service_database_url, admin_key=None, insecure_disable_auth=True)
    with captured("ledger.app") as records:
        async with AsyncTestClient(create_app(settings)) as client:
            assert any("AUTHENTICATION IS DISABLED" in record.getMessage() for record in records)
            assert (await client.get("/v1/accounts")).status_code == 200
            opened = await client.post("/v1/accounts", json={"id": "insecure-bank", "currency": "EUR"})
            assert opened.status_code in (200, 201)
            for content_type, body in (
                ("application/x-www-form-urlencoded", b""),
                ("application/x-www-form-urlencoded", b"amount=100"),
                ("multipart/form-data; boundary=x", b"--x--"),
                ("text/plain", b'{"currency": "EUR"}'),
                (None, b""),
            ):
                headers = {"content-type": content_type} if content_type else {}
                for path in ("/v1/accounts", "/v1/transfers/anything/post", "/v1/transfers/anything/void"):
                    response = await client.post(path, content=body, headers=headers)
                    assert_problem(response, 415, "unsupported_media_type")


def test_keys_are_created_listed_and_revoked_by_the_cli_and_stored_as_sealed_hashes(
    auth_database: provision.LedgerDatabase,
) -> None:
    """`ledger keys create` prints the key once (stdout only), stores its SHA-256 and a
    seal; `ledger keys list` shows it without the key; `ledger keys revoke` revokes it."""
    environment = {
        **os.environ,
        **provision.server_environment(auth_database, provision.DATA_DIR / "cli-keys"),
    }

    def ledger(*arguments: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ledger", "keys", *arguments],
            env=environment,
            capture_output=True,
            text=True,
            cwd=REPOSITORY,
            timeout=60,
        )

    created = ledger("create", "--role", "auditor", "--name", "cli")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("lk_") and len(key) > 40 and key not in created.stderr

    async def stored() -> list:
        engine = create_engine(Settings(database_url=auth_database.owner_url))
        try:
            async with engine.connect() as connection:
                query = (
                    "SELECT id, role, key_hash, seal, seal_key, created_by, revoked_at FROM api_keys WHERE name = 'cli'"
                )
                return (await connection.execute(text(query))).all()
        finally:
            await engine.dispose()

    rows = asyncio.run(stored())
    assert [row.role for row in rows] == ["auditor"] and len(rows[0].key_hash) == 32
    assert key.encode() not in rows[0].key_hash and rows[0].key_hash == hashlib.sha256(key.encode()).digest()
    assert rows[0].seal is not None and rows[0].seal_key == provision.KEYRING.active.id
    assert rows[0].created_by == "cli"

    listed = ledger("list")
    assert listed.returncode == 0 and rows[0].id in listed.stdout and key not in listed.stdout
    revoked = ledger("revoke", rows[0].id)
    assert revoked.returncode == 0, revoked.stderr
    assert asyncio.run(stored())[0].revoked_at is not None
    assert ledger("revoke", "key_unknown").returncode != 0
