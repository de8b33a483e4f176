"""Two-phase transfers and reversals over HTTP: reservations, post (full or partial),
void, expiry (lazy and swept), and every code of the contract's two-phase and reversal
sections."""

from __future__ import annotations

import asyncio

from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.http.app import create_app
from tests import provision
from tests.conftest import authorized
from tests.integration.helpers import assert_problem, open_account, transfer


async def balance(client: AsyncTestClient, account_id: str) -> dict:
    return (await client.get(f"/v1/accounts/{account_id}")).json()["balance"]


async def setup(client: AsyncTestClient, uid: str, funds: int = 1000) -> tuple[str, str, str]:
    bank, payer, shop = f"bank-{uid}", f"payer-{uid}", f"shop-{uid}"
    await open_account(client, bank, negative=True)
    await open_account(client, payer)
    await open_account(client, shop)
    assert (await transfer(client, f"fund-{uid}", bank, payer, funds)).status_code == 201
    return bank, payer, shop


async def test_a_reservation_holds_funds_and_posting_part_of_it_releases_the_rest(
    client: AsyncTestClient, uid: str
) -> None:
    """Authorise 300 then capture 200: while pending, 300 is unavailable to the payer and
    nothing is posted; after the post, 200 moved (journaled under the pending id), the
    other 100 is free again; repeating the post answers the same, other decisions 409."""
    _, payer, shop = await setup(client, uid)
    created = await transfer(client, f"auth-{uid}", payer, shop, 300, pending=True, timeout_seconds=3600)
    assert created.status_code == 201
    body = created.json()
    assert body["status"] == "pending" and body["pending"] is True and body["expires_at"] is not None
    assert await balance(client, payer) == {
        "posted": 1000,
        "pending_debits": 300,
        "pending_credits": 0,
        "available": 700,
    }
    assert (await balance(client, shop))["pending_credits"] == 300
    assert_problem(await transfer(client, f"over-{uid}", payer, shop, 701), 422, "insufficient_funds")

    assert_problem(
        await client.post(f"/v1/transfers/auth-{uid}/post", json={"amount": 301}), 422, "exceeds_pending_amount"
    )
    posted = await client.post(f"/v1/transfers/auth-{uid}/post", json={"amount": 200})
    assert posted.status_code == 200
    assert posted.json()["status"] == "posted" and posted.json()["posted_amount"] == 200
    assert await balance(client, payer) == {"posted": 800, "pending_debits": 0, "pending_credits": 0, "available": 800}
    assert await balance(client, shop) == {"posted": 200, "pending_debits": 0, "pending_credits": 0, "available": 200}
    entries = (await client.get(f"/v1/accounts/{shop}/entries")).json()["data"]
    assert [(e["transfer_id"], e["amount"]) for e in entries] == [(f"auth-{uid}", 200)]

    again = await client.post(f"/v1/transfers/auth-{uid}/post", json={"amount": 200})
    assert again.status_code == 200 and again.json() == posted.json()
    assert_problem(
        await client.post(f"/v1/transfers/auth-{uid}/post", json={"amount": 100}),
        409,
        "pending_transfer_already_posted",
    )
    assert_problem(await client.post(f"/v1/transfers/auth-{uid}/void", json={}), 409, "pending_transfer_already_posted")
    # The creation replays with its original answer: status pending, as first returned.
    replay = await transfer(client, f"auth-{uid}", payer, shop, 300, pending=True, timeout_seconds=3600)
    assert replay.headers["idempotent-replayed"] == "true" and replay.json()["status"] == "pending"


async def test_void_releases_the_reservation_once(client: AsyncTestClient, uid: str) -> None:
    _, payer, shop = await setup(client, uid)
    await transfer(client, f"auth-{uid}", payer, shop, 400, pending=True)
    voided = await client.post(f"/v1/transfers/auth-{uid}/void", json={})
    assert voided.status_code == 200 and voided.json()["status"] == "voided"
    assert (await client.post(f"/v1/transfers/auth-{uid}/void", json={})).json() == voided.json()
    assert_problem(await client.post(f"/v1/transfers/auth-{uid}/post", json={}), 409, "pending_transfer_already_voided")
    assert await balance(client, payer) == {
        "posted": 1000,
        "pending_debits": 0,
        "pending_credits": 0,
        "available": 1000,
    }
    assert (await balance(client, shop))["pending_credits"] == 0


