"""Logged database errors carry no statement values: real errors from PostgreSQL (a
unique violation and a check violation, whose DETAIL lines quote the row), raised through
SQLAlchemy as the service's engine raises them and straight from asyncpg as the hot path
does, logged with their tracebacks by the service's JSON formatter."""

from __future__ import annotations

import io
import logging

import asyncpg
import pytest
from sqlalchemy import text

from ledger.database import create_engine, libpq_url
from ledger.observability import JsonFormatter
from ledger.settings import Settings

SECRET = "iban-DE44500105175407324931"


def logged(error: BaseException) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("ledger.test-redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.error("unhandled error: %s", error, exc_info=error)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


async def test_sqlalchemy_errors_are_logged_without_parameters_or_detail(database_url: str) -> None:
    engine = create_engine(Settings(database_url=database_url))
    try:
        async with engine.begin() as connection:
            await connection.execute(text("CREATE TEMP TABLE secrets (id text PRIMARY KEY, n int CHECK (n > 0))"))
            await connection.execute(text("INSERT INTO secrets VALUES (:id, 1)"), {"id": SECRET})
            for statement, params in (
                ("INSERT INTO secrets VALUES (:id, 1)", {"id": SECRET}),
                ("INSERT INTO secrets VALUES (:id, -1)", {"id": SECRET + "-2"}),
            ):
                with pytest.raises(Exception) as caught:
                    async with connection.begin_nested():
                        await connection.execute(text(statement), params)
                assert SECRET in str(caught.value.orig), "PostgreSQL's own message quotes the value"
                line = logged(caught.value)
                assert SECRET not in line and "secrets" in line and "[values withheld]" in line, line
    finally:
        await engine.dispose()


async def test_driver_errors_are_logged_without_detail(database_url: str) -> None:
    connection = await asyncpg.connect(libpq_url(database_url))
    try:
        await connection.execute("CREATE TEMP TABLE secrets (id text PRIMARY KEY)")
        await connection.execute("INSERT INTO secrets VALUES ($1)", SECRET)
        with pytest.raises(asyncpg.UniqueViolationError) as caught:
            await connection.execute("INSERT INTO secrets VALUES ($1)", SECRET)
    finally:
        await connection.close()
    assert SECRET in str(caught.value)
    line = logged(caught.value)
    assert SECRET not in line and "duplicate key value" in line, line
