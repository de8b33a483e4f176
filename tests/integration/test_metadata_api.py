"""Metadata filters on the account and transfer lists, and balances aggregated over the
accounts a filter matches (`GET /v1/balances/aggregate`), over HTTP against real
PostgreSQL. Each test tags its rows with its own `uid`, so tests share the database
without seeing each other's rows."""

from __future__ import annotations

import asyncio
import itertools
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.http.app import create_app
from tests import provision
from tests.integration.helpers import assert_problem, transfer


async def open_tagged(
    client: AsyncTestClient, account_id: str, metadata: dict[str, str], currency: str = "EUR", negative: bool = False
) -> None:
    body = {"id": account_id, "currency": currency, "metadata": metadata, "allow_negative_balance": negative}
    response = await client.post("/v1/accounts", json=body)
    assert response.status_code == 201, response.text


def query(pairs: dict[str, str], **others: Any) -> str:
    parts = [f"metadata[{quote(key, safe='')}]={quote(value, safe='')}" for key, value in pairs.items()]
    parts += [f"{name}={quote(str(value), safe='')}" for name, value in others.items() if value is not None]
    return "&".join(parts)


async def every_page(client: AsyncTestClient, path: str, limit: int) -> tuple[list[dict], int]:
    """Follow next_cursor to the end: (every item in order, number of pages)."""
    items: list[dict] = []
    separator = "&" if "?" in path else "?"
    url, pages = f"{path}{separator}limit={limit}", 0
    while True:
        response = await client.get(url)
        assert response.status_code == 200, response.text
        body = response.json()
        items += body["data"]
        pages += 1
        assert pages < 100, "pagination does not end"
        if body["next_cursor"] is None:
            return items, pages
        url = f"{path}{separator}limit={limit}&cursor={body['next_cursor']}"


async def test_the_account_filter_pages_through_every_match_and_no_other(client: AsyncTestClient, uid: str) -> None:
    """Seven gold, five silver and two untagged accounts of one group, plus look-alikes
    (another group, another currency, the pair split across two accounts): paging three
    at a time through `group=uid&tier=gold` returns exactly the seven, in id order, in
    three pages; each pair alone widens the answer (AND, not OR); a value no account
    has returns nothing; `currency` narrows it further."""
    gold = [f"{uid}-gold-{n:02d}" for n in range(7)]
    silver = [f"{uid}-silver-{n:02d}" for n in range(5)]
    for account_id in gold:
        await open_tagged(client, account_id, {"group": uid, "tier": "gold", "n": account_id[-2:]})
    for account_id in silver:
        await open_tagged(client, account_id, {"group": uid, "tier": "silver"})
    await open_tagged(client, f"{uid}-plain-1", {"group": uid})
    await open_tagged(client, f"{uid}-plain-2", {})
    await open_tagged(client, f"{uid}-other-group", {"group": f"{uid}x", "tier": "gold"})
    await open_tagged(client, f"{uid}-usd-gold", {"group": uid, "tier": "gold"}, currency="USD")
    await open_tagged(client, f"{uid}-split-1", {"grp": uid, "tier": "gold"})

    items, pages = await every_page(client, f"/v1/accounts?{query({'group': uid, 'tier': 'gold'})}", 3)
    assert [a["id"] for a in items] == sorted([*gold, f"{uid}-usd-gold"]) and pages == 3
    assert all(a["metadata"]["group"] == uid and a["metadata"]["tier"] == "gold" for a in items)

    eur_gold, _ = await every_page(client, f"/v1/accounts?{query({'group': uid, 'tier': 'gold'}, currency='EUR')}", 3)
    assert [a["id"] for a in eur_gold] == gold
    group, _ = await every_page(client, f"/v1/accounts?{query({'group': uid})}", 5)
    assert len(group) == 7 + 5 + 1 + 1  # gold, silver, plain-1, usd-gold
    one, _ = await every_page(client, f"/v1/accounts?{query({'group': uid, 'n': '03'})}", 5)
    assert [a["id"] for a in one] == [f"{uid}-gold-03"]
    for pairs in ({"group": uid, "tier": "bronze"}, {"group": f"{uid}-none"}, {"tier": "gold", "grp": f"{uid}x"}):
        response = await client.get(f"/v1/accounts?{query(pairs)}")
        assert response.status_code == 200 and response.json() == {"data": [], "next_cursor": None}, pairs


