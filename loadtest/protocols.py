"""python -m loadtest.protocols: the HTTP implementation on the hot path, measured.

    .venv/bin/python -m loadtest.protocols --rounds 5 --duration 8 --clients 16

One embedded PostgreSQL, migrated once; the same app served by uvicorn with three HTTP
implementations (and optionally by another server), one at a time on that database, each with the environment `ledger
serve` gives its workers (serving as the least-privileged role, an admin key, chain
keys in a data directory of the run's own):

- `limited`: `ledger.http.protocol:LimitedHttpToolsProtocol`, what `ledger serve` runs
  (httptools with a total header limit, 431 past it, and header/body/idle timeouts);
- `httptools`: uvicorn's default, with no header limit;
- `h11`: uvicorn's h11 with `--h11-max-incomplete-event-size 16384`;
- `granian`: another ASGI server (HTTP in Rust), when installed (`pip install granian`),
  to see whether the server is a bound; it has none of the service's limits.
  `--variants granian` runs only it against `limited`.

Each round starts every variant afresh (the order rotates from round to round), checks
what it answers to 20 KB of headers, runs the `uniform` scenario in closed loop exactly
as `python -m loadtest` does (its own funded accounts, a warm-up, the correctness checks)
and stops it. The report (JSON, to stdout and --report FILE) has per round each
variant's transfers/s, service CPU ms per transfer (psutil on the uvicorn process) and
p50/p99, its ratios to the `limited` variant of the same round, and the medians of those
per-round ratios over the rounds: the machine's speed drifts, so only same-round ratios
are compared.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from ledger import migrate
from ledger.embedded import EmbeddedPostgres
from ledger.integrity import load_keyring
from loadtest.__main__ import run, run_fast
from loadtest.local import free_port, new_admin_key, service_environment

REFERENCE = "limited"
VARIANTS: dict[str, list[str]] = {
    REFERENCE: ["--http", "ledger.http.protocol:LimitedHttpToolsProtocol"],
    "httptools": ["--http", "httptools"],
    "h11": ["--http", "h11", "--h11-max-incomplete-event-size", "16384"],
    # Another ASGI server (Rust, HTTP parsing outside Python), when installed
    # (`pip install granian`): is the server a bound? It has none of the service's limits.
    "granian": ["--interface", "asgi", "--loop", "uvloop", "--workers", "1"],
}
UVICORN_VARIANTS = ("limited", "httptools", "h11")
PROBE_HEADER_BYTES = 20_000


def start_uvicorn(variant: str, env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    command = [
        *(sys.executable, "-m", "uvicorn", "ledger.http.app:create_app_from_env", "--factory"),
        *("--host", "127.0.0.1", "--port", str(port), "--timeout-keep-alive", "5"),
        *("--log-level", "warning", "--no-access-log", "--no-server-header", *VARIANTS[variant]),
    ]
    if variant not in UVICORN_VARIANTS:
        command = [
            *(sys.executable, "-m", variant, "--factory", "--host", "127.0.0.1", "--port", str(port)),
            *("--log-level", "warning", *VARIANTS[variant], "ledger.http.app:create_app_from_env"),
        ]
    with log_path.open("ab") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(600):
        if server.poll() is not None:
            raise RuntimeError(f"{variant}: uvicorn exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=1).status_code == 200:
                return server, port
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.terminate()
    raise RuntimeError(f"{variant}: not ready:\n{log_path.read_text()[-3000:]}")


def header_probe(port: int, pieces: int) -> str:
    """The status line answered to a request whose headers total about 20 KB, sent in one
    write or in `pieces` writes 0.1 s apart (h11 applies its limit only to what it holds
    incomplete between reads, so its answer depends on how the headers arrive)."""
    request = (
        f"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Filler: {'a' * PROBE_HEADER_BYTES}\r\n\r\n"
    ).encode()
    size = -(-len(request) // pieces)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            for start in range(0, len(request), size):
                if start:
                    time.sleep(0.1)
                connection.sendall(request[start : start + size])
            answer = b""
            while b"\r\n" not in answer:
                chunk = connection.recv(4096)
                if not chunk:
                    break
                answer += chunk
    except OSError as error:
        return f"no answer: {error!r}"
    return answer.split(b"\r\n", 1)[0].decode("latin-1") if answer else "closed without an answer"


def measure(
    variant: str, env: dict[str, str], arguments: argparse.Namespace, log_path: Path, postgres_pid: int
) -> dict:
    server, port = start_uvicorn(variant, env, log_path)
    try:
        probes = {"one_write": header_probe(port, 1), "ten_writes": header_probe(port, 10)}
        api_key = env["LEDGER_ADMIN_KEY"]
        report = run_fast(run(arguments, f"http://127.0.0.1:{port}", api_key, server.pid, postgres_pid))
    finally:
        server.terminate()
        server.wait(30)
    transfers = report["transfers_acknowledged"]
    cpu = report["cpu_seconds"]

    def per_transfer(seconds: float | None) -> float | None:
        return round(seconds * 1000 / transfers, 4) if seconds is not None and transfers else None

    return {
        "transfers_per_second": report["transfers_per_second"],
        "service_cpu_ms_per_transfer": per_transfer(cpu["service"]),
        "postgres_cpu_ms_per_transfer": per_transfer(cpu["postgres"]),
        "p50_ms": report["latency_ms"]["p50"],
        "p99_ms": report["latency_ms"]["p99"],
        "statuses": report["statuses"],
        "header_probe_20kb": probes,
        "checks": report["checks"],
    }


def ratio(value: float | None, reference: float | None) -> float | None:
    return round(value / reference, 4) if value is not None and reference else None


def median(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return round(statistics.median(present), 4) if present else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.protocols", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds measured per variant and round")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load first")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--skip-checks", action="store_true", help="skip the correctness checks after each run")
    parser.add_argument("--report", type=Path, help="also write the JSON report here")
    parser.add_argument(
        "--variants", help=f"comma-separated, {REFERENCE!r} included (default: all of {', '.join(VARIANTS)} installed)"
    )
    arguments = parser.parse_args(argv)
    # What loadtest.__main__.run reads: the uniform scenario in closed loop.
    load = argparse.Namespace(**vars(arguments), scenario="uniform", rate=None, max_outstanding=512)
    names = [name for name in VARIANTS if name in UVICORN_VARIANTS or importlib.util.find_spec(name)]
    if arguments.variants:
        names = [REFERENCE, *(n for n in arguments.variants.split(",") if n in VARIANTS and n != REFERENCE)]
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ledger-protocols-") as directory:
        embedded = EmbeddedPostgres(Path(directory) / "pg")
        migrate.upgrade(embedded.start())
        try:
            postgres_pid = int((embedded.pgdata / "postmaster.pid").read_text().split()[0])
            data_dir = Path(directory) / "data"
            load_keyring(None, data_dir / "chain-keys", create=True)
            # As `ledger serve` hands its workers: the serving URL only, never the owner's.
            env = {**os.environ, **service_environment(embedded, data_dir, new_admin_key())}
            env.pop("LEDGER_MIGRATION_DATABASE_URL")
            env.update(LEDGER_ACCESS_LOG="false", LEDGER_LOG_LEVEL="warning")
            for number in range(arguments.rounds):
                order = names[number % len(names) :] + names[: number % len(names)]
                results = {}
                for variant in order:
                    print(f"round {number + 1}/{arguments.rounds}: {variant}", file=sys.stderr)
                    log_path = Path(directory) / f"{variant}.log"
                    results[variant] = measure(variant, env, load, log_path, postgres_pid)
                reference = results[REFERENCE]
                rounds.append(
                    {
                        "order": order,
                        "variants": results,
                        "ratio_to_limited": {
                            name: {
                                "throughput": ratio(result["transfers_per_second"], reference["transfers_per_second"]),
                                "service_cpu_per_transfer": ratio(
                                    result["service_cpu_ms_per_transfer"], reference["service_cpu_ms_per_transfer"]
                                ),
                            }
                            for name, result in results.items()
                            if name != REFERENCE
                        },
                    }
                )
            logs = {name: (Path(directory) / f"{name}.log").read_text(errors="replace")[-2000:] for name in names}
        finally:
            embedded.stop()

    def over_rounds(name: str, key: str) -> list:
        return [entry["variants"][name][key] for entry in rounds]

    problems = [
        f"round {number + 1} {name}: {problem}"
        for number, entry in enumerate(rounds)
        for name, result in entry["variants"].items()
        for problem in result["checks"]["problems"]
    ]
    report = {
        "scenario": "uniform",
        "mode": f"closed loop, {arguments.clients} clients, {arguments.duration:g} s measured after "
        f"{arguments.warmup:g} s warm-up, {arguments.rounds} rounds",
        "variants": {name: " ".join(VARIANTS[name]) for name in names},
        "rounds": rounds,
        "median": {
            name: {
                key: median(over_rounds(name, key))
                for key in ("transfers_per_second", "service_cpu_ms_per_transfer", "p50_ms", "p99_ms")
            }
            for name in names
        },
        "median_ratio_to_limited": {
            name: {
                key: median([entry["ratio_to_limited"][name][key] for entry in rounds])
                for key in ("throughput", "service_cpu_per_transfer")
            }
            for name in names
            if name != REFERENCE
        },
        "header_probe_20kb": {
            name: {
                how: sorted({probes[how] for probes in over_rounds(name, "header_probe_20kb")})
                for how in ("one_write", "ten_writes")
            }
            for name in names
        },
        "server_logs_tail": {name: text for name, text in logs.items() if text},
        "checks": {"ok": not problems, "problems": problems[:20], "skipped": arguments.skip_checks},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if arguments.report:
        arguments.report.write_text(text)
    if problems:
        print("CORRECTNESS CHECKS FAILED: " + "; ".join(problems[:5]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
