"""python -m loadtest SCENARIO [options]: drive the ledger, report, check correctness.

    .venv/bin/python -m loadtest uniform --self-serve --clients 16 --duration 20
    .venv/bin/python -m loadtest hot --base-url http://127.0.0.1:8000 --api-key $KEY --rate 500 --duration 30

Scenarios: uniform (transfers among --accounts accounts), hot (every transfer touches one
house account), zipf (account popularity follows Zipf 1.1), batch (100 transfers per
request), mixed (80% transfers, 20% auditor reads), replay (20% of requests retry an
earlier transfer id). --clients N runs a closed loop; --rate R an open loop at R
requests per second. The report (JSON, to stdout and --report FILE) has throughput,
latency percentiles, errors by status and code, and the CPU seconds of the generator
and, when their process ids are known (--self-serve, or --service-pid/--postgres-pid),
of the service and PostgreSQL, and per-second timelines of throughput and latency
(p50, p99). --plots DIR also writes PNG plots of the run. --sweep 1,2,4,8 runs the
scenario once per client count (closed loop, --duration each, on the same service) and
reports throughput, latency and CPU per count (with --plots, a PNG of the curve). The run
exits 1 when a correctness check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import secrets
import statistics
import sys
import time
from collections.abc import Coroutine
from contextlib import nullcontext
from pathlib import Path
from typing import Any, TypeVar

import psutil

from loadtest.baseline import baseline_database, create_accounts, pgbench
from loadtest.checks import check
from loadtest.generator import (
    SCENARIOS,
    Generator,
    Workload,
    generator_cpu_seconds,
    run_closed,
    run_open,
    setup_accounts,
)
from loadtest.local import local_service

T = TypeVar("T")


def cpu_seconds(pid: int | None) -> float | None:
    """CPU of a process and its descendants, including those already exited and reaped."""
    if pid is None:
        return None
    try:
        process = psutil.Process(pid)
        total = sum(process.cpu_times()[:4])
        for child in process.children(recursive=True):
            try:
                total += sum(child.cpu_times()[:2])
            except psutil.NoSuchProcess:
                pass
        return total
    except psutil.NoSuchProcess:
        return None


def run_fast(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run the generator on uvloop when it is installed (it comes with the service's
    uvicorn): the generator shares the machine with the service and PostgreSQL, and
    uvloop roughly halves the CPU its event loop and sockets cost."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    return round(sorted_values[min(int(len(sorted_values) * fraction), len(sorted_values) - 1)], 3)


GROUP_BUCKET = re.compile(r'^ledger_group_transfers_bucket\{[^}]*le="([^"]+)"\} (\d+)$', re.MULTILINE)
GROUP_SUM = re.compile(r"^ledger_group_transfers_sum\{[^}]*\} (\d+)$", re.MULTILINE)


async def group_counters(generator: Generator) -> dict[str, int] | None:
    """The service's group-commit histogram (cumulative buckets, summed over the processes
    that answer), or None when /metrics does not have it."""
    try:
        status, content, _ = await generator.call("GET", "/metrics")
    except Exception:  # a report without the histogram, not a failed run
        return None
    text = content.decode(errors="replace")
    if status != 200 or not GROUP_BUCKET.search(text):
        return None
    counters: dict[str, int] = {}
    for bound, count in GROUP_BUCKET.findall(text):
        counters[bound] = counters.get(bound, 0) + int(count)
    counters["sum"] = sum(int(value) for value in GROUP_SUM.findall(text))
    return counters


def group_report(before: dict[str, int] | None, after: dict[str, int] | None) -> dict | None:
    """Group transactions during the measured run: how many, their mean size, and how many
    had at most 1, 2, 4, ... transfers (a non-cumulative histogram)."""
    if before is None or after is None:
        return None
    transactions = after["+Inf"] - before["+Inf"]
    histogram: dict[str, int] = {}
    previous = 0
    for bound in after:
        if bound in ("+Inf", "sum"):
            continue
        cumulative = after[bound] - before.get(bound, 0)
        histogram[f"<={bound}"] = cumulative - previous
        previous = cumulative
    histogram["more"] = transactions - previous
    return {
        "transactions": transactions,
        "mean_transfers": round((after["sum"] - before["sum"]) / transactions, 2) if transactions else 0.0,
        "histogram": {bound: count for bound, count in histogram.items() if count},
    }


async def run(
    arguments: argparse.Namespace, base_url: str, api_key: str | None, service_pid: int | None, postgres_pid: int | None
) -> dict:
    run_id = f"lt{secrets.token_hex(3)}"
    connections = arguments.clients or arguments.max_outstanding
    async with Generator(base_url, api_key, connections) as generator:
        house, accounts = await setup_accounts(generator, run_id, arguments.accounts)
        workload = Workload(arguments.scenario, accounts, house, arguments.seed, run_id)
        warm = None
        if arguments.warmup > 0:
            # Run, unmeasured, while the service opens its pooled connections and prepares
            # its statements (pgbench likewise reports tps without its initial connection
            # time). What it acknowledges is still checked below.
            if arguments.rate:
                warm = await run_open(workload, generator, arguments.rate, arguments.warmup, arguments.max_outstanding)
            else:
                warm = await run_closed(workload, generator, arguments.clients, arguments.warmup)
        groups_before = await group_counters(generator)
        cpu_before = (generator_cpu_seconds(), cpu_seconds(service_pid), cpu_seconds(postgres_pid))
        started = time.perf_counter()
        if arguments.rate:
            stats = await run_open(workload, generator, arguments.rate, arguments.duration, arguments.max_outstanding)
        else:
            stats = await run_closed(workload, generator, arguments.clients, arguments.duration)
        elapsed = time.perf_counter() - started
        cpu_after = (generator_cpu_seconds(), cpu_seconds(service_pid), cpu_seconds(postgres_pid))
        groups_after = await group_counters(generator)
        acknowledged = {**(warm.transfers_acknowledged if warm else {}), **stats.transfers_acknowledged}
        problems = [] if arguments.skip_checks else await check(generator, [house, *accounts], acknowledged)

    latencies = sorted(stats.latencies_ms)

    def delta(index: int) -> float | None:
        before, after = cpu_before[index], cpu_after[index]
        return round(after - before, 2) if before is not None and after is not None else None

    def per_transfer_ms(index: int) -> float | None:
        seconds = delta(index)
        applied = len(stats.transfers_acknowledged)
        return round(seconds * 1000 / applied, 3) if seconds is not None and applied else None

    return {
        "scenario": arguments.scenario,
        "mode": f"open loop at {arguments.rate}/s" if arguments.rate else f"closed loop, {arguments.clients} clients",
        "duration_seconds": round(elapsed, 2),
        "warmup_seconds": arguments.warmup,
        "requests": stats.requests,
        "requests_per_second": round(stats.requests / elapsed, 1),
        "transfers_acknowledged": len(stats.transfers_acknowledged),
        "transfers_per_second": round(len(stats.transfers_acknowledged) / elapsed, 1),
        "replays_confirmed": stats.replays_confirmed,
        "latency_ms": {
            "p50": percentile(latencies, 0.50),
            "p95": percentile(latencies, 0.95),
            "p99": percentile(latencies, 0.99),
            "p99.9": percentile(latencies, 0.999),
            "max": round(latencies[-1], 3) if latencies else 0.0,
        },
        "statuses": {str(k): v for k, v in sorted(stats.statuses.items(), key=lambda item: str(item[0]))},
        "codes": dict(stats.codes),
        "cpu_seconds": {"generator": delta(0), "service": delta(1), "postgres": delta(2)},
        "cpu_ms_per_transfer": {
            "generator": per_transfer_ms(0),
            "service": per_transfer_ms(1),
            "postgres": per_transfer_ms(2),
        },
        "groups": group_report(groups_before, groups_after),
        "throughput_timeline": stats.timeline,
        "transfers_timeline": stats.transfers_timeline,
        "latency_timeline": stats.latency_timeline,
        "checks": {"ok": not problems, "problems": problems[:20], "skipped": arguments.skip_checks},
    }


def client_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of client counts: {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"client counts must be positive integers: {text!r}")
    return counts


def sweep(arguments: argparse.Namespace) -> dict:
    """One closed-loop run per client count, in order, against the same service (and the
    same embedded PostgreSQL with --self-serve); each step sets up accounts of its own and
    is checked on its own."""
    points: list[dict] = []
    context = local_service(arguments.workers) if arguments.self_serve else nullcontext(None)
    with context as service:
        base_url = service.base_url if service else arguments.base_url
        # A self-served service has an admin key of its own; --api-key is for others.
        api_key = service.api_key if service else arguments.api_key
        service_pid = service.service_pid if service else arguments.service_pid
        postgres_pid = service.postgres_pid if service else arguments.postgres_pid
        for clients in arguments.sweep:
            print(f"sweep: {clients} clients for {arguments.duration:g} s", file=sys.stderr)
            step = argparse.Namespace(**{**vars(arguments), "clients": clients, "rate": None})
            report = run_fast(run(step, base_url, api_key, service_pid, postgres_pid))
            points.append(
                {
                    "clients": clients,
                    "duration_seconds": report["duration_seconds"],
                    "transfers_acknowledged": report["transfers_acknowledged"],
                    "transfers_per_second": report["transfers_per_second"],
                    "requests_per_second": report["requests_per_second"],
                    "p50": report["latency_ms"]["p50"],
                    "p95": report["latency_ms"]["p95"],
                    "p99": report["latency_ms"]["p99"],
                    "max": report["latency_ms"]["max"],
                    "cpu_seconds": report["cpu_seconds"],
                    "statuses": report["statuses"],
                    "checks": report["checks"],
                }
            )
    problems = [f"{point['clients']} clients: {problem}" for point in points for problem in point["checks"]["problems"]]
    return {
        "scenario": arguments.scenario,
        "mode": f"closed-loop sweep over {','.join(map(str, arguments.sweep))} clients, {arguments.duration:g} s each",
        "sweep": points,
        "checks": {
            "ok": all(point["checks"]["ok"] for point in points),
            "problems": problems[:20],
            "skipped": arguments.skip_checks,
        },
    }


def emit(report: dict, arguments: argparse.Namespace) -> int:
    text = json.dumps(report, indent=2)
    print(text)
    if arguments.report:
        arguments.report.write_text(text)
    if not report["checks"]["ok"]:
        print("CORRECTNESS CHECKS FAILED: " + "; ".join(report["checks"]["problems"][:5]), file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument(
        "--api-key",
        help="an admin key of the service (every request needs a key, and the run opens a house account that may go "
        "negative, which only admin keys may); --self-serve uses the key of the service it starts",
    )
    parser.add_argument(
        "--self-serve", action="store_true", help="start an embedded PostgreSQL and a service for this run"
    )
    parser.add_argument("--workers", type=int, default=1, help="service worker processes with --self-serve")
    parser.add_argument("--clients", type=int, default=16, help="closed loop: concurrent clients")
    parser.add_argument("--rate", type=float, help="open loop: requests per second (overrides --clients)")
    parser.add_argument("--max-outstanding", type=int, default=512, help="open loop: requests in flight at most")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured")
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="seconds of load before measuring (connections, prepared statements)"
    )
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--service-pid", type=int)
    parser.add_argument("--postgres-pid", type=int)
    parser.add_argument("--report", type=Path, help="also write the JSON report here")
    parser.add_argument(
        "--baseline", action="store_true", help="first run pgbench with the service's own SQL on the same database"
    )
    parser.add_argument(
        "--database-url",
        help="the service's database as the tables' owner (it creates a database of its own), for --baseline "
        "without --self-serve",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="with --baseline: alternate pgbench and the service this many times"
    )
    parser.add_argument(
        "--versus-uniform",
        action="store_true",
        help="with --baseline: each round also runs the uniform scenario (the hot target is a ratio to it)",
    )
    parser.add_argument("--skip-checks", action="store_true", help="skip the correctness checks (not recommended)")
    parser.add_argument("--plots", type=Path, metavar="DIR", help="write PNG plots of the run (or the sweep) here")
    parser.add_argument(
        "--sweep",
        type=client_counts,
        metavar="N,N,...",
        help="closed loop once per client count (e.g. 1,2,4,8,16,32), --duration each, on the same service",
    )
    arguments = parser.parse_args(argv)
    if arguments.plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plots needs matplotlib: .venv/bin/pip install -e '.[loadtest]'")
    if arguments.sweep:
        if arguments.rate:
            parser.error("--sweep runs closed loops: leave out --rate")
        if arguments.baseline:
            parser.error("--baseline is for single runs, not --sweep")
        report = sweep(arguments)
        if arguments.plots:
            from loadtest.plots import plot_sweep

            report["plots"] = [str(plot_sweep(report["sweep"], arguments.plots, arguments.scenario))]
        return emit(report, arguments)
    if arguments.rate:
        arguments.clients = 0

    context = local_service(arguments.workers) if arguments.self_serve else nullcontext(None)
    with context as service:
        base_url = service.base_url if service else arguments.base_url
        # A self-served service has an admin key of its own; --api-key is for others.
        api_key = service.api_key if service else arguments.api_key
        service_pid = service.service_pid if service else arguments.service_pid
        postgres_pid = service.postgres_pid if service else arguments.postgres_pid
        database_url = service.database_url if service else arguments.database_url
        if not arguments.baseline:
            report = run_fast(run(arguments, base_url, api_key, service_pid, postgres_pid))
        else:
            if not database_url:
                parser.error("--baseline needs --self-serve or --database-url")
            kind = "hot" if arguments.scenario == "hot" else "uniform"
            clients = arguments.clients or 16
            baseline_url = asyncio.run(baseline_database(database_url))
            asyncio.run(create_accounts(baseline_url, arguments.accounts))
            # The machine's speed drifts within minutes: baseline and service alternate in
            # short rounds, and the ratios are the medians of the rounds' ratios.
            rounds: list[dict] = []
            for number in range(1, arguments.rounds + 1):
                entry: dict[str, Any] = {"round": number}
                entry["pgbench"] = round(
                    pgbench(baseline_url, kind, clients, arguments.duration, arguments.accounts), 1
                )
                if arguments.scenario == "batch":
                    # The set-based ceiling: 100 transfers per transaction decided in SQL.
                    entry["bulk_ceiling"] = round(
                        pgbench(baseline_url, "bulk", clients, arguments.duration, arguments.accounts, batch=100), 1
                    )
                report = run_fast(run(arguments, base_url, api_key, service_pid, postgres_pid))
                entry["service"] = report["transfers_per_second"]
                entry["ratio"] = round(entry["service"] / entry["pgbench"], 3)
                if "bulk_ceiling" in entry:
                    entry["ratio_to_bulk_ceiling"] = round(entry["service"] / entry["bulk_ceiling"], 3)
                if arguments.versus_uniform:
                    uniform = argparse.Namespace(**{**vars(arguments), "scenario": "uniform"})
                    other = run_fast(run(uniform, base_url, api_key, service_pid, postgres_pid))
                    entry["service_uniform"] = other["transfers_per_second"]
                    entry["ratio_to_uniform"] = round(entry["service"] / entry["service_uniform"], 3)
                    if not other["checks"]["ok"]:
                        report["checks"]["ok"] = False
                        report["checks"]["problems"] += [f"uniform: {p}" for p in other["checks"]["problems"]]
                entry["groups_mean_transfers"] = (report["groups"] or {}).get("mean_transfers")
                entry["cpu_ms_per_transfer"] = report["cpu_ms_per_transfer"]
                rounds.append(entry)
                print(f"round {number}: {json.dumps({k: v for k, v in entry.items() if 'cpu' not in k})}",
                      file=sys.stderr)  # fmt: skip
            baseline = {"pgbench": kind, "clients": clients, "rounds": rounds}
            for ratio in ("ratio", "ratio_to_bulk_ceiling", "ratio_to_uniform"):
                values = [entry[ratio] for entry in rounds if ratio in entry]
                if values:
                    baseline[f"median_{ratio}"] = round(statistics.median(values), 3)
            # The last round's baseline, under the names earlier reports used.
            baseline["transfers_per_second"] = rounds[-1]["pgbench"]
            baseline["ratio"] = baseline["median_ratio"]
            if "bulk_ceiling" in rounds[-1]:
                baseline["bulk_ceiling_transfers_per_second"] = rounds[-1]["bulk_ceiling"]
            report["baseline"] = baseline
    if arguments.plots:
        from loadtest.plots import plot_run

        report["plots"] = [str(path) for path in plot_run(report, arguments.plots)]
    return emit(report, arguments)


if __name__ == "__main__":
    raise SystemExit(main())
