"""API keys and roles.

A key is `lk_` followed by 43 URL-safe characters (256 random bits). Only its SHA-256 is
stored: a key that high in entropy needs no slow hash, and a database leak reveals no
usable key. Each key row is sealed with the chain key (`ledger.integrity`), so a key
row written into the database by anyone but the service authenticates nobody.
`LEDGER_ADMIN_KEY`, when set, is also accepted as an admin key and compared in constant
time.

Authentication always applies (it fails closed): a fresh database, a ledger whose keys
were all revoked and any restart need a key. Only `LEDGER_INSECURE_DISABLE_AUTH=true`,
a development setting logged as a warning at every start, turns it off. So that a first
`make run` still works at once, `ledger serve` creates an admin key when the database
has never had one, stores it in the data directory (mode 0600) and prints it once
(`bootstrap_admin_key`); a ledger whose keys were all revoked gets no new one by itself.

Known keys are cached per process (see `KeyRing`), so authentication costs no database
round trip on the hot path; a key created elsewhere works at once, and a revoked key
stops working within `CACHE_SECONDS` in every process.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from types import SimpleNamespace

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger.errors import KeyNotFound
from ledger.integrity import ChainKey, Keyring, api_key_message, microseconds, seal, seal_is_valid, write_secret_file
from ledger.service.pagination import cursor_time, decode_cursor, encode_cursor
from ledger.service.records import Page

logger = logging.getLogger("ledger.keys")

ROLES = ("admin", "poster", "auditor")
CACHE_SECONDS = 4.0
ENVIRONMENT_ADMIN = "LEDGER_ADMIN_KEY"
INSECURE = "insecure-no-auth"
# Serialises the first start's admin key between processes starting at once.
BOOTSTRAP_LOCK = 0x6C6B5F626F6F74  # "lk_boot"

KEY_COLUMNS = "id, role, name, created_at, revoked_at, created_by, revoked_by"
INSERT_KEY = text(
    f"""
    INSERT INTO api_keys (id, name, role, key_hash, created_by, seal, seal_key)
    VALUES (:id, :name, :role, :key_hash, :created_by, :seal, :seal_key)
    RETURNING {KEY_COLUMNS}
    """
)
ACTIVE_KEYS = text("SELECT id, key_hash, role, seal, seal_key FROM api_keys WHERE revoked_at IS NULL")
LIST_KEYS = text(
    f"""
    SELECT {KEY_COLUMNS} FROM api_keys
    WHERE CAST(:after_time AS timestamptz) IS NULL OR (created_at, id) > (:after_time, :after_id)
    ORDER BY created_at, id LIMIT :limit
    """
)
REVOKE_KEY = text(
    f"""
    UPDATE api_keys SET revoked_at = clock_timestamp(), revoked_by = :revoked_by
    WHERE id = :id AND revoked_at IS NULL
    RETURNING {KEY_COLUMNS}
    """
)
GET_KEY = text(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id = :id")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the key's id (or `LEDGER_ADMIN_KEY`) and its role."""

    key_id: str
    role: str


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    id: str
    role: str
    name: str | None
    created_at: datetime
    revoked_at: datetime | None
    created_by: str | None
    revoked_by: str | None


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def new_key() -> str:
    return "lk_" + secrets.token_urlsafe(32)


def _record(row: object) -> ApiKeyRecord:
    return ApiKeyRecord(**{name: row[name] for name in KEY_COLUMNS.split(", ")})  # type: ignore[index]


