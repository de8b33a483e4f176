"""What the sync and async clients share: the settings, how each endpoint's request is
built, and the retry decisions. The clients only send and sleep.

Retries follow one rule: a request is sent again only when sending it again cannot do
anything the first one did not. Reads, and writes keyed by an id (accounts, transfers,
batches, posts, voids, reversals, revocations, webhook deletions), are retried on any
failure that is not a decided answer; their body is encoded once, so every attempt
carries the same bytes and the same id. Creating an API key or a webhook has no id: it
is retried only when the connection could not even be made.
"""

from __future__ import annotations

import enum
import logging
import platform
import random
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, NoReturn, TypeVar
from urllib.parse import quote

import httpx
import msgspec

from ledger.client import models
from ledger.client.errors import (
    ConnectionFailed,
    OutcomeUnknown,
    ProblemError,
    UnexpectedResponse,
    problem_from_response,
)

T = TypeVar("T")
logger = logging.getLogger("ledger.client")


def _version() -> str:
    try:
        from ledger import __version__

        return str(__version__)
    except ImportError:  # pragma: no cover - the client copied out of its package
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("ledger")
        except PackageNotFoundError:
            return "0"


VERSION = _version()
USER_AGENT = f"ledger-client/{VERSION} python-httpx/{httpx.__version__} python/{platform.python_version()}"

# Defaults, each a named setting of the clients.
TIMEOUT_SECONDS = 10.0  # one attempt: connect, send, wait for and read the answer
CONNECT_TIMEOUT_SECONDS = 5.0
MAX_ATTEMPTS = 10
BASE_BACKOFF_SECONDS = 0.1
MAX_BACKOFF_SECONDS = 5.0
TOTAL_TIMEOUT_SECONDS = 60.0  # one call, every attempt and wait included
MAX_CONNECTIONS = 20
MAX_KEEPALIVE_CONNECTIONS = 10
KEEPALIVE_EXPIRY_SECONDS = 5.0
# Below this, an attempt has no real chance of an answer: the call ends instead.
MIN_ATTEMPT_SECONDS = 0.05
# A long poll (the events feed's `wait`) may be answered only after `wait` seconds: its
# attempt allows that plus this, for the query and the network, whatever `timeout` says.
LONG_POLL_MARGIN_SECONDS = 10.0

# Answers that say "not decided, try again": the service's 503 (database unreachable,
# lock timeout, overloaded) and a proxy's 502/504 (the service may or may not have acted).
RETRY_STATUSES = frozenset({502, 503, 504})
# Failures after which the request surely never reached the server.
NOT_SENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# Failures after which it may have: the answer was lost (read timeout, the connection
# closed before the answer, a reset). Retrying those is safe only with an id.
RETRYABLE_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


