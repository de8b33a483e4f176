"""Fault injection under load: crash the database, cut connections, kill the service, and
check every invariant against what the clients were told.

Each scenario starts its own embedded PostgreSQL (it will be crashed) and its own
`ledger serve`, runs clients that behave like payment services (every transfer has an
id; on a 503, a timeout or a broken connection they retry the same id until they get a
definitive answer), injects one fault while the load runs, lets the clients settle, and
then compares the database with the clients' record:

- lost: acknowledged (201/200) but not stored as posted with its amount: must be 0;
- phantom: stored as posted but never acknowledged: must be 0 (clients settle every id);
- refused but applied: told 4xx, yet stored as posted: must be 0;
- duplicated: a posted transfer without exactly its two journal entries: must be 0;
- money conserved (balances sum to zero), no forbidden negative balance, and the
  service's own audit (`POST /v1/audit/verify`, retried on 503 like any request; the
  report counts those 503s as `audit_503s`) passes;
- no 5xx but 503, every 503 carries `Retry-After` and comes within 5 s, and no request
  hangs past the client's 15 s timeout;
- recovery: seconds from the fault's end (database accepting connections again, or the
  service restarted) to the first acknowledged transfer: at most 10.

    python -m loadtest.faults pg-crash --duration 30       # a long form
    python -m loadtest.faults all --duration 6              # every scenario, short
    python -m loadtest.faults failover --duration 10        # kill the primary of a cluster of its own
    python -m loadtest.faults failover --cluster-dir .ledger-cluster   # ... or of the running `make cluster`

The test suite runs the short forms (`tests/faults/`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import httpx

from ledger import migrate
from ledger.embedded import EmbeddedPostgres
from loadtest.local import free_port, new_admin_key, service_environment

RECOVERY_BOUND_SECONDS = 10.0
# How long a client retries one id before calling it unresolved: longer than the outage.
SETTLE_SECONDS = 120.0
# A 503 must come fast, not after a hang. The bench's pool timeout and lock_timeout are
# both 2 s; a transfer queued behind others for a locked row can wait twice (PostgreSQL
# waits for the row's tuple lock, then for the holder's transaction, each bounded by
# lock_timeout), so 2 x 2 s plus a margin.
MAX_503_SECONDS = 5.0
DEFINITIVE = {200, 201, 404, 409, 422}


# -- the system under test ------------------------------------------------------------


@dataclass
class Bench:
    """An embedded PostgreSQL and a `ledger serve` process, both restartable."""

    postgres: EmbeddedPostgres
    # As the tables' owner (the superuser): for the checks and the injected faults, which
    # the serving role may not do (terminate sessions, lock rows outside the service).
    database_url: str
    port: int
    environment: dict[str, str]
    log_path: Path
    # The service's admin key (LEDGER_ADMIN_KEY): every request needs a key, and opening
    # the bank account, which may go negative, needs an admin's.
    api_key: str
    process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def session(self, timeout: float, limit: int = 100) -> aiohttp.ClientSession:
        """A client session sending the admin key with every request (its POSTs send
        `json=` bodies, as application/json, which the service requires)."""
        return aiohttp.ClientSession(
            headers=self.headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
            connector=aiohttp.TCPConnector(limit=limit),
        )

    def start_service(self, timeout: float = 30.0) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ledger", "serve", "--port", str(self.port)],
                env={**os.environ, **self.environment},
                stdout=log,
                stderr=log,
            )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base_url}/health/live", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.process is not None and self.process.poll() is not None:
                break
            time.sleep(0.05)
        tail = self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
        raise RuntimeError(f"the service did not start within {timeout} s:\n{tail}")

    def signal_service(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait_service_exit(self, timeout: float) -> float:
        """Seconds until the service process exited (raises if it did not in time)."""
        assert self.process is not None
        started = time.monotonic()
        self.process.wait(timeout)
        return time.monotonic() - started

    def stop_service(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def protocol_doubts(self) -> list[str]:
        """Log lines, at any level, that show a connection reused while its protocol state
        was in doubt (asyncpg: "another operation is in progress")."""
        lines = self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []
        return [line for line in lines if "another operation" in line or "cannot switch to state" in line]

    def errors_logged(self) -> list[str]:
        """Error-level lines of the service's JSON log (a 500 logs one)."""
        lines = self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []
        return [line for line in lines if '"level":"error"' in line or '"level": "error"' in line]


