"""uvicorn's httptools protocol, with the limits it lacks, so that no client can stall it.

uvicorn with httptools puts no bound on the size of a request's headers (one 64 MB
header on `/health/live` froze every client for 11.8 s while the parser accumulated it)
and no time limit on a connection that never sends a request, or sends it one byte at a
time. This subclass adds, per connection (settings in `ledger.settings`):

- `max_header_bytes`: the request line and headers together, counted as they arrive;
  past it the request is answered 431 (problem+json) and the connection closed, before
  the parser has to hold any more of it;
- `header_timeout_seconds`: from the connection, or from the read that brought the first
  part of a request's headers, to their end; past it the connection is closed (408 if
  part of a request came);
- `body_timeout_seconds`: from the read that completed the headers to the end of the
  body; past it the connection is closed (the handler waiting for the body sees the
  client gone);
- between requests, uvicorn's own keep-alive timeout (`keep_alive_timeout_seconds`).

It also offers the application an ASGI scope extension, `ledger.abort`: a callable that
closes the connection without completing the response, for a response that must not
end as if it were complete (a statement export past its time budget).

The hot path pays an addition and a comparison per read, and a request that arrives in
one read (the usual case) arms no timer (loadtest/README.md has the measurement against
plain httptools and h11).

uvicorn creates protocols itself (in every worker process), so the limits are read from
the `LEDGER_*` environment on first use, or set with `configure` when serving in-process.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ledger.settings import Settings

logger = logging.getLogger("ledger.http")
ABORT_EXTENSION = "ledger.abort"


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_header_bytes: int
    header_timeout_seconds: float
    body_timeout_seconds: float

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(settings.max_header_bytes, settings.header_timeout_seconds, settings.body_timeout_seconds)


_limits: ConnectionLimits | None = None


def configure(limits: ConnectionLimits) -> None:
    global _limits
    _limits = limits


def _current_limits() -> ConnectionLimits:
    global _limits
    if _limits is None:
        _limits = ConnectionLimits.from_settings(Settings.from_env())
    return _limits


def _problem(status: int, reason: bytes, code: str, title: str, detail: str) -> bytes:
    body = (
        f'{{"type":"urn:ledger:problem:{code}","title":"{title}","status":{status},'
        f'"detail":"{detail}","code":"{code}"}}'
    ).encode()
    head = (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/problem+json\r\ncontent-length: %d\r\n"
        b"x-request-id: %s\r\nconnection: close\r\n\r\n"
    ) % (status, reason, len(body), uuid.uuid4().hex.encode())
    return head + body


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limits = _current_limits()
        self._head_bytes = 0
        self._tail = b""
        self._in_body = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None

    # -- connection ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # A connection that never sends a request is closed too.
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._in_body:
            # Counted before the parser sees the bytes, so that it never holds more than
            # the limit plus one read.
            before = self._head_bytes
            self._head_bytes += len(data)
            if self._head_bytes > self._limits.max_header_bytes and self._head_too_large(before, data):
                self._refuse(
                    431, b"Request Header Fields Too Large", "request_header_fields_too_large",
                    "Request headers too large",
                    f"the request line and headers exceed {self._limits.max_header_bytes} bytes",
                )  # fmt: skip
                return
            self._tail = data[-3:]
        super().data_received(data)
        # A request usually arrives whole in one read: timers are only armed for what is
        # still incomplete after it, so the common case creates none.
        if self.transport.is_closing():
            return
        if self._in_body:
            if self._body_timer is None:
                self._body_timer = self.loop.call_later(self._limits.body_timeout_seconds, self._body_timed_out)
        elif self._head_bytes and self._head_timer is None:
            self._arm_head_timer()

    def _head_too_large(self, before: int, data: bytes) -> bool:
        """Past the limit counting the whole read: unless the headers end within the
        limit in this read (the rest is the body that follows them)."""
        end = (self._tail + data).find(b"\r\n\r\n")
        return end < 0 or before - len(self._tail) + end + 4 > self._limits.max_header_bytes

    # -- parser callbacks -------------------------------------------------------------------

    def on_headers_complete(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._in_body = True
        super().on_headers_complete()
        self.scope["extensions"] = {ABORT_EXTENSION: self._abort}  # type: ignore[typeddict-unknown-key]

    def on_message_complete(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        self._in_body = False
        self._head_bytes = 0
        self._tail = b""
        super().on_message_complete()

    # -- limits -------------------------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        self._cancel(self._head_timer)
        self._head_timer = self.loop.call_later(self._limits.header_timeout_seconds, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_bytes:
            self._refuse(
                408, b"Request Timeout", "request_timeout", "Request timeout",
                f"the request's headers did not arrive within {self._limits.header_timeout_seconds} s",
            )  # fmt: skip
        else:
            self.transport.close()

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if not self.transport.is_closing():
            logger.info("closing a connection whose request body did not arrive in time")
            self.transport.close()

    def _refuse(self, status: int, reason: bytes, code: str, title: str, detail: str) -> None:
        logger.warning("%d %s from %s", status, code, self.client[0] if self.client else "?")
        self._cancel_timers()
        self.transport.write(_problem(status, reason, code, title, detail))
        self.transport.close()

    def _abort(self) -> None:
        """Close the connection mid-response; uvicorn then treats the client as gone
        rather than the application as broken."""
        if self.cycle is not None:
            self.cycle.disconnected = True
        self.transport.close()

    def _cancel_timers(self) -> None:
        self._cancel(self._head_timer)
        self._cancel(self._body_timer)
        self._head_timer = self._body_timer = None

    @staticmethod
    def _cancel(timer: asyncio.TimerHandle | None) -> None:
        if timer is not None:
            timer.cancel()
