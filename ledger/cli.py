"""`ledger serve` and `ledger migrate`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import logging.config
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import urlsplit

from sqlalchemy.ext.asyncio import AsyncEngine

from ledger import migrate
from ledger.observability import logging_config
from ledger.settings import Settings, SettingsError

logger = logging.getLogger("ledger")
T = TypeVar("T")


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{parts.username or ''}@{host}:{parts.port or ''}{parts.path}"


def _database(settings: Settings):  # type: ignore[no-untyped-def]
    """The database URL to use, and the embedded server started for it (or None)."""
    if settings.database_url:
        return settings.database_url, None
    from ledger.embedded import EmbeddedPostgres

    embedded = EmbeddedPostgres(settings.data_dir)
    url = embedded.start()
    logger.info(
        "embedded PostgreSQL at %s (data in %s, password in %s)",
        _redacted(url),
        embedded.data_dir,
        embedded.credentials_file,
    )
    return url, embedded


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def serve(settings: Settings) -> int:
    import uvicorn

    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal into the handler
    # it found: make that handler unwind the stack, so that `finally` stops the embedded
    # PostgreSQL instead of the process dying with it still running.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    url, embedded = _database(settings)
    try:
        migrate.upgrade(url)
        # Worker processes build their app from the environment: hand them the URL.
        os.environ["LEDGER_DATABASE_URL"] = url
        logger.info("serving on http://%s:%s (docs at /schema)", settings.host, settings.port)
        uvicorn.run(
            "ledger.http.app:create_app_from_env",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_level=settings.log_level,
            access_log=False,
            # In-flight requests finish on SIGTERM; after this many seconds they are cut.
            timeout_graceful_shutdown=10,
            log_config=logging_config(settings.log_level),
            server_header=False,
        )
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


def run_migrations(settings: Settings) -> int:
    url, embedded = _database(settings)
    try:
        migrate.upgrade(url)
        logger.info("database at %s is at revision %s", _redacted(url), migrate.head_revision())
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


def _on_database(settings: Settings, work: Callable[[AsyncEngine], Awaitable[T]], *, migrate_first: bool = False) -> T:
    """Run `work` with an engine on the configured (or embedded) database, then clean up."""
    from ledger.database import create_engine

    url, embedded = _database(settings)
    try:
        if migrate_first:
            migrate.upgrade(url)

        async def run() -> T:
            engine = create_engine(settings, url)
            try:
                return await work(engine)
            finally:
                await engine.dispose()

        return asyncio.run(run())
    finally:
        if embedded is not None:
            embedded.stop()


def audit_verify(settings: Settings, account_id: str | None) -> int:
    """Verify the journal; print the report as JSON; exit 1 when anything is wrong."""
    import json

    from ledger.service import audit

    def progress(done: int, total: int, entries: int) -> None:
        if sys.stderr.isatty() or done == total or done % 1000 == 0:
            width = 30
            filled = width * done // max(total, 1)
            print(
                f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} accounts, {entries} entries",
                end="" if done < total else "\n",
                file=sys.stderr,
                flush=True,
            )

    report = _on_database(settings, lambda engine: audit.verify(engine, account_id, progress))
    print(
        json.dumps(
            {
                "ok": report.ok,
                "accounts_checked": report.accounts_checked,
                "entries_checked": report.entries_checked,
                "problems": [
                    {"account_id": p.account_id, "sequence": p.sequence, "code": p.code, "detail": p.detail}
                    for p in report.problems
                ],
                "problems_total": report.problems_total,
            },
            indent=2,
        )
    )
    return 0 if report.ok else 1


def create_key(settings: Settings, role: str, name: str | None) -> int:
    """Create an API key and print it once: only its hash is stored."""
    from ledger.service import keys

    key_id, key = _on_database(settings, lambda engine: keys.create_key(engine, role, name), migrate_first=True)
    print(key)
    print(f"created {role} key {key_id}; store it now, it cannot be shown again", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ledger", description="A double-entry banking ledger on PostgreSQL.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="apply migrations and serve HTTP")
    serve_parser.add_argument("--host", help="address to bind (LEDGER_HOST, default 127.0.0.1)")
    serve_parser.add_argument("--port", type=int, help="port (LEDGER_PORT, default 8000)")
    serve_parser.add_argument("--workers", type=int, help="worker processes (LEDGER_WORKERS, default 1)")
    commands.add_parser("migrate", help="apply migrations and exit")
    keys_parser = commands.add_parser("keys", help="manage API keys")
    keys_commands = keys_parser.add_subparsers(dest="keys_command", required=True)
    create_parser = keys_commands.add_parser("create", help="create a key and print it once")
    create_parser.add_argument("--role", required=True, choices=["admin", "poster", "auditor"])
    create_parser.add_argument("--name", help="a label for the key")
    audit_parser = commands.add_parser("audit", help="audit the journal")
    audit_commands = audit_parser.add_subparsers(dest="audit_command", required=True)
    verify_parser = audit_commands.add_parser(
        "verify", help="recompute every hash chain and balance; exit 1 on any problem"
    )
    verify_parser.add_argument("--account", help="verify this account only")
    arguments = parser.parse_args(argv)

    overrides = {
        name: value for name in ("host", "port", "workers") if (value := getattr(arguments, name, None)) is not None
    }
    try:
        settings = Settings.from_env(**overrides)
    except SettingsError as error:
        parser.error(str(error))
    logging.config.dictConfig(logging_config(settings.log_level))
    if arguments.command == "serve":
        return serve(settings)
    if arguments.command == "keys":
        return create_key(settings, arguments.role, arguments.name)
    if arguments.command == "audit":
        return audit_verify(settings, arguments.account)
    return run_migrations(settings)
