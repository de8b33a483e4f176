"""python -m loadtest.aggregate: what `GET /v1/balances/aggregate` costs on 100,000 accounts.

    .venv/bin/python -m loadtest.aggregate --report loadtest/results/accounts/aggregate.json

Starts its own embedded PostgreSQL and service (loadtest.local, as `--self-serve` does),
lets the service migrate it, then loads the ledger directly with SQL as the tables' owner
(through the API it would take an hour): `--accounts` customer accounts tagged with
metadata (`tier`: one in ten `gold`; `segment`: one of 100), 90% of them holding 1 to 3
deposits from one bank account, spread over the last ten days, with their journal entries
(running balances) and account totals consistent with them, and a reservation on one
account in 50. Then ANALYZE, as autovacuum would.

Each round times every case through HTTP (the median of `--repeat` requests, one at a
time, keep-alive) and, right after or right before (the order alternates by round), the
same sums as one plain SQL statement on one asyncpg connection (the baseline: the
database's own work, the same access paths, no HTTP, no snapshot set-up); the machine's
speed drifts, so each round's ratio service / baseline is taken and the report gives the
median of those ratios and the medians of the absolute milliseconds. Every answer is also
checked against the baseline's sums (and the whole currency's posted sum against the
journal's conservation: 0). Cases: the whole currency, `tier=gold` (10%), `segment=s42`
(1%), each now and as of an instant five days ago.

The JSON report goes to stdout and `--report FILE`; the run exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from loadtest.local import local_service

ZERO_HASH = "decode(repeat('00', 32), 'hex')"


def population_sql(accounts: int) -> list[str]:
    """The ledger's rows, consistent with each other: every deposit has its transfer, its
    two entries in time and sequence order with running balances, and the accounts'
    totals are the sums of their entries (reservations: of their pending transfers)."""
    return [
        f"""
        INSERT INTO accounts (id, currency, allow_negative_balance, metadata, created_at, debits_posted,
                              credits_posted, pending_debits, pending_credits, entries_count)
        SELECT 'c' || g, 'EUR', false,
               jsonb_build_object('tier', CASE WHEN g % 10 = 0 THEN 'gold' WHEN g % 10 < 4 THEN 'silver'
                                               ELSE 'bronze' END,
                                  'segment', 's' || (g % 100), 'region', 'r' || (g % 7)),
               now() - interval '11 days', 0, 0, 0, 0, 0
        FROM generate_series(1, {accounts}) g
        """,
        """
        INSERT INTO accounts (id, currency, allow_negative_balance, metadata, created_at, debits_posted,
                              credits_posted, pending_debits, pending_credits, entries_count)
        VALUES ('bank', 'EUR', true, '{}', now() - interval '11 days', 0, 0, 0, 0, 0)
        """,
        # Deposit k (1..3) of account g, when g is not a multiple of 10 and k <= 1 + g % 3:
        # on day 3(k-1) of the ten, at a second of that day that depends on g.
        f"""
        INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, currency, status, pending, metadata,
                               request_hash, created_at, updated_at)
        SELECT 'd' || g || '-' || k, 'bank', 'c' || g, 100 + (g * 7 + k * 13) % 100000, 'EUR', 'posted', false,
               '{{}}', {ZERO_HASH}, at, at
        FROM generate_series(1, {accounts}) g, generate_series(1, 3) k,
             LATERAL (SELECT now() - interval '10 days' + (k - 1) * interval '3 days'
                             + (g % 86400) * interval '1 second' AS at) t
        WHERE g % 10 <> 0 AND k <= 1 + g % 3
        """,
        f"""
        INSERT INTO entries (account_id, sequence, transfer_id, amount, balance_after, created_at, hash, key_id)
        SELECT credit_account_id, row_number() OVER w, id, amount, sum(amount) OVER w, created_at, {ZERO_HASH}, ''
        FROM transfers WINDOW w AS (PARTITION BY credit_account_id ORDER BY created_at, id)
        """,
        f"""
        INSERT INTO entries (account_id, sequence, transfer_id, amount, balance_after, created_at, hash, key_id)
        SELECT 'bank', row_number() OVER w, id, -amount, -sum(amount) OVER w, created_at, {ZERO_HASH}, ''
        FROM transfers WHERE debit_account_id = 'bank' WINDOW w AS (ORDER BY created_at, id)
        """,
        # Reservations alive now, from one account in 50 to the bank.
        f"""
        INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, currency, status, pending, metadata,
                               request_hash, created_at, updated_at)
        SELECT 'h' || g, 'c' || g, 'bank', 50, 'EUR', 'pending', true, '{{}}', {ZERO_HASH},
               now() - interval '6 days', now() - interval '6 days'
        FROM generate_series(1, {accounts}) g WHERE g % 50 = 1
        """,
        """
        UPDATE accounts a SET credits_posted = s.credits, debits_posted = s.debits, entries_count = s.entries
        FROM (SELECT account_id, COALESCE(sum(amount) FILTER (WHERE amount > 0), 0) AS credits,
                     COALESCE(-sum(amount) FILTER (WHERE amount < 0), 0) AS debits, count(*) AS entries
              FROM entries GROUP BY account_id) s
        WHERE s.account_id = a.id
        """,
        """
        UPDATE accounts a SET pending_debits = s.held FROM
            (SELECT debit_account_id, sum(amount) AS held FROM transfers WHERE status = 'pending'
             GROUP BY debit_account_id) s
        WHERE s.debit_account_id = a.id
        """,
        """
        UPDATE accounts SET pending_credits = (SELECT sum(amount) FROM transfers WHERE status = 'pending')
        WHERE id = 'bank'
        """,
        "VACUUM ANALYZE accounts",
        "VACUUM ANALYZE transfers",
        "VACUUM ANALYZE entries",
    ]


# The baseline: the same sums as one plain statement of the same shape (same predicates,
# so the same index paths), written here apart from the service's SQL, without its
# snapshot transaction, clock read, custom planning and due-reservation netting.
BASELINE_NOW = """
    SELECT count(*) AS accounts, COALESCE(sum(credits_posted::numeric - debits_posted), 0) AS posted,
           COALESCE(sum(pending_debits::numeric), 0) AS pending_debits,
           COALESCE(sum(pending_credits::numeric), 0) AS pending_credits
    FROM accounts WHERE currency = 'EUR' {filter}
