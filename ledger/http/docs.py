"""The interactive API page at `/schema`: Swagger UI, served by the service itself.

The page and everything it loads come from this host: Swagger UI's files from the
pinned `swagger-ui-bundle-v2` package, the start-up script and a few style rules from
here. Nothing is fetched from a CDN, so the docs work offline and cannot change under
the service, and the page's Content-Security-Policy keeps it so: a browser refuses any
script, style, font, image or request to another host.

Routes, all public (no API key; `PUBLIC_PREFIXES` in `ledger.http.app`):

- `/schema` and `/schema/swagger`: the page;
- `/schema/openapi.json`: the document;
- `/schema/assets/...`: the page's files, named by version or content hash, so they
  can be cached for a year;
- any other `/schema/...` (`/schema/redoc`, `/schema/elements`, ...): a problem+json 404
  like every other unknown path, not Litestar's bare HTML 404 page.
"""

from __future__ import annotations

import gzip
import hashlib
import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any

from litestar import Request, Response, Router, get
from litestar.exceptions import NotFoundException
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.plugins import OpenAPIRenderPlugin
from litestar.params import PathParameter
from swagger_ui_bundle import swagger_ui_path

DOCS_PATH = "/schema"
ASSETS = "/assets"
SWAGGER_UI_DIR = Path(str(swagger_ui_path))
SWAGGER_UI = SWAGGER_UI_DIR.name  # "swagger-ui-5.31.0": the version is in every asset's URL

# Everything from this host, nothing from anywhere else, and no inline script or style
# (Swagger UI sets its styles through the DOM, which the policy allows).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "font-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
IMMUTABLE = "public, max-age=31536000, immutable"

# Runs after swagger-ui-bundle.js: reads the document's URL from the page, so that the
# script itself is static (and cacheable) and the page needs no inline script.
INIT_JS = """\
"use strict";
window.addEventListener("load", function () {
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.getAttribute("data-openapi-url"),
    dom_id: "#swagger-ui",
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    deepLinking: true,
    docExpansion: "list",
    displayOperationId: true,
    displayRequestDuration: true,
    filter: true,
    showExtensions: true,
    // Swagger UI would send the document to validator.swagger.io for a badge.
    validatorUrl: null,
    // The key stays in this tab only: an admin key has no place in localStorage.
    persistAuthorization: false
  });
});
"""
PAGE_CSS = """\
html { box-sizing: border-box; overflow-y: scroll; }
*, *:before, *:after { box-sizing: inherit; }
body { margin: 0; background: #fafafa; }
"""


@dataclass(frozen=True, slots=True)
class Asset:
    media_type: str
    read: Callable[[], bytes]

    def body(self) -> bytes:
        return _load(self)


@cache
def _load(asset: Asset) -> bytes:
    return asset.read()


@cache
def _gzipped(asset: Asset) -> bytes:
    # Swagger UI's bundle is 1.5 MB and compresses to 0.4 MB: worth it on a slow link.
    # Once per process (0.1 s, in a worker thread: see `docs_asset`).
    return gzip.compress(asset.body(), compresslevel=6, mtime=0)


# SHA-256 of the files of npm's swagger-ui-dist 5.31.0 (`npm pack swagger-ui-dist@5.31.0`),
# which the PyPI package repackages: a script that runs in an admin's browser next to
# their key is served only if it is exactly the audited release, whatever the installed
# package holds.
VENDOR_SHA256 = {
    "swagger-ui-bundle.js": "93b7b0862a80e2786f85b560be7693c2344354ffa7e7e224f850a54349724c31",
    "swagger-ui.css": "9e576f8322132c76949da47f9bb53c891373c303ea3a761ff548ffc9de50a98c",
    "favicon-32x32.png": "3ed612f41e050ca5e7000cad6f1cbe7e7da39f65fca99c02e99e6591056e5837",
    "favicon-16x16.png": "af24ad604dd7b3bcda8f975ab973075f4a2f70a4087944a12f8ef8b63a3e07c2",
}


class TamperedAsset(RuntimeError):
    """An installed Swagger UI file is not the release this service was audited with."""


def _verified(path: Path) -> Callable[[], bytes]:
    def read() -> bytes:
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != VENDOR_SHA256[path.name]:
            raise TamperedAsset(f"{path} is not swagger-ui-dist 5.31.0's {path.name}: refusing to serve it")
        return data

    return read


def _vendor(name: str, media_type: str) -> tuple[str, Asset]:
    return f"{SWAGGER_UI}/{name}", Asset(media_type, _verified(SWAGGER_UI_DIR / name))


