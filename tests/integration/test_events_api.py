"""The event feed over HTTP: each kind of change makes its event, once, with the object as
it was right after the change; filters, cursors, long-polls and bad input."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger import migrate
from ledger.http.app import create_app
from tests import provision
from tests.integration.helpers import assert_problem, open_account, transfer


async def drain(client: AsyncTestClient, after: str | None = None, **params: Any) -> tuple[list[dict], str]:
    """Every event after `after` in the feed now (following next_cursor to an empty page)."""
    events: list[dict] = []
    cursor = after
    while True:
        query = {**params, **({"after": cursor} if cursor else {})}
        response = await client.get("/v1/events", params=query)
        assert response.status_code == 200, response.text
        body = response.json()
        assert isinstance(body["next_cursor"], str)
        cursor = body["next_cursor"]
        if not body["data"]:
            return events, cursor
        events += body["data"]


async def head(client: AsyncTestClient) -> str:
    """A cursor at the end of the feed as it is now."""
    _, cursor = await drain(client)
    return cursor


async def settled(client: AsyncTestClient, after: str, uid: str, count: int, **params: Any) -> list[dict]:
    """The events of this test (their object's id holds `uid`) after `after`: long-polls
    until `count` arrived (the sequencer positions writes a moment after they commit),
    then checks that no more come."""
    events: list[dict] = []
    cursor = after
    deadline = time.monotonic() + 20
    while len(events) < count and time.monotonic() < deadline:
        response = await client.get("/v1/events", params={**params, "after": cursor, "wait": 5})
        assert response.status_code == 200, response.text
        cursor = response.json()["next_cursor"]
        events += [e for e in response.json()["data"] if uid in e["data"]["id"]]
    extra, _ = await drain(client, cursor, **params)
    return events + [e for e in extra if uid in e["data"]["id"]]


async def test_every_kind_of_change_makes_one_event_with_the_object_after_it(client: AsyncTestClient, uid: str) -> None:
    start = await head(client)
    bank, alice, shop = f"bank-{uid}", f"alice-{uid}", f"shop-{uid}"
    await open_account(client, bank, negative=True)
    await open_account(client, alice)
    await open_account(client, shop)
    assert (await transfer(client, f"dep-{uid}", bank, alice, 1000)).status_code == 201
    replay = await transfer(client, f"dep-{uid}", bank, alice, 1000)
    assert replay.headers.get("idempotent-replayed") == "true"  # a replay: no event
    assert (await transfer(client, f"big-{uid}", alice, shop, 10**6)).status_code == 422
    assert (await transfer(client, f"hold-{uid}", alice, shop, 300, pending=True)).status_code == 201
    assert (await client.post(f"/v1/transfers/hold-{uid}/post", json={"amount": 250})).status_code == 200
    assert (await transfer(client, f"hold2-{uid}", alice, shop, 100, pending=True)).status_code == 201
    assert (await client.post(f"/v1/transfers/hold2-{uid}/void", json={})).status_code == 200
    assert (
        await client.post(f"/v1/transfers/dep-{uid}/reverse", json={"id": f"rev-{uid}", "amount": 10})
    ).status_code == 201

    events = await settled(client, start, uid, 10)
    assert [(e["type"], e["data"]["id"]) for e in events] == [
        ("account.created", bank),
        ("account.created", alice),
        ("account.created", shop),
        ("transfer.posted", f"dep-{uid}"),
        ("transfer.rejected", f"big-{uid}"),
        ("transfer.pending", f"hold-{uid}"),
        ("transfer.posted", f"hold-{uid}"),
        ("transfer.pending", f"hold2-{uid}"),
        ("transfer.voided", f"hold2-{uid}"),
        ("transfer.posted", f"rev-{uid}"),
    ]
    by = {(e["type"], e["data"]["id"]): e for e in events}
    # The object as it was right after each change, not as it is now.
    assert by["transfer.pending", f"hold-{uid}"]["data"]["status"] == "pending"
    assert by["transfer.pending", f"hold-{uid}"]["data"]["posted_amount"] is None
    assert by["transfer.posted", f"hold-{uid}"]["data"]["posted_amount"] == 250
    assert by["transfer.posted", f"hold-{uid}"]["data"]["status"] == "posted"
    assert by["transfer.rejected", f"big-{uid}"]["data"]["code"] == "insufficient_funds"
    assert by["transfer.posted", f"rev-{uid}"]["data"]["reversal_of"] == f"dep-{uid}"
    assert by["account.created", alice]["data"]["balance"]["posted"] == 0
    current = (await client.get(f"/v1/transfers/hold2-{uid}")).json()
    assert by["transfer.voided", f"hold2-{uid}"]["data"] == current
    ids = [int(e["id"].removeprefix("evt_")) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


async def test_account_changes_are_events_with_the_account_as_it_was_then(client: AsyncTestClient, uid: str) -> None:
    """`account.created` shows the account as opened and each `account.changed` the account
    right after that change (status, limits, name, metadata and balances then), however
    it changed later."""
    start = await head(client)
    bank, alice = f"bank-{uid}", f"alice-{uid}"
    await open_account(client, bank, negative=True)
    created = await client.post(
        "/v1/accounts", json={"id": alice, "currency": "EUR", "name": "Alice", "max_balance": 500}
    )
    assert created.status_code == 201
    assert (await transfer(client, f"dep-{uid}", bank, alice, 200)).status_code == 201
    frozen = (await client.patch(f"/v1/accounts/{alice}", json={"status": "frozen", "name": "Alice F."})).json()
    assert (await client.patch(f"/v1/accounts/{alice}", json={"status": "frozen"})).status_code == 200  # no change
    await client.patch(f"/v1/accounts/{alice}", json={"status": "open", "max_balance": None, "metadata": {"k": "v"}})
    events = [e for e in await settled(client, start, uid, 5) if e["data"]["id"] == alice]
    assert [e["type"] for e in events] == ["account.created", "account.changed", "account.changed"]
    assert events[0]["data"] == created.json()
    assert events[1]["data"] == frozen
    assert events[1]["data"]["balance"]["posted"] == 200 and events[1]["data"]["status"] == "frozen"
    now = (await client.get(f"/v1/accounts/{alice}")).json()
    assert events[2]["data"] == now and now["metadata"] == {"k": "v"} and now["max_balance"] is None


async def test_an_account_event_written_before_account_histories_shows_the_account_as_opened(
    client: AsyncTestClient, engine: AsyncEngine, uid: str
) -> None:
    """`account.created` events written before revision 0008 point at no history row
    (`change_sequence` is null): they render the account as opened from its row (zero
    balances, its status and limits, which nothing could change before 0008), the same
    object a history row gives."""
    start = await head(client)
    account = f"legacy-{uid}"
    created = await client.post(
        "/v1/accounts",
        json={"id": account, "currency": "EUR", "name": "Old", "metadata": {"k": "v"}, "max_balance": 900},
    )
    assert created.status_code == 201
    [event] = [e for e in await settled(client, start, uid, 1) if e["data"]["id"] == account]
    assert event["data"] == created.json()
    async with engine.begin() as connection:
        changed = await connection.execute(
            text("UPDATE events SET change_sequence = NULL WHERE account_id = :a AND type = 'account.created'"),
            {"a": account},
        )
        assert changed.rowcount == 1
    response = await client.get("/v1/events", params={"after": start, "account_id": account})
    [legacy] = response.json()["data"]
    assert legacy == event


async def test_filters_by_type_and_account_and_resumes_from_an_event_id(client: AsyncTestClient, uid: str) -> None:
    start = await head(client)
    bank, a, b = f"bank-{uid}", f"a-{uid}", f"b-{uid}"
    await open_account(client, bank, negative=True)
    await open_account(client, a)
    await open_account(client, b)
    for n in range(5):
        assert (await transfer(client, f"t{n}-{uid}", bank, a if n % 2 else b, 10 + n)).status_code == 201
    everything = await settled(client, start, uid, 8)
    of_a = await settled(client, start, uid, 3, account_id=a)
    assert [e["data"]["id"] for e in of_a] == [a, f"t1-{uid}", f"t3-{uid}"]
    posted = await settled(client, start, uid, 5, types="transfer.posted", limit=2)
    assert [e["data"]["id"] for e in posted] == [f"t{n}-{uid}" for n in range(5)]
    # An event id is a cursor: resume right after it.
    resumed = await settled(client, everything[3]["id"], uid, 4)
    assert resumed == everything[4:]
    # Several filters: both apply.
    both = await settled(client, start, uid, 1, account_id=b, types="account.created")
    assert [e["data"]["id"] for e in both] == [b]


async def test_bad_cursors_types_and_waits_are_400_and_expired_ones_410(client: AsyncTestClient) -> None:
    for params in (
        {"after": "nope"},
        {"after": "evt_-1"},
        {"after": "evt_999999999999"},
        {"types": "transfer.exploded"},
        {"wait": "31"},
        {"wait": "-1"},
        {"limit": "0"},
        {"account_id": "../x"},
    ):
        response = await client.get("/v1/events", params=params)
        assert response.status_code == 400, (params, response.text)
    assert_problem(await client.get("/v1/events", params={"after": "evt_x"}), 400, "invalid_cursor")
    # Empty parameters are no parameters: a consumer's first request may well send them.
    first = await client.get("/v1/events", params={"after": "", "account_id": "", "types": "", "limit": 1})
    assert first.status_code == 200 and first.json() == (await client.get("/v1/events", params={"limit": 1})).json()


@pytest.fixture
def retention_database(postgres_server_url: str, service_login: tuple[str, str]) -> Iterator[str]:
    url = provision.create_database(postgres_server_url, prefix="ledger_retention")
    migrate.upgrade(url)
    yield provision.as_role(url, *service_login)
    provision.drop_database(postgres_server_url, url)


async def test_retention_removes_old_events_and_an_older_cursor_is_410(retention_database: str) -> None:
    """With a retention of three seconds: old events go, a cursor before them answers 410
    `cursor_expired` (the consumer must reconcile, not silently skip), and a consumer
    without a cursor starts at the oldest event kept."""
    settings = dataclasses.replace(provision.settings_for(retention_database), events_retention_days=3 / 86400)
    async with AsyncTestClient(create_app(settings)) as client:
        client.headers.update(provision.API_HEADERS)
        for n in range(3):
            await open_account(client, f"old-{n}")
        old, _ = await drain_until(client, None, 3)
        await asyncio.sleep(4)
        await open_account(client, "new")
        deadline = time.monotonic() + 10
        while (await client.get("/v1/events", params={"after": "evt_0"})).status_code != 410:
            assert time.monotonic() < deadline, "old events were not pruned"
            await asyncio.sleep(0.2)
        assert_problem(await client.get("/v1/events", params={"after": old[0]["id"]}), 410, "cursor_expired")
        kept, _ = await drain_until(client, None, 1)
        assert [e["data"]["id"] for e in kept] == ["new"]
        # The last pruned event is still a valid cursor: nothing after it is gone.
        assert (await client.get("/v1/events", params={"after": old[-1]["id"]})).json()["data"] == kept


async def drain_until(client: AsyncTestClient, after: str | None, count: int) -> tuple[list[dict], str | None]:
    events: list[dict] = []
    cursor = after
    deadline = time.monotonic() + 10
    while len(events) < count:
        assert time.monotonic() < deadline
        response = await client.get("/v1/events", params={"wait": 2, **({"after": cursor} if cursor else {})})
        assert response.status_code == 200, response.text
        events += response.json()["data"]
        cursor = response.json()["next_cursor"]
    return events, cursor