async def test_decisions_on_what_is_not_pending(client: AsyncTestClient, uid: str) -> None:
    _, payer, shop = await setup(client, uid)
    await transfer(client, f"plain-{uid}", payer, shop, 5)
    assert_problem(await client.post(f"/v1/transfers/plain-{uid}/post", json={}), 409, "transfer_not_pending")
    assert_problem(await client.post(f"/v1/transfers/plain-{uid}/void", json={}), 409, "transfer_not_pending")
    assert_problem(await client.post(f"/v1/transfers/ghost-{uid}/post", json={}), 404, "transfer_not_found")
    refused = await transfer(client, f"big-{uid}", payer, shop, 10_000, pending=True)
    assert_problem(refused, 422, "insufficient_funds")
    assert_problem(await client.post(f"/v1/transfers/big-{uid}/post", json={}), 409, "transfer_not_pending")
    assert_problem(await client.post(f"/v1/transfers/plain-{uid}/post", json={"amount": 0}), 400, "validation_error")


async def test_an_expired_reservation_reads_as_expired_and_frees_its_funds_lazily(
    service_database_url: str, engine: AsyncEngine, uid: str
) -> None:
    """After expires_at, before anything released it: reads show `expired` and the funds
    available. (The test holds the transfer's row, which every sweeper in the session
    skips.) Then a post is refused with pending_transfer_expired, and that decision
    stores the expiry: the reservation is released in the database."""
    settings = provision.settings_for(service_database_url, expiry_sweep_interval_seconds=0)
    async with authorized(AsyncTestClient(create_app(settings))) as client:
        _, payer, shop = await setup(client, uid)
        await transfer(client, f"auth-{uid}", payer, shop, 600, pending=True, timeout_seconds=1)
        assert (await balance(client, payer))["available"] == 400
        async with engine.connect() as holder:
            transaction = await holder.begin()
            held = text("SELECT status FROM transfers WHERE id = :id FOR UPDATE")
            assert (await holder.execute(held, {"id": f"auth-{uid}"})).scalar() == "pending"
            await asyncio.sleep(1.2)
            assert (await client.get(f"/v1/transfers/auth-{uid}")).json()["status"] == "expired"
            assert await balance(client, payer) == {
                "posted": 1000,
                "pending_debits": 0,
                "pending_credits": 0,
                "available": 1000,
            }
            listed = (await client.get("/v1/transfers", params={"account_id": payer, "status": "expired"})).json()[
                "data"
            ]
            assert [t["id"] for t in listed] == [f"auth-{uid}"]
            stored = (
                await holder.execute(text("SELECT status FROM transfers WHERE id = :id"), {"id": f"auth-{uid}"})
            ).scalar()
            assert stored == "pending", "nothing has released it yet"
            await transaction.rollback()
        assert_problem(await client.post(f"/v1/transfers/auth-{uid}/post", json={}), 409, "pending_transfer_expired")
        async with engine.connect() as connection:
            row = (
                await connection.execute(
                    text(
                        "SELECT t.status, a.pending_debits FROM transfers t JOIN accounts a ON a.id = t.debit_account_id WHERE t.id = :id"
                    ),
                    {"id": f"auth-{uid}"},
                )
            ).one()
        assert tuple(row) == ("expired", 0)
        # A new spend of the whole balance is allowed: the decision sees the release.
        assert (await transfer(client, f"spend-{uid}", payer, shop, 1000)).status_code == 201


async def test_the_sweeper_releases_due_reservations_on_its_own(
    service_database_url: str, engine: AsyncEngine, uid: str
) -> None:
    settings = provision.settings_for(service_database_url, expiry_sweep_interval_seconds=0.2)
    async with authorized(AsyncTestClient(create_app(settings))) as client:
        _, payer, shop = await setup(client, uid)
        await transfer(client, f"auth-{uid}", payer, shop, 250, pending=True, timeout_seconds=1)
        query = text(
            "SELECT t.status, a.pending_debits, c.pending_credits FROM transfers t "
            "JOIN accounts a ON a.id = t.debit_account_id JOIN accounts c ON c.id = t.credit_account_id WHERE t.id = :id"
        )
        for _ in range(50):
            await asyncio.sleep(0.1)
            async with engine.connect() as connection:
                row = tuple((await connection.execute(query, {"id": f"auth-{uid}"})).one())
            if row[0] == "expired":
                break
        assert row == ("expired", 0, 0)


