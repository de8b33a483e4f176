"""The event feed: every committed change once, in an order that keeps each account's
journal order, with a cursor that never skips a late commit.

Why not a sequence: rows become visible when their transaction commits, not in the order
their sequence numbers were drawn. A reader paging `WHERE id > last_seen` reads id 8,
moves on, and never sees id 7 whose transaction committed a moment later.

How it works:

1. Every write inserts its events into `event_outbox` in the same statement as the change
   (`ledger.service.writer.WRITE`; accounts in `ledger.service.accounts`), after the
   accounts were locked. The outbox id is drawn from a sequence then, so for one account
   a later change has a larger id: the earlier transaction held the account's row lock
   until it committed.
2. A sequencer (one at a time across every process: a transaction-scoped advisory lock,
   pooler-safe) moves every outbox row its snapshot sees into `events`, numbered with the
   next positions in outbox-id order, and advances `event_feed.last_position`, all in one
   statement. A snapshot that sees a change of an account also sees every earlier change
   of that account (committed before the later one could take the lock), so within one
   move they are in id order, and an earlier move gave the earlier ones smaller
   positions. A row not visible yet (its transaction is still running, or rolled back)
   stays in the outbox for a later move, or never appears.
3. Readers page `events` by position. Positions are given only by committed moves, each
   one whole and after the previous one, so positions 1..last_position all exist: a
   cursor never skips one and never repeats one.

The sequencer runs in every service process: woken at once by the process's own writes
(`EventFeed.poke`, no NOTIFY on the write path), and on a tick for writes of other
processes. Each move that positions something sends one NOTIFY, which wakes long-polls
in every process listening on a direct connection (`LISTEN` does not work through a
transaction pooler; there the tick is the wake-up).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from ledger.errors import CursorExpired, InvalidCursor, InvalidRequest
from ledger.models import EVENT_TYPES
from ledger.service.expiry import STORED_TRANSFER_COLUMNS
from ledger.service.records import AccountRecord, TransferRecord
from ledger.service.unit_of_work import UnitOfWork

logger = logging.getLogger("ledger.events")

CHANNEL = "ledger_events"
# pg_advisory_xact_lock's key for the sequencer: "ledgerev" as a big-endian int64.
SEQUENCER_LOCK = int.from_bytes(b"ledgerev", "big", signed=True)
# Sequential scans off for the move's plan, as for the group commit's (GROUP_BEGIN in
# ledger.service.groups): the outbox is tiny when the statement is first planned, and a
# generic plan made then reads the whole heap, dead rows of every earlier move included,
# at every move (seen as one sequential scan per move in pg_stat_user_tables).
LOCKED_BEGIN = f"BEGIN; SET LOCAL enable_seqscan = off; SELECT pg_advisory_xact_lock({SEQUENCER_LOCK})"
MOVE_LIMIT = 5000
# At most one move per this many seconds: an idle service moves at once after a write,
# a busy one gathers the events of many group commits into each move (one transaction,
# one NOTIFY), which is most of what the feed costs the database.
MOVE_INTERVAL_SECONDS = 0.01
# How many feed rows one filtered read examines at most; past it the page ends early,
# with a cursor after what was examined, so that a rare filter still makes progress.
SCAN_LIMIT = 10_000

MOVE_SQL = f"""
WITH moved AS (
    DELETE FROM event_outbox
    WHERE id IN (SELECT id FROM event_outbox ORDER BY id LIMIT $1)
    RETURNING id, type, transfer_id, account_id, other_account_id, created_at, change_sequence
), counted AS (
    SELECT count(*) AS n FROM moved
), feed AS (
    -- Only when something moved: an empty move writes nothing (no WAL, no flush at commit).
    UPDATE event_feed SET last_position = last_position + (SELECT n FROM counted)
    WHERE id = 1 AND (SELECT n FROM counted) > 0
    RETURNING last_position - (SELECT n FROM counted) AS base, last_position
), inserted AS (
    INSERT INTO events (position, sequence, type, transfer_id, account_id, other_account_id, created_at,
                        change_sequence)
    SELECT feed.base + row_number() OVER (ORDER BY moved.id), moved.id, moved.type, moved.transfer_id,
           moved.account_id, moved.other_account_id, moved.created_at, moved.change_sequence
    FROM moved, feed
)
SELECT (SELECT n FROM counted) AS moved,
       COALESCE((SELECT last_position FROM feed), (SELECT last_position FROM event_feed WHERE id = 1))
           AS last_position,
       (SELECT pg_notify('{CHANNEL}', last_position::text) FROM feed) AS notified
