"""Transfers over HTTP: every outcome the contract names, each permanent per id."""

from __future__ import annotations

from litestar.testing import AsyncTestClient

from tests.integration.helpers import assert_problem, open_account, transfer


async def test_a_transfer_moves_money_once_and_replays_identically(client: AsyncTestClient, uid: str) -> None:
    await open_account(client, f"bank-{uid}", negative=True)
    await open_account(client, f"alice-{uid}")
    first = await transfer(
        client, f"t-{uid}", f"bank-{uid}", f"alice-{uid}", 1250, description="salary", metadata={"k": "v"}
    )
    assert first.status_code == 201
    assert first.headers["location"] == f"/v1/transfers/t-{uid}"
    body = first.json()
    assert body["status"] == "posted" and body["code"] is None and body["currency"] == "EUR"
    assert body["amount"] == 1250 and body["pending"] is False and body["reversal_of"] is None
    assert "idempotent-replayed" not in first.headers

    again = await transfer(
        client, f"t-{uid}", f"bank-{uid}", f"alice-{uid}", 1250, description="salary", metadata={"k": "v"}
    )
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content

    alice = (await client.get(f"/v1/accounts/alice-{uid}")).json()
    bank = (await client.get(f"/v1/accounts/bank-{uid}")).json()
    assert alice["balance"]["posted"] == 1250 and alice["entries_count"] == 1
    assert bank["balance"]["posted"] == -1250
    assert (await client.get(f"/v1/transfers/t-{uid}")).json() == body


async def test_same_id_with_other_fields_is_a_conflict_and_changes_nothing(client: AsyncTestClient, uid: str) -> None:
    await open_account(client, f"bank-{uid}", negative=True)
    await open_account(client, f"bob-{uid}")
    assert (await transfer(client, f"t-{uid}", f"bank-{uid}", f"bob-{uid}", 100)).status_code == 201
    for change in ({"amount": 101}, {"currency": "EUR"}, {"description": "other"}):
        response = await transfer(client, f"t-{uid}", f"bank-{uid}", f"bob-{uid}", change.pop("amount", 100), **change)
        assert_problem(response, 409, "transfer_exists_with_different_fields")
    assert (await client.get(f"/v1/accounts/bob-{uid}")).json()["balance"]["posted"] == 100


async def test_each_refusal_is_recorded_and_replayed_with_its_code(client: AsyncTestClient, uid: str) -> None:
    """404 account_not_found, 422 insufficient_funds, currency_mismatch and
    accounts_must_be_different: each is stored as a rejected transfer under its id, a
    repeat gets the identical answer flagged as a replay, and no money moves even after
    the cause is gone (an id's outcome is permanent)."""
    await open_account(client, f"eur-{uid}")
    await open_account(client, f"usd-{uid}", currency="USD")
    await open_account(client, f"bank-{uid}", negative=True)
    cases = [
        (f"nf-{uid}", f"eur-{uid}", f"ghost-{uid}", 1, {}, 404, "account_not_found"),
        (f"nsf-{uid}", f"eur-{uid}", f"bank-{uid}", 1, {}, 422, "insufficient_funds"),
        (f"fx-{uid}", f"bank-{uid}", f"usd-{uid}", 1, {}, 422, "currency_mismatch"),
        (f"fx2-{uid}", f"bank-{uid}", f"eur-{uid}", 1, {"currency": "USD"}, 422, "currency_mismatch"),
        (f"same-{uid}", f"eur-{uid}", f"eur-{uid}", 1, {}, 422, "accounts_must_be_different"),
    ]
    for transfer_id, debit, credit, amount, extra, status, code in cases:
        first = await transfer(client, transfer_id, debit, credit, amount, **extra)
        problem = assert_problem(first, status, code)
        assert problem["transfer_id"] == transfer_id
        again = await transfer(client, transfer_id, debit, credit, amount, **extra)
        assert again.status_code == status and again.headers["idempotent-replayed"] == "true"
        assert again.content == first.content
        stored = (await client.get(f"/v1/transfers/{transfer_id}")).json()
        assert stored["status"] == "rejected" and stored["code"] == code

    # Fund the account now: the refused id stays refused.
    assert (await transfer(client, f"fund-{uid}", f"bank-{uid}", f"eur-{uid}", 10)).status_code == 201
    assert_problem(await transfer(client, f"nsf-{uid}", f"eur-{uid}", f"bank-{uid}", 1), 422, "insufficient_funds")
    assert (await client.get(f"/v1/accounts/eur-{uid}")).json()["balance"]["posted"] == 10


async def test_unknown_transfers_are_404(client: AsyncTestClient, uid: str) -> None:
    assert_problem(await client.get(f"/v1/transfers/none-{uid}"), 404, "transfer_not_found")


async def test_transfers_list_oldest_first_with_filters_and_cursor(client: AsyncTestClient, uid: str) -> None:
    """Filtering by account and status, paging by 2: all of the account's transfers,
    oldest first, none twice; the status filter keeps rejected ones only."""
    await open_account(client, f"bank-{uid}", negative=True)
    await open_account(client, f"carol-{uid}")
    ids = []
    for i in range(5):
        ids.append(f"l{i}-{uid}")
        assert (await transfer(client, ids[-1], f"bank-{uid}", f"carol-{uid}", 10 + i)).status_code == 201
    await transfer(client, f"rej-{uid}", f"carol-{uid}", f"bank-{uid}", 10_000)

    seen, cursor = [], None
    while True:
        params = {"account_id": f"carol-{uid}", "limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/v1/transfers", params=params)).json()
        seen += [t["id"] for t in page["data"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == [*ids, f"rej-{uid}"]
    rejected = (await client.get("/v1/transfers", params={"account_id": f"carol-{uid}", "status": "rejected"})).json()
    assert [t["id"] for t in rejected["data"]] == [f"rej-{uid}"]
    start = (await client.get(f"/v1/transfers/{ids[1]}")).json()["created_at"]
    end = (await client.get(f"/v1/transfers/{ids[3]}")).json()["created_at"]
    window = (await client.get("/v1/transfers", params={"account_id": f"carol-{uid}", "from": start, "to": end})).json()
    assert [t["id"] for t in window["data"]] == ids[1:4]
