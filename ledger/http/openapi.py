"""What the generated OpenAPI document cannot say by itself, added once at start-up.

Clients and fuzzers (schemathesis, `tests/e2e/test_hostile_input.py`) generate requests
from this document, so it must describe what the service accepts, no more:

- request bodies reject unknown fields (`forbid_unknown_fields`): `additionalProperties:
  false`, which Litestar does not emit for msgspec structs;
- `timeout_seconds` applies to pending transfers only (API.md): an `if`/`then`;
- the bodies of post, void and audit verification have only optional fields, yet are
  required: every POST carries Content-Type: application/json;
- metadata's limits (at most 16 keys of 1 to 64 characters, values up to 512, no NUL),
  which Litestar drops for dict types;
- integer bounds are integers: Litestar writes them as floats, and the largest amount
  (2^63 - 1) became 9.223372036854776e18, which admits 2^63 and a little more.

It also says who may call what: a bearer security scheme on every operation whose route
requires a role (`ledger.http.auth.requires`), none on the public ones (health, metrics),
and each operation's summary, description and examples (`ledger.http.docs_operations`),
with the roles written from the route itself.

It also repairs the `Allow` header of automatic OPTIONS answers (`repair_options`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
from litestar import Litestar
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.spec import (
    Components,
    Example,
    OpenAPI,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
    SecurityScheme,
)
from litestar.openapi.spec.base import BaseSchemaObject
from litestar.routes import HTTPRoute

from ledger.domain import MAX_AMOUNT
from ledger.http import schemas
from ledger.http.auth import ROLES
from ledger.http.docs_operations import OPERATIONS
from ledger.http.metadata import describe_metadata_filters
from ledger.http.schemas import NO_NUL

# Bodies whose fields are all optional: still required, because every POST must say
# Content-Type: application/json (a browser form cannot; see ledger.http.body). `{}` or
# `null` will do.
OPTIONAL_FIELDS = {
    ("/v1/transfers/{transfer_id}/post", "post"),
    ("/v1/transfers/{transfer_id}/void", "post"),
    ("/v1/audit/verify", "post"),
}
PENDING_ONLY = ("TransferCreate", "BatchTransfer")

BEARER = "bearerAuth"
BEARER_SCHEME = SecurityScheme(
    type="http",
    scheme="bearer",
    bearer_format="API key",
    description=(
        "An API key: `Authorization: Bearer <key>`. The first start of `ledger serve` writes an admin key to "
        "`.ledger/admin.key` (in `LEDGER_DATA_DIR`); an admin makes more with `ledger keys create --role "
        "admin|poster|auditor` or `POST /v1/keys`. Roles: `admin` (everything, keys included), `poster` "
        "(accounts, transfers, reads), `auditor` (reads and verification). No key or an unknown one: 401 "
        "`unauthenticated`; a role that may not: 403 `forbidden`."
    ),
)
ROLE_ORDER = ("admin", "poster", "auditor")


def complete_openapi(app: Litestar) -> None:
    document = app.openapi_schema
    components = document.components.schemas if document.components and document.components.schemas else {}
    for name, component in components.items():
        struct = getattr(schemas, name, None)
        if not isinstance(component, Schema) or not isinstance(struct, type) or not issubclass(struct, msgspec.Struct):
            continue
        if struct.__struct_config__.forbid_unknown_fields:
            component.additional_properties = False
        if name in PENDING_ONLY:
            component.schema_if = Schema(
                required=["timeout_seconds"], properties={"timeout_seconds": Schema(type=OpenAPIType.INTEGER)}
            )
            component.then = Schema(required=["pending"], properties={"pending": Schema(const=True)})
        _exact_integer_bounds(component)
        metadata = (component.properties or {}).get("metadata")
        if isinstance(metadata, Schema):
            _describe_metadata(metadata)
    for path, method in OPTIONAL_FIELDS:
        operation = getattr((document.paths or {}).get(path), method, None)
        if operation is not None and operation.request_body is not None:
            operation.request_body.required = True
    describe_metadata_filters(document)
    _describe_operations(app, document)


@dataclass
class Verbatim(BaseSchemaObject):
    """An example body as written. Litestar drops every None it meets while it writes the
    document, and a response's `null` fields are part of the body."""

    value: Any

    def to_schema(self) -> Any:  # type: ignore[override]
        return self.value


