"""The event feed's guarantee, against real PostgreSQL over real HTTP: 16 writers post,
reserve, post and void reservations, let some expire, reverse, send batches with failing
linked chains and refused transfers, while their group transactions are held open for a
random moment between drawing their events' outbox ids and committing (some for a whole
second), and some are rolled back after writing. A consumer follows `GET /v1/events`
with long-polls meanwhile. Afterwards the consumer has seen every committed change
exactly once, nothing of the rolled-back attempts, and each account's events in the
order of its journal. The teeth: a reader paging the same events by their outbox id
(`WHERE sequence > last_seen`, what a feed built on a sequence does) loses some.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from ledger.http.app import create_app
from ledger.service import groups
from ledger.service.unit_of_work import RetryableConflict
from ledger.settings import Settings
from tests import provision
from tests.servers import serving

pytestmark = pytest.mark.slow

WRITERS = 16
OPERATIONS = 30


class HeldCommit:
    """An asyncpg connection whose COMMIT waits a moment first, or fails (rolled back)."""

    def __init__(self, driver: Any, hold: float, fail: bool) -> None:
        self._driver = driver
        self._hold = hold
        self._fail = fail

    def __getattr__(self, name: str) -> Any:
        return getattr(self._driver, name)

    async def execute(self, query: str, *args: Any, **kwargs: Any) -> Any:
        if query == "COMMIT":
            await asyncio.sleep(self._hold)
            if self._fail:
                # The group's events were written in its transaction: the unit of work
                # rolls it back and runs the group again.
                raise RetryableConflict("injected: roll back after writing")
        return await self._driver.execute(query, *args, **kwargs)


@pytest.fixture
def held_commits(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Every group transaction of the app built in this test holds its COMMIT for up to
    30 ms; one in 12 for a whole second; one in 9 is rolled back after its write."""
    original = groups.apply_group
    counts = Counter()
    turn = itertools.count()

    async def apply_group(driver: Any, members: Any, key: Any, **options: Any) -> Any:
        n = next(turn)
        hold = 1.0 if n % 12 == 5 else random.uniform(0, 0.03)
        fail = n % 9 == 4
        counts["held_long" if hold >= 1 else "held"] += 1
        counts["rolled_back"] += fail
        return await original(HeldCommit(driver, hold, fail), members, key, **options)

    monkeypatch.setattr(groups, "apply_group", apply_group)
    return counts


@pytest.fixture
async def base_url(settings: Settings, held_commits: dict[str, int]) -> AsyncIterator[str]:
    # Reservations expire within the run: the sweeper releases them as it goes.
    app = create_app(dataclasses.replace(settings, expiry_sweep_interval_seconds=0.2))
    async with serving(app) as url:
        yield url


