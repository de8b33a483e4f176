"""What the client raises. Everything derives from `LedgerError`.

    LedgerError
    ├── ProblemError                 the server answered with a problem (RFC 9457)
    │   ├── ValidationFailed         400 validation_error; `errors` lists the fields
    │   │   └── InvalidCursor        400 invalid_cursor
    │   ├── Unauthenticated          401 unauthenticated
    │   ├── Forbidden                403 forbidden
    │   ├── NotFound                 404 not_found (an unknown route)
    │   │   ├── AccountNotFound      404 account_not_found (reading an account)
    │   │   ├── TransferNotFound     404 transfer_not_found
    │   │   ├── KeyNotFound          404 key_not_found
    │   │   └── WebhookNotFound      404 webhook_not_found
    │   ├── Conflict                 409
    │   │   ├── AccountExistsWithDifferentFields
    │   │   ├── TransferExistsWithDifferentFields
    │   │   └── AccountChangeRefused 409 account_not_empty, account_closed,
    │   │                            balance_outside_limits: an update_account that
    │   │                            cannot be made (nothing changed)
    │   ├── Refused                  a transfer's recorded refusal (404/422 carrying
    │   │   │                        `transfer_id`): its outcome, forever
    │   │   └── InsufficientFunds    422 insufficient_funds
    │   ├── DecisionRefused          a request that cannot be made as asked (409/422),
    │   │   │                        recorded nowhere: a post or void (the pending
    │   │   │                        transfer keeps its state)
    │   │   └── WebhookUrlNotAllowed 422 webhook_url_not_allowed: no webhook was created
    │   ├── CursorExpired            410 cursor_expired: the events feed no longer holds
    │   │                            that position
    │   ├── TooLarge                 413 batch_too_large, request_too_large; 431
    │   ├── Unavailable              503 unavailable, lock_timeout, overloaded (and 502,
    │   │                            504), once the client's retries are spent (reads)
    │   └── ServerError              any other 5xx: a bug in the service
    ├── OutcomeUnknown               a write got no definitive answer within the
    │                                client's retries: retry later with the same id
    ├── ConnectionFailed             no answer, and the request never reached the server
    │                                (or was a read): nothing was changed
    ├── UnexpectedResponse           a success whose body the client cannot read
    └── InvalidSignature             a webhook delivery whose `Ledger-Signature` does not
                                     prove it (`ledger.client.webhooks.verify_signature`)

A transfer refused because an account does not exist raises `Refused` with code
`account_not_found`, not `AccountNotFound`: it is the transfer's recorded outcome, and
retrying the id returns it again, even once the account exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import msgspec


class LedgerError(Exception):
    """Base of every error the ledger client raises."""


class FieldError(msgspec.Struct):
    field: str
    message: str


class _ProblemBody(msgspec.Struct, kw_only=True):
    type: str = "about:blank"
    title: str = ""
    status: int | None = None
    detail: str = ""
    code: str = ""
    errors: list[FieldError] | None = None
    transfer_id: str | None = None


class ProblemError(LedgerError):
    """A problem answer (`application/problem+json`): the request reached the server and
    was decided. Branch on `code`, the contract's stable reason."""

    def __init__(
        self,
        *,
        status: int,
        code: str,
        title: str = "",
        detail: str = "",
        type: str = "about:blank",
        errors: Sequence[FieldError] = (),
        transfer_id: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        replayed: bool = False,
    ) -> None:
        self.status = status
        self.code = code
        self.title = title
        self.detail = detail
        self.type = type
        self.errors = list(errors)
        self.transfer_id = transfer_id
        self.request_id = request_id
        self.retry_after = retry_after
        # True when this refusal is the one recorded for the id by an earlier request.
        self.replayed = replayed
        super().__init__(f"{status} {code}: {detail or title}")


class ValidationFailed(ProblemError):
    pass


class InvalidCursor(ValidationFailed):
    pass


class Unauthenticated(ProblemError):
    pass


