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
"""

from ledger.client._core import USER_AGENT, VERSION, new_id
from ledger.client.clients import AsyncLedgerClient, LedgerClient
from ledger.client.errors import (
    CODE_CLASSES,
    AccountExistsWithDifferentFields,
    AccountNotFound,
    Conflict,
    ConnectionFailed,
    DecisionRefused,
    FieldError,
    Forbidden,
    InsufficientFunds,
    InvalidCursor,
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
)
from ledger.client.models import (
    Account,
    AccountBalance,
    ApiKey,
    AuditCheckpoint,
    AuditProblem,
    AuditReport,
    Balance,
    BatchItemResult,
    BatchResult,
    CreatedApiKey,
    CurrencyTotals,
    Entry,
    Health,
    NewTransfer,
    Page,
    Transfer,
    TrialBalance,
)

__all__ = [
    "CODE_CLASSES",
    "USER_AGENT",
    "VERSION",
    "Account",
    "AccountBalance",
    "AccountExistsWithDifferentFields",
    "AccountNotFound",
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
    "CurrencyTotals",
    "DecisionRefused",
    "Entry",
    "FieldError",
    "Forbidden",
    "Health",
    "InsufficientFunds",
    "InvalidCursor",
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
    "new_id",
]
