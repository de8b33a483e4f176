"""Correctness after a run, through the API only, so it works against any deployment:
the trial balance is zero per currency, the audit verification passes (hash chains,
gap-free journals, balances recomputed), every acknowledged transfer exists exactly once
with its amount, and no account that forbids it is negative."""

from __future__ import annotations

import asyncio

import msgspec

from loadtest.generator import Generator


async def check(generator: Generator, accounts: list[str], acknowledged: dict[str, int]) -> list[str]:
    problems: list[str] = []
    status, content, _ = await generator.call("GET", "/v1/balances")
    if status != 200:
        problems.append(f"trial balance: HTTP {status}")
    else:
        for line in msgspec.json.decode(content)["balances"]:
            if line["difference"] != 0:
                problems.append(f"trial balance in {line['currency']} is off by {line['difference']}")

    status, content, _ = await generator.call("POST", "/v1/audit/verify", {})
    report = msgspec.json.decode(content) if status == 200 else {}
    if status != 200 or not report.get("ok"):
        problems.append(
            f"audit verification: HTTP {status}, {report.get('problems_total')} problems {report.get('problems', [])[:5]}"
        )

    semaphore = asyncio.Semaphore(64)

    async def transfer(transfer_id: str, amount: int) -> None:
        async with semaphore:
            status, content, _ = await generator.call("GET", f"/v1/transfers/{transfer_id}")
        body = msgspec.json.decode(content) if status == 200 else {}
        if status != 200 or body.get("status") != "posted" or body.get("amount") != amount:
            problems.append(
                f"acknowledged transfer {transfer_id} reads as {status} {body.get('status')} {body.get('amount')}"
            )

    async def account(account_id: str) -> None:
        async with semaphore:
            status, content, _ = await generator.call("GET", f"/v1/accounts/{account_id}")
        body = msgspec.json.decode(content) if status == 200 else {}
        if status != 200 or (not body["allow_negative_balance"] and body["balance"]["available"] < 0):
            problems.append(f"account {account_id}: {status} {body.get('balance')}")

    await asyncio.gather(*(transfer(i, a) for i, a in acknowledged.items()), *(account(a) for a in accounts))
    return problems
