"""Audit endpoints: journal verification and the trial balance."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, Request, get, post
from litestar.datastructures import State
from litestar.params import JSONBody, QueryParameter

from ledger.errors import InvalidRequest
from ledger.http.auth import AUDIT, READ
from ledger.http.problems import READ_PROBLEMS, documented
from ledger.http.routes import _optional_body, _timestamp
from ledger.http.schemas import (
    CURRENCY_RE,
    AuditProblemOut,
    AuditReportOut,
    AuditVerify,
    CurrencyBalanceOut,
    TrialBalanceOut,
    format_timestamp,
)
from ledger.service import audit

CurrencyFilter = Annotated[str | None, QueryParameter(description="Only this currency", pattern=r"^[A-Z]{3}$")]
AsOf = Annotated[str | None, QueryParameter(description="RFC 3339; default now", format="date-time")]


def report_out(report: audit.AuditReport) -> AuditReportOut:
    return AuditReportOut(
        ok=report.ok,
        accounts_checked=report.accounts_checked,
        entries_checked=report.entries_checked,
        problems=[AuditProblemOut(p.account_id, p.sequence, p.code, p.detail) for p in report.problems],
        problems_total=report.problems_total,
    )


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
        """Recompute every account's balance from its entries and check every entry's hash
        chain (or one account's). `ok` is false when any problem is found; `problems` lists
        up to 1000 of them, `problems_total` counts all."""
        body = await _optional_body(request, AuditVerify) or AuditVerify()
        return report_out(await audit.verify(state.engine, body.account_id))

    @get("/v1/balances", operation_id="getTrialBalance", guards=[READ], responses=documented(*READ_PROBLEMS))
    async def balances(self, state: State, currency: CurrencyFilter = None, as_of: AsOf = None) -> TrialBalanceOut:
        """A trial balance read from one consistent snapshot: per currency the sum of
        debits, of credits, and their difference, which is always 0."""
        if currency is not None and not CURRENCY_RE.fullmatch(currency):
            raise InvalidRequest(
                "`currency` must be three upper-case letters", [{"field": "currency", "message": "^[A-Z]{3}$"}]
            )
        moment, totals = await audit.trial_balance(state.engine, currency, _timestamp("as_of", as_of))
        return TrialBalanceOut(
            as_of=format_timestamp(moment),
            balances=[CurrencyBalanceOut(t.currency, t.debits, t.credits, t.difference) for t in totals],
        )