def _describe_operations(app: Litestar, document: OpenAPI) -> None:
    if document.components is None:
        document.components = Components()
    document.components.security_schemes = {**(document.components.security_schemes or {}), BEARER: BEARER_SCHEME}
    for route in app.routes:
        path_item = (document.paths or {}).get(route.path_format) if isinstance(route, HTTPRoute) else None
        if path_item is None:
            continue
        for handler in route.route_handlers:  # type: ignore[union-attr]
            for method in handler.http_methods:
                operation = getattr(path_item, method.lower(), None)
                if isinstance(operation, Operation):
                    _describe(operation, handler)


def _describe(operation: Operation, handler: HTTPRouteHandler) -> None:
    """Summary and description: the handler's own (`summary=`, `description=`), else the
    entry in docs_operations. Without either the operation has none, and
    tests/e2e/test_docs.py says so (Litestar would have shown the function's name)."""
    doc = OPERATIONS.get(operation.operation_id or "")
    operation.summary = handler.summary or (doc.summary if doc else None)
    description = handler.description or (doc.description if doc else None)
    roles = handler.opt.get(ROLES)
    if roles is None:
        operation.security = None
        who = "**Public**: no API key needed."
    else:
        operation.security = [{BEARER: []}]
        names = [f"`{role}`" for role in ROLE_ORDER if role in roles]
        either = " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
        who = f"**Who may call**: an API key whose role is {either} (`Authorization: Bearer <key>`)."
    operation.description = f"{description}\n\n{who}" if description else None
    if doc is None:
        return
    if doc.requests:
        body = operation.request_body
        media = body.content.get("application/json") if isinstance(body, RequestBody) else None
        if media is None:
            raise RuntimeError(f"{operation.operation_id}: request examples, but no JSON request body")
        media.examples = {name: Example(value=Verbatim(value)) for name, value in doc.requests.items()}
    for status, examples in doc.responses.items():
        response = (operation.responses or {}).get(str(status))
        contents = list(getattr(response, "content", None) or {})
        if not contents:
            raise RuntimeError(f"{operation.operation_id}: examples for a {status} response it does not document")
        response.content[contents[0]].examples = {  # type: ignore[union-attr]
            name: Example(value=Verbatim(value)) for name, value in examples.items()
        }


def repair_options(app: Litestar) -> None:
    """Litestar's automatic OPTIONS handler lists the methods of the route it was built
    with; when more handlers join the same path (GET and POST on `/v1/accounts`), the
    route is rebuilt but the handler keeps the first one, and answered `Allow: OPTIONS,
    POST` without GET. Point each such handler's route at the final route's methods."""
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for handler in route.route_handlers:
            for cell in getattr(handler.fn, "__closure__", None) or ():
                stale = cell.cell_contents
                if isinstance(stale, HTTPRoute) and stale is not route and stale.path == route.path:
                    stale.methods = route.methods


def _exact_integer_bounds(schema: object) -> None:
    if not isinstance(schema, Schema):
        return
    if schema.type == OpenAPIType.INTEGER:
        for bound in ("maximum", "minimum"):
            value = getattr(schema, bound)
            if isinstance(value, float):
                setattr(schema, bound, MAX_AMOUNT if value == float(MAX_AMOUNT) else int(value))
    children: list[object] = [*(schema.properties or {}).values(), schema.items, schema.additional_properties]
    children += [*(schema.one_of or ()), *(schema.any_of or ()), *(schema.all_of or ())]
    for child in children:
        _exact_integer_bounds(child)


def _describe_metadata(schema: Schema) -> None:
    variants = [v for v in (schema.one_of or [schema]) if isinstance(v, Schema) and v.type == OpenAPIType.OBJECT]
    for variant in variants:
        variant.max_properties = 16
        variant.property_names = Schema(type=OpenAPIType.STRING, min_length=1, max_length=64, pattern=NO_NUL)
        variant.additional_properties = Schema(type=OpenAPIType.STRING, max_length=512, pattern=NO_NUL)
