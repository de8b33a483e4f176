"""The suite's contract tests against `make cluster`'s deployment: HAProxy in front of two
instances, which write through PgBouncer (transaction mode) to a primary with a
synchronous standby, and read auditors' endpoints from that standby (README, "Scaling
out"). The tests below are the ones the single server passes, imported as they are; this
module only points their `server_url` at HAProxy and their `database_url` at the
cluster's primary (as its owner, for the invariant checks).

What that shows: every invariant of the concurrency suite (no money created, no
overdraft, one outcome per id, no deadlock) holds when consecutive requests of one
client land on different instances and different server sessions; the contract's codes,
the client library's round trips (replays, two-phase, batches, balances as of a moment,
the trial balance and verification, served by the standby) and the hostile inputs give
the same answers through the deployment as from one process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.cluster import stack
from ledger.database import create_engine
from ledger.embedded import EmbeddedPostgres
from ledger.settings import Settings
from tests import provision
from tests.conftest import free_port
from tests.e2e.test_client import (  # noqa: F401 (collected here, against the cluster)
    ledger,
    test_accounts_and_transfers_round_trip_with_ids_replays_and_refusals,
    test_async_client_round_trips_and_iterates,
    test_history_audit_keys_and_auth_round_trip,
    test_iterators_cross_pages_and_requests_name_the_client,
    test_two_phase_reversals_and_batches_round_trip,
)
from tests.e2e.test_concurrency import (  # noqa: F401
    test_50_concurrent_posts_of_one_id_apply_once_and_all_agree,
    test_64_clients_moving_money_both_ways_keep_every_invariant,
    test_concurrent_batches_and_single_transfers_never_deadlock_and_conserve_money,
    test_concurrent_withdrawals_beyond_the_balance_never_overdraw,
    test_racing_posts_voids_and_expiry_make_exactly_one_decision,
)
from tests.e2e.test_contract_codes import test_batch_two_phase_and_reversal_codes_end_to_end  # noqa: F401
from tests.e2e.test_trust_boundaries import test_hostile_bodies_and_paths_are_4xx_and_change_nothing  # noqa: F401

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict]]:
    directory = tmp_path_factory.mktemp("cluster")
    state = stack.up(
        directory,
        2,
        free_port(),
        environment={"LEDGER_ADMIN_KEY": provision.ADMIN_KEY, "LEDGER_LOG_LEVEL": "info"},
    )
    try:
        yield directory, state
    finally:
        stack.down(directory)
    for log in sorted(directory.glob("instance-*/service.log")):
        text = log.read_text(errors="replace")
        assert '"level":"error"' not in text, f"{log}:\n{text[-3000:]}"


@pytest.fixture(scope="module")
def server_url(cluster: tuple[Path, dict]) -> str:
    return str(cluster[1]["base_url"])


@pytest.fixture(scope="module")
def database_url(cluster: tuple[Path, dict]) -> str:
    state = stack.read_state(cluster[0]) or {}
    primary = EmbeddedPostgres(Path(state["primary"]["data_dir"]))
    primary.port = state["primary"]["port"]
    return primary.url


@pytest.fixture(scope="module")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(Settings(database_url=database_url))
    yield engine
    await engine.dispose()


def test_the_deployment_is_what_the_readme_draws(cluster: tuple[Path, dict], server_url: str) -> None:
    """Two instances behind HAProxy, a streaming synchronous standby, and reads routed to
    it: the figures above come from this shape, not from one process."""
    import httpx

    from ledger.cluster import replication

    directory, state = cluster
    assert len(state["instances"]) == 2 and state["standby"] and state["pgbouncer"]
    primary = EmbeddedPostgres(Path(state["primary"]["data_dir"]))
    primary.port = state["primary"]["port"]
    [standby] = replication.primary_lag(primary)
    assert (standby.name, standby.state, standby.sync_state) == ("standby1", "streaming", "sync")
    response = httpx.get(f"{server_url}/v1/accounts", headers=provision.API_HEADERS, timeout=10)
    assert response.status_code == 200 and response.headers["ledger-read-source"] == "replica"
    # HAProxy sees both instances healthy (its own exporter, in the Prometheus view).
    exported = httpx.get(f"{server_url}/haproxy/metrics", timeout=10).text
    assert 'haproxy_backend_active_servers{proxy="instances"} 2' in exported
    assert (directory / "prometheus.yml").exists()


def test_cluster_down_after_the_supervisor_was_killed_leaves_nothing_running(tmp_path: Path) -> None:
    """`kill -9` of the supervisor, then `ledger cluster down`: every process the cluster
    started is gone (its database servers by their watchdogs, the rest by `down`)."""
    import os
    import signal
    import time

    from ledger.cluster.stack import alive

    state = stack.up(tmp_path / "c", 1, free_port())
    postmasters = [
        int((Path(state[server]["data_dir"]) / "pgdata" / "postmaster.pid").read_text().split()[0])
        for server in ("primary", "standby")
    ]
    others = [state["instances"][0]["pid"], state["haproxy"]["pid"], state["pgbouncer"]["pid"]]
    assert all(alive(pid) for pid in postmasters + others)
    os.kill(state["supervisor_pid"], signal.SIGKILL)
    assert stack.down(tmp_path / "c")
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in postmasters + others) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in postmasters + others if alive(pid)]
