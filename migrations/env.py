"""Alembic environment: runs migrations over asyncpg with the service's own URL handling."""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy import pool, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from ledger.database import normalize_database_url, unnamed_statement_arguments
from ledger.models import Base

config = context.config
target_metadata = Base.metadata


def _database_url() -> str:
    # `ledger migrate` passes the URL as an attribute; the alembic CLI reads the environment.
    url = (
        config.attributes.get("database_url")
        or os.environ.get("LEDGER_MIGRATION_DATABASE_URL")
        or os.environ.get("LEDGER_DATABASE_URL")
    )
    if not url:
        raise RuntimeError("set LEDGER_MIGRATION_DATABASE_URL (or LEDGER_DATABASE_URL) to run migrations")
    return normalize_database_url(url)


def run_migrations_offline() -> None:
    context.configure(url=_database_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


# Several instances starting at once all migrate: the first takes this lock, the others
# wait for its commit and then find the database at head. A transaction-scoped lock, so
# it is released however the migration ends (and works through a transaction pooler).
MIGRATION_LOCK = 0x6C6564676572  # "ledger"


def _run_sync(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
    with context.begin_transaction():
        connection.execute(text("SELECT pg_advisory_xact_lock(:lock)"), {"lock": MIGRATION_LOCK})
        context.run_migrations()


async def _run_async() -> None:
    # Through a transaction pooler (LEDGER_DATABASE_POOLER=transaction) without named
    # prepared statements, like the service. Nothing else is needed there: the migrations
    # run as one transaction, under a transaction-scoped lock, and set nothing per session
    # (and no statement timeout: a migration may take long).
    pooler = config.attributes.get("database_pooler") or os.environ.get("LEDGER_DATABASE_POOLER") or "none"
    engine = create_async_engine(
        _database_url(),
        poolclass=pool.NullPool,
        hide_parameters=True,
        connect_args=unnamed_statement_arguments() if pooler == "transaction" else {},
    )
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run_sync)
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_sync(connection)
    else:
        asyncio.run(_run_async())


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