async def test_a_cursor_keeps_its_filter_and_one_from_another_filter_still_works(
    client: AsyncTestClient, uid: str
) -> None:
    """A cursor is a position in the id order: with the filter it continues the filtered
    list; one issued for the unfiltered list (or another filter) is a valid position too,
    and the filtered list continues after it, never a 400 or a 5xx."""
    for n in range(6):
        await open_tagged(client, f"{uid}-c{n}", {"group": uid, "odd": str(n % 2)})
    first = (await client.get(f"/v1/accounts?{query({'group': uid, 'odd': '1'})}&limit=1")).json()
    assert [a["id"] for a in first["data"]] == [f"{uid}-c1"]
    rest = (await client.get(f"/v1/accounts?{query({'group': uid, 'odd': '1'})}&cursor={first['next_cursor']}")).json()
    assert [a["id"] for a in rest["data"]] == [f"{uid}-c3", f"{uid}-c5"] and rest["next_cursor"] is None
    # A cursor taken from the even accounts' list, used with the odd filter.
    even = (await client.get(f"/v1/accounts?{query({'group': uid, 'odd': '0'})}&limit=3")).json()
    assert [a["id"] for a in even["data"]] == [f"{uid}-c0", f"{uid}-c2", f"{uid}-c4"]
    after_c2 = (await client.get(f"/v1/accounts?{query({'group': uid, 'odd': '0'})}&limit=2")).json()["next_cursor"]
    crossed = (await client.get(f"/v1/accounts?{query({'group': uid, 'odd': '1'})}&cursor={after_c2}")).json()
    assert [a["id"] for a in crossed["data"]] == [f"{uid}-c3", f"{uid}-c5"]


async def test_the_transfer_filter_pages_and_combines_with_account_and_status(
    client: AsyncTestClient, uid: str
) -> None:
    """Nine transfers of one batch (five `kind=fee`), two pending among the fees, and
    transfers of another batch: `batch&kind=fee` pages two at a time through exactly the
    five fees, oldest first; with `account_id` only those touching that account; with
    `status=pending` only the two reservations; untagged transfers never match."""
    bank, alice, bob = f"{uid}-bank", f"{uid}-alice", f"{uid}-bob"
    await open_tagged(client, bank, {}, negative=True)
    await open_tagged(client, alice, {})
    await open_tagged(client, bob, {})
    expected_fees: list[str] = []
    for n in range(9):
        kind = "fee" if n % 2 == 0 else "payment"
        credit = alice if n < 5 else bob
        pending = kind == "fee" and n >= 6
        fields: dict[str, Any] = {"metadata": {"batch": uid, "kind": kind}}
        if pending:
            fields["pending"] = True
        response = await transfer(client, f"{uid}-t{n}", bank, credit, 100 + n, **fields)
        assert response.status_code == 201, response.text
        if kind == "fee":
            expected_fees.append(f"{uid}-t{n}")
    response = await transfer(client, f"{uid}-other", bank, alice, 5, metadata={"batch": f"{uid}-2", "kind": "fee"})
    assert response.status_code == 201
    assert (await transfer(client, f"{uid}-untagged", bank, alice, 5)).status_code == 201

    fees, pages = await every_page(client, f"/v1/transfers?{query({'batch': uid, 'kind': 'fee'})}", 2)
    assert [t["id"] for t in fees] == expected_fees and pages == 3
    on_bob, _ = await every_page(client, f"/v1/transfers?{query({'batch': uid, 'kind': 'fee'}, account_id=bob)}", 2)
    assert [t["id"] for t in on_bob] == [f"{uid}-t6", f"{uid}-t8"]
    held, _ = await every_page(client, f"/v1/transfers?{query({'batch': uid}, status='pending')}", 2)
    assert [t["id"] for t in held] == [f"{uid}-t6", f"{uid}-t8"]
    payments, _ = await every_page(client, f"/v1/transfers?{query({'batch': uid, 'kind': 'payment'})}", 10)
    assert [t["id"] for t in payments] == [f"{uid}-t1", f"{uid}-t3", f"{uid}-t5", f"{uid}-t7"]
    none = (await client.get(f"/v1/transfers?{query({'batch': uid, 'kind': 'refund'})}")).json()
    assert none == {"data": [], "next_cursor": None}