@contextmanager
def bench(**settings: str) -> Iterator[Bench]:
    """A fresh embedded PostgreSQL and service; `settings` are extra LEDGER_* variables.
    Restarts of the service (`start_service`) keep the environment, so its chain keys too."""
    with tempfile.TemporaryDirectory(prefix="ledger-faults-") as directory:
        postgres = EmbeddedPostgres(Path(directory) / "pg")
        url = postgres.start()
        migrate.upgrade(url)
        api_key = new_admin_key()
        environment = {
            **service_environment(postgres, Path(directory) / "data", api_key),
            "LEDGER_ACCESS_LOG": "false",
            "LEDGER_LOG_LEVEL": "info",
            "LEDGER_POOL_TIMEOUT_SECONDS": "2",
            **settings,
        }
        instance = Bench(postgres, url, free_port(), environment, Path(directory) / "service.log", api_key)
        try:
            instance.start_service()
            yield instance
        finally:
            instance.stop_service()
            try:
                postgres.stop()
            except Exception:  # already crashed or stopped by a scenario
                pass


# -- clients that retry by id ---------------------------------------------------------


@dataclass
class Record:
    """What the clients were told."""

    acknowledged: dict[str, int] = field(default_factory=dict)  # id -> amount, told applied
    refused: dict[str, str] = field(default_factory=dict)  # id -> problem code, told refused
    unresolved: set[str] = field(default_factory=set)  # no definitive answer by the end
    statuses: Counter[int] = field(default_factory=Counter)  # 0: no response (connection error, timeout)
    unexpected: list[str] = field(default_factory=list)
    acknowledged_at: list[float] = field(default_factory=list)  # monotonic times
    max_503_seconds: float = 0.0
    attempts: int = 0
    replays: int = 0  # answers marked Idempotent-Replayed: the id had an outcome already
    timeouts: int = 0  # attempts that got no answer within the client's 15 s: a hang
    codes_503: Counter[str] = field(default_factory=Counter)

    def first_acknowledgement_after(self, moment: float) -> float | None:
        later = [t for t in self.acknowledged_at if t >= moment]
        return min(later) - moment if later else None


