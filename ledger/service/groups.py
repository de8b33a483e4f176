"""Group commit: every new transfer, single or in a batch, goes through one write path, and
requests that arrive while a transaction is in flight share the next one.

A request is a *member*: a single transfer, or a batch (its items, with their linked
chains). `GroupCommitter.submit` queues it; with no group in flight, the queued members
(up to `group_max_transfers` transfers) form a group at once, and another group may start
beside those in flight, up to `group_concurrency`, under the rules of
`GroupCommitter._dispatch` (enough transfers, no shared id, shared accounts only behind
small groups). Nothing waits on a timer: a lone request on an idle service is a group of
one and goes immediately; under load, a group forms from what queued behind the
transactions in flight, so the busier the service, the larger the groups and the fewer
the transactions. A full queue (`group_queue_limit` transfers) answers 503 `overloaded`.

A group is one database transaction of four round trips, however many members
(`apply_group`): BEGIN; one `SELECT ... FOR UPDATE` of every account the members touch,
in id order (the one lock order of the whole service, so groups cannot deadlock with
each other or with anything else), which also returns which of the members' ids already
have an outcome; the decisions, in memory, member after member in arrival order, each
exactly as if it had run alone on the accounts as the members before it left them
(`ledger.domain.decide_batch`); one set-based write; COMMIT. No savepoint is used.

Each member keeps its own guarantees. Its refusals are recorded under its own ids and
fail nothing else; an id that already has an outcome is a replay (or a 409 for other
fields); two members with the same id settle as one outcome and a replay. When the
group cannot commit as a whole, nobody is answered from it: a deadlock, a serialization
failure, a lost connection or a commit in doubt re-runs the whole group (every member is
idempotent by id: what did commit comes back as replays); an id stored concurrently by
another transaction rolls the group back and re-runs it; a lock held elsewhere past the
group's short lock timeout, or a database constraint the decision did not predict, splits
the group, and each member runs again alone: after a stuck lock all at once (each waits
the full lock timeout at most); after a constraint, one after another in arrival order,
the violating member being recorded as the refusal the constraint stands for. A member
whose client has gone is still applied if its group had formed, and dropped if not:
either way a retry by id settles it. A member still queued after the pool timeout (every
transaction slot stuck behind a lock held elsewhere) is answered 503 `overloaded`
without having started.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import asyncpg

from ledger.domain import BatchItem, ItemDecision, LockedAccount, TransferRequest, decide_batch, refusal_currency
from ledger.errors import LedgerError, LockTimeout, Overloaded, TransferExistsWithDifferentFields
from ledger.integrity import ChainKey
from ledger.service.expiry import DUE_AMONG, STORED_TRANSFER_COLUMNS, expire
from ledger.service.locking import LOCK_SQL, locked_account
from ledger.service.records import TransferOutcome, TransferRecord, created_record, rejected_record
from ledger.service.unit_of_work import RetryableConflict, UnitOfWork
from ledger.service.writer import WRITE, Writes, write_parameters

logger = logging.getLogger("ledger.groups")

# A violated CHECK the decision should have prevented: the refusal it stands for is
# recorded all the same (and the disagreement is a bug to look at).
CONSTRAINT_REFUSALS = {
    "ck_accounts_balance_not_negative": "insufficient_funds",
    "ck_accounts_within_max_balance": "exceeds_max_balance",
    "ck_accounts_closed_empty": "account_closed",
    "ck_transfers_accounts_different": "accounts_must_be_different",
}


def positional(statement: str) -> tuple[str, list[str]]:
    """A statement with `:name` parameters in asyncpg's `$n` form, and the names in order."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return re.sub(r"(?<![:\w]):([a-z_]+)", number, statement), names


