"""The same scenarios for people who already use Locust.

    .venv/bin/pip install locust
    LEDGER_SCENARIO=hot LEDGER_API_KEY=... .venv/bin/locust -f loadtest/locustfile.py \\
        --host http://127.0.0.1:8000 --headless --users 16 --spawn-rate 16 --run-time 30s

`LEDGER_API_KEY` is an admin key of the service: every request needs a key, and the run
opens a house account that may go negative, which only admin keys may (every request
also says `Content-Type: application/json`, which POSTs must).
`LEDGER_SCENARIO` is one of uniform, hot, zipf, batch, mixed, replay (default uniform);
`LEDGER_ACCOUNTS` sets how many funded accounts the run creates (default 1000). Refusals
(422, e.g. insufficient_funds) are outcomes of a ledger, not failures; 5xx and
unexpected statuses are failures. `python -m loadtest` remains the reference: it adds
open-loop timing, same-run baselines and the correctness checks after the run.
"""

from __future__ import annotations

import os
import re
import secrets

import requests
from locust import FastHttpUser, constant, events, task

from loadtest.generator import FUNDING, Workload

SCENARIO = os.environ.get("LEDGER_SCENARIO", "uniform")
ACCOUNTS = int(os.environ.get("LEDGER_ACCOUNTS", "1000"))
HEADERS = {"Content-Type": "application/json"}
if os.environ.get("LEDGER_API_KEY"):
    HEADERS["Authorization"] = f"Bearer {os.environ['LEDGER_API_KEY']}"

RUN: dict[str, object] = {}


@events.test_start.add_listener
def create_accounts(environment, **_: object) -> None:  # type: ignore[no-untyped-def]
    """One house account and ACCOUNTS funded accounts, once per test run."""
    run_id = f"lc{secrets.token_hex(3)}"
    host = environment.host.rstrip("/")
    house = f"{run_id}-house"
    accounts = [f"{run_id}-a{i}" for i in range(ACCOUNTS)]
    with requests.Session() as session:
        session.headers.update(HEADERS)
        session.post(
            f"{host}/v1/accounts", json={"id": house, "currency": "EUR", "allow_negative_balance": True}
        ).raise_for_status()
        for start in range(0, len(accounts), 500):
            chunk = accounts[start : start + 500]
            for account in chunk:
                session.post(f"{host}/v1/accounts", json={"id": account, "currency": "EUR"}).raise_for_status()
            funding = [
                {"id": f"{a}-funding", "debit_account_id": house, "credit_account_id": a, "amount": FUNDING}
                for a in chunk
            ]
            session.post(f"{host}/v1/transfers/batch", json={"transfers": funding}).raise_for_status()
    RUN.update(run_id=run_id, house=house, accounts=accounts)


def route(path: str) -> str:
    """Stats by route template, not by account: /v1/accounts/{id}/entries."""
    return re.sub(r"^/v1/accounts/[^/?]+", "/v1/accounts/{id}", path.split("?")[0])


class LedgerUser(FastHttpUser):
    wait_time = constant(0)  # closed loop: the next request as soon as the last one answered

    def on_start(self) -> None:
        # Each user has its own id space, so that ids never collide across users.
        self.workload = Workload(
            SCENARIO, RUN["accounts"], RUN["house"], secrets.randbits(32), f"{RUN['run_id']}-{secrets.token_hex(3)}"
        )  # type: ignore[arg-type]

    @task
    def next_request(self) -> None:
        method, path, body, _ = self.workload.next_request()
        with self.client.request(
            method, path, json=body, headers=HEADERS, name=route(path), catch_response=True
        ) as response:
            if response.status_code in (200, 201, 422):
                response.success()
            else:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