async def settle(http: aiohttp.ClientSession, base_url: str, body: dict, record: Record, give_up_at: float) -> None:
    """POST one transfer until a definitive answer, retrying the same id like a payment
    service would."""
    delay = 0.05
    while time.monotonic() < give_up_at:
        record.attempts += 1
        sent = time.monotonic()
        try:
            async with http.post(f"{base_url}/v1/transfers", json=body) as response:
                status = response.status
                payload = await response.json(content_type=None)
                retry_after = response.headers.get("Retry-After")
                replayed = response.headers.get("Idempotent-Replayed", "").lower() == "true"
        except TimeoutError:
            record.timeouts += 1
            record.statuses[0] += 1
            await asyncio.sleep(delay)
            continue
        except (aiohttp.ClientError, ValueError):
            record.statuses[0] += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
            continue
        record.statuses[status] += 1
        if status in (200, 201) and replayed:
            record.replays += 1
        if status in (200, 201):
            if payload.get("status") == "posted" and payload.get("amount") == body["amount"]:
                record.acknowledged[body["id"]] = body["amount"]
                record.acknowledged_at.append(time.monotonic())
            else:
                record.unexpected.append(f"{body['id']}: {status} with {payload}")
            return
        if status in DEFINITIVE:
            code = payload.get("code", "") if isinstance(payload, dict) else ""
            if status == 409:
                record.unexpected.append(f"{body['id']}: 409 {code} for a retry of the same request")
            record.refused[body["id"]] = code
            return
        if status == 503:
            record.max_503_seconds = max(record.max_503_seconds, time.monotonic() - sent)
            record.codes_503[payload.get("code", "") if isinstance(payload, dict) else ""] += 1
            if not retry_after:
                record.unexpected.append(f"{body['id']}: 503 without Retry-After")
        else:
            record.unexpected.append(f"{body['id']}: {status} {payload}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)
    record.unresolved.add(body["id"])


async def client(
    index: int,
    http: aiohttp.ClientSession,
    base_url: str,
    accounts: list[str],
    prefix: str,
    record: Record,
    stop: asyncio.Event,
    settle_seconds: float,
) -> None:
    rng = random.Random(index)
    number = 0
    while not stop.is_set():
        debit, credit = rng.sample(accounts, 2)
        body = {
            "id": f"{prefix}-c{index}-{number}",
            "debit_account_id": debit,
            "credit_account_id": credit,
            "amount": rng.randint(1, 500),
        }
        number += 1
        # Once stop is set, the id in flight still gets its answer: each id is retried for
        # up to `settle_seconds` (longer than any outage a scenario injects), then counted
        # as unresolved, which fails the scenario.
        await settle(http, base_url, body, record, time.monotonic() + settle_seconds)
        if stop.is_set():
            break


async def open_accounts(bench_: Bench, prefix: str, count: int) -> list[str]:
    """`count` accounts that may not go negative, each funded with 10,000 from a bank
    account that may (so refusals for insufficient funds happen under load too)."""
    async with httpx.AsyncClient(base_url=bench_.base_url, headers=bench_.headers, timeout=30) as http:
        bank = f"{prefix}-bank"
        response = await http.post("/v1/accounts", json={"id": bank, "currency": "EUR", "allow_negative_balance": True})
        response.raise_for_status()
        accounts = []
        for n in range(count):
            account = f"{prefix}-acct-{n}"
            (await http.post("/v1/accounts", json={"id": account, "currency": "EUR"})).raise_for_status()
            funding = {"id": f"{prefix}-fund-{n}", "debit_account_id": bank, "credit_account_id": account,
                       "amount": 10_000}  # fmt: skip
            (await http.post("/v1/transfers", json=funding)).raise_for_status()
            accounts.append(account)
        return accounts


# -- checks ---------------------------------------------------------------------------


async def compare(bench_: Bench, prefix: str, record: Record) -> dict:
    """The database against the clients' record; every count but `checked` must be 0."""
    connection = await asyncpg.connect(bench_.database_url)
    try:
        stored = {
            row["id"]: (row["amount"], row["status"])
            for row in await connection.fetch(
                "SELECT id, amount, status FROM transfers WHERE id LIKE $1 || '-c%'", prefix
            )
        }
        entries = dict(
            await connection.fetch(
                "SELECT transfer_id, count(*) FROM entries WHERE transfer_id LIKE $1 || '-c%' GROUP BY transfer_id",
                prefix,
            )
        )
        total = await connection.fetchval(
            "SELECT COALESCE(sum(credits_posted - debits_posted), 0) FROM accounts WHERE id LIKE $1 || '-%'", prefix
        )
        negative = await connection.fetchval(
            "SELECT count(*) FROM accounts WHERE id LIKE $1 || '-%' AND NOT allow_negative_balance "
            "AND credits_posted - debits_posted - pending_debits < 0",
            prefix,
        )
    finally:
        await connection.close()
    posted = {key for key, (_, status) in stored.items() if status == "posted"}
    lost = [key for key, amount in record.acknowledged.items() if stored.get(key) != (amount, "posted")]
    phantom = [key for key in posted if key not in record.acknowledged and key not in record.unresolved]
    refused_but_applied = [key for key in record.refused if key in posted]
    duplicated = [key for key in posted if entries.get(key) != 2]
    response, audit_503s = await _audit_verify(bench_, record)
    # Any answer but a passing report counts as a problem (a refused key included).
    audit = response.json() if response.status_code == 200 else {}
    audit_examples = audit.get("problems", [])[:3] if audit else [f"HTTP {response.status_code}: {response.text[:300]}"]
    return {
        "checked": len(record.acknowledged) + len(record.refused),
        "lost": len(lost),
        "phantom": len(phantom),
        "refused_but_applied": len(refused_but_applied),
        "duplicated": len(duplicated),
        "unresolved": len(record.unresolved),
        "money_created": int(total),
        "forbidden_negative_balances": int(negative),
        "audit_problems": 0 if audit.get("ok") else max(1, len(audit.get("problems", []))),
        "examples": (lost + phantom + refused_but_applied + duplicated)[:5],
        "audit_examples": [] if audit.get("ok") else audit_examples,
        "audit_503s": audit_503s,
    }


async def _audit_verify(bench_: Bench, record: Record, within: float = 30.0) -> tuple[httpx.Response, int]:
    """`POST /v1/audit/verify`, retried on 503 as a client would, and how many 503s came
    first. The audit pool tests its connections before use, so after a database fault
    this should be 0; the count shows it if not."""
    give_up_at = time.monotonic() + within
    answered_503 = 0
    async with httpx.AsyncClient(base_url=bench_.base_url, headers=bench_.headers, timeout=120) as http:
        while True:
            response = await http.post("/v1/audit/verify", json={})
            if response.status_code != 503 or time.monotonic() > give_up_at:
                return response, answered_503
            answered_503 += 1
            retry_after = response.headers.get("Retry-After")
            if not retry_after:
                record.unexpected.append("audit verification: 503 without Retry-After")
            await asyncio.sleep(float(retry_after or 1))


# -- scenarios ------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """What a fault may need of the running load."""

    http: aiohttp.ClientSession
    accounts: list[str]
    prefix: str


Fault = Callable[[Bench, Record, float, Load], Awaitable[dict]]


async def _wait_database(bench_: Bench, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            connection = await asyncpg.connect(bench_.database_url, timeout=1)
            await connection.close()
            return
        except (TimeoutError, OSError, asyncpg.PostgresError):
            await asyncio.sleep(0.05)
    raise RuntimeError("the database did not come back")


async def pg_crash(bench_: Bench, record: Record, phase: float, load: Load) -> dict:
    """Fault: PostgreSQL immediate shutdown (no checkpoint, as a power loss would), down
    for `phase` seconds, then started again (crash recovery from the WAL). The service is
    not restarted. Pass: the invariants, 503 with Retry-After (not hangs) while it is
    down, the first acknowledged transfer within 10 s of the database accepting
    connections again."""
    await asyncio.to_thread(bench_.postgres.crash)
    await asyncio.sleep(phase)
    await asyncio.to_thread(bench_.postgres.restart)
    await _wait_database(bench_)
    return {"back_at": time.monotonic()}


async def pg_backend_kill(bench_: Bench, record: Record, phase: float, load: Load) -> dict:
    """Fault: SIGKILL of one of the service's database backends; the postmaster then ends
    every session and reinitialises shared memory (a crash restart). Pass: as pg-crash."""
    connection = await asyncpg.connect(bench_.database_url)
    try:
        pids = [r["pid"] for r in await connection.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'ledger' AND pid <> pg_backend_pid()"
        )]  # fmt: skip
    finally:
        await connection.close()
    if not pids:
        raise RuntimeError("the service has no database sessions to kill")
    os.kill(random.choice(pids), signal.SIGKILL)
    await asyncio.sleep(0.5)  # the postmaster notices and restarts
    await _wait_database(bench_)
    return {"back_at": time.monotonic(), "killed_backend": True}


async def pg_terminate(bench_: Bench, record: Record, phase: float, load: Load) -> dict:
    """Fault: `pg_terminate_backend` on every session of the service, every 100 ms for
    `phase` seconds, under load, while reservations of 1 s keep expiring (so the expiry
    sweeper works through the storm too). Pass: the invariants; the pool heals (first
    acknowledgement within 10 s after the last termination); no connection is reused
    while its protocol state is in doubt (no "another operation is in progress" in the
    log, at any level)."""
    terminated = 0
    deadline = time.monotonic() + phase
    connection = await asyncpg.connect(bench_.database_url)
    reserving = asyncio.create_task(_reserve(bench_, load, deadline))
    try:
        while time.monotonic() < deadline:
            terminated += await connection.fetchval(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'ledger' AND pid <> pg_backend_pid()) AS t"
            )
            await asyncio.sleep(0.1)
    finally:
        await connection.close()
        reservations = await reserving
    return {"back_at": time.monotonic(), "sessions_terminated": terminated, "reservations": reservations}


