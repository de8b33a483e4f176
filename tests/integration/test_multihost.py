"""A multi-host database URL (`postgresql://...@standby,primary/ledger?
target_session_attrs=read-write`) follows a failover without anything repointing the
service: connections go to whichever listed server takes writes, the promoted standby
after a failover (README, "Scaling out", "Failover")."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from urllib.parse import quote

from litestar.testing import AsyncTestClient

from ledger import migrate
from ledger.cluster import replication
from ledger.embedded import SERVICE_LOGIN, EmbeddedPostgres
from ledger.http.app import create_app
from tests import provision
from tests.conftest import authorized
from tests.integration.helpers import open_account, transfer


def multi_host_url(password: str, *servers: EmbeddedPostgres) -> str:
    hosts = ",".join(f"127.0.0.1:{server.port}" for server in servers)
    return f"postgresql://{SERVICE_LOGIN}:{quote(password, safe='')}@{hosts}/ledger?target_session_attrs=read-write"


async def test_a_multi_host_url_writes_to_the_primary_then_to_the_promoted_standby(tmp_path: Path) -> None:
    primary = EmbeddedPostgres(tmp_path / "primary")
    standby = replication.Standby(tmp_path / "standby", primary)
    try:
        await asyncio.to_thread(primary.start)
        await asyncio.to_thread(migrate.upgrade, primary.url)
        await asyncio.to_thread(replication.enable_replication, primary)
        await asyncio.to_thread(standby.start)
        await asyncio.to_thread(replication.wait_for_streaming, primary)
        password = primary._credentials()["service_password"]
        # The standby first: it answers, but read-only, so it must be passed over.
        settings = provision.settings_for(
            multi_host_url(password, standby, primary), checkpoint_interval_seconds=0, expiry_sweep_interval_seconds=0
        )
        async with AsyncTestClient(create_app(settings)) as raw:  # type: ignore[arg-type]
            client = authorized(raw)
            await open_account(client, "bank", negative=True)
            await open_account(client, "alice")
            assert (await transfer(client, "before", "bank", "alice", 100)).status_code == 201
            await asyncio.to_thread(replication.wait_for_replay, primary, standby)

            await asyncio.to_thread(primary.crash)
            await asyncio.to_thread(replication.promote, standby)
            deadline = time.monotonic() + 20
            while True:
                response = await transfer(client, "after", "bank", "alice", 50)
                if response.status_code == 201 or time.monotonic() > deadline:
                    break
                assert response.status_code == 503, response.text  # the old primary's connections, retried
                await asyncio.sleep(0.2)
            assert response.status_code == 201, response.text
            account = (await client.get("/v1/accounts/alice")).json()
            assert account["balance"]["posted"] == 150 and account["entries_count"] == 2
        # Both on the promoted server, which the URL found by itself.
        stored = replication.sql(standby, "SELECT string_agg(id, ',' ORDER BY id) FROM transfers")
        assert stored == "after,before"
    finally:
        standby.stop()
        try:
            primary.stop()
        except Exception:
            pass