# One statement locks every account of the group, in id order, with the counterparts of
# their due reservations (LOCK_SQL), and says which of the group's ids already have an
# outcome (looked up by primary key, in the statement's snapshot: an id stored after it
# makes the write find it taken, and the group runs again).
GROUP_LOCK_SQL = LOCK_SQL.replace(
    "SELECT locked.*, clock_timestamp() AS now,",
    "SELECT locked.*, clock_timestamp() AS now, "
    "ARRAY(SELECT id FROM transfers WHERE id = ANY($2::text[])) AS existing,",
)
NO_ACCOUNT_SQL = (
    "SELECT clock_timestamp() AS now, ARRAY(SELECT id FROM transfers WHERE id = ANY($1::text[])) AS existing"
)
# The stored outcomes of ids that have one: what a replay answers with (`as_created`).
STORED_SQL = f"SELECT {', '.join(c.key for c in STORED_TRANSFER_COLUMNS)} FROM transfers WHERE id = ANY($1::text[])"
# The clock, and the currencies a refusal recorded outside a decision is stored in.
REFUSAL_SQL = (
    "SELECT clock_timestamp() AS now, (SELECT currency FROM accounts WHERE id = $1) AS debit_currency, "
    "(SELECT currency FROM accounts WHERE id = $2) AS credit_currency"
)
DUE_SQL, DUE_NAMES = positional(DUE_AMONG.text)
# Every statement of the write path finds its rows by key, through an index. PostgreSQL
# keeps a prepared statement's generic plan until the next ANALYZE of its tables, and a
# plan made while a new ledger's tables were small scans them whole: the group lock
# statement then read all of `transfers` to find the group's ids (1,077 buffers and 6.8 ms
# at 60,000 transfers, against a few buffers through the primary key), until autovacuum
# analyzed the table, which the service (not the tables' owner) cannot do itself. Seen as
# a fresh service running ~25% slower for its first minute (loadtest/README.md, "Plans
# made on empty tables"). Plans made with sequential scans off are the index plans.
GROUP_BEGIN = "BEGIN; SET LOCAL enable_seqscan = off"
WRITE_SQL, WRITE_NAMES = positional(WRITE.text)


async def _write(driver: asyncpg.Connection, writes: Writes, key: ChainKey) -> set[str]:
    """The set-based write (`ledger.service.writer`); returns the ids it inserted."""
    parameters = write_parameters(writes, key)
    return set(await driver.fetchval(WRITE_SQL, *(parameters[name] for name in WRITE_NAMES)))


# -- members -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BatchResult:
    index: int
    id: str
    status: str  # created | replayed | rejected
    code: str | None
    transfer: TransferRecord | None


@dataclass(frozen=True, slots=True)
class TransferMember:
    """One transfer request: its answer is a TransferOutcome (or a 409)."""

    request: TransferRequest

    @property
    def items(self) -> list[BatchItem]:
        return [BatchItem(self.request)]

    def result(self, decisions: list[ItemDecision], stored: dict, written: dict) -> TransferOutcome:
        decision = decisions[0]
        if decision.status == "rejected" and not decision.recorded:
            raise TransferExistsWithDifferentFields(
                f"transfer {decision.id!r} was already requested with different fields; use a new id for a new transfer"
            )
        if decision.status == "replayed":
            return TransferOutcome((stored.get(decision.id) or written[decision.id]).as_created(), replayed=True)
        return TransferOutcome(written[decision.id], replayed=False)


@dataclass(frozen=True, slots=True)
class BatchMember:
    """A batch request: its answer is one BatchResult per item."""

    items: list[BatchItem]

    def result(self, decisions: list[ItemDecision], stored: dict, written: dict) -> list[BatchResult]:
        results: list[BatchResult] = []
        for decision in decisions:
            transfer: TransferRecord | None = None
            code = decision.code
            if decision.status == "created" or decision.recorded:
                transfer = written[decision.id]
            elif decision.status == "replayed":
                transfer = (stored.get(decision.id) or written[decision.id]).as_created()
                code = transfer.code
            results.append(BatchResult(decision.index, decision.id, decision.status, code, transfer))
        return results


Member = TransferMember | BatchMember


def size(member: Member) -> int:
    return 1 if isinstance(member, TransferMember) else len(member.items)


# -- one group, one transaction ------------------------------------------------------------------


class GroupLocker(Protocol):
    async def __call__(
        self, driver: asyncpg.Connection, account_ids: list[str], transfer_ids: list[str]
    ) -> tuple[dict[str, LockedAccount], datetime, list[str]]:
        """Lock the existing accounts among `account_ids`; return them, the database clock
        (read after the locks were granted) and which of `transfer_ids` exist."""
        ...