async def _reserve(bench_: Bench, load: Load, until: float) -> int:
    """Reservations of 1 unit that expire after 1 s, every 20 ms until `until`: whatever
    the answers (503s included), some expire while sessions are being terminated."""
    made = 0
    async with bench_.session(timeout=15) as http:
        while time.monotonic() < until:
            body = {"id": f"{load.prefix}-hold-{made}", "debit_account_id": load.accounts[0],
                    "credit_account_id": load.accounts[1], "amount": 1, "pending": True, "timeout_seconds": 1}  # fmt: skip
            made += 1
            try:
                async with http.post(f"{bench_.base_url}/v1/transfers", json=body) as response:
                    await response.read()
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.02)
    return made


async def stuck_lock(bench_: Bench, record: Record, phase: float, load: Load) -> dict:
    """Fault: a transaction outside the service holds one account's row (`SELECT ... FOR
    UPDATE`) for `phase` seconds (at least 3, longer than `lock_timeout`) under load.
    Pass: the invariants; transfers touching it answer 503 `lock_timeout` with
    Retry-After after `lock_timeout` (2 s; up to twice that when queued behind other
    waiters for the row), never hang; transfers between other accounts, sent every 100 ms while the lock is
    held (the retrying clients soon all wait on the locked account), are each
    acknowledged within 1 s; after the release everything settles."""
    holder = await asyncpg.connect(bench_.database_url)
    probes: list[float] = []
    try:
        await holder.execute("BEGIN")
        await holder.execute("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE", load.accounts[0])
        deadline = time.monotonic() + max(phase, 3.0)
        async with bench_.session(timeout=15) as http:
            number = 0
            while time.monotonic() < deadline:
                debit, credit = random.sample(load.accounts[1:], 2)
                body = {"id": f"{load.prefix}-cprobe-{number}", "debit_account_id": debit,
                        "credit_account_id": credit, "amount": 1}  # fmt: skip
                number += 1
                sent = time.monotonic()
                await settle(http, bench_.base_url, body, record, sent + 10)
                if body["id"] in record.acknowledged:
                    probes.append(time.monotonic() - sent)
                await asyncio.sleep(0.1)
        await holder.execute("ROLLBACK")
    finally:
        await holder.close()
    return {
        "back_at": time.monotonic(),
        "probes_sent": number,
        "probes_acknowledged": len(probes),
        "slowest_probe_seconds": round(max(probes, default=0.0), 3),
    }


async def service_kill(bench_: Bench, record: Record, phase: float, load: Load) -> dict:
    """Fault: SIGKILL of the service mid-load (requests in flight lose their answers),
    restarted after `phase` seconds. Pass: clients' retries by id end with every transfer
    applied exactly once; the first acknowledgement within 10 s of the restart."""
    bench_.signal_service(signal.SIGKILL)
    await asyncio.to_thread(bench_.wait_service_exit, 10)
    await asyncio.sleep(phase)
    await asyncio.to_thread(bench_.start_service)
    return {"back_at": time.monotonic()}


