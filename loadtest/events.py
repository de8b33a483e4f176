"""python -m loadtest.events {outbox-cost,latency,webhooks}: what the event feed costs and how
fast it carries a change to its readers.

    .venv/bin/python -m loadtest.events outbox-cost --before /tmp/before --scenario uniform --pairs 4 \\
        --report loadtest/results/events/outbox-uniform.json
    .venv/bin/python -m loadtest.events latency --rounds 3 --duration 10 --report loadtest/results/events/latency.json
    .venv/bin/python -m loadtest.events webhooks --transfers 20000 --report loadtest/results/events/webhooks.json

Every write inserts its events into `event_outbox` in its own statement, a sequencer in
each service process moves them into the gap-free feed (`GET /v1/events`), and the
webhook loop turns the feed into signed POSTs (ledger.service.events, .webhooks). Three
questions, one subcommand each:

- `outbox-cost`: what the outbox costs the write path. `python -m loadtest SCENARIO
  --self-serve --baseline` (the service's throughput over pgbench running the service's
  own SQL, same run, same database) is run alternately from a checkout of the code
  before the feed (`--before DIR`, e.g. `git worktree add /tmp/before 88c1ce3`) and from
  this one: `python -m` puts the working directory first on sys.path and `--self-serve`
  starts `python -m ledger serve` from it, so each run serves its own tree's code, which
  is checked first (the old tree must answer 404 on /v1/events, this one 200). The
  machine's speed drifts by 2x within minutes: both sides are normalised by their own
  pgbench and alternate in short rounds (before, after, before, ...); the figure is the
  median of the per-pair ratios after / before.
- `latency`: from commit to consumer. A closed loop of transfers (loadtest.generator's
  uniform scenario) while consumers, each in a process of its own, follow the feed from
  its head with long-polls (`wait`). For every transfer answered 201: the consumer's
  receipt of its `transfer.posted` event minus the writer's receipt of the 201 (may be
  negative: the event can overtake the answer), and minus the event's `created_at` (the
  database's clock when the change was decided; same machine, same clock). Rounds with and
  without consumers alternate, so the report also has what a consumer costs the writers.
  Every round with consumers checks that each saw every acknowledged transfer and saw
  the feed's positions without a gap or a repeat.
- `webhooks`: delivery throughput. A receiver on 127.0.0.1 (a minimal HTTP/1.1 server
  in a process of its own, answering 200) checks every delivery's `Ledger-Signature` with
  `ledger.client.webhooks.verify_signature`; one subscription to it; then `--transfers`
  transfers posted in batches as fast as the service takes them (or at `--rate`). The
  report has deliveries/s from the first delivery received to the last, the lag from
  each event's `created_at` to its receipt, that every transfer's event arrived with a
  valid signature, the duplicates, and the service's and PostgreSQL's CPU per delivery.

Each run starts its own embedded PostgreSQL and service as `--self-serve` does
(loadtest.local), and writes its JSON report to stdout and `--report FILE`. The run
exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import multiprocessing.connection
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import psutil

from loadtest.__main__ import cpu_seconds, percentile, run_fast
from loadtest.checks import check
from loadtest.generator import Generator, Stats, Workload, run_closed, setup_accounts
from loadtest.local import local_service

REPOSITORY = Path(__file__).resolve().parent.parent
PAGE = 1000  # /v1/events' largest page


def spread(values: list[float]) -> dict[str, float | int]:
    """p50/p90/p99/max (and min, mean) of `values` in milliseconds, from seconds."""
    ordered = sorted(value * 1000 for value in values)
    if not ordered:
        return {"count": 0}
    return {
        "count": len(ordered),
        "min": round(ordered[0], 2),
        "p50": percentile(ordered, 0.50),
        "p90": percentile(ordered, 0.90),
        "p99": percentile(ordered, 0.99),
        "max": round(ordered[-1], 2),
        "mean": round(statistics.fmean(ordered), 2),
    }


def epoch(timestamp: str) -> float:
    """An API timestamp (`2026-11-24T21:59:03.123456Z`) as Unix seconds."""
    return datetime.fromisoformat(timestamp).timestamp()


def position(event_id: str) -> int:
    return int(event_id.removeprefix("evt_"))


# -- the machine: is anything else running? ---------------------------------------------


def busy_seconds() -> tuple[float, float]:
    """CPU seconds the whole machine has been busy (all cores), and stolen by the host."""
    times = psutil.cpu_times()
    busy = times.user + times.nice + times.system + getattr(times, "irq", 0.0) + getattr(times, "softirq", 0.0)
    return busy, getattr(times, "steal", 0.0)


class CpuWatch:
    """The machine's busy CPU during a measurement, split into ours and the rest.

    Ours: this process and its descendants (service, consumers, receiver, a `python -m
    loadtest` run) and every embedded PostgreSQL of a load test (a daemon, not a child:
    found by its data directory, `ledger-loadtest-*`), sampled once a second from /proc
    (what a PostgreSQL does in the second before it stops is missed). `foreign` is the
    rest: another program on the machine (a test suite, another benchmark) taking the
    cores that the figures assume are ours."""

    TICKS = os.sysconf("SC_CLK_TCK")

    def __init__(self) -> None:
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._postmaster: dict[int, bool] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _is_ours_postmaster(self, pid: int) -> bool:
        if pid not in self._postmaster:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                return False
            self._postmaster[pid] = b"ledger-loadtest-" in cmdline
        return self._postmaster[pid]

    def _sample(self, initial: bool = False) -> None:
        """One pass over /proc (psutil's per-process calls cost about 25 ms a pass here,
        taken from the generator's event loop). Per root (this process, each load test's
        PostgreSQL): its own CPU and that of its children it has reaped (cutime, cstime:
        PostgreSQL's ended backends, a finished `python -m loadtest` with its service and
        pgbench), plus the CPU of its descendants still running; the largest value seen
        (a child that ended but is not reaped yet is in neither)."""
        table: dict[int, tuple[int, bytes, float, float]] = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                data = Path(f"/proc/{name}/stat").read_bytes()
            except OSError:
                continue
            close = data.rindex(b")")
            fields = data[close + 2 :].split()
            table[int(name)] = (
                int(fields[1]),
                data[data.index(b"(") + 1 : close],
                (int(fields[11]) + int(fields[12])) / self.TICKS,
                (int(fields[13]) + int(fields[14])) / self.TICKS,
            )
        children: dict[int, list[int]] = {}
        for pid, (parent, *_) in table.items():
            children.setdefault(parent, []).append(pid)
        roots = [os.getpid()] + [
            pid for pid, (parent, comm, *_) in table.items()
            if comm == b"postgres" and table.get(parent, (0, b""))[1] != b"postgres" and self._is_ours_postmaster(pid)
        ]  # fmt: skip
        for root in roots:
            if root not in table:
                continue
            total = table[root][2] + table[root][3]
            stack = list(children.get(root, []))
            while stack:
                pid = stack.pop()
                total += table[pid][2]
                stack += children.get(pid, [])
            if root not in self._first:
                self._first[root] = total if initial else 0.0
            self._last[root] = max(total, self._last.get(root, 0.0))

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self._sample()

    def __enter__(self) -> CpuWatch:
        self._busy, self._steal = busy_seconds()
        self._started = time.monotonic()
        self._sample(initial=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._sample()
        self._stop.set()
        self._thread.join()
        busy, steal = busy_seconds()
        ours = sum(self._last[pid] - self._first[pid] for pid in self._last)
        self.report = {
            "elapsed_seconds": round(time.monotonic() - self._started, 1),
            "busy_cpu_seconds": round(busy - self._busy, 1),
            "ours_cpu_seconds": round(ours, 1),
            "foreign_cpu_seconds": round(busy - self._busy - ours, 1),
            "steal_seconds": round(steal - self._steal, 1),
        }


def wait_quiet(threshold: float, timeout: float) -> dict[str, float]:
    """Wait until the machine is nearly idle (less than `threshold` of a core busy over 2 s)
    or `timeout` seconds have passed: a measurement started while something else runs
    measures that too."""
    started = time.monotonic()
    while True:
        busy, _ = busy_seconds()
        time.sleep(2.0)
        load = (busy_seconds()[0] - busy) / 2.0
        waited = time.monotonic() - started
        if load < threshold or waited >= timeout:
            if load >= threshold:
                print(f"the machine is still busy ({load:.2f} cores) after {waited:.0f} s: measuring anyway",
                      file=sys.stderr)  # fmt: skip
            return {"busy_cores_before": round(load, 2), "waited_seconds": round(waited, 1)}
        print(f"the machine is busy ({load:.2f} cores in use): waiting", file=sys.stderr)
        time.sleep(10.0)


# -- outbox-cost ---------------------------------------------------------------------------

# Run with `python -c` from a tree: which `ledger` and `loadtest` that tree's processes import,
# and what its self-served service answers on the feed's route (404 before the feed).
PROBE = """
import json, os, urllib.error, urllib.request
import psutil, ledger, loadtest.local
from loadtest.local import local_service
with local_service() as service:
    request = urllib.request.Request(service.base_url + "/v1/events?limit=1",
                                     headers={"Authorization": "Bearer " + service.api_key})
    try:
        with urllib.request.urlopen(request) as answer:
            status = answer.status
    except urllib.error.HTTPError as error:
        status = error.code
    print(json.dumps({"cwd": os.getcwd(), "ledger": ledger.__file__, "loadtest": loadtest.local.__file__,
                      "service_cwd": psutil.Process(service.service_pid).cwd(), "events_status": status}))
