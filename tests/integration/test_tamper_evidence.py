"""Tamper evidence that does not trust the database: the attacks of someone with full
write access to it (its owner, a superuser: triggers off, foreign keys off, any row
rewritten, any public hash recomputed), but without the chain key. Each attack is
carried out for real against PostgreSQL, then `POST /v1/audit/verify` must say
`ok: false` with the right code. Where only a checkpoint can tell (a chain cut short, a
deleted refusal, a reservation put back), the same attack is first shown to pass
verification without one, so the test proves what the checkpoint adds.

Also here: what the service's own database role cannot do at all."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.database import create_engine, libpq_url
from ledger.http.app import create_app
from ledger.integrity import ChainKey, Keyring, entry_hash, new_chain_key
from ledger.service import checkpoints, reseal
from ledger.settings import Settings
from tests import provision
from tests.conftest import REPOSITORY, authorized
from tests.integration.helpers import open_account, transfer


@dataclass
class Ledger:
    client: AsyncTestClient
    owner: AsyncEngine
    service: AsyncEngine
    settings: Settings
    database: provision.LedgerDatabase

    async def verify(self, **body: Any) -> dict:
        response = await self.client.post("/v1/audit/verify", json=body)
        assert response.status_code == 200, response.text
        return response.json()

    async def codes(self, **body: Any) -> set[str]:
        report = await self.verify(**body)
        assert report["ok"] == (report["problems_total"] == 0)
        return {problem["code"] for problem in report["problems"]}

    async def checkpoint(self) -> checkpoints.Checkpoint | None:
        return await checkpoints.take(self.service, self.settings_keyring, self.settings.checkpoints, keep=10)

    @property
    def settings_keyring(self) -> Keyring:
        return provision.KEYRING

    async def owner_sql(self, *statements: str, **params: Any) -> None:
        """As the database's owner (a superuser here), with triggers and foreign keys off."""
        async with self.owner.begin() as connection:
            await connection.execute(text("SET LOCAL session_replication_role = replica"))
            for statement in statements:
                await connection.execute(text(statement), params)

    async def rows(self, query: str, **params: Any) -> list[Any]:
        async with self.owner.connect() as connection:
            return list((await connection.execute(text(query), params)).mappings().all())


@pytest.fixture
def tamper_database(postgres_server_url: str, service_login: tuple[str, str]) -> Iterator[provision.LedgerDatabase]:
    with provision.migrated_database(postgres_server_url, "ledger_tamper", service_login) as database:
        yield database


@pytest.fixture
async def ledger(tamper_database: provision.LedgerDatabase) -> AsyncIterator[Ledger]:
    # Checkpoints only when a test takes one.
    settings = provision.settings_for(tamper_database.service_url, checkpoint_interval_seconds=0)
    owner = create_engine(Settings(database_url=tamper_database.owner_url))
    service = create_engine(settings)
    try:
        async with AsyncTestClient(create_app(settings)) as client:
            yield Ledger(authorized(client), owner, service, settings, tamper_database)
    finally:
        await owner.dispose()
        await service.dispose()


async def history(ledger: Ledger) -> None:
    """bank -> alice 1000, alice -> shop 300, a reservation alice -> shop 100 (voided),
    a refusal, a partial reversal of the purchase."""
    client = ledger.client
    await open_account(client, "bank", negative=True)
    await open_account(client, "alice")
    await open_account(client, "shop")
    assert (await transfer(client, "fund", "bank", "alice", 1000)).status_code == 201
    assert (await transfer(client, "buy", "alice", "shop", 300)).status_code == 201
    assert (await transfer(client, "hold", "alice", "shop", 100, pending=True)).status_code == 201
    assert (await client.post("/v1/transfers/hold/void", json={})).status_code == 200
    assert (await transfer(client, "too-much", "alice", "shop", 10**6)).status_code == 422
    refund = await client.post("/v1/transfers/buy/reverse", json={"id": "refund", "amount": 50})
    assert refund.status_code == 201
    assert (await ledger.verify())["ok"]


