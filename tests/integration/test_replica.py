"""Heavy reads on a real streaming replica (ledger.service.replica), built from the
embedded wheel with ledger.cluster.replication: a primary and a hot standby of their own
(the shared test server may have no replication set up), asynchronous, so that the
replica really can be behind.

What is proved: the routed endpoints are served by the replica (its own statement log
shows their queries), a write acknowledged by the primary is in the next routed read, also
under concurrent writes; with replay paused, a read waits at most the maximum then gets
the fresh data from the primary, and the same read made naively on the replica is stale
(so the wait is what makes it right); a replica that cannot be reached costs a warning,
never a 5xx; writes never reach the replica; without a replica nothing changes.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from litestar.testing import AsyncTestClient

from ledger import migrate
from ledger.cluster import replication
from ledger.database import create_engine
from ledger.embedded import EmbeddedPostgres
from ledger.http.app import create_app
from ledger.service.queries import LedgerQueries
from ledger.service.records import EntryRecord, Page
from ledger.service.replica import ReadRouter, ReadTarget
from ledger.service.unit_of_work import UnitOfWork
from tests import provision
from tests.conftest import authorized, free_port, serving_process
from tests.integration.helpers import open_account, transfer

MAX_WAIT_MS = 300
ROUTED = ("/v1/accounts", "/v1/transfers", "/v1/balances", "/v1/balances/aggregate?currency=EUR")


@dataclass
class Pair:
    primary: EmbeddedPostgres
    standby: replication.Standby

    def standby_log(self) -> str:
        return self.standby.log_file.read_text(errors="replace")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    directory = tmp_path_factory.mktemp("replication")
    primary = EmbeddedPostgres(directory / "primary")
    standby = replication.Standby(directory / "standby", primary)
    try:
        primary.start()
        migrate.upgrade(primary.url)
        replication.enable_replication(primary)
        standby.start()
        replication.wait_for_streaming(primary)
        # Every statement the replica runs, in its own log: where a read ran is a fact there.
        replication.sql(standby, "ALTER SYSTEM SET log_statement = 'all'", "postgres")
        replication.sql(standby, "SELECT pg_reload_conf()", "postgres")
        yield Pair(primary, standby)
    finally:
        standby.stop()
        primary.stop()


def app_settings(pair: Pair, **overrides: object) -> object:
    values: dict[str, object] = {
        "replica_database_url": pair.standby.service_url,
        "replica_max_wait_ms": MAX_WAIT_MS,
        "checkpoint_interval_seconds": 0,
        **overrides,
    }
    return provision.settings_for(pair.primary.service_url, **values)


@pytest.fixture(scope="module")
async def client(pair: Pair) -> AsyncIterator[AsyncTestClient]:
    async with AsyncTestClient(create_app(app_settings(pair))) as client:  # type: ignore[arg-type]
        yield authorized(client)


async def money(client: AsyncTestClient, uid: str) -> tuple[str, str]:
    """A source that may go negative and a destination, with one transfer between them."""
    source, destination = f"{uid}-src", f"{uid}-dst"
    await open_account(client, source, negative=True)
    await open_account(client, destination)
    assert (await transfer(client, f"{uid}-t0", source, destination, 100)).status_code == 201
    return source, destination


@pytest.fixture
def paused(pair: Pair) -> Iterator[None]:
    replication.sql(pair.standby, "SELECT pg_wal_replay_pause()", "postgres")
    try:
        yield
    finally:
        replication.sql(pair.standby, "SELECT pg_wal_replay_resume()", "postgres")


def source_of(response: object) -> str | None:
    return response.headers.get("ledger-read-source")  # type: ignore[attr-defined]


async def test_routed_endpoints_are_served_by_the_replica(client: AsyncTestClient, pair: Pair) -> None:
    uid = secrets.token_hex(4)
    source, destination = await money(client, uid)
    marker = f"{uid}-dst"
    before = len(pair.standby_log())
    reads = {
        "accounts": await client.get("/v1/accounts", params={"limit": 1000}),
        "transfers": await client.get("/v1/transfers", params={"account_id": destination}),
        "entries": await client.get(f"/v1/accounts/{destination}/entries"),
        "csv": await client.get(f"/v1/accounts/{destination}/entries", headers={"Accept": "text/csv"}),
        "balance as of": await client.get(
            f"/v1/accounts/{destination}/balance", params={"as_of": "2999-01-01T00:00:00Z"}
        ),
        "trial balance": await client.get("/v1/balances"),
        "aggregate": await client.get("/v1/balances/aggregate", params={"currency": "EUR"}),
        "verification": await client.post("/v1/audit/verify", json={"account_id": destination}),
    }
    for name, response in reads.items():
        assert response.status_code == 200, (name, response.text)
        assert source_of(response) == "replica", (name, response.headers)
        assert int(response.headers["ledger-replica-lag-ms"]) <= MAX_WAIT_MS, name
    assert marker in reads["accounts"].text and f"{uid}-t0" in reads["transfers"].text
    assert reads["balance as of"].json()["posted"] == 100
    assert reads["aggregate"].json()["accounts"] >= 2 and reads["aggregate"].json()["posted"] == 0
    assert reads["csv"].text.count("\r\n") == 2 and reads["verification"].json()["ok"] is True
    # Not only the header: the replica's own log holds the queries of the reads.
    log = pair.standby_log()[before:]
    for query in ("FROM accounts", "FROM transfers", "FROM entries", "pg_last_wal_replay_lsn"):
        assert query in log, query
    # The current balance and single resources stay on the primary: no header, no wait.
    for path in (f"/v1/accounts/{destination}/balance", f"/v1/accounts/{destination}", f"/v1/transfers/{uid}-t0"):
        response = await client.get(path)
        assert response.status_code == 200 and source_of(response) is None, path
    assert source == f"{uid}-src"
    metrics = (await client.get("/metrics")).text
    assert 'ledger_replica_reads_total{process="' in metrics and 'source="replica",reason=""}' in metrics
    assert "ledger_replica_wait_seconds_count" in metrics


async def test_writes_never_reach_the_replica(client: AsyncTestClient, pair: Pair) -> None:
    uid = secrets.token_hex(4)
    before = len(pair.standby_log())
    source, destination = await money(client, uid)
    for index in range(1, 20):
        assert (await transfer(client, f"{uid}-t{index}", source, destination, 1)).status_code == 201
    assert (await client.get(f"/v1/accounts/{destination}")).json()["entries_count"] == 20
    # Not a statement: the write path (and the reads that stay on the primary) never
    # asked the replica anything, not even its replay position.
    assert "statement:" not in pair.standby_log()[before:] and "execute" not in pair.standby_log()[before:]


@pytest.fixture(scope="module")
def served(pair: Pair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `ledger serve` with the replica (requests really run concurrently there)."""
    directory = tmp_path_factory.mktemp("replica-server")
    database = provision.LedgerDatabase(pair.primary.url, pair.primary.service_url)
    environment = {
        **provision.server_environment(database, directory / "data"),
        "LEDGER_REPLICA_DATABASE_URL": pair.standby.service_url,
        "LEDGER_REPLICA_MAX_WAIT_MS": str(MAX_WAIT_MS),
        "LEDGER_CHECKPOINT_INTERVAL_SECONDS": "0",
    }
    with serving_process(directory, environment) as (url, _):
        yield url


