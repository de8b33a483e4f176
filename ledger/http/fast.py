"""`POST /v1/transfers` without the framework, for the requests that need none of it.

A payment service's transfers are almost all the same request: a JSON body within the
limits, a valid key, a body that decodes. For those, Litestar's routing, parameter
parsing, hooks and response machinery cost about a quarter of the service's CPU per
transfer (profile in loadtest/README.md), on the one event loop that every request of
the process shares. This path answers them directly, with the same functions the
framework path uses for every decision (`authenticate`'s key lookup, the body checks of
`ledger.http.body`, the strict decoder, the ledger's `create`, the renderers of
`ledger.http.render`, the error handlers of `ledger.http.problems`), so that it cannot
decide differently, and with the same bytes on the wire (status, headers in order, body:
`tests/integration/test_fast_path.py` compares the two paths answer by answer).

Anything else is handed to the framework untouched (the body it already read is given
back to it): a query string, a missing or unusual header, a body over the limit or not
strictly valid, a missing, unknown or revoked key, a role that may not post. The
framework then answers exactly as it always has, 4xx included, so this path holds no
second copy of those rules. `LEDGER_TRANSFER_FAST_PATH=false` turns it off.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import msgspec
from litestar import Litestar, Response

from ledger.errors import LedgerError
from ledger.http.auth import MOVE_MONEY, ROLES
from ledger.http.body import _is_json, repeated_key
from ledger.http.problems import internal_error_handler, ledger_error_handler
from ledger.http.routes import transfer_request, transfer_response
from ledger.http.schemas import TransferCreate
from ledger.service.keys import INSECURE, Principal

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PATH = "/v1/transfers"
ALLOWED = MOVE_MONEY[ROLES]
_ENCODE = msgspec.json.Encoder().encode
_JSON = "application/json"


class _Request:
    """What the error handlers read of a request: the app, the method, the path."""

    __slots__ = ("app", "method", "path", "url")

    def __init__(self, app: Litestar) -> None:
        self.app = app
        self.method = "POST"
        self.url = self
        self.path = PATH


def transfer_fast_path(app: Litestar) -> ASGIApp:
    """Wrap the app's ASGI handler (inside the request-id middleware, so request ids,
    access lines and request metrics are the same for both paths)."""
    framework: ASGIApp = app.asgi_handler
    state = app.state
    limit = state.settings.max_body_bytes
    error_request = _Request(app)

    async def handle(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST" or scope["query_string"]:
            await framework(scope, receive, send)
            return
        content_type = authorization = length = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                if content_type is not None:
                    break
                content_type = value
            elif name == b"authorization":
                if authorization is not None:
                    break
                authorization = value
            elif name == b"content-length":
                if length is not None:
                    break
                length = value
            elif name == b"transfer-encoding":
                break
        else:
            if (
                content_type is not None
                and length is not None
                and length.isdigit()
                and 0 < int(length) <= limit
                and _is_json(content_type.decode("latin-1"))
            ):
                body = await _read(receive)
                if body is None:
                    # The client went away mid-body: the framework answers that as it always did.
                    await framework(scope, _replay(b"", receive, finished=False), send)
                    return
                principal = await _principal(state, authorization)
                create = _decoded(body) if principal is not None else None
                if create is not None:
                    scope["path_template"] = PATH
                    await _answer(state, error_request, create, send)
                    return
                await framework(scope, _replay(body, receive), send)
                return
        await framework(scope, receive, send)

    return handle


async def _read(receive: Receive) -> bytes | None:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive, *, finished: bool = True) -> Receive:
    """The body already read, then whatever else the client sends (a disconnect)."""
    pending = finished

    async def replayed() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _principal(state: Any, authorization: bytes | None) -> Principal | None:
    keys = state.api_keys
    if keys.disabled:
        return Principal(INSECURE, "admin")
    if authorization is None:
        return None
    scheme, _, key = authorization.decode("latin-1").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        return None
    principal: Principal | None = await keys.principal_of(key)
    return principal if principal is not None and principal.role in ALLOWED else None


def _decoded(body: bytes) -> TransferCreate | None:
    """The body as the framework path would accept it, or None to let it explain why not."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if repeated_key(text) is not None:
        return None
    try:
        create = msgspec.json.decode(body, type=TransferCreate, strict=True)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return None
    # An import needs an admin key: the framework path checks the role.
    return create if create.imported_at is None else None


async def _answer(state: Any, error_request: _Request, body: TransferCreate, send: Send) -> None:
    try:
        outcome = await state.ledger.transfers.create(transfer_request(body))
    except LedgerError as error:
        await _send(send, ledger_error_handler(error_request, error))  # type: ignore[arg-type]
        return
    except Exception as error:  # what the framework does with anything else: the same answer
        await _send(send, internal_error_handler(error_request, error))  # type: ignore[arg-type]
        return
    # The framework path's own answer (metrics, replay header, refusal or 201), rendered here.
    await _send(send, transfer_response(outcome, state))


async def _send(send: Send, response: Response[Any]) -> None:
    """A response of the framework path (a struct or bytes, a media type, a few headers),
    rendered as the framework renders it: its own headers, then the body's."""
    content = response.content
    payload = content if isinstance(content, bytes) else _ENCODE(content)
    media_type = response.media_type or _JSON
    headers = [(name.lower().encode(), value.encode()) for name, value in response.headers.items()]
    headers += [(b"content-type", str(media_type).encode()), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
