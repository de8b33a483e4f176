"""Webhooks: subscriptions, and the delivery of every event to them, at least once.

Each subscription has a cursor in the event feed (ledger.service.events). Any service
process may advance it: it claims the subscription row with `FOR UPDATE SKIP LOCKED`,
reads the feed after the cursor, stores one delivery per matching event (the body fixed
then, so that every attempt sends the same bytes under the same `Ledger-Event-Id`) and
moves the cursor, in one transaction. A delivery is claimed the same way and leased
(its next attempt moved past the lease) before the POST, so that a process killed
mid-delivery leaves it to be claimed again when the lease ends: at least once, never
lost. Nothing here runs on the write path: writers only insert into the outbox.

A delivery not acknowledged with a 2xx is retried with exponential backoff and
jitter (`webhook_backoff_base_seconds` doubling up to `webhook_backoff_max_seconds`)
until `webhook_retry_horizon_seconds` after it was created; then it is `failed` and its
subscription `failing` (visible in `GET /v1/webhooks` and `ledger_webhooks_failing`),
until one of its deliveries succeeds again. Deliveries are not ordered: receivers
deduplicate by `Ledger-Event-Id` and may order by the event's position in its id.

The signing secret is not stored: it is HMAC(chain key, webhook id and a random nonce),
so neither a database dump nor an operator with write access can sign a delivery.

Targets are checked against `webhook_allowed_hosts` when a subscription is made and
again before every attempt (after resolving the name), so that the service cannot be
pointed at internal addresses (server-side request forgery).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import logging
import random
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx

from ledger.client.webhooks import sign
from ledger.errors import InvalidCursor, WebhookNotFound, WebhookUrlNotAllowed
from ledger.integrity import Keyring
from ledger.service.events import EventFeed, EventRecord, event_id, parse_cursor, read_page
from ledger.service.records import Page
from ledger.service.unit_of_work import UnitOfWork
from ledger.settings import Settings, SettingsError

logger = logging.getLogger("ledger.webhooks")

USER_AGENT = "ledger-webhooks/1"
FAN_OUT_EVENTS = 500
# Seconds past the request timeout before a claimed delivery may be claimed again (by
# this process or another): an attempt never outlives its timeout (it is cancelled), so a
# delivery is claimed again only when the process that claimed it died.
LEASE_MARGIN_SECONDS = 5.0
MAX_ERROR = 300


# -- where deliveries may go -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AllowList:
    any_host: bool
    names: frozenset[str]
    suffixes: tuple[str, ...]
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    def names_host(self, host: str) -> bool:
        return self.any_host or host in self.names or any(host.endswith(suffix) for suffix in self.suffixes)

    def covers(self, address: str) -> bool:
        if self.any_host:
            return True
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.networks)


def parse_allowed_hosts(text: str) -> AllowList:
    names: set[str] = set()
    suffixes: list[str] = []
    networks = []
    any_host = False
    for item in (part.strip().lower() for part in text.split(",")):
        if not item:
            continue
        if item == "*":
            any_host = True
        elif item.startswith("*."):
            suffixes.append(item[1:])
        else:
            try:
                networks.append(ipaddress.ip_network(item.strip("[]"), strict=False))
            except ValueError:
                if not all(part.isalnum() or part == "-" for part in item.replace(".", "").split("-")):
                    raise SettingsError(
                        f"LEDGER_WEBHOOK_ALLOWED_HOSTS: {item!r} is not a host name or network"
                    ) from None
                names.add(item)
    return AllowList(any_host, frozenset(names), tuple(suffixes), tuple(networks))


def _split(url: str) -> tuple[str, int]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise WebhookUrlNotAllowed(f"the webhook URL is not valid: {error}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookUrlNotAllowed("a webhook URL must be http:// or https:// with a host")
    if parts.username is not None or parts.password is not None:
        raise WebhookUrlNotAllowed("a webhook URL may not carry credentials")
    return parts.hostname.lower(), port or (443 if parts.scheme == "https" else 80)


async def check_target(url: str, allowed: AllowList) -> None:
    """Raise WebhookUrlNotAllowed unless `url` may receive deliveries: its host is a
    listed name, or every address it resolves to is in a listed network."""
    host, port = _split(url)
    if allowed.names_host(host):
        return
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as error:
            raise WebhookUrlNotAllowed(f"the webhook host {host!r} cannot be resolved: {error}") from None
        addresses = sorted({info[4][0] for info in infos})
    refused = [address for address in addresses if not allowed.covers(address)]
    if refused or not addresses:
        raise WebhookUrlNotAllowed(
            f"the webhook host {host!r} ({', '.join(refused or addresses)}) is not in LEDGER_WEBHOOK_ALLOWED_HOSTS"
        )


# -- subscriptions ------------------------------------------------------------------------


def derive_secret(keyring: Keyring, key_id: str, webhook_id: str, nonce: bytes) -> str:
    key = keyring.get(key_id)
    if key is None:
        raise LookupError(f"chain key {key_id!r} of webhook {webhook_id!r} is not in the keyring")
    digest = key.mac(f"ledger-webhook-secret-v1:{webhook_id}:{nonce.hex()}")
    return "whsec_" + base64.urlsafe_b64encode(digest).decode().rstrip("=")


@dataclass(frozen=True, slots=True)
class WebhookRecord:
    id: str
    url: str
    types: list[str] | None
    status: str
    created_at: datetime
    failing_since: datetime | None
    last_error: str | None

    @classmethod
    def from_row(cls, row: Any) -> WebhookRecord:
        return cls(
            row["id"],
            row["url"],
            row["types"],
            row["status"],
            row["created_at"],
            row["failing_since"],
            row["last_error"],
        )


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    id: int
    event_position: int
    event_type: str
    status: str
    attempts: int
    created_at: datetime
    last_attempt_at: datetime | None
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    last_status_code: int | None
    last_error: str | None


_WEBHOOK = "id, url, types, status, created_at, failing_since, last_error"
_DELIVERY = (
    "id, event_position, event_type, status, attempts, created_at, last_attempt_at, "
    "CASE WHEN status = 'pending' THEN next_attempt_at END AS next_attempt_at, delivered_at, "
    "last_status_code, last_error"
)


class Webhooks:
    """Subscriptions (admin), and the delivery loop every service process runs."""

    def __init__(
        self,
        unit_of_work: UnitOfWork,
        keyring: Keyring,
        settings: Settings,
        feed: EventFeed,
        render: Callable[[EventRecord], bytes],
        *,
        on_delivery: Callable[[str], None] | None = None,
    ) -> None:
        self._unit_of_work = unit_of_work
        self._keyring = keyring
        self._settings = settings
        self._feed = feed
        self._render = render
        self._on_delivery = on_delivery
        self.allowed = parse_allowed_hosts(settings.webhook_allowed_hosts)
        self.failing = 0
        # Subscriptions not deleted, as last counted (every 2 s, and when this process
        # makes one): with none, the loop leaves the database alone.
        self.subscribed = 0
        self._client: httpx.AsyncClient | None = None
        # Attempts in flight (at most webhook_concurrency), and a signal when one ends.
        self._attempts: set[asyncio.Task[None]] = set()
        self._slot_freed = asyncio.Event()

    # -- admin ---------------------------------------------------------------------

    async def create(self, url: str, types: list[str] | None, created_by: str | None) -> tuple[WebhookRecord, str]:
        await check_target(url, self.allowed)
        webhook_id = "wh_" + secrets.token_hex(12)
        nonce = secrets.token_bytes(16)
        key = self._keyring.active

        async def work(driver: asyncpg.Connection) -> Any:
            # From the feed's head: a new subscription gets the events after it was made.
            return await driver.fetchrow(
                f"INSERT INTO webhooks (id, url, types, secret_key, secret_nonce, status, cursor, created_at, created_by) "
                f"VALUES ($1, $2, $3, $4, $5, 'active', (SELECT last_position FROM event_feed WHERE id = 1), "
                f"clock_timestamp(), $6) RETURNING {_WEBHOOK}",
                webhook_id, url, sorted(set(types)) if types else None, key.id, nonce, created_by,
            )  # fmt: skip

        row = await self._unit_of_work.run_on_driver(work)
        self.subscribed += 1
        return WebhookRecord.from_row(row), derive_secret(self._keyring, key.id, webhook_id, nonce)

    async def list(self, limit: int, cursor: str | None) -> Page[WebhookRecord]:
        after = cursor or ""
        if cursor is not None and not cursor.startswith("wh_"):
            raise InvalidCursor("the cursor is not a next_cursor of /v1/webhooks")
        rows = await self._unit_of_work.run_on_driver(
            lambda driver: driver.fetch(
                f"SELECT {_WEBHOOK} FROM webhooks WHERE status <> 'deleted' AND id > $1 ORDER BY id LIMIT $2",
                after,
                limit + 1,
            )
        )
        items = [WebhookRecord.from_row(row) for row in rows[:limit]]
        return Page(items, items[-1].id if len(rows) > limit else None)

    async def get(self, webhook_id: str) -> WebhookRecord:
        row = await self._unit_of_work.run_on_driver(
            lambda driver: driver.fetchrow(f"SELECT {_WEBHOOK} FROM webhooks WHERE id = $1", webhook_id)
        )
        if row is None:
            raise WebhookNotFound(f"no webhook with id {webhook_id!r}")
        return WebhookRecord.from_row(row)

    async def delete(self, webhook_id: str) -> WebhookRecord:
        """Stop delivering: its pending deliveries are cancelled. Deleting it again answers the same."""

        async def work(driver: asyncpg.Connection) -> Any:
            await driver.execute("BEGIN")
            row = await driver.fetchrow(
                f"UPDATE webhooks SET status = 'deleted', deleted_at = COALESCE(deleted_at, clock_timestamp()) "
                f"WHERE id = $1 RETURNING {_WEBHOOK}",
                webhook_id,
            )
            await driver.execute(
                "UPDATE webhook_deliveries SET status = 'cancelled', next_attempt_at = NULL, locked_until = NULL "
                "WHERE webhook_id = $1 AND status = 'pending'",
                webhook_id,
            )
            await driver.execute("COMMIT")
            return row

        row = await self._unit_of_work.run_on_driver(work)
        if row is None:
            raise WebhookNotFound(f"no webhook with id {webhook_id!r}")
        return WebhookRecord.from_row(row)

    async def deliveries(self, webhook_id: str, limit: int, cursor: str | None) -> Page[DeliveryRecord]:
        """Newest first."""
        await self.get(webhook_id)
        before = parse_cursor(cursor) if cursor is not None else None
        rows = await self._unit_of_work.run_on_driver(
            lambda driver: driver.fetch(
                f"SELECT {_DELIVERY} FROM webhook_deliveries WHERE webhook_id = $1 "
                f"AND ($2::bigint IS NULL OR event_position < $2) ORDER BY event_position DESC LIMIT $3",
                webhook_id,
                before,
                limit + 1,
            )
        )
        items = [DeliveryRecord(**dict(row)) for row in rows[:limit]]
        return Page(items, event_id(items[-1].event_position) if len(rows) > limit else None)

    # -- delivery ------------------------------------------------------------------

    async def fan_out_once(self) -> int:
        """Turn new feed events into deliveries for the subscriptions no other process
        is handling right now; returns how many deliveries were made."""

        async def work(driver: asyncpg.Connection) -> int:
            await driver.execute("BEGIN")
            subscriptions = await driver.fetch(
                "SELECT id, types, cursor FROM webhooks WHERE status <> 'deleted' "
                "AND cursor < (SELECT last_position FROM event_feed WHERE id = 1) "
                "ORDER BY id LIMIT 16 FOR UPDATE SKIP LOCKED"
            )
            made = 0
            for subscription in subscriptions:
                page = await read_page(driver, subscription["cursor"], FAN_OUT_EVENTS, types=subscription["types"])
                if page.items:
                    await driver.execute(
                        "INSERT INTO webhook_deliveries (webhook_id, event_position, event_type, body, status, "
                        "attempts, created_at, next_attempt_at) "
                        "SELECT $1, p, t, b, 'pending', 0, clock_timestamp(), clock_timestamp() "
                        "FROM unnest($2::bigint[], $3::text[], $4::bytea[]) AS u(p, t, b) "
                        "ON CONFLICT (webhook_id, event_position) DO NOTHING",
                        subscription["id"],
                        [event.position for event in page.items],
                        [event.type for event in page.items],
                        [self._render(event) for event in page.items],
                    )
                    made += len(page.items)
                await driver.execute(
                    "UPDATE webhooks SET cursor = $2 WHERE id = $1", subscription["id"], parse_cursor(page.next_cursor)
                )
            await driver.execute("COMMIT")
            return made

        return await self._unit_of_work.run_on_driver(work)

    async def _claim(self, limit: int) -> list[Any]:
        lease = self._settings.webhook_timeout_seconds + LEASE_MARGIN_SECONDS

        async def work(driver: asyncpg.Connection) -> list[Any]:
            await driver.execute("BEGIN")
            rows = await driver.fetch(
                "WITH due AS (SELECT id FROM webhook_deliveries WHERE status = 'pending' "
                "AND next_attempt_at <= clock_timestamp() ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED) "
                "UPDATE webhook_deliveries d SET attempts = d.attempts + 1, last_attempt_at = clock_timestamp(), "
                "next_attempt_at = clock_timestamp() + make_interval(secs => $2), "
                "locked_until = clock_timestamp() + make_interval(secs => $2) "
                "FROM due, webhooks w WHERE d.id = due.id AND w.id = d.webhook_id "
                "RETURNING d.id, d.webhook_id, d.event_position, d.body, d.attempts, "
                "extract(epoch FROM clock_timestamp() - d.created_at) AS age, w.url, w.secret_key, w.secret_nonce",
                limit,
                lease,
            )
            await driver.execute("COMMIT")
            return rows

        return await self._unit_of_work.run_on_driver(work)

    def backoff_seconds(self, attempts: int) -> float:
        ceiling = min(
            self._settings.webhook_backoff_max_seconds,
            self._settings.webhook_backoff_base_seconds * 2 ** min(attempts - 1, 40),
        )
        # Jittered (between half and all of the backoff): receivers coming back after an
        # outage are not hit by every retry at once, and no retry comes much sooner than asked.
        return random.uniform(ceiling / 2, ceiling)

    async def _attempt(self, delivery: Any) -> tuple[int | None, str | None]:
        """POST one delivery; returns (status code, error)."""
        assert self._client is not None
        try:
            await check_target(delivery["url"], self.allowed)
            secret = derive_secret(
                self._keyring, delivery["secret_key"], delivery["webhook_id"], bytes(delivery["secret_nonce"])
            )
        except WebhookUrlNotAllowed as error:
            return None, error.detail
        except LookupError as error:
            return None, str(error)
        body = bytes(delivery["body"])
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "Ledger-Event-Id": event_id(delivery["event_position"]),
            "Ledger-Signature": sign(secret, body, int(time.time())),
            "Ledger-Delivery-Attempt": str(delivery["attempts"]),
        }
        try:
            # httpx's timeout bounds each phase; the whole attempt is bounded too.
            async with asyncio.timeout(self._settings.webhook_timeout_seconds):
                response = await self._client.post(delivery["url"], content=body, headers=headers)
        except TimeoutError:
            return None, f"no answer within {self._settings.webhook_timeout_seconds:g} s"
        except httpx.HTTPError as error:
            return None, (f"{type(error).__name__}: {error}"[:MAX_ERROR]).rstrip(": ")
        if 200 <= response.status_code < 300:
            return response.status_code, None
        return response.status_code, f"HTTP {response.status_code}"

    async def _record(self, delivery: Any, status: int | None, error: str | None) -> str:
        horizon = self._settings.webhook_retry_horizon_seconds

        async def work(driver: asyncpg.Connection) -> str:
            await driver.execute("BEGIN")
            if error is None:
                outcome = "delivered"
                await driver.execute(
                    "UPDATE webhook_deliveries SET status = 'delivered', delivered_at = clock_timestamp(), "
                    "last_status_code = $2, last_error = NULL, next_attempt_at = NULL, locked_until = NULL "
                    "WHERE id = $1 AND status = 'pending'",
                    delivery["id"],
                    status,
                )
                await driver.execute(
                    "UPDATE webhooks SET status = 'active', failing_since = NULL, last_error = NULL "
                    "WHERE id = $1 AND status = 'failing'",
                    delivery["webhook_id"],
                )
            elif float(delivery["age"]) >= horizon:
                outcome = "failed"
                await driver.execute(
                    "UPDATE webhook_deliveries SET status = 'failed', last_status_code = $2, last_error = $3, "
                    "next_attempt_at = NULL, locked_until = NULL WHERE id = $1 AND status = 'pending'",
                    delivery["id"],
                    status,
                    error,
                )
                await driver.execute(
                    "UPDATE webhooks SET status = 'failing', failing_since = COALESCE(failing_since, clock_timestamp()), "
                    "last_error = $2 WHERE id = $1 AND status <> 'deleted'",
                    delivery["webhook_id"],
                    f"event {event_id(delivery['event_position'])} not delivered within the retry horizon: {error}",
                )
            else:
                outcome = "retried"
                # The last attempt is made at the horizon, not after it.
                delay = min(self.backoff_seconds(delivery["attempts"]), max(horizon - float(delivery["age"]), 0.0))
                await driver.execute(
                    "UPDATE webhook_deliveries SET last_status_code = $2, last_error = $3, locked_until = NULL, "
                    "next_attempt_at = clock_timestamp() + make_interval(secs => $4) "
                    "WHERE id = $1 AND status = 'pending'",
                    delivery["id"],
                    status,
                    error,
                    delay,
                )
            await driver.execute("COMMIT")
            return outcome

        return await self._unit_of_work.run_on_driver(work)

    async def deliver_due(self) -> int:
        """Claim as many due deliveries as there are free attempt slots and start them;
        returns how many started. Attempts run on their own: a receiver that times out
        holds one slot for its timeout, not the whole loop."""
        free = self._settings.webhook_concurrency - len(self._attempts)
        if free <= 0:
            return 0
        claimed = await self._claim(free)
        for delivery in claimed:
            task = asyncio.create_task(self._deliver(delivery))
            self._attempts.add(task)
            task.add_done_callback(self._attempt_done)
        return len(claimed)

    def _attempt_done(self, task: asyncio.Task[None]) -> None:
        self._attempts.discard(task)
        self._slot_freed.set()
        if not task.cancelled() and task.exception() is not None:
            # Recording the outcome failed (the database is away): the lease ends and
            # the delivery is claimed again, so nothing is lost.
            logger.warning("recording a webhook attempt failed: %s", task.exception())

    async def _deliver(self, delivery: Any) -> None:
        status, error = await self._attempt(delivery)
        outcome = await self._record(delivery, status, error)
        if self._on_delivery is not None:
            self._on_delivery(outcome)

    async def count(self) -> None:
        row = await self._unit_of_work.run_on_driver(
            lambda driver: driver.fetchrow(
                "SELECT count(*) FILTER (WHERE status = 'failing') AS failing, "
                "count(*) FILTER (WHERE status <> 'deleted') AS subscribed FROM webhooks"
            )
        )
        self.failing, self.subscribed = row["failing"], row["subscribed"]

    async def run(self) -> None:
        """The delivery loop (until cancelled): fan out new events, deliver what is due."""
        self._client = httpx.AsyncClient(
            timeout=self._settings.webhook_timeout_seconds, follow_redirects=False, trust_env=False
        )
        tick = min(1.0, self._settings.events_tick_seconds)
        last_count = 0.0
        try:
            while True:
                seen = self._feed.last_position
                try:
                    if time.monotonic() - last_count > 2:
                        last_count = time.monotonic()
                        await self.count()
                    made = sent = 0
                    if self.subscribed:
                        made = await self.fan_out_once()
                        sent = await self.deliver_due()
                except asyncio.CancelledError:
                    raise
                except Exception as error:
                    logger.warning("webhook delivery failed, retrying: %s", error)
                    made = sent = 0
                    await asyncio.sleep(tick)
                if not self.subscribed:
                    await asyncio.sleep(tick)
                elif not made and not sent:
                    # Until the feed moves, an attempt ends, or the next retry may be due.
                    self._slot_freed.clear()
                    waits = [
                        asyncio.create_task(self._feed.wait_beyond(seen, tick)),
                        asyncio.create_task(self._slot_freed.wait()),
                    ]
                    try:
                        await asyncio.wait(waits, timeout=tick, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        # Also when this loop is cancelled (shutdown): no waiter outlives it.
                        for wait in waits:
                            wait.cancel()
                    # Under a busy feed, gather a few moves per pass.
                    await asyncio.sleep(0.01)
        finally:
            for task in list(self._attempts):
                task.cancel()  # leased: another pass, here or elsewhere, sends them again
            await asyncio.gather(*self._attempts, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._client.aclose()
