"""The service's background loops end when cancelled, whatever else happens at that
moment. Python 3.11's `asyncio.wait_for` swallows a cancellation that arrives while the
future it waits for completes: the event sequencer, woken by a write (`poke`) in the same
instant the shutdown cancelled it, went on looping for good, and the shutdown waiting
for it hung (seen in CI, and reproduced, as a test app that never finished stopping)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta
from typing import Any

import pytest

from ledger.http.app import stop_tasks
from ledger.service.events import EventFeed


class NoDatabase:
    """A unit of work whose every transaction moves nothing."""

    def __init__(self) -> None:
        self.moves = 0

    async def run_on_driver(self, work: Any) -> tuple[int, int]:
        self.moves += 1
        return 0, 0


async def test_the_sequencer_stops_when_cancelled_as_a_write_wakes_it() -> None:
    for retention in (None, timedelta(days=1)):
        unit_of_work = NoDatabase()
        feed = EventFeed(unit_of_work, tick_seconds=0.05, retention=retention)  # type: ignore[arg-type]
        for _ in range(20):
            task = asyncio.create_task(feed.run())
            await asyncio.sleep(0.01)  # waiting for a wake-up
            # The race: woken and cancelled before it runs again.
            feed.poke()
            task.cancel()
            done, _ = await asyncio.wait([task], timeout=2)
            assert task in done, "the sequencer did not stop when cancelled"
            assert task.cancelled()


async def test_a_long_poll_wait_ends_when_cancelled_as_the_feed_moves() -> None:
    feed = EventFeed(NoDatabase(), tick_seconds=1.0, retention=None)  # type: ignore[arg-type]
    for position in range(1, 21):
        waiter = asyncio.create_task(feed.wait_beyond(position - 1, 5.0))
        await asyncio.sleep(0)
        feed.learn(position)
        waiter.cancel()
        done, _ = await asyncio.wait([waiter], timeout=2)
        assert waiter in done and waiter.cancelled()


async def test_a_task_that_ignores_its_cancellation_does_not_hang_the_shutdown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Should a background task not end when cancelled (a bug), the shutdown goes on after
    a bounded wait and says which task it left behind, as an error."""
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.01)

    async def obedient() -> None:
        await asyncio.sleep(3600)

    tasks = [asyncio.create_task(stubborn(), name="stubborn"), asyncio.create_task(obedient(), name="obedient")]
    await asyncio.sleep(0.01)
    with caplog.at_level(logging.ERROR, logger="ledger.app"):
        await asyncio.wait_for(stop_tasks(tasks, seconds=0.3), timeout=5)
    assert tasks[1].cancelled()
    assert [r.getMessage() for r in caplog.records] == [
        "background task stubborn did not stop within 0.3 s of being cancelled"
    ]
    release.set()
    await tasks[0]
