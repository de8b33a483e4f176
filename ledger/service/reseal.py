"""Sealing rows again under the active chain key (`ledger audit reseal`).

Rows written before seals existed (revision 0005) have none; after a rotation, rows keep
the seal of the key they were last changed under. Before an old key is marked revoked
(it leaked), every row sealed with it must be sealed again with the new one, since a
revoked key vouches for nothing that is not pinned by a checkpoint, and rows are not.
Resealing trusts the rows as they are now: run `ledger audit verify` first, and compare
with backups or statements if in doubt. The journal's own
hashes are never rewritten (it is append-only): the checkpoint written right after
pins its chains, old links included. This runs as the tables' owner, since the serving
role may not change the seals of accounts or API keys.
"""

from __future__ import annotations

from types import SimpleNamespace

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.integrity import Keyring, account_message, api_key_message, seal, transfer_message
from ledger.service.records import TransferRecord

TABLES = {
    "accounts": "SELECT id, currency, name, allow_negative_balance, metadata, status, overdraft_limit, max_balance FROM accounts",
    "transfers": "SELECT * FROM transfers",
    "api_keys": "SELECT id, role, key_hash FROM api_keys",
}


def _message(table: str, key_id: str, row: object) -> str:
    mapping = row._mapping  # type: ignore[attr-defined]
    if table == "transfers":
        return transfer_message(key_id, TransferRecord.from_row(mapping))
    if table == "accounts":
        return account_message(key_id, SimpleNamespace(**mapping))
    return api_key_message(key_id, SimpleNamespace(**{**mapping, "key_hash": bytes(mapping["key_hash"])}))


async def reseal(engine: AsyncEngine, keyring: Keyring) -> dict[str, int]:
    key = keyring.active
    counts = {}
    async with engine.begin() as connection:
        for table, select in TABLES.items():
            condition = " WHERE seal IS NULL OR seal_key <> :active"
            rows = (await connection.execute(text(select + condition + " FOR UPDATE"), {"active": key.id})).all()
            seals = [seal(key, _message(table, key.id, row)) for row in rows]
            if rows:
                await connection.execute(
                    text(
                        f"UPDATE {table} SET seal = s.seal, seal_key = :key FROM unnest(CAST(:ids AS text[]), "
                        f"CAST(:seals AS bytea[])) AS s(id, seal) WHERE {table}.id = s.id"
                    ),
                    {"key": key.id, "ids": [row.id for row in rows], "seals": seals},
                )
            counts[table] = len(rows)
    return counts
