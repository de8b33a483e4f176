"""A Python client of the ledger's HTTP API, blocking (`LedgerClient`) and asyncio
(`AsyncLedgerClient`), on httpx.

    from ledger.client import LedgerClient, InsufficientFunds

    with LedgerClient("https://ledger.internal", api_key) as ledger:
        try:
            transfer = ledger.create_transfer("alice", "shop", 1250, id=order_id)
        except InsufficientFunds:
            ...

Writes carry an id (generated when not given) and are retried with that same id and
body on connection failures, timeouts and 502/503/504 (honouring `Retry-After`); the
ledger applies an id at most once, so a retry can never move money twice. A write that
gets no definitive answer within the retries raises `OutcomeUnknown`, with its id.
See `ledger.client.errors` for the exceptions.

`follow_events()` follows the ledger's events feed (resume it from the last event's id);
`ledger.client.webhooks` checks the signature of webhook deliveries.
"""

from ledger.client._core import USER_AGENT, VERSION, new_id
from ledger.client.clients import UNSET, AsyncLedgerClient, LedgerClient
from ledger.client.errors import (
    CODE_CLASSES,
    AccountChangeRefused,
    AccountExistsWithDifferentFields,
    AccountNotFound,
    Conflict,
    ConnectionFailed,
    CursorExpired,
    DecisionRefused,
    FieldError,
    Forbidden,
    InsufficientFunds,
    InvalidCursor,
    InvalidSignature,
    KeyNotFound,
    LedgerError,
    NotFound,
    OutcomeUnknown,
    ProblemError,
    Refused,
    ServerError,
    TooLarge,
    TransferExistsWithDifferentFields,
    TransferNotFound,
    Unauthenticated,
    Unavailable,
    UnexpectedResponse,
    ValidationFailed,
    WebhookNotFound,
    WebhookUrlNotAllowed,
)
from ledger.client.models import (
    Account,
    AccountBalance,
    AccountChange,
    AggregateBalance,
    ApiKey,
    AuditCheckpoint,
    AuditProblem,
    AuditReport,
    Balance,
    BatchItemResult,
    BatchResult,
    CreatedApiKey,
    CreatedWebhook,
    CurrencyTotals,
    Entry,
    Event,
    EventPage,
    Health,
    NewTransfer,
    Page,
    Transfer,
    TrialBalance,
    Webhook,
    WebhookDelivery,
)
from ledger.client.webhooks import verify_signature

__all__ = [
    "CODE_CLASSES",
    "UNSET",
    "USER_AGENT",
    "VERSION",
    "Account",
    "AccountBalance",
    "AccountChange",
    "AccountChangeRefused",
    "AccountExistsWithDifferentFields",
    "AccountNotFound",
    "AggregateBalance",
    "ApiKey",
    "AsyncLedgerClient",
    "AuditCheckpoint",
    "AuditProblem",
    "AuditReport",
    "Balance",
    "BatchItemResult",
    "BatchResult",
    "Conflict",
    "ConnectionFailed",
    "CreatedApiKey",
    "CreatedWebhook",
    "CurrencyTotals",
    "CursorExpired",
    "DecisionRefused",
    "Entry",
    "Event",
    "EventPage",
    "FieldError",
    "Forbidden",
    "Health",
    "InsufficientFunds",
    "InvalidCursor",
    "InvalidSignature",
    "KeyNotFound",
    "LedgerClient",
    "LedgerError",
    "NewTransfer",
    "NotFound",
    "OutcomeUnknown",
    "Page",
    "ProblemError",
    "Refused",
    "ServerError",
    "TooLarge",
    "Transfer",
    "TransferExistsWithDifferentFields",
    "TransferNotFound",
    "TrialBalance",
    "Unauthenticated",
    "Unavailable",
    "UnexpectedResponse",
    "ValidationFailed",
    "Webhook",
    "WebhookDelivery",
    "WebhookNotFound",
    "WebhookUrlNotAllowed",
    "new_id",
    "verify_signature",
]
