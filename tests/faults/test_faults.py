"""Short forms of the fault scenarios of `loadtest.faults` (the long forms run there).

Each starts its own embedded PostgreSQL and `ledger serve` (the database gets crashed),
runs 8 clients that retry by transfer id for 1.5 s, injects the fault, runs 1.5 s more,
lets every client settle its last id, and compares the database with what the clients
were told. Pass figures (see each scenario's docstring in `loadtest/faults.py`): 0 lost,
0 phantom, 0 refused-but-applied, 0 duplicated, 0 unresolved, money conserved, no
forbidden negative balance, audit verification passes, no 5xx but 503 (each with
Retry-After, within 5 s), no request hanging past 15 s, first acknowledgement within
10 s of recovery.
"""

from __future__ import annotations

import asyncio

import pytest

from loadtest.faults import (
    INVARIANTS,
    OVERLOAD_SETTINGS,
    SCENARIOS,
    bench,
    cluster_bench,
    failures,
    overload,
    run_scenario,
)

pytestmark = [pytest.mark.slow, pytest.mark.faults]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_fault_loses_nothing_and_applies_nothing_twice(scenario: str) -> None:
    # Its own event loop: the bench starts processes and migrates synchronously.
    with bench() as instance:
        report = asyncio.run(run_scenario(scenario, instance, clients=8, phase=1.5))
    assert not failures(report), report
    # The fault happened under load and clients saw it (or, for the in-database faults
    # that the service absorbs by retrying on a new connection, at least did not suffer).
    assert report["acknowledged"] > report["acknowledged_before_fault"] > 0, report
    assert report["errors_logged"] == 0, report["error_examples"]


def test_overload_is_answered_fast_with_503_and_memory_stays_bounded() -> None:
    """More concurrent requests (64) than the pool (2, both held by transfers waiting on
    a locked account) can serve: every one gets 503 `overloaded` with Retry-After within
    the pool timeout (0.5 s) plus 1 s, the service's RSS grows by less than 50 MB over
    1,000 such requests, and afterwards each id retried is applied exactly once."""
    with bench(**OVERLOAD_SETTINGS) as instance:
        report = asyncio.run(overload(instance, requests=1000, concurrency=64))
    assert report["answers_while_overloaded"] == {"503 overloaded": 1000}, report
    assert report["slowest_answer_seconds"] <= 1.5, report
    assert report["rss_growth_mb"] < 50, report
    assert report["blocked_requests_finished_before_release"] == 0, report
    assert not report["unexpected"], report
    assert all(report[key] == 0 for key in INVARIANTS), report
    assert report["checked"] == 1002, report


def test_failover_of_the_primary_loses_no_acknowledged_transfer() -> None:
    """`make cluster`'s deployment (synchronous standby, PgBouncer, two instances, HAProxy):
    the primary is killed with SIGKILL under load; the supervisor promotes the standby and
    points PgBouncer at it. Every transfer a client was told about is on the promoted
    server exactly once, its journals are gap-free and verify, and clients waited less
    than 10 s (see `failover` in loadtest/faults.py)."""
    with cluster_bench() as instance:
        report = asyncio.run(run_scenario("failover", instance, clients=8, phase=1.5))
    assert not failures(report), report
    assert report["acknowledged"] > report["acknowledged_before_fault"] > 0, report
    # The transfers after the fault were written to the promoted server, not to a ghost.
    assert report["new_primary"].endswith("standby"), report
    assert report["errors_logged"] == 0, report["error_examples"]
