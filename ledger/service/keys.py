"""API keys and roles.

A key is `lk_` followed by 43 URL-safe characters (256 random bits). Only its SHA-256 is
stored: a key that high in entropy needs no slow hash, and a database leak reveals no
usable key. `LEDGER_ADMIN_KEY`, when set, is also accepted as an admin key and compared
in constant time.

Authentication is enforced as soon as the service has any key to check against
(`LEDGER_ADMIN_KEY` set, or a key in the database), or always with
`LEDGER_AUTH_REQUIRED=true`. A service with no key configured at all answers every
client (and says so in its log at start): that keeps a fresh `make run` usable, and is
not how to run in production.

Known keys are cached per process (see `KeyRing`), so authentication costs no database
round trip on the hot path, and a key created with `ledger keys create` works at once.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

ROLES = ("admin", "poster", "auditor")
CACHE_SECONDS = 5.0

INSERT_KEY = text("INSERT INTO api_keys (id, name, role, key_hash) VALUES (:id, :name, :role, :key_hash)")
ACTIVE_KEYS = text("SELECT key_hash, role FROM api_keys WHERE revoked_at IS NULL")


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


async def create_key(engine: AsyncEngine, role: str, name: str | None = None) -> tuple[str, str]:
    """Store a new key; return (key id, the key itself, which is not stored)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    key = "lk_" + secrets.token_urlsafe(32)
    key_id = "key_" + secrets.token_hex(8)
    async with engine.begin() as connection:
        await connection.execute(INSERT_KEY, {"id": key_id, "name": name, "role": role, "key_hash": hash_key(key)})
    return key_id, key


class KeyRing:
    """Answers "is a key required?" and "which role does this key have?".

    Known key hashes are cached per process. An unknown key triggers a reload at once
    (at most every `MISS_RELOAD_SECONDS`, so a flood of bad keys cannot flood the
    database), so a key created a moment ago works on its first use; the cache is also
    reloaded every `CACHE_SECONDS`, so a revoked key stops working within that time.
    Enforcement only ever switches on: while no key is known, requests check for one
    (at most every `MISS_RELOAD_SECONDS`; this only happens in the unconfigured,
    development case).
    """

    MISS_RELOAD_SECONDS = 0.1

    def __init__(self, engine: AsyncEngine, admin_key: str | None, required: bool) -> None:
        self._engine = engine
        self._admin_hash = hash_key(admin_key) if admin_key else None
        self._enforced = required or self._admin_hash is not None
        self._roles: dict[bytes, str] = {}
        self._loaded_at = float("-inf")

    async def _load(self) -> None:
        async with self._engine.connect() as connection:
            rows = (await connection.execute(ACTIVE_KEYS)).all()
        self._roles = {bytes(row.key_hash): row.role for row in rows}
        self._loaded_at = time.monotonic()
        self._enforced = self._enforced or bool(self._roles)

    async def enforced(self) -> bool:
        if not self._enforced and time.monotonic() - self._loaded_at >= self.MISS_RELOAD_SECONDS:
            await self._load()
        return self._enforced

    async def role_of(self, key: str) -> str | None:
        digest = hash_key(key)
        if self._admin_hash is not None and hmac.compare_digest(digest, self._admin_hash):
            return "admin"
        age = time.monotonic() - self._loaded_at
        # The lookup is by the key's SHA-256, never by the key: how long it takes says
        # nothing about any stored key's value.
        if age >= CACHE_SECONDS or (digest not in self._roles and age >= self.MISS_RELOAD_SECONDS):
            await self._load()
        return self._roles.get(digest)