"""


def probe(directory: Path) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=directory, capture_output=True, text=True, timeout=180, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def git_state(directory: Path) -> dict[str, Any]:
    def git(*arguments: str) -> str:
        return subprocess.run(
            ["git", *arguments], cwd=directory, capture_output=True, text=True, check=False
        ).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "changed_files": git("status", "--short").splitlines()}


def loadtest_command(arguments: argparse.Namespace, report: Path) -> list[str]:
    command = [
        "-m", "loadtest", arguments.scenario, "--self-serve", "--baseline",
        "--rounds", str(arguments.rounds), "--clients", str(arguments.clients),
        "--duration", f"{arguments.duration:g}", "--report", str(report),
    ]  # fmt: skip
    if arguments.scenario == "hot":
        command.append("--versus-uniform")
    return command


def summarise_run(report: dict[str, Any]) -> dict[str, Any]:
    baseline = report["baseline"]
    keep = ("pgbench", "service", "ratio", "service_uniform", "ratio_to_uniform", "groups_mean_transfers")
    summary: dict[str, Any] = {
        "median_ratio": baseline["median_ratio"],
        "rounds": [{key: entry[key] for key in keep if key in entry} for entry in baseline["rounds"]],
        "cpu_ms_per_transfer_last_round": report["cpu_ms_per_transfer"],
        "latency_ms_last_round": {key: report["latency_ms"][key] for key in ("p50", "p99")},
        "checks_ok": report["checks"]["ok"],
    }
    if "median_ratio_to_uniform" in baseline:
        summary["median_ratio_to_uniform"] = baseline["median_ratio_to_uniform"]
    return summary


def outbox_cost(arguments: argparse.Namespace) -> dict[str, Any]:
    before_dir = arguments.before.resolve()
    after_dir = (arguments.after or REPOSITORY).resolve()
    sides = {"before": before_dir, "after": after_dir}
    probes = {side: probe(directory) for side, directory in sides.items()}
    for side, found in probes.items():
        print(f"{side}: {json.dumps(found)}", file=sys.stderr)
    expected = {"before": arguments.before_status, "after": 200}
    for side, found in probes.items():
        root = str(sides[side])
        if (
            found["events_status"] != expected[side]
            or not found["ledger"].startswith(root + "/")
            or not found["loadtest"].startswith(root + "/")
            or found["service_cwd"] != root
        ):
            raise SystemExit(f"the {side} tree does not serve its own code as expected: {found}")
    pairs: list[dict[str, Any]] = []
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ledger-outbox-cost-") as scratch:
        for number in range(1, arguments.pairs + 1):
            pair: dict[str, Any] = {"pair": number}
            for side, directory in sides.items():
                report_path = Path(scratch) / f"{side}-{number}.json"
                command = loadtest_command(arguments, report_path)
                quiet = wait_quiet(arguments.quiet, arguments.quiet_timeout)
                print(f"pair {number}, {side}: (cd {directory} && python {' '.join(command)})", file=sys.stderr)
                with CpuWatch() as watch:
                    completed = subprocess.run(
                        [sys.executable, *command], cwd=directory, stdout=subprocess.DEVNULL, check=False
                    )
                report = json.loads(report_path.read_text())
                pair[side] = {**summarise_run(report), "machine": {**quiet, **watch.report}}
                if completed.returncode != 0 or not report["checks"]["ok"]:
                    problems.append(
                        f"pair {number} {side}: exit {completed.returncode}, {report['checks']['problems'][:3]}"
                    )
            pair["after_over_before"] = round(pair["after"]["median_ratio"] / pair["before"]["median_ratio"], 3)
            if arguments.scenario == "hot":
                pair["after_over_before_to_uniform"] = round(
                    pair["after"]["median_ratio_to_uniform"] / pair["before"]["median_ratio_to_uniform"], 3
                )
            pairs.append(pair)
            print(f"pair {number}: {json.dumps({k: v for k, v in pair.items() if k.startswith('after_over')})}",
                  file=sys.stderr)  # fmt: skip
    result: dict[str, Any] = {
        "what": f"{arguments.scenario}: service / pgbench before ({probes['before']['ledger']}) and after, "
        "alternating, each run with its own pgbench",
        "command_per_run": "python " + " ".join(loadtest_command(arguments, Path("FILE"))),
        "trees": {
            "before": {**git_state(before_dir), **probes["before"]},
            "after": {**git_state(after_dir), **probes["after"]},
        },
        "pairs": pairs,
        "before_ratios": [pair["before"]["median_ratio"] for pair in pairs],
        "after_ratios": [pair["after"]["median_ratio"] for pair in pairs],
        "median_before_ratio": round(statistics.median(pair["before"]["median_ratio"] for pair in pairs), 3),
        "median_after_ratio": round(statistics.median(pair["after"]["median_ratio"] for pair in pairs), 3),
        "after_over_before": [pair["after_over_before"] for pair in pairs],
        "median_after_over_before": round(statistics.median(pair["after_over_before"] for pair in pairs), 3),
        "checks": {"ok": not problems, "problems": problems},
    }
    if arguments.scenario == "hot":
        values = [pair["after_over_before_to_uniform"] for pair in pairs]
        result["after_over_before_to_uniform"] = values
        result["median_after_over_before_to_uniform"] = round(statistics.median(values), 3)
    return result


# -- latency ------------------------------------------------------------------------------


class TimedGenerator(Generator):
    """The load generator, also noting when each transfer's 201 arrived (Unix seconds)."""

    def __init__(self, *arguments: Any) -> None:
        super().__init__(*arguments)
        self.acknowledged_at: dict[str, float] = {}

    async def send(
        self, stats: Stats, method: str, path: str, body: Any, transfers: list[dict], scheduled: float
    ) -> None:
        await super().send(stats, method, path, body, transfers, scheduled)
        now = time.time()
        for transfer in transfers:
            if transfer["id"] in stats.transfers_acknowledged and transfer["id"] not in self.acknowledged_at:
                self.acknowledged_at[transfer["id"]] = now