async def test_a_write_is_in_the_next_routed_read_also_under_concurrent_writes(served: str) -> None:
    client = httpx.AsyncClient(base_url=served, headers=provision.API_HEADERS, timeout=30)
    uid = secrets.token_hex(4)
    source, destination = await money(client, uid)
    noise_source, noise_destination = await money(client, f"{uid}-noise")
    stop = asyncio.Event()

    async def writer(number: int) -> int:
        written = 0
        while not stop.is_set():
            response = await transfer(client, f"{uid}-n{number}-{written}", noise_source, noise_destination, 1)
            assert response.status_code == 201, response.text
            written += 1
        return written

    writers = [asyncio.create_task(writer(number)) for number in range(8)]
    sources: dict[str, int] = {}
    waits: list[int] = []
    try:
        for index in range(1, 61):
            assert (await transfer(client, f"{uid}-t{index}", source, destination, 1)).status_code == 201
            response = await client.get(f"/v1/accounts/{destination}/entries", params={"limit": 1000})
            assert response.status_code == 200
            sequences = [entry["sequence"] for entry in response.json()["data"]]
            # The acknowledged transfer is there, whoever served the read.
            assert sequences == list(range(1, index + 2)), (index, source_of(response))
            sources[source_of(response) or "none"] = sources.get(source_of(response) or "none", 0) + 1
            waits.append(int(response.headers["ledger-replica-lag-ms"]))
    finally:
        stop.set()
        written = sum(await asyncio.gather(*writers))
        await client.aclose()
    assert written > 60, written
    # The replica replays within milliseconds here: it serves (nearly) every read.
    assert sources.get("replica", 0) >= 55, sources
    print(
        f"\nread-your-writes under {written} concurrent writes: {sources}, "
        f"waits ms max {max(waits)}, mean {sum(waits) / len(waits):.2f}, "
        f"zero {waits.count(0)} of {len(waits)}"
    )


