"""A service as a newcomer's `make run` leaves it: `ledger serve` on its own embedded
PostgreSQL in `<workdir>/.ledger`, with `<workdir>/.venv` the project's environment, so
the README's commands (`cat .ledger/admin.key`, `.venv/bin/ledger ...`) work from
`workdir` as they do from a fresh clone."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

REPOSITORY = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def fresh_service(workdir: Path) -> Iterator[int]:
    """Serve from `workdir` on a free port; yield the port."""
    (workdir / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    port = _free_port()
    environment = {name: value for name, value in os.environ.items() if not name.startswith("LEDGER_")}
    log_path = workdir / "serve.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "ledger", "serve", "--port", str(port)],
            cwd=workdir,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"ledger serve exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"ledger serve did not become ready:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
