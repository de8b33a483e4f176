"""Opaque keyset cursors: base64url of the last row's sort key, as JSON."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime, timedelta
from typing import Any

from ledger.domain import IDENTIFIER_RE
from ledger.errors import InvalidCursor
from ledger.integrity import EPOCH

MAX_CURSOR_LENGTH = 512
MIN_BIGINT, MAX_BIGINT = -(2**63), 2**63 - 1


def encode_cursor(key: list[Any]) -> str:
    raw = json.dumps(key, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(cursor: str, shape: tuple[type, ...]) -> list[Any]:
    """Decode a cursor whose key has the given element types, or raise InvalidCursor."""
    if len(cursor) > MAX_CURSOR_LENGTH:
        raise InvalidCursor("cursor is too long")
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        key = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (ValueError, UnicodeError, binascii.Error) as error:
        raise InvalidCursor("cursor is not one this service issued") from error
    if not isinstance(key, list) or len(key) != len(shape):
        raise InvalidCursor("cursor is not one this service issued")
    for value, kind in zip(key, shape, strict=True):
        # bool is an int in Python; a cursor never holds one.
        if not isinstance(value, kind) or isinstance(value, bool):
            raise InvalidCursor("cursor is not one this service issued")
        # Values go into queries: keep them within what PostgreSQL can bind (a forged
        # cursor must be a 400, not a driver error).
        if isinstance(value, int) and not MIN_BIGINT <= value <= MAX_BIGINT:
            raise InvalidCursor("cursor is not one this service issued")
        # Cursor strings are always ids (of accounts or transfers).
        if isinstance(value, str) and not IDENTIFIER_RE.fullmatch(value):
            raise InvalidCursor("cursor is not one this service issued")
    return key


def cursor_time(value: int) -> datetime:
    """A timestamp kept in a cursor as microseconds since the epoch."""
    try:
        return EPOCH + timedelta(microseconds=value)
    except OverflowError as error:
        raise InvalidCursor("cursor is not one this service issued") from error
