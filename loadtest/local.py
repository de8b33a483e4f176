"""A local PostgreSQL and service for self-contained runs (`--self-serve`).

The service is started as in production: migrated by the tables' owner (the embedded
server's superuser), serving as the least-privileged role (`ledger_app`), with an admin
key of the run's own and its chain keys and checkpoints in the run's temporary
directory (never `./.ledger` of whoever started it)."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ledger.cluster.stack import wait_ready
from ledger.embedded import EmbeddedPostgres


@dataclass(frozen=True)
class LocalService:
    base_url: str
    service_pid: int
    postgres_pid: int
    # As the tables' owner: for direct checks and the pgbench baseline, not what the
    # service serves with.
    database_url: str
    # The service's admin key (LEDGER_ADMIN_KEY): every request needs a key, and only an
    # admin key may open the accounts that may go negative which the scenarios fund from.
    api_key: str


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def new_admin_key() -> str:
    return "lk_" + secrets.token_urlsafe(32)


def service_environment(postgres: EmbeddedPostgres, data_dir: Path, admin_key: str) -> dict[str, str]:
    """The LEDGER_* variables of a `ledger serve` on the running `postgres`: migrations as
    the owner, serving as the least-privileged role (the service refuses to serve as the
    owner), the given admin key (so no admin key file is written) and `data_dir` for the
    chain keys and checkpoints."""
    return {
        "LEDGER_DATABASE_URL": postgres.service_url,
        "LEDGER_MIGRATION_DATABASE_URL": postgres.url,
        "LEDGER_ADMIN_KEY": admin_key,
        "LEDGER_DATA_DIR": str(data_dir),
    }


@contextmanager
def local_service(workers: int = 1, **environment: str) -> Iterator[LocalService]:
    with tempfile.TemporaryDirectory(prefix="ledger-loadtest-") as directory:
        embedded = EmbeddedPostgres(Path(directory) / "pg")
        url = embedded.start()
        postgres_pid = int((embedded.pgdata / "postmaster.pid").read_text().split()[0])
        port = free_port()
        api_key = new_admin_key()
        env = {
            **os.environ,
            **service_environment(embedded, Path(directory) / "data", api_key),
            "LEDGER_ACCESS_LOG": "false",
            "LEDGER_LOG_LEVEL": "warning",
            **environment,
        }
        # Only warnings and errors are logged: kept to explain a service that does not
        # start (e.g. one refusing its database role).
        log_path = Path(directory) / "service.log"
        with log_path.open("wb") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "ledger", "serve", "--port", str(port), "--workers", str(workers)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        base_url = f"http://127.0.0.1:{port}"

        try:
            wait_ready(base_url, server, log_path, 60)
            yield LocalService(base_url, server.pid, postgres_pid, url, api_key)
        finally:
            server.terminate()
            server.wait(30)
            embedded.stop()
