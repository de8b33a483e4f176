"""Small helpers for tests that talk to the app over HTTP."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from ledger import domain

PROBLEM = "application/problem+json"


async def open_account(client: Any, account_id: str, currency: str = "EUR", negative: bool = False) -> dict:
    response = await client.post(
        "/v1/accounts", json={"id": account_id, "currency": currency, "allow_negative_balance": negative}
    )
    assert response.status_code == 201, response.text
    return response.json()


async def transfer(client: Any, transfer_id: str, debit: str, credit: str, amount: int, **fields: Any) -> Any:
    body = {"id": transfer_id, "debit_account_id": debit, "credit_account_id": credit, "amount": amount, **fields}
    return await client.post("/v1/transfers", json=body)


def assert_problem(response: Any, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM), response.headers
    body = response.json()
    assert body["code"] == code and body["status"] == status, body
    assert {"type", "title", "status", "detail", "code"} <= set(body)
    return body


def lenient_decision(monkeypatch: pytest.MonkeyPatch, debit_suffix: str = "") -> None:
    """Simulate a wrong Python decision: for transfers whose debit account id ends with
    `debit_suffix`, it believes the accounts may go negative; the stored rows (which
    PostgreSQL's CHECK reads) do not change."""
    decide = domain.decide_transfer

    def lenient(request, accounts, now, key):  # type: ignore[no-untyped-def]
        if not request.debit_account_id.endswith(debit_suffix):
            return decide(request, accounts, now, key)
        believed = {k: dataclasses.replace(a, allow_negative_balance=True) for k, a in accounts.items()}
        plan = decide(request, believed, now, key)
        return dataclasses.replace(
            plan,
            accounts=tuple(
                dataclasses.replace(a, allow_negative_balance=accounts[a.id].allow_negative_balance)
                for a in plan.accounts
            ),
        )

    monkeypatch.setattr(domain, "decide_transfer", lenient)