async def rechain(ledger: Ledger, account_id: str, key: ChainKey | None) -> None:
    """Recompute an account's whole chain after editing it, with `key` (None: the
    documented unkeyed SHA-256 form of version 1), and fix its account row: everything an
    attacker without the chain key can do."""
    entries = await ledger.rows(
        "SELECT sequence, transfer_id, amount, created_at FROM entries WHERE account_id = :a ORDER BY sequence",
        a=account_id,
    )
    previous, running = None, 0
    for entry in entries:
        running += entry["amount"]
        previous = entry_hash(
            key, previous, account_id, entry["sequence"], entry["transfer_id"], entry["amount"], running,
            entry["created_at"],
        )  # fmt: skip
        await ledger.owner_sql(
            "UPDATE entries SET balance_after = :b, hash = :h, key_id = :k WHERE account_id = :a AND sequence = :s",
            a=account_id, s=entry["sequence"], b=running, h=previous, k=key.id if key else "",
        )  # fmt: skip
    debits = sum(-e["amount"] for e in entries if e["amount"] < 0)
    credits = sum(e["amount"] for e in entries if e["amount"] > 0)
    await ledger.owner_sql(
        "UPDATE accounts SET debits_posted = :d, credits_posted = :c, entries_count = :n, last_entry_hash = :h "
        "WHERE id = :a",
        a=account_id, d=debits, c=credits, n=len(entries), h=previous,
    )  # fmt: skip


@pytest.mark.parametrize("form", ["documented unkeyed SHA-256", "keyed, with a guessed key"])
async def test_an_amount_rewritten_with_the_chain_recomputed_is_caught(ledger: Ledger, form: str) -> None:
    """The attack of the issue: triggers off, alice's funding raised from 1000 to 100000
    on both sides, both chains recomputed (hashes and balances), both accounts' totals
    fixed. Without the key no recomputed link verifies, and the transfer row no longer
    matches its entries."""
    await history(ledger)
    guessed = ChainKey(provision.KEYRING.active.id, b"guess" * 8) if form.startswith("keyed") else None
    await ledger.owner_sql(
        "UPDATE entries SET amount = 100000 WHERE transfer_id = 'fund' AND account_id = 'alice'",
        "UPDATE entries SET amount = -100000 WHERE transfer_id = 'fund' AND account_id = 'bank'",
    )
    for account_id in ("alice", "bank"):
        await rechain(ledger, account_id, guessed)
    codes = await ledger.codes()
    assert "transfer_entries_mismatch" in codes
    assert ("hash_mismatch" if guessed else "unpinned_legacy_entry") in codes


async def test_a_transfer_row_changed_behind_the_services_back_is_caught(ledger: Ledger) -> None:
    """`UPDATE transfers SET amount = 2` (and a changed description, a refusal's code, a
    seal copied from another row): every transfer row is sealed with the chain key and
    checked against its journal entries."""
    await history(ledger)
    await ledger.owner_sql("UPDATE transfers SET amount = 2 WHERE id = 'fund'")
    report = await ledger.verify()
    problems = {(p["code"], p.get("transfer_id")) for p in report["problems"]}
    assert {("transfer_seal_mismatch", "fund"), ("transfer_entries_mismatch", "fund")} <= problems
    await ledger.owner_sql("UPDATE transfers SET amount = 1000 WHERE id = 'fund'")
    assert (await ledger.verify())["ok"], "the original row verifies again"

    for statement in (
        "UPDATE transfers SET description = 'a gift' WHERE id = 'buy'",
        "UPDATE transfers SET code = 'currency_mismatch' WHERE id = 'too-much'",
        "UPDATE transfers SET seal = (SELECT seal FROM transfers WHERE id = 'fund') WHERE id = 'buy'",
        "UPDATE transfers SET reversed_amount = 0 WHERE id = 'buy'",
    ):
        before = await ledger.rows("SELECT * FROM transfers WHERE id IN ('buy', 'too-much')")
        await ledger.owner_sql(statement)
        codes = await ledger.codes()
        assert "transfer_seal_mismatch" in codes, statement
        for row in before:  # put it back
            await ledger.owner_sql(
                "UPDATE transfers SET description = :description, code = :code, seal = :seal, "
                "reversed_amount = :reversed_amount WHERE id = :id",
                **{k: row[k] for k in ("id", "description", "code", "seal", "reversed_amount")},
            )
        assert (await ledger.verify())["ok"]


