"""Long-polls across instances: a write through one `ledger serve` wakes a long-poll
waiting in another at once, through PostgreSQL's LISTEN/NOTIFY (ledger.service.events),
not at the next tick of its sequencer; and after the server terminates the LISTEN
sessions, each instance takes its LISTEN up again by itself and logs no error doing so
(its connection is discarded, never handed back to a pool in an unknown state)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from ledger.database import LISTEN_APPLICATION_NAME
from tests import provision
from tests.conftest import serving_process

pytestmark = pytest.mark.slow

# Far longer than any wake-up the test accepts: a long-poll woken by the tick fails it.
TICK_SECONDS = 60
WAKE_WITHIN_SECONDS = 10


@pytest.fixture
def feed_database(postgres_server_url: str, service_login: tuple[str, str]) -> Iterator[provision.LedgerDatabase]:
    with provision.migrated_database(postgres_server_url, "ledger_wakeups", service_login) as database:
        yield database


async def listen_sessions(owner: asyncpg.Connection) -> set[int]:
    rows = await owner.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name = $1",
        LISTEN_APPLICATION_NAME,
    )
    return {row["pid"] for row in rows}


async def both_listening(owner: asyncpg.Connection, gone: set[int]) -> set[int]:
    """The two instances' LISTEN sessions, once both are connected and neither is one of
    `gone` (an instance reconnects a second after losing its own)."""
    deadline = time.monotonic() + 15
    while True:
        sessions = await listen_sessions(owner)
        if len(sessions) == 2 and not sessions & gone:
            return sessions
        assert time.monotonic() < deadline, (sessions, gone)
        await asyncio.sleep(0.1)


async def wake_up_seconds(writer: httpx.AsyncClient, reader: httpx.AsyncClient, account_id: str) -> float:
    """How long a long-poll waiting in `reader` takes to return the account opened through
    `writer`."""
    cursor = (await reader.get("/v1/events", params={"limit": 1})).json()["next_cursor"]
    while True:  # to the head of the feed
        page = (await reader.get("/v1/events", params={"after": cursor})).json()
        cursor = page["next_cursor"]
        if not page["data"]:
            break
    poll = asyncio.create_task(reader.get("/v1/events", params={"after": cursor, "wait": 30}))
    await asyncio.sleep(0.5)
    assert not poll.done(), f"the long-poll did not wait: {poll.result().text}"
    started = time.monotonic()
    body = {"id": account_id, "currency": "EUR"}
    assert (await writer.post("/v1/accounts", json=body)).status_code == 201
    response = await poll
    assert response.status_code == 200, response.text
    assert [event["data"]["id"] for event in response.json()["data"]] == [account_id]
    return time.monotonic() - started


async def test_a_write_through_one_instance_wakes_a_long_poll_in_another(
    feed_database: provision.LedgerDatabase, tmp_path: Path
) -> None:
    environment = {
        **provision.server_environment(feed_database, tmp_path / "data"),
        "LEDGER_EVENTS_TICK_SECONDS": str(TICK_SECONDS),
        # The expiry sweeper's transactions wake the sequencer of their process too (every
        # second by default), which would hide a LISTEN that does not work.
        "LEDGER_EXPIRY_SWEEP_INTERVAL_SECONDS": "0",
        "LEDGER_CHECKPOINT_INTERVAL_SECONDS": "0",
    }
    owner = await asyncpg.connect(feed_database.owner_url)
    try:
        # Both processes must log no error (serving_process checks their logs at exit).
        with (
            serving_process(tmp_path / "a", environment) as (writer_url, _),
            serving_process(tmp_path / "b", environment) as (reader_url, _),
        ):
            async with (
                httpx.AsyncClient(base_url=writer_url, headers=provision.API_HEADERS, timeout=40) as writer,
                httpx.AsyncClient(base_url=reader_url, headers=provision.API_HEADERS, timeout=40) as reader,
            ):
                first = await both_listening(owner, set())
                waited = await wake_up_seconds(writer, reader, "first")
                assert waited < WAKE_WITHIN_SECONDS, f"woken after {waited:.1f} s: by the tick, not by NOTIFY"

                for pid in first:
                    assert await owner.fetchval("SELECT pg_terminate_backend($1)", pid)
                await both_listening(owner, first)
                waited = await wake_up_seconds(writer, reader, "after-termination")
                assert waited < WAKE_WITHIN_SECONDS, f"woken after {waited:.1f} s: the LISTEN was not taken up again"
    finally:
        await owner.close()
