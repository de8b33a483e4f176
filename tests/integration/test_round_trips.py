"""Round trips per transfer, counted: the hot path's cost model is part of its contract.

A group transaction costs four round trips on the driver connection (BEGIN, the ordered
lock, one write, COMMIT) however many transfers it carries, and none through SQLAlchemy:
a lone transfer (a group of one), a recorded refusal, a replay (which reads its stored
outcome instead of writing). Requests sent at once share groups, so that a change that
silently stops grouping, or adds a statement to a group, fails here.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.database import create_engine
from ledger.domain import TransferRequest
from ledger.service.groups import GroupCommitter, TransferMember
from ledger.service.unit_of_work import UnitOfWork
from ledger.settings import Settings
from tests import provision


class CountingDriver:
    """An asyncpg connection that counts the calls that each make one round trip."""

    def __init__(self, driver: Any, counts: Counter[str]) -> None:
        self._driver = driver
        self._counts = counts

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._driver, name)
        if name in {"execute", "fetch", "fetchrow", "fetchval", "executemany"}:

            async def counted(*args: Any, **kwargs: Any) -> Any:
                self._counts["driver"] += 1
                return await attribute(*args, **kwargs)

            return counted
        return attribute


class CountingUnitOfWork(UnitOfWork):
    def __init__(self, *args: Any, counts: Counter[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.counts = counts

    async def run_on_driver(self, work: Any) -> Any:
        return await super().run_on_driver(lambda driver: work(CountingDriver(driver, self.counts)))


async def test_a_new_transfer_costs_four_round_trips(settings: Settings, engine: AsyncEngine, uid: str) -> None:
    async with engine.begin() as connection:
        await connection.execute(
            text(
                "INSERT INTO accounts (id, currency, allow_negative_balance) VALUES (:a, 'EUR', true), (:b, 'EUR', false)"
            ),
            {"a": f"rt-{uid}-a", "b": f"rt-{uid}-b"},
        )
    service_engine = create_engine(settings)
    counts: Counter[str] = Counter()
    groups: list[int] = []
    # Statements that go through SQLAlchemy are counted separately: there should be none.
    event.listen(service_engine.sync_engine, "before_cursor_execute", lambda *args: counts.update(["sqlalchemy"]))
    committer = GroupCommitter(
        CountingUnitOfWork(service_engine.connect, settings, counts=counts), provision.KEYRING.active,
        max_transfers=1000, queue_limit=10_000, concurrency=1, lock_timeout_ms=250, on_group=groups.append,
    )  # fmt: skip

    def request(transfer_id: str, amount: int, debit: str = "a", credit: str = "b") -> TransferRequest:
        return TransferRequest(
            id=f"rt-{uid}-{transfer_id}", debit_account_id=f"rt-{uid}-{debit}", credit_account_id=f"rt-{uid}-{credit}",
            amount=amount,
        )  # fmt: skip

    async def create(transfer_id: str, amount: int, debit: str = "a", credit: str = "b") -> Counter[str]:
        counts.clear()
        outcome = await committer.submit(TransferMember(request(transfer_id, amount, debit, credit)))
        assert outcome.transfer.status in {"posted", "rejected"}
        return Counter(counts)

    try:
        await create("warm-up", 1)  # the first use of a statement also prepares it
        assert await create("t1", 5) == Counter({"driver": 4})
        assert await create("t2", 7) == Counter({"driver": 4})
        # A replay: the lock statement finds the id, its stored outcome is read, nothing
        # is written.
        assert await create("t1", 5) == Counter({"driver": 4})
        # A refusal (b may not go negative) is recorded by the group's one write.
        assert await create("t3", 10**9, debit="b", credit="a") == Counter({"driver": 4})

        # 40 requests at once, one group in flight at a time: they share groups, each of
        # four round trips.
        counts.clear()
        groups.clear()
        outcomes = await asyncio.gather(
            *(committer.submit(TransferMember(request(f"burst-{n}", 1))) for n in range(40))
        )
        assert all(outcome.transfer.status == "posted" for outcome in outcomes)
        assert sum(groups) == 40 and len(groups) < 40, groups
        assert counts == Counter({"driver": 4 * len(groups)})
    finally:
        await service_engine.dispose()