class Forbidden(ProblemError):
    pass


class NotFound(ProblemError):
    pass


class AccountNotFound(NotFound):
    pass


class TransferNotFound(NotFound):
    pass


class KeyNotFound(NotFound):
    pass


class WebhookNotFound(NotFound):
    pass


class Conflict(ProblemError):
    pass


class AccountExistsWithDifferentFields(Conflict):
    pass


class AccountChangeRefused(Conflict):
    """An account change that cannot be made: closing an account that holds money or
    reservations, changing a closed one, a limit its balance already breaks. (A transfer
    refused with `account_closed` raises `Refused`: it carries a `transfer_id`.)"""


class TransferExistsWithDifferentFields(Conflict):
    pass


class Refused(ProblemError):
    """The ledger refused the transfer and recorded the refusal under `transfer_id`: a
    definitive outcome, never retried, and replayed to anyone who sends that id again."""


class InsufficientFunds(Refused):
    pass


class DecisionRefused(ProblemError):
    pass


class WebhookUrlNotAllowed(DecisionRefused):
    """The service will not deliver to this URL (its policy on schemes, hosts or
    addresses): a decision about the request, recorded nowhere; another URL may pass."""


class CursorExpired(ProblemError):
    """The events feed's cursor (or event id) is older than the feed keeps: the events
    after it are gone. Not retried: the same cursor will never be valid again. Resume
    from a fresh position (no `after`: the oldest event kept) and reconcile what was
    missed from the accounts and transfers themselves."""


class TooLarge(ProblemError):
    pass


class Unavailable(ProblemError):
    pass


class ServerError(ProblemError):
    pass


class OutcomeUnknown(LedgerError):
    """A write that may or may not have been applied: every attempt ended without a
    definitive answer (no response, or 5xx). Retrying with the same id (the same call
    with `id=error.id`, or `get_transfer(error.id)`) settles it: the ledger applies an id
    at most once."""

    def __init__(self, operation: str, ids: Sequence[str], attempts: int, cause: BaseException | None) -> None:
        self.operation = operation
        self.ids = tuple(ids)
        self.id = self.ids[0] if len(self.ids) == 1 else None
        self.attempts = attempts
        self.cause = cause
        which = f"id {self.ids[0]!r}" if len(self.ids) == 1 else f"ids {list(self.ids)!r}" if self.ids else "no id"
        super().__init__(
            f"{operation}: outcome unknown after {attempts} attempt(s) ({_describe(cause)}); "
            f"retry later with the same {which}"
        )


class ConnectionFailed(LedgerError):
    """No answer from the server. For a write, no attempt reached it (every one failed
    to connect): nothing was applied."""

    def __init__(self, operation: str, attempts: int, cause: BaseException | None) -> None:
        self.operation = operation
        self.attempts = attempts
        self.cause = cause
        super().__init__(f"{operation}: no answer after {attempts} attempt(s) ({_describe(cause)})")


class UnexpectedResponse(LedgerError):
    def __init__(self, operation: str, status: int, body: bytes, reason: str) -> None:
        self.operation = operation
        self.status = status
        self.body = body
        super().__init__(f"{operation}: {status} answer the client cannot read ({reason}): {body[:200]!r}")


class InvalidSignature(LedgerError):
    """A webhook delivery that did not prove it comes from the ledger: no or a malformed
    `Ledger-Signature` header, no `v1` signature made with the secret over this very
    body, or a timestamp outside the tolerance (a recorded delivery sent again). Reject
    the request (e.g. with 400) and do not act on its body."""


def _describe(cause: BaseException | None) -> str:
    if cause is None:
        return "no attempt was made within the time budget"
    return f"last: {type(cause).__name__}: {cause}"


