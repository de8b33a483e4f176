"""`LedgerClient` (on httpx.Client) and `AsyncLedgerClient` (on httpx.AsyncClient): the
same methods, one blocking, one awaitable. Requests, retries and errors are decided in
`ledger.client._core`; here they are only sent."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, Self, TypeVar

import httpx

from ledger.client import _core
from ledger.client._core import Attempts, Call, Done, Settings
from ledger.client.models import (
    Account,
    AccountBalance,
    AccountChange,
    AggregateBalance,
    ApiKey,
    AuditReport,
    BatchResult,
    CreatedApiKey,
    CreatedWebhook,
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

T = TypeVar("T")


class Unset:
    """The default of `update_account`'s fields: not sent, so not changed (None is sent:
    it removes a limit or the name)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET = Unset()


def _changes(**fields: Any) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if value is not UNSET}


class _Base:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = _core.TIMEOUT_SECONDS,
        connect_timeout: float = _core.CONNECT_TIMEOUT_SECONDS,
        max_attempts: int = _core.MAX_ATTEMPTS,
        base_backoff: float = _core.BASE_BACKOFF_SECONDS,
        max_backoff: float = _core.MAX_BACKOFF_SECONDS,
        total_timeout: float = _core.TOTAL_TIMEOUT_SECONDS,
        max_connections: int = _core.MAX_CONNECTIONS,
        max_keepalive_connections: int = _core.MAX_KEEPALIVE_CONNECTIONS,
        keepalive_expiry: float = _core.KEEPALIVE_EXPIRY_SECONDS,
        headers: Mapping[str, str] | None = None,
        verify: Any = True,
        transport: Any = None,
    ) -> None:
        """`timeout`: seconds per attempt; `total_timeout`: seconds per call, every
        attempt and wait included; `max_attempts`: attempts per call; waits between
        attempts double from `base_backoff` up to `max_backoff` (with jitter), or last
        what `Retry-After` asks. `max_connections`, `max_keepalive_connections`,
        `keepalive_expiry`: the connection pool. `transport`: an httpx transport (for
        tests, or a custom TLS or proxy set-up)."""
        if not api_key:
            raise ValueError("an API key is required")
        self.settings = Settings(
            timeout=timeout,
            connect_timeout=connect_timeout,
            max_attempts=max_attempts,
            base_backoff=base_backoff,
            max_backoff=max_backoff,
            total_timeout=total_timeout,
            max_connections=max_connections,
            max_keepalive_connections=max_keepalive_connections,
            keepalive_expiry=keepalive_expiry,
        )
        self._options = {**self.settings.http_options(base_url, api_key, headers), "verify": verify}
        if transport is not None:
            self._options["transport"] = transport


