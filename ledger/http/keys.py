"""API keys: created, listed and revoked by admins (`ledger keys` does the same)."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.params import JSONBody, PathParameter, QueryParameter

from ledger.errors import KeyNotFound
from ledger.http.auth import ADMIN, principal
from ledger.http.body import decode_strict, path_identifier
from ledger.http.problems import READ_PROBLEMS, documented
from ledger.http.schemas import KeyCreate, KeyCreatedOut, KeyOut, KeyPage, format_timestamp
from ledger.service import keys

KeyId = Annotated[str, PathParameter(description="The key's id (`key_...`)")]
Limit = Annotated[int | None, QueryParameter(ge=1, le=1000, description="Page size, 1 to 1000 (default 100)")]
Cursor = Annotated[str | None, QueryParameter(max_length=512, description="Opaque cursor from next_cursor")]


def key_out(record: keys.ApiKeyRecord) -> KeyOut:
    return KeyOut(
        id=record.id,
        role=record.role,
        name=record.name,
        created_at=format_timestamp(record.created_at),
        revoked_at=format_timestamp(record.revoked_at) if record.revoked_at else None,
        created_by=record.created_by,
        revoked_by=record.revoked_by,
    )


class KeyController(Controller):
    path = "/v1/keys"
    tags = ["keys"]
    opt = ADMIN

    @post("/", operation_id="createKey", status_code=201, responses=documented(*READ_PROBLEMS, 413, 415))
    async def create_key(self, request: Request, state: State, data: JSONBody[KeyCreate]) -> Response[KeyCreatedOut]:
        """Create an API key with one role (`admin`, `poster` or `auditor`). The key is in
        this answer only: the service keeps its SHA-256."""
        body = await decode_strict(request, KeyCreate)
        record, key = await keys.create_key(
            state.engine, state.chain.active, body.role, body.name, principal(request).key_id
        )
        out = KeyCreatedOut(**{field: getattr(key_out(record), field) for field in KeyOut.__struct_fields__}, key=key)
        return Response(
            out, status_code=201, headers={"Location": f"/v1/keys/{record.id}", "Cache-Control": "no-store"}
        )

    @get("/", operation_id="listKeys", responses=documented(*READ_PROBLEMS))
    async def list_keys(self, state: State, limit: Limit = None, cursor: Cursor = None) -> KeyPage:
        """Every key, oldest first, revoked ones included; never the key itself."""
        page = await keys.list_keys(state.engine, limit or state.settings.default_page_size, cursor)
        return KeyPage(data=[key_out(record) for record in page.items], next_cursor=page.next_cursor)

    @delete("/{key_id:str}", operation_id="revokeKey", status_code=200, responses=documented(*READ_PROBLEMS, 404))
    async def revoke_key(self, request: Request, state: State, key_id: KeyId) -> KeyOut:
        """Revoke a key: it stops working within 5 seconds in every process. Revoking it
        again answers the same. `LEDGER_ADMIN_KEY` is not a stored key: change the setting."""
        path_identifier(key_id, KeyNotFound, "API key")
        return key_out(await keys.revoke_key(state.engine, key_id, principal(request).key_id))
