"""Strict JSON decoding of request bodies.

Litestar converts bodies leniently (it would accept `"amount": "100"` or `100.0`);
money must be an integer and nothing else, so handlers decode the raw body again here
with `strict=True`. The `data` parameter Litestar decodes first still documents the
body in the OpenAPI schema and rejects what is already malformed.
"""

from __future__ import annotations

from typing import TypeVar

import msgspec
from litestar import Request

from ledger.errors import InvalidRequest, UnsupportedMediaType
from ledger.http.problems import field_errors_from_msgspec

T = TypeVar("T")


def _is_json(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))


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
