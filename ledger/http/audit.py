"""Audit endpoints: journal verification and the trial balance."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

from litestar import Controller, Request, get, post
from litestar.datastructures import State
from litestar.params import JSONBody, QueryParameter
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.errors import InvalidRequest, Overloaded
from ledger.http.auth import AUDIT, READ
from ledger.http.problems import READ_PROBLEMS, documented
from ledger.http.routes import _optional_body, _timestamp
from ledger.http.schemas import (
    CURRENCY_RE,
    AuditProblemOut,
    AuditReportOut,
    AuditVerify,
    CheckpointOut,
    CurrencyBalanceOut,
    TrialBalanceOut,
    format_timestamp,
)
from ledger.integrity import Keyring
from ledger.service import audit, checkpoints

CurrencyFilter = Annotated[str | None, QueryParameter(description="Only this currency", pattern=r"^[A-Z]{3}$")]
AsOf = Annotated[str | None, QueryParameter(description="RFC 3339; default now", format="date-time")]


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


class AuditController(Controller):
    tags = ["audit"]

    @post(
        "/v1/audit/verify",
        operation_id="verifyJournal",
        status_code=200,
        guards=[AUDIT],
        responses=documented(*READ_PROBLEMS, 404, 413, 415),
    )
    async def verify(self, request: Request, state: State, data: JSONBody[AuditVerify | None] = None) -> AuditReportOut:
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
                report = await verify_with_checkpoint(
                    state.audit_engine, state.chain, settings.checkpoints, body.account_id
                )
        except TimeoutError as error:
            raise Overloaded(
                f"verification ran past its {settings.audit_timeout_seconds} s budget "
                "(LEDGER_AUDIT_TIMEOUT_SECONDS); run `ledger audit verify`, which has none"
            ) from error
        return report_out(report)

    @get("/v1/balances", operation_id="getTrialBalance", guards=[READ], responses=documented(*READ_PROBLEMS))
    async def balances(self, state: State, currency: CurrencyFilter = None, as_of: AsOf = None) -> TrialBalanceOut:
        """A trial balance read from one consistent snapshot: per currency the sum of
        debits, of credits, and their difference, which is always 0."""
        if currency is not None and not CURRENCY_RE.fullmatch(currency):
            raise InvalidRequest(
                "`currency` must be three upper-case letters", [{"field": "currency", "message": "^[A-Z]{3}$"}]
            )
        moment, totals = await audit.trial_balance(state.audit_engine, currency, _timestamp("as_of", as_of))
        return TrialBalanceOut(
            as_of=format_timestamp(moment),
            balances=[CurrencyBalanceOut(t.currency, t.debits, t.credits, t.difference) for t in totals],
        )
