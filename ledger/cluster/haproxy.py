"""HAProxy in front of several service instances: one base URL for clients.

Why HAProxy and these settings:
- `balance leastconn`: a request goes to the instance with the fewest in flight, so a
  slow instance (a long CSV export) gets fewer new requests than round robin would give it;
- health checks on `GET /health/ready` every second: an instance that stops or loses its
  database leaves the rotation within two failed checks and comes back at the first
  good one;
- retries only when the connection to an instance could not be made (HAProxy's default
  `retry-on conn-failure`): the request was not sent, so retrying it elsewhere cannot
  apply a transfer twice. A request that reached an instance is never re-sent by the
  proxy; the client retries by transfer id, which the ledger makes safe;
- HAProxy's own Prometheus exporter at `/haproxy/metrics` (Debian's build has it), next
  to each instance's `/metrics`.

Debian's package: `apt-get install haproxy`.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

HAPROXY = "haproxy"


class HAProxyError(RuntimeError):
    pass


def haproxy_binary() -> str:
    found = shutil.which(HAPROXY) or next((p for p in ("/usr/sbin/haproxy",) if Path(p).exists()), None)
    if found is None:
        raise HAProxyError("HAProxy is not installed: install Debian's package with `apt-get install haproxy`")
    return found


def config(port: int, instances: list[tuple[str, int]], stats_port: int | None = None) -> str:
    servers = "\n".join(f"    server instance{n} {host}:{p} check" for n, (host, p) in enumerate(instances, 1))
    return f"""# Written by ledger/cluster/haproxy.py: see its docstring for why each setting.
global
    maxconn 4096
    # One thread: on a small machine the proxy must not take cores from the instances.
    nbthread 1

defaults
    mode http
    option http-keep-alive
    timeout connect 2s
    # Longer than the longest request the service serves (a large CSV export).
    timeout client 120s
    timeout server 120s
    timeout http-request 10s
    retries 2
    option redispatch

frontend ledger
    bind 127.0.0.1:{port}
    http-request use-service prometheus-exporter if {{ path /haproxy/metrics }}
    default_backend instances

backend instances
    balance leastconn
    option httpchk GET /health/ready
    http-check expect status 200
    default-server inter 1s fall 2 rise 1
{servers}
"""


class HAProxy:
    """One HAProxy process in the foreground (a child of whoever starts it)."""

    def __init__(self, directory: Path, port: int, instances: list[tuple[str, int]]) -> None:
        self.directory = Path(directory)
        self.port = port
        self.instances = instances
        self.config_file = self.directory / "haproxy.cfg"
        self.log_file = self.directory / "haproxy.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        binary = haproxy_binary()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(config(self.port, self.instances))
        check = subprocess.run([binary, "-c", "-q", "-f", str(self.config_file)], capture_output=True, text=True)
        if check.returncode != 0:
            raise HAProxyError(f"HAProxy refused its configuration: {check.stderr.strip() or check.stdout.strip()}")
        with self.log_file.open("ab") as log:
            # -db: stay in the foreground, so the process that started it owns it.
            self.process = subprocess.Popen(
                [binary, "-db", "-f", str(self.config_file)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise HAProxyError(
                    f"HAProxy exited with {self.process.returncode}: {self.log_file.read_text()[-2000:]}"
                )
            with socket.socket() as probe:
                probe.settimeout(0.5)
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise HAProxyError(f"HAProxy did not listen on 127.0.0.1:{self.port} within {timeout} s")

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        # SIGUSR1: a soft stop, connections in flight finish; then a hard one if it lingers.
        self.process.send_signal(signal.SIGUSR1)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
