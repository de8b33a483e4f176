"""A local PostgreSQL and service for self-contained runs (`--self-serve`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from ledger.embedded import EmbeddedPostgres


@dataclass(frozen=True)
class LocalService:
    base_url: str
    service_pid: int
    postgres_pid: int
    database_url: str


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def local_service(workers: int = 1, **environment: str) -> Iterator[LocalService]:
    with tempfile.TemporaryDirectory() as directory:
        embedded = EmbeddedPostgres(Path(directory) / "pg")
        url = embedded.start()
        postgres_pid = int((embedded.pgdata / "postmaster.pid").read_text().split()[0])
        port = free_port()
        env = {
            **os.environ,
            "LEDGER_DATABASE_URL": url,
            "LEDGER_ACCESS_LOG": "false",
            "LEDGER_LOG_LEVEL": "warning",
            **environment,
        }
        server = subprocess.Popen(
            [sys.executable, "-m", "ledger", "serve", "--port", str(port), "--workers", str(workers)],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        base_url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(f"{base_url}/health/ready", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            else:
                raise RuntimeError("the service did not become ready")
            yield LocalService(base_url, server.pid, postgres_pid, url)
        finally:
            server.terminate()
            server.wait(30)
            embedded.stop()
