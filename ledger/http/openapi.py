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

It also repairs the `Allow` header of automatic OPTIONS answers (`repair_options`).
"""

from __future__ import annotations

import msgspec
from litestar import Litestar
from litestar.openapi.spec import OpenAPIType, Schema
from litestar.routes import HTTPRoute

from ledger.domain import MAX_AMOUNT
from ledger.http import schemas
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