"""
PRUNE_SQL = """
WITH head AS (
    SELECT position, created_at FROM events ORDER BY position LIMIT $2
), stop AS (
    SELECT COALESCE(min(position) FILTER (WHERE created_at >= $1), max(position) + 1) AS p FROM head
), gone AS (
    DELETE FROM events WHERE position < (SELECT p FROM stop) RETURNING position
)
UPDATE event_feed SET pruned_through = GREATEST(pruned_through, (SELECT max(position) FROM gone))
WHERE id = 1 AND EXISTS (SELECT FROM gone)
RETURNING pruned_through
"""

# What an account event shows as it was then (from its history row's `state`), and what
# an account had just after opening.
_OPENING_ZEROS = ("debits_posted", "credits_posted", "pending_debits", "pending_credits", "entries_count")
_ACCOUNT_STATE = ("name", "metadata", "status", "overdraft_limit", "max_balance", *_OPENING_ZEROS)
_TRANSFER = [column.key for column in STORED_TRANSFER_COLUMNS]
_ACCOUNT = [
    "id", "currency", "name", "allow_negative_balance", "metadata", "created_at", "status", "overdraft_limit",
    "max_balance",
]  # fmt: skip
_SELECT = ", ".join(
    ["e.position", "e.type", "e.created_at AS event_at", "e.sequence", "c.state AS c_state"]
    + [f"t.{name} AS t_{name}" for name in _TRANSFER]
    + [f"a.{name} AS a_{name}" for name in _ACCOUNT]
)


def _page_sql(*, by_account: bool, by_type: bool) -> str:
    """One page after a position: the candidates (the feed, or one account's events
    through its two indexes), at most SCAN_LIMIT of them, then the type filter. Read
    with the feed's head from the same snapshot, so the cursor never passes it."""
    if by_account:
        candidates = (
            "(SELECT position FROM events WHERE account_id = $4 AND position > $1 ORDER BY position LIMIT $3) "
            "UNION ALL (SELECT position FROM events WHERE other_account_id = $4 AND account_id <> $4 "
            "AND position > $1 ORDER BY position LIMIT $3)"
        )
    else:
        candidates = "SELECT position FROM events WHERE position > $1 ORDER BY position LIMIT $3"
    type_filter = "WHERE e.type = ANY($5::text[])" if by_type else ""
    return f"""
    WITH scanned AS (
        SELECT position FROM ({candidates}) c ORDER BY position LIMIT $3
    ), head AS (
        SELECT last_position, pruned_through FROM event_feed WHERE id = 1
    ), page AS (
        SELECT {_SELECT}
        FROM scanned JOIN events e USING (position)
        LEFT JOIN transfers t ON t.id = e.transfer_id
        LEFT JOIN accounts a ON e.transfer_id IS NULL AND a.id = e.account_id
        LEFT JOIN account_changes c ON c.account_id = e.account_id AND c.sequence = e.change_sequence
        {type_filter}
        ORDER BY e.position LIMIT $2
    )
    SELECT (SELECT last_position FROM head) AS last_position, (SELECT pruned_through FROM head) AS pruned_through,
           (SELECT count(*) FROM scanned) AS scanned, (SELECT max(position) FROM scanned) AS scanned_to,
           COALESCE((SELECT json_agg(row_to_json(page) ORDER BY page.position) FROM page), '[]')::text AS page
    """