def new_id() -> str:
    """A fresh id for an account, transfer or reversal (a UUID4, within the contract's
    1 to 64 characters of [A-Za-z0-9._:-]). Store it before the call if your process may
    die during it: retrying with it later settles the outcome."""
    return str(uuid.uuid4())


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Timeouts, retries and connection limits of a client."""

    timeout: float = TIMEOUT_SECONDS
    connect_timeout: float = CONNECT_TIMEOUT_SECONDS
    max_attempts: int = MAX_ATTEMPTS
    base_backoff: float = BASE_BACKOFF_SECONDS
    max_backoff: float = MAX_BACKOFF_SECONDS
    total_timeout: float = TOTAL_TIMEOUT_SECONDS
    max_connections: int = MAX_CONNECTIONS
    max_keepalive_connections: int = MAX_KEEPALIVE_CONNECTIONS
    keepalive_expiry: float = KEEPALIVE_EXPIRY_SECONDS

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if min(self.timeout, self.connect_timeout, self.total_timeout) <= 0:
            raise ValueError("timeouts must be positive")
        if self.base_backoff < 0 or self.max_backoff < self.base_backoff:
            raise ValueError("need 0 <= base_backoff <= max_backoff")

    def http_options(self, base_url: str, api_key: str, headers: Mapping[str, str] | None) -> dict[str, Any]:
        return {
            "base_url": base_url,
            "headers": {
                "Authorization": f"Bearer {api_key}",
                "User-Agent": USER_AGENT,
                "Accept": "application/json",
                **(headers or {}),
            },
            "timeout": httpx.Timeout(self.timeout, connect=min(self.connect_timeout, self.timeout)),
            "limits": httpx.Limits(
                max_connections=self.max_connections,
                max_keepalive_connections=self.max_keepalive_connections,
                keepalive_expiry=self.keepalive_expiry,
            ),
            # Redirects are never part of the contract; following one could resend a write
            # somewhere else.
            "follow_redirects": False,
        }


class Safety(enum.Enum):
    # Reads, and writes the ledger applies at most once per id.
    REPEATABLE = "repeatable"
    # Writes without an id (creating an API key).
    ONCE = "once"


@dataclass(frozen=True)
class Call(Generic[T]):
    """One endpoint call: the request, how to read its answer, and whether it may be
    sent twice."""

    operation: str
    method: str
    path: str
    decode: Callable[[httpx.Response, bool], T]
    params: dict[str, str] | None = None
    body: bytes | None = None
    safety: Safety = Safety.REPEATABLE
    writes: bool = False
    # The ids a write is keyed by, reported when its outcome stays unknown.
    ids: tuple[str, ...] = ()
    # Statuses that are answers rather than errors (200-299, and /health/ready's 503).
    answers: frozenset[int] = frozenset(range(200, 300))
    retries: bool = True
    # A long poll: the seconds the server may hold the answer (its `wait` parameter).
    long_poll: float | None = None


@dataclass
class Wait:
    seconds: float


@dataclass
class Done(Generic[T]):
    value: T


@dataclass
class Attempts(Generic[T]):
    """The retry state of one call. The client asks `request()` for each attempt's
    arguments, sends, and reports the answer (`answered`) or the failure (`failed`): each
    returns `Done` or `Wait`, or raises the call's final error."""

    call: Call[T]
    settings: Settings
    clock: Callable[[], float] = time.monotonic
    count: int = 0
    # Whether any attempt may have reached the service (a write may then be applied).
    maybe_sent: bool = False
    deadline: float = field(init=False)
    call_id: str = field(init=False)

    def __post_init__(self) -> None:
        budget = self.settings.total_timeout
        if self.call.long_poll is not None:
            # One whole long poll fits in the call, whatever `total_timeout` says: a
            # shorter budget would end every quiet poll in a timeout.
            budget = max(budget, self.call.long_poll + LONG_POLL_MARGIN_SECONDS)
        self.deadline = self.clock() + budget
        self.call_id = uuid.uuid4().hex

    def request(self) -> dict[str, Any]:
        self.count += 1
        headers = {"X-Request-ID": f"{self.call_id}.{self.count}"}
        if self.call.body is not None:
            headers["Content-Type"] = "application/json"
        remaining = max(self.deadline - self.clock(), MIN_ATTEMPT_SECONDS)
        params = self.call.params
        timeout = min(self.settings.timeout, remaining)
        if self.call.long_poll is not None:
            wait = self.call.long_poll
            fits = max(0, round(remaining - LONG_POLL_MARGIN_SECONDS))
            if wait > fits:
                # A retry late in the call: ask the server to hold the answer only as long
                # as the call can still wait for it (0: answer at once), rather than for a
                # wait the call would cut short.
                wait = fits
                params = {**(params or {}), "wait": str(wait)}
            # The server answers a quiet poll after `wait` seconds: a read timeout below
            # that would fail every poll that finds no event.
            timeout = max(timeout, min(wait + LONG_POLL_MARGIN_SECONDS, remaining))
        return {
            "method": self.call.method,
            "url": self.call.path,
            "params": params,
            "content": self.call.body,
            "headers": headers,
            "timeout": httpx.Timeout(
                timeout,
                connect=min(self.settings.connect_timeout, self.settings.timeout, remaining),
            ),
        }

    def answered(self, response: httpx.Response) -> Done[T] | Wait:
        replayed = response.headers.get("idempotent-replayed", "").lower() == "true"
        if response.status_code in self.call.answers:
            try:
                return Done(self.call.decode(response, replayed))
            except (msgspec.DecodeError, msgspec.ValidationError) as error:
                raise UnexpectedResponse(
                    self.call.operation, response.status_code, response.content, str(error)
                ) from error
        problem = problem_from_response(response, replayed=replayed)
        if response.status_code >= 500:
            self.maybe_sent = True
        retryable = (
            response.status_code in RETRY_STATUSES and self.call.safety is Safety.REPEATABLE and self.call.retries
        )
        if not retryable:
            if response.status_code >= 500:
                self._end(problem)
            raise problem
        return self._wait_or_end(problem, problem.retry_after)

    def failed(self, error: httpx.TransportError) -> Wait:
        not_sent = isinstance(error, NOT_SENT_ERRORS)
        if not not_sent:
            self.maybe_sent = True
        if self.call.safety is Safety.ONCE:
            retryable = not_sent
        else:
            retryable = isinstance(error, RETRYABLE_ERRORS)
        if not retryable or not self.call.retries:
            self._end(error)
        return self._wait_or_end(error, None)

    def _wait_or_end(self, cause: BaseException, retry_after: float | None) -> Wait:
        settings = self.settings
        ceiling = min(settings.max_backoff, settings.base_backoff * 2 ** (self.count - 1))
        # Half fixed, half random: clients that failed together do not come back together.
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)
        if retry_after is not None:
            delay = max(delay, retry_after)
        if self.count >= settings.max_attempts or self.clock() + delay + MIN_ATTEMPT_SECONDS > self.deadline:
            self._end(cause)
        logger.info(
            "%s: attempt %d failed (%s), retrying in %.2f s",
            self.call.operation,
            self.count,
            _short(cause),
            delay,
            extra={"ids": self.call.ids},
        )
        return Wait(delay)

    def _end(self, cause: BaseException) -> NoReturn:
        """Raise the call's final error: for a write that may have reached the service,
        OutcomeUnknown; else the last problem answer, or ConnectionFailed."""
        if self.call.writes and self.maybe_sent:
            raise OutcomeUnknown(self.call.operation, self.call.ids, self.count, cause) from cause
        if isinstance(cause, ProblemError):
            raise cause
        raise ConnectionFailed(self.call.operation, self.count, cause) from cause