MALFORMED = [
    ("metadata=x", "metadata"),
    ("metadata[a=x", "metadata[a"),
    ("metadata[]=x", "metadata[]"),
    ("metadata]=x", "metadata]"),
    ("metadata[a]x=1", "metadata[a]x"),
    ("metadata.tier=gold", "metadata.tier"),
    ("metadata[a]=1&metadata[a]=2", "metadata[a]"),
    ("metadata[" + "k" * 65 + "]=1", "metadata[" + "k" * 64 + "]"),
    ("metadata[a]=" + "v" * 513, "metadata[a]"),
    ("metadata[a]=x%00y", "metadata[a]"),
    ("metadata[a%00]=x", "metadata[a\x00]"),
    ("metadata[a]=%FF", "metadata[a]"),
    ("metadata%5Bb%FF%5D=1", "metadata"),
    ("&".join(f"metadata[k{n}]=v" for n in range(17)), "metadata"),
]


@pytest.mark.parametrize("path", ["/v1/accounts", "/v1/transfers", "/v1/balances/aggregate?currency=EUR"])
@pytest.mark.parametrize(("bad", "field"), MALFORMED)
async def test_a_malformed_filter_is_a_400_naming_the_parameter(
    client: AsyncTestClient, path: str, bad: str, field: str
) -> None:
    """Never ignored (that would widen the answer), never a 5xx: each malformed filter is
    400 `validation_error` whose `errors` names the parameter."""
    separator = "&" if "?" in path else "?"
    body = assert_problem(await client.get(f"{path}{separator}{bad}"), 400, "validation_error")
    assert [error["field"] for error in body["errors"]] == [field], body


@pytest.mark.parametrize("path", ["/v1/accounts", "/v1/transfers", "/v1/balances/aggregate?currency=EUR"])
async def test_the_limits_themselves_and_a_repeated_pair_are_accepted(client: AsyncTestClient, path: str) -> None:
    """The boundaries are inside: 16 keys, a key of 64 characters, a value of 512, the
    same pair twice, non-ASCII text, a key holding brackets."""
    separator = "&" if "?" in path else "?"
    for good in (
        "&".join(f"metadata[k{n}]=v" for n in range(16)),
        "metadata[" + "k" * 64 + "]=" + "v" * 512,
        "metadata[a]=1&metadata[a]=1",
        f"metadata[{quote('région')}]={quote('île-de-France ✓')}",
        "metadata[a]b]=c",
    ):
        response = await client.get(f"{path}{separator}{good}")
        assert response.status_code == 200, (good, response.text)


async def test_a_key_with_brackets_and_unicode_matches_exactly(client: AsyncTestClient, uid: str) -> None:
    """Everything between `metadata[` and the last `]` is the key, percent-decoded as
    UTF-8: keys with brackets and values with `&`, `=`, `+` and accents find their row."""
    pairs = {"a]b[c": "x&y=z+1 ✓", "région": "Île"}
    await open_tagged(client, f"{uid}-odd", {**pairs, "group": uid})
    found = (await client.get(f"/v1/accounts?{query({**pairs, 'group': uid})}")).json()["data"]
    assert [a["id"] for a in found] == [f"{uid}-odd"]


def own_currency(first: str, uid: str) -> str:
    """A currency code only one test's accounts use: its own first letter (Q, R, ...:
    letters no other test's currencies start with), then two from its uid."""
    return first + "".join(chr(ord("A") + int(digit, 16)) for digit in uid[:2])


async def aggregate(client: AsyncTestClient, pairs: dict[str, str] | None, **others: Any) -> dict[str, Any]:
    response = await client.get(f"/v1/balances/aggregate?{query(pairs or {}, **others)}")
    assert response.status_code == 200, response.text
    return response.json()