async def test_an_account_turned_into_an_issuing_account_is_caught(ledger: Ledger) -> None:
    """Flipping `allow_negative_balance` (to let a poster overdraw through the API) breaks
    the account's seal; flipping it back after spending (the balance CHECK dropped to
    allow it) leaves a journal that went below zero on an account that may not."""
    await history(ledger)
    await ledger.owner_sql("UPDATE accounts SET allow_negative_balance = true WHERE id = 'alice'")
    assert "account_seal_mismatch" in await ledger.codes()
    overdraw = await transfer(ledger.client, "overdraw", "alice", "shop", 5000)
    assert overdraw.status_code == 201, "the service acts on the row it reads"
    await ledger.owner_sql(
        "ALTER TABLE accounts DROP CONSTRAINT ck_accounts_balance_not_negative",
        "UPDATE accounts SET allow_negative_balance = false WHERE id = 'alice'",
    )
    codes = await ledger.codes()
    assert "negative_balance" in codes and "account_seal_mismatch" not in codes


async def test_a_chain_cut_short_passes_without_a_checkpoint_and_is_caught_with_one(ledger: Ledger) -> None:
    """Deleting the last transfer (its row and both entries, the tails of both chains)
    and rolling both accounts back is a valid shorter ledger: no chain can tell. The
    checkpoint taken before does: the journals are shorter than it saw, a transfer up to
    its cut-off is gone. The checkpoint writer refuses to pin the cut ledger, and
    `ledger audit checkpoint` exits 1."""
    await history(ledger)
    assert await ledger.checkpoint() is not None
    assert await transfer(ledger.client, "late", "alice", "shop", 1) is not None
    assert await ledger.checkpoint() is not None
    # The attack: remove `late` entirely.
    await ledger.owner_sql(
        "DELETE FROM entries WHERE transfer_id = 'late'",
        "DELETE FROM transfers WHERE id = 'late'",
    )
    for account_id in ("alice", "shop"):
        rows = await ledger.rows(
            "SELECT sequence, hash, created_at FROM entries WHERE account_id = :a ORDER BY sequence DESC LIMIT 1",
            a=account_id,
        )
        await ledger.owner_sql(
            "UPDATE accounts SET entries_count = :n, last_entry_hash = :h, last_entry_at = :t, "
            "debits_posted = debits_posted - CASE WHEN id = 'alice' THEN 1 ELSE 0 END, "
            "credits_posted = credits_posted - CASE WHEN id = 'shop' THEN 1 ELSE 0 END WHERE id = :a",
            a=account_id, n=rows[0]["sequence"], h=rows[0]["hash"], t=rows[0]["created_at"],
        )  # fmt: skip

    empty = ledger.settings.checkpoints.with_name("no-checkpoints")
    unchecked = await _verify_with_checkpoints_in(ledger, empty)
    assert unchecked["ok"], "without a checkpoint a cut-short ledger is indistinguishable"
    codes = await ledger.codes()
    assert {"journal_truncated", "transfers_missing"} <= codes, codes
    with pytest.raises(checkpoints.TamperDetected):
        await ledger.checkpoint()
    result = _cli(ledger, "audit", "checkpoint")
    assert result.returncode == 1 and "no checkpoint written" in result.stderr


async def test_a_deleted_refusal_is_caught_by_the_checkpoint(ledger: Ledger) -> None:
    """A refusal is an id's permanent outcome; deleting it would let a retry apply. It has
    no journal entry, so only the checkpoint's transfer count catches it."""
    await history(ledger)
    await ledger.checkpoint()
    await ledger.owner_sql("DELETE FROM transfers WHERE id = 'too-much'")
    assert "transfers_missing" in await ledger.codes()


