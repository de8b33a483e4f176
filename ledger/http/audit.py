"""Audit endpoints: journal verification, the trial balance and balances aggregated over
accounts (`/v1/balances/aggregate`, ledger.service.metadata)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Generic, TypeVar

from litestar import Controller, Request, Response, get, post
from litestar.datastructures import State
from litestar.params import JSONBody, QueryParameter
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.errors import InvalidRequest, Overloaded
from ledger.http.auth import AUDIT, READ
from ledger.http.metadata import metadata_filter
from ledger.http.problems import READ_PROBLEMS, documented
from ledger.http.routes import _optional_body, _timestamp
from ledger.http.schemas import (
    CURRENCY_RE,
    AggregateBalanceOut,
    AuditProblemOut,
    AuditReportOut,
    AuditVerify,
    CheckpointOut,
    CurrencyBalanceOut,
    TrialBalanceOut,
    format_timestamp,
)
from ledger.integrity import Keyring
from ledger.service import audit, checkpoints, metadata
from ledger.service.replica import ReadRouter, ReadTarget, Routed

T = TypeVar("T")

CurrencyFilter = Annotated[str | None, QueryParameter(description="Only this currency", pattern=r"^[A-Z]{3}$")]
AsOf = Annotated[str | None, QueryParameter(description="RFC 3339; default now", format="date-time")]
RequiredCurrency = Annotated[str, QueryParameter(description="The accounts' currency", pattern=r"^[A-Z]{3}$")]
PastAsOf = Annotated[
    str | None, QueryParameter(description="RFC 3339, not later than now; default now", format="date-time")
]


def report_out(report: audit.AuditReport) -> AuditReportOut:
    checkpoint = report.checkpoint
    return AuditReportOut(
        ok=report.ok,
        accounts_checked=report.accounts_checked,
        entries_checked=report.entries_checked,
        problems=[AuditProblemOut(p.account_id, p.sequence, p.code, p.detail, p.transfer_id) for p in report.problems],
        problems_total=report.problems_total,
        transfers_checked=report.transfers_checked,
        checkpoint=CheckpointOut(
            taken_at=format_timestamp(checkpoint.taken_at),
            key_id=checkpoint.key_id,
            accounts=len(checkpoint.heads),
            transfers=checkpoint.transfers,
        )
        if checkpoint is not None
        else None,
    )


class Verifications(Generic[T]):
    """Verifications requested at once share their runs.

    A request joins the next run for its scope (the whole ledger, or one account): the
    run that starts once the one in progress, if any, has finished, so its report always
    reflects the ledger as it was at or after the request. Every request that arrives
    meanwhile joins the same run. A burst of requests, however large, costs at most two
    runs per scope, one after the other; runs of different scopes take the process's
    verification slots (one by default, leaving the audit pool's other connection to
    exports, trial balances and checkpoints). A request that gives up (its time budget)
    leaves the run to the others.
    """

    def __init__(self, run: Callable[[str | None], Awaitable[T]], slots: int) -> None:
        self._run = run
        self._slots = asyncio.Semaphore(slots)
        self._next: dict[str | None, asyncio.Future[T]] = {}
        self._running: dict[str | None, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def verify(self, scope: str | None) -> T:
        future = self._next.get(scope)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._next[scope] = future
            task = asyncio.create_task(self._start(scope, future, self._running.get(scope)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(future)

    async def _start(self, scope: str | None, future: asyncio.Future[T], previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        # From here on, requests for this scope wait for the run after this one.
        del self._next[scope]
        self._running[scope] = asyncio.current_task()  # type: ignore[assignment]
        try:
            async with self._slots:
                report = await self._run(scope)
        except Exception as error:
            future.set_exception(error)
        else:
            future.set_result(report)
        finally:
            if self._running.get(scope) is asyncio.current_task():
                del self._running[scope]
            if not future.done():  # cancelled: the service is stopping
                future.cancel()
            # Nobody may be left to retrieve it (every request gave up): not an error.
            if future.done() and not future.cancelled():
                future.exception()


async def verify_with_checkpoint(
    engine: AsyncEngine, keyring: Keyring, directory: Path, account_id: str | None
) -> audit.AuditReport:
    """Verify against the newest checkpoint in `directory` (one that cannot be trusted is
    itself a problem, never silently skipped)."""
    try:
        checkpoint, error = checkpoints.latest(directory, keyring), None
    except checkpoints.CheckpointError as invalid:
        checkpoint, error = None, str(invalid)
    return await audit.verify(engine, keyring, account_id, checkpoint, checkpoint_error=error)


async def verify_routed(
    reads: ReadRouter, keyring: Keyring, directory: Path, account_id: str | None
) -> Routed[audit.AuditReport]:
    """Verification on the replica when it has caught up (ledger.service.replica). It only
    reads: checkpoints are written by the checkpointer, on the primary. A shared run starts
    after every request that joined it arrived, so its replay check covers their writes."""

    async def run(target: ReadTarget) -> audit.AuditReport:
        return await verify_with_checkpoint(target.engine, keyring, directory, account_id)

    return await reads.read(run)


class AuditController(Controller):
    tags = ["audit"]

    @post(
        "/v1/audit/verify",
        operation_id="verifyJournal",
        status_code=200,
        opt=AUDIT,
        responses=documented(*READ_PROBLEMS, 404, 413, 415),
    )
    async def verify(
        self, request: Request, state: State, data: JSONBody[AuditVerify | None] = None
    ) -> Response[AuditReportOut]:
        """Recompute every account's balance from its entries, check every entry's keyed hash
        chain, every transfer's seal against its journal entries, and the whole against the
        last checkpoint (or one account and its transfers). `ok` is false when any problem
        is found; `problems` lists up to 1000 of them, `problems_total` counts all. Runs on
        the audit pool, within LEDGER_AUDIT_TIMEOUT_SECONDS (`ledger audit verify` has no
        time limit)."""
        body = await _optional_body(request, AuditVerify) or AuditVerify()
        settings = state.settings
        try:
            async with asyncio.timeout(settings.audit_timeout_seconds):
                routed = await state.verifications.verify(body.account_id)
        except TimeoutError as error:
            raise Overloaded(
                f"verification did not finish within its {settings.audit_timeout_seconds} s budget, waiting included "
                "(LEDGER_AUDIT_TIMEOUT_SECONDS); run `ledger audit verify`, which has none"
            ) from error
        return Response(report_out(routed.value), headers=routed.headers)

    @get("/v1/balances", operation_id="getTrialBalance", opt=READ, responses=documented(*READ_PROBLEMS))
    async def balances(
        self, state: State, currency: CurrencyFilter = None, as_of: AsOf = None
    ) -> Response[TrialBalanceOut]:
        """A trial balance read from one consistent snapshot: per currency the sum of
        debits, of credits, and their difference, which is always 0."""
        if currency is not None and not CURRENCY_RE.fullmatch(currency):
            raise InvalidRequest(
                "`currency` must be three upper-case letters", [{"field": "currency", "message": "^[A-Z]{3}$"}]
            )
        moment = _timestamp("as_of", as_of)
        routed = await state.reads.read(lambda target: audit.trial_balance(target.engine, currency, moment))
        taken_at, totals = routed.value
        out = TrialBalanceOut(
            as_of=format_timestamp(taken_at),
            balances=[CurrencyBalanceOut(t.currency, t.debits, t.credits, t.difference) for t in totals],
        )
        return Response(out, headers=routed.headers)

    @get(
        "/v1/balances/aggregate",
        operation_id="getAggregateBalance",
        opt=READ,
        responses=documented(*READ_PROBLEMS),
    )
    async def aggregate_balance(
        self, request: Request, state: State, currency: RequiredCurrency, as_of: PastAsOf = None
    ) -> Response[AggregateBalanceOut]:
        """Balances summed over the accounts of one currency whose metadata holds every
        `metadata[KEY]=VALUE` pair (all accounts of the currency without any), now or as of
        an instant, from one consistent snapshot. Which accounts match is decided by their
        metadata now, also with `as_of`."""
        if not CURRENCY_RE.fullmatch(currency):
            raise InvalidRequest(
                "`currency` must be three upper-case letters", [{"field": "currency", "message": "^[A-Z]{3}$"}]
            )
        moment, pairs = _timestamp("as_of", as_of), metadata_filter(request)
        routed = await state.reads.read(
            lambda target: metadata.aggregate_balances(target.engine, currency, pairs, moment)
        )
        total = routed.value
        out = AggregateBalanceOut(
            currency=total.currency,
            accounts=total.accounts,
            posted=total.posted,
            pending_debits=total.pending_debits,
            pending_credits=total.pending_credits,
            available=total.available,
            as_of=format_timestamp(total.as_of),
        )
        return Response(out, headers=routed.headers)
