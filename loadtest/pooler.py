"""The cost of LEDGER_DATABASE_POOLER=transaction: the uniform scenario through PgBouncer
in transaction mode with the setting on, against the service straight on PostgreSQL
without it, in the same run on the same database, in alternating short rounds (this
machine's speed drifts), as the median of the per-round ratios.

    .venv/bin/python -m loadtest.pooler --rounds 5 --report loadtest/results/cluster/pooler.json

on an embedded PostgreSQL of its own, or on `--server-url`, a role that can create a
database and a login role (a superuser, as for the tests' LEDGER_TEST_DATABASE_URL); both
are dropped afterwards. PgBouncer is
Debian's (apt-get install pgbouncer).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

from ledger import migrate
from ledger.cluster.pgbouncer import PgBouncer, free_port
from ledger.cluster.stack import wait_ready
from ledger.database import libpq_url
from ledger.embedded import EmbeddedPostgres
from ledger.integrity import new_chain_key

REPOSITORY = Path(__file__).resolve().parent.parent


async def _admin(url: str, *statements: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


def _with(url: str, *, user: str | None = None, password: str | None = None, database: str | None = None) -> str:
    parts = urlsplit(url)
    user = user or parts.username or "postgres"
    password = password if password is not None else parts.password
    auth = quote(user, safe="") + (f":{quote(password, safe='')}" if password else "")
    netloc = f"{auth}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, "/" + (database or parts.path.lstrip("/")), parts.query, ""))


@contextmanager
def _serve(name: str, environment: dict[str, str], directory: Path) -> Iterator[str]:
    port = free_port()
    log = (directory / f"{name}.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "ledger", "serve", "--port", str(port)],
        env={**os.environ, **environment, "LEDGER_DATA_DIR": str(directory / name)},
        stdout=log, stderr=subprocess.STDOUT, cwd=REPOSITORY,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, directory / f"{name}.log", 60)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def uniform_round(url: str, key: str, clients: int, duration: float, report: Path) -> dict:
    """One closed-loop `python -m loadtest uniform` run against `url`: its JSON report."""
    subprocess.run(
        [sys.executable, "-m", "loadtest", "uniform", "--base-url", url, "--api-key", key,
         "--clients", str(clients), "--duration", str(duration), "--report", str(report)],
        check=True, cwd=REPOSITORY, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return dict(json.loads(report.read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.pooler", description=__doc__.splitlines()[0])
    parser.add_argument("--server-url", default=os.environ.get("LEDGER_TEST_DATABASE_URL"), required=False)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--server-pool", type=int, default=20, help="PgBouncer's default_pool_size")
    parser.add_argument("--report", type=Path)
    arguments = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        if not arguments.server_url:
            # Like the other load tests, on an embedded PostgreSQL of its own (autovacuum
            # on, as in production: on a server with it off, the direct service's cached
            # generic plans, made while the tables were empty, are never replanned and
            # its throughput halves as the tables grow, which says nothing about PgBouncer).
            embedded = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="ledger-pooler-pg-")) / "pg")
            arguments.server_url = embedded.start()
            stack.callback(embedded.stop)
        return _measure(arguments)


def _measure(arguments: argparse.Namespace) -> int:
    server = libpq_url(arguments.server_url)
    name, role, password = (
        f"ledger_pooler_{secrets.token_hex(4)}",
        f"ledger_pooler_{secrets.token_hex(4)}",
        secrets.token_urlsafe(16),
    )
    key = "lk_pooler-" + secrets.token_urlsafe(32)
    owner_url = _with(server, database=name)
    asyncio.run(_admin(server, f'CREATE DATABASE "{name}"'))
    work = Path(tempfile.mkdtemp(prefix="ledger-pooler-"))
    results: dict[str, list[float]] = {"direct": [], "pgbouncer": []}
    try:
        migrate.upgrade(owner_url)
        asyncio.run(_admin(server, f"CREATE ROLE {role} LOGIN PASSWORD '{password}' IN ROLE ledger_service"))
        owner = urlsplit(server)
        bouncer = PgBouncer(
            work / "pgbouncer", upstream_host=owner.hostname or "127.0.0.1", upstream_port=owner.port or 5432,
            database=name, users={role: password}, default_pool_size=arguments.server_pool,
        )  # fmt: skip
        chain_key = new_chain_key()
        common = {
            "LEDGER_MIGRATION_DATABASE_URL": owner_url,
            # One journal: both services seal it with the same key.
            "LEDGER_CHAIN_KEYS": f"{chain_key.id}:{base64.urlsafe_b64encode(chain_key.secret).rstrip(b'=').decode()}",
            "LEDGER_ADMIN_KEY": key,
            "LEDGER_CHECKPOINT_INTERVAL_SECONDS": "0",
            "LEDGER_LOG_LEVEL": "warning",
        }
        direct_env = {**common, "LEDGER_DATABASE_URL": _with(server, user=role, password=password, database=name)}
        with bouncer:
            pooled_env = {**common, "LEDGER_DATABASE_URL": bouncer.url(role), "LEDGER_DATABASE_POOLER": "transaction"}
            with _serve("direct", direct_env, work) as direct, _serve("pgbouncer", pooled_env, work) as pooled:
                urls = {"direct": direct, "pgbouncer": pooled}
                for number in range(arguments.rounds):
                    order = ["direct", "pgbouncer"] if number % 2 == 0 else ["pgbouncer", "direct"]
                    for target in order:
                        rate = float(
                            uniform_round(
                                urls[target], key, arguments.clients, arguments.duration, work / "round.json"
                            )["transfers_per_second"]
                        )
                        results[target].append(rate)
                        print(f"round {number + 1} {target}: {rate:.1f} transfers/s", flush=True)
    finally:
        asyncio.run(_admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f"DROP ROLE IF EXISTS {role}"))
    ratios = [p / d for p, d in zip(results["pgbouncer"], results["direct"], strict=True)]
    summary = {
        "clients": arguments.clients,
        "duration_seconds": arguments.duration,
        "server_pool": arguments.server_pool,
        "direct_transfers_per_second": results["direct"],
        "pgbouncer_transfers_per_second": results["pgbouncer"],
        "ratios": [round(ratio, 3) for ratio in ratios],
        "median_ratio": round(statistics.median(ratios), 3),
    }
    print(json.dumps(summary, indent=2))
    if arguments.report:
        arguments.report.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
