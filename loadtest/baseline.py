"""Same-run baselines on the same PostgreSQL: pgbench running the service's own transfer
SQL, one transfer per transaction, with the same locks, savepoint and writes:

    BEGIN; SELECT ... FOR UPDATE (both accounts, ordered); SAVEPOINT;
    one statement: INSERT transfer, UPDATE both accounts, INSERT both entries;
    RELEASE SAVEPOINT; COMMIT;

The rows are the service's, with stand-ins for what the service computes in Python: a
SHA-256 where it writes an HMAC under the chain key (entries' `hash`, transfers'
`seal`), and the key id `pgbench`. It runs as the tables' owner, in a database of its
own on the same server (`<database>_baseline`) that it creates and migrates. It is what
the service would cost with no HTTP, no Python and no round trip to read the
id first, so a service figure divided by it says how much the rest costs.
`uniform` picks two distinct accounts at random; `hot` puts account 0 on one side of
every transfer, as the `hot` scenario does with its house account.

`bulk` is the set-based ceiling for batches: `:batch` transfers per transaction in one
statement (pick the pairs, lock their accounts in id order, insert the transfers and
their entries with running sequences and balances, update the accounts). It is what
PostgreSQL can do when nothing is decided outside it; a batch request of the service
divided by it says what deciding each transfer in Python, and HTTP, cost.
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
WITH t AS (INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, currency, pending, status, metadata, request_hash, created_at, updated_at, seal, seal_key) VALUES (gen_random_uuid()::text, 'pgb-' || :a, 'pgb-' || :b, :amount, 'EUR', false, 'posted', '{}', sha256('pgbench'::bytea), clock_timestamp(), clock_timestamp(), sha256('seal'::bytea), 'pgbench') RETURNING id), u AS (UPDATE accounts SET debits_posted = debits_posted + CASE WHEN id = 'pgb-' || :a THEN :amount ELSE 0 END, credits_posted = credits_posted + CASE WHEN id = 'pgb-' || :b THEN :amount ELSE 0 END, entries_count = entries_count + 1, last_entry_at = clock_timestamp(), last_entry_hash = sha256(COALESCE(last_entry_hash, ''::bytea) || convert_to(id, 'UTF8')) WHERE id IN ('pgb-' || :a, 'pgb-' || :b) RETURNING id, entries_count, credits_posted - debits_posted AS balance, last_entry_hash) INSERT INTO entries (account_id, sequence, transfer_id, amount, balance_after, created_at, hash, key_id) SELECT u.id, u.entries_count, t.id, CASE WHEN u.id = 'pgb-' || :a THEN -:amount ELSE :amount END, u.balance, clock_timestamp(), u.last_entry_hash, 'pgbench' FROM u, t;
RELEASE SAVEPOINT apply;
COMMIT;
"""

# The pairs are derived from :seed by hashing, so that the lock statement and the write
# statement see the same ones (the write alone would lock in no particular order).
PAIRS = r"""
    SELECT g, 'pgb-' || a AS debit, 'pgb-' || ((a + 1 + k) % :accounts) AS credit, 1 + abs(h) % 100 AS amount
    FROM (SELECT g, h, abs(h) % :accounts AS a, abs(h / 7919) % (:accounts - 1) AS k
          FROM (SELECT g, hashint8(:seed::bigint * 100000 + g) AS h FROM generate_series(1, :batch) AS g) AS x) AS y
"""
BULK = rf"""
\set seed random(0, 1000000000)
BEGIN;
SELECT count(*) FROM (SELECT id FROM accounts
WHERE id IN (SELECT debit FROM ({PAIRS}) AS p1 UNION SELECT credit FROM ({PAIRS}) AS p2) ORDER BY id FOR UPDATE) AS locked;
WITH p AS MATERIALIZED (SELECT *, gen_random_uuid()::text AS id FROM ({PAIRS}) AS pairs
), legs AS (
    SELECT g, id AS transfer_id, debit AS account_id, -amount AS amount FROM p
    UNION ALL
    SELECT g, id, credit, amount FROM p
), numbered AS (
    SELECT legs.*, a.entries_count + row_number() OVER w AS sequence,
           a.credits_posted - a.debits_posted + sum(legs.amount) OVER w AS balance_after
    FROM legs JOIN accounts a ON a.id = legs.account_id
    WINDOW w AS (PARTITION BY legs.account_id ORDER BY legs.g ROWS UNBOUNDED PRECEDING)
), t AS (
    INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, currency, pending, status, metadata, request_hash, created_at, updated_at, seal, seal_key)
    SELECT id, debit, credit, amount, 'EUR', false, 'posted', '{{}}', sha256(convert_to(id, 'UTF8')), clock_timestamp(), clock_timestamp(), sha256(convert_to(id, 'UTF8')), 'pgbench' FROM p
), e AS (
    INSERT INTO entries (account_id, sequence, transfer_id, amount, balance_after, created_at, hash, key_id)
    SELECT account_id, sequence, transfer_id, amount, balance_after, clock_timestamp(), sha256(convert_to(transfer_id, 'UTF8')), 'pgbench' FROM numbered
)
UPDATE accounts
SET debits_posted = debits_posted + s.debits, credits_posted = credits_posted + s.credits,
    entries_count = entries_count + s.n, last_entry_at = clock_timestamp(),
    last_entry_hash = sha256(convert_to(s.account_id, 'UTF8'))
FROM (SELECT account_id, count(*) AS n, sum(CASE WHEN amount < 0 THEN -amount ELSE 0 END) AS debits,
             sum(CASE WHEN amount > 0 THEN amount ELSE 0 END) AS credits
      FROM legs GROUP BY account_id) AS s
WHERE accounts.id = s.account_id;
COMMIT;
"""


async def baseline_database(database_url: str) -> str:
    """A database of its own on the same server, migrated like the service's: pgbench's
    journal lines carry stand-in hashes and seals, which must not mix with the audited
    ledger. `database_url` must be the owner's (or another role that may create databases)."""
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


def pgbench(database_url: str, kind: str, clients: int, duration: float, accounts: int, batch: int = 100) -> float:
    """Transfers per second of the baseline (pgbench's tps, initial connections excluded;
    for `bulk`, times the transfers per transaction)."""
    with tempfile.TemporaryDirectory() as directory:
        script = Path(directory) / f"{kind}.sql"
        script.write_text(BULK if kind == "bulk" else PICK[kind] + TRANSFER)
        result = subprocess.run(
            [
                str(binaries_dir() / "pgbench"), "--no-vacuum", "--client", str(clients), "--jobs", str(min(clients, 2)),
                "--time", str(int(duration)), "--file", str(script), "--define", f"accounts={accounts}", "--define", f"batch={batch}",
                libpq_url(database_url),
            ],
            capture_output=True,
            text=True,
            timeout=duration + 120,
        )  # fmt: skip
    match = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", result.stdout)
    if result.returncode != 0 or match is None:
        raise RuntimeError(f"pgbench failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return float(match.group(1)) * (batch if kind == "bulk" else 1)
