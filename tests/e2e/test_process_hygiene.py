"""What a user sees of the process: the embedded PostgreSQL stops whenever `ledger serve`
stops (Ctrl-C, SIGTERM, a closed terminal, SIGKILL), or the next start adopts it; its
port stays put; `ledger db status|stop`; and every mistake a user can make is one line
naming the cause and a non-zero exit, before anything claims to be serving.

These run the real `ledger serve` on its own embedded PostgreSQL, as `make run` does."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ledger import __version__
from tests.conftest import REPOSITORY, free_port


def _environment(data_dir: Path, **extra: str) -> dict[str, str]:
    # Nothing of the test session's configuration: the embedded database, as on a fresh clone.
    environment = {name: value for name, value in os.environ.items() if not name.startswith("LEDGER_")}
    return {**environment, "LEDGER_DATA_DIR": str(data_dir), **extra}


def _ledger(data_dir: Path, *arguments: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ledger", *arguments],
        env=_environment(data_dir, **extra),
        capture_output=True,
        text=True,
        cwd=REPOSITORY,
        timeout=120,
    )


def _postmaster(data_dir: Path) -> tuple[int, int] | None:
    """(pid, port) of the embedded server if its pid file names a live process."""
    pid_file = data_dir / "pgdata" / "postmaster.pid"
    try:
        lines = pid_file.read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
    except (OSError, ValueError, IndexError):
        return None
    return (pid, port) if _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


def _wait_gone(pid: int, seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


STARTED: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _no_service_outlives_its_test() -> Iterator[None]:
    # A failed assertion must not leave a service (and its PostgreSQL) running.
    yield
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


class Serving:
    def __init__(self, data_dir: Path, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        with log_path.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ledger", "serve", "--port", str(self.port)],
                env=_environment(data_dir),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPOSITORY,
            )
        STARTED.append(self.process)
        deadline = time.monotonic() + 90
        while True:
            assert self.process.poll() is None, f"ledger serve exited:\n{log_path.read_text()}"
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"ledger serve did not become ready:\n{log_path.read_text()}"
            time.sleep(0.2)

    def stop(self, signum: int) -> int:
        self.process.send_signal(signum)
        return self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def data_dir() -> Iterator[Path]:
    # Not under pytest's base directory: another pytest process starting takes the
    # traversal permission off it, which the unprivileged PostgreSQL user needs.
    parent = Path(tempfile.mkdtemp(prefix="ledger-hygiene-"))
    directory = parent / "data"
    yield directory
    if (directory / "pgdata" / "PG_VERSION").exists():
        _ledger(directory, "db", "stop")
    shutil.rmtree(parent, ignore_errors=True)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_the_embedded_postgresql_stops_with_the_service(data_dir: Path, tmp_path: Path, signum: int) -> None:
    serving = Serving(data_dir, tmp_path / "serve.log")
    running = _postmaster(data_dir)
    assert running is not None, "the service should run on its embedded PostgreSQL"
    status = _ledger(data_dir, "db", "status")
    assert status.returncode == 0 and f"owned by ledger process {serving.process.pid}" in status.stdout, status
    assert status.stderr == "", "a command whose output is its answer logs nothing else by default"
    code = serving.stop(signum)
    if signum != signal.SIGKILL:
        # A graceful stop waits for the database: it is gone when the command returns.
        # SIGHUP is turned into SIGTERM (a graceful stop), hence 143 for it too.
        assert code in (0, 128 + signum, 128 + signal.SIGTERM), serving.log_path.read_text()
        assert not _alive(running[0]), f"PostgreSQL still runs after {signal.Signals(signum).name}"
    else:
        # Nothing runs in a SIGKILLed process: its watchdog stops the server.
        assert _wait_gone(running[0]), "PostgreSQL still runs 20 s after the service was SIGKILLed"
    assert _ledger(data_dir, "db", "status").returncode == 3


def test_the_port_stays_put_across_quick_restarts(data_dir: Path, tmp_path: Path) -> None:
    ports = []
    for round_ in range(2):
        serving = Serving(data_dir, tmp_path / f"serve-{round_}.log")
        running = _postmaster(data_dir)
        assert running is not None
        ports.append(running[1])
        # Leave connections in TIME_WAIT on the database's port, as a busy service does.
        for _ in range(3):
            httpx.get(f"http://127.0.0.1:{serving.port}/health/ready", timeout=5)
        assert serving.stop(signal.SIGTERM) in (0, 143)
    assert ports[0] == ports[1]


def test_an_orphaned_server_is_adopted_by_the_next_start_and_stopped_with_it(data_dir: Path, tmp_path: Path) -> None:
    serving = Serving(data_dir, tmp_path / "first.log")
    running = _postmaster(data_dir)
    assert running is not None
    # The worst case: the service and its watchdog both killed (say, by an OOM killer).
    watchdogs = subprocess.run(
        ["pgrep", "-f", f"ledger.embedded watch {data_dir.resolve()}"], capture_output=True, text=True
    ).stdout.split()
    assert watchdogs, "no watchdog runs beside the service"
    for pid in watchdogs:
        os.kill(int(pid), signal.SIGKILL)
    serving.stop(signal.SIGKILL)
    time.sleep(0.5)
    assert _alive(running[0])
    status = _ledger(data_dir, "db", "status")
    assert status.returncode == 0 and "no live ledger process" in status.stdout

    again = Serving(data_dir, tmp_path / "second.log")
    assert _postmaster(data_dir) == running, "the next start should use the running server, not start another"
    assert "adopting the embedded PostgreSQL" in again.log_path.read_text()
    again.stop(signal.SIGINT)
    assert not _alive(running[0]), "an adopted server stops with its new owner"


def test_ledger_db_stop_stops_a_server_nobody_owns(data_dir: Path, tmp_path: Path) -> None:
    serving = Serving(data_dir, tmp_path / "serve.log")
    running = _postmaster(data_dir)
    assert running is not None
    stopped = _ledger(data_dir, "db", "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not _alive(running[0])
    assert _ledger(data_dir, "db", "status").returncode == 3
    serving.stop(signal.SIGTERM)


def _taken_port() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


@pytest.mark.parametrize(
    ("environment", "arguments", "cause"),
    [
        ({"LEDGER_LOG_LEVEL": "verbose"}, ["serve"], "LEDGER_LOG_LEVEL must be one of"),
        ({"LEDGER_DATABASE_URL": "mysql://root@127.0.0.1/ledger"}, ["serve"], "must be a PostgreSQL URL"),
        ({"LEDGER_PORT": "eighty"}, ["serve"], "LEDGER_PORT='eighty' is not a valid int"),
        ({"LEDGER_WORKERS": "0"}, ["serve"], "LEDGER_WORKERS must be positive"),
        ({"LEDGER_ADMIN_KEY": "short"}, ["serve"], "LEDGER_ADMIN_KEY must be at least"),
        ({"LEDGER_DATABASE_URL": "postgresql://ledger@127.0.0.1:1/ledger"}, ["serve"], "Connect call failed"),
        ({"LEDGER_DATABASE_URL": "postgresql://ledger@127.0.0.1:1/ledger"}, ["migrate"], "Connect call failed"),
        ({"LEDGER_DATABASE_URL": "postgresql://ledger@no-such-host.invalid/ledger"}, ["migrate"], "no-such-host"),
        ({"LEDGER_DATA_DIR": "/proc/no-such-dir/ledger"}, ["serve"], "No such file or directory: /proc/no-such-dir"),
    ],
)
def test_a_mistake_is_one_line_naming_its_cause(
    tmp_path: Path, environment: dict[str, str], arguments: list[str], cause: str
) -> None:
    if arguments == ["serve"]:
        arguments = ["serve", "--port", str(free_port())]
    result = _ledger(tmp_path / "data", *arguments, **environment)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{result.stderr}"
    assert lines[0].startswith("ledger: ") and cause in lines[0], lines[0]
    assert "serving on" not in result.stdout + result.stderr


def test_a_taken_port_is_reported_before_anything_starts(tmp_path: Path) -> None:
    for port in _taken_port():
        result = _ledger(tmp_path / "data", "serve", "--port", str(port))
        assert result.returncode == 2
        assert result.stderr.strip() == (
            f"ledger: cannot listen on 127.0.0.1:{port}: Address already in use (is another service using the "
            "port? choose another with --port or LEDGER_PORT)"
        )
        # Refused before the embedded PostgreSQL was even created.
        assert not (tmp_path / "data" / "pgdata").exists()


def test_version() -> None:
    result = _ledger(REPOSITORY / ".ledger-unused", "--version")
    assert result.returncode == 0 and result.stdout.strip() == f"ledger {__version__}"