async def lock_group(
    driver: asyncpg.Connection, account_ids: list[str], transfer_ids: list[str]
) -> tuple[dict[str, LockedAccount], datetime, list[str]]:
    rows = await driver.fetch(GROUP_LOCK_SQL, account_ids, transfer_ids)
    if not rows:
        row = await driver.fetchrow(NO_ACCOUNT_SQL, transfer_ids)
        return {}, row["now"], list(row["existing"])
    return {row["id"]: locked_account(row) for row in rows}, rows[0]["now"], list(rows[0]["existing"])


@dataclass
class GroupPlan:
    """Everything a group decided: per member its decisions, and what to write."""

    decisions: list[list[ItemDecision]] = field(default_factory=list)
    stored: dict[str, TransferRecord] = field(default_factory=dict)
    written: dict[str, TransferRecord] = field(default_factory=dict)
    writes: Writes = field(default_factory=Writes)


def decide_group(
    members: Sequence[Member],
    accounts: dict[str, LockedAccount],
    stored: dict[str, TransferRecord],
    now: datetime,
    key: ChainKey,
    expiries: Writes,
) -> GroupPlan:
    """Decide every member in arrival order on the evolving account states (updated in
    place), each exactly as if it had run alone after the ones before it."""
    plan = GroupPlan(stored=stored)
    before = dict(accounts)
    known = {key_: (record.request_hash, record.status != "rejected") for key_, record in stored.items()}
    writes = Writes(changes=dict(expiries.changes), events=list(expiries.events))
    for member in members:
        items = member.items
        decisions = decide_batch(items, known, accounts, now, key)
        for decision in decisions:
            if decision.status != "created" and not decision.recorded:
                continue
            request = items[decision.index].request
            if decision.plan is not None:
                record = created_record(request, decision.plan, request.fingerprint())
                writes.plan(request.id, decision.plan)
            else:
                assert decision.code is not None
                record = rejected_record(
                    request, decision.code, now, currency=decision.currency, missing_account=decision.missing_account
                )
            writes.new_transfer(record)
            plan.written[request.id] = record
            known[request.id] = (record.request_hash, decision.status == "created")
        plan.decisions.append(decisions)
    # Final states only, of every account whose state changed (by expiry or by members).
    writes.accounts = {
        key_: account for key_, account in accounts.items() if account != before.get(key_) or key_ in expiries.accounts
    }
    plan.writes = writes
    return plan


async def apply_group(
    driver: asyncpg.Connection,
    members: Sequence[Member],
    key: ChainKey,
    *,
    lock: GroupLocker = lock_group,
    lock_timeout_ms: int | None = None,
) -> list[Any]:
    """Apply a group in one transaction; return each member's answer (a value, or the
    exception that is its answer, such as a 409). Raises RetryableConflict when an id was
    stored concurrently (nothing is committed)."""
    transfer_ids = sorted({item.request.id for member in members for item in member.items})
    # In the order the requests name them: the lock statement orders them by id itself.
    account_ids = list(
        dict.fromkeys(
            account
            for member in members
            for item in member.items
            for account in (item.request.debit_account_id, item.request.credit_account_id)
        )
    )
    # A group waits for another group's locks only for a moment; a lock held longer (by
    # something outside the service) splits it, so that it delays nobody else.
    await driver.execute(
        GROUP_BEGIN if lock_timeout_ms is None else f"{GROUP_BEGIN}; SET LOCAL lock_timeout = {lock_timeout_ms:d}"
    )
    accounts, now, existing = await lock(driver, account_ids, transfer_ids)
    expiries = Writes()
    if any(account.has_due for account in accounts.values()):
        due = {"now": now, "ids": sorted(accounts)}
        for row in await driver.fetch(DUE_SQL, *(due[name] for name in DUE_NAMES)):
            expire(TransferRecord.from_row(row), accounts, now, expiries)
    stored: dict[str, TransferRecord] = {}
    if existing:
        stored = {row["id"]: TransferRecord.from_row(row) for row in await driver.fetch(STORED_SQL, existing)}
    plan = decide_group(members, accounts, stored, now, key, expiries)
    if plan.writes:
        claimed = {record.id for record in plan.writes.transfers} - await _write(driver, plan.writes, key)
        if claimed:
            # Stored by another transaction after this one looked: run the group again.
            raise RetryableConflict(f"{len(claimed)} transfer ids were stored concurrently")
    await driver.execute("COMMIT")
    answers: list[Any] = []
    for member, decisions in zip(members, plan.decisions, strict=True):
        try:
            answers.append(member.result(decisions, plan.stored, plan.written))
        except LedgerError as refusal:
            answers.append(refusal)
    return answers