async def insert_key(
    connection: AsyncConnection, chain: ChainKey, role: str, name: str | None, created_by: str | None
) -> tuple[ApiKeyRecord, str]:
    """Store a new key (sealed with `chain`); return its record and the key itself, which
    is not stored."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    key = new_key()
    fields = {"id": "key_" + secrets.token_hex(8), "role": role, "key_hash": hash_key(key)}
    row = (
        (
            await connection.execute(
                INSERT_KEY,
                {
                    **fields,
                    "name": name,
                    "created_by": created_by,
                    "seal": seal(chain, api_key_message(chain.id, SimpleNamespace(**fields))),
                    "seal_key": chain.id,
                },
            )
        )
        .mappings()
        .one()
    )
    return _record(row), key


async def create_key(
    engine: AsyncEngine, chain: ChainKey, role: str, name: str | None = None, created_by: str | None = None
) -> tuple[ApiKeyRecord, str]:
    async with engine.begin() as connection:
        return await insert_key(connection, chain, role, name, created_by)


async def list_keys(engine: AsyncEngine, limit: int, cursor: str | None) -> Page[ApiKeyRecord]:
    after_time: datetime | None = None
    after_id = ""
    if cursor is not None:
        after_us, after_id = decode_cursor(cursor, (int, str))
        after_time = cursor_time(after_us)
    async with engine.connect() as connection:
        rows = (
            (await connection.execute(LIST_KEYS, {"after_time": after_time, "after_id": after_id, "limit": limit + 1}))
            .mappings()
            .all()
        )
    items = [_record(row) for row in rows[:limit]]
    next_cursor = None
    if len(rows) > limit:
        next_cursor = encode_cursor([microseconds(items[-1].created_at), items[-1].id])
    return Page(items, next_cursor)


async def revoke_key(engine: AsyncEngine, key_id: str, revoked_by: str) -> ApiKeyRecord:
    """Revoke a key (idempotent: a revoked key keeps its first revocation)."""
    async with engine.begin() as connection:
        row = (await connection.execute(REVOKE_KEY, {"id": key_id, "revoked_by": revoked_by})).mappings().first()
        if row is None:
            row = (await connection.execute(GET_KEY, {"id": key_id})).mappings().first()
    if row is None:
        raise KeyNotFound(f"no API key with id {key_id!r}")
    return _record(row)


async def bootstrap_admin_key(engine: AsyncEngine, chain: ChainKey, path: Path) -> tuple[ApiKeyRecord, str] | None:
    """On a database that has never had an API key, create an admin key and store it in
    `path` (0600). Returns it, or None when the database has keys (revoked ones count: a
    ledger whose keys were revoked during an incident must not get a new one by itself).
    Raises OSError, creating nothing, when `path` cannot be written."""
    async with engine.begin() as connection:
        await connection.execute(text("SELECT pg_advisory_xact_lock(:lock)"), {"lock": BOOTSTRAP_LOCK})
        if (await connection.execute(text("SELECT EXISTS (SELECT 1 FROM api_keys)"))).scalar_one():
            return None
        record, key = await insert_key(connection, chain, "admin", "created at the first start", "bootstrap")
        # Written before the commit: if the file cannot be written, no key exists that
        # nobody knows.
        write_secret_file(path, key + "\n", replace=True)
    return record, key


class KeyRing:
    """Answers "who is this key?" for every request.

    Known key hashes are cached per process and reloaded every `CACHE_SECONDS`, so a
    revoked key stops working within that time in every process. An unknown key causes a
    reload too, so a key created a moment ago (by another process) works on its first use;
    those reloads happen at most every `MISS_RELOAD_SECONDS` and are shared by the requests
    waiting for them, so a flood of bad keys costs the database at most ten small queries
    a second. Rows whose seal does not verify under the chain keys are ignored (and logged
    once).
    """

    MISS_RELOAD_SECONDS = 0.1

    def __init__(self, engine: AsyncEngine, admin_key: str | None, keyring: Keyring, disabled: bool = False) -> None:
        self._engine = engine
        self._admin_hash = hash_key(admin_key) if admin_key else None
        self._keyring = keyring
        self.disabled = disabled
        self._principals: dict[bytes, Principal] = {}
        self._loaded_at = float("-inf")
        self._reloading = asyncio.Lock()
        self._reported: set[str] = set()

    async def _reload(self, unless_since: float) -> None:
        """Reload, unless another request did so after `unless_since` (it saw what this
        one would)."""
        async with self._reloading:
            if self._loaded_at > unless_since:
                return
            async with self._engine.connect() as connection:
                rows = (await connection.execute(ACTIVE_KEYS)).all()
            principals = {}
            for row in rows:
                fields = SimpleNamespace(id=row.id, role=row.role, key_hash=bytes(row.key_hash))
                if seal_is_valid(self._keyring, row.seal_key, row.seal, partial(api_key_message, api_key=fields)):
                    principals[fields.key_hash] = Principal(row.id, row.role)
                elif row.id not in self._reported:
                    self._reported.add(row.id)
                    logger.error("API key %s is not sealed by this ledger's chain key: ignored (tampering?)", row.id)
            self._principals = principals
            self._loaded_at = time.monotonic()

    async def principal_of(self, key: str) -> Principal | None:
        digest = hash_key(key)
        if self._admin_hash is not None and hmac.compare_digest(digest, self._admin_hash):
            return Principal(ENVIRONMENT_ADMIN, "admin")
        # The lookup is by the key's SHA-256, never by the key: how long it takes says
        # nothing about any stored key's value.
        arrived = time.monotonic()
        age = arrived - self._loaded_at
        if age >= CACHE_SECONDS:
            await self._reload(arrived - CACHE_SECONDS)
        elif digest not in self._principals:
            if age < self.MISS_RELOAD_SECONDS:
                await asyncio.sleep(self.MISS_RELOAD_SECONDS - age)
            await self._reload(arrived)
        return self._principals.get(digest)
