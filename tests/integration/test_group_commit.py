"""Group commit keeps every member's own guarantees: a group mixing good transfers,
refusals, a missing account, duplicate ids (same and different body), a linked chain that
fails, and a member the database refuses although the decision let it through, answers
each member exactly as the same requests sent one by one to a fresh ledger are answered;
every acknowledged transfer is committed when its answer arrives. Two deliberately broken
coalescers show that the comparison has teeth."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.domain import BatchItem, TransferRequest
from ledger.errors import LedgerError, TransferRefused
from ledger.service import groups
from ledger.service.groups import BatchMember, BatchResult, GroupCommitter, TransferMember
from ledger.service.records import TransferOutcome
from ledger.service.unit_of_work import UnitOfWork
from ledger.settings import Settings
from tests import provision
from tests.integration.helpers import lenient_decision, open_account, transfer

ACCOUNTS = ("bank", "alice", "bob", "carol", "poor", "tricky", "usd")


def members(p: str, unpredicted: bool) -> list[groups.Member]:
    """The mixed group, in arrival order, on the accounts of prefix `p`; with a member the
    database refuses although the decision let it through if `unpredicted`."""

    def request(name: str, debit: str, credit: str, amount: int, **fields: Any) -> TransferRequest:
        return TransferRequest(
            id=f"{p}-{name}", debit_account_id=f"{p}-{debit}", credit_account_id=f"{p}-{credit}", amount=amount,
            **fields,
        )  # fmt: skip

    return [
        TransferMember(request("fund", "bank", "alice", 100)),
        # Decided on the balance the member before it left: it must see the 100.
        TransferMember(request("pay", "alice", "bob", 30, description="rent")),
        TransferMember(request("broke", "poor", "bob", 10)),  # refused: insufficient funds
        TransferMember(request("ghost", "alice", "nobody", 5)),  # refused: no such account
        TransferMember(request("pay", "alice", "bob", 30, description="rent")),  # same id, same body: replay
        TransferMember(request("pay", "alice", "bob", 31, description="rent")),  # same id, other body: 409
        TransferMember(request("dollars", "alice", "usd", 5)),  # refused: currency mismatch
        # The decision is told (below) that this account may go negative; PostgreSQL's
        # CHECK is not: a constraint the decision did not predict.
        *([TransferMember(request("trick", "tricky", "bob", 50))] if unpredicted else []),
        # A linked chain whose second item fails: neither applies; the third item stands.
        BatchMember(
            [
                BatchItem(request("chain-1", "alice", "carol", 10), linked=True),
                BatchItem(request("chain-2", "poor", "carol", 10)),
                BatchItem(request("after", "alice", "carol", 20)),
            ]
        ),
        TransferMember(request("rest", "alice", "bob", 50)),  # exactly what is left: 100 - 30 - 20
        TransferMember(request("fund", "bank", "alice", 100)),  # replay of the first member
    ]


def answer_of(result: Any, p: str) -> Any:
    """A comparable form of an answer, with the ledger's prefix, times and hashes left out."""

    def strip(value: str | None) -> str | None:
        return value.replace(f"{p}-", "") if value else value

    def transfer(record: Any) -> tuple:
        return (strip(record.id), strip(record.debit_account_id), strip(record.credit_account_id), record.amount,
                record.currency, record.pending, record.status, record.code, record.description)  # fmt: skip

    if isinstance(result, BaseException):
        return ("error", type(result).__name__, getattr(result, "code", None), strip(str(result)))
    if isinstance(result, TransferOutcome):
        return ("outcome", transfer(result.transfer), result.replayed)
    assert isinstance(result, list) and all(isinstance(item, BatchResult) for item in result), result
    return ("batch", [(r.index, strip(r.id), r.status, r.code, r.transfer and transfer(r.transfer)) for r in result])


@pytest.fixture
def lenient_for_tricky(monkeypatch: pytest.MonkeyPatch) -> None:
    """The decision believes every `tricky` account may go negative; the stored row (the
    one PostgreSQL checks) says otherwise."""
    lenient_decision(monkeypatch, "-tricky")


async def open_ledger(client: AsyncTestClient, p: str) -> None:
    for name in ACCOUNTS:
        await open_account(client, f"{p}-{name}", currency="USD" if name == "usd" else "EUR", negative=name == "bank")