async def test_a_voided_reservation_put_back_is_caught_by_the_checkpoint(ledger: Ledger) -> None:
    """The owner restores a voided reservation's earlier row, seal included (a valid
    seal: the service wrote it), and the account's pending total: everything agrees, and
    funds are held again. The checkpoint counted it as settled."""
    client = ledger.client
    await open_account(client, "bank", negative=True)
    await open_account(client, "alice")
    await transfer(client, "fund", "bank", "alice", 1000)
    await transfer(client, "hold", "alice", "bank", 400, pending=True)
    pending_row = (await ledger.rows("SELECT * FROM transfers WHERE id = 'hold'"))[0]
    assert (await client.post("/v1/transfers/hold/void", json={})).status_code == 200

    async def put_back() -> None:
        await ledger.owner_sql(
            "UPDATE transfers SET status = 'pending', updated_at = :updated_at, seal = :seal WHERE id = 'hold'",
            "UPDATE accounts SET pending_debits = 400 WHERE id = 'alice'",
            "UPDATE accounts SET pending_credits = 400 WHERE id = 'bank'",
            updated_at=pending_row["updated_at"], seal=pending_row["seal"],
        )  # fmt: skip

    async def undo() -> None:
        await client.post("/v1/transfers/hold/void", json={})

    await put_back()
    assert (await ledger.verify())["ok"], "without a checkpoint the old row is a valid one"
    await undo()
    assert (await ledger.rows("SELECT status FROM transfers WHERE id = 'hold'"))[0]["status"] == "voided"
    await ledger.checkpoint()
    await put_back()
    assert "settled_transfers_changed" in await ledger.codes()
    available = (await client.get("/v1/accounts/alice")).json()["balance"]["available"]
    assert available == 600, "the attack did hold the funds again"


async def test_an_entry_appended_behind_the_services_back_is_caught(ledger: Ledger) -> None:
    """A forged credit appended to alice's chain, with the unkeyed form (what an attacker
    can compute), a transfer row to go with it, and alice's totals fixed."""
    await history(ledger)
    await ledger.checkpoint()
    last = (await ledger.rows("SELECT * FROM entries WHERE account_id = 'alice' ORDER BY sequence DESC LIMIT 1"))[0]
    sequence, balance = last["sequence"] + 1, last["balance_after"] + 777
    forged = entry_hash(None, last["hash"], "alice", sequence, "gift", 777, balance, last["created_at"])
    await ledger.owner_sql(
        "INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, currency, status, request_hash, "
        "created_at, updated_at) VALUES ('gift', 'bank', 'alice', 777, 'EUR', 'posted', :h, :t, :t)",
        "INSERT INTO entries (account_id, sequence, transfer_id, amount, balance_after, created_at, hash, key_id) "
        "VALUES ('alice', :s, 'gift', 777, :b, :t, :f, '')",
        "UPDATE accounts SET entries_count = :s, last_entry_hash = :f, credits_posted = credits_posted + 777 "
        "WHERE id = 'alice'",
        h=b"\0" * 32, t=last["created_at"], s=sequence, b=balance, f=forged,
    )  # fmt: skip
    codes = await ledger.codes()
    assert {"unpinned_legacy_entry", "unsealed_transfer", "transfer_entries_mismatch"} <= codes, codes
    with pytest.raises(checkpoints.TamperDetected):
        await ledger.checkpoint()  # it will not pin what no live key vouches for