# Every code the server emits (README "Status codes and error codes", `ledger.errors`,
# `ledger.http.problems`) and the class it raises. A recorded refusal is recognised by its
# `transfer_id` instead (see `problem_from_response`).
CODE_CLASSES: dict[str, type[ProblemError]] = {
    "validation_error": ValidationFailed,
    "invalid_cursor": InvalidCursor,
    "unauthenticated": Unauthenticated,
    "forbidden": Forbidden,
    "not_found": NotFound,
    "account_not_found": AccountNotFound,
    "transfer_not_found": TransferNotFound,
    "key_not_found": KeyNotFound,
    "webhook_not_found": WebhookNotFound,
    "account_exists_with_different_fields": AccountExistsWithDifferentFields,
    "transfer_exists_with_different_fields": TransferExistsWithDifferentFields,
    "account_not_empty": AccountChangeRefused,
    "account_closed": AccountChangeRefused,
    "balance_outside_limits": AccountChangeRefused,
    "transfer_not_pending": DecisionRefused,
    "pending_transfer_expired": DecisionRefused,
    "pending_transfer_already_posted": DecisionRefused,
    "pending_transfer_already_voided": DecisionRefused,
    "exceeds_pending_amount": DecisionRefused,
    # Without a transfer_id: posting would overflow a total (a decision, not an outcome).
    "balance_overflow": DecisionRefused,
    "webhook_url_not_allowed": WebhookUrlNotAllowed,
    "cursor_expired": CursorExpired,
    "batch_too_large": TooLarge,
    "request_too_large": TooLarge,
    "request_header_fields_too_large": TooLarge,
    "unavailable": Unavailable,
    "lock_timeout": Unavailable,
    "overloaded": Unavailable,
    "internal_error": ServerError,
    # Answers to requests this client does not make (it always sends JSON to known
    # routes): they raise ProblemError itself.
    "method_not_allowed": ProblemError,
    "not_acceptable": ProblemError,
    "unsupported_media_type": ProblemError,
    "request_timeout": ProblemError,
    "too_many_requests": ProblemError,
    "client_disconnected": ProblemError,
    "http_error": ProblemError,
}

# Recorded refusals (with `transfer_id`) that have a class of their own; the others
# (currency_mismatch, accounts_must_be_different, account_not_found, balance_overflow,
# linked_*, exceeds_reversible_amount, transfer_not_posted, and codes a newer server
# adds) raise `Refused`.
REFUSAL_CLASSES: dict[str, type[Refused]] = {
    "insufficient_funds": InsufficientFunds,
}

# For codes this client does not know (a newer server): the family by status.
STATUS_CLASSES: dict[int, type[ProblemError]] = {
    400: ValidationFailed,
    401: Unauthenticated,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: TooLarge,
    431: TooLarge,
    502: Unavailable,
    503: Unavailable,
    504: Unavailable,
}


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())


def problem_from_response(response: httpx.Response, *, replayed: bool = False) -> ProblemError:
    """The exception for an error answer: from its problem body when it has one, from its
    status alone when it has none (an HTML 502 from a proxy)."""
    status = response.status_code
    fields: dict[str, Any] = {}
    try:
        body = msgspec.json.decode(response.content, type=_ProblemBody)
    except (msgspec.DecodeError, msgspec.ValidationError):
        body = None
    if body is not None and body.code:
        fields = {
            "code": body.code,
            "title": body.title,
            "detail": body.detail,
            "type": body.type,
            "errors": body.errors or (),
            "transfer_id": body.transfer_id,
        }
    else:
        text = response.content[:500].decode("utf-8", "replace")
        fields = {"code": f"http_{status}", "title": response.reason_phrase, "detail": text}
    cls: type[ProblemError]
    if fields.get("transfer_id") and status in (404, 422):
        cls = REFUSAL_CLASSES.get(fields["code"], Refused)
    else:
        cls = (
            CODE_CLASSES.get(fields["code"])
            or STATUS_CLASSES.get(status)
            or (ServerError if status >= 500 else ProblemError)
        )
    return cls(
        status=status,
        request_id=response.headers.get("x-request-id"),
        retry_after=parse_retry_after(response.headers.get("retry-after")),
        replayed=replayed,
        **fields,
    )