async def test_the_aggregate_sums_the_matching_accounts_as_the_list_shows_them(
    client: AsyncTestClient, uid: str
) -> None:
    """Five tagged accounts with posted money and reservations both ways: the aggregate
    equals the sums of the same accounts' balances read from `GET /v1/accounts` with the
    same filter; untagged accounts, other currencies and other tiers add nothing."""
    bank = f"{uid}-bank"
    await open_tagged(client, bank, {"group": uid, "tier": "bank"}, negative=True)
    members = [f"{uid}-m{n}" for n in range(5)]
    for account_id in members:
        await open_tagged(client, account_id, {"group": uid, "tier": "gold"})
    await open_tagged(client, f"{uid}-outsider", {"group": f"{uid}-no"})
    await open_tagged(client, f"{uid}-usd", {"group": uid, "tier": "gold"}, currency="USD")
    await open_tagged(client, f"{uid}-usd-bank", {}, currency="USD", negative=True)
    for n, account_id in enumerate(members):
        assert (await transfer(client, f"{uid}-in{n}", bank, account_id, 10_000 * (n + 1))).status_code == 201
    assert (await transfer(client, f"{uid}-x1", members[0], members[1], 2_500)).status_code == 201
    assert (await transfer(client, f"{uid}-out", members[2], f"{uid}-outsider", 1_000)).status_code == 201
    assert (await transfer(client, f"{uid}-hold1", members[3], bank, 4_000, pending=True)).status_code == 201
    assert (await transfer(client, f"{uid}-hold2", bank, members[4], 700, pending=True)).status_code == 201
    assert (await transfer(client, f"{uid}-usd1", f"{uid}-usd-bank", f"{uid}-usd", 99)).status_code == 201

    gold = {"group": uid, "tier": "gold"}
    listed, _ = await every_page(client, f"/v1/accounts?{query(gold, currency='EUR')}", 2)
    assert [a["id"] for a in listed] == members
    expected = {
        field: sum(a["balance"][field] for a in listed)
        for field in ("posted", "pending_debits", "pending_credits", "available")
    }
    total = await aggregate(client, gold, currency="EUR")
    assert total == {"currency": "EUR", "accounts": 5, **expected, "as_of": total["as_of"]}
    assert expected == {
        "posted": 150_000 - 1_000,
        "pending_debits": 4_000,
        "pending_credits": 700,
        "available": 150_000 - 1_000 - 4_000,
    }
    # The whole group of the currency, the bank included: money only moved within it
    # except the 1,000 to the outsider.
    group = await aggregate(client, {"group": uid}, currency="EUR")
    assert group["accounts"] == 6 and group["posted"] == -1_000
    assert group["pending_debits"] == group["pending_credits"] == 4_700
    usd = await aggregate(client, gold, currency="USD")
    assert (usd["accounts"], usd["posted"]) == (1, 99)
    assert (await aggregate(client, {"group": uid, "tier": "none"}, currency="EUR"))["accounts"] == 0
    # Without a filter: every account of a currency only this test uses.
    currency = own_currency("Q", uid)
    await open_tagged(client, f"{uid}-own-bank", {}, currency=currency, negative=True)
    for n in range(3):
        await open_tagged(client, f"{uid}-own{n}", {"group": uid}, currency=currency)
        assert (
            await transfer(client, f"{uid}-own-in{n}", f"{uid}-own-bank", f"{uid}-own{n}", 10 + n)
        ).status_code == 201
    everything = await aggregate(client, None, currency=currency)
    assert (everything["accounts"], everything["posted"]) == (4, 0)  # money is conserved
    own = await aggregate(client, {"group": uid}, currency=currency)
    assert (own["accounts"], own["posted"], own["available"]) == (3, 33, 33)