@dataclass(frozen=True, slots=True)
class EventRecord:
    position: int
    type: str
    created_at: datetime
    # The object after the change: a transfer for transfer.*, an account for account.*.
    transfer: TransferRecord | None
    account: AccountRecord | None

    @property
    def id(self) -> str:
        return event_id(self.position)


def event_id(position: int) -> str:
    return f"evt_{position}"


def parse_cursor(cursor: str | None) -> int | None:
    """An event id (`evt_<position>`) or a next_cursor (the same form) -> the position."""
    if cursor is None:
        return None
    prefix, _, digits = cursor.partition("_")
    if prefix != "evt" or not digits.isdigit() or len(digits) > 18:
        raise InvalidCursor("the cursor is not an event id or a next_cursor of /v1/events")
    return int(digits)


def _timestamp(value: str) -> datetime:
    # row_to_json writes timestamptz in the session's time zone (UTC, ledger.database).
    return datetime.fromisoformat(value)


def _event(row: dict[str, Any]) -> EventRecord:
    """A page row -> the event, its object as it was right after the change."""
    kind = row["type"]
    at = _timestamp(row["event_at"])
    transfer = account = None
    if kind.startswith("transfer."):
        status = kind.removeprefix("transfer.")
        stored = {name: row[f"t_{name}"] for name in _TRANSFER}
        for name in ("created_at", "updated_at", "expires_at", "imported_at"):
            if stored[name] is not None:
                stored[name] = _timestamp(stored[name])
        stored["request_hash"] = b""
        # The mutable fields at the time of the event: its status, and the posted amount
        # only on the post of a reservation (posting is final: that amount never changes
        # afterwards). Nothing can be reversed before its posted event, so at every event
        # the reversed amount was 0.
        posted_from_pending = status == "posted" and stored["pending"]
        stored.update(
            status=status,
            updated_at=at,
            posted_amount=stored["posted_amount"] if posted_from_pending else None,
            reversed_amount=0,
        )
        transfer = TransferRecord(**stored)
    else:
        if row["c_state"] is not None:
            # The account right after the change, as its history row keeps it (row 0 for
            # its creation): later changes of name, metadata, status or limits do not show.
            state = row["c_state"]
        else:
            # An account.created event written before revision 0008 (no history row): the
            # account as opened, from its row.
            state = {
                "name": row["a_name"],
                "metadata": row["a_metadata"],
                "status": row["a_status"],
                "overdraft_limit": row["a_overdraft_limit"],
                "max_balance": row["a_max_balance"],
                **dict.fromkeys(_OPENING_ZEROS, 0),
            }
        account = AccountRecord(
            id=row["a_id"],
            currency=row["a_currency"],
            allow_negative_balance=row["a_allow_negative_balance"],
            created_at=_timestamp(row["a_created_at"]),
            **{name: state[name] for name in _ACCOUNT_STATE},
        )
    return EventRecord(row["position"], kind, at, transfer, account)


@dataclass(frozen=True, slots=True)
class EventPage:
    items: list[EventRecord]
    next_cursor: str
    # The feed's head when the page was read.
    last_position: int


