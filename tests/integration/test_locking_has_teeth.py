"""The concurrency checks have teeth: with the locking discipline broken, the same bank
scenario that passes end to end is caught by `find_violations`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.http.app import create_app
from ledger.service.groups import lock_group
from ledger.settings import Settings
from tests import provision
from tests.broken_locking import lock_in_request_order, read_without_for_update
from tests.scenario import find_violations, run_bank_scenario
from tests.servers import serving

pytestmark = pytest.mark.slow

# Fewer transfers than the end-to-end run: the broken variants stall on deadlock
# detection and lock timeouts. One wave of 64 concurrent transfers among 5 accounts
# already holds opposite pairs (so deadlocks) and same-account races (so stale reads).
TRANSFERS = 64


# Instances of the service on the one database. Within one process, groups in flight at
# once never share an account (ledger.service.groups); across processes and instances they
# do, and that is where the lock discipline must hold.
INSTANCES = 8


def _settings(service_database_url: str) -> Settings:
    # Many small groups at once: concurrent transactions that share accounts, which is
    # where a broken lock discipline shows.
    return provision.settings_for(
        service_database_url, pool_size=4, max_overflow=2, group_concurrency=2, group_max_transfers=4
    )


@contextlib.asynccontextmanager
async def instances(service_database_url: str, locker: Any) -> AsyncIterator[list[str]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(serving(create_app(_settings(service_database_url), group_locker=locker)))
            for _ in range(INSTANCES)
        ]


async def test_locking_accounts_in_request_order_deadlocks(
    service_database_url: str, engine: AsyncEngine, uid: str
) -> None:
    """Locks taken one by one in the order the group's requests name them (debit, then
    credit): groups with opposite transfers deadlock, and the scenario's check of
    pg_stat_database.deadlocks reports it."""
    async with instances(service_database_url, lock_in_request_order) as base_urls:
        report = await run_bank_scenario(base_urls, engine, prefix=f"unordered-{uid}", clients=64, transfers=TRANSFERS)
    violations = await find_violations(report, engine)
    assert any("deadlocks went from" in v for v in violations), violations


async def test_reading_accounts_without_for_update_is_caught(
    service_database_url: str, engine: AsyncEngine, uid: str
) -> None:
    """Without FOR UPDATE two groups decide on the same stale balances and sequences:
    the scenario sees server errors or corrupted journals and balances."""
    async with instances(service_database_url, read_without_for_update) as base_urls:
        report = await run_bank_scenario(base_urls, engine, prefix=f"nolock-{uid}", clients=64, transfers=TRANSFERS)
    violations = await find_violations(report, engine)
    # What breaks first: two transfers compute the same next sequence for an account, and
    # the journal's primary key turns the second into a server error, never silent loss.
    assert any("server error" in v for v in violations), violations


async def test_the_same_scenario_on_eight_instances_with_the_real_locking_holds(
    service_database_url: str, engine: AsyncEngine, uid: str
) -> None:
    """The control: the same run with the service's own lock statement finds nothing, so
    what the two tests above catch is the broken discipline, not the set-up."""
    async with instances(service_database_url, lock_group) as base_urls:
        report = await run_bank_scenario(base_urls, engine, prefix=f"ordered-{uid}", clients=64, transfers=TRANSFERS)
    assert await find_violations(report, engine) == []
