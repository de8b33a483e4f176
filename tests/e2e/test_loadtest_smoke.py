"""The load generator's short form: a two-second `replay` run with its own PostgreSQL and
service and the pgbench baseline, so that `python -m loadtest` cannot rot unnoticed. It
must finish, report a baseline ratio, pass its own correctness checks, and leave nothing
in the directory it ran from (the service it starts keeps its keys in the run's
temporary directory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPOSITORY

pytestmark = pytest.mark.slow


def test_a_short_replay_run_passes_its_correctness_checks(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    # An empty working directory, where a service started without LEDGER_DATA_DIR would
    # write its chain keys (./.ledger); the repository is on the path instead.
    work = tmp_path / "work"
    work.mkdir()
    python_path = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "loadtest", "replay", "--self-serve", "--baseline", "--clients", "4",
         "--duration", "2", "--accounts", "20", "--report", str(report_path)],
        capture_output=True,
        text=True,
        cwd=work,
        env={**os.environ, "PYTHONPATH": python_path},
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(work.iterdir()) == []
    report = json.loads(report_path.read_text())
    assert report["checks"]["ok"] and report["transfers_acknowledged"] > 0
    # About a fifth of the requests retry an earlier id: every one must be answered as a replay.
    assert report["replays_confirmed"] == report["requests"] - report["transfers_acknowledged"] > 0
    assert report["baseline"]["transfers_per_second"] > 0 and report["baseline"]["ratio"] > 0
    assert {"p50", "p95", "p99", "p99.9", "max"} <= set(report["latency_ms"])
    # The group-commit histogram from the service's /metrics: every new transfer went
    # through a group transaction, and the buckets add up to the transactions.
    groups = report["groups"]
    assert groups["transactions"] > 0 and sum(groups["histogram"].values()) == groups["transactions"], groups
    assert groups["mean_transfers"] >= 1
