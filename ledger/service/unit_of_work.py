"""One database transaction per unit of work, retried whole on transient conflicts.

Serialization failures (40001) and deadlocks (40P01) mean PostgreSQL rolled the whole
transaction back, so the only correct retry is to run the whole unit of work again
(never from a savepoint). Other database failures become the `Unavailable` errors
clients can retry by transfer id: a lost connection, a lock held past `lock_timeout`,
a pool with no free connection within `pool_timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

import asyncpg
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from ledger.errors import DatabaseUnavailable, LedgerError, LockTimeout, Overloaded
from ledger.settings import Settings

T = TypeVar("T")
# What a unit of work runs its statements on: a Core connection in the service; sessions
# have the same execute/begin_nested/commit surface.
Executor = AsyncConnection | AsyncSession
logger = logging.getLogger("ledger.unit_of_work")

RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})  # serialization_failure, deadlock_detected
UNAVAILABLE_SQLSTATES = frozenset(
    {
        "57P01",  # admin_shutdown
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now
        "53300",  # too_many_connections
        "53400",  # configuration_limit_exceeded
        "25006",  # read_only_sql_transaction (a standby answered)
    }
)


def sqlstate(error: BaseException) -> str | None:
    """The SQLSTATE of a database error, however SQLAlchemy and asyncpg wrapped it."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        state = getattr(current, "sqlstate", None) or getattr(current, "pgcode", None)
        if isinstance(state, str) and state:
            return state
        current = getattr(current, "orig", None) or current.__cause__
    return None


def constraint_name(error: BaseException) -> str | None:
    current: BaseException | None = error
    for _ in range(4):
        if current is None:
            return None
        name = getattr(current, "constraint_name", None)
        if name:
            return str(name)
        current = getattr(current, "orig", None) or current.__cause__
    return None


class RetryableConflict(Exception):
    """The service's own reason to re-run a whole unit of work (e.g. ids claimed by
    concurrent requests faster than a batch could write them)."""


# Errors from the database: through SQLAlchemy, or straight from asyncpg on the hot path
# (`UnitOfWork.run_on_driver`).
DATABASE_ERRORS = (
    sa_exc.DBAPIError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)


def is_retryable(error: BaseException) -> bool:
    if isinstance(error, RetryableConflict):
        return True
    return isinstance(error, DATABASE_ERRORS) and sqlstate(error) in RETRYABLE_SQLSTATES


def is_connection_lost(error: BaseException) -> bool:
    """The connection itself failed (not a statement): the server went away, the backend
    was terminated, the socket broke."""
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return True
    state = sqlstate(error) or ""
    if state.startswith("08") or state in UNAVAILABLE_SQLSTATES:
        return True
    if isinstance(error, (asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError, ConnectionError)):
        # asyncpg's own view that the connection is broken or in an unusable state.
        return True
    return isinstance(error, (sa_exc.OperationalError, sa_exc.InterfaceError)) and not state


def translate(error: BaseException) -> LedgerError | None:
    """Map an infrastructure failure to the retryable error clients see, or None (a bug)."""
    if isinstance(error, LedgerError):
        return error
    if isinstance(error, RetryableConflict):
        return Overloaded(str(error))
    if isinstance(error, sa_exc.TimeoutError):
        return Overloaded("no database connection became free within the pool timeout")
    if isinstance(error, DATABASE_ERRORS):
        state = sqlstate(error) or ""
        if state == "55P03":
            return LockTimeout("an account involved is locked by another transaction; retry with the same id")
        if state == "57014":
            return Overloaded("the database statement timed out")
        if state in RETRYABLE_SQLSTATES:
            return Overloaded("the transaction kept conflicting with concurrent ones; retry with the same id")
        if is_connection_lost(error):
            return DatabaseUnavailable("the database connection failed; retry with the same id")
        return None
    if isinstance(error, (OSError, asyncio.TimeoutError)):
        return DatabaseUnavailable("the database cannot be reached")
    return None


