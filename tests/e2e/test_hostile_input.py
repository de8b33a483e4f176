"""Hostile input from a fuzzer: schemathesis generates requests from the OpenAPI
document (every operation; valid and invalid data: the examples, coverage and fuzzing
phases) against a real `ledger serve`, and runs all of its checks: no 5xx, every status,
content type, header and body as documented, invalid data rejected, valid data accepted
(see `schemathesis.toml` for the two answers a schema cannot express: opaque cursors and
money written as floats). The server fixture also fails the session if any error was
logged. Hand-written hostile cases live in tests/integration/test_bad_input.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests import provision

REPOSITORY = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_schemathesis_finds_no_failure_in_any_operation(server_url: str, tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "schemathesis.cli", "run", f"{server_url}/schema/openapi.json",
        "--header", f"Authorization: {provision.API_HEADERS['Authorization']}",
        "--checks", "all", "--phases", "examples,coverage,fuzzing", "--max-examples", "40", "--seed", "20261125",
        "--no-color", "--report", "junit", "--report-dir", str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    # It really ran every operation of the document.
    document = httpx.get(f"{server_url}/schema/openapi.json").json()
    operations = sum(len(item) for item in document["paths"].values())
    assert f"Tested: {operations}" in result.stdout, result.stdout[-3000:]