class Retrying:
    """POSTs as a payment service sends them: a 503 (a lock held for the injected second
    past the lock timeout, say) is retried with the same id and body."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self._http = http

    async def post(self, path: str, json: dict) -> httpx.Response:
        for _ in range(50):
            response = await self._http.post(path, json=json)
            if response.status_code != 503:
                return response
            await asyncio.sleep(float(response.headers.get("retry-after", "0.2")) / 5)
        return response


async def writer(http: httpx.AsyncClient, uid: str, n: int, accounts: list[str], bank: str) -> None:
    http = Retrying(http)  # type: ignore[assignment]
    rng = random.Random(n)
    pending: list[str] = []
    for op in range(OPERATIONS):
        tid = f"{uid}-w{n}-{op}"
        a, b = rng.sample(accounts, 2)
        roll = rng.random()
        if roll < 0.35:
            body = {"id": tid, "debit_account_id": a, "credit_account_id": b, "amount": rng.randint(1, 400)}
            await http.post("/v1/transfers", json=body)
        elif roll < 0.55:
            body = {
                "id": tid, "debit_account_id": a, "credit_account_id": b, "amount": rng.randint(1, 200),
                "pending": True, "timeout_seconds": rng.choice([1, 60]),
            }  # fmt: skip
            if (await http.post("/v1/transfers", json=body)).status_code == 201:
                pending.append(tid)
        elif roll < 0.7 and pending:
            target = pending.pop(rng.randrange(len(pending)))
            decision = rng.choice(["post", "void"])
            await http.post(f"/v1/transfers/{target}/{decision}", json={})
        elif roll < 0.85:
            # A linked chain that fails when its second leg overdraws, and a lone item.
            items = [
                {"id": f"{tid}-a", "debit_account_id": bank, "credit_account_id": a, "amount": 50, "linked": True},
                {"id": f"{tid}-b", "debit_account_id": a, "credit_account_id": b, "amount": rng.choice([40, 10**9])},
                {"id": f"{tid}-c", "debit_account_id": b, "credit_account_id": a, "amount": rng.randint(1, 30)},
            ]
            await http.post("/v1/transfers/batch", json={"transfers": items})
        elif roll < 0.92:
            await http.post(f"/v1/transfers/{uid}-w{n}-{op - 1}/reverse", json={"id": f"{tid}-r", "amount": 1})
        else:
            body = {"id": tid, "debit_account_id": a, "credit_account_id": b, "amount": 10**12}
            assert (await http.post("/v1/transfers", json=body)).status_code == 422


async def consumer(http: httpx.AsyncClient, cursor: str, seen: list[dict], stop: asyncio.Event) -> None:
    while not stop.is_set():
        response = await http.get("/v1/events", params={"after": cursor, "wait": 1, "limit": 250})
        if response.status_code == 503:  # retried like any read; the cursor is unchanged
            await asyncio.sleep(0.1)
            continue
        assert response.status_code == 200, response.text
        body = response.json()
        seen += body["data"]
        cursor = body["next_cursor"]


async def naive_reader(owner_url: str, seen: list[tuple[int, str, str]], stop: asyncio.Event) -> None:
    """Pages the feed's rows by the sequence drawn when they were written."""
    connection = await asyncpg.connect(owner_url)
    try:
        last = await connection.fetchval("SELECT COALESCE(max(sequence), 0) FROM events")
        while not stop.is_set():
            rows = await connection.fetch(
                "SELECT sequence, type, COALESCE(transfer_id, account_id) AS subject FROM events "
                "WHERE sequence > $1 ORDER BY sequence",
                last,
            )
            for row in rows:
                seen.append((row["sequence"], row["type"], row["subject"]))
                last = row["sequence"]
            await asyncio.sleep(0.002)
    finally:
        await connection.close()


async def explain_missing(owner_url: str, missing: Counter, extra: Counter, seen: list[dict]) -> None:
    """Fail, saying where the missing events are in the database and whether the consumer's
    positions have a gap."""
    owner = await asyncpg.connect(owner_url)
    try:
        where = {}
        for _, subject in missing:
            in_feed = await owner.fetch(
                "SELECT position, sequence, type FROM events WHERE transfer_id = $1 OR account_id = $1", subject
            )
            in_outbox = await owner.fetch("SELECT id, type FROM event_outbox WHERE transfer_id = $1", subject)
            row = await owner.fetchrow(
                "SELECT status, pending, created_at, updated_at FROM transfers WHERE id = $1", subject
            )
            where[subject] = ([tuple(r) for r in in_feed], [tuple(r) for r in in_outbox], dict(row) if row else None)
        head = dict(await owner.fetchrow("SELECT * FROM event_feed"))
        outbox = await owner.fetchval("SELECT count(*) FROM event_outbox")
    finally:
        await owner.close()
    positions = sorted(int(e["id"][4:]) for e in seen)
    gaps = [(a, b) for a, b in itertools.pairwise(positions) if b != a + 1]
    pytest.fail(
        f"missing {missing}, extra {extra}; in the database {where}; feed {head}, outbox rows {outbox}; "
        f"consumer positions {positions[:1]}..{positions[-1:]}, gaps {gaps[:10]}"
    )


def expected_events(accounts: list[Any], transfers: list[Any]) -> Counter:
    truth: Counter = Counter()
    for account in accounts:
        truth["account.created", account["id"]] += 1
    for transfer in transfers:
        # A refusal is one event, whatever was asked (a refused reservation never pended).
        if not transfer["pending"] or transfer["status"] == "rejected":
            truth[f"transfer.{transfer['status']}", transfer["id"]] += 1
            continue
        truth["transfer.pending", transfer["id"]] += 1
        if transfer["status"] != "pending":
            truth[f"transfer.{transfer['status']}", transfer["id"]] += 1
    return truth


