"""The bank scenario: many concurrent HTTP clients move money among a few accounts, in
both directions, retrying by transfer id as a real payment service would; then every
invariant is checked against the database and against what each client was told.

Used by the end-to-end test on the real server and, to prove the checks have teeth, on
servers whose locking has been deliberately broken.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests import provision

HOUSE_FUNDING = 10_000
MAX_ATTEMPTS = 200


@dataclass
class Answer:
    status: int
    body: dict
    replayed: bool


@dataclass
class ScenarioReport:
    accounts: list[str]
    negative_allowed: set[str]
    answers: dict[str, Answer] = field(default_factory=dict)
    requested: dict[str, dict] = field(default_factory=dict)
    retries: int = 0
    unanswered: list[str] = field(default_factory=list)
    deadlocks_before: int = 0
    deadlocks_after: int = 0


async def post_until_answered(
    client: httpx.AsyncClient, path: str, body: dict, report: ScenarioReport
) -> Answer | None:
    """POST, retrying on 503 and on transport errors with the same body: the ledger's
    idempotency makes that safe, and it is what the contract tells clients to do."""
    for attempt in range(MAX_ATTEMPTS):
        try:
            response = await client.post(path, json=body)
        except httpx.TransportError:
            report.retries += 1
            await asyncio.sleep(min(0.2, 0.01 * (attempt + 1)))
            continue
        if response.status_code == 503:
            assert "retry-after" in response.headers, "a 503 must carry Retry-After"
            report.retries += 1
            await asyncio.sleep(min(0.2, 0.01 * (attempt + 1)) * random.random())
            continue
        return Answer(response.status_code, response.json(), response.headers.get("idempotent-replayed") == "true")
    return None


async def post_retrying(client: httpx.AsyncClient, path: str, body: dict) -> httpx.Response:
    """POST, retried with the same body (the same id) on 503, as a payment service does: a
    503 means nothing was done (overloaded, a lock held too long). For tests that check
    the answers themselves; `post_until_answered` also counts retries and transport errors."""
    for _ in range(50):
        response = await client.post(path, json=body)
        if response.status_code != 503:
            return response
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path} stayed unavailable")


def batch_answer(result: dict) -> Answer:
    """A batch item's result as the answer a single request would have had."""
    transfer = result.get("transfer") or {}
    if result["status"] == "created" or (result["status"] == "replayed" and transfer.get("status") == "posted"):
        return Answer(201, transfer, result["status"] == "replayed")
    if transfer.get("status") == "rejected":
        return Answer(422, {"code": transfer["code"]}, result["status"] == "replayed")
    return Answer(409, result, False)


