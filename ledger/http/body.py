"""Request bodies: who may send one, and strict JSON decoding.

Every request that carries a body, and every POST, PUT or PATCH even with an empty one,
must say `Content-Type: application/json` (`check_request_body`, run before any handler
decodes anything). A browser sends a cross-site form or a `no-cors` fetch only as
`application/x-www-form-urlencoded`, `multipart/form-data` or `text/plain`; a JSON content
type needs a CORS preflight, which this service never grants. So no page a user visits
can make their browser move money, even in a development setup without keys.

The same check refuses, with 400, bodies that are not valid UTF-8 and JSON objects that
repeat a key (`{"amount": 1, "amount": 1000}`): a proxy or a client library that takes
the first occurrence would disagree with a decoder that takes the last.

Litestar converts bodies leniently (it would accept `"amount": "100"` or `100.0`);
money must be an integer and nothing else, so handlers decode the raw body again here
with `strict=True`. The `data` parameter Litestar decodes first still documents the
body in the OpenAPI schema and rejects what is already malformed.
"""

from __future__ import annotations

import json
import re
from typing import TypeVar

import msgspec
from litestar import Request

from ledger.domain import IDENTIFIER_RE
from ledger.errors import InvalidRequest, LedgerError, UnsupportedMediaType
from ledger.http.problems import field_errors_from_msgspec

T = TypeVar("T")
METHODS_WITH_BODIES = frozenset({"POST", "PUT", "PATCH"})
DOTS = re.compile(r"\.+")


def _is_json(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))


def _carries_body(request: Request) -> bool:
    if request.method in METHODS_WITH_BODIES:
        return True
    headers = request.headers
    return headers.get("content-length", "0").strip() not in ("", "0") or "transfer-encoding" in headers


async def check_request_body(request: Request) -> None:
    """Part of the app's `before_request` hook: runs after authentication, before any body is
    decoded (the body read here is cached for the handler)."""
    if not _carries_body(request):
        return
    content_type = request.headers.get("content-type", "")
    if not _is_json(content_type):
        raise UnsupportedMediaType(
            f"send Content-Type: application/json (even with an empty body), got {content_type or 'none'!r}"
        )
    body = await request.body()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidRequest(
            f"the body is not valid UTF-8 (byte {error.start})", [{"field": "body", "message": "not valid UTF-8"}]
        ) from error
    repeated = repeated_key(text)
    if repeated is not None:
        raise InvalidRequest(
            f"the JSON object repeats the key {repeated!r}",
            [{"field": repeated, "message": "a key may appear only once in an object"}],
        )


class _Repeated(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise _Repeated(key)
        seen.add(key)
    return dict(pairs)


# Built once: `json.loads` with a hook builds a decoder on every call.
_PAIRS_DECODER = json.JSONDecoder(object_pairs_hook=_pairs)


def repeated_key(body: bytes | str) -> str | None:
    """The first key some object of `body` repeats, or None (also for JSON that does not
    parse: the strict decoder reports that with a better message)."""
    if not body:
        return None
    try:
        _PAIRS_DECODER.decode(body if isinstance(body, str) else body.decode("utf-8"))
    except _Repeated as repeated:
        return repeated.key[:64]
    except (ValueError, RecursionError):  # UnicodeDecodeError included
        return None
    return None


def path_identifier(value: str, not_found: type[LedgerError], kind: str) -> str:
    """An id taken from the path: made only of dots it is a 400 (the path is ambiguous),
    otherwise malformed it names nothing (404)."""
    if DOTS.fullmatch(value):
        raise InvalidRequest(
            f"{value!r} is not an identifier: ids made only of dots are refused",
            [{"field": "path", "message": "an id made only of dots"}],
        )
    if not IDENTIFIER_RE.fullmatch(value):
        raise not_found(f"no {kind} with id {value!r}")
    return value


async def decode_strict(request: Request, kind: type[T]) -> T:
    content_type = request.headers.get("content-type", "")
    if not _is_json(content_type):
        raise UnsupportedMediaType(f"expected Content-Type: application/json, got {content_type or 'none'!r}")
    body = await request.body()
    try:
        return msgspec.json.decode(body, type=kind, strict=True)
    except msgspec.ValidationError as error:
        errors = field_errors_from_msgspec(str(error))
        raise InvalidRequest(
            "; ".join(f"{e.field}: {e.message}" for e in errors),
            [{"field": e.field, "message": e.message} for e in errors],
        ) from error
    except msgspec.DecodeError as error:
        raise InvalidRequest(f"the body is not valid JSON: {error}") from error
    except RecursionError as error:
        raise InvalidRequest("the JSON body is nested too deeply") from error
