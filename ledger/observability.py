"""Request ids, structured JSON logs and Prometheus metrics.

- Every request carries a request id: the client's `X-Request-ID` when it is a sane token
  (1 to 128 characters of [A-Za-z0-9._:-]), otherwise a generated one. It is echoed in
  the response's `X-Request-ID` and attached to every log line written while serving it.
- Logs are JSON lines. They never include request bodies, headers or database URLs with
  passwords, nor the values of SQL statements: engines hide parameters, and the
  formatter drops PostgreSQL's `DETAIL` lines (`Key (id)=(...)`, `Failing row contains
  (...)`) and SQLAlchemy's parameter lists from every message and traceback. An access
  line per request gives method, route, status and duration; a request no route matches
  (a path scan) is logged with its path, truncated.
- The middleware wraps the whole application, routing included, so 404 and 405 answers
  get a request id, an access line and a metric like every other response.
- `/metrics` is the Prometheus text format. Counting costs a dict update per event; with
  `ledger serve --workers N`, workers share their figures through snapshot files, so any
  worker's answer covers the whole service (see `Metrics`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import re
import shutil
import time
import uuid
from bisect import bisect_left
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
_SAFE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
access_logger = logging.getLogger("ledger.access")
logger = logging.getLogger("ledger.metrics")

LATENCY_BUCKETS_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
GROUP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# How long replica-routed reads waited for the replica's replay (ledger.service.replica).
REPLICA_WAIT_BUCKETS_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

# Set by `ledger serve --workers N` for its workers (see `Metrics`).
METRICS_DIRECTORY_VARIABLE = "LEDGER_WORKER_METRICS_DIR"
# How stale another worker's figures may be in a scrape.
PUBLISH_INTERVAL_SECONDS = 1.0


# What database errors say about the values of a statement: PostgreSQL's DETAIL line
# ("Key (id)=(...) already exists", "Failing row contains (...)") and SQLAlchemy's
# parameter list.
_STATEMENT_VALUES = re.compile(r"\n?DETAIL: [^\n]*|\[parameters: [^\n]*\]")


def scrub(text: str) -> str:
    return _STATEMENT_VALUES.sub("[values withheld]", text)


_LOG_ENCODER = msgspec.json.Encoder()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            # isoformat and msgspec rather than strftime and json.dumps: a third of the cost
            # of an access line, which is written for every request.
            "time": datetime.fromtimestamp(record.created, UTC).replace(tzinfo=None).isoformat(timespec="microseconds")
            + "Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": scrub(record.getMessage()),
        }
        request_id = REQUEST_ID.get()
        if request_id:
            line["request_id"] = request_id
        for key in ("method", "route", "path", "status", "duration_ms"):
            if hasattr(record, key):
                line[key] = getattr(record, key)
        if record.exc_info:
            line["exception"] = scrub(self.formatException(record.exc_info))
        return _LOG_ENCODER.encode(line).decode()


def logging_config(level: str) -> dict[str, Any]:
    """A dictConfig for the service and uvicorn: JSON lines on stderr."""
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"default": handler},
        "root": {"handlers": ["default"], "level": "WARNING"},
        "loggers": {
            "ledger": {"level": level.upper(), "handlers": ["default"], "propagate": False},
            "uvicorn": {"level": level.upper(), "handlers": ["default"], "propagate": False},
            "uvicorn.error": {"level": level.upper(), "handlers": ["default"], "propagate": False},
            "alembic": {"level": "INFO", "handlers": ["default"], "propagate": False},
        },
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def share_worker_metrics(data_dir: Path, workers: int) -> Path | None:
    """For `ledger serve`: with several workers, a fresh directory where each worker
    publishes its figures (`<data_dir>/metrics/<pid of ledger serve>`), named to the
    workers by `LEDGER_WORKER_METRICS_DIR`. Directories of `ledger serve` processes that
    are gone are removed; another live one's (same data directory) is left alone."""
    if workers <= 1:
        os.environ.pop(METRICS_DIRECTORY_VARIABLE, None)  # one process is the whole service
        return None
    root = data_dir.resolve() / "metrics"
    root.mkdir(parents=True, exist_ok=True)
    for entry in root.iterdir():
        if entry.is_dir() and entry.name.isdigit() and (int(entry.name) == os.getpid() or not _alive(int(entry.name))):
            shutil.rmtree(entry, ignore_errors=True)
    directory = root / str(os.getpid())
    directory.mkdir(mode=0o700)
    os.environ[METRICS_DIRECTORY_VARIABLE] = str(directory)
    return directory