async def balances(connection: asyncpg.Connection, p: str) -> dict[str, tuple[int, int]]:
    rows = await connection.fetch("SELECT id, debits_posted, credits_posted FROM accounts WHERE id LIKE $1 || '-%'", p)
    return {row["id"].removeprefix(f"{p}-"): (row["debits_posted"], row["credits_posted"]) for row in rows}


async def mixed_group_problems(
    client: AsyncTestClient,
    engine: AsyncEngine,
    settings: Settings,
    database_url: str,
    uid: str,
    unpredicted: bool = False,
) -> list[str]:
    """Run the mixed group on one ledger and the same requests one by one on a fresh one;
    return every way in which the group's answers, commits or balances differ."""
    problems: list[str] = []
    grouped, alone, plug = f"g{uid}", f"a{uid}", f"p{uid}"
    for p in (grouped, alone, plug):
        await open_ledger(client, p)
    observer = await asyncpg.connect(database_url)
    try:
        observing = asyncio.Lock()

        async def acknowledged(committer: GroupCommitter, member: groups.Member) -> Any:
            """The member's answer; and, for each transfer it says was applied, whether
            another connection sees it committed the moment the answer arrives."""
            try:
                result = await committer.submit(member)
            except LedgerError as error:
                return error
            records = (
                [result.transfer] if isinstance(result, TransferOutcome) else [r.transfer for r in result if r.transfer]
            )
            for record in records:
                async with observing:  # one connection, one statement at a time
                    stored = await observer.fetchval("SELECT status FROM transfers WHERE id = $1", record.id)
                if stored != record.status:
                    problems.append(f"{record.id} answered {record.status!r} while committed is {stored!r}")
            return result

        sizes: list[int] = []

        def committer(on_group: Any = None) -> GroupCommitter:
            return GroupCommitter(
                UnitOfWork(engine.connect, settings), provision.KEYRING.active, max_transfers=100, queue_limit=100,
                concurrency=1, lock_timeout_ms=250, on_group=on_group,
            )  # fmt: skip

        # The group: a plug takes the one transaction slot, everything else queues behind
        # it and goes in the next transaction, together.
        together = committer(sizes.append)
        plugged = asyncio.create_task(together.submit(TransferMember(TransferRequest(
            id=f"{plug}-plug", debit_account_id=f"{plug}-bank", credit_account_id=f"{plug}-alice", amount=1))))  # fmt: skip
        await asyncio.sleep(0)
        group = members(grouped, unpredicted)
        answers = await asyncio.gather(*(acknowledged(together, member) for member in group))
        await plugged
        transfers = sum(groups.size(member) for member in group)
        if sizes[:1] != [1] or transfers not in sizes:
            problems.append(f"the members did not form one group: group sizes {sizes}")

        # The same requests, one by one, on a fresh ledger.
        one_by_one = committer()
        expected = [await acknowledged(one_by_one, member) for member in members(alone, unpredicted)]

        for index, (got, want) in enumerate(zip(answers, expected, strict=True)):
            if answer_of(got, grouped) != answer_of(want, alone):
                problems.append(
                    f"member {index}: {answer_of(got, grouped)} in the group, {answer_of(want, alone)} alone"
                )
        if await balances(observer, grouped) != await balances(observer, alone):
            problems.append(f"balances {await balances(observer, grouped)} != {await balances(observer, alone)}")
    finally:
        await observer.close()
    return problems


@pytest.mark.parametrize("unpredicted", [False, True], ids=["committed-together", "split-by-a-constraint"])
async def test_each_member_of_a_mixed_group_gets_the_answer_it_gets_alone(
    client: AsyncTestClient, engine: AsyncEngine, settings: Settings, database_url: str, uid: str,
    lenient_for_tricky: None, unpredicted: bool,
) -> None:  # fmt: skip
    """Without the unpredicted member the group commits as one transaction; with it, the
    group's write fails on the CHECK and every member runs again alone."""
    assert await mixed_group_problems(client, engine, settings, database_url, uid, unpredicted) == []
    # And the answers are the ones a payment engineer expects (not merely consistent).
    assert (await client.get(f"/v1/accounts/a{uid}-alice")).json()["balance"]["posted"] == 0
    if unpredicted:
        tricky = (await client.get(f"/v1/transfers/g{uid}-trick")).json()
        assert (tricky["status"], tricky["code"]) == ("rejected", "insufficient_funds")
    chained = (await client.get(f"/v1/transfers/g{uid}-chain-1")).json()
    assert (chained["status"], chained["code"]) == ("rejected", "linked_transfer_failed"), chained


