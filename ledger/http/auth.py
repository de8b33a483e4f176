"""Who may call what: guards by role, on every endpoint but health, metrics and the schema.

| endpoints                                            | admin | poster | auditor |
|------------------------------------------------------|-------|--------|---------|
| GET (accounts, transfers, entries, balances)         | yes   | yes    | yes     |
| POST accounts, transfers, batch, post, void, reverse | yes   | yes    | 403     |
| POST accounts with `allow_negative_balance: true`     | yes   | 403    | 403     |
| POST /v1/audit/verify                                | yes   | 403    | yes     |
| /v1/keys (create, list, revoke)                      | yes   | 403    | 403     |

A missing, unknown or revoked key is 401 `unauthenticated`; a known key with the wrong
role is 403 `forbidden`. Authentication fails closed: it applies in every configuration,
unless `LEDGER_INSECURE_DISABLE_AUTH=true` (development only) makes every caller admin.
The guard leaves the caller in `request.state.principal` for handlers that decide more
finely (issuing accounts) or record who acted (keys).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException

from ledger.errors import Forbidden
from ledger.service.keys import INSECURE, Principal

Guard = Callable[[ASGIConnection, Any], Awaitable[None]]
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="ledger"'}


def requires(*roles: str) -> Guard:
    async def guard(connection: ASGIConnection, _: Any) -> None:
        keys = connection.app.state.api_keys
        if keys.disabled:
            connection.state.principal = Principal(INSECURE, "admin")
            return
        scheme, _, key = connection.headers.get("authorization", "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise NotAuthorizedException("an API key is required: Authorization: Bearer <key>", headers=CHALLENGE)
        principal = await keys.principal_of(key)
        if principal is None:
            raise NotAuthorizedException("the API key is not known, or was revoked", headers=CHALLENGE)
        if principal.role not in roles:
            raise PermissionDeniedException(f"the {principal.role} role may not do this")
        connection.state.principal = principal

    return guard


def principal(connection: ASGIConnection) -> Principal:
    """The caller, as the route's guard identified it."""
    return connection.state.principal  # type: ignore[no-any-return]


def require_admin_for(connection: ASGIConnection, what: str) -> None:
    """For requests a poster may make, except with fields that only an admin may set."""
    if principal(connection).role != "admin":
        raise Forbidden(f"only an admin key may {what}")


READ = requires("admin", "poster", "auditor")
MOVE_MONEY = requires("admin", "poster")
AUDIT = requires("admin", "auditor")
ADMIN = requires("admin")