def _short(cause: BaseException) -> str:
    if isinstance(cause, ProblemError):
        return f"{cause.status} {cause.code}"
    return type(cause).__name__


# -- requests of each endpoint ---------------------------------------------------------

_encoder = msgspec.json.Encoder()


def _body(fields: Mapping[str, Any]) -> bytes:
    # None means "not given": such fields are left out, so the server applies its default
    # and a server that predates a field is not sent it.
    return _encoder.encode({key: value for key, value in fields.items() if value is not None})


def _params(**values: Any) -> dict[str, str]:
    params: dict[str, str] = {}
    for key, value in values.items():
        if value is None:
            continue
        params[key.rstrip("_")] = _timestamp(value) if isinstance(value, datetime) else str(value)
    return params


def _timestamp(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise ValueError("timestamps need a time zone (the ledger will not guess one): use datetime.now(UTC)")
    return moment.isoformat()


def _segment(value: str) -> str:
    # Ids are [A-Za-z0-9._:-]; quoting keeps anything else from changing the path.
    return quote(value, safe="")


def _decoder(kind: type[T]) -> Callable[[httpx.Response, bool], T]:
    decoder = msgspec.json.Decoder(kind)

    def decode(response: httpx.Response, replayed: bool) -> T:
        value = decoder.decode(response.content)
        if replayed and isinstance(value, (models.Transfer, models.Account)):
            value = msgspec.structs.replace(value, replayed=True)
        return value  # type: ignore[no-any-return]

    return decode


_account = _decoder(models.Account)
_changes = _decoder(models.Page[models.AccountChange])
_transfer = _decoder(models.Transfer)
_accounts = _decoder(models.Page[models.Account])
_transfers = _decoder(models.Page[models.Transfer])
_entries = _decoder(models.Page[models.Entry])
_keys = _decoder(models.Page[models.ApiKey])
_webhook = _decoder(models.Webhook)


def create_account(
    currency: str,
    *,
    id: str | None,
    name: str | None,
    allow_negative_balance: bool,
    metadata: Mapping[str, str] | None,
    overdraft_limit: int | None = None,
    max_balance: int | None = None,
) -> Call[models.Account]:
    account_id = id or new_id()
    body = _body(
        {
            "id": account_id,
            "currency": currency,
            "name": name,
            "allow_negative_balance": allow_negative_balance or None,
            "metadata": dict(metadata) if metadata is not None else None,
            # Account controls (contract 1.1): left out when not given, so a server
            # without them still takes every other account.
            "overdraft_limit": overdraft_limit,
            "max_balance": max_balance,
        }
    )
    return Call("create_account", "POST", "/v1/accounts", _account, body=body, writes=True, ids=(account_id,))


def get_account(account_id: str) -> Call[models.Account]:
    return Call("get_account", "GET", f"/v1/accounts/{_segment(account_id)}", _account)


def update_account(account_id: str, changes: Mapping[str, Any]) -> Call[models.Account]:
    """PATCH: only the fields given change. Repeating it is safe: values an account
    already has change nothing."""
    if not changes:
        raise ValueError("nothing to change: give status, overdraft_limit, max_balance, name or metadata")
    return Call(
        "update_account", "PATCH", f"/v1/accounts/{_segment(account_id)}", _account,
        body=_encoder.encode(dict(changes)), writes=True, ids=(account_id,),
    )  # fmt: skip


def list_account_changes(
    account_id: str, *, limit: int | None, cursor: str | None
) -> Call[models.Page[models.AccountChange]]:
    return Call(
        "list_account_changes", "GET", f"/v1/accounts/{_segment(account_id)}/changes", _changes,
        params=_params(limit=limit, cursor=cursor),
    )  # fmt: skip


def list_accounts(
    *, currency: str | None, limit: int | None, cursor: str | None, metadata: Mapping[str, str] | None = None
) -> Call[models.Page[models.Account]]:
    params = {**_params(currency=currency, limit=limit, cursor=cursor), **_metadata_params(metadata)}
    return Call("list_accounts", "GET", "/v1/accounts", _accounts, params=params)


def _metadata_params(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """A metadata filter as the API's `metadata[KEY]=VALUE` parameters (every pair must
    match). The server checks the limits; a value that is not a string is refused here,
    as `str()` of it would silently filter on something else."""
    params: dict[str, str] = {}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata filters are strings to strings, got {key!r}: {value!r}")
        params[f"metadata[{key}]"] = value
    return params


def transfer_fields(
    *,
    id: str,
    debit_account_id: str,
    credit_account_id: str,
    amount: int,
    currency: str | None,
    pending: bool | None,
    timeout_seconds: int | None,
    description: str | None,
    metadata: Mapping[str, str] | None,
    imported_at: datetime | None = None,
) -> dict[str, Any]:
    if isinstance(amount, bool) or not isinstance(amount, int):
        # Money is an integer of minor units; a float would be refused by the server, but
        # only after a round trip, and a silent int() could round a payment.
        raise TypeError(f"amount must be an int of minor units, got {type(amount).__name__}")
    return {
        "id": id,
        "debit_account_id": debit_account_id,
        "credit_account_id": credit_account_id,
        "amount": amount,
        "currency": currency,
        "pending": pending or None,
        "timeout_seconds": timeout_seconds,
        "description": description,
        "metadata": dict(metadata) if metadata is not None else None,
        # History import (contract 1.1, admin only): the time the transfer's entries carry.
        "imported_at": _utc_timestamp(imported_at) if imported_at is not None else None,
    }


def _utc_timestamp(moment: datetime) -> str:
    """The contract's form of a timestamp in a body: RFC 3339 in UTC with microseconds."""
    if moment.tzinfo is None:
        raise ValueError("timestamps need a time zone (the ledger will not guess one): use datetime.now(UTC)")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def create_transfer(**fields: Any) -> Call[models.Transfer]:
    transfer_id = fields.pop("id") or new_id()
    body = _body(transfer_fields(id=transfer_id, **fields))
    return Call("create_transfer", "POST", "/v1/transfers", _transfer, body=body, writes=True, ids=(transfer_id,))


def create_batch(transfers: Sequence[models.NewTransfer | Mapping[str, Any]]) -> Call[models.BatchResult]:
    items = []
    for transfer in transfers:
        given = transfer if isinstance(transfer, Mapping) else _as_mapping(transfer)
        linked = bool(given.get("linked", False))
        item = transfer_fields(
            id=given.get("id") or new_id(),
            debit_account_id=given["debit_account_id"],
            credit_account_id=given["credit_account_id"],
            amount=given["amount"],
            currency=given.get("currency"),
            pending=given.get("pending"),
            timeout_seconds=given.get("timeout_seconds"),
            description=given.get("description"),
            metadata=given.get("metadata"),
            imported_at=given.get("imported_at"),
        )
        items.append({key: value for key, value in {**item, "linked": linked or None}.items() if value is not None})
    ids = tuple(item["id"] for item in items)
    return Call(
        "create_batch",
        "POST",
        "/v1/transfers/batch",
        _decoder(models.BatchResult),
        body=_encoder.encode({"transfers": items}),
        writes=True,
        ids=ids,
    )


def _as_mapping(transfer: models.NewTransfer) -> dict[str, Any]:
    return {name: getattr(transfer, name) for name in transfer.__dataclass_fields__}


def get_transfer(transfer_id: str) -> Call[models.Transfer]:
    return Call("get_transfer", "GET", f"/v1/transfers/{_segment(transfer_id)}", _transfer)


def list_transfers(
    *,
    account_id: str | None,
    status: str | None,
    start: datetime | None,
    end: datetime | None,
    limit: int | None,
    cursor: str | None,
    metadata: Mapping[str, str] | None = None,
) -> Call[models.Page[models.Transfer]]:
    params = _params(account_id=account_id, status=status, from_=start, to=end, limit=limit, cursor=cursor)
    params.update(_metadata_params(metadata))
    return Call("list_transfers", "GET", "/v1/transfers", _transfers, params=params)


def post_transfer(transfer_id: str, amount: int | None) -> Call[models.Transfer]:
    # Posting again with the same amount answers the same 200: safe to retry.
    return Call(
        "post_transfer",
        "POST",
        f"/v1/transfers/{_segment(transfer_id)}/post",
        _transfer,
        body=_body({"amount": amount}),
        writes=True,
        ids=(transfer_id,),
    )


def void_transfer(transfer_id: str) -> Call[models.Transfer]:
    return Call(
        "void_transfer",
        "POST",
        f"/v1/transfers/{_segment(transfer_id)}/void",
        _transfer,
        body=b"{}",
        writes=True,
        ids=(transfer_id,),
    )


def reverse_transfer(transfer_id: str, *, id: str | None, amount: int | None) -> Call[models.Transfer]:
    reversal_id = id or new_id()
    return Call(
        "reverse_transfer",
        "POST",
        f"/v1/transfers/{_segment(transfer_id)}/reverse",
        _transfer,
        body=_body({"id": reversal_id, "amount": amount}),
        writes=True,
        ids=(reversal_id,),
    )


def list_entries(
    account_id: str, *, start: datetime | None, end: datetime | None, limit: int | None, cursor: str | None
) -> Call[models.Page[models.Entry]]:
    params = _params(from_=start, to=end, limit=limit, cursor=cursor)
    return Call("list_entries", "GET", f"/v1/accounts/{_segment(account_id)}/entries", _entries, params=params)


def get_balance(account_id: str, *, as_of: datetime | None) -> Call[models.AccountBalance]:
    return Call(
        "get_balance",
        "GET",
        f"/v1/accounts/{_segment(account_id)}/balance",
        _decoder(models.AccountBalance),
        params=_params(as_of=as_of),
    )


def trial_balance(*, currency: str | None, as_of: datetime | None) -> Call[models.TrialBalance]:
    return Call(
        "trial_balance",
        "GET",
        "/v1/balances",
        _decoder(models.TrialBalance),
        params=_params(currency=currency, as_of=as_of),
    )


def aggregate_balances(
    currency: str, *, metadata: Mapping[str, str] | None, as_of: datetime | None
) -> Call[models.AggregateBalance]:
    params = {**_params(currency=currency, as_of=as_of), **_metadata_params(metadata)}
    return Call("aggregate_balances", "GET", "/v1/balances/aggregate", _decoder(models.AggregateBalance), params=params)


def audit_verify(*, account_id: str | None) -> Call[models.AuditReport]:
    # A POST that changes nothing: safe to repeat.
    return Call(
        "audit_verify", "POST", "/v1/audit/verify", _decoder(models.AuditReport), body=_body({"account_id": account_id})
    )


def create_key(role: str, *, name: str | None) -> Call[models.CreatedApiKey]:
    return Call(
        "create_key",
        "POST",
        "/v1/keys",
        _decoder(models.CreatedApiKey),
        body=_body({"role": role, "name": name}),
        safety=Safety.ONCE,
        writes=True,
    )


def list_keys(*, limit: int | None, cursor: str | None) -> Call[models.Page[models.ApiKey]]:
    return Call("list_keys", "GET", "/v1/keys", _keys, params=_params(limit=limit, cursor=cursor))


def revoke_key(key_id: str) -> Call[models.ApiKey]:
    # Revoking again answers the same: safe to retry.
    return Call(
        "revoke_key", "DELETE", f"/v1/keys/{_segment(key_id)}", _decoder(models.ApiKey), writes=True, ids=(key_id,)
    )


def _types(types: str | Sequence[str] | None) -> list[str] | None:
    # A single type given as a string is one type, not a sequence of letters.
    if types is None:
        return None
    return [types] if isinstance(types, str) else list(types)


def list_events(
    *,
    after: str | None,
    limit: int | None,
    types: str | Sequence[str] | None,
    account_id: str | None,
    wait: float | None,
) -> Call[models.EventPage]:
    wanted = _types(types)
    params = _params(
        after=after,
        limit=limit,
        types=",".join(wanted) if wanted is not None else None,
        account_id=account_id,
        wait=wait,
    )
    return Call("list_events", "GET", "/v1/events", _decoder(models.EventPage), params=params, long_poll=wait)


def create_webhook(url: str, *, types: str | Sequence[str] | None) -> Call[models.CreatedWebhook]:
    # No id: a second webhook would get every event twice, so it is retried only when
    # the request surely never reached the server (as for API keys).
    return Call(
        "create_webhook",
        "POST",
        "/v1/webhooks",
        _decoder(models.CreatedWebhook),
        body=_body({"url": url, "types": _types(types)}),
        safety=Safety.ONCE,
        writes=True,
    )


def list_webhooks(*, limit: int | None, cursor: str | None) -> Call[models.Page[models.Webhook]]:
    return Call(
        "list_webhooks",
        "GET",
        "/v1/webhooks",
        _decoder(models.Page[models.Webhook]),
        params=_params(limit=limit, cursor=cursor),
    )


def get_webhook(webhook_id: str) -> Call[models.Webhook]:
    return Call("get_webhook", "GET", f"/v1/webhooks/{_segment(webhook_id)}", _webhook)


def delete_webhook(webhook_id: str) -> Call[models.Webhook]:
    # Deleting again answers the same (the deleted webhook): safe to retry.
    return Call(
        "delete_webhook",
        "DELETE",
        f"/v1/webhooks/{_segment(webhook_id)}",
        _webhook,
        writes=True,
        ids=(webhook_id,),
    )


def list_webhook_deliveries(
    webhook_id: str, *, limit: int | None, cursor: str | None
) -> Call[models.Page[models.WebhookDelivery]]:
    return Call(
        "list_webhook_deliveries",
        "GET",
        f"/v1/webhooks/{_segment(webhook_id)}/deliveries",
        _decoder(models.Page[models.WebhookDelivery]),
        params=_params(limit=limit, cursor=cursor),
    )


def health(which: str) -> Call[models.Health]:
    # A probe reports what it sees now: one attempt, and "not ready" (503) is an answer.
    return Call(
        f"health_{which}",
        "GET",
        f"/health/{which}",
        _decoder(models.Health),
        answers=frozenset({200, 503}),
        retries=False,
    )
