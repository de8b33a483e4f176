"""Request ids, JSON logs without secrets, and Prometheus metrics, on a real server."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from tests import provision


async def test_request_ids_are_echoed_logged_and_generated(
    server: tuple[str, Path], database_url: str, uid: str
) -> None:
    """A sane X-Request-ID comes back and tags the request's log line; a missing or
    unsafe one is replaced by a generated id. Every log line is JSON, and the database
    password never appears in the log."""
    base_url, log_path = server
    async with httpx.AsyncClient(base_url=base_url, headers=provision.API_HEADERS, timeout=10) as client:
        given = await client.get(f"/v1/accounts/trace-{uid}", headers={"X-Request-ID": f"trace-{uid}"})
        assert given.headers["x-request-id"] == f"trace-{uid}"
        generated = await client.get("/health/live")
        assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["x-request-id"])
        unsafe = await client.get("/health/live", headers={"X-Request-ID": "a b\tc"})
        assert unsafe.headers["x-request-id"] != "a b\tc"

    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    assert any(line.get("request_id") == f"trace-{uid}" and line.get("status") == 404 for line in lines)
    password = urlsplit(database_url).password
    if password:
        assert password not in log_path.read_text()


async def test_metrics_count_requests_outcomes_and_show_the_pool(server_url: str, uid: str) -> None:
    async with httpx.AsyncClient(base_url=server_url, headers=provision.API_HEADERS, timeout=10) as client:
        await client.post(
            "/v1/accounts", json={"id": f"m-bank-{uid}", "currency": "EUR", "allow_negative_balance": True}
        )
        await client.post("/v1/accounts", json={"id": f"m-{uid}", "currency": "EUR"})
        body = {"id": f"m-t-{uid}", "debit_account_id": f"m-{uid}", "credit_account_id": f"m-bank-{uid}", "amount": 5}
        await client.post("/v1/transfers", json=body)
        metrics = await client.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert re.search(
        r'ledger_requests_total\{process="\d+",method="POST",route="/v1/transfers",status="422"\} \d+', text
    )
    assert re.search(r'ledger_transfer_outcomes_total\{process="\d+",code="insufficient_funds"\} \d+', text)
    assert re.search(
        r'ledger_request_duration_seconds_bucket\{process="\d+",method="POST",route="/v1/transfers",le="\+Inf"\} \d+',
        text,
    )
    for state in ("in_use", "idle", "overflow", "waiting"):
        assert re.search(rf'ledger_pool_connections\{{process="\d+",state="{state}"\}} \d+', text), state
