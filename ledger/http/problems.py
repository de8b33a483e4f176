"""Every error becomes an RFC 9457 problem response here, and only here."""

from __future__ import annotations

import logging
import re

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.datastructures import ResponseSpec

from ledger.errors import (
    BatchTooLarge,
    Conflict,
    CursorExpired,
    DecisionRefused,
    Forbidden,
    InvalidRequest,
    LedgerError,
    NotFound,
    TransferRefused,
    Unavailable,
    UnsupportedMediaType,
    WebhookUrlNotAllowed,
)
from ledger.http.schemas import FieldError, Problem
from ledger.service.unit_of_work import translate

logger = logging.getLogger("ledger.http")

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_PREFIX = "urn:ledger:problem:"

# LedgerError class -> HTTP status. Subclasses inherit their parent's status.
STATUS_BY_ERROR: dict[type[LedgerError], int] = {
    InvalidRequest: 400,
    UnsupportedMediaType: 415,
    BatchTooLarge: 413,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    Unavailable: 503,
    CursorExpired: 410,
    WebhookUrlNotAllowed: 422,
}

# Framework errors (routing, body size, malformed JSON) by status: code and title.
HTTP_CODES: dict[int, tuple[str, str]] = {
    400: ("validation_error", "The request is not valid"),
    401: ("unauthenticated", "Authentication required"),
    403: ("forbidden", "Forbidden"),
    404: ("not_found", "Not found"),
    405: ("method_not_allowed", "Method not allowed"),
    406: ("not_acceptable", "Not acceptable"),
    413: ("request_too_large", "Request body too large"),
    415: ("unsupported_media_type", "Unsupported media type"),
    429: ("too_many_requests", "Too many requests"),
}


def problem_response(
    status: int,
    code: str,
    title: str,
    detail: str,
    *,
    errors: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
    transfer_id: str | None = None,
) -> Response[bytes]:
    body = Problem(
        type=PROBLEM_TYPE_PREFIX + code,
        title=title,
        status=status,
        detail=detail,
        code=code,
        errors=errors,
        transfer_id=transfer_id,
    )
    return Response(msgspec.json.encode(body), status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def refusal_response(
    reason: str, detail: str, transfer_id: str, headers: dict[str, str] | None = None
) -> Response[bytes]:
    status, title = TransferRefused.REASONS[reason]
    return problem_response(status, reason, title, detail, headers=headers, transfer_id=transfer_id)


def _status_for(error: LedgerError) -> int:
    if isinstance(error, (TransferRefused, DecisionRefused)):
        return error.status
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]  # type: ignore[index]
    return 500


def ledger_error_handler(request: Request, error: LedgerError) -> Response[bytes]:
    status = _status_for(error)
    headers = None
    if isinstance(error, Unavailable):
        retry_after = request.app.state.settings.retry_after_seconds
        headers = {"Retry-After": str(retry_after)}
        request.app.state.metrics.unavailable(error.code)
        logger.warning("503 %s on %s %s: %s", error.code, request.method, request.url.path, error.detail)
    code = error.reason if isinstance(error, (TransferRefused, DecisionRefused)) else error.code
    errors = [FieldError(**e) for e in error.errors] if isinstance(error, InvalidRequest) and error.errors else None
    return problem_response(status, code, error.title, error.detail, errors=errors, headers=headers)


_MSGSPEC_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")


def field_errors_from_msgspec(message: str) -> list[FieldError]:
    """msgspec says "Expected `int`, got `str` - at `$.amount`"; split field from message."""
    match = _MSGSPEC_PATH.search(message)
    if match is None:
        return [FieldError(field="body", message=message)]
    path = match.group("path").lstrip(".") or "body"
    return [FieldError(field=path, message=message[: match.start()])]


