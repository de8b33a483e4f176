"""Receiving the ledger's webhook deliveries: checking their signature, reading their event.

A delivery is a POST whose body is one event (as `GET /v1/events` lists them), signed in
its `Ledger-Signature` header:

    Ledger-Signature: t=1700000000,v1=5257a869e7ecebeda32affa62cdca3fa51cad7e77a0e56ff536d0ce8e108d8bd

`v1` is the hex HMAC-SHA256 of `f"{t}.".encode() + body`, keyed with the webhook's whole
secret (`"whsec_..."`, UTF-8). Signing the timestamp with the body lets a receiver refuse a
recorded delivery sent again later; several `v1` entries (one per secret while a secret is
being replaced) are all tried, and schemes other than `v1` are ignored.

    from ledger.client.webhooks import InvalidSignature, parse_event, verify_signature

    def receive(headers, body: bytes):
        try:
            verify_signature(secret, body, headers.get("Ledger-Signature", ""))
        except InvalidSignature:
            return 400
        event = parse_event(body)
        ...  # deliveries may repeat: process each `event.id` once

Verify the raw bytes received, before any JSON parsing: re-encoding a parsed body does not
give back the bytes that were signed. `sign` and `verify_signature` use the standard
library only, so the service signs with the same code that receivers check with.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Sequence

import msgspec

from ledger.client.errors import InvalidSignature
from ledger.client.models import Event

__all__ = ["SIGNATURE_HEADER", "InvalidSignature", "parse_event", "sign", "verify_signature"]

SIGNATURE_HEADER = "Ledger-Signature"
DEFAULT_TOLERANCE_SECONDS = 300

_TIMESTAMP = re.compile(r"[0-9]+")
_event_decoder = msgspec.json.Decoder(Event)


def _signature(secret: str, body: bytes, timestamp: int) -> str:
    return hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def _raw(body: bytes) -> bytes:
    if not isinstance(body, (bytes, bytearray, memoryview)):
        # A str would have to be encoded again, and a parsed body re-serialised: neither
        # is sure to give back the bytes that were signed.
        raise TypeError(f"body must be the raw bytes of the request, got {type(body).__name__}")
    return bytes(body)


def sign(secret: str | Sequence[str], body: bytes, timestamp: float) -> str:
    """The `Ledger-Signature` value for `body` sent at `timestamp` (Unix seconds; a float
    is truncated to whole seconds): `t=<timestamp>,v1=<hex>`, with one `v1` per secret
    when given several (while a webhook's secret is being replaced)."""
    secrets = [secret] if isinstance(secret, str) else list(secret)
    if not secrets:
        raise ValueError("at least one secret is needed")
    moment = int(timestamp)
    raw = _raw(body)
    return ",".join([f"t={moment}", *(f"v1={_signature(key, raw, moment)}" for key in secrets)])


def verify_signature(
    secret: str,
    body: bytes,
    header: str,
    *,
    tolerance_seconds: int = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> None:
    """Return when `header` (the `Ledger-Signature` value) signs `body` with `secret` at
    a time within `tolerance_seconds` of `now` (default: this machine's clock) either
    way; raise `InvalidSignature` otherwise. `body` is the request's raw bytes."""
    if tolerance_seconds < 0:
        raise ValueError("tolerance_seconds must not be negative")
    raw = _raw(body)
    timestamp, candidates = _parse(header)
    expected = _signature(secret, raw, timestamp).encode("ascii")
    # Every candidate is compared, in constant time: how long the check takes tells an
    # attacker nothing about which one, or how much of it, was right.
    matched = False
    for candidate in candidates:
        matched |= hmac.compare_digest(expected, candidate)
    if not matched:
        raise InvalidSignature("no v1 signature of the header matches this body and secret")
    moment = time.time() if now is None else now
    if abs(moment - timestamp) > tolerance_seconds:
        # Signed, but not now: a delivery recorded and sent again, or a clock far off.
        raise InvalidSignature(
            f"signature timestamp {timestamp} is {moment - timestamp:+.0f} s from now (tolerance {tolerance_seconds} s)"
        )


def _parse(header: str) -> tuple[int, list[bytes]]:
    if not header or not isinstance(header, str):
        raise InvalidSignature(f"no {SIGNATURE_HEADER} header")
    timestamps: list[str] = []
    candidates: list[bytes] = []
    for part in header.split(","):
        scheme, equals, value = part.strip().partition("=")
        if not equals or not scheme:
            raise InvalidSignature(f"malformed {SIGNATURE_HEADER} header: {header[:200]!r}")
        if scheme == "t":
            timestamps.append(value.strip())
        elif scheme == "v1":
            # Hex is compared lower-case; as bytes, since compare_digest refuses non-ASCII str.
            candidates.append(value.strip().lower().encode("utf-8"))
        # Other schemes (a newer signature alongside v1) are not this client's to check.
    if len(timestamps) != 1 or not _TIMESTAMP.fullmatch(timestamps[0]):
        raise InvalidSignature(f"{SIGNATURE_HEADER} header needs exactly one t=<unix seconds>: {header[:200]!r}")
    if not candidates:
        raise InvalidSignature(f"{SIGNATURE_HEADER} header has no v1 signature: {header[:200]!r}")
    return int(timestamps[0]), candidates


def parse_event(body: bytes) -> Event:
    """The event a delivery carries (check its signature first). Raises
    `msgspec.DecodeError` or `msgspec.ValidationError` for a body that is not an event."""
    return _event_decoder.decode(_raw(body))