async def test_a_revoked_chain_key_vouches_only_for_what_a_checkpoint_pinned(ledger: Ledger) -> None:
    """Rotation: history under key 1, key 2 first in the keyring, more history under key
    2: both verify. Key 1 leaks: rows are resealed under key 2, a checkpoint pins the
    journals, key 1 is marked revoked. What the checkpoint pinned still verifies; an entry
    forged under key 1 after it does not."""
    await history(ledger)
    # An account with controls: its seal covers them, and the reseal must too.
    assert (await ledger.client.patch("/v1/accounts/shop", json={"max_balance": 10**9})).status_code == 200
    await ledger.checkpoint()
    old = provision.KEYRING.active
    new = new_chain_key()
    rotated = Keyring([new, old])
    settings = dataclasses.replace(ledger.settings, chain_keys=None)
    async with AsyncTestClient(create_app(settings, keyring=rotated)) as client:
        client = authorized(client)
        assert (await transfer(client, "after-rotation", "alice", "shop", 10)).status_code == 201
        entry = (await client.get("/v1/accounts/alice/entries", params={"limit": 1000})).json()["data"][-1]
        assert entry["key_id"] == new.id
        assert (await client.post("/v1/audit/verify", json={})).json()["ok"]

    # The procedure (README): rows sealed under the old key are sealed again under the new
    # one, a checkpoint under the new key pins the journals, then the old key is revoked.
    assert (await reseal.reseal(ledger.owner, rotated))["transfers"] > 0
    assert await checkpoints.take(ledger.service, rotated, ledger.settings.checkpoints, keep=10) is not None
    revoked = Keyring([new, dataclasses.replace(old, revoked=True)])
    async with AsyncTestClient(create_app(settings, keyring=revoked)) as client:
        client = authorized(client)
        assert (await client.post("/v1/audit/verify", json={})).json()["ok"], "pinned entries under the old key pass"
        last = (await ledger.rows("SELECT * FROM entries WHERE account_id = 'shop' ORDER BY sequence DESC LIMIT 1"))[0]
        sequence, balance = last["sequence"] + 1, last["balance_after"] - 5
        forged = entry_hash(old, last["hash"], "shop", sequence, "stolen", -5, balance, last["created_at"])
        await ledger.owner_sql(
            "INSERT INTO entries (account_id, sequence, transfer_id, amount, balance_after, created_at, hash, key_id) "
            "VALUES ('shop', :s, 'stolen', -5, :b, :t, :f, :k)",
            "UPDATE accounts SET entries_count = :s, last_entry_hash = :f, debits_posted = debits_posted + 5 "
            "WHERE id = 'shop'",
            s=sequence, b=balance, t=last["created_at"], f=forged, k=old.id,
        )  # fmt: skip
        report = (await client.post("/v1/audit/verify", json={})).json()
        codes = {p["code"] for p in report["problems"]}
        assert "revoked_chain_key" in codes and "hash_mismatch" not in codes, report["problems"]


async def test_an_altered_checkpoint_file_is_reported_not_trusted(ledger: Ledger) -> None:
    """A checkpoint is only as good as its MAC: edited (an account's head dropped), it is
    reported as invalid instead of being used."""
    await history(ledger)
    checkpoint = await ledger.checkpoint()
    assert checkpoint is not None and checkpoint.path is not None
    document = json.loads(checkpoint.path.read_text())
    document["accounts"] = [a for a in document["accounts"] if a[0] != "alice"]
    checkpoint.path.write_text(json.dumps(document))
    assert "checkpoint_invalid" in await ledger.codes()


async def test_account_controls_changed_behind_the_service_do_not_verify(ledger: Ledger) -> None:
    """The owner reopens a frozen account by hand; puts a cut credit line back with the
    row's earlier seal; deletes a change; forges one: each is reported, precisely."""
    await history(ledger)
    client = ledger.client
    assert (await client.patch("/v1/accounts/alice", json={"overdraft_limit": 500})).status_code == 200
    old = await _account_row(ledger, "alice")
    assert (await client.patch("/v1/accounts/alice", json={"overdraft_limit": 0})).status_code == 200
    assert (await client.patch("/v1/accounts/alice", json={"status": "frozen"})).status_code == 200
    assert (await ledger.verify())["ok"]

    await ledger.owner_sql("UPDATE accounts SET status = 'open' WHERE id = 'alice'")
    assert {"account_seal_mismatch", "change_history_mismatch"} <= await ledger.codes()
    # Back to the validly sealed row of the generous limit: the seal holds, the history does not.
    await ledger.owner_sql(
        "UPDATE accounts SET status = :status, overdraft_limit = :limit, seal = :seal WHERE id = 'alice'",
        status=old["status"], limit=old["overdraft_limit"], seal=old["seal"],
    )  # fmt: skip
    codes = await ledger.codes()
    assert "change_history_mismatch" in codes and "account_seal_mismatch" not in codes, codes

    await ledger.owner_sql("DELETE FROM account_changes WHERE account_id = 'alice' AND sequence = 2")
    assert {"change_sequence_gap", "change_hash_mismatch"} <= await ledger.codes()
    await ledger.owner_sql(
        "INSERT INTO account_changes (account_id, sequence, changed_at, changed_by, before, after, state, hash, key_id) "
        "SELECT account_id, 2, changed_at, changed_by, before, after, state, hash, key_id FROM account_changes "
        "WHERE account_id = 'alice' AND sequence = 1"
    )
    assert "change_hash_mismatch" in await ledger.codes()