async def read_to_end(generator: Generator, cursor: str | None) -> str:
    """Pages the feed from `cursor` (None: its oldest event) to its end; the cursor there."""
    while True:
        query = f"/v1/events?limit={PAGE}" + (f"&after={cursor}" if cursor else "")
        status, content, _ = await generator.call("GET", query)
        if status != 200:
            raise RuntimeError(f"GET /v1/events answered {status}: {content[:300]!r}")
        page = msgspec.json.decode(content)
        cursor = page["next_cursor"]
        if not page["data"]:
            return cursor


async def feed_head(generator: Generator, after: str | None = None, settle: float = 1.2) -> str:
    """The feed's head (a cursor after its last event) once it has stopped moving: read
    to the end, wait past the sequencer's tick (1 s), read again until nothing new came."""
    cursor = await read_to_end(generator, after)
    while True:
        await asyncio.sleep(settle)
        again = await read_to_end(generator, cursor)
        if again == cursor:
            return cursor
        cursor = again


def consumer_process(
    base_url: str, api_key: str, cursor: str, wait: float, limit: int, connection: multiprocessing.connection.Connection
) -> None:
    """A consumer in a process of its own: its receipt times are not delayed by the
    writers' event loop. Says "ready" after its first page, follows the feed until told a
    head position and past it, then sends back what it received."""
    run_fast(_consume(base_url, api_key, cursor, wait, limit, connection))