def validation_exception_handler(request: Request, error: ValidationException) -> Response[bytes]:
    # Raised by Litestar for query and path parameters (and body shapes it checks first).
    errors: list[FieldError] = []
    if isinstance(error.extra, list):
        for item in error.extra:
            if isinstance(item, dict):
                errors.append(FieldError(field=str(item.get("key", "request")), message=str(item.get("message", ""))))
    detail = "; ".join(f"{e.field}: {e.message}" for e in errors) or str(error.detail)
    return problem_response(400, "validation_error", "The request is not valid", detail, errors=errors or None)


# Litestar's way of saying the client hung up before its body arrived.
CLIENT_GONE = "client disconnected prematurely"


def http_exception_handler(request: Request, error: HTTPException) -> Response[bytes]:
    status = error.status_code
    if status == 500 and error.detail == CLIENT_GONE:
        # Nothing was done (the body never arrived) and nobody will read the answer: not
        # a server error. 499 is the status proxies log for it.
        logger.info("client disconnected before sending its body: %s %s", request.method, request.url.path)
        return problem_response(499, "client_disconnected", "Client closed request", CLIENT_GONE)
    if status >= 500:
        return internal_error_handler(request, error)
    code, title = HTTP_CODES.get(status, ("http_error", "HTTP error"))
    headers = dict(error.headers or {})
    return problem_response(status, code, title, str(error.detail), headers=headers or None)


def internal_error_handler(request: Request, error: Exception) -> Response[bytes]:
    # Database outages surface here when they escape the unit of work (e.g. in health
    # checks): they are a 503 to retry, not a bug.
    translated = translate(error)
    if translated is not None and translated is not error:
        return ledger_error_handler(request, translated)
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=error)
    return problem_response(500, "internal_error", "Internal error", "an unexpected error occurred; it has been logged")


def recursion_error_handler(request: Request, error: RecursionError) -> Response[bytes]:
    # msgspec gives up on absurdly deep JSON (thousands of nested arrays) with a
    # RecursionError while Litestar decodes the body: that is the client's input, a 400.
    return problem_response(400, "validation_error", "The request is not valid", "the JSON body is nested too deeply")


EXCEPTION_HANDLERS = {
    LedgerError: ledger_error_handler,
    RecursionError: recursion_error_handler,
    ValidationException: validation_exception_handler,
    HTTPException: http_exception_handler,
    Exception: internal_error_handler,
}


# -- documentation: every problem a route can answer is in the OpenAPI document --------

PROBLEM_DESCRIPTIONS = {
    400: "The request is not valid (body, query or path): `validation_error`, `invalid_cursor`",
    401: "No API key, or an unknown or revoked one: `unauthenticated`",
    403: "The key's role may not do this: `forbidden`",
    404: "The account, transfer or webhook does not exist",
    409: "Conflicts with what is stored, e.g. the id was used with other fields",
    413: "The body or the batch is too large",
    410: "The cursor points before the oldest event kept (retention): `cursor_expired`",
    415: "The body is not `application/json`",
    422: "Refused, and the refusal is recorded under the id: e.g. `insufficient_funds`; for webhooks "
    "`webhook_url_not_allowed`",
    503: "Retry later, with the same id (see `Retry-After`): `unavailable`, `lock_timeout`, `overloaded`",
}
READ_PROBLEMS = (400, 401, 403, 503)
WRITE_PROBLEMS = (400, 401, 403, 404, 409, 413, 415, 422, 503)


def documented(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAPI responses for these problem statuses (`application/problem+json`)."""
    return {
        status: ResponseSpec(
            data_container=Problem,
            media_type=PROBLEM_MEDIA_TYPE,
            description=PROBLEM_DESCRIPTIONS[status],
            generate_examples=False,
        )
        for status in statuses
    }


def replayed(kind: type) -> ResponseSpec:
    """The 200 of a repeated create: the stored outcome, with `Idempotent-Replayed: true`."""
    return ResponseSpec(
        data_container=kind,
        description="A replay: this id was already applied with these fields (`Idempotent-Replayed: true`)",
        generate_examples=False,
    )
