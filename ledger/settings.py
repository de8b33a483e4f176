"""Settings, read once from `LEDGER_*` environment variables.

Every limit the service enforces has a name here (TigerStyle: put a limit on everything),
so an operator can see and tune all of them in one place and the README can list them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path


class SettingsError(ValueError):
    """A `LEDGER_*` variable holds a value the service cannot use."""


@dataclass(frozen=True, slots=True)
class Settings:
    # Where the database is. Unset means: start the embedded PostgreSQL in `data_dir`.
    # The service serves with `database_url`, a role with only the privileges it needs;
    # migrations run with `migration_database_url` (default: the same), the tables' owner.
    database_url: str | None = None
    migration_database_url: str | None = None
    # What stands between the service and PostgreSQL: `none`, or `transaction` for a
    # pooler in transaction mode (PgBouncer's pool_mode=transaction), where consecutive
    # transactions of one client connection may run on different server sessions: then
    # no named prepared statements and nothing session-scoped (ledger.database).
    database_pooler: str = "none"
    # The embedded PostgreSQL, the chain keys, the first admin key and the checkpoints.
    data_dir: Path = Path(".ledger")
    # Serving as a superuser or as the tables' owner defeats the append-only journal and
    # the least-privilege role: refused unless this is set (and then logged at every start).
    allow_privileged_role: bool = False

    # Authentication (see ledger.service.keys). The admin key is a secret: kept out of repr.
    # It always applies: only this explicit development setting turns it off.
    admin_key: str | None = field(default=None, repr=False)
    insecure_disable_auth: bool = False

    # Tamper evidence (ledger.integrity): chain keys as `id:secret` items, newest first;
    # unset, they are kept in `<data_dir>/chain-keys` (created at the first start).
    chain_keys: str | None = field(default=None, repr=False)
    # Signed checkpoints of every account's head, written outside the database
    # (default `<data_dir>/checkpoints`) every interval (0: only `ledger audit checkpoint`).
    checkpoint_dir: Path | None = None
    checkpoint_interval_seconds: float = 60.0
    checkpoint_keep: int = 10

    # HTTP server.
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    log_level: str = "info"
    # One JSON line per request (method, route, status, duration, request id).
    access_log: bool = True
    # What one connection may cost the server: request line and headers together (431
    # past it), time to send them (from the connection or the request's first byte),
    # time to send a body once the headers are in, and idle time between requests.
    max_header_bytes: int = 16_384
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 30.0
    keep_alive_timeout_seconds: float = 5.0

    # Connection pool, passed explicitly to create_async_engine.
    pool_size: int = 20
    max_overflow: int = 10
    pool_timeout_seconds: float = 5.0
    pool_recycle_seconds: int = 1800
    pool_pre_ping: bool = False
    # Audits and exports (verification, CSV statements, trial balances, checkpoints) use a
    # pool of their own, so they can never take the connections transfers need, and a
    # time budget each.
    audit_pool_size: int = 2
    audit_timeout_seconds: float = 120.0
    export_timeout_seconds: float = 300.0
    # Statement pages read and formatted at once per process, however many exports run:
    # exports then take the CPU one page (about 10 ms) at a time, between other requests.
    export_concurrency: int = 1

    # A streaming replica (ledger.service.replica): with a URL, the heavy reads (lists,
    # journals, statements, balances as of an instant, trial balances, verification) are
    # served there once it has replayed every write acknowledged before the request,
    # waited for at most `replica_max_wait_ms` (past it, or with the replica unreachable:
    # the primary answers). Its pool is its own, small, and impatient.
    replica_database_url: str | None = None
    replica_max_wait_ms: int = 500
    replica_pool_size: int = 5
    replica_connect_timeout_seconds: float = 1.0

    # Server-side limits, set on every connection so that nothing waits forever.
    lock_timeout_ms: int = 2000
    statement_timeout_ms: int = 10000
    idle_in_transaction_timeout_ms: int = 30000

    # Group commit (ledger.service.groups): transfers that arrive while transactions are
    # in flight share the next one. At most `group_concurrency` group transactions at once
    # per process, each of at most `group_max_transfers` transfers (a batch is never
    # split), at most `group_queue_limit` transfers waiting (past it: 503 overloaded); a
    # group waits `group_lock_timeout_ms` for a lock before it splits into its members.
    # With one group in flight, a second starts only once `group_overlap_min` transfers
    # are queued: a request arriving just after a commit would otherwise take a whole
    # transaction for itself (16 clients, uniform: 1,005 transfers/s with 1, 1,095 with 8,
    # mean group 4.6 against 7.4; loadtest/README.md). With none in flight, one goes.
    group_concurrency: int = 2
    group_max_transfers: int = 1000
    group_queue_limit: int = 20_000
    group_lock_timeout_ms: int = 250
    group_overlap_min: int = 8

    # POST /v1/transfers answered without the framework when the request needs none of
    # it (ledger.http.fast); anything unusual still goes through Litestar. Off: every
    # request does.
    transfer_fast_path: bool = True

    # Whole-transaction retries on serialization failures and deadlocks.
    max_retries: int = 5
    retry_base_delay_ms: int = 5

    # What a client may send.
    max_body_bytes: int = 1_048_576
    max_batch_size: int = 1000
    max_page_size: int = 1000
    default_page_size: int = 100

    # The expiry sweeper: how often it looks for due reservations (0 turns it off; lazy
    # expiry still applies) and how many it releases per transaction.
    expiry_sweep_interval_seconds: float = 1.0
    expiry_sweep_limit: int = 100

    # Seconds a client is told to wait in `Retry-After` when the service answers 503.
    retry_after_seconds: int = 1

    # The event feed (ledger.service.events). The sequencer runs at once after this
    # process's writes, and every `events_tick_seconds` for other processes' (the delay a
    # long-poll may see when no NOTIFY reaches it, e.g. behind a transaction pooler).
    # Events older than `events_retention_days` are removed (0: kept for ever); a cursor
    # before them answers 410 `cursor_expired`. LISTEN needs a direct connection:
    # `events_listen_database_url` (default: the database URL, unless behind a pooler).
    events_tick_seconds: float = 1.0
    events_retention_days: float = 30.0
    events_listen_database_url: str | None = None

    # Webhooks (ledger.service.webhooks). Targets must match `webhook_allowed_hosts`:
    # comma-separated host names (`*.example.com` for subdomains) and IP networks (a host
    # name not listed must resolve only to addresses in a listed network; `*` allows
    # any). Loopback only by default, against server-side request forgery. A delivery not
    # acknowledged is retried with exponential backoff and jitter, from
    # `webhook_backoff_base_seconds` up to `webhook_backoff_max_seconds` between
    # attempts, for `webhook_retry_horizon_seconds` after the event; then it fails and the
    # subscription is marked `failing` (until a delivery succeeds again).
    webhook_allowed_hosts: str = "localhost,127.0.0.0/8,::1"
    webhook_timeout_seconds: float = 10.0
    webhook_backoff_base_seconds: float = 1.0
    webhook_backoff_max_seconds: float = 3600.0
    webhook_retry_horizon_seconds: float = 86400.0
    webhook_concurrency: int = 8

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Build settings from `LEDGER_<FIELD>` variables; explicit overrides win."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for setting in fields(cls):
            raw = environ.get(f"LEDGER_{setting.name.upper()}")
            if raw is None or raw == "":
                continue
            values[setting.name] = _parse(setting.name, setting.type, raw)
        values.update(overrides)
        settings = cls(**values)  # type: ignore[arg-type]
        settings.validate()
        return settings

    def validate(self) -> None:
        positive = {
            "port": self.port,
            "workers": self.workers,
            "pool_size": self.pool_size,
            "pool_timeout_seconds": self.pool_timeout_seconds,
            "lock_timeout_ms": self.lock_timeout_ms,
            "statement_timeout_ms": self.statement_timeout_ms,
            "max_body_bytes": self.max_body_bytes,
            "max_batch_size": self.max_batch_size,
            "expiry_sweep_limit": self.expiry_sweep_limit,
            "max_header_bytes": self.max_header_bytes,
            "header_timeout_seconds": self.header_timeout_seconds,
            "body_timeout_seconds": self.body_timeout_seconds,
            "keep_alive_timeout_seconds": self.keep_alive_timeout_seconds,
            "audit_pool_size": self.audit_pool_size,
            "replica_pool_size": self.replica_pool_size,
            "replica_connect_timeout_seconds": self.replica_connect_timeout_seconds,
            "audit_timeout_seconds": self.audit_timeout_seconds,
            "export_timeout_seconds": self.export_timeout_seconds,
            "export_concurrency": self.export_concurrency,
            "checkpoint_keep": self.checkpoint_keep,
            "group_concurrency": self.group_concurrency,
            "group_max_transfers": self.group_max_transfers,
            "group_queue_limit": self.group_queue_limit,
            "group_lock_timeout_ms": self.group_lock_timeout_ms,
            "group_overlap_min": self.group_overlap_min,
            "max_page_size": self.max_page_size,
            "default_page_size": self.default_page_size,
            "events_tick_seconds": self.events_tick_seconds,
            "webhook_timeout_seconds": self.webhook_timeout_seconds,
            "webhook_backoff_base_seconds": self.webhook_backoff_base_seconds,
            "webhook_backoff_max_seconds": self.webhook_backoff_max_seconds,
            "webhook_retry_horizon_seconds": self.webhook_retry_horizon_seconds,
            "webhook_concurrency": self.webhook_concurrency,
        }
        for name, value in positive.items():
            if value <= 0:
                raise SettingsError(f"LEDGER_{name.upper()} must be positive, got {value}")
        if (
            self.max_overflow < 0
            or self.max_retries < 0
            or self.retry_after_seconds < 0
            or self.expiry_sweep_interval_seconds < 0
            or self.checkpoint_interval_seconds < 0
            or self.events_retention_days < 0
        ):
            raise SettingsError(
                "LEDGER_MAX_OVERFLOW, LEDGER_MAX_RETRIES, LEDGER_RETRY_AFTER_SECONDS, "
                "LEDGER_EXPIRY_SWEEP_INTERVAL_SECONDS, LEDGER_CHECKPOINT_INTERVAL_SECONDS and "
                "LEDGER_EVENTS_RETENTION_DAYS must be >= 0"
            )
        if self.admin_key is not None and not ADMIN_KEY_RE.fullmatch(self.admin_key):
            raise SettingsError(
                f"LEDGER_ADMIN_KEY must be at least {MIN_ADMIN_KEY_LENGTH} printable characters without spaces "
                f"(got {len(self.admin_key)}); generate one with: "
                "python3 -c 'import secrets; print(\"lk_\" + secrets.token_urlsafe(32))'"
            )
        if self.database_pooler not in DATABASE_POOLERS:
            raise SettingsError(
                f"LEDGER_DATABASE_POOLER must be one of {', '.join(DATABASE_POOLERS)}, got {self.database_pooler!r}"
            )
        if self.log_level.lower() not in LOG_LEVELS:
            raise SettingsError(f"LEDGER_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.replica_max_wait_ms < 0:
            raise SettingsError(f"LEDGER_REPLICA_MAX_WAIT_MS must be >= 0, got {self.replica_max_wait_ms}")
        for name in ("database_url", "migration_database_url", "replica_database_url", "events_listen_database_url"):
            url = getattr(self, name)
            if url is not None:
                scheme = url.strip().partition("://")[0].lower()
                if "://" not in url or scheme not in DATABASE_SCHEMES:
                    raise SettingsError(
                        f"LEDGER_{name.upper()} must be a PostgreSQL URL (postgresql://user:password@host:5432/db), "
                        f"got one starting {scheme[:20]!r}"
                    )
        if self.default_page_size > self.max_page_size:
            raise SettingsError("LEDGER_DEFAULT_PAGE_SIZE must not exceed LEDGER_MAX_PAGE_SIZE")
        if self.lock_timeout_ms >= self.statement_timeout_ms:
            # A lock wait is part of a statement: a lock timeout at or above the statement
            # timeout would never fire, and clients would get the less precise error.
            raise SettingsError("LEDGER_LOCK_TIMEOUT_MS must be below LEDGER_STATEMENT_TIMEOUT_MS")

    @property
    def chain_key_file(self) -> Path:
        return self.data_dir / "chain-keys"

    @property
    def admin_key_file(self) -> Path:
        """Where the first start stores the admin key it creates (mode 0600)."""
        return self.data_dir / "admin.key"

    @property
    def checkpoints(self) -> Path:
        return self.checkpoint_dir or self.data_dir / "checkpoints"


LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
DATABASE_POOLERS = ("none", "transaction")
DATABASE_SCHEMES = ("postgresql", "postgres", "postgresql+asyncpg")
MIN_ADMIN_KEY_LENGTH = 32
ADMIN_KEY_RE = re.compile(rf"[\x21-\x7e]{{{MIN_ADMIN_KEY_LENGTH},}}")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse(name: str, annotation: object, raw: str) -> object:
    kind = str(annotation)
    try:
        if kind == "bool":
            lowered = raw.strip().lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
            raise ValueError(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind in ("Path", "Path | None"):
            return Path(raw)
    except ValueError as error:
        raise SettingsError(f"LEDGER_{name.upper()}={raw!r} is not a valid {kind}") from error
    return raw


def setting_names() -> list[str]:
    """Every environment variable the service reads (used by docs and the compose test)."""
    return [f"LEDGER_{setting.name.upper()}" for setting in fields(Settings)]
