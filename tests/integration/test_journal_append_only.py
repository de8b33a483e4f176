"""PostgreSQL itself refuses to change or remove journal entries, whoever asks."""

from __future__ import annotations

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import exc, text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.integration.helpers import open_account, transfer


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE entries SET amount = amount + 1 WHERE account_id = :account",
        "UPDATE entries SET balance_after = 0 WHERE account_id = :account",
        "DELETE FROM entries WHERE account_id = :account",
        "TRUNCATE entries CASCADE",
    ],
)
async def test_update_delete_and_truncate_fail_inside_postgresql(
    client: AsyncTestClient, engine: AsyncEngine, uid: str, statement: str
) -> None:
    await open_account(client, f"bank-{uid}", negative=True)
    await open_account(client, f"kim-{uid}")
    assert (await transfer(client, f"t-{uid}", f"bank-{uid}", f"kim-{uid}", 5)).status_code == 201
    async with engine.connect() as connection:
        with pytest.raises(exc.DBAPIError, match="append-only"):
            await connection.execute(text(statement), {"account": f"kim-{uid}"})
        await connection.rollback()
        count = (
            await connection.execute(text("SELECT count(*) FROM entries WHERE account_id = :a"), {"a": f"kim-{uid}"})
        ).scalar()
    assert count == 1