async def _consume(
    base_url: str, api_key: str, cursor: str, wait: float, limit: int, connection: multiprocessing.connection.Connection
) -> None:
    received: dict[str, tuple[float, str]] = {}  # transfer id -> (receipt, event created_at)
    last = position(cursor)
    gaps = repeats = polls = events = 0
    stop_at: int | None = None
    ready = False
    async with Generator(base_url, api_key, 1) as generator:
        while stop_at is None or last < stop_at:
            status, content, _ = await generator.call("GET", f"/v1/events?after={cursor}&limit={limit}&wait={wait:g}")
            now = time.time()
            polls += 1
            if status != 200:
                raise RuntimeError(f"GET /v1/events answered {status}: {content[:300]!r}")
            page = msgspec.json.decode(content)
            for event in page["data"]:
                at = position(event["id"])
                if at <= last:
                    repeats += 1
                    continue
                if at != last + 1:
                    gaps += 1
                last = at
                events += 1
                if event["type"] == "transfer.posted":
                    received.setdefault(event["data"]["id"], (now, event["created_at"]))
            cursor = page["next_cursor"]
            if not ready:
                ready = True
                connection.send("ready")
            if stop_at is None and connection.poll():
                stop_at = connection.recv()
    connection.send({"received": received, "events": events, "polls": polls, "gaps": gaps, "repeats": repeats})


async def latency_round(
    arguments: argparse.Namespace,
    service: Any,
    generator: TimedGenerator,
    workload: Workload,
    consumers: int,
    head: str,
) -> tuple[dict[str, Any], str, dict[str, int], dict[str, int]]:
    context = multiprocessing.get_context("spawn")
    processes = []
    for _ in range(consumers):
        ours, theirs = context.Pipe()
        process = context.Process(
            target=consumer_process,
            args=(service.base_url, service.api_key, head, arguments.wait, arguments.limit, theirs),
            daemon=True,
        )
        process.start()
        processes.append((process, ours))
    loop = asyncio.get_running_loop()
    for _process, pipe in processes:
        if not await loop.run_in_executor(None, pipe.poll, 60):
            raise RuntimeError("a consumer did not start")
        pipe.recv()
    generator.acknowledged_at.clear()
    started = time.perf_counter()
    stats = await run_closed(workload, generator, arguments.clients, arguments.duration)
    elapsed = time.perf_counter() - started
    acknowledged_at = dict(generator.acknowledged_at)
    new_head = await feed_head(generator, head)
    results = []
    for process, pipe in processes:
        pipe.send(position(new_head))
        if not await loop.run_in_executor(None, pipe.poll, arguments.wait + 60):
            raise RuntimeError("a consumer did not finish")
        results.append(pipe.recv())
        process.join(10)
    entry: dict[str, Any] = {
        "consumers": consumers,
        "duration_seconds": round(elapsed, 2),
        "transfers_acknowledged": len(stats.transfers_acknowledged),
        "transfers_per_second": round(len(stats.transfers_acknowledged) / elapsed, 1),
        "write_latency_ms": spread([ms / 1000 for ms in stats.latencies_ms]),
        "statuses": {str(k): v for k, v in stats.statuses.items()},
    }
    problems: dict[str, int] = {}
    if consumers:
        after_ack: list[float] = []
        after_created: list[float] = []
        ack_after_created: list[float] = []
        missing = 0
        for number, result in enumerate(results):
            for transfer_id, acked in acknowledged_at.items():
                got = result["received"].get(transfer_id)
                if got is None:
                    missing += 1
                    continue
                received, created_at = got
                created = epoch(created_at)
                after_ack.append(received - acked)
                after_created.append(received - created)
                if number == 0:
                    ack_after_created.append(acked - created)
        negative = sum(1 for value in after_ack if value < 0)
        entry.update(
            {
                "consumer_minus_201_ms": spread(after_ack),
                "consumer_before_201": negative,
                "consumer_minus_created_at_ms": spread(after_created),
                "writer_201_minus_created_at_ms": spread(ack_after_created),
                "per_consumer": [
                    {"events": r["events"], "polls": r["polls"], "gaps": r["gaps"], "repeats": r["repeats"]}
                    for r in results
                ],
                "missing": missing,
            }
        )
        entry["_raw"] = (after_ack, after_created)
        problems = {
            "missing": missing,
            "gaps": sum(r["gaps"] for r in results),
            "repeats": sum(r["repeats"] for r in results),
        }
    return entry, new_head, problems, dict(stats.transfers_acknowledged)


