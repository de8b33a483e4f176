"""`metadata[KEY]=VALUE` query parameters: parsed from the raw query string, validated
like metadata in bodies, and described in the OpenAPI document.

Litestar binds only the parameters a handler names, and a name with brackets in it is
not one it can bind; so the handlers that filter by metadata read the pairs here, from
the request's raw query string. Everything is checked, nothing dropped: a parameter that
looks like a metadata filter but is not one (`metadata=x`, `metadata[a`, `metadata[]`)
is a 400, not an ignored filter (an ignored filter would widen the answer: a sum over
every account instead of the tagged ones). The percent-encoded text must be UTF-8 (a
body that is not is a 400 too; Litestar's own parser would substitute U+FFFD).
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

from litestar import Request
from litestar.openapi.spec import OpenAPI, Operation, Parameter, Schema
from litestar.openapi.spec.enums import OpenAPIType

from ledger.errors import InvalidRequest
from ledger.http.schemas import NO_NUL

PREFIX = "metadata"
# The contract's metadata limits (API.md, Conventions), as for bodies.
MAX_PAIRS = 16
MAX_KEY_LENGTH = 64
MAX_VALUE_LENGTH = 512
# The operations that take the filter (their OpenAPI parameters are added here).
FILTERED_OPERATIONS = ("listAccounts", "listTransfers", "getAggregateBalance")


def _problem(field: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"`{field}`: {message}", [{"field": field, "message": message}])


def _decode(raw: bytes, field: str, errors: str = "strict") -> str:
    try:
        return unquote_to_bytes(raw.replace(b"+", b" ")).decode("utf-8", errors)
    except UnicodeDecodeError as error:
        raise _problem(field, "not valid UTF-8 once percent-decoded") from error


def metadata_filter(request: Request) -> dict[str, str] | None:
    """The request's `metadata[KEY]=VALUE` pairs (all must match), or None without any.

    400 `validation_error` for: a parameter named `metadata...` that is not
    `metadata[KEY]`; an empty key; a key over 64 or a value over 512 characters; NUL; text
    that is not UTF-8; the same key with two different values (no row can match both:
    the caller meant something else); more than 16 keys. Repeating a pair is harmless.
    """
    query_string: bytes = request.scope.get("query_string", b"")
    pairs: dict[str, str] = {}
    for part in query_string.split(b"&"):
        raw_name, _, raw_value = part.partition(b"=")
        # Cheap test first: most parameters are not filters.
        if not raw_name.startswith(PREFIX.encode()) and b"%" not in raw_name:
            continue
        # Other parameters are Litestar's to judge, whatever their bytes.
        if not _decode(raw_name, "metadata", errors="replace").startswith(PREFIX):
            continue
        name = _decode(raw_name, "metadata")
        if not (name.startswith(PREFIX + "[") and name.endswith("]")):
            raise _problem(name[:80], "a metadata filter is written metadata[KEY]=VALUE")
        # Everything between the first `[` and the last `]`: a key may hold brackets too.
        key = name[len(PREFIX) + 1 : -1]
        field = f"metadata[{key[:MAX_KEY_LENGTH]}]"
        if not key:
            raise _problem(field, "the key is empty")
        if len(key) > MAX_KEY_LENGTH:
            raise _problem(field, f"the key is longer than {MAX_KEY_LENGTH} characters")
        value = _decode(raw_value, field)
        if len(value) > MAX_VALUE_LENGTH:
            raise _problem(field, f"the value is longer than {MAX_VALUE_LENGTH} characters")
        if "\x00" in key or "\x00" in value:
            raise _problem(field, "must not contain NUL characters")
        if pairs.setdefault(key, value) != value:
            raise _problem(field, "given twice with different values; no metadata holds both")
        if len(pairs) > MAX_PAIRS:
            raise _problem("metadata", f"at most {MAX_PAIRS} keys")
    return pairs or None


def describe_metadata_filters(document: OpenAPI) -> None:
    """Add the filter to the operations that take it, as OpenAPI's deepObject style
    (`metadata[KEY]=VALUE`), with the limits above."""
    for path_item in (document.paths or {}).values():
        operation = getattr(path_item, "get", None)
        if not isinstance(operation, Operation) or operation.operation_id not in FILTERED_OPERATIONS:
            continue
        parameters = [p for p in operation.parameters or [] if getattr(p, "name", None) != PREFIX]
        parameters.append(
            Parameter(
                name=PREFIX,
                param_in="query",
                required=False,
                style="deepObject",
                explode=True,
                description=(
                    "Only rows whose metadata holds every pair: `metadata[tier]=gold&metadata[region]=eu`. "
                    f"At most {MAX_PAIRS} keys of 1 to {MAX_KEY_LENGTH} characters, values up to "
                    f"{MAX_VALUE_LENGTH}, no NUL; the same key twice with different values is a 400."
                ),
                schema=Schema(
                    type=OpenAPIType.OBJECT,
                    max_properties=MAX_PAIRS,
                    property_names=Schema(
                        type=OpenAPIType.STRING, min_length=1, max_length=MAX_KEY_LENGTH, pattern=NO_NUL
                    ),
                    additional_properties=Schema(type=OpenAPIType.STRING, max_length=MAX_VALUE_LENGTH, pattern=NO_NUL),
                ),
            )
        )
        operation.parameters = parameters