def stop_sharing_worker_metrics(directory: Path | None) -> None:
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


class Metrics:
    """Counters, histograms and gauges, rendered as Prometheus text.

    Recording is a dict or list update and nothing else: it runs on every request. Bucket
    counts are kept per bucket (one increment, found by bisection) and made cumulative
    when rendered.

    With a `directory` (from `LEDGER_WORKER_METRICS_DIR`, set by `ledger serve --workers
    N`), the worker writes a snapshot of its figures there every
    `PUBLISH_INTERVAL_SECONDS` and at shutdown, and a scrape answers for the whole
    service: counters and histograms summed over the snapshots of every worker this
    service ever ran (a dead worker's last figures stay, so totals never go backwards),
    with `process` set to the pid of `ledger serve`; gauges one series per live worker,
    `process` being the worker's pid. The scraped worker first writes its own snapshot,
    so each worker's share only grows from one scrape to the next, whichever worker
    answers. Without a directory, the figures are this process's own, as they are the
    whole service's.
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        directory = directory or os.environ.get(METRICS_DIRECTORY_VARIABLE) or None
        self.directory = Path(directory) if directory else None
        self.pid = os.getpid()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.transfer_outcomes: dict[str, int] = defaultdict(int)
        self.retries: dict[str, int] = defaultdict(int)
        self.unavailable_answers: dict[str, int] = defaultdict(int)
        self.events: dict[str, int] = defaultdict(int)
        self.webhook_deliveries: dict[str, int] = defaultdict(int)
        # Per (method, route): a count per latency bucket, the last one past the largest bound.
        self.latency: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0] * (len(LATENCY_BUCKETS_SECONDS) + 1))
        self.latency_sum: dict[tuple[str, str], float] = defaultdict(float)
        self.group_buckets = [0] * (len(GROUP_BUCKETS) + 1)
        self.group_transfers = 0
        # Replica-routed reads by "source:reason" (replica:, primary:lagging, primary:unavailable)
        # and the replica's lag each one observed.
        self.replica_reads: dict[str, int] = defaultdict(int)
        self.replica_wait_buckets = [0] * (len(REPLICA_WAIT_BUCKETS_SECONDS) + 1)
        self.replica_wait_sum = 0.0
        self.pool: Any = None
        self.unit_of_work: Any = None
        self.groups: Any = None
        self.webhooks: Any = None
        self._published = b""

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests[(method, route, status)] += 1
        key = (method, route)
        self.latency[key][bisect_left(LATENCY_BUCKETS_SECONDS, seconds)] += 1
        self.latency_sum[key] += seconds

    def group(self, transfers: int) -> None:
        """A group transaction of `transfers` transfers started (ledger.service.groups)."""
        self.group_buckets[bisect_left(GROUP_BUCKETS, transfers)] += 1
        self.group_transfers += transfers

    def replica_read(self, route: Any) -> None:
        """A replica-routed read was served (a `ledger.service.replica.ReadRoute`)."""
        self.replica_reads[f"{route.source}:{route.reason}"] += 1
        if route.lag_ms is not None:
            seconds = route.lag_ms / 1000
            self.replica_wait_buckets[bisect_left(REPLICA_WAIT_BUCKETS_SECONDS, seconds)] += 1
            self.replica_wait_sum += seconds

    def events_moved(self, count: int) -> None:
        """The sequencer positioned `count` events in the feed (ledger.service.events)."""
        self.events["positioned"] += count

    def webhook_delivery(self, outcome: str) -> None:
        """A webhook attempt ended: delivered, retried or failed (ledger.service.webhooks)."""
        self.webhook_deliveries[outcome] += 1

    def transfer_outcome(self, code: str) -> None:
        self.transfer_outcomes[code] += 1

    def retry(self, reason: str) -> None:
        self.retries[reason] += 1

    def unavailable(self, code: str) -> None:
        self.unavailable_answers[code] += 1

    def snapshot(self) -> dict[str, Any]:
        """This process's figures as plain data (what a worker publishes)."""
        gauges: dict[str, Any] = {}
        if self.groups is not None:
            gauges["group_queue"] = self.groups.queued
        if self.webhooks is not None:
            gauges["webhooks_failing"] = self.webhooks.failing
        if self.pool is not None:
            gauges["pool"] = {
                "in_use": self.pool.checkedout(),
                "idle": self.pool.checkedin(),
                "overflow": max(self.pool.overflow(), 0),
                "waiting": self.unit_of_work.waiting if self.unit_of_work else 0,
            }
            gauges["pool_size"] = self.pool.size()
        return {
            "requests": [[method, route, status, count] for (method, route, status), count in self.requests.items()],
            "latency": [
                [method, route, buckets, self.latency_sum[method, route]]
                for (method, route), buckets in self.latency.items()
            ],
            "outcomes": self.transfer_outcomes,
            "retries": self.retries,
            "unavailable": self.unavailable_answers,
            "events": self.events,
            "webhook_deliveries": self.webhook_deliveries,
            "groups": [self.group_buckets, self.group_transfers],
            "replica": [self.replica_reads, self.replica_wait_buckets, self.replica_wait_sum],
            "gauges": gauges,
        }

    def publish(self, snapshot: dict[str, Any] | None = None) -> None:
        """Write this worker's snapshot for the other workers' scrapes (atomically: a
        reader sees the previous snapshot or this one)."""
        if self.directory is None:
            return
        encoded = msgspec.json.encode(snapshot if snapshot is not None else self.snapshot())
        if encoded == self._published:
            return
        staging = self.directory / f".{self.pid}.tmp"
        try:
            staging.write_bytes(encoded)
            os.replace(staging, self.directory / f"{self.pid}.json")
        except OSError as error:  # the next publication tries again; serving goes on
            logger.warning("cannot publish this worker's metrics in %s: %s", self.directory, error)
            return
        self._published = encoded

    def start_publishing(self) -> list[asyncio.Task[None]]:
        """In the serving event loop: publish now, then every interval and once more when
        cancelled (at shutdown). Nothing to do without a directory."""
        if self.directory is None:
            return []
        own = self.directory / f"{self.pid}.json"
        if own.exists():  # left by an earlier process with this pid: its counts still count
            with contextlib.suppress(OSError):
                os.replace(own, self.directory / f"{self.pid}-{uuid.uuid4().hex}.json")
        self.publish()
        return [asyncio.create_task(self._publish_every(PUBLISH_INTERVAL_SECONDS), name="ledger-metrics-publisher")]

    async def _publish_every(self, seconds: float) -> None:
        try:
            while True:
                await asyncio.sleep(seconds)
                self.publish()
        finally:
            self.publish()

    def render(self, ready: bool | None = None) -> str:
        """The Prometheus text of the whole service. `ready`, when given, is this
        process's readiness (`ledger_ready`)."""
        own = self.snapshot()
        if self.directory is None:
            return _render([own], [(self.pid, own["gauges"])], self.pid, (self.pid, ready))
        self.publish(own)
        snapshots, gauges = [own], [(self.pid, own["gauges"])]
        for path in sorted(self.directory.glob("*.json")):
            worker = path.stem
            if worker == str(self.pid):
                continue
            try:
                snapshot = msgspec.json.decode(path.read_bytes())
            except (OSError, msgspec.DecodeError) as error:
                logger.warning("cannot read the worker metrics %s: %s", path, error)
                continue
            snapshots.append(snapshot)
            if worker.isdigit() and _alive(int(worker)):
                gauges.append((int(worker), snapshot["gauges"]))
        service = int(self.directory.name) if self.directory.name.isdigit() else self.pid
        return _render(snapshots, sorted(gauges, key=lambda item: item[0]), service, (self.pid, ready))


