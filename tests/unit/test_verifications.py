"""Verifications requested at once share their runs, and a report is never older than
its request: checked with a stand-in for the verification that counts its runs and
stamps each report with its run number."""

from __future__ import annotations

import asyncio

import pytest

from ledger.http.audit import Verifications
from ledger.service.audit import AuditReport


class CountingRun:
    def __init__(self, seconds: float = 0.05) -> None:
        self.seconds = seconds
        self.runs: list[str | None] = []
        self.concurrent = 0
        self.most_concurrent = 0

    async def __call__(self, scope: str | None) -> AuditReport:
        self.runs.append(scope)
        self.concurrent += 1
        self.most_concurrent = max(self.most_concurrent, self.concurrent)
        try:
            await asyncio.sleep(self.seconds)
            if scope == "missing":
                raise LookupError("no such account")
            return AuditReport(accounts_checked=len(self.runs))  # the run's number
        finally:
            self.concurrent -= 1


async def test_a_burst_costs_at_most_two_runs_and_nobody_gets_a_stale_report() -> None:
    run = CountingRun()
    verifications = Verifications(run, slots=1)
    first = asyncio.create_task(verifications.verify(None))
    await asyncio.sleep(0.01)  # the first run is under way
    burst = await asyncio.gather(*(verifications.verify(None) for _ in range(31)))
    assert (await first).accounts_checked == 1
    # Those who asked during run 1 get run 2, which started after they asked.
    assert {report.accounts_checked for report in burst} == {2}
    assert run.runs == [None, None]


async def test_scopes_run_apart_within_the_slots_and_errors_reach_every_waiter() -> None:
    run = CountingRun()
    verifications = Verifications(run, slots=1)
    results = await asyncio.gather(
        *(verifications.verify(scope) for scope in ("a", "a", "b", None, "b")), return_exceptions=True
    )
    assert sorted(run.runs, key=str) == [None, "a", "b"] and run.most_concurrent == 1
    assert all(isinstance(result, AuditReport) for result in results)
    failures = await asyncio.gather(*(verifications.verify("missing") for _ in range(3)), return_exceptions=True)
    assert all(isinstance(failure, LookupError) for failure in failures)


async def test_a_request_that_gives_up_leaves_the_run_to_the_others() -> None:
    run = CountingRun(seconds=0.2)
    verifications = Verifications(run, slots=1)
    patient = asyncio.create_task(verifications.verify(None))
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await verifications.verify(None)
    assert (await patient).accounts_checked == 1 and run.runs == [None]