async def test_the_aggregate_as_of_equals_the_per_account_balances_then(client: AsyncTestClient, uid: str) -> None:
    """At each instant between transfers (taken from the transfers' own times), the
    aggregate's `posted` equals the sum of `GET /v1/accounts/{id}/balance?as_of=` over
    the matching accounts, and its pending totals are the reservations alive then: one
    made before and posted after counts, one voided before does not, one made after
    does not. An account opened after the instant is not counted. In a currency of the
    test's own, the same holds without a filter (the bank included, posted sums to 0):
    the two forms of the statement agree."""
    currency = own_currency("R", uid)
    bank = f"{uid}-bank"
    await open_tagged(client, bank, {}, currency=currency, negative=True)
    members = [f"{uid}-m{n}" for n in range(3)]
    for account_id in members:
        await open_tagged(client, account_id, {"group": uid}, currency=currency)
    moments: list[str] = []

    async def step(transfer_id: str, debit: str, credit: str, amount: int, **fields: Any) -> None:
        response = await transfer(client, transfer_id, debit, credit, amount, **fields)
        assert response.status_code == 201, response.text
        moments.append(response.json()["created_at"])

    await step(f"{uid}-a", bank, members[0], 5_000)
    await step(f"{uid}-b", bank, members[1], 3_000)
    await step(f"{uid}-hold", members[0], members[2], 1_200, pending=True)  # posted later
    await step(f"{uid}-c", members[1], members[2], 500)
    await step(f"{uid}-void", members[1], bank, 300, pending=True)  # voided before the next step
    assert (await client.post(f"/v1/transfers/{uid}-void/void", json={})).status_code == 200
    await step(f"{uid}-d", members[2], bank, 200)
    posted = await client.post(f"/v1/transfers/{uid}-hold/post", json={})
    assert posted.status_code == 200
    moments.append(posted.json()["updated_at"])
    await open_tagged(client, f"{uid}-late", {"group": uid}, currency=currency)

    times = [datetime.fromisoformat(moment) for moment in moments]
    void_time = datetime.fromisoformat((await client.get(f"/v1/transfers/{uid}-void")).json()["updated_at"])
    assert times[4] < void_time < times[5]
    instants = [times[0] - timedelta(microseconds=1), *times, void_time, times[-1] - timedelta(microseconds=1)]
    for at in instants:
        instant = at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        balances = [
            (await client.get(f"/v1/accounts/{account_id}/balance", params={"as_of": instant})).json()["posted"]
            for account_id in members
        ]
        total = await aggregate(client, {"group": uid}, currency=currency, as_of=instant)
        assert total["posted"] == sum(balances), (instant, total, balances)
        assert total["accounts"] == 3 and total["as_of"] == instant
        # The hold was made at times[2] and posted at times[-1]; the other reservation
        # was made at times[4] and voided before transfer d. Each stops counting at the
        # instant it is settled.
        hold_alive = times[2] <= at < times[-1]
        void_alive = times[4] <= at < void_time
        assert total["pending_debits"] == 1_200 * hold_alive + 300 * void_alive, (instant, total)
        assert total["pending_credits"] == 1_200 * hold_alive, (instant, total)
        assert total["available"] == total["posted"] - total["pending_debits"]
        everything = await aggregate(client, None, currency=currency, as_of=instant)
        assert (everything["accounts"], everything["posted"]) == (4, 0), (instant, everything)
        assert everything["pending_debits"] == everything["pending_credits"] == total["pending_debits"]
    now = await aggregate(client, {"group": uid}, currency=currency)
    assert now["accounts"] == 4 and now["posted"] == 5_000 + 3_000 - 200 and now["pending_debits"] == 0


async def test_a_reservation_past_expiry_counts_as_released_before_the_sweeper_runs(
    service_database_url: str, engine: AsyncEngine, uid: str
) -> None:
    """Reads treat a reservation past its expiry as released before the expiry sweeper
    releases it (lazy expiry); the aggregate nets it out of the stored pending totals
    the same way, so it equals what the account list shows. On an app of its own whose
    sweeper is off, so the stored totals still hold the reservation while it is read
    (checked as the owner: otherwise the test would prove nothing)."""
    settings = provision.settings_for(service_database_url, expiry_sweep_interval_seconds=0)
    async with AsyncTestClient(create_app(settings)) as own:
        own.headers.update(provision.API_HEADERS)
        currency = own_currency("S", uid)
        await open_tagged(own, f"{uid}-bank", {}, currency=currency, negative=True)
        await open_tagged(own, f"{uid}-payer", {"group": uid}, currency=currency)
        await open_tagged(own, f"{uid}-payee", {"group": uid}, currency=currency)
        assert (await transfer(own, f"{uid}-fund", f"{uid}-bank", f"{uid}-payer", 1_000)).status_code == 201
        held = await transfer(own, f"{uid}-hold", f"{uid}-payer", f"{uid}-payee", 400, pending=True, timeout_seconds=1)
        assert held.status_code == 201
        # Other apps of the session sweep the same database: holding the reservation's row
        # keeps their sweepers (FOR UPDATE SKIP LOCKED) off it while it is read.
        async with engine.connect() as holder:
            await holder.execute(text("SELECT 1 FROM transfers WHERE id = :id FOR UPDATE"), {"id": f"{uid}-hold"})
            await asyncio.sleep(1.2)
            total = await aggregate(own, {"group": uid}, currency=currency)
            listed = (await own.get(f"/v1/accounts?{query({'group': uid})}")).json()["data"]
            async with engine.connect() as connection:
                stored = await connection.scalar(
                    text("SELECT pending_debits FROM accounts WHERE id = :id"), {"id": f"{uid}-payer"}
                )
            await holder.rollback()
    assert stored == 400, "the reservation was released: the lazy path was not exercised"
    assert sum(a["balance"]["pending_debits"] for a in listed) == 0
    assert (total["pending_debits"], total["pending_credits"], total["available"]) == (0, 0, 1_000), total