async def read_page(
    driver: asyncpg.Connection,
    after: int | None,
    limit: int,
    *,
    types: list[str] | None = None,
    account_id: str | None = None,
) -> EventPage:
    """The events after position `after` (None: from the oldest retained one)."""
    start = after
    if start is None:
        start = await driver.fetchval("SELECT pruned_through FROM event_feed WHERE id = 1")
    scan = max(limit, SCAN_LIMIT) if (types or account_id) else limit
    sql = _page_sql(by_account=account_id is not None, by_type=bool(types))
    arguments: list[Any] = [start, limit, scan]
    if account_id is not None:
        arguments.append(account_id)
    if types:
        if account_id is None:
            sql = sql.replace("$5", "$4")
        arguments.append(types)
    row = await driver.fetchrow(sql, *arguments)
    if after is not None and after < row["pruned_through"]:
        raise CursorExpired(
            f"events up to {event_id(row['pruned_through'])} were removed by retention "
            "(LEDGER_EVENTS_RETENTION_DAYS); start again without a cursor"
        )
    items = [_event(item) for item in json.loads(row["page"])]
    last_position = row["last_position"]
    if len(items) == limit:
        cursor = items[-1].position
    elif row["scanned"] >= scan:
        # A filtered read stopped at its scan limit: continue after what it examined.
        cursor = row["scanned_to"]
    else:
        # Everything up to the head was examined: the next event is after it.
        cursor = max(start, last_position)
    if after is not None and after > last_position:
        # A cursor from the future (another ledger, or a typo): refusing it is safer than
        # waiting forever for positions that may be given to other events.
        raise InvalidCursor(f"the cursor is past the end of the feed ({event_id(last_position)})")
    return EventPage(items, event_id(cursor), last_position)


def validate_types(types: list[str]) -> list[str]:
    unknown = sorted(set(types) - set(EVENT_TYPES))
    if unknown:
        raise InvalidRequest(f"unknown event types: {', '.join(unknown)}; known: {', '.join(EVENT_TYPES)}")
    return types