def _own(stem: str, suffix: str, text: str, media_type: str) -> tuple[str, Asset]:
    data = text.encode()
    digest = hashlib.sha256(data).hexdigest()[:16]
    return f"{stem}-{digest}{suffix}", Asset(media_type, lambda: data)


INIT_JS_NAME, _init_js = _own("ledger-docs", ".js", INIT_JS, "text/javascript")
PAGE_CSS_NAME, _page_css = _own("ledger-docs", ".css", PAGE_CSS, "text/css")
# Asset path under /schema/assets -> what it serves. Only these: the package's other
# files (its sample index.html points at the petstore demo) are not served.
FILES: dict[str, Asset] = dict(
    [
        _vendor("swagger-ui-bundle.js", "text/javascript"),
        _vendor("swagger-ui.css", "text/css"),
        _vendor("favicon-32x32.png", "image/png"),
        _vendor("favicon-16x16.png", "image/png"),
        (INIT_JS_NAME, _init_js),
        (PAGE_CSS_NAME, _page_css),
    ]
)


def asset_url(name: str) -> str:
    return f"{DOCS_PATH}{ASSETS}/{name}"


# In a thread: the first request of each asset reads and compresses it.
@get(f"{ASSETS}/{{name:path}}", sync_to_thread=True, include_in_schema=False, name="docs_asset")
def docs_asset(request: Request, name: Annotated[str, PathParameter()]) -> Response[bytes]:
    asset = FILES.get(name.lstrip("/"))
    if asset is None:
        raise NotFoundException(f"no such documentation asset: {name.lstrip('/')}")
    headers = {"Cache-Control": IMMUTABLE, "X-Content-Type-Options": "nosniff", "Vary": "Accept-Encoding"}
    body = asset.body()
    if asset.media_type.startswith("text/") and "gzip" in request.headers.get("accept-encoding", ""):
        body = _gzipped(asset)
        headers["Content-Encoding"] = "gzip"
    return Response(body, media_type=asset.media_type, headers=headers)


def no_such_page(path: Annotated[str, PathParameter()] = "") -> None:
    """Replaces Litestar's HTML 404 for unknown paths under /schema."""
    raise NotFoundException(
        f"no documentation page at {DOCS_PATH}/{path}: the interactive page is {DOCS_PATH}, "
        f"the OpenAPI document {DOCS_PATH}/openapi.json"
    )


class SwaggerPage(OpenAPIRenderPlugin):
    """Swagger UI from this host. Litestar's own SwaggerRenderPlugin loads it from a CDN,
    with a favicon from another, and inlines the whole document in a script."""

    def __init__(self, paths: Sequence[str] = ("/", "/swagger")) -> None:
        super().__init__(path=list(paths))

    def render(self, request: Request, openapi_schema: dict[str, Any]) -> bytes:
        title = html.escape(str(openapi_schema["info"]["title"]))
        document = html.escape(self.get_openapi_json_route(request))
        return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}: API reference</title>
<link rel="icon" type="image/png" sizes="32x32" href="{asset_url(f"{SWAGGER_UI}/favicon-32x32.png")}">
<link rel="icon" type="image/png" sizes="16x16" href="{asset_url(f"{SWAGGER_UI}/favicon-16x16.png")}">
<link rel="stylesheet" href="{asset_url(f"{SWAGGER_UI}/swagger-ui.css")}">
<link rel="stylesheet" href="{asset_url(PAGE_CSS_NAME)}">
</head>
<body>
<div id="swagger-ui" data-openapi-url="{document}"></div>
<noscript>This page needs JavaScript. The OpenAPI document is at <a href="{document}">{document}</a>.</noscript>
<script src="{asset_url(f"{SWAGGER_UI}/swagger-ui-bundle.js")}"></script>
<script src="{asset_url(INIT_JS_NAME)}"></script>
</body>
</html>
""".encode()

    def receive_router(self, router: Router) -> None:
        router.register(docs_asset)


class DocsRouter(Router):
    """The router Litestar fills with the documentation routes. Litestar registers a
    catch-all that answers unknown schema paths with a bare HTML 404 page; this router
    puts `no_such_page` in its place, so those answer problem+json like the rest."""

    def register(self, value: Any) -> Any:
        if isinstance(value, HTTPRouteHandler) and value.handler_name == "handle_schema_path_not_found":
            value = get(sorted(value.paths), sync_to_thread=False, include_in_schema=False)(no_such_page)
        return super().register(value)


def docs_router() -> DocsRouter:
    return DocsRouter(
        DOCS_PATH,
        route_handlers=[],
        include_in_schema=False,
        response_headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY},
    )