async def test_a_consumer_sees_every_committed_change_once_in_journal_order(
    base_url: str, ledger_database: provision.LedgerDatabase, held_commits: dict[str, int], uid: str
) -> None:
    headers = dict(provision.API_HEADERS)
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30, limits=limits) as http:
        start = (await http.get("/v1/events", params={"limit": 1000})).json()["next_cursor"]
        while True:  # to the current end of the feed
            page = (await http.get("/v1/events", params={"after": start, "limit": 1000})).json()
            if not page["data"]:
                break
            start = page["next_cursor"]
        bank = f"{uid}-bank"
        assert (
            await http.post("/v1/accounts", json={"id": bank, "currency": "EUR", "allow_negative_balance": True})
        ).status_code == 201
        accounts = [f"{uid}-acc{i}" for i in range(12)]
        for account in accounts:
            assert (await http.post("/v1/accounts", json={"id": account, "currency": "EUR"})).status_code == 201
            body = {
                "id": f"{uid}-fund-{account}",
                "debit_account_id": bank,
                "credit_account_id": account,
                "amount": 2000,
            }
            assert (await http.post("/v1/transfers", json=body)).status_code == 201

        seen: list[dict] = []
        naive: list[tuple[int, str, str]] = []
        stop = asyncio.Event()
        following = asyncio.create_task(consumer(http, start, seen, stop))
        reading = asyncio.create_task(naive_reader(ledger_database.owner_url, naive, stop))
        began = time.monotonic()
        await asyncio.gather(*(writer(http, uid, n, accounts, bank) for n in range(WRITERS)))
        # Reservations of 1 s expire and are released by the sweeper meanwhile.
        await asyncio.sleep(2.5)

        owner = await asyncpg.connect(ledger_database.owner_url)
        try:
            rows_accounts = await owner.fetch("SELECT id FROM accounts WHERE id LIKE $1", f"{uid}-%")
            rows_transfers = await owner.fetch("SELECT id, pending, status FROM transfers WHERE id LIKE $1", f"{uid}-%")
            truth = expected_events(rows_accounts, rows_transfers)
            journal = {
                account: [
                    row["transfer_id"]
                    for row in await owner.fetch(
                        "SELECT transfer_id FROM entries WHERE account_id = $1 ORDER BY sequence", account
                    )
                ]
                for account in [bank, *accounts]
            }
        finally:
            await owner.close()

        def ours() -> list[dict]:
            return [e for e in seen if e["data"]["id"].startswith(f"{uid}-")]

        deadline = time.monotonic() + 30
        while sum(Counter((e["type"], e["data"]["id"]) for e in ours()).values()) < sum(truth.values()):
            if following.done():
                following.result()  # the consumer failed: its error is the test's
            got = Counter((e["type"], e["data"]["id"]) for e in ours())
            if time.monotonic() > deadline:
                await explain_missing(ledger_database.owner_url, truth - got, got - truth, seen)
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # anything more (a duplicate, a rolled-back event) would show now
        stop.set()
        await asyncio.gather(following, reading)
        elapsed = time.monotonic() - began

    events = ours()
    got = Counter((e["type"], e["data"]["id"]) for e in events)
    assert got == truth, {
        "missing": truth - got,
        "unexpected or repeated": got - truth,
    }
    assert len({e["id"] for e in seen}) == len(seen), "an event id was delivered twice"
    positions = [int(e["id"].removeprefix("evt_")) for e in seen]
    assert positions == sorted(positions)
    # Each account's posted events are in the order of its journal.
    posted: dict[str, list[str]] = defaultdict(list)
    for event in events:
        if event["type"] == "transfer.posted":
            for side in ("debit_account_id", "credit_account_id"):
                posted[event["data"][side]].append(event["data"]["id"])
    for account, transfer_ids in journal.items():
        assert posted[account] == transfer_ids, account
    # Every kind of change happened, under held and rolled-back commits.
    kinds = Counter(kind for kind, _ in truth.elements())
    assert {"transfer.posted", "transfer.pending", "transfer.rejected", "transfer.voided", "transfer.expired"} <= set(
        kinds
    ), kinds
    assert held_commits["held_long"] >= 2 and held_commits["rolled_back"] >= 2, held_commits
    # The teeth: paging by the sequence drawn at write time lost changes that committed late.
    naive_ours = Counter((kind, subject) for _, kind, subject in naive if subject.startswith(f"{uid}-"))
    lost = truth - naive_ours
    assert sum(lost.values()) > 0, "the naive reader lost nothing: the test did not make commits land out of order"
    print(
        f"\n{sum(truth.values())} events in {elapsed:.1f} s ({dict(kinds)}); groups {dict(held_commits)}; "
        f"the naive reader lost {sum(lost.values())}"
    )
