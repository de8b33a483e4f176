"""What scaling out costs on one machine: the uniform scenario through `make cluster`'s
deployment (HAProxy -> 1 or 2 instances -> PgBouncer -> a primary with a synchronous
standby) against one instance straight on one PostgreSQL, in the same run, in
alternating short rounds (this machine's speed drifts), as medians of per-round ratios.

    .venv/bin/python -m loadtest.cluster --rounds 3 --duration 8 --clients 16 --report loadtest/results/cluster.json

On two shared cores this shows the overhead and that it stays correct (each round's load
generator checks its invariants), not a speed-up: every process competes for the same
two cores, and each transfer is committed on two servers instead of one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from ledger.cluster import stack
from loadtest.local import free_port, local_service
from loadtest.pooler import uniform_round

REPOSITORY = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.cluster", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument(
        "--variants",
        default="cluster-1,cluster-2",
        help="deployments besides `direct`: cluster-N (N instances), cluster-N-local (the standby asynchronous: "
        "synchronous_commit=local, to see what waiting for it costs)",
    )
    parser.add_argument("--report", type=Path)
    arguments = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="ledger-cluster-bench-"))
    targets: dict[str, tuple[str, str]] = {}
    variants = [name.strip() for name in arguments.variants.split(",") if name.strip()]
    results: dict[str, list[float]] = {name: [] for name in ("direct", *variants)}
    p99: dict[str, list[float]] = {name: [] for name in results}
    with ExitStack() as stack_:
        direct = stack_.enter_context(local_service())
        targets["direct"] = (direct.base_url, direct.api_key)
        for name in variants:
            _, instances, *commit = name.split("-")
            directory = work / name
            state = stack.up(directory, int(instances), free_port(), commit[0] if commit else "on")
            stack_.callback(stack.down, directory)
            targets[name] = (state["base_url"], Path(state["admin_key_file"]).read_text().strip())
        names = list(results)
        for number in range(arguments.rounds):
            order = names if number % 2 == 0 else names[::-1]
            for name in order:
                url, key = targets[name]
                report = uniform_round(url, key, arguments.clients, arguments.duration, work / "round.json")
                results[name].append(float(report["transfers_per_second"]))
                p99[name].append(float(report.get("latency_ms", {}).get("p99", 0) or 0))
                print(f"round {number + 1} {name}: {results[name][-1]:.1f} transfers/s", flush=True)
    ratios = {
        name: [round(value / base, 3) for value, base in zip(results[name], results["direct"], strict=True)]
        for name in variants
    }
    summary = {
        "clients": arguments.clients,
        "duration_seconds": arguments.duration,
        "transfers_per_second": results,
        "p99_ms": p99,
        "ratios_to_direct": ratios,
        "median_ratio_to_direct": {name: statistics.median(values) for name, values in ratios.items()},
    }
    print(json.dumps(summary, indent=2))
    if arguments.report:
        arguments.report.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
