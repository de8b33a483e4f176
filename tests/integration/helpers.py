"""Small helpers for tests that talk to the app over HTTP."""

from __future__ import annotations

from typing import Any

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