def _render(
    snapshots: list[dict[str, Any]],
    gauges: list[tuple[int, dict[str, Any]]],
    service: int,
    readiness: tuple[int, bool | None],
) -> str:
    """Counters and histograms summed over `snapshots`, labelled with the `service` pid;
    gauges one series per (worker pid, gauges)."""
    requests: dict[tuple[str, str, int], int] = defaultdict(int)
    latency: dict[tuple[str, str], list[int]] = {}
    latency_sum: dict[tuple[str, str], float] = defaultdict(float)
    counters: dict[str, dict[str, int]] = {
        "outcomes": defaultdict(int),
        "retries": defaultdict(int),
        "unavailable": defaultdict(int),
        "events": defaultdict(int),
        "webhook_deliveries": defaultdict(int),
    }
    group_buckets = [0] * (len(GROUP_BUCKETS) + 1)
    group_transfers = 0
    replica_reads: dict[str, int] = defaultdict(int)
    replica_wait = [0] * (len(REPLICA_WAIT_BUCKETS_SECONDS) + 1)
    replica_wait_sum = 0.0
    for snapshot in snapshots:
        # Absent from the snapshots of workers of an older version.
        reads, waits, wait_sum = snapshot.get("replica", ({}, [], 0.0))
        for key, count in reads.items():
            replica_reads[key] += count
        for index, count in enumerate(waits):
            replica_wait[index] += count
        replica_wait_sum += wait_sum
        for method, route, status, count in snapshot["requests"]:
            requests[method, route, status] += count
        for method, route, buckets, seconds in snapshot["latency"]:
            merged = latency.setdefault((method, route), [0] * (len(LATENCY_BUCKETS_SECONDS) + 1))
            for index, count in enumerate(buckets):
                merged[index] += count
            latency_sum[method, route] += seconds
        for name, totals in counters.items():
            # Absent from the snapshots of workers of an older version.
            for label, count in snapshot.get(name, {}).items():
                totals[label] += count
        buckets, transfers = snapshot["groups"]
        for index, count in enumerate(buckets):
            group_buckets[index] += count
        group_transfers += transfers

    process = f'process="{service}"'
    lines = [
        "# HELP ledger_requests_total HTTP requests by method, route and status.",
        "# TYPE ledger_requests_total counter",
    ]
    for (method, route, status), count in sorted(requests.items()):
        lines.append(f'ledger_requests_total{{{process},method="{method}",route="{route}",status="{status}"}} {count}')
    lines += [
        "# HELP ledger_request_duration_seconds Request latency by method and route.",
        "# TYPE ledger_request_duration_seconds histogram",
    ]
    for (method, route), buckets in sorted(latency.items()):
        labels = f'{process},method="{method}",route="{route}"'
        lines += _histogram("ledger_request_duration_seconds", labels, LATENCY_BUCKETS_SECONDS, buckets)
        lines.append(f"ledger_request_duration_seconds_sum{{{labels}}} {latency_sum[method, route]:.6f}")
        lines.append(f"ledger_request_duration_seconds_count{{{labels}}} {sum(buckets)}")
    for name, label, family, description in (
        (
            "outcomes",
            "code",
            "ledger_transfer_outcomes_total",
            "Transfer outcomes by code (created, replayed, or the refusal code).",
        ),
        ("retries", "reason", "ledger_transaction_retries_total", "Whole transactions re-run, by reason."),
        (
            "unavailable",
            "code",
            "ledger_unavailable_total",
            "503 answers by code (lock_timeout, overloaded, unavailable).",
        ),
        ("events", "kind", "ledger_events_total", "Events positioned in the feed by this service's sequencers."),
        (
            "webhook_deliveries",
            "outcome",
            "ledger_webhook_deliveries_total",
            "Webhook attempts by outcome (delivered, retried, failed: past the retry horizon).",
        ),
    ):
        lines += [f"# HELP {family} {description}", f"# TYPE {family} counter"]
        for value, count in sorted(counters[name].items()):
            lines.append(f'{family}{{{process},{label}="{value}"}} {count}')
    lines += [
        "# HELP ledger_group_transfers Transfers per group transaction (group commit).",
        "# TYPE ledger_group_transfers histogram",
        *_histogram("ledger_group_transfers", process, GROUP_BUCKETS, group_buckets),
        f"ledger_group_transfers_sum{{{process}}} {group_transfers}",
        f"ledger_group_transfers_count{{{process}}} {sum(group_buckets)}",
    ]
    if replica_reads:
        lines += [
            "# HELP ledger_replica_reads_total Replica-routed reads by who served them "
            "(replica, or primary with the reason: lagging, unavailable).",
            "# TYPE ledger_replica_reads_total counter",
        ]
        for key, count in sorted(replica_reads.items()):
            source, _, reason = key.partition(":")
            lines.append(f'ledger_replica_reads_total{{{process},source="{source}",reason="{reason}"}} {count}')
        lines += [
            "# HELP ledger_replica_wait_seconds How long replica-routed reads waited for the replica to replay "
            "the writes acknowledged before them (its lag as they saw it).",
            "# TYPE ledger_replica_wait_seconds histogram",
            *_histogram("ledger_replica_wait_seconds", process, REPLICA_WAIT_BUCKETS_SECONDS, replica_wait),
            f"ledger_replica_wait_seconds_sum{{{process}}} {replica_wait_sum:.6f}",
            f"ledger_replica_wait_seconds_count{{{process}}} {sum(replica_wait)}",
        ]
    queues = [(pid, values["group_queue"]) for pid, values in gauges if "group_queue" in values]
    if queues:
        lines += [
            "# HELP ledger_group_queue Transfers waiting for a group transaction, per worker process.",
            "# TYPE ledger_group_queue gauge",
        ]
        lines += [f'ledger_group_queue{{process="{pid}"}} {queued}' for pid, queued in queues]
    failing = [(pid, values["webhooks_failing"]) for pid, values in gauges if "webhooks_failing" in values]
    if failing:
        lines += [
            "# HELP ledger_webhooks_failing Webhook subscriptions marked failing (a delivery ran out of retries), "
            "as the answering worker last counted them (every 2 s).",
            "# TYPE ledger_webhooks_failing gauge",
        ]
        lines += [f'ledger_webhooks_failing{{process="{pid}"}} {count}' for pid, count in failing]
    pools = [(pid, values["pool"], values["pool_size"]) for pid, values in gauges if "pool" in values]
    if pools:
        lines += [
            "# HELP ledger_pool_connections Database connections by state, per worker process (each has its pool).",
            "# TYPE ledger_pool_connections gauge",
        ]
        for pid, pool, _ in pools:
            for state in ("in_use", "idle", "overflow", "waiting"):
                lines.append(f'ledger_pool_connections{{process="{pid}",state="{state}"}} {pool[state]}')
        lines += ["# HELP ledger_pool_size Configured pool size, per worker process.", "# TYPE ledger_pool_size gauge"]
        lines += [f'ledger_pool_size{{process="{pid}"}} {size}' for pid, _, size in pools]
    pid, ready = readiness
    if ready is not None:
        lines += [
            "# HELP ledger_ready 1 when the answering process's database is reachable and migrated (/health/ready).",
            "# TYPE ledger_ready gauge",
            f'ledger_ready{{process="{pid}"}} {int(ready)}',
        ]
    return "\n".join(lines) + "\n"