async def service_term(bench_: Bench, record: Record, phase: float, load: Load) -> dict:
    """Fault: SIGTERM mid-load (a deploy). Pass: the process exits within 10 s; requests
    already accepted complete with their answers (no retry finds its id already applied:
    0 replays), new ones are refused (connection errors, retried by id); nothing is lost
    or doubled, and after a restart clients carry on."""
    bench_.signal_service(signal.SIGTERM)
    exit_seconds = await asyncio.to_thread(bench_.wait_service_exit, 10)
    await asyncio.sleep(phase)
    await asyncio.to_thread(bench_.start_service)
    return {"back_at": time.monotonic(), "exit_seconds": round(exit_seconds, 2)}


async def _send_and_hang_up(bench_: Bench, body: bytes, after: float) -> None:
    """Send a complete request, then close the socket `after` seconds later, whatever
    state the server is in (before, during or after the transaction)."""
    host, port = bench_.base_url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    # With the key: without it the service would refuse the request before any transaction.
    head = (
        f"POST /v1/transfers HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {bench_.api_key}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()
    await asyncio.sleep(after)
    writer.transport.abort()  # a reset, not a polite close


async def client_disconnects(bench_: Bench, record: Record, phase: float, load: Load) -> dict:
    """Fault: clients that hang up mid-request (0 to 20 ms after sending, so before,
    during and after the transaction commits), 8 at a time for `phase` seconds; then
    each of those ids is retried by id until it has an answer. Pass: the invariants (the
    outcome is applied once or not at all, never half, and the retry says which)."""
    rng = random.Random(7)
    bodies = []
    deadline = time.monotonic() + phase
    number = 0
    while time.monotonic() < deadline:
        wave = []
        for _ in range(8):
            debit, credit = rng.sample(load.accounts, 2)
            body = {"id": f"{load.prefix}-cd-{number}", "debit_account_id": debit, "credit_account_id": credit,
                    "amount": rng.randint(1, 500)}  # fmt: skip
            number += 1
            bodies.append(body)
            wave.append(_send_and_hang_up(bench_, json.dumps(body).encode(), rng.uniform(0, 0.02)))
        await asyncio.gather(*wave, return_exceptions=True)
        await asyncio.sleep(0.02)
    give_up_at = time.monotonic() + 120
    pending = iter(bodies)

    # Their own connections: the load's are all busy with the running clients.
    async with bench_.session(timeout=15) as http:

        async def retry_by_id() -> None:
            for body in pending:
                await settle(http, bench_.base_url, body, record, give_up_at)

        await asyncio.gather(*(retry_by_id() for _ in range(4)))
    return {"back_at": time.monotonic() - 0.001, "hung_up_requests": len(bodies)}


# -- failover, on the scaled-out deployment (ledger.cluster.stack) -----------------------


@dataclass
class ClusterBench:
    """`make cluster`'s deployment in a directory of its own: a primary and a synchronous
    standby, PgBouncer, two instances, HAProxy. Offers what the scenarios use of a
    `Bench`; `database_url` is always the current primary's (the standby's after a
    failover), as its owner."""

    directory: Path
    base_url: str
    api_key: str

    @property
    def state(self) -> dict:
        from ledger.cluster import stack

        return stack.read_state(self.directory) or {}

    @property
    def database_url(self) -> str:
        primary = EmbeddedPostgres(Path(self.state["primary"]["data_dir"]))
        primary.port = self.state["primary"]["port"]
        return primary.url

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def session(self, timeout: float, limit: int = 100) -> aiohttp.ClientSession:
        return Bench.session(self, timeout, limit)  # type: ignore[arg-type]

    def _log_lines(self) -> list[str]:
        lines: list[str] = []
        for log in sorted(self.directory.glob("instance-*/service.log")):
            lines += log.read_text(errors="replace").splitlines()
        return lines

    def protocol_doubts(self) -> list[str]:
        return [line for line in self._log_lines() if "another operation" in line or "cannot switch to state" in line]

    def errors_logged(self) -> list[str]:
        return [line for line in self._log_lines() if '"level":"error"' in line or '"level": "error"' in line]


@contextmanager
def cluster_bench(instances: int = 2, existing: Path | None = None) -> Iterator[ClusterBench]:
    """A cluster of its own, or the running one in `existing` (e.g. `make cluster`'s
    `.ledger-cluster`, left running after the scenario, failed over)."""
    from ledger.cluster import stack

    if existing is not None:
        state = stack.read_state(existing) or {}
        if state.get("status") != "ready" or not state.get("standby"):
            raise SystemExit(f"no cluster with a standby is running from {existing} (make cluster starts one)")
        key_file = Path(state["admin_key_file"])
        api_key = key_file.read_text().strip() if key_file.exists() else os.environ.get("LEDGER_ADMIN_KEY", "")
        yield ClusterBench(existing.resolve(), state["base_url"], api_key)
        return
    with tempfile.TemporaryDirectory(prefix="ledger-failover-") as directory:
        try:
            state = stack.up(Path(directory), instances, free_port())
            api_key = Path(state["admin_key_file"]).read_text().strip()
            yield ClusterBench(Path(directory), state["base_url"], api_key)
        finally:
            stack.down(Path(directory))


async def failover(bench_: ClusterBench, record: Record, phase: float, load: Load) -> dict:
    """Fault: the primary dies (`kill -9` of its postmaster: no shutdown, no last WAL
    flush) while clients post through HAProxy and PgBouncer. The cluster's supervisor
    promotes the synchronous standby and points PgBouncer at it. Pass: the invariants,
    checked on the promoted server (every acknowledged transfer there once: it was on
    the standby before the client was told), its journal sequences gap-free and its hash
    chains verified; the first acknowledgement within 10 s of the kill (reported as
    `recovery_seconds`, from the kill, so detection and promotion count); auditors'
    reads served by the standby before the fault."""
    async with httpx.AsyncClient(base_url=bench_.base_url, headers=bench_.headers, timeout=30) as http:
        read = await http.get(f"/v1/accounts/{load.accounts[0]}/entries")
        read_source = read.headers.get("Ledger-Read-Source")
    state = bench_.state
    old_primary = Path(state["primary"]["data_dir"])
    pid = int((old_primary / "pgdata" / "postmaster.pid").read_text().split()[0])
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not bench_.state.get("failovers"):
        if time.monotonic() > deadline:
            raise RuntimeError("the cluster did not fail over within 30 s")
        await asyncio.sleep(0.05)
    promoted = bench_.state["failovers"][-1]
    return {
        "back_at": killed_at,
        "failover_seconds": promoted["seconds"],
        "promote_seconds": promoted["promote_seconds"],
        "detected_and_promoted_within_seconds": round(time.monotonic() - killed_at, 3),
        "audit_read_source_before_fault": read_source,
        "new_primary": bench_.state["primary"]["data_dir"],
    }


async def journal_gaps(database_url: str, prefix: str) -> int:
    """Accounts whose journal is not exactly sequences 1..entries_count."""
    connection = await asyncpg.connect(database_url)
    try:
        return int(
            await connection.fetchval(
                """
                SELECT count(*) FROM accounts a
                LEFT JOIN (SELECT account_id, count(*) AS n, min(sequence) AS lo, max(sequence) AS hi
                           FROM entries GROUP BY account_id) e ON e.account_id = a.id
                WHERE a.id LIKE $1 || '-%'
                  AND (COALESCE(e.n, 0) <> a.entries_count OR COALESCE(e.hi, 0) <> a.entries_count
                       OR COALESCE(e.lo, 1) <> 1)
                """,
                prefix,
            )
        )
    finally:
        await connection.close()


SCENARIOS: dict[str, Fault] = {
    "pg-crash": pg_crash,
    "pg-backend-kill": pg_backend_kill,
    "pg-terminate": pg_terminate,
    "service-kill": service_kill,
    "service-term": service_term,
    "stuck-lock": stuck_lock,
    "client-disconnect": client_disconnects,
}


async def run_scenario(name: str, bench_: Bench, *, clients: int = 8, phase: float = 2.0) -> dict:
    """Load for `phase` s, the fault, load for `phase` s after recovery, settle, compare."""
    prefix = f"f{secrets.token_hex(3)}"
    accounts = await open_accounts(bench_, prefix, 10)
    settle_seconds = max(SETTLE_SECONDS, 4 * phase)
    record = Record()
    stop = asyncio.Event()
    async with bench_.session(timeout=15, limit=clients) as http:
        tasks = [
            asyncio.create_task(client(i, http, bench_.base_url, accounts, prefix, record, stop, settle_seconds))
            for i in range(clients)
        ]
        await asyncio.sleep(phase)
        acknowledged_before = len(record.acknowledged)
        fault = await ALL_SCENARIOS[name](bench_, record, phase, Load(http, accounts, prefix))
        await asyncio.sleep(phase)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=settle_seconds + 30)
    back_at = fault.pop("back_at")
    recovery = record.first_acknowledgement_after(back_at)
    if name == "failover":
        # What clients lived through: the longest stretch without any acknowledgement,
        # from the kill until the load ended (requests in flight at the kill may still be
        # acknowledged at once, so the first acknowledgement alone says little).
        times = sorted(t for t in record.acknowledged_at if t >= back_at)
        fault["longest_pause_seconds"] = round(
            max((b - a for a, b in zip([back_at, *times], times, strict=False)), default=0.0), 3
        )
    comparison = await compare(bench_, prefix, record)
    if name == "failover":
        comparison["journal_gaps"] = await journal_gaps(bench_.database_url, prefix)
    server_errors = {status: n for status, n in record.statuses.items() if status >= 500 and status != 503}
    report = {
        "scenario": name,
        "clients": clients,
        "phase_seconds": phase,
        "acknowledged": len(record.acknowledged),
        "acknowledged_before_fault": acknowledged_before,
        "refused": len(record.refused),
        "attempts": record.attempts,
        "replays": record.replays,
        "statuses": {str(k): v for k, v in sorted(record.statuses.items())},
        "server_errors": server_errors,
        "unexpected": record.unexpected[:10],
        "longest_503_seconds": round(record.max_503_seconds, 3),
        "timeouts": record.timeouts,
        "codes_503": dict(record.codes_503),
        "recovery_seconds": round(recovery, 3) if recovery is not None else None,
        "errors_logged": len(bench_.errors_logged()),
        "protocol_doubts": bench_.protocol_doubts()[:3],
        "error_examples": [line[-1500:] for line in bench_.errors_logged()[:2]],
        **fault,
        **comparison,
    }
    report["passed"] = not failures(report)
    return report