async def test_the_aggregate_refuses_what_it_cannot_answer(client: AsyncTestClient) -> None:
    """No currency, a malformed one, an `as_of` without an offset or in the future:
    400 `validation_error` naming the field, never a 5xx."""
    assert_problem(await client.get("/v1/balances/aggregate"), 400, "validation_error")
    for currency in ("eur", "EURO", "E1R"):
        assert_problem(await client.get(f"/v1/balances/aggregate?currency={currency}"), 400, "validation_error")
    soon = (datetime.now().astimezone() + timedelta(minutes=5)).isoformat()
    body = assert_problem(
        await client.get("/v1/balances/aggregate", params={"currency": "EUR", "as_of": soon}), 400, "validation_error"
    )
    assert body["errors"] == [{"field": "as_of", "message": "must not be later than now"}]
    assert_problem(
        await client.get("/v1/balances/aggregate", params={"currency": "EUR", "as_of": "2026-01-01T00:00:00"}),
        400,
        "validation_error",
    )


@pytest.mark.slow
async def test_the_aggregate_reads_one_snapshot_while_money_moves_between_matching_accounts(
    server_url: str, api_headers: dict[str, str], uid: str
) -> None:
    """Four writers move money back and forth between two matching accounts (posted
    transfers, and reservations they then post) while a reader asks for the aggregate
    again and again: every answer shows the same posted total, the available total
    never above it. The teeth: the same two accounts summed from two separate reads in
    the same loop do see money in flight (a transfer committed between the two reads),
    so reads and writes really interleaved. Against a real server process: the
    in-process test client serves one request at a time."""
    first, second, bank = f"{uid}-p", f"{uid}-q", f"{uid}-bank"
    async with httpx.AsyncClient(base_url=server_url, headers=api_headers, timeout=30) as http:
        await open_tagged(http, bank, {}, negative=True)  # type: ignore[arg-type]
        await open_tagged(http, first, {"group": uid})  # type: ignore[arg-type]
        await open_tagged(http, second, {"group": uid})  # type: ignore[arg-type]
        assert (await transfer(http, f"{uid}-fund-p", bank, first, 1_000_000)).status_code == 201
        assert (await transfer(http, f"{uid}-fund-q", bank, second, 1_000_000)).status_code == 201
        counter = itertools.count()
        done = asyncio.Event()

        async def writer(direction: int) -> None:
            for _ in range(40):
                number = next(counter)
                debit, credit = (first, second) if direction else (second, first)
                pending = number % 4 == 0
                response = await transfer(http, f"{uid}-w{number}", debit, credit, 1 + number % 97, pending=pending)
                assert response.status_code == 201, response.text
                if pending:
                    assert (await http.post(f"/v1/transfers/{uid}-w{number}/post", json={})).status_code == 200

        totals: list[int] = []
        naive: list[int] = []

        async def reader() -> None:
            while not done.is_set():
                response = await http.get(f"/v1/balances/aggregate?{query({'group': uid}, currency='EUR')}")
                assert response.status_code == 200, response.text
                total = response.json()
                assert total["accounts"] == 2 and total["available"] <= total["posted"], total
                totals.append(total["posted"])
                one = (await http.get(f"/v1/accounts/{first}")).json()["balance"]["posted"]
                other = (await http.get(f"/v1/accounts/{second}")).json()["balance"]["posted"]
                naive.append(one + other)

        reading = asyncio.create_task(reader())
        try:
            await asyncio.gather(*(writer(n % 2) for n in range(4)))
        finally:
            done.set()
            await reading
    assert len(totals) >= 10, totals
    assert set(totals) == {2_000_000}, sorted(set(totals))
    assert set(naive) != {2_000_000}, "no read saw money in flight: the writes did not interleave with the reads"