class UnitOfWork:
    """Runs `work(session)` in one transaction; `work` commits, anything else rolls back."""

    def __init__(
        self,
        connect: Callable[[], AbstractAsyncContextManager[Executor]],
        settings: Settings,
        on_retry: Callable[[str], None] | None = None,
        on_finish: Callable[[], None] | None = None,
    ) -> None:
        # `engine.connect` in the service: Core connections carry no ORM bookkeeping, which
        # the hot path does not need (a session factory works too, e.g. in tests).
        self._connect = connect
        self._settings = settings
        self._on_retry = on_retry
        # Called after every unit of work, whatever its outcome (a refusal may follow a
        # committed expiry): the service's writes wake the event sequencer with it
        # (ledger.service.events); reads use another instance, which does not.
        self._on_finish = on_finish
        # Units of work waiting for a pooled connection right now (a gauge for /metrics).
        self.waiting = 0

    @property
    def lock_timeout_seconds(self) -> float:
        return self._settings.lock_timeout_ms / 1000

    async def run(self, work: Callable[[Executor], Awaitable[T]]) -> T:
        return await self._run(work, on_driver=False)

    async def run_on_driver(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run `work` on the pooled connection's asyncpg connection, for the hot path.

        SQLAlchemy's statement layer was about a third of the service's CPU per transfer;
        the driver skips it. `work` sends its own BEGIN and COMMIT. A transaction it leaves
        open is rolled back here (the pool's reset knows nothing of it), and a connection
        left in doubt (a cancelled request, a failed rollback) is discarded, not reused.
        """
        return await self._run(work, on_driver=True)

    async def _run(self, work: Callable[[Any], Awaitable[T]], *, on_driver: bool) -> T:
        try:
            return await self._attempts(work, on_driver=on_driver)
        finally:
            if self._on_finish is not None:
                self._on_finish()

    async def _attempts(self, work: Callable[[Any], Awaitable[T]], *, on_driver: bool) -> T:
        attempts = self._settings.max_retries + 1
        for attempt in range(1, attempts + 1):
            checked_out = False
            try:
                async with contextlib.AsyncExitStack() as stack:
                    # Take the connection first, so that waiting for the pool is measured.
                    self.waiting += 1
                    try:
                        executor = await stack.enter_async_context(self._connect())
                        connection = await executor.connection() if isinstance(executor, AsyncSession) else executor
                        driver = (await connection.get_raw_connection()).driver_connection if on_driver else None
                        checked_out = True
                    finally:
                        self.waiting -= 1
                    if driver is None:
                        # Leaving this block without commit rolls back.
                        result = await _on_sqlalchemy(connection, executor, work)
                    else:
                        result = await _on_driver(connection, driver, work)
                return result
            except Exception as error:
                if is_retryable(error) and attempt < attempts:
                    reason = sqlstate(error) or type(error).__name__
                    logger.info("retrying a transaction after %s (attempt %d)", reason, attempt)
                    if self._on_retry is not None:
                        self._on_retry(reason)
                    await asyncio.sleep(self._backoff_seconds(attempt))
                    continue
                if checked_out and is_connection_lost(error) and attempt < attempts:
                    # A pooled connection can die while idle (a database restart, a
                    # terminated backend). Instead of a ping before every use (a round trip
                    # per transaction), run the unit of work again on another connection:
                    # every unit of work is idempotent (transfer ids, repeated decisions),
                    # so even a commit whose answer was lost is safe to redo. The dead
                    # connection was discarded; failing to connect at all is not retried.
                    logger.info("retrying a transaction on a new connection after %s", type(error).__name__)
                    if self._on_retry is not None:
                        self._on_retry("connection_lost")
                    continue
                translated = translate(error)
                if translated is None or translated is error:
                    raise
                raise translated from error
        raise AssertionError("unreachable: the loop returns or raises")

    def _backoff_seconds(self, attempt: int) -> float:
        # Full jitter: spreads retries so that colliding transactions do not collide again.
        ceiling = self._settings.retry_base_delay_ms * (2 ** (attempt - 1)) / 1000
        return random.uniform(0, ceiling)


async def _on_driver(connection: AsyncConnection, driver: asyncpg.Connection, work: Callable[[Any], Awaitable[T]]) -> T:
    try:
        return await work(driver)
    except BaseException as error:
        if _connection_in_doubt(error, driver):
            # A statement may still be running, or the protocol's state is unknown (a
            # cancelled request, a broken socket, a terminated session): never reuse it.
            await connection.invalidate()
        elif driver.is_in_transaction():
            try:
                await driver.execute("ROLLBACK")
            except Exception:
                await connection.invalidate()
        raise


async def _on_sqlalchemy(connection: AsyncConnection, executor: Executor, work: Callable[[Any], Awaitable[T]]) -> T:
    try:
        return await work(executor)
    except BaseException as error:
        if in_doubt(error):
            # Returned to the pool as it is, its next user would find asyncpg mid-operation
            # ("cannot switch to state ...; another operation is in progress").
            await invalidate(connection)
        raise


def in_doubt(error: BaseException) -> bool:
    """Whether a connection that raised `error` may be in an unknown protocol state: a
    cancelled or timed-out operation, a broken socket, a terminated session, anything but
    an error the server reported on a statement (or the work's own errors)."""
    if isinstance(error, asyncio.CancelledError | TimeoutError | OSError):
        return True
    if isinstance(error, DATABASE_ERRORS):
        return not sqlstate(error) or is_connection_lost(error)
    return False


async def invalidate(connection: AsyncConnection) -> None:
    """Discard a connection instead of returning it to the pool; never raises (the
    connection may already be gone)."""
    with contextlib.suppress(Exception):
        await connection.invalidate()


def _connection_in_doubt(error: BaseException, driver: asyncpg.Connection) -> bool:
    if driver.is_closed() or not isinstance(error, asyncpg.PostgresError):
        # Anything but an error the server reported on a statement: the client side
        # (asyncpg's protocol state) cannot be trusted.
        return True
    return is_connection_lost(error)
