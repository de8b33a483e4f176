"""The schema: Alembic is its only source, models do not drift from it, and PostgreSQL
enforces the ledger's invariants even against a buggy or hostile writer."""

from __future__ import annotations

import asyncio

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import exc, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ledger import migrate
from ledger.database import normalize_database_url
from ledger.models import Base
from tests import provision


def test_migrations_upgrade_downgrade_upgrade_and_match_the_models(postgres_server_url: str) -> None:
    """On an empty database: upgrade to head, downgrade to base (no table left), upgrade
    again; then autogenerate finds no difference between models and database (what
    `alembic check` does), and every constraint and index, CHECKs included, which
    autogenerate does not compare, is defined exactly as the models would create it."""
    url = provision.create_database(postgres_server_url, prefix="ledger_migrations")
    reference = provision.create_database(postgres_server_url, prefix="ledger_models")
    try:
        migrate.upgrade(url)
        migrate.downgrade(url, "base")
        assert asyncio.run(_tables(url)) == {"alembic_version"}
        migrate.upgrade(url)
        assert {"accounts", "transfers", "entries"} <= asyncio.run(_tables(url))
        assert asyncio.run(_drift(url)) == []
        asyncio.run(_create_all(reference))
        assert asyncio.run(_definitions(url)) == asyncio.run(_definitions(reference))
    finally:
        provision.drop_database(postgres_server_url, url)
        provision.drop_database(postgres_server_url, reference)


async def _create_all(url: str) -> None:
    engine = create_async_engine(normalize_database_url(url))
    try:
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
    finally:
        await engine.dispose()


async def _definitions(url: str) -> set[tuple[str, ...]]:
    engine = create_async_engine(normalize_database_url(url))
    try:
        async with engine.connect() as connection:
            constraints = await connection.execute(
                text(
                    "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
                    "WHERE connamespace = 'public'::regnamespace AND conrelid::regclass::text <> 'alembic_version'"
                )
            )
            indexes = await connection.execute(
                text(
                    "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' AND tablename <> 'alembic_version'"
                )
            )
            return {tuple(row) for row in constraints} | {tuple(row) for row in indexes}
    finally:
        await engine.dispose()


async def _tables(url: str) -> set[str]:
    engine = create_async_engine(normalize_database_url(url))
    try:
        async with engine.connect() as connection:
            rows = await connection.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))
            return {row[0] for row in rows}
    finally:
        await engine.dispose()


async def _drift(url: str) -> list:
    engine = create_async_engine(normalize_database_url(url))
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(
                lambda sync: compare_metadata(
                    MigrationContext.configure(sync, opts={"compare_type": True}), Base.metadata
                )
            )
    finally:
        await engine.dispose()


ACCOUNT = "INSERT INTO accounts (id, currency, allow_negative_balance) VALUES (:id, :currency, :negative)"
TRANSFER = (
    "INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, currency, status, code, request_hash, "
    "created_at, updated_at) VALUES (:id, :debit, :credit, :amount, 'EUR', :status, :code, :hash, now(), now())"
)


@pytest.mark.parametrize(
    ("statement", "parameters"),
    [
        (ACCOUNT, {"id": "bad id", "currency": "EUR", "negative": False}),
        (ACCOUNT, {"id": "ok", "currency": "eur", "negative": False}),
        (TRANSFER, {"id": "z1", "debit": "a", "credit": "b", "amount": 0, "status": "posted", "code": None}),
        (TRANSFER, {"id": "z2", "debit": "a", "credit": "a", "amount": 5, "status": "posted", "code": None}),
        (TRANSFER, {"id": "z3", "debit": "a", "credit": "b", "amount": 5, "status": "posted", "code": "x"}),
        (TRANSFER, {"id": "z4", "debit": "a", "credit": "b", "amount": 5, "status": "lost", "code": None}),
    ],
)
async def test_the_database_refuses_rows_that_break_an_invariant(
    engine: AsyncEngine, statement: str, parameters: dict
) -> None:
    """Formats, amount > 0, two different accounts, a code exactly when rejected."""
    async with engine.connect() as connection:
        with pytest.raises(exc.IntegrityError):
            await connection.execute(text(statement), {**parameters, "hash": b"\0" * 32})


async def test_the_database_refuses_a_negative_balance_and_a_second_outcome(engine: AsyncEngine, uid: str) -> None:
    async with engine.connect() as connection:
        await connection.execute(text(ACCOUNT), {"id": f"n-{uid}", "currency": "EUR", "negative": False})
        with pytest.raises(exc.IntegrityError, match="ck_accounts_balance_not_negative"):
            await connection.execute(text("UPDATE accounts SET debits_posted = 1 WHERE id = :id"), {"id": f"n-{uid}"})
        await connection.rollback()
        parameters = {
            "id": f"o-{uid}",
            "debit": "a",
            "credit": "b",
            "amount": 5,
            "status": "rejected",
            "code": "x",
            "hash": b"\0" * 32,
        }
        await connection.execute(text(TRANSFER), parameters)
        with pytest.raises(exc.IntegrityError, match="pk_transfers"):
            await connection.execute(text(TRANSFER), parameters)
        await connection.rollback()
