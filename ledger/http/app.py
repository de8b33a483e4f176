"""The application factory. Its lifespan owns the engine: no module-level state."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from functools import partial
from typing import Any

from litestar import Litestar, Request
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.routes import HTTPRoute

from ledger import __version__
from ledger.database import (
    create_audit_engine,
    create_engine,
    create_replica_engine,
    listen_connection,
    listen_target,
)
from ledger.http.audit import AuditController, Verifications, verify_routed
from ledger.http.auth import ROLES, authenticate
from ledger.http.body import check_request_body
from ledger.http.docs import DOCS_PATH, SwaggerPage, docs_router
from ledger.http.docs_operations import API_DESCRIPTION
from ledger.http.events import EventController, WebhookController, render_event
from ledger.http.fast import transfer_fast_path
from ledger.http.health import live, metrics_endpoint, ready
from ledger.http.keys import KeyController
from ledger.http.openapi import complete_openapi, repair_options
from ledger.http.problems import EXCEPTION_HANDLERS
from ledger.http.routes import AccountController, TransferController
from ledger.integrity import Keyring, load_keyring
from ledger.migrate import head_revision
from ledger.observability import Metrics, request_id_middleware
from ledger.service.accounts import AccountService
from ledger.service.checkpoints import run_checkpointer
from ledger.service.events import EventFeed
from ledger.service.expiry import run_sweeper
from ledger.service.groups import GroupCommitter, GroupLocker, lock_group
from ledger.service.keys import KeyRing
from ledger.service.locking import AccountLocker, lock_accounts
from ledger.service.queries import LedgerQueries
from ledger.service.replica import ReadRouter, ReadTarget
from ledger.service.transfers import TransferService
from ledger.service.unit_of_work import UnitOfWork
from ledger.service.webhooks import Webhooks
from ledger.settings import Settings

logger = logging.getLogger("ledger.app")


@dataclass(frozen=True, slots=True)
class Ledger:
    """The services a request handler may call."""

    unit_of_work: UnitOfWork
    accounts: AccountService
    groups: GroupCommitter
    transfers: TransferService
    queries: LedgerQueries


# How long the background tasks get to end once cancelled, at shutdown.
STOP_SECONDS = 10.0


async def stop_tasks(tasks: list[asyncio.Task[Any]], seconds: float = STOP_SECONDS) -> None:
    """Cancel the background tasks and wait for them, but not without end: a task that
    does not end (a bug: every one of them ends at its next await once cancelled) is
    logged as an error and left behind, instead of hanging the shutdown of the process."""
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    done, pending = await asyncio.wait(tasks, timeout=seconds)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            logger.error("background task %s failed: %r", task.get_name(), task.exception())
    for task in pending:
        logger.error("background task %s did not stop within %g s of being cancelled", task.get_name(), seconds)


def create_app(
    settings: Settings | None = None,
    *,
    locker: AccountLocker = lock_accounts,
    group_locker: GroupLocker = lock_group,
    keyring: Keyring | None = None,
) -> Litestar:
    """Build the app. `locker` and `group_locker` exist so that tests can prove the lock
    order matters.
    The chain keys come from `keyring`, else from the settings (`LEDGER_CHAIN_KEYS` or the
    key file, which `ledger serve` creates at the first start)."""
    settings = settings or Settings.from_env()
    if keyring is None:
        keyring, _ = load_keyring(settings.chain_keys, settings.chain_key_file, create=False)
    chain = keyring.active

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        if settings.insecure_disable_auth:
            logger.warning(
                "AUTHENTICATION IS DISABLED (LEDGER_INSECURE_DISABLE_AUTH=true): every client is admin. "
                "Development only: never expose this service."
            )
        engine = create_engine(settings)
        audit_engine = create_audit_engine(settings)
        replica_engine = create_replica_engine(settings)
        metrics.pool = engine.sync_engine.pool
        app.state.api_keys = KeyRing(engine, settings.admin_key, keyring, disabled=settings.insecure_disable_auth)
        # Reads, the event sequencer and webhook deliveries: on the same pool as writes,
        # but finishing one does not wake the sequencer.
        readers = UnitOfWork(engine.connect, settings, on_retry=metrics.retry)
        listen = listen_target(settings)
        feed = EventFeed(
            readers,
            tick_seconds=settings.events_tick_seconds,
            retention=timedelta(days=settings.events_retention_days) if settings.events_retention_days else None,
            listen=(lambda: listen_connection(listen)) if listen is not None else None,
            on_move=metrics.events_moved,
        )
        app.state.events = feed
        webhooks = Webhooks(readers, keyring, settings, feed, render_event, on_delivery=metrics.webhook_delivery)
        app.state.webhooks = webhooks
        metrics.webhooks = webhooks
        unit_of_work = UnitOfWork(engine.connect, settings, on_retry=metrics.retry, on_finish=feed.poke)
        metrics.unit_of_work = unit_of_work
        app.state.engine = engine
        app.state.audit_engine = audit_engine
        app.state.export_slots = asyncio.Semaphore(settings.export_concurrency)
        queries = LedgerQueries(readers)
        replica = None
        if replica_engine is not None:
            # No retries on the replica: the primary is the retry (ledger.service.replica).
            replica_unit_of_work = UnitOfWork(replica_engine.connect, replace(settings, max_retries=0))
            replica = ReadTarget(replica_engine, LedgerQueries(replica_unit_of_work))
        app.state.reads = ReadRouter(
            ReadTarget(audit_engine, queries),
            readers,
            replica,
            max_wait_ms=settings.replica_max_wait_ms,
            on_read=metrics.replica_read,
        )
        # A verification holds an audit connection for its whole run: leave one of the
        # pool to exports, trial balances and checkpoints.
        app.state.verifications = Verifications(
            partial(verify_routed, app.state.reads, keyring, settings.checkpoints),
            slots=max(1, settings.audit_pool_size - 1),
        )
        app.state.chain = keyring
        groups = GroupCommitter(
            unit_of_work,
            chain,
            max_transfers=settings.group_max_transfers,
            queue_limit=settings.group_queue_limit,
            concurrency=settings.group_concurrency,
            lock_timeout_ms=settings.group_lock_timeout_ms,
            overlap_min=settings.group_overlap_min,
            queue_timeout_seconds=settings.pool_timeout_seconds,
            lock=group_locker,
            on_group=metrics.group,
        )
        metrics.groups = groups
        app.state.ledger = Ledger(
            unit_of_work=unit_of_work,
            accounts=AccountService(unit_of_work, chain),
            groups=groups,
            transfers=TransferService(unit_of_work, chain, groups, locker),
            queries=queries,
        )
        tasks = []
        if settings.expiry_sweep_interval_seconds > 0:
            tasks.append(
                asyncio.create_task(
                    run_sweeper(
                        unit_of_work,
                        settings.expiry_sweep_interval_seconds,
                        settings.expiry_sweep_limit,
                        chain,
                    ),
                    name="ledger-expiry-sweeper",
                )
            )
        if settings.checkpoint_interval_seconds > 0:
            tasks.append(
                asyncio.create_task(
                    run_checkpointer(
                        audit_engine,
                        keyring,
                        settings.checkpoints,
                        settings.checkpoint_interval_seconds,
                        settings.checkpoint_keep,
                    ),
                    name="ledger-checkpointer",
                )
            )
        tasks.append(asyncio.create_task(feed.run(), name="ledger-event-sequencer"))
        tasks.append(asyncio.create_task(webhooks.run(), name="ledger-webhooks"))
        # With `ledger serve --workers N`: this worker's figures, for whichever worker is scraped.
        tasks += metrics.start_publishing()
        _tune_garbage_collector()
        try:
            yield
        finally:
            await stop_tasks(tasks)
            await groups.close()
            await engine.dispose()
            await audit_engine.dispose()
            if replica_engine is not None:
                await replica_engine.dispose()

    metrics = Metrics()
    app = Litestar(
        route_handlers=[
            AccountController,
            TransferController,
            AuditController,
            KeyController,
            EventController,
            WebhookController,
            live,
            ready,
            metrics_endpoint,
        ],
        before_request=before_request,
        lifespan=[lifespan],
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        request_max_body_size=settings.max_body_bytes,
        state=State({"settings": settings, "schema_head": head_revision(), "metrics": metrics}),
        openapi_config=OpenAPIConfig(
            title="Ledger",
            version=__version__,
            description=API_DESCRIPTION,
            path=DOCS_PATH,
            # Swagger UI from this host at /schema and /schema/swagger (ledger.http.docs).
            render_plugins=[SwaggerPage()],
            openapi_router=docs_router(),
        ),
        debug=False,
    )
    _every_route_names_its_roles(app)
    complete_openapi(app)
    repair_options(app)
    # Around the whole application, routing included: 404 and 405 answers get a request
    # id, an access line and a metric too.
    handler = transfer_fast_path(app) if settings.transfer_fast_path else app.asgi_handler
    app.asgi_handler = request_id_middleware(metrics, settings.access_log)(handler)
    return app


# The only routes anyone may call without a key.
PUBLIC_PREFIXES = ("/health/", "/metrics", "/schema")


async def before_request(request: Request) -> None:
    """Who is calling, then what the body is: before any handler reads or decodes it."""
    await authenticate(request)
    await check_request_body(request)


def _every_route_names_its_roles(app: Litestar) -> None:
    """Fail closed at start-up: a route that names no roles (a new endpoint someone forgot
    to protect) would be open to anyone, so the service refuses to start instead."""
    for route in app.routes:
        if not isinstance(route, HTTPRoute) or route.path.startswith(PUBLIC_PREFIXES):
            continue
        for handler in route.route_handlers:
            # Litestar's automatic OPTIONS answers say which methods exist, nothing more.
            if ROLES not in handler.opt and handler.http_methods != {"OPTIONS"}:
                raise RuntimeError(f"{route.path} ({', '.join(sorted(handler.http_methods))}) names no roles")


def _tune_garbage_collector() -> None:
    """Fewer, shorter collector pauses, for the latency tail.

    Everything allocated by start-up (modules, the app, compiled routes) lives as long
    as the process: freezing it keeps full collections from scanning it again. A
    request allocates hundreds of short-lived objects, so the default threshold of 700
    ran a young collection several times per request.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def create_app_from_env() -> Litestar:
    """Entry point for ASGI servers (`uvicorn --factory ledger.http.app:create_app_from_env`)."""
    return create_app(Settings.from_env())