async def test_a_paused_replica_makes_the_read_wait_then_the_primary_answers_fresh_data(
    client: AsyncTestClient, paused: None
) -> None:
    uid = secrets.token_hex(4)
    source, destination = await money(client, uid)
    started = time.monotonic()
    response = await client.get(f"/v1/accounts/{destination}/entries")
    elapsed_ms = (time.monotonic() - started) * 1000
    assert response.status_code == 200
    assert source_of(response) == "primary"
    assert MAX_WAIT_MS <= int(response.headers["ledger-replica-lag-ms"]) < MAX_WAIT_MS + 200
    assert elapsed_ms >= MAX_WAIT_MS
    assert [entry["transfer_id"] for entry in response.json()["data"]] == [f"{uid}-t0"]
    balance = await client.get(f"/v1/accounts/{destination}/balance", params={"as_of": "2999-01-01T00:00:00Z"})
    assert source_of(balance) == "primary" and balance.json()["posted"] == 100
    metrics = (await client.get("/metrics")).text
    assert 'source="primary",reason="lagging"}' in metrics
    assert source == f"{uid}-src"


async def test_without_the_wait_the_replica_would_be_stale(client: AsyncTestClient, pair: Pair) -> None:
    """The teeth: the same read, made naively on the replica (no replay check), misses
    the acknowledged transfer while replay is paused; the router (the app's, built the
    same way here, in this event loop) waits, then reads it from the primary."""
    uid = secrets.token_hex(4)
    source, destination = await money(client, uid)
    replication.wait_for_replay(pair.primary, pair.standby)
    replication.sql(pair.standby, "SELECT pg_wal_replay_pause()", "postgres")
    settings = app_settings(pair)
    engines = [create_engine(settings), create_engine(settings, pair.standby.service_url)]  # type: ignore[arg-type]
    try:
        primary_work = UnitOfWork(engines[0].connect, settings)  # type: ignore[arg-type]
        replica = ReadTarget(engines[1], LedgerQueries(UnitOfWork(engines[1].connect, settings)))  # type: ignore[arg-type]
        router = ReadRouter(ReadTarget(engines[0], LedgerQueries(primary_work)), primary_work, replica, max_wait_ms=50)

        def entries(on: ReadTarget) -> Awaitable[Page[EntryRecord]]:
            return on.queries.entries(destination, start=None, end=None, limit=10, cursor=None)

        assert (await transfer(client, f"{uid}-t1", source, destination, 5)).status_code == 201
        naive = await entries(replica)
        assert [entry.transfer_id for entry in naive.items] == [f"{uid}-t0"]  # the acknowledged t1 is missing
        routed = await router.read(entries)
        assert [entry.transfer_id for entry in routed.value.items] == [f"{uid}-t0", f"{uid}-t1"]
        assert routed.route is not None and routed.route.source == "primary" and routed.route.reason == "lagging"
    finally:
        replication.sql(pair.standby, "SELECT pg_wal_replay_resume()", "postgres")
        for engine in engines:
            await engine.dispose()


