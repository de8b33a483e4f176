"""Round trips per transfer, counted: the hot path's cost model is part of its contract.

A new transfer that is applied costs four round trips on the driver connection (BEGIN,
the ordered lock, one write, COMMIT) and none through SQLAlchemy. Everything else falls
back to the general path, which is counted too, so that a change that silently sends
every transfer down the slow path (or adds a statement to the fast one) fails here.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.database import create_engine
from ledger.domain import TransferRequest
from ledger.service.transfers import TransferService
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
    # Statements that go through SQLAlchemy (the general path) are counted separately.
    event.listen(service_engine.sync_engine, "before_cursor_execute", lambda *args: counts.update(["sqlalchemy"]))
    service = TransferService(
        CountingUnitOfWork(service_engine.connect, settings, counts=counts), provision.KEYRING.active
    )
    try:

        async def create(transfer_id: str, amount: int, debit: str = "a", credit: str = "b") -> Counter[str]:
            counts.clear()
            outcome = await service.create(
                TransferRequest(id=f"rt-{uid}-{transfer_id}", debit_account_id=f"rt-{uid}-{debit}",
                                credit_account_id=f"rt-{uid}-{credit}", amount=amount)
            )  # fmt: skip
            assert outcome.transfer.status in {"posted", "rejected"}
            return Counter(counts)

        await create("warm-up", 1)  # the first use of a statement also prepares it
        assert await create("t1", 5) == Counter({"driver": 4})
        assert await create("t2", 7) == Counter({"driver": 4})

        # A replay: the fast path's write finds the id and rolls back (4 round trips),
        # then the general path answers with the stored outcome.
        replay = await create("t1", 5)
        assert replay["driver"] == 4 and replay["sqlalchemy"] > 0

        # A refusal (b may not go negative) is recorded by the general path.
        refusal = await create("t3", 10**9, debit="b", credit="a")
        assert refusal["driver"] == 3 and refusal["sqlalchemy"] > 0
    finally:
        await service_engine.dispose()
