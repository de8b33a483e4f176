"""Several instances of the service on one database, started at the same moment, as a
deployment behind a load balancer starts them (README, "Scaling out").

What must hold: every instance migrates at start and they do not race (the migrations
take a transaction-scoped advisory lock: the first applies them, the others wait for its
commit and find the schema at head); exactly one first admin key is created, by one of
them; any instance answers for what another wrote (the service keeps no state of its
own); the expiry sweepers of all instances share the due reservations (claimed with
`FOR UPDATE SKIP LOCKED`), each released exactly once; the journal verifies."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import httpx
import pytest

from ledger import migrate
from ledger.cluster.stack import wait_ready
from tests import provision
from tests.conftest import REPOSITORY, free_port

INSTANCES = 3


def _start(directory: Path, environment: dict[str, str]) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "ledger", "serve", "--port", str(port)],
            env={**os.environ, **environment},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPOSITORY,
        )
    return process, f"http://127.0.0.1:{port}", log_path


def _wait_ready(instances: list[tuple[subprocess.Popen[bytes], str, Path]], within: float = 90) -> None:
    deadline = time.monotonic() + within
    for process, base_url, log_path in instances:
        try:
            wait_ready(base_url, process, log_path, deadline - time.monotonic())
        except RuntimeError as error:
            pytest.fail(str(error))


@pytest.fixture
def fresh_database(postgres_server_url: str, service_login: tuple[str, str]):
    """An empty database (not migrated): the instances migrate it themselves."""
    url = provision.create_database(postgres_server_url, prefix="ledger_instances")
    yield url, provision.as_role(url, *service_login)
    provision.drop_database(postgres_server_url, url)


def test_instances_started_together_migrate_once_share_the_sweeper_and_agree(fresh_database, tmp_path: Path) -> None:
    owner_url, service_url = fresh_database
    common = {
        "LEDGER_DATABASE_URL": service_url,
        "LEDGER_MIGRATION_DATABASE_URL": owner_url,
        # Every instance must seal with the same keys: they share one keyring.
        "LEDGER_CHAIN_KEYS": provision.CHAIN_KEYS,
        "LEDGER_LOG_LEVEL": "info",
        "LEDGER_EXPIRY_SWEEP_INTERVAL_SECONDS": "0.2",
        "LEDGER_CHECKPOINT_INTERVAL_SECONDS": "0",
    }
    instances = [
        _start(tmp_path / f"instance-{n}", {**common, "LEDGER_DATA_DIR": str(tmp_path / f"instance-{n}" / "data")})
        for n in range(INSTANCES)
    ]
    try:
        _wait_ready(instances)
        # One first admin key, created by exactly one instance (the others found it made).
        key_files = [
            path for n in range(INSTANCES) if (path := tmp_path / f"instance-{n}" / "data" / "admin.key").exists()
        ]
        assert len(key_files) == 1, key_files
        headers = {"Authorization": f"Bearer {key_files[0].read_text().strip()}"}
        asyncio.run(_exercise([base_url for _, base_url, _ in instances], headers, owner_url))
    finally:
        for process, _, _ in instances:
            process.terminate()
        for process, _, _ in instances:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                pytest.fail("an instance did not stop within 20 s of SIGTERM")
    for _, _, log_path in instances:
        output = log_path.read_text()
        assert '"level":"error"' not in output, output[-3000:]
        assert "Traceback" not in output, output[-3000:]


async def _exercise(base_urls: list[str], headers: dict[str, str], owner_url: str) -> None:
    connection = await asyncpg.connect(owner_url)
    try:
        versions = await connection.fetch("SELECT version_num FROM alembic_version")
        assert [row["version_num"] for row in versions] == [migrate.head_revision()]
        assert await connection.fetchval("SELECT count(*) FROM api_keys WHERE role = 'admin'") == 1
    finally:
        await connection.close()

    clients = [httpx.AsyncClient(base_url=url, headers=headers, timeout=30) for url in base_urls]
    try:
        first, second, third = clients
        bank = await first.post("/v1/accounts", json={"id": "bank", "currency": "EUR", "allow_negative_balance": True})
        assert bank.status_code == 201, bank.text
        accounts = [f"user-{n}" for n in range(6)]
        for n, account in enumerate(accounts):
            assert (
                await clients[n % 3].post("/v1/accounts", json={"id": account, "currency": "EUR"})
            ).status_code == 201
        # What one instance wrote, another answers for, including a replay of its id.
        funding = {"id": "fund-0", "debit_account_id": "bank", "credit_account_id": "user-0", "amount": 1000}
        assert (await first.post("/v1/transfers", json=funding)).status_code == 201
        replay = await second.post("/v1/transfers", json=funding)
        assert replay.headers.get("Idempotent-Replayed") == "true", replay.text
        assert (await third.get("/v1/accounts/user-0")).json()["balance"]["posted"] == 1000

        # Reservations that expire in one second, made through every instance: all three
        # sweepers race for them; each must be released once, its funds back once.
        for account in accounts[1:]:
            body = {"id": f"fund-{account}", "debit_account_id": "bank", "credit_account_id": account, "amount": 500}
            assert (await second.post("/v1/transfers", json=body)).status_code == 201
        reservations = []
        for n in range(60):
            account = accounts[1 + n % 5]
            body = {"id": f"hold-{n}", "debit_account_id": account, "credit_account_id": "bank", "amount": 7,
                    "pending": True, "timeout_seconds": 1}  # fmt: skip
            response = await clients[n % 3].post("/v1/transfers", json=body)
            assert response.status_code == 201, response.text
            reservations.append(body["id"])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            statuses = [(await third.get(f"/v1/transfers/{tid}")).json()["status"] for tid in reservations[::7]]
            if set(statuses) == {"expired"}:
                break
            await asyncio.sleep(0.3)
        connection = await asyncpg.connect(owner_url)
        try:
            # Stored as expired (by a sweeper, not only shown so by reads), no reservation
            # left held, every balance back where the funding put it.
            stored = await connection.fetch("SELECT id, status FROM transfers WHERE id LIKE 'hold-%'")
            deadline = time.monotonic() + 30
            while {row["status"] for row in stored} != {"expired"} and time.monotonic() < deadline:
                await asyncio.sleep(0.3)
                stored = await connection.fetch("SELECT id, status FROM transfers WHERE id LIKE 'hold-%'")
            assert len(stored) == 60 and {row["status"] for row in stored} == {"expired"}
            held = await connection.fetchval("SELECT sum(pending_debits) + sum(pending_credits) FROM accounts")
            assert held == 0
            balances = dict(await connection.fetch("SELECT id, credits_posted - debits_posted FROM accounts"))
            assert balances == {"bank": -3500, "user-0": 1000, **{a: 500 for a in accounts[1:]}}
        finally:
            await connection.close()
        report = await first.post("/v1/audit/verify", json={})
        assert report.status_code == 200 and report.json()["ok"], report.text
        # Each instance serves its own metrics (Prometheus scrapes each, with its address
        # as the `instance` label): together they saw every request.
        for client in clients:
            metrics = await client.get("/metrics")
            assert metrics.status_code == 200 and "ledger_requests_total" in metrics.text
    finally:
        for client in clients:
            await client.aclose()
