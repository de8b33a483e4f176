"""Audit over HTTP and the CLI: a sound ledger verifies; tampering done behind the
service's back, as a superuser with the journal's triggers off (a changed amount, a
deleted entry, a reordered pair, a forged balance), is caught by the endpoint and by
`ledger audit verify`; the trial balance sums to zero, also while money is moving."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.database import create_engine
from ledger.http.app import create_app
from ledger.settings import Settings
from tests import provision
from tests.conftest import REPOSITORY, authorized
from tests.integration.helpers import open_account, transfer


@pytest.fixture(scope="module")
def audit_database(postgres_server_url: str, service_login: tuple[str, str]) -> Iterator[provision.LedgerDatabase]:
    """A database of its own: these tests corrupt it on purpose."""
    with provision.migrated_database(postgres_server_url, "ledger_audit", service_login) as database:
        yield database


@pytest.fixture(scope="module")
async def audit_client(audit_database: provision.LedgerDatabase) -> AsyncIterator[AsyncTestClient]:
    # No checkpoints here: these tests are about what the keyed chain and the seals catch
    # by themselves (tests/integration/test_tamper_evidence.py covers checkpoints).
    settings = provision.settings_for(audit_database.service_url, checkpoint_interval_seconds=0)
    async with AsyncTestClient(create_app(settings)) as client:
        yield authorized(client)


@pytest.fixture(scope="module")
async def audit_engine(audit_database: provision.LedgerDatabase) -> AsyncIterator[AsyncEngine]:
    """The database's owner: it may do what the service's role cannot."""
    engine = create_engine(Settings(database_url=audit_database.owner_url))
    yield engine
    await engine.dispose()


def cli_verify(database: provision.LedgerDatabase, *arguments: str) -> tuple[int, dict, str]:
    result = subprocess.run(
        [sys.executable, "-m", "ledger", "audit", "verify", *arguments],
        env={
            **os.environ,
            **provision.server_environment(database, provision.DATA_DIR / "cli-no-checkpoints"),
        },
        capture_output=True,
        text=True,
        cwd=REPOSITORY,
        timeout=120,
    )
    return result.returncode, json.loads(result.stdout), result.stderr


async def build_history(client: AsyncTestClient, prefix: str) -> list[str]:
    bank, alice, shop = f"{prefix}-bank", f"{prefix}-alice", f"{prefix}-shop"
    await open_account(client, bank, negative=True)
    await open_account(client, alice)
    await open_account(client, shop)
    for i in range(3):
        await transfer(client, f"{prefix}-fund{i}", bank, alice, 100)
    await transfer(client, f"{prefix}-buy", alice, shop, 60)
    await transfer(client, f"{prefix}-hold", alice, shop, 50, pending=True)
    await client.post(f"/v1/transfers/{prefix}-hold/post", json={"amount": 30})
    await transfer(client, f"{prefix}-hold2", alice, shop, 20, pending=True)
    await client.post(f"/v1/transfers/{prefix}-buy/reverse", json={"id": f"{prefix}-refund", "amount": 10})
    return [bank, alice, shop]


async def test_a_sound_ledger_verifies_and_its_trial_balance_is_zero(
    audit_client: AsyncTestClient, audit_database: provision.LedgerDatabase
) -> None:
    await build_history(audit_client, "sound")
    report = (await audit_client.post("/v1/audit/verify", json={})).json()
    assert report["ok"] is True and report["problems"] == [] and report["problems_total"] == 0
    assert report["accounts_checked"] >= 3 and report["entries_checked"] >= 12
    one = (await audit_client.post("/v1/audit/verify", json={"account_id": "sound-alice"})).json()
    assert one["ok"] and one["accounts_checked"] == 1
    assert (await audit_client.post("/v1/audit/verify", json={"account_id": "nobody"})).status_code == 404

    trial = (await audit_client.get("/v1/balances")).json()
    assert trial["balances"] and all(b["difference"] == 0 and b["debits"] == b["credits"] for b in trial["balances"])
    early = (await audit_client.get("/v1/balances", params={"as_of": "2000-01-01T00:00:00Z"})).json()
    assert early["balances"] == []
    code, cli_report, progress = cli_verify(audit_database)
    assert code == 0 and cli_report["ok"] and "accounts" in progress


TAMPERING = {
    "amount": (
        "UPDATE entries SET amount = amount + 1 WHERE account_id = :a AND sequence = 2",
        {"hash_mismatch", "balance_after_mismatch"},
    ),
    "deleted": (
        "DELETE FROM entries WHERE account_id = :a AND sequence = 2",
        {"sequence_gap", "hash_mismatch", "balance_after_mismatch"},
    ),
    # Swap entries 2 and 3 (through a spare number: the primary key is checked per row).
    "reordered": (
        "UPDATE entries SET sequence = 1000000 WHERE account_id = :a AND sequence = 2; "
        "UPDATE entries SET sequence = 2 WHERE account_id = :a AND sequence = 3; "
        "UPDATE entries SET sequence = 3 WHERE account_id = :a AND sequence = 1000000",
        {"hash_mismatch"},
    ),
    "forged": ("UPDATE accounts SET credits_posted = credits_posted + 1000 WHERE id = :a", {"balance_mismatch"}),
}


async def test_tampering_behind_the_services_back_is_caught_by_endpoint_and_cli(
    audit_client: AsyncTestClient, audit_engine: AsyncEngine, audit_database: provision.LedgerDatabase
) -> None:
    victims = {}
    for kind in TAMPERING:
        accounts = await build_history(audit_client, f"tamper-{kind}")
        victims[kind] = accounts[1]  # alice: funded, spent, posted, refunded
    async with audit_engine.connect() as connection:
        # As a superuser, with user triggers off: what an attacker with database access could do.
        await connection.execute(text("SET session_replication_role = replica"))
        for kind, (statements, _) in TAMPERING.items():
            for statement in statements.split("; "):
                await connection.execute(text(statement), {"a": victims[kind]})
        await connection.commit()

    for kind, (_, expected) in TAMPERING.items():
        report = (await audit_client.post("/v1/audit/verify", json={"account_id": victims[kind]})).json()
        codes = {problem["code"] for problem in report["problems"]}
        assert not report["ok"] and expected <= codes, (kind, report["problems"])
        assert all(problem["account_id"] == victims[kind] for problem in report["problems"])

    # The whole ledger: the journal problems are the victims'; a transfer whose entries no
    # longer match it is reported too (under its debit account), and only those.
    whole = (await audit_client.post("/v1/audit/verify", json={})).json()
    assert not whole["ok"] and {p["account_id"] for p in whole["problems"] if "transfer_id" not in p} == set(
        victims.values()
    )
    assert all(
        p["transfer_id"].startswith(("tamper-amount", "tamper-deleted"))
        for p in whole["problems"]
        if "transfer_id" in p
    )
    code, cli_report, _ = cli_verify(audit_database)
    assert code == 1 and cli_report["problems_total"] == whole["problems_total"]
    code, cli_report, _ = cli_verify(audit_database, "--account", victims["forged"])
    assert code == 1 and [p["code"] for p in cli_report["problems"]] == ["balance_mismatch"]


async def test_the_trial_balance_is_zero_while_transfers_are_posted(
    server_url: str, api_headers: dict[str, str], uid: str
) -> None:
    """16 clients move money while another reads the trial balance 40 times: every read,
    from its one snapshot, has debits equal to credits in every currency."""
    async with httpx.AsyncClient(base_url=server_url, timeout=30, headers=api_headers) as client:
        await client.post(
            "/v1/accounts", json={"id": f"tb-bank-{uid}", "currency": "EUR", "allow_negative_balance": True}
        )
        for i in range(4):
            await client.post(
                "/v1/accounts", json={"id": f"tb-{uid}-{i}", "currency": "EUR", "allow_negative_balance": True}
            )

        async def mover(worker: int) -> None:
            for n in range(25):
                body = {"id": f"tb-{uid}-{worker}-{n}", "debit_account_id": f"tb-{uid}-{(worker + n) % 4}",
                        "credit_account_id": f"tb-{uid}-{(worker + n + 1) % 4}", "amount": 1 + n}  # fmt: skip
                await client.post("/v1/transfers", json=body)

        async def reader() -> list[dict]:
            seen = []
            for _ in range(40):
                seen.append((await client.get("/v1/balances")).json())
                await asyncio.sleep(0.01)
            return seen

        results = await asyncio.gather(reader(), *(mover(w) for w in range(16)))
    for trial in results[0]:
        assert all(b["difference"] == 0 for b in trial["balances"]), trial
