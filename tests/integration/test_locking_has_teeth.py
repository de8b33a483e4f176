"""The concurrency checks have teeth: with the locking discipline broken, the same bank
scenario that passes end to end is caught by `find_violations`."""

from __future__ import annotations

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.http.app import create_app
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


def _settings(service_database_url: str) -> Settings:
    # Many small groups at once: concurrent transactions that share accounts, which is
    # where a broken lock discipline shows.
    return provision.settings_for(
        service_database_url, pool_size=30, max_overflow=10, group_concurrency=8, group_max_transfers=4
    )


async def test_locking_accounts_in_request_order_deadlocks(
    service_database_url: str, engine: AsyncEngine, uid: str
) -> None:
    """Locks taken one by one in the order the group's requests name them (debit, then
    credit): groups with opposite transfers deadlock, and the scenario's check of
    pg_stat_database.deadlocks reports it."""
    app = create_app(_settings(service_database_url), group_locker=lock_in_request_order)
    async with serving(app) as base_url:
        report = await run_bank_scenario(base_url, engine, prefix=f"unordered-{uid}", clients=64, transfers=TRANSFERS)
    violations = await find_violations(report, engine)
    assert any("deadlocks went from" in v for v in violations), violations


async def test_reading_accounts_without_for_update_is_caught(
    service_database_url: str, engine: AsyncEngine, uid: str
) -> None:
    """Without FOR UPDATE two groups decide on the same stale balances and sequences:
    the scenario sees server errors or corrupted journals and balances."""
    app = create_app(_settings(service_database_url), group_locker=read_without_for_update)
    async with serving(app) as base_url:
        report = await run_bank_scenario(base_url, engine, prefix=f"nolock-{uid}", clients=64, transfers=TRANSFERS)
    violations = await find_violations(report, engine)
    # What breaks first: two transfers compute the same next sequence for an account, and
    # the journal's primary key turns the second into a server error, never silent loss.
    assert any("server error" in v for v in violations), violations