def refusal_fails_the_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken: a group with a refused member fails as a whole."""
    decide = groups.decide_group

    def broken(members, *args, **kwargs):  # type: ignore[no-untyped-def]
        plan = decide(members, *args, **kwargs)
        refused = any(d.status == "rejected" for decisions in plan.decisions for d in decisions)
        if len(members) > 1 and refused:
            raise TransferRefused("insufficient_funds", "a member was refused")
        return plan

    monkeypatch.setattr(groups, "decide_group", broken)


def answers_before_the_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken: a group's answers go out before its commit is known (here the commit then
    fails: the transaction is rolled back)."""
    apply = groups.apply_group

    class CommitFails:
        def __init__(self, driver: asyncpg.Connection) -> None:
            self._driver = driver

        def __getattr__(self, name: str) -> Any:
            return getattr(self._driver, name)

        async def execute(self, statement: str, *args: Any) -> Any:
            return await self._driver.execute("ROLLBACK" if statement == "COMMIT" else statement, *args)

    async def broken(driver, members, *args, **kwargs):  # type: ignore[no-untyped-def]
        return await apply(CommitFails(driver) if len(members) > 1 else driver, members, *args, **kwargs)

    monkeypatch.setattr(groups, "apply_group", broken)


@pytest.mark.parametrize("breakage", [refusal_fails_the_group, answers_before_the_commit])
async def test_a_broken_coalescer_is_caught(
    client: AsyncTestClient, engine: AsyncEngine, settings: Settings, database_url: str, uid: str,
    lenient_for_tricky: None, monkeypatch: pytest.MonkeyPatch, breakage: Any,
) -> None:  # fmt: skip
    breakage(monkeypatch)
    assert await mixed_group_problems(client, engine, settings, database_url, uid)


def one_slot(engine: AsyncEngine, settings: Settings, **options: Any) -> GroupCommitter:
    """One transaction slot; alone, a transfer waits up to 10 s for a lock."""
    return GroupCommitter(
        UnitOfWork(engine.connect, dataclasses.replace(settings, lock_timeout_ms=10_000)), provision.KEYRING.active,
        max_transfers=10, queue_limit=10, concurrency=1, **options,
    )  # fmt: skip


def one_transfer(uid: str, name: str, debit: str, credit: str, amount: int = 1) -> TransferMember:
    return TransferMember(TransferRequest(
        id=f"{uid}-{name}", debit_account_id=f"{uid}-{debit}", credit_account_id=f"{uid}-{credit}", amount=amount))  # fmt: skip


@contextlib.asynccontextmanager
async def row_held(database_url: str, account: str) -> AsyncIterator[asyncpg.Connection]:
    """A transaction outside the service holding `account`'s row (rolled back by the
    caller, or when the connection closes)."""
    holder = await asyncpg.connect(database_url)
    try:
        await holder.execute("BEGIN")
        await holder.execute("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE", account)
        yield holder
    finally:
        await holder.close()


async def test_a_request_queued_behind_a_stuck_write_path_gets_503_and_nothing_applies(
    client: AsyncTestClient, engine: AsyncEngine, settings: Settings, database_url: str, uid: str
) -> None:
    """The one transaction slot waits on an account locked outside the service (for up to
    the group lock timeout, 5 s here): a request queued behind it is answered 503
    `overloaded` after the queue timeout and is never applied, even once the lock is gone;
    the blocked one then commits."""
    await open_ledger(client, uid)
    committer = one_slot(engine, settings, lock_timeout_ms=5_000, queue_timeout_seconds=0.3)
    async with row_held(database_url, f"{uid}-bob") as holder:
        blocked = asyncio.create_task(committer.submit(one_transfer(uid, "blocked", "bank", "bob")))
        await asyncio.sleep(0.1)
        queued = one_transfer(uid, "queued", "bank", "alice").request
        with pytest.raises(groups.Overloaded):
            await asyncio.wait_for(committer.submit(TransferMember(queued)), timeout=3)
        assert not blocked.done()
        await holder.execute("ROLLBACK")
        assert (await blocked).transfer.status == "posted"
        await committer.close()
        assert await holder.fetchval("SELECT count(*) FROM transfers WHERE id = $1", queued.id) == 0
    assert (await transfer(client, queued.id, queued.debit_account_id, queued.credit_account_id, 1)).status_code == 201


