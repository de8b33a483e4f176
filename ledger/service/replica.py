"""Heavy reads on a streaming replica, never staler than the request (issue 13).

With LEDGER_REPLICA_DATABASE_URL set, the read-only endpoints auditors use (lists, an
account's journal and statement, balances as of an instant, trial balances,
verification) are served by the replica when it is caught up, and by the primary when
it is not. The rule gives read-your-writes by construction:

1. the primary's WAL write position (`pg_current_wal_lsn()`) is read when the request is
   served: every commit acknowledged before the request arrived lies at or below it (the
   service commits with synchronous_commit on, so an acknowledged commit is written);
2. the replica is asked how far it has replayed (`pg_last_wal_replay_lsn()`), every few
   milliseconds for at most LEDGER_REPLICA_MAX_WAIT_MS, until it has replayed that far;
3. then the read runs on the replica, in transactions that begin after that check, so
   their snapshots (taken at their first statement, replay being monotonic) hold every
   one of those commits. A replica that did not catch up in time, cannot be reached or
   fails the read, leaves the read to the primary: never a 5xx for the replica's sake.

A replica that is no longer in recovery (promoted) is a primary: it is read as it is.

Each routed answer says where it came from (`Ledger-Read-Source: replica|primary`) and
how long the replica kept it waiting (`Ledger-Replica-Lag-Ms`: the time its replay was
behind the request's writes, 0 when it was already there; on a fallback for lag, the
wait given up after). Without a replica nothing changes and neither header is sent: the
primary is the only source there is.

What must see the caller's latest state right after a write, the current balance and a
single account or transfer, stays on the primary, as do the write path and API keys.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.errors import LedgerError, Unavailable
from ledger.service.queries import LedgerQueries
from ledger.service.unit_of_work import UnitOfWork

T = TypeVar("T")
logger = logging.getLogger("ledger.replica")

SOURCE_HEADER = "Ledger-Read-Source"
LAG_HEADER = "Ledger-Replica-Lag-Ms"
# How often a lagging replica is asked again: under load it replays within a few
# milliseconds, and each question is a round trip on a connection of its own pool.
POLL_SECONDS = (0.001, 0.002, 0.003, 0.005)
# At most one warning per interval while the replica fails (the metrics count each one).
WARNING_INTERVAL_SECONDS = 30.0

CHECK_REPLAY = "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text"


def lsn(text: str | None) -> int:
    """`16/B374D848` as a number (WAL positions compare as 64-bit integers)."""
    if not text:
        return 0
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


@dataclass(frozen=True, slots=True)
class ReadTarget:
    """Where a routed read runs: an engine for the audit-style reads (trial balance,
    statements, verification), and the ledger's queries over a unit of work."""

    engine: AsyncEngine
    queries: LedgerQueries


@dataclass(frozen=True, slots=True)
class ReadRoute:
    source: str  # "replica" or "primary"
    # How long the replica was behind the request's writes (ms), None if unknown (the
    # replica could not be asked).
    lag_ms: int | None
    # Why the primary answered: "lagging", "unavailable", "failed"; "" for the replica.
    reason: str = ""

    def headers(self) -> dict[str, str]:
        headers = {SOURCE_HEADER: self.source}
        if self.lag_ms is not None:
            headers[LAG_HEADER] = str(self.lag_ms)
        return headers


@dataclass(frozen=True, slots=True)
class Routed(Generic[T]):
    value: T
    route: ReadRoute | None  # None: no replica configured

    @property
    def headers(self) -> dict[str, str]:
        return self.route.headers() if self.route is not None else {}


class _Lagging(Exception):
    def __init__(self, waited_ms: int) -> None:
        self.waited_ms = waited_ms


class ReadRouter:
    """Routes read-only work to the replica when it has replayed the request's writes
    (module docstring), else to the primary."""

    def __init__(
        self,
        primary: ReadTarget,
        primary_unit_of_work: UnitOfWork,
        replica: ReadTarget | None,
        *,
        max_wait_ms: int,
        on_read: Callable[[ReadRoute], None] | None = None,
    ) -> None:
        self.primary = primary
        self.replica = replica
        self._primary_unit_of_work = primary_unit_of_work
        self._max_wait_seconds = max_wait_ms / 1000
        self._on_read = on_read
        self._warned_at = -WARNING_INTERVAL_SECONDS

    async def read(self, work: Callable[[ReadTarget], Awaitable[T]]) -> Routed[T]:
        """Run `work` on the replica if it is caught up with the primary as of now, else
        on the primary. Errors of the work itself (a 404, a 422) are answers, not
        failures: they are raised as they are, from whichever side ran it."""
        if self.replica is None:
            return Routed(await work(self.primary), None)
        # A failure here is the primary's: the read could not be served anyway.
        target = await self._primary_unit_of_work.run_on_driver(_current_wal_lsn)
        started = time.monotonic()
        try:
            waited_ms = await self._wait_for_replay(target, started)
            value = await work(self.replica)
        except _Lagging as lagging:
            route = ReadRoute("primary", lagging.waited_ms, "lagging")
        except Exception as error:
            if isinstance(error, LedgerError) and not isinstance(error, Unavailable):
                raise
            self._warn(error)
            route = ReadRoute("primary", None, "unavailable")
        else:
            route = ReadRoute("replica", waited_ms)
            self._count(route)
            return Routed(value, route)
        self._count(route)
        return Routed(await work(self.primary), route)

    async def _wait_for_replay(self, target: int, started: float) -> int:
        """Wait until the replica has replayed `target`; the ms it took. One connection
        for the whole wait, returned before the read takes one: the read's transactions
        then begin after the last check."""
        async with self.replica.engine.connect() as connection:  # type: ignore[union-attr]
            driver = (await connection.get_raw_connection()).driver_connection
            polls = 0
            while True:
                in_recovery, replayed = await driver.fetchrow(CHECK_REPLAY)
                waited = time.monotonic() - started
                if not in_recovery or lsn(replayed) >= target:
                    return round(waited * 1000)
                if waited >= self._max_wait_seconds:
                    raise _Lagging(round(waited * 1000))
                await asyncio.sleep(POLL_SECONDS[min(polls, len(POLL_SECONDS) - 1)])
                polls += 1

    def _count(self, route: ReadRoute) -> None:
        if self._on_read is not None:
            self._on_read(route)

    def _warn(self, error: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned_at >= WARNING_INTERVAL_SECONDS:
            self._warned_at = now
            logger.warning(
                "the replica failed (%s: %s): reads go to the primary until it answers again "
                "(warned at most every %d s; ledger_replica_reads_total counts them)",
                type(error).__name__,
                str(error).splitlines()[0][:200] if str(error) else "",
                WARNING_INTERVAL_SECONDS,
            )


async def _current_wal_lsn(driver: asyncpg.Connection) -> int:
    # One round trip, outside any transaction.
    return lsn(await driver.fetchval("SELECT pg_current_wal_lsn()::text"))