# Scenarios on the scaled-out deployment (`cluster_bench`), not on a single service.
CLUSTER_SCENARIOS: dict[str, Fault] = {"failover": failover}  # type: ignore[dict-item]
ALL_SCENARIOS = {**SCENARIOS, **CLUSTER_SCENARIOS}


INVARIANTS = (
    "lost", "phantom", "refused_but_applied", "duplicated", "unresolved", "money_created",
    "forbidden_negative_balances", "audit_problems",
)  # fmt: skip


def failures(report: dict) -> list[str]:
    """Why a scenario's report fails its pass figures (empty when it passes)."""
    problems = [f"{key} = {report[key]}" for key in INVARIANTS if report[key]]
    if report["server_errors"]:
        problems.append(f"5xx other than 503: {report['server_errors']}")
    if report["unexpected"]:
        problems.append(f"unexpected answers: {report['unexpected'][:3]}")
    if report["timeouts"]:
        problems.append(f"{report['timeouts']} requests hung past the client's timeout")
    if report["longest_503_seconds"] > MAX_503_SECONDS:
        problems.append(f"a 503 took {report['longest_503_seconds']} s (bound {MAX_503_SECONDS})")
    if report["recovery_seconds"] is None or report["recovery_seconds"] > RECOVERY_BOUND_SECONDS:
        problems.append(f"recovery took {report['recovery_seconds']} s (bound {RECOVERY_BOUND_SECONDS})")
    if report.get("protocol_doubts"):
        problems.append(f"a connection was reused while its protocol state was in doubt: {report['protocol_doubts']}")
    if report["acknowledged_before_fault"] == 0:
        problems.append("no transfer was acknowledged before the fault: the load did not run")
    if report.get("exit_seconds", 0) > 10:
        problems.append(f"graceful stop took {report['exit_seconds']} s")
    if report["scenario"] == "stuck-lock" and (
        report["probes_acknowledged"] != report["probes_sent"]
        or report["slowest_probe_seconds"] > 1.0
        or set(report["codes_503"]) != {"lock_timeout"}
    ):
        problems.append(
            f"stuck lock: {report['probes_acknowledged']} of {report['probes_sent']} other transfers acknowledged "
            f"(slowest {report['slowest_probe_seconds']} s), 503 codes {report['codes_503']}"
        )
    if report["scenario"] == "failover" and (
        report["journal_gaps"] or report["audit_read_source_before_fault"] != "replica"
    ):
        problems.append(
            f"failover: {report['journal_gaps']} journals with gaps on the promoted server, auditors' read served "
            f"by {report['audit_read_source_before_fault']!r} before the fault (expected the replica)"
        )
    if report["scenario"] == "service-term" and report["replays"]:
        # A replay on retry means a request was applied but its answer never arrived: a
        # graceful stop must finish the requests it accepted, answers included.
        problems.append(f"{report['replays']} requests were applied without their answer reaching the client")
    return problems


