"""Account controls under contention, end to end: a real `ledger serve` process (group
commit on), many real HTTP clients, real PostgreSQL, and the invariants checked on the
stored rows afterwards."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests import provision
from tests.scenario import post_retrying

pytestmark = pytest.mark.slow

CLIENTS = 48
TRANSFERS_PER_CLIENT = 40


async def test_limits_and_a_freeze_hold_under_48_concurrent_clients(
    server_url: str, engine: AsyncEngine, uid: str
) -> None:
    """48 clients move money among credit lines (overdraft 500), capped wallets
    (max_balance 1,000) and a settlement account, single transfers, reservations and
    linked pairs, while an admin freezes and reopens one wallet twice. Afterwards: money
    is conserved, no account is past its limits (posted, pending, and every balance in its
    journal), every 201 is stored once and every refusal recorded with the code answered,
    no entry of the frozen wallet falls inside a freeze, verification passes and
    PostgreSQL saw no deadlock."""
    lines = [f"line{i}-{uid}" for i in range(3)]
    wallets = [f"wallet{i}-{uid}" for i in range(3)]
    bank = f"bank-{uid}"
    frozen = wallets[0]
    async with engine.connect() as connection:
        deadlocks_before = (
            await connection.execute(text("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"))
        ).scalar_one()
    limits = httpx.Limits(max_connections=CLIENTS + 4)
    async with httpx.AsyncClient(
        base_url=server_url, headers=provision.API_HEADERS, timeout=60, limits=limits
    ) as client:
        assert (await post_retrying(client, "/v1/accounts", {"id": bank, "currency": "EUR",
                                                      "allow_negative_balance": True})).status_code == 201  # fmt: skip
        for line in lines:
            assert (await post_retrying(client, "/v1/accounts", {"id": line, "currency": "EUR",
                                                          "overdraft_limit": 500})).status_code == 201  # fmt: skip
        for wallet in wallets:
            assert (await post_retrying(client, "/v1/accounts", {"id": wallet, "currency": "EUR",
                                                          "max_balance": 1000})).status_code == 201  # fmt: skip
        everyone = [bank, *lines, *wallets]
        answers: dict[str, tuple[int, str | None]] = {}

        async def worker(n: int) -> None:
            rng = random.Random(n)
            for i in range(TRANSFERS_PER_CLIENT):
                debit, credit = rng.sample(everyone, 2)
                amount = rng.randint(1, 400)
                kind = rng.random()
                if kind < 0.15:
                    # A linked pair: money passes through a line into a wallet, or neither leg moves.
                    via, to = rng.choice(lines), rng.choice(wallets)
                    ids = [f"c{n}-{i}a-{uid}", f"c{n}-{i}b-{uid}"]
                    items = [
                        {"id": ids[0], "debit_account_id": debit if debit != via else bank, "credit_account_id": via,
                         "amount": amount, "linked": True},
                        {"id": ids[1], "debit_account_id": via, "credit_account_id": to, "amount": amount},
                    ]  # fmt: skip
                    if items[0]["debit_account_id"] == via:
                        continue
                    response = await post_retrying(client, "/v1/transfers/batch", {"transfers": items})
                    assert response.status_code == 200, response.text
                    for result in response.json()["results"]:
                        answers[result["id"]] = (201 if result["status"] == "created" else 422, result.get("code"))
                    continue
                transfer_id = f"c{n}-{i}-{uid}"
                body = {"id": transfer_id, "debit_account_id": debit, "credit_account_id": credit, "amount": amount,
                        "pending": kind > 0.85}  # fmt: skip
                response = await post_retrying(client, "/v1/transfers", body)
                assert response.status_code in (201, 422), response.text
                answers[transfer_id] = (response.status_code, response.json().get("code"))
                if response.status_code == 201 and body["pending"] and rng.random() < 0.5:
                    decision = "post" if rng.random() < 0.5 else "void"
                    decided = await post_retrying(client, f"/v1/transfers/{transfer_id}/{decision}", {})
                    assert decided.status_code == 200, decided.text

        async def freezer() -> None:
            for _ in range(2):
                await asyncio.sleep(0.3)
                for status in ("frozen", "open"):
                    response = await client.patch(f"/v1/accounts/{frozen}", json={"status": status})
                    assert response.status_code == 200, response.text
                    await asyncio.sleep(0.3)

        await asyncio.gather(*(worker(n) for n in range(CLIENTS)), freezer())
        accounts = {a: (await client.get(f"/v1/accounts/{a}")).json() for a in everyone}
        changes = (await client.get(f"/v1/accounts/{frozen}/changes")).json()["data"]
        report = (await client.post("/v1/audit/verify", json={})).json()

    codes = Counter(code for status, code in answers.values() if status == 422)
    # The run must have met every limit, or it proves little.
    assert {"insufficient_funds", "exceeds_max_balance", "account_frozen"} <= set(codes), codes
    assert sum(a["balance"]["posted"] for a in accounts.values()) == 0
    for line in lines:
        assert accounts[line]["balance"]["available"] >= -500, accounts[line]
    for wallet in wallets:
        balance = accounts[wallet]["balance"]
        assert balance["posted"] + balance["pending_credits"] <= 1000, accounts[wallet]
    assert report["ok"], report["problems"]
    async with engine.connect() as connection:
        stored = {
            row.id: (row.status, row.code)
            for row in await connection.execute(
                text("SELECT id, status, code FROM transfers WHERE id = ANY(:ids)"), {"ids": list(answers)}
            )
        }
        worst = {
            row.account_id: (row.low, row.high)
            for row in await connection.execute(
                text(
                    "SELECT account_id, min(balance_after) AS low, max(balance_after) AS high FROM entries "
                    "WHERE account_id = ANY(:ids) GROUP BY account_id"
                ),
                {"ids": lines + wallets},
            )
        }
        # The freeze windows in the wallet's own order: each change keeps the account as it
        # was right after it, entries_count included, and both changes and transfers take
        # the account's row lock, so the journal entries numbered after a freeze's count and
        # up to the reopening's were written while it was frozen. (Timestamps cannot tell:
        # a transaction's clock may be read before it waits for the lock a change holds.)
        freezes = [
            (row.status, row.entries)
            for row in await connection.execute(
                text(
                    "SELECT after->>'status' AS status, (state->>'entries_count')::bigint AS entries "
                    "FROM account_changes WHERE account_id = :id AND sequence > 0 ORDER BY sequence"
                ),
                {"id": frozen},
            )
        ]
        inside = 0
        for (_, start), (_, end) in zip(freezes[0::2], freezes[1::2], strict=True):
            # Only the posting of a reservation made before the freeze may write there (a
            # card capture after a block, README); nothing else may.
            inside += (
                await connection.execute(
                    text(
                        "SELECT count(*) FROM entries e JOIN transfers t ON t.id = e.transfer_id "
                        "WHERE e.account_id = :id AND e.sequence > :start AND e.sequence <= :end AND NOT t.pending"
                    ),
                    {"id": frozen, "start": start, "end": end},
                )
            ).scalar_one()
        deadlocks_after = (
            await connection.execute(text("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"))
        ).scalar_one()
    assert [status for status, _ in freezes] == ["frozen", "open", "frozen", "open"]
    assert [c["after"]["status"] for c in changes] == [status for status, _ in freezes]
    assert inside == 0, "a transfer moved money of the wallet while it was frozen"
    for transfer_id, (status, code) in answers.items():
        assert transfer_id in stored, transfer_id
        if status == 422:
            assert stored[transfer_id] == ("rejected", code), (transfer_id, stored[transfer_id], code)
        else:
            assert stored[transfer_id][0] != "rejected", transfer_id
    for line in lines:
        assert worst.get(line, (0, 0))[0] >= -500, worst
    for wallet in wallets:
        assert worst.get(wallet, (0, 0))[1] <= 1000, worst
    assert deadlocks_after == deadlocks_before
