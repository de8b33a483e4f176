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
The check leaves the caller in `request.state.principal` for handlers that decide more
finely (issuing accounts) or record who acted (keys).
"""

from __future__ import annotations

from typing import Any

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException

from ledger.errors import Forbidden
from ledger.service.keys import INSECURE, Principal

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="ledger"'}
# The roles a route admits, in its `opt` (a handler's, or its controller's).
ROLES = "ledger_roles"


def requires(*roles: str) -> dict[str, Any]:
    """A route's `opt`: the roles that may call it. Not a Litestar guard: Litestar copies
    the route handler for every guard call, which cost about 3% of the service's CPU per
    transfer; `authenticate` runs in the app's `before_request` hook instead, before the
    body is read or decoded."""
    return {ROLES: frozenset(roles)}


async def authenticate(request: Request) -> None:
    roles = request.route_handler.opt.get(ROLES)
    if roles is None:
        return  # health, metrics and the schema
    keys = request.app.state.api_keys
    if keys.disabled:
        request.state.principal = Principal(INSECURE, "admin")
        return
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise NotAuthorizedException("an API key is required: Authorization: Bearer <key>", headers=CHALLENGE)
    principal = await keys.principal_of(key)
    if principal is None:
        raise NotAuthorizedException("the API key is not known, or was revoked", headers=CHALLENGE)
    if principal.role not in roles:
        raise PermissionDeniedException(f"the {principal.role} role may not do this")
    request.state.principal = principal


def principal(connection: ASGIConnection) -> Principal:
    """The caller, as `authenticate` identified it."""
    return connection.state.principal  # type: ignore[no-any-return]


def require_admin_for(connection: ASGIConnection, what: str) -> None:
    """For requests a poster may make, except with fields that only an admin may set."""
    if principal(connection).role != "admin":
        raise Forbidden(f"only an admin key may {what}")


READ = requires("admin", "poster", "auditor")
MOVE_MONEY = requires("admin", "poster")
AUDIT = requires("admin", "auditor")
ADMIN = requires("admin")