def _histogram(name: str, labels: str, bounds: tuple[float, ...], buckets: list[int]) -> list[str]:
    """Cumulative `_bucket` lines from per-bucket counts (the last one past every bound)."""
    lines, cumulative = [], 0
    for bound, count in zip(bounds, buckets, strict=False):
        cumulative += count
        lines.append(f'{name}_bucket{{{labels},le="{bound}"}} {cumulative}')
    lines.append(f'{name}_bucket{{{labels},le="+Inf"}} {cumulative + buckets[-1]}')
    return lines


def request_id_middleware(metrics: Metrics, access_log: bool) -> Any:
    """ASGI middleware factory: request id in and out, access log line, request metrics."""

    def middleware(app: Any) -> Any:
        async def handle(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            given = dict(scope.get("headers", ())).get(b"x-request-id", b"")
            request_id = given.decode() if _SAFE_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
            token = REQUEST_ID.set(request_id)
            started = time.perf_counter()
            status = 500

            async def send_with_id(message: Any) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id.encode())]
                await send(message)

            try:
                await app(scope, receive, send_with_id)
            finally:
                seconds = time.perf_counter() - started
                route = scope.get("path_template") or "unmatched"
                metrics.observe_request(scope["method"], route, status, seconds)
                if access_log:
                    extra = {"method": scope["method"], "route": route, "status": status,
                             "duration_ms": round(seconds * 1000, 3)}  # fmt: skip
                    if route == "unmatched":
                        # Who scans which paths: the path itself (bounded), since no route names it.
                        extra["path"] = scope.get("path", "")[:200]
                    access_logger.info("request", extra=extra)
                REQUEST_ID.reset(token)

        return handle

    return middleware
