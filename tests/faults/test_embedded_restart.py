"""The embedded PostgreSQL comes back at the same address after a crash, whoever restarts
it: its port lives in the data directory, not on the command line of the first start, and
so do the passwords of its superuser and of the serving role."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from ledger.embedded import START_TIMEOUT_SECONDS, EmbeddedPostgres

pytestmark = pytest.mark.faults


def test_a_plain_pg_ctl_start_after_a_crash_keeps_the_address(tmp_path: Path) -> None:
    first = EmbeddedPostgres(tmp_path / "pg")
    url = first.start()
    try:
        first.crash()
        # What an operator (or a fault harness) would do: pg_ctl with no options.
        first._pg_ctl("start", "-w", "-t", str(START_TIMEOUT_SECONDS), "-l", str(first.log_file))
        assert asyncio.run(_answers(url)) == 1
        # And the next `ledger serve` finds it at that same URL.
        again = EmbeddedPostgres(tmp_path / "pg")
        assert again.start() == url
        # So does the serving role's, which a running service reconnects with.
        assert again.service_url == first.service_url
        assert asyncio.run(_answers(again.service_url)) == 1
    finally:
        first.started_here = True
        first.stop()


async def _answers(url: str) -> int:
    connection = await asyncpg.connect(url)
    try:
        return int(await connection.fetchval("SELECT 1"))
    finally:
        await connection.close()