async def deadlock_count(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return int(
            (
                await connection.execute(
                    text("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
                )
            ).scalar_one()
        )


async def run_bank_scenario(
    base_url: str | Sequence[str],
    engine: AsyncEngine,
    *,
    prefix: str,
    clients: int = 64,
    transfers: int = 2048,
    customers: int = 4,
    max_amount: int = 2_500,
    seed: int = 7,
    batch_clients: int = 0,
    batch_size: int = 25,
) -> ScenarioReport:
    """Run the scenario. `batch_clients` of the clients post batches of `batch_size`
    (every third item linked to the next, so chains of two), the others single transfers.
    Given several base URLs (instances of the service on one database), the clients take
    them in turn."""
    rng = random.Random(seed)
    house = f"{prefix}-house"
    accounts = [house] + [f"{prefix}-customer-{i}" for i in range(customers)]
    report = ScenarioReport(accounts=accounts, negative_allowed={house})
    report.deadlocks_before = await deadlock_count(engine)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = provision.API_HEADERS
    urls = [base_url] if isinstance(base_url, str) else list(base_url)
    async with contextlib.AsyncExitStack() as stack:
        instances = [
            await stack.enter_async_context(httpx.AsyncClient(base_url=url, limits=limits, timeout=30, headers=headers))
            for url in urls
        ]
        client = instances[0]
        for account in accounts:
            body = {"id": account, "currency": "EUR", "allow_negative_balance": account == house}
            response = await client.post("/v1/accounts", json=body)
            assert response.status_code == 201, response.text
        # Money enters from the house account, which may go negative, as a bank's does.
        for index, customer in enumerate(accounts[1:]):
            transfer = {
                "id": f"{prefix}-fund-{index}",
                "debit_account_id": house,
                "credit_account_id": customer,
                "amount": HOUSE_FUNDING,
            }
            answer = await post_until_answered(client, "/v1/transfers", transfer, report)
            assert answer is not None and answer.status == 201, answer
            report.requested[transfer["id"]] = transfer
            report.answers[transfer["id"]] = answer

        queue: asyncio.Queue[dict] = asyncio.Queue()
        for number in range(transfers):
            debit, credit = rng.sample(accounts, 2)
            body = {
                "id": f"{prefix}-t{number}",
                "debit_account_id": debit,
                "credit_account_id": credit,
                "amount": rng.randint(1, max_amount),
            }
            report.requested[body["id"]] = body
            queue.put_nowait(body)

        async def single_worker(client: httpx.AsyncClient) -> None:
            while True:
                try:
                    body = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                answer = await post_until_answered(client, "/v1/transfers", body, report)
                if answer is None:
                    report.unanswered.append(body["id"])
                else:
                    report.answers[body["id"]] = answer

        async def batch_worker(client: httpx.AsyncClient) -> None:
            while not queue.empty():
                bodies = [queue.get_nowait() for _ in range(min(batch_size, queue.qsize()))]
                items = [
                    {**body, "linked": index % 3 == 0 and index + 1 < len(bodies)} for index, body in enumerate(bodies)
                ]
                answer = await post_until_answered(client, "/v1/transfers/batch", {"transfers": items}, report)
                if answer is None or answer.status != 200:
                    for body in bodies:
                        report.unanswered.append(body["id"])
                    continue
                for result in answer.body["results"]:
                    report.answers[result["id"]] = batch_answer(result)

        workers = [batch_worker(instances[n % len(instances)]) for n in range(batch_clients)] + [
            single_worker(instances[n % len(instances)]) for n in range(batch_clients, clients)
        ]
        await asyncio.gather(*workers)

    # Backends publish their statistics when idle, at most once a second.
    await asyncio.sleep(2.5)
    report.deadlocks_after = await deadlock_count(engine)
    return report


async def find_violations(report: ScenarioReport, engine: AsyncEngine) -> list[str]:
    """Every invariant of the ledger, checked against the database and the answers."""
    violations: list[str] = []
    if report.unanswered:
        violations.append(f"{len(report.unanswered)} transfers never got a final answer")
    for transfer_id, answer in report.answers.items():
        if answer.status >= 500:
            violations.append(f"{transfer_id}: server error {answer.status} {answer.body}")
        elif answer.status not in (201, 422):
            violations.append(f"{transfer_id}: unexpected status {answer.status} {answer.body}")
    if report.deadlocks_after != report.deadlocks_before:
        violations.append(f"pg_stat_database.deadlocks went from {report.deadlocks_before} to {report.deadlocks_after}")

    async with engine.connect() as connection:
        accounts = {
            row.id: row
            for row in await connection.execute(
                text(
                    "SELECT id, allow_negative_balance, credits_posted - debits_posted AS posted, entries_count "
                    "FROM accounts WHERE id = ANY(:ids)"
                ),
                {"ids": report.accounts},
            )
        }
        entries = (
            await connection.execute(
                text(
                    "SELECT account_id, sequence, transfer_id, amount, balance_after FROM entries "
                    "WHERE account_id = ANY(:ids) ORDER BY account_id, sequence"
                ),
                {"ids": report.accounts},
            )
        ).all()
        transfers = {
            row.id: row
            for row in await connection.execute(
                text("SELECT id, status, code, amount FROM transfers WHERE id = ANY(:ids)"),
                {"ids": list(report.requested)},
            )
        }

    total = sum(row.posted for row in accounts.values())
    if total != 0:
        violations.append(f"money not conserved: posted balances sum to {total}")
    for row in accounts.values():
        if not row.allow_negative_balance and row.posted < 0:
            violations.append(f"{row.id} is negative ({row.posted}) but does not allow it")

    by_account: dict[str, list] = {}
    entries_by_transfer: dict[str, list] = {}
    for entry in entries:
        by_account.setdefault(entry.account_id, []).append(entry)
        entries_by_transfer.setdefault(entry.transfer_id, []).append(entry)
    for account_id, row in accounts.items():
        lines = by_account.get(account_id, [])
        if [line.sequence for line in lines] != list(range(1, len(lines) + 1)):
            violations.append(f"{account_id}: sequences are not 1..{len(lines)} without gaps")
        if len(lines) != row.entries_count:
            violations.append(f"{account_id}: entries_count {row.entries_count} but {len(lines)} entries")
        running = 0
        for line in lines:
            running += line.amount
            if line.balance_after != running:
                violations.append(f"{account_id} #{line.sequence}: balance_after {line.balance_after} != {running}")
                break
        if running != row.posted:
            violations.append(f"{account_id}: journal sums to {running}, account says {row.posted}")

    for transfer_id, answer in report.answers.items():
        stored = transfers.get(transfer_id)
        lines = entries_by_transfer.get(transfer_id, [])
        amount = report.requested[transfer_id]["amount"]
        if answer.status == 201:
            if stored is None or stored.status != "posted":
                violations.append(f"{transfer_id}: acknowledged 201 but stored as {stored and stored.status}")
            if sorted(line.amount for line in lines) != [-amount, amount]:
                violations.append(f"{transfer_id}: acknowledged 201 but has entries {[line.amount for line in lines]}")
        elif answer.status == 422:
            if stored is None or stored.status != "rejected" or stored.code != answer.body.get("code"):
                violations.append(f"{transfer_id}: refused with {answer.body.get('code')} but stored as {stored}")
            if lines:
                violations.append(f"{transfer_id}: refused but moved money")
    for transfer_id in entries_by_transfer:
        answer = report.answers.get(transfer_id)
        if answer is None or answer.status != 201:
            violations.append(f"{transfer_id}: moved money without a 201 answer")
    return violations