async def latency_run(arguments: argparse.Namespace, service: Any) -> dict[str, Any]:
    run_id = f"ev{secrets.token_hex(3)}"
    async with TimedGenerator(service.base_url, service.api_key, arguments.clients + 1) as generator:
        house, accounts = await setup_accounts(generator, run_id, arguments.accounts)
        workload = Workload("uniform", accounts, house, arguments.seed, run_id)
        # Unmeasured: the pool's connections and prepared statements (as `python -m loadtest`).
        warm = await run_closed(workload, generator, arguments.clients, arguments.warmup)
        acknowledged = dict(warm.transfers_acknowledged)
        head = await feed_head(generator)
        rounds: list[dict[str, Any]] = []
        problems: list[str] = []
        all_after_ack: list[float] = []
        all_after_created: list[float] = []
        for number in range(1, arguments.rounds + 1):
            # Alternate which goes first, so that a drift within a round favours neither.
            order = [0, arguments.consumers] if number % 2 else [arguments.consumers, 0]
            pair: dict[str, Any] = {"round": number}
            for consumers in order:
                tables_before = await table_stats(service.database_url)
                cpu_before = (cpu_seconds(service.service_pid), cpu_seconds(service.postgres_pid))
                with CpuWatch() as watch:
                    entry, head, found, amounts = await latency_round(
                        arguments, service, generator, workload, consumers, head
                    )
                entry["machine"] = watch.report
                cpu_after = (cpu_seconds(service.service_pid), cpu_seconds(service.postgres_pid))
                applied = entry["transfers_acknowledged"] or 1
                entry["cpu_ms_per_transfer"] = {
                    "service": round((cpu_after[0] - cpu_before[0]) * 1000 / applied, 3),
                    "postgres": round((cpu_after[1] - cpu_before[1]) * 1000 / applied, 3),
                }
                entry["tables"] = stats_delta(tables_before, await table_stats(service.database_url))
                acknowledged.update(amounts)
                if consumers:
                    after_ack, after_created = entry.pop("_raw")
                    all_after_ack += after_ack
                    all_after_created += after_created
                    problems += [f"round {number}: {count} {kind}" for kind, count in found.items() if count]
                pair["with" if consumers else "without"] = entry
                print(f"round {number}, {consumers} consumers: {entry['transfers_per_second']} transfers/s"
                      + (f", consumer - 201 {entry['consumer_minus_201_ms']}" if consumers else ""),
                      file=sys.stderr)  # fmt: skip
            pair["throughput_with_over_without"] = round(
                pair["with"]["transfers_per_second"] / pair["without"]["transfers_per_second"], 3
            )
            rounds.append(pair)
        problems += await check(generator, [house, *accounts], acknowledged)
    ratios = [pair["throughput_with_over_without"] for pair in rounds]
    return {
        "what": "commit-to-consumer latency of GET /v1/events long-polls under a closed loop of uniform transfers",
        "command": "python -m loadtest.events " + " ".join(sys.argv[1:]),
        "tree": git_state(REPOSITORY),
        "clients": arguments.clients,
        "consumers": arguments.consumers,
        "wait_seconds": arguments.wait,
        "page_limit": arguments.limit,
        "consumer_minus_201_ms": spread(all_after_ack),
        "consumer_before_201_fraction": round(sum(1 for v in all_after_ack if v < 0) / max(len(all_after_ack), 1), 4),
        "consumer_minus_created_at_ms": spread(all_after_created),
        "throughput_with_over_without": ratios,
        "median_throughput_with_over_without": round(statistics.median(ratios), 3),
        "rounds": rounds,
        "checks": {"ok": not problems, "problems": problems[:20]},
    }


def latency(arguments: argparse.Namespace) -> dict[str, Any]:
    quiet = wait_quiet(arguments.quiet, arguments.quiet_timeout)
    with local_service(arguments.workers) as service:
        report = run_fast(latency_run(arguments, service))
    foreign = [
        entry["machine"]["foreign_cpu_seconds"]
        for pair in report["rounds"]
        for entry in (pair["with"], pair["without"])
    ]
    return {**report, "machine": {**quiet, "foreign_cpu_seconds_per_round": foreign}}


# -- webhooks -----------------------------------------------------------------------------


def receiver_process(connection: multiprocessing.connection.Connection) -> None:
    """The webhook receiver, in a process of its own (see `_receive`)."""
    run_fast(_receive(connection))


async def _receive(connection: multiprocessing.connection.Connection) -> None:
    """Sends its port; takes the subscription's secret, then the set of transfer ids
    whose events must arrive; answers every POST 200 on keep-alive HTTP/1.1, checking its
    signature; once every expected event arrived (or at the deadline it is sent with
    them), waits `linger` seconds for repeats and sends back what it received."""
    from ledger.client.webhooks import InvalidSignature, verify_signature

    loop = asyncio.get_running_loop()
    secret_known = asyncio.Event()
    secret = ""
    # (receipt, Ledger-Event-Id, event type, transfer id or None, created_at, signature valid)
    deliveries: list[tuple[float, str, str, str | None, str, bool]] = []
    # The transfers whose events have not arrived yet (known once the posting is done).
    remaining: set[str] | None = None
    early: set[str] = set()
    complete = asyncio.Event()
    decoder = msgspec.json.Decoder()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                headers: dict[str, str] = {}
                for line in head.decode("latin-1").split("\r\n")[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                now = time.time()
                await secret_known.wait()
                try:
                    verify_signature(secret, body, headers.get("ledger-signature", ""))
                    valid = True
                except InvalidSignature:
                    valid = False
                event = decoder.decode(body)
                transfer_id = event["data"]["id"] if event["type"].startswith("transfer.") else None
                deliveries.append(
                    (now, headers.get("ledger-event-id", ""), event["type"], transfer_id, event["created_at"], valid)
                )
                if transfer_id is not None and valid:
                    if remaining is None:
                        early.add(transfer_id)
                    else:
                        remaining.discard(transfer_id)
                        if not remaining:
                            complete.set()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the sender closed the connection, or the receiver is shutting down
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=256)
    connection.send(server.sockets[0].getsockname()[1])
    secret = await loop.run_in_executor(None, connection.recv)
    secret_known.set()
    expected, deadline, linger = await loop.run_in_executor(None, connection.recv)
    remaining = set(expected) - early
    if not remaining:
        complete.set()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(complete.wait(), max(0.0, deadline - time.time()))
    await asyncio.sleep(linger)
    server.close()
    connection.send(deliveries)