async def test_a_transfer_stuck_on_a_lock_gives_up_its_transaction_slot(
    client: AsyncTestClient, engine: AsyncEngine, settings: Settings, database_url: str, uid: str
) -> None:
    """A lone transfer waiting on an account locked outside the service holds the one
    transaction slot for at most the group lock timeout (200 ms here), then waits alone,
    outside the slots (up to the lock timeout, 10 s here): a transfer between other
    accounts queued behind it is applied while the lock is still held. (One sharing an
    account with the stuck transfer would wait for it: that one holds its other account's
    lock while it waits, as ordered locking does.)"""
    await open_ledger(client, uid)
    committer = one_slot(engine, settings, lock_timeout_ms=200, overlap_min=8)
    funded = await committer.submit(one_transfer(uid, "fund", "bank", "alice", 5))
    assert funded.transfer.status == "posted"
    try:
        async with row_held(database_url, f"{uid}-bob") as holder:
            blocked = asyncio.create_task(committer.submit(one_transfer(uid, "blocked", "bank", "bob")))
            await asyncio.sleep(0.05)
            outcome = await asyncio.wait_for(committer.submit(one_transfer(uid, "queued", "alice", "carol")), timeout=2)
            assert outcome.transfer.status == "posted" and not blocked.done()
            await holder.execute("ROLLBACK")
            assert (await blocked).transfer.status == "posted"
    finally:
        await committer.close()


@pytest.mark.parametrize("pipeline", [False, True], ids=["large-groups-in-flight", "small-groups-in-flight"])
async def test_groups_in_flight_at_once_share_no_id_and_accounts_only_behind_small_groups(
    client: AsyncTestClient, engine: AsyncEngine, settings: Settings, uid: str, monkeypatch: pytest.MonkeyPatch,
    pipeline: bool,
) -> None:  # fmt: skip
    """300 transfers (every tenth repeating an id) among 30 accounts, four transaction
    slots, every group watched as it starts. Two running groups never share an id. Behind
    groups in flight larger than PIPELINE_MAX_TRANSFERS (set to 0 here) a group that would
    only wait for their locks does not start, so no two running groups share an account
    either; behind small groups (the limit set high) groups sharing accounts do run side by
    side, waiting on each other's row locks. Either way groups run side by side and every
    transfer is applied once."""
    monkeypatch.setattr(groups, "PIPELINE_MAX_TRANSFERS", 10_000 if pipeline else 0)
    accounts = [f"{uid}-{n}" for n in range(30)]
    for account in accounts:
        await open_account(client, account, negative=True)
    running: list[frozenset[str]] = []
    shared_ids: list[str] = []
    shared_accounts: list[str] = []
    side_by_side = 0
    apply = groups.apply_group

    async def watched(driver, members, *args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal side_by_side
        keys = frozenset().union(*(groups.ids_of(member) | groups.accounts_of(member) for member in members))
        for other in running:
            shared_ids.extend(key for key in keys & other if key.startswith("\0"))
            shared_accounts.extend(key for key in keys & other if not key.startswith("\0"))
        side_by_side += bool(running)
        running.append(keys)
        try:
            return await apply(driver, members, *args, **kwargs)
        finally:
            running.remove(keys)

    monkeypatch.setattr(groups, "apply_group", watched)
    committer = GroupCommitter(
        UnitOfWork(engine.connect, settings), provision.KEYRING.active, max_transfers=8, queue_limit=1000,
        concurrency=4, lock_timeout_ms=5_000, overlap_min=1,
    )  # fmt: skip
    rng = random.Random(5)
    requests = []
    for n in range(300):
        if n % 10 == 9:  # every tenth repeats the one before it: same id, same body
            requests.append(requests[-1])
            continue
        debit, credit = rng.sample(accounts, 2)
        requests.append(TransferRequest(id=f"{uid}-t{n}", debit_account_id=debit, credit_account_id=credit,
                                        amount=1 + n % 7))  # fmt: skip

    async def client_(index: int) -> list[Any]:
        return [await committer.submit(TransferMember(r)) for r in requests[index::20]]

    answers = [answer for batch in await asyncio.gather(*(client_(i) for i in range(20))) for answer in batch]
    await committer.close()
    assert shared_ids == [] and side_by_side > 0, (shared_ids[:5], side_by_side)
    assert bool(shared_accounts) == pipeline, shared_accounts[:5]
    assert sum(not answer.replayed for answer in answers) == 270
    assert all(answer.transfer.status == "posted" for answer in answers)