class EventFeed:
    """Per process: runs the sequencer and wakes long-polls when the feed advances."""

    def __init__(
        self,
        unit_of_work: UnitOfWork,
        *,
        tick_seconds: float,
        retention: timedelta | None,
        listen: Callable[[], Any] | None = None,
        on_move: Callable[[int], None] | None = None,
    ) -> None:
        self._unit_of_work = unit_of_work
        self._tick = tick_seconds
        self._retention = retention
        self._listen = listen
        self._on_move = on_move
        self._wake = asyncio.Event()
        self._advanced = asyncio.Event()
        # The highest position this process knows to be committed.
        self.last_position = 0
        self._last_prune = 0.0
        self.moves = 0

    def poke(self) -> None:
        """A write of this process committed events: move them into the feed soon."""
        self._wake.set()

    def learn(self, position: int) -> None:
        if position > self.last_position:
            self.last_position = position
            advanced, self._advanced = self._advanced, asyncio.Event()
            advanced.set()

    async def wait_beyond(self, position: int, seconds: float) -> None:
        """Until the feed is known to pass `position`, or `seconds` have passed."""
        if self.last_position > position:
            return
        # asyncio.timeout, not wait_for: 3.11's wait_for swallows a cancellation that arrives
        # as the awaited wait completes. The sequencer, woken by a poke in the same instant
        # a shutdown cancelled it, looped on, and the shutdown waited for it for good (3.12
        # rebuilt wait_for on asyncio.timeout; tests/unit/test_background_shutdown.py).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._advanced.wait()

    async def page(
        self, after: int | None, limit: int, *, types: list[str] | None = None, account_id: str | None = None
    ) -> EventPage:
        page = await self._unit_of_work.run_on_driver(
            lambda driver: read_page(driver, after, limit, types=types, account_id=account_id)
        )
        self.learn(page.last_position)
        return page

    async def follow(
        self,
        after: int | None,
        limit: int,
        *,
        wait_seconds: float,
        types: list[str] | None = None,
        account_id: str | None = None,
    ) -> EventPage:
        """A page; when it is empty, long-poll up to `wait_seconds` for one that is not.
        No connection is held while waiting."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds
        while True:
            page = await self.page(after, limit, types=types, account_id=account_id)
            remaining = deadline - loop.time()
            if page.items or remaining <= 0:
                return page
            after = parse_cursor(page.next_cursor)
            assert after is not None
            if after >= page.last_position:
                # Everything up to the head was examined: wait for the feed to move.
                await self.wait_beyond(after, remaining)

    async def sequence_once(self) -> int:
        """One move; returns how many events it positioned."""

        async def work(driver: asyncpg.Connection) -> tuple[int, int]:
            # The lock in the BEGIN's message (one round trip), and the move in a statement
            # of its own: its snapshot is taken after the lock was granted, so it sees
            # everything the previous move saw.
            await driver.execute(LOCKED_BEGIN)
            row = await driver.fetchrow(MOVE_SQL, MOVE_LIMIT)
            await driver.execute("COMMIT")
            return row["moved"], row["last_position"]

        moved, last = await self._unit_of_work.run_on_driver(work)
        self.learn(last)
        if moved:
            self.moves += 1
            if self._on_move is not None:
                self._on_move(moved)
        return moved

    async def prune_once(self) -> int | None:
        if self._retention is None:
            return None

        async def work(driver: asyncpg.Connection) -> int | None:
            await driver.execute(LOCKED_BEGIN)
            cutoff = await driver.fetchval("SELECT clock_timestamp() - $1::interval", self._retention)
            pruned = await driver.fetchval(PRUNE_SQL, cutoff, MOVE_LIMIT)
            await driver.execute(
                "DELETE FROM webhook_deliveries WHERE id IN (SELECT id FROM webhook_deliveries "
                "WHERE status <> 'pending' AND created_at < $1 ORDER BY id LIMIT $2)",
                cutoff,
                MOVE_LIMIT,
            )
            await driver.execute("COMMIT")
            return pruned

        return await self._unit_of_work.run_on_driver(work)

    async def run(self) -> None:
        """The sequencer loop (until cancelled)."""
        listener = asyncio.create_task(self._listen_forever()) if self._listen is not None else None
        loop = asyncio.get_running_loop()
        last_move = 0.0
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._tick):  # not wait_for: see wait_beyond
                        await self._wake.wait()
                pause = last_move + MOVE_INTERVAL_SECONDS - loop.time()
                if pause > 0:
                    await asyncio.sleep(pause)
                last_move = loop.time()
                self._wake.clear()
                try:
                    moved = await self.sequence_once()
                    if moved >= MOVE_LIMIT:
                        self._wake.set()  # more are waiting
                    # Pruning is cheap when there is nothing to prune: every minute, or
                    # more often for a short retention.
                    every = min(60.0, self._retention.total_seconds() / 4) if self._retention else 0.0
                    if self._retention is not None and time.monotonic() - self._last_prune > every:
                        self._last_prune = time.monotonic()
                        await self.prune_once()
                except asyncio.CancelledError:
                    raise
                except Exception as error:
                    logger.warning("the event sequencer failed, retrying: %s", error)
                    await asyncio.sleep(min(self._tick, 1.0))
        finally:
            if listener is not None:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener

    async def _listen_forever(self) -> None:
        """LISTEN on a dedicated connection; reconnects after failures."""
        assert self._listen is not None
        while True:
            try:
                async with self._listen() as driver:
                    lost = asyncio.get_running_loop().create_future()

                    def on_notify(_connection: Any, _pid: int, _channel: str, payload: str) -> None:
                        with contextlib.suppress(ValueError):
                            self.learn(int(payload))

                    def on_termination(_connection: Any, lost: asyncio.Future[None] = lost) -> None:
                        if not lost.done():
                            lost.set_result(None)

                    driver.add_termination_listener(on_termination)
                    await driver.add_listener(CHANNEL, on_notify)
                    # Anything sequenced before the LISTEN took effect: catch up once.
                    self.learn(await driver.fetchval("SELECT last_position FROM event_feed WHERE id = 1"))
                    await lost
            except asyncio.CancelledError:
                raise
            except Exception as error:
                logger.warning("the events LISTEN connection failed, reconnecting: %s", error)
            await asyncio.sleep(1.0)
