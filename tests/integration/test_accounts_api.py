"""Accounts over HTTP: create (idempotent by id), read, list with keyset pagination."""

from __future__ import annotations

from litestar.testing import AsyncTestClient

from tests.integration.helpers import assert_problem, open_account


async def test_an_account_is_created_once_and_replayed_on_repeat(client: AsyncTestClient, uid: str) -> None:
    """201 with the account, 200 with `Idempotent-Replayed: true` for the same fields, and
    409 for other fields under the same id, which leaves the stored account unchanged."""
    body = {"id": f"acct-{uid}", "currency": "EUR", "name": "Alice", "metadata": {"tier": "gold"}}
    created = await client.post("/v1/accounts", json=body)
    assert created.status_code == 201
    account = created.json()
    assert account["balance"] == {"posted": 0, "pending_debits": 0, "pending_credits": 0, "available": 0}
    assert account["entries_count"] == 0 and account["allow_negative_balance"] is False
    assert account["created_at"].endswith("Z") and len(account["created_at"]) == len("2026-11-24T21:59:03.123456Z")

    again = await client.post("/v1/accounts", json={**body, "metadata": {"tier": "gold"}})
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == account

    conflict = await client.post("/v1/accounts", json={**body, "name": "Mallory"})
    assert_problem(conflict, 409, "account_exists_with_different_fields")
    assert (await client.get(f"/v1/accounts/acct-{uid}")).json()["name"] == "Alice"


async def test_without_an_id_the_service_picks_a_new_one(client: AsyncTestClient) -> None:
    first = await client.post("/v1/accounts", json={"currency": "USD"})
    second = await client.post("/v1/accounts", json={"currency": "USD"})
    assert first.status_code == second.status_code == 201
    assert first.json()["id"] != second.json()["id"]
    assert (await client.get(f"/v1/accounts/{first.json()['id']}")).status_code == 200


async def test_unknown_accounts_are_404(client: AsyncTestClient, uid: str) -> None:
    assert_problem(await client.get(f"/v1/accounts/missing-{uid}"), 404, "account_not_found")
    # Ids that could never exist are answered without reaching the database.
    assert_problem(await client.get("/v1/accounts/bad%00id"), 404, "account_not_found")
    assert_problem(await client.get("/v1/accounts/" + "x" * 65), 404, "account_not_found")


async def test_listing_walks_every_account_once_in_id_order(client: AsyncTestClient, uid: str) -> None:
    """Pages of 2, followed by cursor to the end: ids strictly ascending, none repeated,
    all of this test's accounts present; the currency filter keeps only that currency."""
    mine = {f"list-{uid}-{i}" for i in range(5)}
    for account_id in mine:
        await open_account(client, account_id, currency="JPY")
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2, "currency": "JPY"}
        if cursor:
            params["cursor"] = cursor
        page = (await client.get("/v1/accounts", params=params)).json()
        assert len(page["data"]) <= 2
        assert all(account["currency"] == "JPY" for account in page["data"])
        seen.extend(account["id"] for account in page["data"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(set(seen)) and mine <= set(seen)