"""
BASELINE_AS_OF = """
    SELECT count(*) AS accounts, COALESCE(sum(last.balance_after::numeric), 0) AS posted,
           (SELECT COALESCE(sum(t.amount::numeric), 0) FROM transfers t
            WHERE t.pending AND t.created_at <= $1 AND (t.status = 'pending' OR t.updated_at > $1)
              AND (t.expires_at IS NULL OR t.expires_at > $1)
              AND t.debit_account_id IN (SELECT id FROM accounts WHERE currency = 'EUR' {filter})) AS pending_debits,
           (SELECT COALESCE(sum(t.amount::numeric), 0) FROM transfers t
            WHERE t.pending AND t.created_at <= $1 AND (t.status = 'pending' OR t.updated_at > $1)
              AND (t.expires_at IS NULL OR t.expires_at > $1)
              AND t.credit_account_id IN (SELECT id FROM accounts WHERE currency = 'EUR' {filter})) AS pending_credits
    FROM accounts a LEFT JOIN LATERAL (
        SELECT balance_after FROM entries e WHERE e.account_id = a.id AND e.created_at <= $1
        ORDER BY e.created_at DESC, e.sequence DESC LIMIT 1) last ON true
    WHERE a.currency = 'EUR' {filter}
"""
# With a filter, the reservations alive then per matching account, through the
# transfers' account indexes, as the service reads them (the planner, left to choose,
# scans every transfer: BASELINE_AS_OF's form, kept for the whole currency).
BASELINE_AS_OF_PER_ACCOUNT = """
    SELECT count(*) AS accounts, COALESCE(sum(last.balance_after::numeric), 0) AS posted,
           COALESCE(sum((SELECT sum(t.amount) FROM transfers t WHERE t.debit_account_id = a.id AND {alive})), 0)
               AS pending_debits,
           COALESCE(sum((SELECT sum(t.amount) FROM transfers t WHERE t.credit_account_id = a.id AND {alive})), 0)
               AS pending_credits
    FROM accounts a LEFT JOIN LATERAL (
        SELECT balance_after FROM entries e WHERE e.account_id = a.id AND e.created_at <= $1
        ORDER BY e.created_at DESC, e.sequence DESC LIMIT 1) last ON true
    WHERE a.currency = 'EUR' {filter}