async def record_refusal(driver: asyncpg.Connection, request: TransferRequest, reason: str, key: ChainKey) -> Any:
    """Record the refusal a database constraint stands for (a member alone whose write a
    CHECK refused): the id's outcome, as if the decision had made it. If the id has an
    outcome by now, that one is the answer."""
    await driver.execute(GROUP_BEGIN)
    row = await driver.fetchrow(REFUSAL_SQL, request.debit_account_id, request.credit_account_id)
    currency = refusal_currency(request, row["debit_currency"], row["credit_currency"])
    record = rejected_record(request, reason, row["now"], currency=currency)
    writes = Writes()
    writes.new_transfer(record)
    if record.id in await _write(driver, writes, key):
        await driver.execute("COMMIT")
        return TransferOutcome(record, replayed=False)
    stored = TransferRecord.from_row(await driver.fetchrow(STORED_SQL, [record.id]))
    await driver.execute("COMMIT")
    member = TransferMember(request)
    known = {stored.id: stored}
    return member.result(
        [ItemDecision(0, stored.id, "replayed")]
        if stored.request_hash == request.fingerprint()
        else [ItemDecision(0, stored.id, "rejected", "transfer_exists_with_different_fields")],
        known,
        {},
    )


# -- the queue -------------------------------------------------------------------------------------


# How far down the queue an overlapping group looks for members.
OVERLAP_SCAN_LIMIT = 1024
# Groups in flight up to this many transfers in all may be joined by a group that shares
# accounts with them (see GroupCommitter._dispatch).
PIPELINE_MAX_TRANSFERS = 64


@dataclass
class _Waiting:
    member: Member
    answer: asyncio.Future[Any]
    # Answers 503 if the member is still queued when it fires; cancelled when it starts.
    deadline: asyncio.TimerHandle | None = None
    # The accounts it touches and its ids; its ids alone (after a NUL, which no id has).
    keys: frozenset[str] = frozenset()
    ids: frozenset[str] = frozenset()


def ids_of(member: Member) -> frozenset[str]:
    return frozenset("\0" + item.request.id for item in member.items)