async def test_reversals_add_up_to_at_most_the_posted_amount(client: AsyncTestClient, uid: str) -> None:
    """Refund 30 then the rest (default amount): each reversal is a new posted transfer in
    the opposite direction with reversal_of set; a third is refused with
    exceeds_reversible_amount, recorded and replayed; a reversal id is idempotent."""
    _, payer, shop = await setup(client, uid)
    await transfer(client, f"buy-{uid}", payer, shop, 100)
    first = await client.post(f"/v1/transfers/buy-{uid}/reverse", json={"id": f"refund1-{uid}", "amount": 30})
    assert first.status_code == 201
    refund = first.json()
    assert refund["reversal_of"] == f"buy-{uid}" and refund["status"] == "posted"
    assert (refund["debit_account_id"], refund["credit_account_id"], refund["amount"]) == (shop, payer, 30)
    again = await client.post(f"/v1/transfers/buy-{uid}/reverse", json={"id": f"refund1-{uid}", "amount": 30})
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true" and again.json() == refund
    assert_problem(
        await client.post(f"/v1/transfers/buy-{uid}/reverse", json={"id": f"refund1-{uid}", "amount": 31}),
        409,
        "transfer_exists_with_different_fields",
    )
    rest = await client.post(f"/v1/transfers/buy-{uid}/reverse", json={"id": f"refund2-{uid}"})
    assert rest.status_code == 201 and rest.json()["amount"] == 70
    too_much = await client.post(f"/v1/transfers/buy-{uid}/reverse", json={"id": f"refund3-{uid}", "amount": 1})
    assert_problem(too_much, 422, "exceeds_reversible_amount")
    replayed = await client.post(f"/v1/transfers/buy-{uid}/reverse", json={"id": f"refund3-{uid}", "amount": 1})
    assert replayed.status_code == 422 and replayed.headers["idempotent-replayed"] == "true"
    assert await balance(client, payer) == {
        "posted": 1000,
        "pending_debits": 0,
        "pending_credits": 0,
        "available": 1000,
    }
    assert (await balance(client, shop))["posted"] == 0


async def test_only_posted_transfers_are_reversed_and_refunds_need_funds(client: AsyncTestClient, uid: str) -> None:
    bank, payer, shop = await setup(client, uid)
    await transfer(client, f"auth-{uid}", payer, shop, 10, pending=True)
    assert_problem(
        await client.post(f"/v1/transfers/auth-{uid}/reverse", json={"id": f"r1-{uid}"}), 422, "transfer_not_posted"
    )
    assert_problem(
        await client.post(f"/v1/transfers/ghost-{uid}/reverse", json={"id": f"r2-{uid}"}), 404, "transfer_not_found"
    )
    await transfer(client, f"buy-{uid}", payer, shop, 100)
    await transfer(client, f"payout-{uid}", shop, bank, 100)  # the shop spent the money
    assert_problem(
        await client.post(f"/v1/transfers/buy-{uid}/reverse", json={"id": f"r3-{uid}"}), 422, "insufficient_funds"
    )
    # A pending transfer, posted partially, is reversible up to what was posted.
    await client.post(f"/v1/transfers/auth-{uid}/post", json={"amount": 4})
    await transfer(client, f"topup-{uid}", bank, shop, 50)
    assert_problem(
        await client.post(f"/v1/transfers/auth-{uid}/reverse", json={"id": f"r4-{uid}", "amount": 5}),
        422,
        "exceeds_reversible_amount",
    )
    assert (await client.post(f"/v1/transfers/auth-{uid}/reverse", json={"id": f"r5-{uid}"})).json()["amount"] == 4


async def test_pending_transfers_in_batches_and_chains(client: AsyncTestClient, uid: str) -> None:
    """A chain of a reservation and a payment is undone whole when the payment fails:
    the reservation does not stay behind."""
    _, payer, shop = await setup(client, uid, funds=100)
    leg = {"debit_account_id": payer, "credit_account_id": shop}
    chain = [
        {**leg, "id": f"hold-{uid}", "amount": 50, "pending": True, "linked": True},
        {**leg, "id": f"pay-{uid}", "amount": 60},
    ]
    results = (await client.post("/v1/transfers/batch", json={"transfers": chain})).json()["results"]
    assert [(r["status"], r.get("code")) for r in results] == [
        ("rejected", "linked_transfer_failed"),
        ("rejected", "insufficient_funds"),
    ]
    assert (await balance(client, payer))["pending_debits"] == 0
    ok = [{**chain[0], "id": f"hold2-{uid}"}, {**chain[1], "id": f"pay2-{uid}", "amount": 50}]
    results = (await client.post("/v1/transfers/batch", json={"transfers": ok})).json()["results"]
    assert [r["status"] for r in results] == ["created", "created"]
    assert results[0]["transfer"]["status"] == "pending"
    assert await balance(client, payer) == {"posted": 50, "pending_debits": 50, "pending_credits": 0, "available": 0}