async def post_transfers(
    generator: Generator, accounts: list[str], run_id: str, count: int, batch: int, clients: int, rate: float | None
) -> tuple[dict[str, float], dict[str, int], float, float]:
    """Posts `count` transfers among `accounts` in batches of `batch`, `clients` requests in
    flight (or one batch every batch/rate seconds); returns {transfer id: time of its
    answer}, {transfer id: amount}, and the time of the first send and of the last answer."""
    workload = Workload("uniform", accounts, accounts[0], 7, run_id)
    acknowledged: dict[str, float] = {}
    amounts: dict[str, int] = {}
    batches = [[workload._transfer() for _ in range(min(batch, count - start))] for start in range(0, count, batch)]
    queue = iter(batches)
    first = time.time()
    loop = asyncio.get_running_loop()

    async def send(transfers: list[dict]) -> None:
        status, content, _ = await generator.call("POST", "/v1/transfers/batch", {"transfers": transfers})
        now = time.time()
        if status != 200:
            raise RuntimeError(f"batch answered {status}: {content[:300]!r}")
        for result in msgspec.json.decode(content)["results"]:
            transfer = result.get("transfer") or {}
            if transfer.get("status") == "posted":
                acknowledged[result["id"]] = now
                amounts[result["id"]] = transfer["amount"]

    if rate:
        started = loop.time()
        pending = []
        for number, transfers in enumerate(batches):
            await asyncio.sleep(max(0.0, started + number * batch / rate - loop.time()))
            pending.append(asyncio.create_task(send(transfers)))
        await asyncio.gather(*pending)
    else:

        async def client() -> None:
            for transfers in queue:
                await send(transfers)

        await asyncio.gather(*(client() for _ in range(clients)))
    return acknowledged, amounts, first, time.time()


FEED_TABLES = ("event_outbox", "events", "event_feed", "webhooks", "webhook_deliveries")


async def table_stats(database_url: str) -> dict[str, dict[str, int]]:
    """Scans and rows of the feed's tables (pg_stat_user_tables; counted by PostgreSQL
    when a transaction ends, flushed about once a second): sequential reads of a table
    that only grows would mean a statement not using its index."""
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch(
            "SELECT relname, seq_scan, seq_tup_read, COALESCE(idx_scan, 0) AS idx_scan, n_tup_ins, n_tup_del, "
            "n_live_tup, n_dead_tup, autoanalyze_count, autovacuum_count FROM pg_stat_user_tables "
            "WHERE relname = ANY($1::text[])",
            list(FEED_TABLES),
        )
    finally:
        await connection.close()
    return {row["relname"]: {key: row[key] for key in row.keys() if key != "relname"} for row in rows}


