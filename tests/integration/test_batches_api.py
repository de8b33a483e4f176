"""Batches over HTTP: per-item outcomes, linked chains, replays, limits, and the
subtransaction budget measured inside PostgreSQL."""

from __future__ import annotations

from typing import Any

import asyncpg
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.database import create_session_factory, libpq_url
from ledger.domain import BatchItem, TransferRequest
from ledger.service.groups import BatchMember, apply_group
from tests import provision
from tests.integration.helpers import assert_problem, open_account

SUBTRANSACTION_CACHE = 64  # PGPROC_MAX_CACHED_SUBXIDS


def leg(transfer_id: str, debit: str, credit: str, amount: int, **extra: object) -> dict:
    return {"id": transfer_id, "debit_account_id": debit, "credit_account_id": credit, "amount": amount, **extra}


async def test_a_batch_applies_items_in_order_with_chains_all_or_nothing(client: AsyncTestClient, uid: str) -> None:
    """A payout, a split payment whose second leg cannot be paid (the chain is undone and
    both legs say why), a split payment that can, a repeated id and an open chain."""
    bank, shop, alice, fees = (f"{name}-{uid}" for name in ("bank", "shop", "alice", "fees"))
    await open_account(client, bank, negative=True)
    for account_id in (shop, alice, fees):
        await open_account(client, account_id)
    transfers = [
        leg(f"pay-{uid}", bank, alice, 100),
        leg(f"split1-a-{uid}", alice, shop, 60, linked=True),
        leg(f"split1-b-{uid}", alice, fees, 60),
        leg(f"split2-a-{uid}", alice, shop, 55, linked=True),
        leg(f"split2-b-{uid}", alice, fees, 5),
        leg(f"pay-{uid}", bank, alice, 100),
        leg(f"open-{uid}", bank, alice, 1, linked=True),
    ]
    response = await client.post("/v1/transfers/batch", json={"transfers": transfers})
    assert response.status_code == 200
    results = response.json()["results"]
    assert [(r["index"], r["id"], r["status"], r.get("code")) for r in results] == [
        (0, f"pay-{uid}", "created", None),
        (1, f"split1-a-{uid}", "rejected", "linked_transfer_failed"),
        (2, f"split1-b-{uid}", "rejected", "insufficient_funds"),
        (3, f"split2-a-{uid}", "created", None),
        (4, f"split2-b-{uid}", "created", None),
        (5, f"pay-{uid}", "replayed", None),
        (6, f"open-{uid}", "rejected", "linked_chain_open"),
    ]
    assert results[0]["transfer"]["status"] == "posted" and results[1]["transfer"]["status"] == "rejected"
    balances = {a: (await client.get(f"/v1/accounts/{a}")).json()["balance"]["posted"] for a in (alice, shop, fees)}
    assert balances == {alice: 40, shop: 55, fees: 5}

    # Every item's outcome is permanent: the whole batch again is all replays, no money moves,
    # and single requests with an item's fields replay that item's outcome.
    again = (await client.post("/v1/transfers/batch", json={"transfers": transfers})).json()["results"]
    assert [r["status"] for r in again] == ["replayed"] * 7
    assert [r.get("code") for r in again] == [r.get("code") for r in results]
    assert (await client.get(f"/v1/accounts/{alice}")).json()["balance"]["posted"] == 40
    single = await client.post("/v1/transfers", json=leg(f"split1-a-{uid}", alice, shop, 60))
    assert_problem(single, 422, "linked_transfer_failed")
    assert single.headers["idempotent-replayed"] == "true"
    conflict = (
        await client.post("/v1/transfers/batch", json={"transfers": [leg(f"pay-{uid}", bank, alice, 101)]})
    ).json()
    assert conflict["results"][0]["code"] == "transfer_exists_with_different_fields"


