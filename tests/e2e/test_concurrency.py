"""Concurrency guarantees, end to end: a real `ledger serve` process, real HTTP clients,
real PostgreSQL, and every invariant checked afterwards."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests import provision
from tests.scenario import find_violations, post_retrying, run_bank_scenario

pytestmark = pytest.mark.slow


async def test_64_clients_moving_money_both_ways_keep_every_invariant(
    server_url: str, engine: AsyncEngine, uid: str
) -> None:
    """64 clients post 2,048 transfers among 5 accounts in both directions (retrying by id
    on 503): money is conserved, no forbidden negative balance, every 201 is stored exactly
    once and every 422 is recorded, journals are gap-free with consistent balance_after,
    and PostgreSQL detected no deadlock."""
    report = await run_bank_scenario(server_url, engine, prefix=f"e2e-{uid}", clients=64, transfers=2048)
    violations = await find_violations(report, engine)
    assert violations == []
    statuses = [answer.status for answer in report.answers.values()]
    # The run must have exercised both outcomes under contention, or it proves little.
    assert statuses.count(201) > 1000, statuses.count(201)
    assert statuses.count(422) > 0


async def test_concurrent_batches_and_single_transfers_never_deadlock_and_conserve_money(
    server_url: str, engine: AsyncEngine, uid: str
) -> None:
    """32 clients post batches of 25 (with linked pairs) while 32 post single transfers,
    all over the same 5 accounts: the same invariants hold for every item, including the
    recorded refusals of failed chains, and PostgreSQL detected no deadlock."""
    report = await run_bank_scenario(
        server_url, engine, prefix=f"batch-{uid}", clients=64, batch_clients=32, batch_size=25, transfers=2400
    )
    violations = await find_violations(report, engine)
    assert violations == []
    codes = {answer.body.get("code") for answer in report.answers.values() if answer.status == 422}
    assert "linked_transfer_failed" in codes, "some chains must have failed, or chains were not exercised"


async def test_50_concurrent_posts_of_one_id_apply_once_and_all_agree(
    server_url: str, engine: AsyncEngine, uid: str
) -> None:
    """50 simultaneous POSTs of the same transfer: one applies, 49 are replays, every
    answer carries the same status and body, and the money moved once."""
    async with httpx.AsyncClient(
        base_url=server_url, headers=provision.API_HEADERS, timeout=30, limits=httpx.Limits(max_connections=50)
    ) as client:
        for name, negative in (("source", True), ("target", False)):
            response = await client.post(
                "/v1/accounts", json={"id": f"{name}-{uid}", "currency": "USD", "allow_negative_balance": negative}
            )
            assert response.status_code == 201
        body = {
            "id": f"race-{uid}",
            "debit_account_id": f"source-{uid}",
            "credit_account_id": f"target-{uid}",
            "amount": 777,
        }
        responses = await asyncio.gather(*(client.post("/v1/transfers", json=body) for _ in range(50)))
        target = (await client.get(f"/v1/accounts/target-{uid}")).json()

    assert {r.status_code for r in responses} == {201}
    assert len({r.content for r in responses}) == 1, "every answer has the same body"
    replayed = [r.headers.get("idempotent-replayed") == "true" for r in responses]
    assert replayed.count(False) == 1 and replayed.count(True) == 49
    assert target["balance"]["posted"] == 777 and target["entries_count"] == 1
    async with engine.connect() as connection:
        count = (
            await connection.execute(text("SELECT count(*) FROM entries WHERE transfer_id = :id"), {"id": body["id"]})
        ).scalar_one()
    assert count == 2


async def test_concurrent_withdrawals_beyond_the_balance_never_overdraw(server_url: str, uid: str) -> None:
    """40 concurrent withdrawals of 100 from an account holding 1,000: exactly 10 apply,
    30 are refused with insufficient_funds, the balance ends at 0, never below, and each
    refusal is recorded and replayed identically."""
    async with httpx.AsyncClient(
        base_url=server_url, headers=provision.API_HEADERS, timeout=30, limits=httpx.Limits(max_connections=40)
    ) as client:
        await client.post("/v1/accounts", json={"id": f"bank-{uid}", "currency": "EUR", "allow_negative_balance": True})
        await client.post("/v1/accounts", json={"id": f"wallet-{uid}", "currency": "EUR"})
        await client.post("/v1/accounts", json={"id": f"shop-{uid}", "currency": "EUR"})
        funding = {
            "id": f"fund-{uid}",
            "debit_account_id": f"bank-{uid}",
            "credit_account_id": f"wallet-{uid}",
            "amount": 1000,
        }
        assert (await client.post("/v1/transfers", json=funding)).status_code == 201

        bodies = [
            {
                "id": f"spend-{uid}-{i}",
                "debit_account_id": f"wallet-{uid}",
                "credit_account_id": f"shop-{uid}",
                "amount": 100,
            }
            for i in range(40)
        ]
        responses = await asyncio.gather(*(client.post("/v1/transfers", json=body) for body in bodies))
        statuses = [r.status_code for r in responses]
        assert statuses.count(201) == 10 and statuses.count(422) == 30, statuses

        wallet = (await client.get(f"/v1/accounts/wallet-{uid}")).json()
        assert wallet["balance"]["posted"] == 0 and wallet["balance"]["available"] == 0
        entries = (await client.get(f"/v1/accounts/wallet-{uid}/entries")).json()["data"]
        assert min(entry["balance_after"] for entry in entries) >= 0

        for body, first in zip(bodies, responses, strict=True):
            if first.status_code != 422:
                continue
            assert first.json()["code"] == "insufficient_funds"
            stored = (await client.get(f"/v1/transfers/{body['id']}")).json()
            assert stored["status"] == "rejected" and stored["code"] == "insufficient_funds"
            again = await client.post("/v1/transfers", json=body)
            assert again.status_code == 422 and again.headers["idempotent-replayed"] == "true"
            assert again.content == first.content


async def _decision_race(client: httpx.AsyncClient, transfer_id: str) -> list[httpx.Response]:
    # Racers retry a 503 (nothing done), so that each ends with a decision (200) or the
    # reason it lost (409): on a slow machine behind PgBouncer's 4 server connections some
    # of 240 simultaneous decisions can wait past the pool timeout.
    requests = []
    for i in range(30):
        if i % 3 == 0:
            requests.append(post_retrying(client, f"/v1/transfers/{transfer_id}/void", {}))
        else:
            requests.append(post_retrying(client, f"/v1/transfers/{transfer_id}/post", {"amount": 40 + i % 2 * 10}))
    return list(await asyncio.gather(*requests))


async def test_racing_posts_voids_and_expiry_make_exactly_one_decision(
    server_url: str, engine: AsyncEngine, uid: str
) -> None:
    """30 concurrent decisions (voids, posts of 40, posts of 50) on each of 8 pending
    transfers, half of them expiring just as the race starts: per transfer exactly one
    decision wins (the winners' 200s all agree with the final state; everything else is a
    409 naming that state), and the reservation is released exactly once."""
    async with httpx.AsyncClient(
        base_url=server_url, headers=provision.API_HEADERS, timeout=30, limits=httpx.Limits(max_connections=64)
    ) as client:
        await client.post("/v1/accounts", json={"id": f"bank-{uid}", "currency": "EUR", "allow_negative_balance": True})
        await client.post("/v1/accounts", json={"id": f"payer-{uid}", "currency": "EUR"})
        await client.post("/v1/accounts", json={"id": f"shop-{uid}", "currency": "EUR"})
        funding = {
            "id": f"fund-{uid}",
            "debit_account_id": f"bank-{uid}",
            "credit_account_id": f"payer-{uid}",
            "amount": 1000,
        }
        assert (await client.post("/v1/transfers", json=funding)).status_code == 201
        ids = [f"hold-{uid}-{i}" for i in range(8)]
        for i, transfer_id in enumerate(ids):
            body = {"id": transfer_id, "debit_account_id": f"payer-{uid}", "credit_account_id": f"shop-{uid}",
                    "amount": 100, "pending": True, "timeout_seconds": 1 if i % 2 else 3600}  # fmt: skip
            assert (await client.post("/v1/transfers", json=body)).status_code == 201
        await asyncio.sleep(0.95)
        races = await asyncio.gather(*(_decision_race(client, transfer_id) for transfer_id in ids))
        finals = [(await client.get(f"/v1/transfers/{transfer_id}")).json() for transfer_id in ids]
        payer = (await client.get(f"/v1/accounts/payer-{uid}")).json()["balance"]
        shop = (await client.get(f"/v1/accounts/shop-{uid}")).json()["balance"]

    expected_conflicts = {
        "posted": "pending_transfer_already_posted",
        "voided": "pending_transfer_already_voided",
        "expired": "pending_transfer_expired",
    }
    posted_total = 0
    for responses, final in zip(races, finals, strict=True):
        assert final["status"] in expected_conflicts, final
        winners = [r for r in responses if r.status_code == 200]
        losers = [r for r in responses if r.status_code != 200]
        assert all(r.status_code == 409 and r.json()["code"] == expected_conflicts[final["status"]] for r in losers), [
            (r.status_code, r.text) for r in losers
        ]
        assert all(r.json() == final for r in winners)
        if final["status"] == "expired":
            assert not winners
        else:
            assert winners, "an unexpired reservation is decided by one of the racers"
        posted_total += final["posted_amount"] or 0
    assert payer == {
        "posted": 1000 - posted_total,
        "pending_debits": 0,
        "pending_credits": 0,
        "available": 1000 - posted_total,
    }
    assert shop["posted"] == posted_total and shop["pending_credits"] == 0
    async with engine.connect() as connection:
        entries = (
            await connection.execute(text("SELECT count(*) FROM entries WHERE transfer_id = ANY(:ids)"), {"ids": ids})
        ).scalar_one()
    assert entries == 2 * sum(1 for final in finals if final["status"] == "posted")
