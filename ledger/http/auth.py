"""Who may call what: guards by role, on every endpoint but health, metrics and the schema.

| endpoints                                   | admin | poster | auditor |
|---------------------------------------------|-------|--------|---------|
| GET (accounts, transfers, entries, balances) | yes   | yes    | yes     |
| POST accounts, transfers, batch, post, void, reverse | yes | yes | 403 |
| POST /v1/audit/verify                       | yes   | 403    | yes     |

A missing or unknown key is 401 `unauthenticated`; a known key with the wrong role is
403 `forbidden`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException

Guard = Callable[[ASGIConnection, Any], Awaitable[None]]
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="ledger"'}


def requires(*roles: str) -> Guard:
    async def guard(connection: ASGIConnection, _: Any) -> None:
        keyring = connection.app.state.keyring
        if not await keyring.enforced():
            return
        scheme, _, key = connection.headers.get("authorization", "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise NotAuthorizedException("an API key is required: Authorization: Bearer <key>", headers=CHALLENGE)
        role = await keyring.role_of(key)
        if role is None:
            raise NotAuthorizedException("the API key is not known", headers=CHALLENGE)
        if role not in roles:
            raise PermissionDeniedException(f"the {role} role may not do this")

    return guard


READ = requires("admin", "poster", "auditor")
MOVE_MONEY = requires("admin", "poster")
AUDIT = requires("admin", "auditor")
