"""Same-run baselines on the same PostgreSQL: pgbench running the service's own transfer
SQL, one transfer per transaction, with the same locks, savepoint and writes:

    BEGIN; SELECT ... FOR UPDATE (both accounts, ordered); SAVEPOINT;
    one statement: INSERT transfer, UPDATE both accounts, INSERT both entries;
    RELEASE SAVEPOINT; COMMIT;

It runs in a database of its own on the same server (`<database>_baseline`). It is what
the service would cost with no HTTP, no Python and no round trip to read the
id first, so a service figure divided by it says how much the rest costs.
`uniform` picks two distinct accounts at random; `hot` puts account 0 on one side of
every transfer, as the `hot` scenario does with its house account.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from ledger import migrate
from ledger.database import libpq_url
from ledger.embedded import binaries_dir

PICK = {
    "uniform": r"""
\set a random(0, :accounts - 1)
\set b random(0, :accounts - 2)
\set b case when :b >= :a then :b + 1 else :b end
""",
    "hot": r"""
\set other random(1, :accounts - 1)
\set flip random(0, 1)
\set a case when :flip = 1 then 0 else :other end
\set b case when :flip = 1 then :other else 0 end
""",
}

TRANSFER = r"""
\set amount random(1, 100)
BEGIN;
SELECT id, debits_posted, credits_posted, entries_count, last_entry_hash FROM accounts
WHERE id IN ('pgb-' || :a, 'pgb-' || :b) ORDER BY id FOR UPDATE;
SAVEPOINT apply;
WITH t AS (INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, currency, pending, status, metadata, request_hash, created_at, updated_at) VALUES (gen_random_uuid()::text, 'pgb-' || :a, 'pgb-' || :b, :amount, 'EUR', false, 'posted', '{}', sha256('pgbench'::bytea), clock_timestamp(), clock_timestamp()) RETURNING id), u AS (UPDATE accounts SET debits_posted = debits_posted + CASE WHEN id = 'pgb-' || :a THEN :amount ELSE 0 END, credits_posted = credits_posted + CASE WHEN id = 'pgb-' || :b THEN :amount ELSE 0 END, entries_count = entries_count + 1, last_entry_at = clock_timestamp(), last_entry_hash = sha256(COALESCE(last_entry_hash, ''::bytea) || convert_to(id, 'UTF8')) WHERE id IN ('pgb-' || :a, 'pgb-' || :b) RETURNING id, entries_count, credits_posted - debits_posted AS balance, last_entry_hash) INSERT INTO entries (account_id, sequence, transfer_id, amount, balance_after, created_at, hash) SELECT u.id, u.entries_count, t.id, CASE WHEN u.id = 'pgb-' || :a THEN -:amount ELSE :amount END, u.balance, clock_timestamp(), u.last_entry_hash FROM u, t;
RELEASE SAVEPOINT apply;
COMMIT;
"""


async def baseline_database(database_url: str) -> str:
    """A database of its own on the same server, migrated like the service's: pgbench's
    journal lines carry stand-in hashes, which must not mix with the audited ledger."""
    parts = urlsplit(libpq_url(database_url))
    name = f"{parts.path.lstrip('/') or 'postgres'}_baseline"
    connection = await asyncpg.connect(libpq_url(database_url))
    try:
        if not await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    url = urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))
    await asyncio.to_thread(migrate.upgrade, url)
    return url


async def create_accounts(database_url: str, count: int) -> None:
    connection = await asyncpg.connect(libpq_url(database_url))
    try:
        await connection.execute(
            "INSERT INTO accounts (id, currency, allow_negative_balance) "
            "SELECT 'pgb-' || n, 'EUR', true FROM generate_series(0, $1 - 1) AS n ON CONFLICT DO NOTHING",
            count,
        )
    finally:
        await connection.close()


def pgbench(database_url: str, kind: str, clients: int, duration: float, accounts: int) -> float:
    """Transfers per second of the baseline (pgbench's tps, initial connections excluded)."""
    with tempfile.TemporaryDirectory() as directory:
        script = Path(directory) / f"{kind}.sql"
        script.write_text(PICK[kind] + TRANSFER)
        result = subprocess.run(
            [
                str(binaries_dir() / "pgbench"), "--no-vacuum", "--client", str(clients), "--jobs", str(min(clients, 2)),
                "--time", str(int(duration)), "--file", str(script), "--define", f"accounts={accounts}",
                libpq_url(database_url),
            ],
            capture_output=True,
            text=True,
            timeout=duration + 120,
        )  # fmt: skip
    match = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", result.stdout)
    if result.returncode != 0 or match is None:
        raise RuntimeError(f"pgbench failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return float(match.group(1))