class Collected(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_a_replica_that_cannot_be_reached_costs_a_warning_not_an_error(pair: Pair) -> None:
    port = free_port()  # nothing listens there
    dead = pair.standby.service_url.replace(f":{pair.standby.port}/", f":{port}/")
    settings = app_settings(pair, replica_database_url=dead)
    # The app runs in the test client's thread: collect from the loggers themselves.
    collected = Collected()
    watched = [logging.getLogger(name) for name in ("ledger", "sqlalchemy", "litestar")]
    for logger in watched:
        logger.addHandler(collected)
    async with AsyncTestClient(create_app(settings)) as raw:  # type: ignore[arg-type]
        client = authorized(raw)
        uid = secrets.token_hex(4)
        source, destination = await money(client, uid)
        for path in (*ROUTED, f"/v1/accounts/{destination}/entries"):
            for _ in range(2):
                response = await client.get(path)
                assert response.status_code == 200, (path, response.text)
                assert source_of(response) == "primary"
                assert "ledger-replica-lag-ms" not in response.headers
        verification = await client.post("/v1/audit/verify", json={"account_id": source})
        assert verification.status_code == 200 and source_of(verification) == "primary"
        metrics = (await client.get("/metrics")).text
        assert 'source="primary",reason="unavailable"}' in metrics
    for logger in watched:
        logger.removeHandler(collected)
    records = collected.records
    assert not [record for record in records if record.levelno >= logging.ERROR], records
    # One warning, not one per read.
    assert len([record for record in records if record.name == "ledger.replica"]) == 1


async def test_without_a_replica_nothing_changes(pair: Pair) -> None:
    settings = provision.settings_for(pair.primary.service_url, checkpoint_interval_seconds=0)
    async with AsyncTestClient(create_app(settings)) as raw:
        client = authorized(raw)
        uid = secrets.token_hex(4)
        _, destination = await money(client, uid)
        for path in (*ROUTED, f"/v1/accounts/{destination}/entries"):
            response = await client.get(path)
            assert response.status_code == 200 and source_of(response) is None, path
            assert "ledger-replica-lag-ms" not in response.headers
        assert "ledger_replica_reads_total" not in (await client.get("/metrics")).text


def test_a_promoted_standby_takes_writes_without_a_synchronous_standby(tmp_path: Path) -> None:
    """Synchronous replication, then promotion: the promoted server commits at once (it
    does not wait for a standby of its own), and has what the primary acknowledged."""
    primary = EmbeddedPostgres(tmp_path / "primary")
    standby = replication.Standby(tmp_path / "standby", primary)
    try:
        primary.start()
        replication.enable_replication(
            primary, settings=replication.ReplicationSettings("FIRST 1 (standby1)", "remote_apply")
        )
        standby.start()
        assert replication.wait_for_streaming(primary).sync_state == "sync"
        replication.sql(primary, "CREATE TABLE acknowledged (n int); INSERT INTO acknowledged VALUES (1)")
        # remote_apply: acknowledged means visible on the standby already.
        assert replication.sql(standby, "SELECT count(*) FROM acknowledged") == "1"
        assert replication.standby_lag(standby).in_recovery
        primary.stop()
        seconds = replication.promote(standby)
        assert seconds < 30 and not standby.in_recovery
        assert replication.sql(standby, "SHOW synchronous_standby_names", "postgres") == ""
        assert replication.sql(
            standby, "INSERT INTO acknowledged VALUES (2); SELECT count(*) FROM acknowledged"
        ).endswith("2")
    finally:
        standby.stop()
        primary.stop()