OVERLOAD_SETTINGS = {
    "LEDGER_POOL_SIZE": "2",
    "LEDGER_MAX_OVERFLOW": "0",
    "LEDGER_POOL_TIMEOUT_SECONDS": "0.5",
    # Long enough that the two blocked transfers hold their connections all along.
    "LEDGER_LOCK_TIMEOUT_MS": "60000",
    "LEDGER_STATEMENT_TIMEOUT_MS": "70000",
}


async def overload(bench_: Bench, *, requests: int = 2000, concurrency: int = 64) -> dict:
    """Fault: overload. Run with `bench(**OVERLOAD_SETTINGS)`: a pool of 2 connections,
    no overflow, a pool timeout of 0.5 s. Both connections are held by transfers waiting
    for an account locked outside the service, while `concurrency` clients send
    `requests` transfers between other accounts. Pass: each of those is answered 503
    `overloaded` with Retry-After within pool timeout + 1 s (nothing queues without
    bound), the service's memory grows by less than 50 MB, and once the lock is gone
    every id, retried, is applied exactly once (the usual invariants)."""
    import psutil

    prefix = f"o{secrets.token_hex(3)}"
    accounts = await open_accounts(bench_, prefix, 10)
    locked, others = accounts[0], accounts[1:]
    record = Record()
    process = psutil.Process(bench_.process.pid if bench_.process else 0)
    holder = await asyncpg.connect(bench_.database_url)
    latencies: list[float] = []
    codes: Counter[str] = Counter()
    try:
        await holder.execute("BEGIN")
        await holder.execute("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE", locked)
        async with bench_.session(timeout=30, limit=0) as http:
            blocked = []
            for n in range(2):
                body = {"id": f"{prefix}-c-blocked-{n}", "debit_account_id": locked, "credit_account_id": others[n],
                        "amount": 1}  # fmt: skip
                blocked.append(asyncio.create_task(settle(http, bench_.base_url, body, record, time.monotonic() + 60)))
            await asyncio.sleep(0.5)  # both hold a pooled connection now, waiting for the lock
            rss_before = process.memory_info().rss
            rng = random.Random(3)
            bodies = []
            for n in range(requests):
                debit, credit = rng.sample(others, 2)
                bodies.append({"id": f"{prefix}-c-{n}", "debit_account_id": debit, "credit_account_id": credit,
                               "amount": rng.randint(1, 50)})  # fmt: skip
            queue = iter(bodies)

            async def fire() -> None:
                for body in queue:
                    sent = time.monotonic()
                    async with http.post(f"{bench_.base_url}/v1/transfers", json=body) as response:
                        payload = await response.json(content_type=None)
                        latencies.append(time.monotonic() - sent)
                        codes[f"{response.status} {payload.get('code', '')}".strip()] += 1
                        if response.status == 503 and not response.headers.get("Retry-After"):
                            record.unexpected.append("503 without Retry-After")

            await asyncio.gather(*(fire() for _ in range(concurrency)))
            rss_after = process.memory_info().rss
            blocked_done_early = sum(task.done() for task in blocked)
            await holder.execute("ROLLBACK")
            await asyncio.gather(*blocked)
            give_up_at = time.monotonic() + 120
            await asyncio.gather(*(settle(http, bench_.base_url, body, record, give_up_at) for body in bodies))
    finally:
        await holder.close()
    comparison = await compare(bench_, prefix, record)
    return {
        "scenario": "overload",
        "requests": requests,
        "concurrency": concurrency,
        "answers_while_overloaded": dict(codes),
        "slowest_answer_seconds": round(max(latencies), 3),
        "rss_growth_mb": round((rss_after - rss_before) / 2**20, 1),
        "blocked_requests_finished_before_release": blocked_done_early,
        "unexpected": record.unexpected[:5],
        **comparison,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.faults", description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=[*ALL_SCENARIOS, "overload", "all"])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load before and after the fault")
    parser.add_argument("--report", type=Path)
    parser.add_argument(
        "--cluster-dir",
        type=Path,
        help="failover: use the cluster running from this directory (make cluster: .ledger-cluster) instead of one "
        "of its own; it is left running, failed over",
    )
    arguments = parser.parse_args(argv)
    names = [*ALL_SCENARIOS, "overload"] if arguments.scenario == "all" else [arguments.scenario]
    reports = []
    for name in names:
        if name == "overload":
            with bench(**OVERLOAD_SETTINGS) as instance:
                report = asyncio.run(overload(instance, requests=int(200 * arguments.duration)))
            report["passed"] = (
                set(report["answers_while_overloaded"]) == {"503 overloaded"}
                and report["slowest_answer_seconds"] <= 1.5
                and report["rss_growth_mb"] < 50
                and not report["unexpected"]
                and all(report[key] == 0 for key in INVARIANTS)
            )
            reports.append(report)
            print(f"overload: {report['answers_while_overloaded']}, passed={report['passed']}", file=sys.stderr)
            continue
        with cluster_bench(existing=arguments.cluster_dir) if name in CLUSTER_SCENARIOS else bench() as instance:
            report = asyncio.run(run_scenario(name, instance, clients=arguments.clients, phase=arguments.duration))
        reports.append(report)
        verdict = "passed" if report["passed"] else "FAILED: " + "; ".join(failures(report))
        print(f"{name}: {report['acknowledged']} acknowledged, recovery {report['recovery_seconds']} s, {verdict}",
              file=sys.stderr)  # fmt: skip
    text = json.dumps(reports, indent=2)
    print(text)
    if arguments.report:
        arguments.report.write_text(text)
    return 0 if all(r["passed"] for r in reports) else 1


if __name__ == "__main__":
    raise SystemExit(main())