async def _account_row(ledger: Ledger, account_id: str) -> dict[str, Any]:
    async with ledger.owner.connect() as connection:
        row = await connection.execute(
            text("SELECT status, overdraft_limit, seal FROM accounts WHERE id = :id"), {"id": account_id}
        )
        return dict(row.mappings().one())


async def test_the_serving_role_cannot_rewrite_history(ledger: Ledger) -> None:
    """As the role the service serves with (a member of ledger_service): the journal can
    only be read and appended to, transfers' identifying fields and accounts' controls
    cannot be changed, nothing can be deleted or truncated, no trigger disabled, no table
    created, no superuser setting used. PostgreSQL refuses each with a privilege error."""
    await history(ledger)
    attempts = [
        "UPDATE entries SET amount = 2",
        "DELETE FROM entries",
        "TRUNCATE entries",
        "ALTER TABLE entries DISABLE TRIGGER entries_append_only",
        "DROP TRIGGER entries_append_only ON entries",
        "UPDATE transfers SET amount = 2",
        "UPDATE transfers SET debit_account_id = 'shop' WHERE id = 'fund'",
        "DELETE FROM transfers WHERE status = 'rejected'",
        "UPDATE accounts SET allow_negative_balance = true",
        "UPDATE accounts SET currency = 'USD'",
        "UPDATE transfers SET imported_at = created_at",
        "UPDATE account_changes SET after = '{}'",
        "DELETE FROM account_changes",
        "TRUNCATE account_changes",
        "DELETE FROM accounts",
        "UPDATE api_keys SET role = 'admin'",
        "DELETE FROM api_keys",
        "CREATE TABLE shadow (id int)",
        "CREATE SCHEMA shadow",
        "SET session_replication_role = replica",
        "ALTER ROLE CURRENT_USER SUPERUSER",
        "CREATE ROLE attacker LOGIN SUPERUSER",
    ]
    connection = await asyncpg.connect(libpq_url(ledger.database.service_url))
    try:
        refused = []
        for statement in attempts:
            try:
                await connection.execute(statement)
            except (asyncpg.InsufficientPrivilegeError, asyncpg.exceptions.InvalidGrantOperationError):
                refused.append(statement)
            except asyncpg.PostgresError as error:
                refused.append(f"{statement}: {type(error).__name__}")
        assert refused == attempts
    finally:
        await connection.close()
    assert (await ledger.verify())["ok"]


async def _verify_with_checkpoints_in(ledger: Ledger, directory: Path) -> dict:
    settings = dataclasses.replace(ledger.settings, checkpoint_dir=directory)
    async with AsyncTestClient(create_app(settings)) as client:
        response = await authorized(client).post("/v1/audit/verify", json={})
        return response.json()


def _cli(ledger: Ledger, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ledger", *arguments],
        env={
            **os.environ,
            **provision.server_environment(ledger.database, ledger.settings.data_dir),
            "LEDGER_CHECKPOINT_DIR": str(ledger.settings.checkpoints),
        },
        capture_output=True,
        text=True,
        cwd=REPOSITORY,
        timeout=60,
    )