def stats_delta(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Counters as differences, n_live_tup/n_dead_tup as they were at the end."""
    return {
        table: {
            key: value if key.startswith("n_live") or key.startswith("n_dead") else value - before[table][key]
            for key, value in after[table].items()
        }
        for table in after
        if table in before
    }


async def delivery_counts(database_url: str, webhook_id: str) -> dict[str, Any]:
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch(
            "SELECT status, count(*) AS n, sum(attempts) AS attempts, max(attempts) AS max_attempts "
            "FROM webhook_deliveries WHERE webhook_id = $1 GROUP BY status",
            webhook_id,
        )
    finally:
        await connection.close()
    return {
        row["status"]: {"deliveries": row["n"], "attempts": row["attempts"], "max_attempts": row["max_attempts"]}
        for row in rows
    }


async def webhooks_run(arguments: argparse.Namespace, service: Any) -> dict[str, Any]:
    run_id = f"wh{secrets.token_hex(3)}"
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    receiver = context.Process(target=receiver_process, args=(theirs,), daemon=True)
    receiver.start()
    loop = asyncio.get_running_loop()
    port = await loop.run_in_executor(None, ours.recv)
    async with Generator(service.base_url, service.api_key, arguments.clients + 1) as generator:
        house, accounts = await setup_accounts(generator, run_id, arguments.accounts)
        # Subscribe once the setup's events are in the feed: the subscription starts at the
        # feed's head, so what it gets is the run's transfers.
        await feed_head(generator)
        status, content, _ = await generator.call("POST", "/v1/webhooks", {"url": f"http://127.0.0.1:{port}/hook"})
        if status != 201:
            raise RuntimeError(f"POST /v1/webhooks answered {status}: {content[:300]!r}")
        subscription = msgspec.json.decode(content)
        ours.send(subscription["secret"])
        tables_before = await table_stats(service.database_url)
        cpu_before = (cpu_seconds(service.service_pid), cpu_seconds(service.postgres_pid))
        acknowledged, amounts, posting_started, posting_ended = await post_transfers(
            generator, accounts, run_id, arguments.transfers, arguments.batch, arguments.clients, arguments.rate
        )
        cpu_posted = (cpu_seconds(service.service_pid), cpu_seconds(service.postgres_pid))
        print(f"posted {len(acknowledged)} transfers in {posting_ended - posting_started:.1f} s", file=sys.stderr)
        ours.send((list(acknowledged), time.time() + arguments.timeout, arguments.linger))
        while not await loop.run_in_executor(None, ours.poll, 1.0):
            pass
        deliveries = ours.recv()
        receiver.join(10)
        cpu_after = (cpu_seconds(service.service_pid), cpu_seconds(service.postgres_pid))
        counts = await delivery_counts(service.database_url, subscription["id"])
        await asyncio.sleep(1.5)  # PostgreSQL's statistics are flushed about once a second
        tables = stats_delta(tables_before, await table_stats(service.database_url))
        problems = await check(generator, [house, *accounts], amounts)
    deliveries.sort()
    by_event: dict[str, list[tuple]] = {}
    for delivery in deliveries:
        by_event.setdefault(delivery[1], []).append(delivery)
    invalid = [d for d in deliveries if not d[5]]
    received_transfers = {d[3] for d in deliveries if d[5] and d[2] == "transfer.posted"}
    missing = [transfer_id for transfer_id in acknowledged if transfer_id not in received_transfers]
    duplicates = {event: len(copies) for event, copies in by_event.items() if len(copies) > 1}
    first_copies = [copies[0] for copies in by_event.values()]
    lag = [received - epoch(created_at) for received, _, _, _, created_at, _ in first_copies]
    after_201 = [
        copies[0][0] - acknowledged[copies[0][3]] for copies in by_event.values() if copies[0][3] in acknowledged
    ]
    span = deliveries[-1][0] - deliveries[0][0] if len(deliveries) > 1 else 0.0
    # Per second from the first delivery: deliveries, and the lag (ms) of the first copies
    # received in it: how steady the rate was, and whether the lag grew.
    timeline: list[int] = []
    lags: list[list[float]] = []
    if deliveries:
        for received, *_ in deliveries:
            second = int(received - deliveries[0][0])
            timeline += [0] * (second + 1 - len(timeline))
            lags += [[] for _ in range(second + 1 - len(lags))]
            timeline[second] += 1
        for received, _, _, _, created_at, _ in first_copies:
            lags[int(received - deliveries[0][0])].append((received - epoch(created_at)) * 1000)
    lag_timeline = [
        [second, percentile(sorted(values), 0.5), round(max(values), 1)] if values else [second, None, None]
        for second, values in enumerate(lags)
    ]
    if missing:
        problems.append(f"{len(missing)} transfers' events not received (e.g. {missing[:3]})")
    if invalid:
        problems.append(f"{len(invalid)} deliveries with an invalid signature")
    delivered = len(deliveries)
    # The service's and PostgreSQL's CPU once the posting was done, over the deliveries
    # received after it: what a delivery costs without the transfers' own work.
    late = sum(1 for d in deliveries if d[0] > posting_ended)
    return {
        "what": "webhook deliveries to one local receiver: throughput, lag, completeness, signatures",
        "command": "python -m loadtest.events " + " ".join(sys.argv[1:]),
        "tree": git_state(REPOSITORY),
        "webhook_concurrency": arguments.concurrency or os.environ.get("LEDGER_WEBHOOK_CONCURRENCY", "8 (default)"),
        "transfers_posted": len(acknowledged),
        "posting_seconds": round(posting_ended - posting_started, 2),
        "posting_transfers_per_second": round(len(acknowledged) / (posting_ended - posting_started), 1),
        "deliveries_received": delivered,
        "distinct_events": len(by_event),
        "first_to_last_seconds": round(span, 2),
        "deliveries_per_second": round((delivered - 1) / span, 1) if span else None,
        "first_delivery_after_posting_started_seconds": round(deliveries[0][0] - posting_started, 3)
        if deliveries
        else None,
        "last_delivery_after_posting_ended_seconds": round(deliveries[-1][0] - posting_ended, 3)
        if deliveries
        else None,
        "lag_created_at_to_received_ms": spread(lag),
        "lag_201_to_received_ms": spread(after_201),
        "deliveries_per_second_timeline": timeline,
        "lag_timeline_ms": lag_timeline,  # [second, p50, max]
        "missing": len(missing),
        "invalid_signatures": len(invalid),
        "duplicates": {"events": len(duplicates), "extra_copies": sum(n - 1 for n in duplicates.values())},
        "events_by_type": dict(
            sorted({t: sum(1 for c in first_copies if c[2] == t) for t in {c[2] for c in first_copies}}.items())
        ),
        "service_deliveries": counts,
        "tables": tables,
        "cpu_seconds": {
            "while_posting": {
                "service": round(cpu_posted[0] - cpu_before[0], 2),
                "postgres": round(cpu_posted[1] - cpu_before[1], 2),
            },
            "after_posting": {
                "service": round(cpu_after[0] - cpu_posted[0], 2),
                "postgres": round(cpu_after[1] - cpu_posted[1], 2),
            },
        },
        "deliveries_after_posting": late,
        "cpu_ms_per_delivery_after_posting": {
            "service": round((cpu_after[0] - cpu_posted[0]) * 1000 / late, 3) if late else None,
            "postgres": round((cpu_after[1] - cpu_posted[1]) * 1000 / late, 3) if late else None,
        },
        "checks": {"ok": not problems, "problems": problems[:20]},
    }


def webhooks(arguments: argparse.Namespace) -> dict[str, Any]:
    environment = {}
    if arguments.concurrency is not None:
        environment["LEDGER_WEBHOOK_CONCURRENCY"] = str(arguments.concurrency)
    quiet = wait_quiet(arguments.quiet, arguments.quiet_timeout)
    with local_service(1, **environment) as service, CpuWatch() as watch:
        report = run_fast(webhooks_run(arguments, service))
    return {**report, "machine": {**quiet, **watch.report}}


# -- command line -------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.events", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    cost = commands.add_parser(
        "outbox-cost",
        help="service / pgbench from a tree before the feed and from this one, alternating",
        description="Runs `python -m loadtest SCENARIO --self-serve --baseline --rounds R` from --before and from "
        "this repository in turn, --pairs times, after checking each serves its own code; reports each run's "
        "ratio to its own pgbench and the median of the per-pair ratios after / before.",
    )
    cost.add_argument("--before", type=Path, required=True, help="a checkout of the code before the feed")
    cost.add_argument(
        "--after",
        type=Path,
        help="a checkout of the code with the feed (default: this repository's working tree; a worktree of a "
        "commit keeps the measurement from following edits made while it runs)",
    )
    cost.add_argument(
        "--before-status",
        type=int,
        default=404,
        help="what the --before tree's service must answer on GET /v1/events (404: no feed yet; 200 to compare "
        "two versions of the feed)",
    )
    cost.add_argument("--scenario", choices=("uniform", "hot"), default="uniform")
    cost.add_argument("--pairs", type=int, default=4, help="before/after pairs (before first in each)")
    cost.add_argument("--rounds", type=int, default=2, help="--rounds of each `python -m loadtest --baseline` run")
    cost.add_argument("--clients", type=int, default=16)
    cost.add_argument("--duration", type=float, default=8.0, help="seconds measured per round")

    lat = commands.add_parser(
        "latency",
        help="commit-to-consumer latency of the feed under load",
        description="Closed-loop uniform transfers; rounds without and with consumers (long-polling the feed "
        "from its head, each in a process of its own) alternate; reports the consumers' receipt of each "
        "acknowledged transfer's event minus its 201 and minus its created_at, and throughput with/without.",
    )
    lat.add_argument("--clients", type=int, default=16)
    lat.add_argument("--duration", type=float, default=10.0, help="seconds per round and side")
    lat.add_argument("--rounds", type=int, default=3, help="pairs of rounds (without, with consumers)")
    lat.add_argument("--consumers", type=int, default=1)
    lat.add_argument("--wait", type=float, default=5.0, help="the consumers' long-poll `wait` (seconds)")
    lat.add_argument("--limit", type=int, default=PAGE, help="the consumers' page size")
    lat.add_argument("--warmup", type=float, default=2.0)
    lat.add_argument("--accounts", type=int, default=1000)
    lat.add_argument("--seed", type=int, default=1)
    lat.add_argument("--workers", type=int, default=1, help="service worker processes")

    hooks = commands.add_parser(
        "webhooks",
        help="webhook delivery throughput and lag to a local receiver",
        description="One subscription to a receiver on 127.0.0.1 that checks every signature; --transfers "
        "transfers posted in batches; reports deliveries/s from the first to the last delivery, the lag from "
        "created_at, missing events, invalid signatures and duplicates.",
    )
    hooks.add_argument("--transfers", type=int, default=20_000)
    hooks.add_argument("--batch", type=int, default=100, help="transfers per POST /v1/transfers/batch")
    hooks.add_argument("--clients", type=int, default=4, help="batch requests in flight")
    hooks.add_argument("--rate", type=float, help="post at this many transfers/s instead of as fast as possible")
    hooks.add_argument("--accounts", type=int, default=200)
    hooks.add_argument("--concurrency", type=int, help="LEDGER_WEBHOOK_CONCURRENCY of the service (default 8)")
    hooks.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for every event to arrive")
    hooks.add_argument("--linger", type=float, default=3.0, help="seconds to wait for repeats after the last one")

    for sub in (cost, lat, hooks):
        sub.add_argument("--report", type=Path, help="also write the JSON report here")
        sub.add_argument(
            "--quiet",
            type=float,
            default=0.3,
            help="before each run, wait until less than this many cores are busy (something else running "
            "would be measured too); the report has the CPU others used during each run (foreign_cpu_seconds)",
        )
        sub.add_argument("--quiet-timeout", type=float, default=900.0, help="seconds to wait for that at most")
    arguments = parser.parse_args(argv)
    if arguments.command == "outbox-cost":
        report = outbox_cost(arguments)
    elif arguments.command == "latency":
        report = latency(arguments)
    else:
        report = webhooks(arguments)
    text = json.dumps(report, indent=2)
    print(text)
    if arguments.report:
        arguments.report.parent.mkdir(parents=True, exist_ok=True)
        arguments.report.write_text(text)
    if not report["checks"]["ok"]:
        print("CHECKS FAILED: " + "; ".join(report["checks"]["problems"][:5]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
