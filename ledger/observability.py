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
- `/metrics` is the Prometheus text format, kept in-process: with `--workers N` each
  worker process reports its own figures (each series has a `process` label), so scrape
  every worker or run one worker per instance.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
_SAFE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
access_logger = logging.getLogger("ledger.access")

LATENCY_BUCKETS_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
GROUP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


# What database errors say about the values of a statement: PostgreSQL's DETAIL line
# ("Key (id)=(...) already exists", "Failing row contains (...)") and SQLAlchemy's
# parameter list.
_STATEMENT_VALUES = re.compile(r"\n?DETAIL: [^\n]*|\[parameters: [^\n]*\]")


def scrub(text: str) -> str:
    return _STATEMENT_VALUES.sub("[values withheld]", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
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
        return json.dumps(line, separators=(",", ":"))


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


class Metrics:
    """Counters, a latency histogram and pool gauges, rendered as Prometheus text."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.transfer_outcomes: dict[str, int] = defaultdict(int)
        self.retries: dict[str, int] = defaultdict(int)
        self.unavailable_answers: dict[str, int] = defaultdict(int)
        self.latency_buckets: dict[str, list[int]] = defaultdict(lambda: [0] * len(LATENCY_BUCKETS_SECONDS))
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.latency_count: dict[str, int] = defaultdict(int)
        self.group_buckets = [0] * len(GROUP_BUCKETS)
        self.group_transfers = 0
        self.group_count = 0
        self.pool: Any = None
        self.unit_of_work: Any = None
        self.groups: Any = None

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests[(method, route, status)] += 1
        key = f"{method} {route}"
        for index, bound in enumerate(LATENCY_BUCKETS_SECONDS):
            if seconds <= bound:
                self.latency_buckets[key][index] += 1
        self.latency_sum[key] += seconds
        self.latency_count[key] += 1

    def group(self, transfers: int) -> None:
        """A group transaction of `transfers` transfers started (ledger.service.groups)."""
        for index, bound in enumerate(GROUP_BUCKETS):
            if transfers <= bound:
                self.group_buckets[index] += 1
        self.group_transfers += transfers
        self.group_count += 1

    def transfer_outcome(self, code: str) -> None:
        self.transfer_outcomes[code] += 1

    def retry(self, reason: str) -> None:
        self.retries[reason] += 1

    def unavailable(self, code: str) -> None:
        self.unavailable_answers[code] += 1

    def render(self) -> str:
        process = f'process="{os.getpid()}"'
        lines = [
            "# HELP ledger_requests_total HTTP requests by method, route and status.",
            "# TYPE ledger_requests_total counter",
        ]
        for (method, route, status), count in sorted(self.requests.items()):
            lines.append(
                f'ledger_requests_total{{{process},method="{method}",route="{route}",status="{status}"}} {count}'
            )
        lines += [
            "# HELP ledger_request_duration_seconds Request latency by method and route.",
            "# TYPE ledger_request_duration_seconds histogram",
        ]
        for key, buckets in sorted(self.latency_buckets.items()):
            method, route = key.split(" ", 1)
            labels = f'{process},method="{method}",route="{route}"'
            for bound, count in zip(LATENCY_BUCKETS_SECONDS, buckets, strict=True):
                lines.append(f'ledger_request_duration_seconds_bucket{{{labels},le="{bound}"}} {count}')
            lines.append(f'ledger_request_duration_seconds_bucket{{{labels},le="+Inf"}} {self.latency_count[key]}')
            lines.append(f"ledger_request_duration_seconds_sum{{{labels}}} {self.latency_sum[key]:.6f}")
            lines.append(f"ledger_request_duration_seconds_count{{{labels}}} {self.latency_count[key]}")
        lines += [
            "# HELP ledger_transfer_outcomes_total Transfer outcomes by code (created, replayed, or the refusal code).",
            "# TYPE ledger_transfer_outcomes_total counter",
        ]
        for code, count in sorted(self.transfer_outcomes.items()):
            lines.append(f'ledger_transfer_outcomes_total{{{process},code="{code}"}} {count}')
        lines += [
            "# HELP ledger_transaction_retries_total Whole transactions re-run, by reason.",
            "# TYPE ledger_transaction_retries_total counter",
        ]
        for reason, count in sorted(self.retries.items()):
            lines.append(f'ledger_transaction_retries_total{{{process},reason="{reason}"}} {count}')
        lines += [
            "# HELP ledger_unavailable_total 503 answers by code (lock_timeout, overloaded, unavailable).",
            "# TYPE ledger_unavailable_total counter",
        ]
        for code, count in sorted(self.unavailable_answers.items()):
            lines.append(f'ledger_unavailable_total{{{process},code="{code}"}} {count}')
        lines += [
            "# HELP ledger_group_transfers Transfers per group transaction (group commit).",
            "# TYPE ledger_group_transfers histogram",
        ]
        for bound, count in zip(GROUP_BUCKETS, self.group_buckets, strict=True):
            lines.append(f'ledger_group_transfers_bucket{{{process},le="{bound}"}} {count}')
        lines.append(f'ledger_group_transfers_bucket{{{process},le="+Inf"}} {self.group_count}')
        lines.append(f"ledger_group_transfers_sum{{{process}}} {self.group_transfers}")
        lines.append(f"ledger_group_transfers_count{{{process}}} {self.group_count}")
        if self.groups is not None:
            lines += [
                "# HELP ledger_group_queue Transfers waiting for a group transaction.",
                "# TYPE ledger_group_queue gauge",
                f"ledger_group_queue{{{process}}} {self.groups.queued}",
            ]
        if self.pool is not None:
            lines += [
                "# HELP ledger_pool_connections Database connections by state.",
                "# TYPE ledger_pool_connections gauge",
                f'ledger_pool_connections{{{process},state="in_use"}} {self.pool.checkedout()}',
                f'ledger_pool_connections{{{process},state="idle"}} {self.pool.checkedin()}',
                f'ledger_pool_connections{{{process},state="overflow"}} {max(self.pool.overflow(), 0)}',
                f'ledger_pool_connections{{{process},state="waiting"}} {self.unit_of_work.waiting if self.unit_of_work else 0}',
                "# HELP ledger_pool_size Configured pool size.",
                "# TYPE ledger_pool_size gauge",
                f"ledger_pool_size{{{process}}} {self.pool.size()}",
            ]
        return "\n".join(lines) + "\n"


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
