"""Does a long CSV statement stream in constant memory?

Starts its own embedded PostgreSQL and `ledger serve`, writes N journal entries on one
account (in batches of 1000), then downloads the account's CSV statement while sampling
the server's resident memory every 20 ms. Reports, as JSON: the entries and bytes
streamed, the server's RSS before and at its peak during the stream, and the growth,
next to the same figures for reading one JSON page of 1000 entries (the reference).

    .venv/bin/python -m loadtest.statement_memory --entries 100000

Memory is measured, never asserted in the test suite; this exits 1 only if the stream
is incomplete.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx
import psutil

from loadtest.local import local_service


async def sample_peak(process: psutil.Process, stop: asyncio.Event) -> int:
    peak = process.memory_info().rss
    while not stop.is_set():
        peak = max(peak, process.memory_info().rss)
        await asyncio.sleep(0.02)
    return peak


async def measure(base_url: str, api_key: str, server: psutil.Process, entries: int) -> dict:
    account = "statement-account"
    # An admin key: the bank account may go negative. httpx sends `json=` bodies as
    # application/json, which every POST must be.
    headers = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=120) as client:
        bank = {"id": "statement-bank", "currency": "EUR", "allow_negative_balance": True}
        (await client.post("/v1/accounts", json=bank)).raise_for_status()
        (await client.post("/v1/accounts", json={"id": account, "currency": "EUR"})).raise_for_status()
        started = time.perf_counter()
        for batch in range(0, entries, 1000):
            items = [
                {"id": f"s-{n}", "debit_account_id": "statement-bank", "credit_account_id": account, "amount": 1}
                for n in range(batch, min(batch + 1000, entries))
            ]
            response = await client.post("/v1/transfers/batch", json={"transfers": items})
            response.raise_for_status()
        write_seconds = time.perf_counter() - started

        async def read(kind: str) -> tuple[int, int, int, int]:
            before = server.memory_info().rss
            stop = asyncio.Event()
            sampler = asyncio.create_task(sample_peak(server, stop))
            size = lines = 0
            if kind == "csv":
                async with client.stream(
                    "GET", f"/v1/accounts/{account}/entries", headers={"Accept": "text/csv"}
                ) as stream:
                    stream.raise_for_status()
                    async for chunk in stream.aiter_bytes():
                        size += len(chunk)
                        lines += chunk.count(b"\n")
            else:
                response = await client.get(f"/v1/accounts/{account}/entries", params={"limit": 1000})
                response.raise_for_status()
                size, lines = len(response.content), len(response.json()["data"])
            stop.set()
            return before, await sampler, size, lines

        page_before, page_peak, page_bytes, _ = await read("page")
        csv_before, csv_peak, csv_bytes, csv_lines = await read("csv")
    return {
        "entries": entries,
        "write_seconds": round(write_seconds, 2),
        "csv_rows": csv_lines - 1,
        "csv_bytes": csv_bytes,
        "csv_rss_before_mb": round(csv_before / 2**20, 1),
        "csv_rss_peak_mb": round(csv_peak / 2**20, 1),
        "csv_rss_growth_mb": round((csv_peak - csv_before) / 2**20, 1),
        "page_1000_bytes": page_bytes,
        "page_1000_rss_growth_mb": round((page_peak - page_before) / 2**20, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=100_000)
    arguments = parser.parse_args()
    with local_service() as service:
        report = asyncio.run(
            measure(service.base_url, service.api_key, psutil.Process(service.service_pid), arguments.entries)
        )
    print(json.dumps(report, indent=2))
    return 0 if report["csv_rows"] == arguments.entries else 1


if __name__ == "__main__":
    raise SystemExit(main())
