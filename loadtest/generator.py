"""The load generator: scenarios, closed and open loop, a live progress line.

Closed loop: N clients, each sending its next request when the previous one answered.
Open loop: requests are scheduled at a fixed rate, whatever the service does, and each
latency is measured from its scheduled send time, so a stalled service shows up as
latency instead of quietly lowering the offered load (no coordinated omission).

Requests go over keep-alive HTTP/1.1 connections with a minimal client of our own
(`RawHttp`: one pre-built request head, a read of the status line, headers and a
`Content-Length` body), and bodies are encoded by msgspec. The generator shares the
machine with the service and PostgreSQL, so every microsecond it spends is taken from
them: aiohttp cost about 0.15 ms of CPU per request here. HTTPS base URLs go through
aiohttp. The generator reports its own CPU time, so a run can show that it was not the
bottleneck.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import random
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import msgspec

SCENARIOS = ("uniform", "hot", "zipf", "batch", "mixed", "replay")
FUNDING = 1_000_000
BATCH_SIZE = 100


@dataclass
class Stats:
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    codes: Counter = field(default_factory=Counter)
    transfers_acknowledged: dict[str, int] = field(default_factory=dict)
    transfers_submitted: int = 0
    requests: int = 0
    replays_confirmed: int = 0
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (second, completed requests)
    # (second, transfers acknowledged in that second)
    transfers_timeline: list[tuple[float, int]] = field(default_factory=list)
    # (second, p50 ms, p99 ms) of the requests completed in that second; None when none completed
    latency_timeline: list[tuple[float, float | None, float | None]] = field(default_factory=list)


class Workload:
    """What to send next, for one scenario over a fixed set of accounts."""

    def __init__(self, scenario: str, accounts: list[str], house: str, seed: int, run_id: str) -> None:
        self.scenario = scenario
        self.accounts = accounts
        self.house = house
        self.rng = random.Random(seed)
        self.run_id = run_id
        self.counter = itertools.count()
        self.sent: list[dict] = []
        # Zipf(1.1) over the accounts: a few are very hot, most are cold.
        weights = [1 / (rank**1.1) for rank in range(1, len(accounts) + 1)]
        total = sum(weights)
        self.cumulative = list(itertools.accumulate(w / total for w in weights))

    def _pick(self) -> str:
        if self.scenario == "zipf":
            return self.accounts[min(bisect.bisect(self.cumulative, self.rng.random()), len(self.accounts) - 1)]
        return self.rng.choice(self.accounts)

    def _transfer(self) -> dict:
        debit = self._pick()
        credit = self._pick()
        while credit == debit:
            credit = self._pick()
        if self.scenario == "hot":
            # Every transfer touches the house account, as settlement and fee accounts do.
            if self.rng.random() < 0.5:
                debit = self.house
            else:
                credit = self.house
        return {
            "id": f"{self.run_id}-{next(self.counter)}",
            "debit_account_id": debit,
            "credit_account_id": credit,
            "amount": self.rng.randint(1, 100),
        }

    def next_request(self) -> tuple[str, str, Any, list[dict]]:
        """(method, path, JSON body or None, transfers it carries)."""
        if self.scenario == "batch":
            transfers = [self._transfer() for _ in range(BATCH_SIZE)]
            return "POST", "/v1/transfers/batch", {"transfers": transfers}, transfers
        if self.scenario == "mixed" and self.rng.random() < 0.2:
            account = self._pick()
            kind = self.rng.random()
            if kind < 0.5:
                return "GET", f"/v1/accounts/{account}/entries?limit=50", None, []
            if kind < 0.8:
                return "GET", f"/v1/accounts/{account}", None, []
            return "GET", f"/v1/accounts/{account}/balance?as_of=2100-01-01T00:00:00Z", None, []
        if self.scenario == "replay" and self.sent and self.rng.random() < 0.2:
            body = self.rng.choice(self.sent)
            return "POST", "/v1/transfers", body, [body]
        body = self._transfer()
        if self.scenario == "replay" and len(self.sent) < 100_000:
            self.sent.append(body)
        return "POST", "/v1/transfers", body, [body]


class HttpError(Exception):
    """The connection failed or the answer was not HTTP/1.1 as expected."""


class RawHttp:
    """Keep-alive HTTP/1.1 to one host, at most `size` connections at a time."""

    # Servers close idle keep-alive connections (uvicorn after 5 s): older ones are not reused.
    IDLE_SECONDS = 3.0

    def __init__(self, host: str, port: int, headers: dict[str, str], size: int) -> None:
        self.host, self.port = host, port
        self.fixed = "".join(f"{k}: {v}\r\n" for k, v in {"Host": f"{host}:{port}", **headers}.items())
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self.slots = asyncio.Semaphore(size)

    async def request(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes, dict[str, str]]:
        message = f"{method} {path} HTTP/1.1\r\n{self.fixed}Content-Length: {len(body or b'')}\r\n\r\n".encode() + (
            body or b""
        )
        async with self.slots:
            reader, writer, reused = await self._connection()
            try:
                return await self._exchange(reader, writer, message)
            except asyncio.IncompleteReadError as error:
                if not (reused and not error.partial):
                    raise HttpError(str(error)) from error
            # The server had closed this idle connection before reading the request (so
            # it did nothing): send it again on a new one.
            reader, writer = await self._open()
            try:
                return await self._exchange(reader, writer, message)
            except asyncio.IncompleteReadError as error:
                raise HttpError(str(error)) from error

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        now = time.monotonic()
        while self.idle:
            reader, writer, last_used = self.idle.pop()
            if now - last_used < self.IDLE_SECONDS and not reader.at_eof():
                return reader, writer, True
            writer.close()
        reader, writer = await self._open()
        return reader, writer, False

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, message: bytes
    ) -> tuple[int, bytes, dict[str, str]]:
        try:
            writer.write(message)
            raw = await reader.readuntil(b"\r\n\r\n")
            lines = raw.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            if headers.get("transfer-encoding", "").lower() == "chunked":
                content = await self._chunked(reader)
            else:
                content = await reader.readexactly(int(headers.get("content-length", "0")))
        except asyncio.IncompleteReadError:
            writer.close()
            raise
        except (OSError, asyncio.LimitOverrunError, ValueError, IndexError) as error:
            writer.close()
            raise HttpError(str(error)) from error
        if headers.get("connection", "").lower() == "close":
            writer.close()
        else:
            self.idle.append((reader, writer, time.monotonic()))
        return status, content, headers

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.open_connection(self.host, self.port, limit=2**20)
        except OSError as error:
            raise HttpError(str(error)) from error

    @staticmethod
    async def _chunked(reader: asyncio.StreamReader) -> bytes:
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)

    def close(self) -> None:
        for _, writer, _ in self.idle:
            writer.close()
        self.idle.clear()


class Generator:
    def __init__(self, base_url: str, api_key: str | None, connections: int) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.connections = connections
        self.session: aiohttp.ClientSession | None = None
        self.raw: RawHttp | None = None
        self.encoder = msgspec.json.Encoder()

    async def __aenter__(self) -> Generator:
        parts = urlsplit(self.base_url)
        if parts.scheme == "http" and parts.hostname:
            self.raw = RawHttp(parts.hostname, parts.port or 80, self.headers, self.connections)
            return self
        connector = aiohttp.TCPConnector(limit=self.connections, limit_per_host=self.connections)
        self.session = aiohttp.ClientSession(
            connector=connector, headers=self.headers, timeout=aiohttp.ClientTimeout(total=60)
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self.raw is not None:
            self.raw.close()
        if self.session is not None:
            await self.session.close()

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, bytes, dict]:
        data = self.encoder.encode(body) if body is not None else None
        if self.raw is not None:
            async with asyncio.timeout(60):
                return await self.raw.request(method, urlsplit(self.base_url).path.rstrip("/") + path, data)
        assert self.session is not None
        async with self.session.request(method, self.base_url + path, data=data) as response:
            # Header names lower-cased: servers may send either case.
            return response.status, await response.read(), {k.lower(): v for k, v in response.headers.items()}

    async def send(
        self, stats: Stats, method: str, path: str, body: Any, transfers: list[dict], scheduled: float
    ) -> None:
        try:
            status, content, headers = await self.call(method, path, body)
        except (TimeoutError, aiohttp.ClientError, HttpError):
            status, content, headers = 0, b"", {}
        stats.latencies_ms.append((time.perf_counter() - scheduled) * 1000)
        stats.requests += 1
        stats.statuses[status] += 1
        stats.transfers_submitted += len(transfers)
        if status >= 400 and content:
            try:
                stats.codes[msgspec.json.decode(content).get("code", "?")] += 1
            except msgspec.DecodeError:
                stats.codes["?"] += 1
        replayed = headers.get("idempotent-replayed") == "true"
        if replayed:
            stats.replays_confirmed += 1
        if path == "/v1/transfers/batch" and status == 200:
            for result in msgspec.json.decode(content)["results"]:
                transfer = result.get("transfer") or {}
                if transfer.get("status") == "posted":
                    stats.transfers_acknowledged[result["id"]] = transfer["amount"]
                elif result.get("code"):
                    stats.codes[result["code"]] += 1
        elif status == 201 and transfers and not replayed:
            # A replay acknowledges nothing new (its id may come from the warm-up).
            stats.transfers_acknowledged[transfers[0]["id"]] = transfers[0]["amount"]


async def setup_accounts(generator: Generator, run_id: str, count: int) -> tuple[str, list[str]]:
    """A house account that may go negative, and `count` funded customer accounts."""
    house = f"{run_id}-house"
    status, content, _ = await generator.call(
        "POST", "/v1/accounts", {"id": house, "currency": "EUR", "allow_negative_balance": True}
    )
    if status != 201:
        # 401 without a key, 403 with a key that is not an admin's: said here, not later
        # as a funding failure on an account that does not exist.
        raise RuntimeError(f"opening the house account (needs an admin key) failed: {status} {content[:300]!r}")
    accounts = [f"{run_id}-a{i}" for i in range(count)]
    for start in range(0, count, 500):
        chunk = accounts[start : start + 500]
        opened = await asyncio.gather(
            *(generator.call("POST", "/v1/accounts", {"id": a, "currency": "EUR"}) for a in chunk)
        )
        refused = [(status, content) for status, content, _ in opened if status != 201]
        if refused:
            raise RuntimeError(f"opening {len(refused)} accounts failed: {refused[0][0]} {refused[0][1][:300]!r}")
        funding = [
            {"id": f"{a}-funding", "debit_account_id": house, "credit_account_id": a, "amount": FUNDING} for a in chunk
        ]
        status, content, _ = await generator.call("POST", "/v1/transfers/batch", {"transfers": funding})
        if status != 200:
            raise RuntimeError(f"funding failed: {status} {content[:300]!r}")
    return house, accounts


def progress(stats: Stats, started: float, last: list[int]) -> None:
    """Once a second: the timelines and the live line. `last` holds the request and
    acknowledged-transfer counts of the previous tick; latencies_ms has one value per
    request, so the values since the previous tick are exactly that second's, and sorting
    them (about a second's worth of floats) is all the percentiles cost."""
    elapsed = time.perf_counter() - started
    done = stats.requests
    acknowledged = len(stats.transfers_acknowledged)
    rate, transfers = done - last[0], acknowledged - last[1]
    second = sorted(stats.latencies_ms[last[0] : done])
    last[:] = [done, acknowledged]
    p50 = round(second[int(len(second) * 0.50)], 2) if second else None
    p99 = round(second[int(len(second) * 0.99)], 2) if second else None
    # Failed: no answer (0), a 5xx, or "dropped" by the open loop (a str key, not comparable to ints).
    errors = sum(
        count for status, count in stats.statuses.items() if not isinstance(status, int) or status == 0 or status >= 500
    )
    stats.timeline.append((round(elapsed), rate))
    stats.transfers_timeline.append((round(elapsed), transfers))
    stats.latency_timeline.append((round(elapsed), p50, p99))
    print(
        f"\r{elapsed:6.1f}s  {done:8d} requests  {rate:6d}/s  p99 {p99 or 0.0:7.1f} ms  5xx/failed {errors}",
        end="",
        file=sys.stderr,
        flush=True,
    )


async def run_closed(workload: Workload, generator: Generator, clients: int, duration: float) -> Stats:
    stats = Stats()
    deadline = time.perf_counter() + duration

    async def client() -> None:
        while time.perf_counter() < deadline:
            method, path, body, transfers = workload.next_request()
            await generator.send(stats, method, path, body, transfers, time.perf_counter())

    await _with_progress(stats, asyncio.gather(*(client() for _ in range(clients))))
    return stats


async def run_open(
    workload: Workload, generator: Generator, rate: float, duration: float, max_outstanding: int
) -> Stats:
    stats = Stats()
    started = time.perf_counter()
    outstanding: set[asyncio.Task] = set()

    async def schedule() -> None:
        for number in itertools.count():
            scheduled = started + number / rate
            if scheduled - started >= duration:
                break
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(outstanding) >= max_outstanding:
                # The service is this far behind: count the request as failed, keep the schedule.
                stats.statuses["dropped"] += 1
                continue
            method, path, body, transfers = workload.next_request()
            task = asyncio.create_task(generator.send(stats, method, path, body, transfers, scheduled))
            outstanding.add(task)
            task.add_done_callback(outstanding.discard)
        if outstanding:
            await asyncio.gather(*outstanding)

    await _with_progress(stats, schedule())
    return stats


async def _with_progress(stats: Stats, work: Any) -> None:
    started, last = time.perf_counter(), [0, 0]

    async def ticker() -> None:
        while True:
            await asyncio.sleep(1)
            progress(stats, started, last)

    task = asyncio.create_task(ticker())
    try:
        await work
    finally:
        task.cancel()
        print(file=sys.stderr)


def generator_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