async def test_batch_limits(client: AsyncTestClient, uid: str) -> None:
    one = leg(f"x-{uid}", "a", "b", 1)
    assert_problem(await client.post("/v1/transfers/batch", json={"transfers": [one] * 1001}), 413, "batch_too_large")
    assert_problem(await client.post("/v1/transfers/batch", json={"transfers": []}), 400, "validation_error")
    bad = await client.post("/v1/transfers/batch", json={"transfers": [one, {**one, "amount": 1.5}]})
    assert_problem(bad, 400, "validation_error")
    assert_problem(
        await client.post("/v1/transfers/batch", json={"transfers": [one], "extra": 1}), 400, "validation_error"
    )
    # Nothing of a refused batch is recorded.
    assert_problem(await client.get(f"/v1/transfers/x-{uid}"), 404, "transfer_not_found")


SUBTRANSACTIONS = (
    "SELECT subxact_count, subxact_overflowed FROM pg_stat_get_backend_idset() AS b(id) "
    "CROSS JOIN LATERAL pg_stat_get_backend_subxact(b.id) "
    "WHERE pg_stat_get_backend_pid(b.id) = pg_backend_pid()"
)


async def _subtransactions(session) -> tuple[int, bool]:  # type: ignore[no-untyped-def]
    row = (await session.execute(text(SUBTRANSACTIONS))).one()
    return int(row.subxact_count), bool(row.subxact_overflowed)


class ProbingDriver:
    """An asyncpg connection that reads the backend's subtransaction count just before
    the group commits."""

    def __init__(self, connection: asyncpg.Connection) -> None:
        self._connection = connection
        self.before_commit: tuple[int, bool] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)

    async def execute(self, statement: str, *arguments: Any) -> Any:
        if statement == "COMMIT":
            row = await self._connection.fetchrow(SUBTRANSACTIONS)
            self.before_commit = (int(row["subxact_count"]), bool(row["subxact_overflowed"]))
        return await self._connection.execute(statement, *arguments)


async def test_a_1000_item_batch_of_chains_uses_no_subtransaction(
    engine: AsyncEngine, service_database_url: str, uid: str, client: AsyncTestClient
) -> None:
    """1000 items (chains of 4 legs, some failing) decided and written in one group
    transaction: PostgreSQL's own count of the backend's subtransactions, read inside that
    transaction just before commit, is 0 (group commit uses no savepoint), far under the
    64 PostgreSQL caches. The measurement is shown to work: 100 written savepoints in one
    transaction overflow the cache."""
    async with engine.connect() as connection:
        version = (await connection.execute(text("SHOW server_version_num"))).scalar()
    assert int(version) >= 160000, "pg_stat_get_backend_subxact needs PostgreSQL 16+"
    bank = f"bank-{uid}"
    customers = [f"c{i}-{uid}" for i in range(20)]
    await open_account(client, bank, negative=True)
    for customer in customers:
        await open_account(client, customer)
    items = []
    for number in range(1000):
        chain, leg_number = divmod(number, 4)
        first, second = customers[chain % 20], customers[(chain + 1) % 20]
        # Fund a customer, pass money on and back, then pay out: every fifth payout is too
        # large, so its whole chain fails.
        debit, credit, amount = [
            (bank, first, 100),
            (first, second, 10),
            (second, first, 10),
            (first, bank, 10_000 if chain % 5 == 0 else 50),
        ][leg_number]
        request = TransferRequest(
            id=f"sub-{uid}-{number}", debit_account_id=debit, credit_account_id=credit, amount=amount
        )
        items.append(BatchItem(request, linked=leg_number != 3))

    connection = await asyncpg.connect(libpq_url(service_database_url))
    try:
        driver = ProbingDriver(connection)
        (results,) = await apply_group(driver, [BatchMember(items)], provision.KEYRING.active)  # type: ignore[arg-type]
    finally:
        await connection.close()
    assert len(results) == 1000 and {r.status for r in results} >= {"created", "rejected"}
    assert driver.before_commit == (0, False)

    async with create_session_factory(engine)() as session:
        await session.execute(text("CREATE TEMPORARY TABLE savepoint_probe (n int)"))
        for n in range(100):
            async with session.begin_nested():
                await session.execute(text("INSERT INTO savepoint_probe VALUES (:n)"), {"n": n})
        count, overflowed = await _subtransactions(session)
        await session.rollback()
    assert count == SUBTRANSACTION_CACHE and overflowed
