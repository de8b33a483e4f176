"""Infrastructure failures become retryable 503 problems, never hangs or 500s; and the
savepoint paths of the transfer service do what the design says."""

from __future__ import annotations

import asyncio
import time

from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.domain import TransferRequest
from ledger.http.app import create_app
from ledger.service.groups import GroupCommitter, TransferMember
from ledger.service.unit_of_work import UnitOfWork
from ledger.settings import Settings
from tests import provision
from tests.conftest import authorized, free_port
from tests.integration.helpers import assert_problem, lenient_decision, open_account, transfer


async def test_an_unreachable_database_is_a_503_with_retry_after(uid: str) -> None:
    """Nothing listens on the database port: writes and reads answer 503 `unavailable`
    with Retry-After; liveness stays 200 and readiness says 503."""
    settings = provision.settings_for(f"postgresql://nobody@127.0.0.1:{free_port()}/none", pool_timeout_seconds=2)
    async with authorized(AsyncTestClient(create_app(settings))) as client:
        response = await transfer(client, f"t-{uid}", "a", "b", 1)
        assert_problem(response, 503, "unavailable")
        assert response.headers["retry-after"] == "1"
        assert_problem(await client.get("/v1/accounts/a"), 503, "unavailable")
        assert (await client.get("/health/live")).status_code == 200
        assert (await client.get("/health/ready")).status_code == 503


async def test_a_stuck_lock_fails_fast_as_lock_timeout_and_spares_other_accounts(
    service_database_url: str, engine: AsyncEngine, uid: str
) -> None:
    """A transaction outside the service holds an account row: a transfer touching it gets
    503 `lock_timeout` after lock_timeout (300 ms here), one not touching it succeeds, and
    a retry with the same id applies once the lock is gone."""
    settings = provision.settings_for(service_database_url, lock_timeout_ms=300)
    async with authorized(AsyncTestClient(create_app(settings))) as client:
        await open_account(client, f"bank-{uid}", negative=True)
        await open_account(client, f"held-{uid}")
        await open_account(client, f"free-{uid}")
        async with engine.connect() as holder:
            transaction = await holder.begin()
            await holder.execute(text("SELECT 1 FROM accounts WHERE id = :id FOR UPDATE"), {"id": f"held-{uid}"})
            started = time.monotonic()
            blocked = await transfer(client, f"t1-{uid}", f"bank-{uid}", f"held-{uid}", 5)
            elapsed = time.monotonic() - started
            assert_problem(blocked, 503, "lock_timeout")
            assert "retry-after" in blocked.headers and elapsed < 5
            assert (await transfer(client, f"t2-{uid}", f"bank-{uid}", f"free-{uid}", 5)).status_code == 201
            await transaction.rollback()
        retried = await transfer(client, f"t1-{uid}", f"bank-{uid}", f"held-{uid}", 5)
        assert retried.status_code == 201 and "idempotent-replayed" not in retried.headers


async def test_the_database_refuses_an_overdraft_the_code_let_through(
    client: AsyncTestClient, monkeypatch, uid: str
) -> None:
    """If the Python decision were wrong (simulated: it believes the account may go
    negative), PostgreSQL's CHECK refuses the group's write, the transaction rolls back,
    and the refusal the constraint stands for is recorded as insufficient_funds: no money
    moves."""
    await open_account(client, f"bank-{uid}", negative=True)
    await open_account(client, f"poor-{uid}")

    lenient_decision(monkeypatch)
    response = await transfer(client, f"over-{uid}", f"poor-{uid}", f"bank-{uid}", 50)
    assert_problem(response, 422, "insufficient_funds")
    monkeypatch.undo()
    account = (await client.get(f"/v1/accounts/poor-{uid}")).json()
    assert account["balance"]["posted"] == 0 and account["entries_count"] == 0
    assert (await client.get(f"/v1/transfers/over-{uid}")).json()["status"] == "rejected"


async def test_losing_the_race_for_an_id_rolls_back_and_replays_the_winner(
    client: AsyncTestClient, engine: AsyncEngine, settings: Settings, uid: str
) -> None:
    """Another transaction inserts the same transfer id first and commits while the
    service is applying it: the group's insert waits on the unique key, then skips it,
    the group rolls back (no entries, no balance change) and runs again, which finds the
    winner's outcome and answers it as a replay. (Called through the service: the
    in-process HTTP test client would block this test's event loop while the request
    waits.)"""
    await open_account(client, f"bank-{uid}", negative=True)
    await open_account(client, f"gina-{uid}")
    service = GroupCommitter(
        UnitOfWork(engine.connect, settings), provision.KEYRING.active, max_transfers=10, queue_limit=10,
        concurrency=1, lock_timeout_ms=250,
    )  # fmt: skip
    request = TransferRequest(
        id=f"race-{uid}", debit_account_id=f"bank-{uid}", credit_account_id=f"gina-{uid}", amount=9
    )
    async with engine.connect() as winner:
        transaction = await winner.begin()
        await winner.execute(
            text(
                "INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, currency, status, code, "
                "request_hash, created_at, updated_at) VALUES (:id, :d, :c, 9, 'EUR', 'rejected', 'insufficient_funds', "
                ":hash, now(), now())"
            ),
            {
                "id": request.id,
                "d": request.debit_account_id,
                "c": request.credit_account_id,
                "hash": request.fingerprint(),
            },
        )
        pending = asyncio.create_task(service.submit(TransferMember(request)))
        await asyncio.sleep(0.5)
        assert not pending.done(), "the service should be waiting on the unique key"
        await transaction.commit()
        outcome = await pending
    assert outcome.replayed and outcome.transfer.status == "rejected"
    assert outcome.transfer.code == "insufficient_funds"
    gina = (await client.get(f"/v1/accounts/gina-{uid}")).json()
    assert gina["balance"]["posted"] == 0 and gina["entries_count"] == 0
