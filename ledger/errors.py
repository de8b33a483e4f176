"""The service's errors. Each carries the stable `code` clients see.

    LedgerError
    ├── InvalidRequest                      the request cannot be acted on (400)
    │   └── InvalidCursor                   a pagination cursor the service did not issue
    ├── UnsupportedMediaType                a body that is not JSON (415)
    ├── BatchTooLarge                       more items than a batch may hold (413)
    ├── Forbidden                           the key's role may not do this (403)
    ├── NotFound                            a resource read by id does not exist (404)
    │   ├── AccountNotFound
    │   ├── TransferNotFound
    │   └── KeyNotFound
    ├── Conflict                            an id is taken with other fields (409)
    │   ├── AccountExistsWithDifferentFields
    │   └── TransferExistsWithDifferentFields
    ├── TransferRefused                     a transfer's recorded refusal (404/422), replayed forever
    ├── DecisionRefused                     a post, void or reversal that cannot be made (409/422)
    └── Unavailable                         try again later (503, with Retry-After)
        ├── DatabaseUnavailable             the database cannot be reached
        ├── LockTimeout                     an account stayed locked past lock_timeout
        └── Overloaded                      pool exhausted, statement timeout, or retries spent

The service raises these; `ledger.http.problems` maps them to HTTP statuses, in one place.
"""

from __future__ import annotations

from typing import ClassVar


class LedgerError(Exception):
    code: ClassVar[str] = "ledger_error"
    # A class's title, unless the instance has its own (a refusal's, by its reason).
    title: str = "Ledger error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidRequest(LedgerError):
    code = "validation_error"
    title = "The request is not valid"

    def __init__(self, detail: str, errors: list[dict[str, str]] | None = None) -> None:
        super().__init__(detail)
        self.errors = errors or []


class InvalidCursor(InvalidRequest):
    code = "invalid_cursor"
    title = "The pagination cursor is not valid"


class CursorExpired(LedgerError):
    """The events after this cursor were removed by retention: the consumer must start
    again (from the oldest event kept) and reconcile, rather than silently skip some."""

    code = "cursor_expired"
    title = "The cursor points before the oldest event kept"


class WebhookUrlNotAllowed(LedgerError):
    code = "webhook_url_not_allowed"
    title = "Webhooks may not be sent to this URL"


class UnsupportedMediaType(LedgerError):
    code = "unsupported_media_type"
    title = "Request bodies must be application/json"


class BatchTooLarge(LedgerError):
    code = "batch_too_large"
    title = "Too many transfers in one batch"


class Forbidden(LedgerError):
    code = "forbidden"
    title = "The key's role may not do this"


class NotFound(LedgerError):
    code = "not_found"
    title = "Not found"


class AccountNotFound(NotFound):
    code = "account_not_found"
    title = "Account not found"


class TransferNotFound(NotFound):
    code = "transfer_not_found"
    title = "Transfer not found"


class KeyNotFound(NotFound):
    code = "key_not_found"
    title = "API key not found"


class WebhookNotFound(NotFound):
    code = "webhook_not_found"
    title = "Webhook not found"


class Conflict(LedgerError):
    code = "conflict"
    title = "Conflict"


class AccountExistsWithDifferentFields(Conflict):
    code = "account_exists_with_different_fields"
    title = "An account with this id exists with different fields"


class TransferExistsWithDifferentFields(Conflict):
    code = "transfer_exists_with_different_fields"
    title = "A transfer with this id exists with different fields"


class AccountNotEmpty(Conflict):
    code = "account_not_empty"
    title = "The account still holds money or reservations"


class AccountAlreadyClosed(Conflict):
    """A change of a closed account: closing is final."""

    code = "account_closed"
    title = "The account is closed"


class BalanceOutsideLimits(Conflict):
    """A limit that the account's present balance already breaks."""

    code = "balance_outside_limits"
    title = "The account's balance is outside the new limits"


class TransferRefused(LedgerError):
    """A transfer the ledger refused. Unlike other errors it is an outcome: it is recorded
    under the transfer id and every later request with that id gets it back."""

    # code -> (HTTP status, title). The codes are the contract's.
    REASONS: ClassVar[dict[str, tuple[int, str]]] = {
        "account_not_found": (404, "Account not found"),
        "insufficient_funds": (422, "Insufficient funds"),
        "currency_mismatch": (422, "Currency mismatch"),
        "accounts_must_be_different": (422, "The debit and credit accounts must be different"),
        # Not in the contract's list, added because a bigint total can really overflow:
        # refusing is the only answer that neither wraps around nor fails with a 5xx.
        "balance_overflow": (422, "An account total would exceed the largest amount"),
        # Batches: the other items of a failed linked chain, and a chain left open.
        "linked_transfer_failed": (422, "Another transfer of the linked chain failed"),
        "linked_chain_open": (422, "The linked chain is not closed by an unlinked item"),
        # Reversals: more than what remains reversible, or a transfer that is not posted.
        "exceeds_reversible_amount": (422, "More than the transfer's reversible amount"),
        "transfer_not_posted": (422, "Only posted transfers can be reversed"),
        # Account controls (API 1.1).
        "exceeds_max_balance": (422, "The credit account would exceed its maximum balance"),
        "account_frozen": (422, "An account of the transfer is frozen"),
        "account_closed": (422, "An account of the transfer is closed"),
        "imported_at_out_of_order": (422, "imported_at is in the future or before an account's last entry"),
    }

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown refusal reason {reason!r}")
        super().__init__(detail)
        self.reason = reason
        self.title = self.REASONS[reason][1]

    @property
    def status(self) -> int:
        return self.REASONS[self.reason][0]


class DecisionRefused(LedgerError):
    """A post or void of a pending transfer that cannot be made. Not an outcome of its
    own: the transfer keeps its state, and the same request gets the same answer."""

    STATUSES: ClassVar[dict[str, int]] = {
        "transfer_not_pending": 409,
        "pending_transfer_expired": 409,
        "pending_transfer_already_posted": 409,
        "pending_transfer_already_voided": 409,
        "exceeds_pending_amount": 422,
        "balance_overflow": 422,
    }
    TITLES: ClassVar[dict[str, str]] = {
        "transfer_not_pending": "The transfer is not pending",
        "pending_transfer_expired": "The pending transfer has expired",
        "pending_transfer_already_posted": "The pending transfer was already posted",
        "pending_transfer_already_voided": "The pending transfer was already voided",
        "exceeds_pending_amount": "More than the pending transfer reserved",
        # The same code as TransferRefused's, for the same cause: the same title.
        "balance_overflow": TransferRefused.REASONS["balance_overflow"][1],
    }

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in self.STATUSES:
            raise ValueError(f"unknown decision refusal {reason!r}")
        super().__init__(detail)
        self.reason = reason
        self.title = self.TITLES[reason]

    @property
    def status(self) -> int:
        return self.STATUSES[self.reason]


class Unavailable(LedgerError):
    code = "unavailable"
    title = "Service unavailable"


class DatabaseUnavailable(Unavailable):
    code = "unavailable"
    title = "The database is unavailable"


class LockTimeout(Unavailable):
    code = "lock_timeout"
    title = "An account is locked by another transaction"


class Overloaded(Unavailable):
    code = "overloaded"
    title = "The service is overloaded"