"""
ALIVE = (
    "t.pending AND t.created_at <= $1 AND (t.status = 'pending' OR t.updated_at > $1) "
    "AND (t.expires_at IS NULL OR t.expires_at > $1)"
)
CASES = {
    "all": None,
    "tier=gold": {"tier": "gold"},
    "segment=s42": {"segment": "s42"},
}


def baseline_sql(metadata: dict[str, str] | None, as_of: bool) -> str:
    condition = ""
    if metadata:
        literal = json.dumps(metadata).replace("'", "''")
        condition = f"AND metadata @> '{literal}'::jsonb AND metadata <> '{{}}'::jsonb"
    if not as_of:
        return BASELINE_NOW.format(filter=condition)
    if metadata:
        return BASELINE_AS_OF_PER_ACCOUNT.format(filter=condition, alive=ALIVE)
    return BASELINE_AS_OF.format(filter=condition)


def timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def populate(database_url: str, accounts: int) -> dict[str, Any]:
    connection = await asyncpg.connect(database_url)
    try:
        started = time.monotonic()
        for statement in population_sql(accounts):
            await connection.execute(statement)
        seconds = time.monotonic() - started
        counts = await connection.fetchrow(
            "SELECT (SELECT count(*) FROM accounts) AS accounts, (SELECT count(*) FROM transfers) AS transfers, "
            "(SELECT count(*) FROM entries) AS entries, "
            "(SELECT count(*) FROM accounts WHERE entries_count > 0) AS accounts_with_entries"
        )
        return {**dict(counts), "load_seconds": round(seconds, 1)}
    finally:
        await connection.close()


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 2)


async def measure(arguments: argparse.Namespace, service: Any) -> dict[str, Any]:
    population = await populate(service.database_url, arguments.accounts)
    connection = await asyncpg.connect(service.database_url)
    as_of = datetime.now(UTC) - timedelta(days=5)
    problems: list[str] = []
    rounds: list[dict[str, dict[str, float]]] = []
    headers = {"Authorization": f"Bearer {service.api_key}"}
    try:
        async with httpx.AsyncClient(base_url=service.base_url, headers=headers, timeout=60) as http:
            cases = [(name, metadata, when) for name, metadata in CASES.items() for when in (None, as_of)]

            async def through_http(metadata: dict[str, str] | None, when: datetime | None) -> tuple[float, dict]:
                params: dict[str, str] = {"currency": "EUR"}
                params.update({f"metadata[{key}]": value for key, value in (metadata or {}).items()})
                if when is not None:
                    params["as_of"] = timestamp(when)
                samples, body = [], {}
                for _ in range(arguments.repeat):
                    started = time.perf_counter()
                    response = await http.get("/v1/balances/aggregate", params=params)
                    samples.append(time.perf_counter() - started)
                    if response.status_code != 200:
                        problems.append(f"HTTP {response.status_code}: {response.text[:200]}")
                    body = response.json()
                return statistics.median(samples), body

            async def through_sql(metadata: dict[str, str] | None, when: datetime | None) -> tuple[float, dict]:
                sql, samples, row = baseline_sql(metadata, when is not None), [], None
                arguments_sql = (when,) if when is not None else ()
                for _ in range(arguments.repeat):
                    started = time.perf_counter()
                    row = await connection.fetchrow(sql, *arguments_sql)
                    samples.append(time.perf_counter() - started)
                assert row is not None
                return statistics.median(samples), {key: int(value) for key, value in row.items()}

            # Warm both paths (caches, prepared statements, connections) before measuring.
            for _, metadata, when in cases:
                await through_http(metadata, when)
                await through_sql(metadata, when)
            for number in range(arguments.rounds):
                this_round: dict[str, dict[str, float]] = {}
                for name, metadata, when in cases:
                    label = f"{name}, {'as_of' if when else 'now'}"
                    if number % 2 == 0:
                        service_seconds, body = await through_http(metadata, when)
                        baseline_seconds, sums = await through_sql(metadata, when)
                    else:
                        baseline_seconds, sums = await through_sql(metadata, when)
                        service_seconds, body = await through_http(metadata, when)
                    for field in ("accounts", "posted", "pending_debits", "pending_credits"):
                        if body.get(field) != sums[field]:
                            problems.append(f"{label}: {field} {body.get(field)} != baseline {sums[field]}")
                    if body.get("available") != sums["posted"] - sums["pending_debits"]:
                        problems.append(f"{label}: available {body.get('available')} is not posted - pending_debits")
                    this_round[label] = {
                        "service_ms": round(service_seconds * 1000, 2),
                        "baseline_ms": round(baseline_seconds * 1000, 2),
                        "ratio": round(service_seconds / baseline_seconds, 3),
                        "accounts": sums["accounts"],
                    }
                rounds.append(this_round)
                print(f"round {number + 1}/{arguments.rounds}: " + ", ".join(
                    f"{label} {values['service_ms']} ms (x{values['ratio']})" for label, values in this_round.items()
                ), file=sys.stderr)  # fmt: skip
            # Conservation, read through the service: the whole currency sums to zero.
            whole = (await http.get("/v1/balances/aggregate", params={"currency": "EUR"})).json()
            if whole.get("posted") != 0:
                problems.append(f"the whole currency's posted sum is {whole.get('posted')}, not 0")
    finally:
        await connection.close()
    labels = list(rounds[0]) if rounds else []
    summary = {
        label: {
            "accounts": rounds[0][label]["accounts"],
            "service_ms_median": round(statistics.median(r[label]["service_ms"] for r in rounds), 2),
            "baseline_ms_median": round(statistics.median(r[label]["baseline_ms"] for r in rounds), 2),
            "ratio_median": round(statistics.median(r[label]["ratio"] for r in rounds), 3),
            "ratio_min": min(r[label]["ratio"] for r in rounds),
            "ratio_max": max(r[label]["ratio"] for r in rounds),
        }
        for label in labels
    }
    return {
        "benchmark": "GET /v1/balances/aggregate vs the same sums in one SQL statement (asyncpg)",
        "population": population,
        "as_of": timestamp(as_of),
        "rounds": arguments.rounds,
        "repeat": arguments.repeat,
        "summary": summary,
        "per_round": rounds,
        "checks": {"ok": not problems, "problems": problems[:20]},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.aggregate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=7, help="rounds of every case, service and baseline")
    parser.add_argument("--repeat", type=int, default=5, help="requests per case and round (the median is kept)")
    parser.add_argument("--report", type=Path, help="also write the JSON report here")
    arguments = parser.parse_args(argv)
    # No checkpoints: the loaded rows carry no seals, and a checkpoint's verification would
    # run (and complain) in the middle of the measurement.
    with local_service(1, LEDGER_CHECKPOINT_INTERVAL_SECONDS="0") as service:
        report = asyncio.run(measure(arguments, service))
    text = json.dumps(report, indent=2)
    print(text)
    if arguments.report is not None:
        arguments.report.parent.mkdir(parents=True, exist_ok=True)
        arguments.report.write_text(text + "\n")
    return 0 if report["checks"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