class LedgerClient(_Base):
    """A blocking client of the ledger's HTTP API. Thread-safe (one connection pool for
    all threads); use it as a context manager, or call `close()`."""

    def __init__(self, base_url: str, api_key: str, **options: Any) -> None:
        super().__init__(base_url, api_key, **options)
        self._http = httpx.Client(**self._options)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self, call: Call[T]) -> T:
        attempts = Attempts(call, self.settings)
        while True:
            try:
                response = self._http.request(**attempts.request())
            except httpx.TransportError as error:
                step = attempts.failed(error)
            else:
                step = attempts.answered(response)
            if isinstance(step, Done):
                return step.value
            time.sleep(step.seconds)

    # -- accounts -----------------------------------------------------------------------

    def create_account(
        self,
        currency: str,
        *,
        id: str | None = None,
        name: str | None = None,
        allow_negative_balance: bool = False,
        metadata: Mapping[str, str] | None = None,
        overdraft_limit: int | None = None,
        max_balance: int | None = None,
    ) -> Account:
        """Open an account (idempotent by `id`, generated when not given; `replayed` is
        True when it already existed with these fields)."""
        return self._run(
            _core.create_account(
                currency,
                id=id,
                name=name,
                allow_negative_balance=allow_negative_balance,
                metadata=metadata,
                overdraft_limit=overdraft_limit,
                max_balance=max_balance,
            )
        )

    def get_account(self, account_id: str) -> Account:
        return self._run(_core.get_account(account_id))

    def update_account(
        self,
        account_id: str,
        *,
        status: str | Unset = UNSET,
        overdraft_limit: int | Unset | None = UNSET,
        max_balance: int | Unset | None = UNSET,
        name: str | Unset | None = UNSET,
        metadata: Mapping[str, str] | Unset = UNSET,
    ) -> Account:
        """Change an account (admin key): `status` ("open", "frozen", "closed"), limits
        (None removes one), `name`, `metadata` (replaced whole). Only what is given changes."""
        changes = _changes(status=status, overdraft_limit=overdraft_limit, max_balance=max_balance, name=name,
                           metadata=metadata)  # fmt: skip
        return self._run(_core.update_account(account_id, changes))

    def list_account_changes(
        self, account_id: str, *, limit: int | None = None, cursor: str | None = None
    ) -> Page[AccountChange]:
        return self._run(_core.list_account_changes(account_id, limit=limit, cursor=cursor))

    def iter_account_changes(self, account_id: str, *, page_size: int | None = None) -> Iterator[AccountChange]:
        """Every change of the account, oldest first."""
        return self._iterate(lambda cursor: _core.list_account_changes(account_id, limit=page_size, cursor=cursor))

    def list_accounts(
        self,
        *,
        currency: str | None = None,
        metadata: Mapping[str, str] | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page[Account]:
        """One page of accounts by id; `metadata` keeps those whose metadata holds every pair."""
        return self._run(_core.list_accounts(currency=currency, limit=limit, cursor=cursor, metadata=metadata))

    def iter_accounts(
        self, *, currency: str | None = None, metadata: Mapping[str, str] | None = None, page_size: int | None = None
    ) -> Iterator[Account]:
        """Every account (by id), page after page."""
        return self._iterate(
            lambda cursor: _core.list_accounts(currency=currency, limit=page_size, cursor=cursor, metadata=metadata)
        )

    # -- transfers ----------------------------------------------------------------------

    def create_transfer(
        self,
        debit_account_id: str,
        credit_account_id: str,
        amount: int,
        *,
        id: str | None = None,
        currency: str | None = None,
        pending: bool = False,
        timeout_seconds: int | None = None,
        description: str | None = None,
        metadata: Mapping[str, str] | None = None,
        imported_at: datetime | None = None,
    ) -> Transfer:
        """Move `amount` minor units, once per `id` (generated when not given: read it
        back from the result). Raises `Refused` (e.g. `InsufficientFunds`) for a recorded
        refusal, `OutcomeUnknown` when no attempt got a definitive answer."""
        return self._run(
            _core.create_transfer(
                id=id,
                debit_account_id=debit_account_id,
                credit_account_id=credit_account_id,
                amount=amount,
                currency=currency,
                pending=pending,
                timeout_seconds=timeout_seconds,
                description=description,
                metadata=metadata,
                imported_at=imported_at,
            )
        )

    def create_batch(self, transfers: Sequence[NewTransfer | Mapping[str, Any]]) -> BatchResult:
        """Apply 1 to 1000 transfers in order; each item's result carries its id (generated
        for items without one) and its status: created, replayed or rejected."""
        return self._run(_core.create_batch(transfers))

    def get_transfer(self, transfer_id: str) -> Transfer:
        return self._run(_core.get_transfer(transfer_id))

    def list_transfers(
        self,
        *,
        account_id: str | None = None,
        status: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        metadata: Mapping[str, str] | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page[Transfer]:
        """Transfers oldest first; `start`/`end` are the inclusive `from`/`to` bounds."""
        return self._run(
            _core.list_transfers(
                account_id=account_id,
                status=status,
                start=start,
                end=end,
                limit=limit,
                cursor=cursor,
                metadata=metadata,
            )
        )

    def iter_transfers(
        self,
        *,
        account_id: str | None = None,
        status: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        metadata: Mapping[str, str] | None = None,
        page_size: int | None = None,
    ) -> Iterator[Transfer]:
        return self._iterate(
            lambda cursor: _core.list_transfers(
                account_id=account_id,
                status=status,
                start=start,
                end=end,
                limit=page_size,
                cursor=cursor,
                metadata=metadata,
            )
        )

    def post_transfer(self, transfer_id: str, *, amount: int | None = None) -> Transfer:
        """Post a pending transfer: all of it, or `amount` (the rest is released)."""
        return self._run(_core.post_transfer(transfer_id, amount))

    def void_transfer(self, transfer_id: str) -> Transfer:
        return self._run(_core.void_transfer(transfer_id))

    def reverse_transfer(self, transfer_id: str, *, id: str | None = None, amount: int | None = None) -> Transfer:
        """A new transfer in the opposite direction, idempotent by its own `id`
        (generated when not given); without `amount`, all that is still reversible."""
        return self._run(_core.reverse_transfer(transfer_id, id=id, amount=amount))

    # -- history and audit --------------------------------------------------------------

    def list_entries(
        self,
        account_id: str,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page[Entry]:
        return self._run(_core.list_entries(account_id, start=start, end=end, limit=limit, cursor=cursor))

    def iter_entries(
        self,
        account_id: str,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        page_size: int | None = None,
    ) -> Iterator[Entry]:
        """The account's journal, oldest first."""
        return self._iterate(
            lambda cursor: _core.list_entries(account_id, start=start, end=end, limit=page_size, cursor=cursor)
        )

    def get_balance(self, account_id: str, *, as_of: datetime | None = None) -> AccountBalance:
        """The posted balance after the last entry at or before `as_of` (default: now)."""
        return self._run(_core.get_balance(account_id, as_of=as_of))

    def trial_balance(self, *, currency: str | None = None, as_of: datetime | None = None) -> TrialBalance:
        return self._run(_core.trial_balance(currency=currency, as_of=as_of))

    def aggregate_balances(
        self, currency: str, metadata: Mapping[str, str] | None = None, as_of: datetime | None = None
    ) -> AggregateBalance:
        """Balances summed over the accounts of `currency` whose metadata holds every pair
        of `metadata` (all of them without), now or as of `as_of` (not in the future),
        from one snapshot."""
        return self._run(_core.aggregate_balances(currency, metadata=metadata, as_of=as_of))

    def audit_verify(self, *, account_id: str | None = None) -> AuditReport:
        return self._run(_core.audit_verify(account_id=account_id))

    # -- keys (admin) -------------------------------------------------------------------

    def create_key(self, role: str, *, name: str | None = None) -> CreatedApiKey:
        """A new API key (`admin`, `poster` or `auditor`); `key` is shown this once. Not
        retried once the request may have reached the server (a key has no id)."""
        return self._run(_core.create_key(role, name=name))

    def list_keys(self, *, limit: int | None = None, cursor: str | None = None) -> Page[ApiKey]:
        return self._run(_core.list_keys(limit=limit, cursor=cursor))

    def iter_keys(self, *, page_size: int | None = None) -> Iterator[ApiKey]:
        return self._iterate(lambda cursor: _core.list_keys(limit=page_size, cursor=cursor))

    def revoke_key(self, key_id: str) -> ApiKey:
        return self._run(_core.revoke_key(key_id))

    # -- events -------------------------------------------------------------------------

    def list_events(
        self,
        *,
        after: str | None = None,
        limit: int | None = None,
        types: str | Sequence[str] | None = None,
        account_id: str | None = None,
        wait: int | None = None,
    ) -> EventPage:
        """One page of the events feed, oldest first: the events after `after` (a
        `next_cursor` or an event id; default: the oldest the feed keeps), of `types`
        only, of `account_id` only. With `wait`, an empty feed is held up to that many
        seconds (0 to 30) for an event to arrive. Raises `CursorExpired` for a cursor
        older than the feed keeps, `InvalidCursor` for one it never gave."""
        return self._run(_core.list_events(after=after, limit=limit, types=types, account_id=account_id, wait=wait))

    def follow_events(
        self,
        *,
        after: str | None = None,
        types: str | Sequence[str] | None = None,
        account_id: str | None = None,
        wait: int = 30,
        page_size: int | None = None,
        stop_when_idle: bool = False,
    ) -> Iterator[Event]:
        """Every event after `after`, one by one, then each new one as it happens: each
        page is a long poll of `wait` seconds, so a quiet feed costs a request per `wait`.
        Endless, unless `stop_when_idle`: it then ends at the first empty page (at once
        when caught up if `wait=0`, after `wait` quiet seconds otherwise). To resume after
        a restart, pass the `id` of the last event processed as `after`. Each page is
        retried like any read; `ConnectionFailed` or `Unavailable` ends the iteration only
        once a page's retries are spent, and `CursorExpired` when `after` is too old."""
        return self._follow(
            lambda cursor: _core.list_events(
                after=cursor, limit=page_size, types=types, account_id=account_id, wait=wait
            ),
            after,
            stop_when_idle,
        )

    # -- webhooks (admin) ---------------------------------------------------------------

    def create_webhook(self, url: str, *, types: str | Sequence[str] | None = None) -> CreatedWebhook:
        """Have the events of `types` (default: all) POSTed to `url`, each signed with
        the `secret` of the answer (see `ledger.client.webhooks.verify_signature`). Not
        retried once the request may have reached the server (a webhook has no id).
        Raises `WebhookUrlNotAllowed` for a URL the service will not call."""
        return self._run(_core.create_webhook(url, types=types))

    def list_webhooks(self, *, limit: int | None = None, cursor: str | None = None) -> Page[Webhook]:
        return self._run(_core.list_webhooks(limit=limit, cursor=cursor))

    def iter_webhooks(self, *, page_size: int | None = None) -> Iterator[Webhook]:
        return self._iterate(lambda cursor: _core.list_webhooks(limit=page_size, cursor=cursor))

    def get_webhook(self, webhook_id: str) -> Webhook:
        return self._run(_core.get_webhook(webhook_id))

    def delete_webhook(self, webhook_id: str) -> Webhook:
        """Stop deliveries to the webhook (those not made yet are cancelled); answers it
        with status "deleted", again if it already was."""
        return self._run(_core.delete_webhook(webhook_id))

    def list_webhook_deliveries(
        self, webhook_id: str, *, limit: int | None = None, cursor: str | None = None
    ) -> Page[WebhookDelivery]:
        """The webhook's deliveries (one per event), with their attempts and outcome."""
        return self._run(_core.list_webhook_deliveries(webhook_id, limit=limit, cursor=cursor))

    def iter_webhook_deliveries(self, webhook_id: str, *, page_size: int | None = None) -> Iterator[WebhookDelivery]:
        return self._iterate(lambda cursor: _core.list_webhook_deliveries(webhook_id, limit=page_size, cursor=cursor))

    # -- operations ---------------------------------------------------------------------

    def health_live(self) -> Health:
        return self._run(_core.health("live"))

    def health_ready(self) -> Health:
        """`status` "ok", or "unavailable" (with `checks` saying why) when not ready."""
        return self._run(_core.health("ready"))

    def _iterate(self, page: Any) -> Iterator[Any]:
        cursor: str | None = None
        while True:
            result = self._run(page(cursor))
            yield from result.data
            cursor = result.next_cursor
            if not cursor:
                return

    def _follow(
        self, page: Callable[[str | None], Call[EventPage]], cursor: str | None, stop_when_idle: bool
    ) -> Iterator[Event]:
        # Unlike `_iterate`, an empty page or a repeated cursor is not the end: the feed's
        # end moves as events happen, and `next_cursor` is always where to ask next.
        while True:
            result = self._run(page(cursor))
            yield from result.data
            if stop_when_idle and not result.data:
                return
            cursor = result.next_cursor


class AsyncLedgerClient(_Base):
    """The awaitable twin of `LedgerClient`: the same methods, the same settings. Use it
    as an async context manager, or call `aclose()`."""

    def __init__(self, base_url: str, api_key: str, **options: Any) -> None:
        super().__init__(base_url, api_key, **options)
        self._http = httpx.AsyncClient(**self._options)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _run(self, call: Call[T]) -> T:
        attempts = Attempts(call, self.settings)
        while True:
            try:
                response = await self._http.request(**attempts.request())
            except httpx.TransportError as error:
                step = attempts.failed(error)
            else:
                step = attempts.answered(response)
            if isinstance(step, Done):
                return step.value
            await asyncio.sleep(step.seconds)

    # -- accounts -----------------------------------------------------------------------

    async def create_account(
        self,
        currency: str,
        *,
        id: str | None = None,
        name: str | None = None,
        allow_negative_balance: bool = False,
        metadata: Mapping[str, str] | None = None,
        overdraft_limit: int | None = None,
        max_balance: int | None = None,
    ) -> Account:
        return await self._run(
            _core.create_account(
                currency,
                id=id,
                name=name,
                allow_negative_balance=allow_negative_balance,
                metadata=metadata,
                overdraft_limit=overdraft_limit,
                max_balance=max_balance,
            )
        )

    async def get_account(self, account_id: str) -> Account:
        return await self._run(_core.get_account(account_id))

    async def update_account(
        self,
        account_id: str,
        *,
        status: str | Unset = UNSET,
        overdraft_limit: int | Unset | None = UNSET,
        max_balance: int | Unset | None = UNSET,
        name: str | Unset | None = UNSET,
        metadata: Mapping[str, str] | Unset = UNSET,
    ) -> Account:
        changes = _changes(status=status, overdraft_limit=overdraft_limit, max_balance=max_balance, name=name,
                           metadata=metadata)  # fmt: skip
        return await self._run(_core.update_account(account_id, changes))

    async def list_account_changes(
        self, account_id: str, *, limit: int | None = None, cursor: str | None = None
    ) -> Page[AccountChange]:
        return await self._run(_core.list_account_changes(account_id, limit=limit, cursor=cursor))

    def iter_account_changes(self, account_id: str, *, page_size: int | None = None) -> AsyncIterator[AccountChange]:
        return self._iterate(lambda cursor: _core.list_account_changes(account_id, limit=page_size, cursor=cursor))

    async def list_accounts(
        self,
        *,
        currency: str | None = None,
        metadata: Mapping[str, str] | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page[Account]:
        return await self._run(_core.list_accounts(currency=currency, limit=limit, cursor=cursor, metadata=metadata))

    def iter_accounts(
        self, *, currency: str | None = None, metadata: Mapping[str, str] | None = None, page_size: int | None = None
    ) -> AsyncIterator[Account]:
        return self._iterate(
            lambda cursor: _core.list_accounts(currency=currency, limit=page_size, cursor=cursor, metadata=metadata)
        )

    # -- transfers ----------------------------------------------------------------------

    async def create_transfer(
        self,
        debit_account_id: str,
        credit_account_id: str,
        amount: int,
        *,
        id: str | None = None,
        currency: str | None = None,
        pending: bool = False,
        timeout_seconds: int | None = None,
        description: str | None = None,
        metadata: Mapping[str, str] | None = None,
        imported_at: datetime | None = None,
    ) -> Transfer:
        return await self._run(
            _core.create_transfer(
                id=id,
                debit_account_id=debit_account_id,
                credit_account_id=credit_account_id,
                amount=amount,
                currency=currency,
                pending=pending,
                timeout_seconds=timeout_seconds,
                description=description,
                metadata=metadata,
                imported_at=imported_at,
            )
        )

    async def create_batch(self, transfers: Sequence[NewTransfer | Mapping[str, Any]]) -> BatchResult:
        return await self._run(_core.create_batch(transfers))

    async def get_transfer(self, transfer_id: str) -> Transfer:
        return await self._run(_core.get_transfer(transfer_id))

    async def list_transfers(
        self,
        *,
        account_id: str | None = None,
        status: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        metadata: Mapping[str, str] | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page[Transfer]:
        return await self._run(
            _core.list_transfers(
                account_id=account_id,
                status=status,
                start=start,
                end=end,
                limit=limit,
                cursor=cursor,
                metadata=metadata,
            )
        )

    def iter_transfers(
        self,
        *,
        account_id: str | None = None,
        status: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        metadata: Mapping[str, str] | None = None,
        page_size: int | None = None,
    ) -> AsyncIterator[Transfer]:
        return self._iterate(
            lambda cursor: _core.list_transfers(
                account_id=account_id,
                status=status,
                start=start,
                end=end,
                limit=page_size,
                cursor=cursor,
                metadata=metadata,
            )
        )

    async def post_transfer(self, transfer_id: str, *, amount: int | None = None) -> Transfer:
        return await self._run(_core.post_transfer(transfer_id, amount))

    async def void_transfer(self, transfer_id: str) -> Transfer:
        return await self._run(_core.void_transfer(transfer_id))

    async def reverse_transfer(self, transfer_id: str, *, id: str | None = None, amount: int | None = None) -> Transfer:
        return await self._run(_core.reverse_transfer(transfer_id, id=id, amount=amount))

    # -- history and audit --------------------------------------------------------------

    async def list_entries(
        self,
        account_id: str,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page[Entry]:
        return await self._run(_core.list_entries(account_id, start=start, end=end, limit=limit, cursor=cursor))

    def iter_entries(
        self,
        account_id: str,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        page_size: int | None = None,
    ) -> AsyncIterator[Entry]:
        return self._iterate(
            lambda cursor: _core.list_entries(account_id, start=start, end=end, limit=page_size, cursor=cursor)
        )

    async def get_balance(self, account_id: str, *, as_of: datetime | None = None) -> AccountBalance:
        return await self._run(_core.get_balance(account_id, as_of=as_of))

    async def trial_balance(self, *, currency: str | None = None, as_of: datetime | None = None) -> TrialBalance:
        return await self._run(_core.trial_balance(currency=currency, as_of=as_of))

    async def aggregate_balances(
        self, currency: str, metadata: Mapping[str, str] | None = None, as_of: datetime | None = None
    ) -> AggregateBalance:
        return await self._run(_core.aggregate_balances(currency, metadata=metadata, as_of=as_of))

    async def audit_verify(self, *, account_id: str | None = None) -> AuditReport:
        return await self._run(_core.audit_verify(account_id=account_id))

    # -- keys (admin) -------------------------------------------------------------------

    async def create_key(self, role: str, *, name: str | None = None) -> CreatedApiKey:
        return await self._run(_core.create_key(role, name=name))

    async def list_keys(self, *, limit: int | None = None, cursor: str | None = None) -> Page[ApiKey]:
        return await self._run(_core.list_keys(limit=limit, cursor=cursor))

    def iter_keys(self, *, page_size: int | None = None) -> AsyncIterator[ApiKey]:
        return self._iterate(lambda cursor: _core.list_keys(limit=page_size, cursor=cursor))

    async def revoke_key(self, key_id: str) -> ApiKey:
        return await self._run(_core.revoke_key(key_id))

    # -- events -------------------------------------------------------------------------

    async def list_events(
        self,
        *,
        after: str | None = None,
        limit: int | None = None,
        types: str | Sequence[str] | None = None,
        account_id: str | None = None,
        wait: int | None = None,
    ) -> EventPage:
        return await self._run(
            _core.list_events(after=after, limit=limit, types=types, account_id=account_id, wait=wait)
        )

    def follow_events(
        self,
        *,
        after: str | None = None,
        types: str | Sequence[str] | None = None,
        account_id: str | None = None,
        wait: int = 30,
        page_size: int | None = None,
        stop_when_idle: bool = False,
    ) -> AsyncIterator[Event]:
        """See `LedgerClient.follow_events`."""
        return self._follow(
            lambda cursor: _core.list_events(
                after=cursor, limit=page_size, types=types, account_id=account_id, wait=wait
            ),
            after,
            stop_when_idle,
        )

    # -- webhooks (admin) ---------------------------------------------------------------

    async def create_webhook(self, url: str, *, types: str | Sequence[str] | None = None) -> CreatedWebhook:
        return await self._run(_core.create_webhook(url, types=types))

    async def list_webhooks(self, *, limit: int | None = None, cursor: str | None = None) -> Page[Webhook]:
        return await self._run(_core.list_webhooks(limit=limit, cursor=cursor))

    def iter_webhooks(self, *, page_size: int | None = None) -> AsyncIterator[Webhook]:
        return self._iterate(lambda cursor: _core.list_webhooks(limit=page_size, cursor=cursor))

    async def get_webhook(self, webhook_id: str) -> Webhook:
        return await self._run(_core.get_webhook(webhook_id))

    async def delete_webhook(self, webhook_id: str) -> Webhook:
        return await self._run(_core.delete_webhook(webhook_id))

    async def list_webhook_deliveries(
        self, webhook_id: str, *, limit: int | None = None, cursor: str | None = None
    ) -> Page[WebhookDelivery]:
        return await self._run(_core.list_webhook_deliveries(webhook_id, limit=limit, cursor=cursor))

    def iter_webhook_deliveries(
        self, webhook_id: str, *, page_size: int | None = None
    ) -> AsyncIterator[WebhookDelivery]:
        return self._iterate(lambda cursor: _core.list_webhook_deliveries(webhook_id, limit=page_size, cursor=cursor))

    # -- operations ---------------------------------------------------------------------

    async def health_live(self) -> Health:
        return await self._run(_core.health("live"))

    async def health_ready(self) -> Health:
        return await self._run(_core.health("ready"))

    async def _iterate(self, page: Any) -> AsyncIterator[Any]:
        cursor: str | None = None
        while True:
            result = await self._run(page(cursor))
            for item in result.data:
                yield item
            cursor = result.next_cursor
            if not cursor:
                return

    async def _follow(
        self, page: Callable[[str | None], Call[EventPage]], cursor: str | None, stop_when_idle: bool
    ) -> AsyncIterator[Event]:
        while True:
            result = await self._run(page(cursor))
            for event in result.data:
                yield event
            if stop_when_idle and not result.data:
                return
            cursor = result.next_cursor