class GroupCommitter:
    """Gathers members into groups and runs them (see the module's docstring)."""

    def __init__(
        self,
        unit_of_work: UnitOfWork,
        key: ChainKey,
        *,
        max_transfers: int,
        queue_limit: int,
        concurrency: int,
        lock_timeout_ms: int,
        queue_timeout_seconds: float = 5.0,
        overlap_min: int = 1,
        lock: GroupLocker = lock_group,
        on_group: Callable[[int], None] | None = None,
    ) -> None:
        self._unit_of_work = unit_of_work
        self._key = key
        self._max_transfers = max_transfers
        self._queue_limit = queue_limit
        self._concurrency = concurrency
        self._overlap_min = overlap_min
        self._queue_timeout = queue_timeout_seconds
        self._lock_timeout_ms = lock_timeout_ms
        self._lock = lock
        self._on_group = on_group
        self._queue: deque[_Waiting] = deque()
        self._queued_transfers = 0
        self._in_flight = 0
        # Accounts and ids of the groups in flight, with how many groups hold each.
        self._busy: dict[str, int] = {}
        self._in_flight_transfers = 0
        self._tasks: set[asyncio.Task[None]] = set()
        # Accounts that may be locked by another transaction past the lock timeout (a
        # stuck lock), until when: members touching them run alone, so that no group
        # waits for them. A member that gets through clears its accounts.
        self._held: dict[str, float] = {}
        self._held_seconds = max(1.0, unit_of_work.lock_timeout_seconds * 2)

    @property
    def queued(self) -> int:
        return self._queued_transfers

    async def submit(self, member: Member) -> Any:
        """Queue a member and wait for its answer (raised, when it is an error)."""
        count = size(member)
        if self._queued_transfers + count > self._queue_limit and self._queue:
            raise Overloaded(
                f"{self._queued_transfers} transfers are waiting for a transaction (LEDGER_GROUP_QUEUE_LIMIT); "
                "retry with the same id"
            )
        loop = asyncio.get_running_loop()
        ids = ids_of(member)
        waiting = _Waiting(member, loop.create_future(), keys=ids | accounts_of(member), ids=ids)
        self._queue.append(waiting)
        self._queued_transfers += count
        self._dispatch()
        if self._queue and self._queue[-1] is waiting:
            # A write path stalled behind a lock held elsewhere must not hold every other
            # client without bound: like a wait for a pooled connection, a wait for a
            # place in a transaction ends in 503 after the pool timeout. Nothing of the
            # member was started, so a retry with the same id is safe.
            waiting.deadline = loop.call_later(self._queue_timeout, _expire, waiting)
        return await waiting.answer

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _touches_held(self, waiting: _Waiting) -> bool:
        if not self._held:
            return False
        now = time.monotonic()
        for account in waiting.keys:  # its accounts (its ids, after a NUL, are never held)
            until = self._held.get(account)
            if until is not None:
                if until > now:
                    return True
                del self._held[account]
        return False

    def _dispatch(self) -> None:
        # With no group in flight, whatever is queued goes at once (a lone request waits
        # for nothing). Another group overlaps the ones in flight only when at least
        # `overlap_min` transfers can join it: otherwise a request arriving just after a
        # commit would take a transaction of its own while the rest queue behind it.
        # Members sharing an id with a group in flight wait for it. Members sharing an
        # account may join only while the groups in flight are small (at most
        # PIPELINE_MAX_TRANSFERS): the new group then waits on their row locks and writes
        # the moment they commit, which is what keeps a hot account busy; behind large
        # groups (batches) it would hold a connection for long and could reach the group
        # lock timeout and be split as if a lock were stuck. A member left in the queue
        # holds back the later members that share an account or an id with it, so that
        # those keep their order.
        while self._queue and self._in_flight < self._concurrency:
            overlapping = self._in_flight > 0
            if overlapping and self._queued_transfers < self._overlap_min:
                return
            group = self._form(overlapping)
            if group is None:
                return
            if not group:
                continue
            self._in_flight += 1
            self._in_flight_transfers += sum(size(waiting.member) for waiting in group)
            busy = self._busy
            for waiting in group:
                for key in waiting.keys:
                    busy[key] = busy.get(key, 0) + 1
            self._spawn(self._run(group))

    def _form(self, overlapping: bool) -> list[_Waiting] | None:
        """Take the next group's members from the queue (None: no group may start now)."""
        queue = self._queue
        chosen: set[int] = set()
        transfers = 0
        if overlapping:
            busy = self._busy
            strict = self._in_flight_transfers > PIPELINE_MAX_TRANSFERS
            blocked: set[str] = set()
            for index, waiting in enumerate(queue):
                if index == OVERLAP_SCAN_LIMIT:
                    break  # bounded work per request, however long the queue
                if waiting.answer.done():
                    continue
                count = size(waiting.member)
                if chosen and transfers + count > self._max_transfers:
                    break
                waits_for = waiting.keys if strict else waiting.ids
                if any(key in busy for key in waits_for) or (blocked and not blocked.isdisjoint(waiting.keys)):
                    blocked.update(waiting.keys)
                    continue
                chosen.add(index)
                transfers += count
            if transfers < self._overlap_min:
                return None
        group: list[_Waiting] = []
        kept: deque[_Waiting] = deque()
        transfers = 0
        for index, waiting in enumerate(queue):
            if overlapping:
                take = index in chosen
            else:
                take = not group or transfers + size(waiting.member) <= self._max_transfers
                if not take:
                    kept.extend(itertools.islice(queue, index, None))
                    break
            if not take and not waiting.answer.done():
                kept.append(waiting)
                continue
            self._queued_transfers -= size(waiting.member)
            if waiting.deadline is not None:
                waiting.deadline.cancel()
            if waiting.answer.done():  # its client went away, or it waited too long
                continue
            if self._touches_held(waiting):
                self._spawn(self._run_alone(waiting))
                continue
            group.append(waiting)
            transfers += size(waiting.member)
        self._queue = kept
        return group

    async def _run(self, group: list[_Waiting]) -> None:
        members = [waiting.member for waiting in group]
        if self._on_group is not None:
            self._on_group(sum(size(member) for member in members))
        split = ""
        try:
            # A group of one too: whatever holds a transaction slot waits at most the
            # group lock timeout, so that requests queued behind it (fewer than
            # `overlap_min` do not start another group) wait no longer than that.
            answers = await self._unit_of_work.run_on_driver(
                lambda driver: apply_group(
                    driver, members, self._key, lock=self._lock, lock_timeout_ms=self._lock_timeout_ms
                )
            )
        except (LockTimeout, asyncpg.IntegrityConstraintViolationError) as error:
            # An account held elsewhere, or a member that breaks a constraint the decision
            # did not predict: the others must not pay for it. Each runs alone, and is
            # answered as soon as it is done. Until they have, their accounts are suspect:
            # new members touching them run alone too, so that no group waits on them.
            logger.info("splitting a group of %d after %s", len(group), type(error).__name__)
            split = "concurrently" if isinstance(error, LockTimeout) else "in order"
            if isinstance(error, LockTimeout):
                self._hold(members)
        except Exception as error:  # every member gets the group's failure (503, or a bug's 500)
            answers = [error] * len(group)
        finally:
            self._in_flight -= 1
            self._in_flight_transfers -= sum(size(member) for member in members)
            busy = self._busy
            for waiting in group:
                for key in waiting.keys:
                    left = busy[key] - 1
                    if left:
                        busy[key] = left
                    else:
                        del busy[key]
            self._dispatch()
        if split == "in order":
            # The members run alone one after another, in arrival order: each gets the
            # answer the group would have given it, had the constraint not been violated.
            self._spawn(self._run_in_order(group))
            return
        if split:
            # A stuck lock: in order, each member touching it would wait the lock timeout
            # in turn. They were in flight together, so any order is one they could have
            # run in alone; PostgreSQL's lock queue picks it, and nobody waits for more
            # than one lock timeout.
            for waiting in group:
                self._spawn(self._run_alone(waiting))
            return
        for waiting, answer in zip(group, answers, strict=True):
            _settle(waiting, answer)

    async def _run_in_order(self, group: list[_Waiting]) -> None:
        for waiting in group:
            await self._run_alone(waiting)

    async def _run_alone(self, waiting: _Waiting) -> None:
        try:
            answer = await self._alone(waiting.member)
        except LockTimeout as error:
            self._hold([waiting.member])
            answer = error
        except Exception as error:
            answer = error
        else:
            for account in accounts_of(waiting.member):
                self._held.pop(account, None)
        _settle(waiting, answer)

    def _hold(self, members: Sequence[Member]) -> None:
        until = time.monotonic() + self._held_seconds
        for member in members:
            for account in accounts_of(member):
                self._held[account] = until

    async def _alone(self, member: Member) -> Any:
        try:
            return (
                await self._unit_of_work.run_on_driver(
                    lambda driver: apply_group(driver, [member], self._key, lock=self._lock)
                )
            )[0]
        except asyncpg.IntegrityConstraintViolationError as error:
            reason = CONSTRAINT_REFUSALS.get(getattr(error, "constraint_name", None) or "")
            if reason is None or not isinstance(member, TransferMember):
                raise
            logger.error(
                "the database refused what the decision allowed (%s): recorded as %s", error.constraint_name, reason
            )
            return await self._unit_of_work.run_on_driver(
                lambda driver: record_refusal(driver, member.request, reason, self._key)
            )

    async def close(self) -> None:
        """Wait for the groups in flight (at shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def _expire(waiting: _Waiting) -> None:
    if not waiting.answer.done():
        waiting.answer.set_exception(
            Overloaded("no transaction could take this request within the pool timeout; retry with the same id")
        )


def _settle(waiting: _Waiting, answer: Any) -> None:
    if waiting.answer.done():
        return  # the client went away; its transfer was applied (or not) all the same
    if isinstance(answer, BaseException):
        waiting.answer.set_exception(answer)
    else:
        waiting.answer.set_result(answer)


def accounts_of(member: Member) -> set[str]:
    return {
        account for item in member.items for account in (item.request.debit_account_id, item.request.credit_account_id)
    }
