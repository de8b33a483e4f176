"""Webhooks against real HTTP receivers and a real `ledger serve` on its own database.

- A receiver that fails a third of deliveries (500), times some out and goes away for
  seconds still receives every event, each with a valid signature and the same
  `Ledger-Event-Id` and body on every retry.
- The service killed with SIGKILL while deliveries are in flight loses none: a
  restarted service delivers them when their lease ends.
- A receiver that never answers makes its subscription `failing` after the retry
  horizon, visible in `GET /v1/webhooks`, in its delivery history and in /metrics.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from ledger.client.webhooks import verify_signature
from ledger.cluster.stack import wait_ready
from tests import provision
from tests.conftest import REPOSITORY, free_port

pytestmark = pytest.mark.slow


class Receiver:
    """A webhook receiver on loopback (a raw asyncio HTTP/1.1 server) whose behaviour the
    test scripts: fail a share of requests, answer some too late, stall, go away."""

    def __init__(self, secret: str = "") -> None:
        self.secret = secret
        self.port = free_port()
        self.fail_share = 0.0
        self.slow_share = 0.0
        self.stall = asyncio.Event()
        self.stall.set()  # set: answer; cleared: hold every request until set
        self.received: dict[str, list[bytes]] = defaultdict(list)  # event id -> bodies (every attempt)
        self.acknowledged: set[str] = set()
        self.bad_signatures: list[str] = []
        self.in_flight = 0
        # Bumped when the sender died: answers to requests held from before go nowhere.
        self.epoch = 0
        self._connections: set[asyncio.StreamWriter] = set()
        self._server: asyncio.AbstractServer | None = None
        self._rng = random.Random(7)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/ledger"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def stop(self) -> None:
        """Go away: the port refuses connections until `start`."""
        assert self._server is not None
        self._server.close()
        for writer in list(self._connections):
            writer.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {
                    k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                event_id = headers.get("ledger-event-id", "")
                epoch = self.epoch
                self.in_flight += 1
                try:
                    await self.stall.wait()
                finally:
                    self.in_flight -= 1
                if epoch != self.epoch:
                    return  # its sender is gone: no acknowledgement reached it
                try:
                    verify_signature(self.secret, body, headers.get("ledger-signature", ""))
                except Exception as error:
                    self.bad_signatures.append(f"{event_id}: {error}")
                self.received[event_id].append(body)
                roll = self._rng.random()
                if roll < self.fail_share:
                    status = 500
                elif roll < self.fail_share + self.slow_share:
                    await asyncio.sleep(2.5)  # past the service's 1 s timeout
                    status = 200
                else:
                    status = 204 if roll > 0.9 else 200
                if status < 300 and roll >= self.fail_share + self.slow_share:
                    self.acknowledged.add(event_id)
                writer.write(f"HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n".encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, asyncio.CancelledError):
            pass  # the sender closed the connection, or the test is over
        finally:
            self._connections.discard(writer)
            writer.close()


@pytest.fixture
def fresh_database(postgres_server_url: str, service_login: tuple[str, str]) -> Iterator[tuple[str, str]]:
    url = provision.create_database(postgres_server_url, prefix="ledger_webhooks")
    yield url, provision.as_role(url, *service_login)
    provision.drop_database(postgres_server_url, url)


class Service:
    """`ledger serve` on the fresh database, which the test may kill and start again."""

    def __init__(self, directory: Path, database: tuple[str, str], **settings: str) -> None:
        owner_url, service_url = database
        self.directory = directory
        self.environment = {
            **os.environ,
            "LEDGER_DATABASE_URL": service_url,
            "LEDGER_MIGRATION_DATABASE_URL": owner_url,
            "LEDGER_CHAIN_KEYS": provision.CHAIN_KEYS,
            "LEDGER_ADMIN_KEY": provision.ADMIN_KEY,
            "LEDGER_DATA_DIR": str(directory / "data"),
            "LEDGER_LOG_LEVEL": "info",
            "LEDGER_CHECKPOINT_INTERVAL_SECONDS": "0",
            "LEDGER_WEBHOOK_TIMEOUT_SECONDS": "1",
            "LEDGER_WEBHOOK_BACKOFF_BASE_SECONDS": "0.2",
            "LEDGER_WEBHOOK_BACKOFF_MAX_SECONDS": "1",
            **settings,
        }
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.runs = 0

    def start(self) -> None:
        self.runs += 1
        self.directory.mkdir(parents=True, exist_ok=True)
        log_path = self.directory / f"server-{self.runs}.log"
        with log_path.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ledger", "serve", "--port", str(self.port)],
                env=self.environment,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPOSITORY,
            )
        try:
            wait_ready(self.base_url, self.process, log_path, 60)
        except RuntimeError as error:
            pytest.fail(str(error))

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def logs(self) -> str:
        return "".join(path.read_text() for path in sorted(self.directory.glob("server-*.log")))


async def post_transfers(http: httpx.AsyncClient, prefix: str, count: int, writers: int = 8) -> None:
    async def one_writer(n: int) -> None:
        for i in range(n, count, writers):
            body = {
                "id": f"{prefix}-{i}",
                "debit_account_id": "bank",
                "credit_account_id": f"c{i % 5}",
                "amount": 1 + i,
            }
            if i % 7 == 3:
                # Refused (insufficient funds): a transfer.rejected event.
                body.update(debit_account_id=f"c{i % 5}", credit_account_id="bank", amount=10**15)
            response = await http.post("/v1/transfers", json=body)
            assert response.status_code in (201, 422), response.text

    await asyncio.gather(*(one_writer(n) for n in range(writers)))


async def feed_ids(http: httpx.AsyncClient, after: str) -> list[str]:
    ids, cursor = [], after
    while True:
        page = (await http.get("/v1/events", params={"after": cursor, "limit": 1000})).json()
        if not page["data"]:
            return ids
        ids += [event["id"] for event in page["data"]]
        cursor = page["next_cursor"]


async def until(condition: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {seconds} s: {what}")
        await asyncio.sleep(0.1)


def test_every_event_reaches_a_flaky_receiver_signed_even_across_a_sigkill(
    fresh_database: tuple[str, str], tmp_path: Path
) -> None:
    service = Service(tmp_path / "service", fresh_database)
    service.start()
    try:
        asyncio.run(_flaky_receiver_and_sigkill(service, fresh_database[0]))
    finally:
        service.stop()
    assert "Traceback" not in service.logs(), service.logs()[-4000:]


async def _flaky_receiver_and_sigkill(service: Service, owner_url: str) -> None:
    headers = dict(provision.API_HEADERS)
    receiver = Receiver()
    await receiver.start()
    async with httpx.AsyncClient(base_url=service.base_url, headers=headers, timeout=30) as http:
        created = await http.post("/v1/webhooks", json={"url": receiver.url})
        assert created.status_code == 201, created.text
        webhook = created.json()
        assert webhook["secret"].startswith("whsec_") and webhook["status"] == "active"
        receiver.secret = webhook["secret"]
        listed = (await http.get("/v1/webhooks")).json()["data"]
        assert [w["id"] for w in listed] == [webhook["id"]] and "secret" not in listed[0]
        start = (await http.get("/v1/events")).json()["next_cursor"]

        await http.post("/v1/accounts", json={"id": "bank", "currency": "EUR", "allow_negative_balance": True})
        for n in range(5):
            await http.post("/v1/accounts", json={"id": f"c{n}", "currency": "EUR"})

        # 1. A third fail, a tenth time out; the receiver goes away for 3 s mid-run.
        receiver.fail_share, receiver.slow_share = 1 / 3, 0.1
        writing = asyncio.create_task(post_transfers(http, "flaky", 240))
        await asyncio.sleep(1.0)
        await receiver.stop()
        await asyncio.sleep(3.0)
        await receiver.start()
        await writing
        expected = await feed_ids(http, start)
        assert len(expected) >= 240 + 6
        await until(lambda: set(expected) <= receiver.acknowledged, 90, "every event acknowledged")
        refused = [e for e in receiver.received if len(receiver.received[e]) > 1]
        assert refused, "no event was retried: the receiver's failures were not exercised"
        for event_id in refused:
            bodies = receiver.received[event_id]
            assert all(body == bodies[0] for body in bodies), "a retry sent another body"
            assert json.loads(bodies[0])["id"] == event_id
        assert not receiver.bad_signatures, receiver.bad_signatures[:5]

        # 2. SIGKILL with deliveries in flight: the receiver holds every request.
        receiver.fail_share = receiver.slow_share = 0.0
        receiver.stall.clear()
        middle = expected[-1]
        await post_transfers(http, "killed", 40)
        await until(lambda: receiver.in_flight > 0, 30, "deliveries in flight")
        in_flight = receiver.in_flight
        service.kill()
        receiver.epoch += 1
        receiver.stall.set()
        # Nothing more can come from the dead service; what was in flight stays unacknowledged there.
        connection = await asyncpg.connect(owner_url)
        try:
            claimed = await connection.fetchval(
                "SELECT count(*) FROM webhook_deliveries WHERE status = 'pending' AND locked_until > now()"
            )
        finally:
            await connection.close()
        assert claimed >= 1, "no delivery was leased when the service was killed"
    service.start()
    async with httpx.AsyncClient(base_url=service.base_url, headers=headers, timeout=30) as http:
        expected_after = await feed_ids(http, middle)
        assert len(expected_after) >= 40
        await until(lambda: set(expected_after) <= receiver.acknowledged, 60, "every event after the SIGKILL")
        # The receiver counts an event acknowledged as it answers; the service records the
        # delivery when the answer reaches it, a moment later (and an answer that reached
        # the killed service only is redelivered once its lease ends): every delivery must
        # end delivered, none stay pending or fail.
        deadline = time.monotonic() + 60
        while True:
            deliveries = (await http.get(f"/v1/webhooks/{webhook['id']}/deliveries", params={"limit": 1000})).json()
            statuses = {d["status"] for d in deliveries["data"]}
            if statuses == {"delivered"} or time.monotonic() > deadline:
                break
            assert "failed" not in statuses, statuses
            await asyncio.sleep(0.2)
        assert statuses == {"delivered"}, statuses
        assert max(d["attempts"] for d in deliveries["data"]) >= 2
        assert not receiver.bad_signatures, receiver.bad_signatures[:5]
    await receiver.stop()
    print(f"\n{len(expected) + len(expected_after)} events delivered; {in_flight} in flight at the SIGKILL")


def test_a_receiver_that_never_answers_makes_its_subscription_failing(
    fresh_database: tuple[str, str], tmp_path: Path
) -> None:
    service = Service(
        tmp_path / "service", fresh_database, LEDGER_WEBHOOK_RETRY_HORIZON_SECONDS="2", LEDGER_EVENTS_RETENTION_DAYS="0"
    )
    service.start()
    try:
        asyncio.run(_failing(service))
    finally:
        service.stop()


async def _failing(service: Service) -> None:
    headers = dict(provision.API_HEADERS)
    dead = f"http://127.0.0.1:{free_port()}/nobody"
    async with httpx.AsyncClient(base_url=service.base_url, headers=headers, timeout=30) as http:
        webhook = (await http.post("/v1/webhooks", json={"url": dead, "types": ["account.created"]})).json()
        await http.post("/v1/accounts", json={"id": "lonely", "currency": "EUR"})
        deadline = time.monotonic() + 30
        while (await http.get(f"/v1/webhooks/{webhook['id']}")).json()["status"] != "failing":
            assert time.monotonic() < deadline, "the subscription was not marked failing"
            await asyncio.sleep(0.2)
        listed = (await http.get("/v1/webhooks")).json()["data"][0]
        assert listed["status"] == "failing" and listed["failing_since"] and "not delivered" in listed["last_error"]
        (delivery,) = (await http.get(f"/v1/webhooks/{webhook['id']}/deliveries")).json()["data"]
        assert delivery["status"] == "failed" and delivery["attempts"] >= 2 and delivery["next_attempt_at"] is None
        assert delivery["event_type"] == "account.created"
        await until_metric(http, "ledger_webhooks_failing", 1)
        assert "ledger_webhook_deliveries_total{" in (await http.get("/metrics")).text
        # Deleting it cancels what is left and stops deliveries.
        deleted = await http.delete(f"/v1/webhooks/{webhook['id']}")
        assert deleted.status_code == 200 and deleted.json()["status"] == "deleted"
        assert (await http.get("/v1/webhooks")).json()["data"] == []


async def until_metric(http: httpx.AsyncClient, name: str, value: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        for line in (await http.get("/metrics")).text.splitlines():
            if line.startswith(name + "{") and float(line.rsplit(" ", 1)[1]) >= value:
                return
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        await asyncio.sleep(0.3)
