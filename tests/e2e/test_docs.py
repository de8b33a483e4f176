"""The API documentation of a real `ledger serve`: the OpenAPI document says what every
operation does and which ones need a key (checked against what the server answers
without one), its examples match its schemas, and the interactive page at `/schema` is
served entirely by the service: a real headless Chromium, whose every request goes
through a proxy that lets only the server through, renders every operation.

The browser is Debian's `chromium` (`apt-get install chromium`): without it the browser
test is skipped on a developer's machine and fails under CI (`CI` set), where it must run.
"""

from __future__ import annotations

import base64
import html
import http.client
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import jsonschema_rs
import pytest
import websockets.sync.client

BEARER = "bearerAuth"
METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
# The bodies a reader most needs to see; each must have at least one request example.
EXAMPLE_BODIES = (
    "createAccount",
    "createTransfer",
    "createTransferBatch",
    "postPendingTransfer",
    "voidPendingTransfer",
    "reverseTransfer",
    "verifyJournal",
)
# Paths other documentation tools use: each is a page or a problem+json 404.
WELL_KNOWN_PAGES = ("/schema/redoc", "/schema/elements", "/schema/rapidoc", "/schema/scalar", "/schema/openapi.yaml")


@pytest.fixture(scope="module")
def document(server_url: str) -> dict[str, Any]:
    response = httpx.get(f"{server_url}/schema/openapi.json")
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method in METHODS:
            if method in item:
                yield method, path, item[method]


def test_every_operation_has_a_summary_and_a_description(document: dict[str, Any]) -> None:
    missing = [
        f"{method.upper()} {path} ({operation.get('operationId')})"
        for method, path, operation in operations(document)
        if not (operation.get("summary") or "").strip() or not (operation.get("description") or "").strip()
    ]
    assert not missing, (
        "operations without a summary or a description (add them to ledger/http/docs_operations.py, "
        f"or as summary=/description= on the route): {missing}"
    )
    summaries = [operation["summary"] for _, _, operation in operations(document)]
    assert len(set(summaries)) == len(summaries), f"two operations share a summary: {sorted(summaries)}"


def test_every_operation_that_answers_401_without_a_key_requires_the_bearer_scheme(
    server_url: str, document: dict[str, Any]
) -> None:
    scheme = document["components"]["securitySchemes"][BEARER]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    # How to get a key, where a reader of the page looks for it.
    assert ".ledger/admin.key" in scheme["description"] and "ledger keys create" in scheme["description"]
    assert "security" not in document, "no global requirement: public operations must stay public"

    wrong: list[str] = []
    public: list[str] = []
    for method, path, operation in operations(document):
        # Authentication comes before anything else is looked at (path, body), and a
        # request without a key changes nothing.
        url = server_url + re.sub(r"\{[^}]+\}", "docs-probe", path)
        status = httpx.request(method.upper(), url, timeout=10).status_code
        requirement = operation.get("security")
        needs_key = status == 401
        if not needs_key:
            public.append(path)
        if needs_key and requirement != [{BEARER: []}]:
            wrong.append(f"{method.upper()} {path}: 401 without a key, but its security is {requirement}")
        if not needs_key and requirement:
            wrong.append(f"{method.upper()} {path}: {status} without a key, but its security is {requirement}")
        expected = "**Who may call**" if needs_key else "**Public**"
        if expected not in operation.get("description", ""):
            wrong.append(f"{method.upper()} {path}: the description does not say {expected}")
    assert not wrong, "\n".join(wrong)
    # Both kinds were seen: the comparison above could tell them apart.
    assert sorted(public) == ["/health/live", "/health/ready", "/metrics"], public


def _validator(document: dict[str, Any], schema: dict[str, Any]) -> Any:
    # The component schemas are JSON Schema 2020-12 (OpenAPI 3.1): `#/components/...`
    # references resolve against a root that carries the document's components.
    root = {"$schema": "https://json-schema.org/draft/2020-12/schema", "components": document["components"], **schema}
    return jsonschema_rs.validator_for(root)


def test_the_examples_are_valid_against_their_schemas(document: dict[str, Any]) -> None:
    invalid: list[str] = []
    for method, path, operation in operations(document):
        bodies: list[tuple[str, dict[str, Any]]] = []
        request = operation.get("requestBody", {}).get("content", {})
        bodies += [(f"request {media}", content) for media, content in request.items()]
        for status, response in operation.get("responses", {}).items():
            bodies += [(f"{status} {media}", content) for media, content in response.get("content", {}).items()]
        for where, content in bodies:
            examples = content.get("examples") or {}
            if not examples:
                continue
            validator = _validator(document, content["schema"])
            for label, example in examples.items():
                errors = [error.message for error in validator.iter_errors(example["value"])]
                if errors:
                    invalid.append(f"{method.upper()} {path} {where} example {label!r}: {errors[:3]}")
    assert not invalid, "\n".join(invalid)
    by_id = {operation["operationId"]: operation for _, _, operation in operations(document)}
    without = [
        name for name in EXAMPLE_BODIES if not by_id[name]["requestBody"]["content"]["application/json"].get("examples")
    ]
    assert not without, f"these operations lost their request examples: {without}"


def test_the_docs_pages_and_unknown_docs_paths(server_url: str) -> None:
    for path in ("/schema", "/schema/swagger"):
        response = httpx.get(server_url + path)
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith("text/html"), path
        assert 'id="swagger-ui"' in response.text
    for path in WELL_KNOWN_PAGES:
        response = httpx.get(server_url + path)
        assert response.status_code == 404, path
        assert response.headers["content-type"] == "application/problem+json", path
        assert response.json()["code"] == "not_found", path
        assert "/schema/openapi.json" in response.json()["detail"]
    missing = httpx.get(f"{server_url}/schema/assets/swagger-ui-0.0.0/swagger-ui-bundle.js")
    assert (missing.status_code, missing.headers["content-type"]) == (404, "application/problem+json")


def _local_references(base: str, text: str) -> list[str]:
    return [urljoin(base, value) for value in re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", text)]


def test_the_page_loads_only_files_of_this_host_and_they_may_be_cached(server_url: str) -> None:
    page = httpx.get(f"{server_url}/schema")
    # The browser itself refuses anything from another host.
    policy = page.headers["content-security-policy"]
    for directive in ("default-src 'none'", "script-src 'self'", "connect-src 'self'", "font-src 'self'"):
        assert directive in policy, policy
    assert "http://" not in page.text and "https://" not in page.text, page.text
    references = _local_references(str(page.url), page.text)
    assert references, page.text
    kinds: dict[str, str] = {}
    for url in references:
        assert urlsplit(url).netloc == urlsplit(server_url).netloc, f"off-host reference {url} in\n{page.text}"
        if url.endswith("/schema/openapi.json"):
            continue
        response = httpx.get(url, headers={"Accept-Encoding": "gzip"})
        assert response.status_code == 200, url
        assert (
            "immutable" in response.headers["cache-control"] and "max-age=31536000" in response.headers["cache-control"]
        )
        assert response.headers["x-content-type-options"] == "nosniff"
        kind = response.headers["content-type"].split(";")[0]
        kinds[url] = kind
        if kind == "text/css":
            # Every url() and @import is a data: URI or a path on this host (the SVG
            # namespaces inside data: URIs are not requests).
            for target in re.findall(r"""url\(\s*["']?([^"')]*)""", response.text):
                assert target.startswith("data:") or not re.match(r"^(?:[a-z]+:)?//", target), (url, target)
            assert "@import" not in response.text and "@font-face" not in response.text, url
        if kind == "text/javascript":
            for host in ("//cdn", "unpkg.com", "jsdelivr", "fonts.googleapis", "fonts.gstatic"):
                assert host not in response.text, (url, host)
        if kind.startswith("text/") and "ledger-docs" in url:
            assert "http://" not in response.text and "https://" not in response.text, url
    assert sorted(set(kinds.values())) == ["image/png", "text/css", "text/javascript"], kinds
    assert any(url.endswith("/swagger-ui-bundle.js") for url in kinds), kinds
    bundle = next(url for url in kinds if url.endswith("/swagger-ui-bundle.js"))
    compressed = httpx.get(bundle, headers={"Accept-Encoding": "gzip"})
    assert compressed.headers["content-encoding"] == "gzip"
    plain = httpx.get(bundle, headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers and plain.content == compressed.content


# -- a real browser ------------------------------------------------------------------------


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if found := shutil.which(name):
            return found
    message = "Chromium is not installed: install Debian's `chromium` (apt-get install -y chromium) to run this test"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class Proxy:
    """The browser's only way out: forwards requests for `allowed` (host:port), refuses
    and records everything else, HTTPS (CONNECT) included."""

    allowed: str
    requests: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    port: int = 0


@contextmanager
def proxy_to(server_url: str) -> Iterator[Proxy]:
    proxy = Proxy(allowed=urlsplit(server_url).netloc)
    hop_by_hop = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "content-length"}

    class Handler(BaseHTTPRequestHandler):
        def do_CONNECT(self) -> None:
            proxy.refused.append(f"CONNECT {self.path}")
            self.send_error(403, "this test allows no other host")

        def forward(self) -> None:
            target = urlsplit(self.path)
            if target.netloc != proxy.allowed:
                proxy.refused.append(f"{self.command} {self.path}")
                self.send_error(403, "this test allows no other host")
                return
            proxy.requests.append(f"{self.command} {self.path}")
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {k: v for k, v in self.headers.items() if k.lower() not in hop_by_hop}
            upstream = http.client.HTTPConnection(target.netloc, timeout=30)
            try:
                upstream.request(
                    self.command, target.path + (f"?{target.query}" if target.query else ""), body, headers
                )
                answer = upstream.getresponse()
                data = answer.read()
            finally:
                upstream.close()
            self.send_response_only(answer.status)
            for name, value in answer.getheaders():
                if name.lower() not in hop_by_hop:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = do_OPTIONS = forward

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    proxy.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, name="docs-test-proxy", daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class DevTools:
    """A page of a headless Chromium, driven over the DevTools protocol (the websocket
    client is the one uvicorn[standard] brings): every request the page makes, its
    console and errors, its DOM and a screenshot."""

    def __init__(self, process: subprocess.Popen[bytes], socket: Any) -> None:
        self.process = process
        self.socket = socket
        self.events: list[dict[str, Any]] = []
        self._next_id = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        self.socket.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self._next_id:
                assert "error" not in message, message
                return message["result"]  # type: ignore[no-any-return]
            self.events.append(message)

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")


@contextmanager
def devtools(browser: str, proxy: Proxy, profile: Path) -> Iterator[DevTools]:
    profile.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [
            browser,
            "--headless",
            "--no-sandbox",  # as root (CI) Chromium does not start with its sandbox
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-extensions",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            f"--proxy-server=http://127.0.0.1:{proxy.port}",
            # Loopback too goes through the proxy, so that it sees every request.
            "--proxy-bypass-list=<-loopback>",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--window-size=1280,1000",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert process.poll() is None, f"chromium exited with {process.returncode}"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port within 60 s"
            time.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(target for target in targets if target["type"] == "page")
        with websockets.sync.client.connect(page["webSocketDebuggerUrl"], max_size=None) as socket:
            yield DevTools(process, socket)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# In the page, as a person would: Authorize with the key, open "List accounts", Try it
# out, Execute; the status Swagger UI shows. (Values of React inputs are set through the
# native setter, or React does not see them.)
TRY_IT = """
(async () => {
  const until = async (find) => {
    for (const end = Date.now() + 15000; Date.now() < end; await new Promise((r) => setTimeout(r, 50))) {
      const found = find();
      if (found) return found;
    }
    throw new Error("not found: " + find);
  };
  document.querySelector(".auth-wrapper .authorize").click();
  const input = await until(() => document.querySelector(".auth-container input"));
  Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, "value").set.call(input, KEY);
  input.dispatchEvent(new Event("input", { bubbles: true }));
  document.querySelector(".auth-btn-wrapper .authorize").click();
  (await until(() => document.querySelector(".auth-btn-wrapper .btn-done"))).click();
  const operation = "#operations-accounts-listAccounts";
  document.querySelector(operation + " .opblock-summary-control").click();
  (await until(() => document.querySelector(operation + " .try-out__btn"))).click();
  (await until(() => document.querySelector(operation + " .execute"))).click();
  const status = await until(() => document.querySelector(operation + " .live-responses-table tr.response .response-col_status"));
  return status.textContent.trim();
})()
"""


def test_a_headless_browser_offline_renders_every_operation(
    server_url: str, document: dict[str, Any], api_headers: dict[str, str], tmp_path: Path
) -> None:
    browser = chromium()
    page_url = f"{server_url}/schema"
    expected = sorted(op["operationId"] for _, _, op in operations(document))
    screenshot = tmp_path / "schema.png"
    with proxy_to(server_url) as proxy:
        with devtools(browser, proxy, tmp_path / "profile") as page:
            for domain in ("Network", "Page", "Runtime", "Log"):
                page.call(f"{domain}.enable")
            page.call("Page.navigate", url=page_url)
            rendered = "document.querySelectorAll('.opblock').length"
            deadline = time.monotonic() + 60
            while page.evaluate(rendered) < len(expected) and time.monotonic() < deadline:
                time.sleep(0.25)
            dom = page.evaluate("document.documentElement.outerHTML")
            key = api_headers["Authorization"].removeprefix("Bearer ")
            tried = page.call(
                "Runtime.evaluate",
                expression=TRY_IT.replace("KEY", json.dumps(key)),
                awaitPromise=True,
                returnByValue=True,
            )
            size = page.call("Page.getLayoutMetrics")["cssContentSize"]
            clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 6000), "scale": 1}
            image = page.call("Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=clip)
            screenshot.write_bytes(base64.b64decode(image["data"]))
    print(f"\nscreenshot of {page_url}: {screenshot}")

    requested = [
        event["params"]["request"]["url"] for event in page.events if event.get("method") == "Network.requestWillBeSent"
    ]
    problems = [
        f"{event['params']['entry']['level']}: {event['params']['entry']['text']}"
        for event in page.events
        if event.get("method") == "Log.entryAdded" and event["params"]["entry"]["level"] in ("error", "warning")
    ]
    problems += [
        f"exception: {event['params']['exceptionDetails'].get('text')}"
        for event in page.events
        if event.get("method") == "Runtime.exceptionThrown"
    ]
    # The page asked nothing of any other host (the browser's own update and sign-in
    # traffic, which the proxy refused as well, is not the page's), broke no rule of
    # its Content-Security-Policy, and threw nothing.
    host = urlsplit(server_url).netloc
    off_host = [url for url in requested if not url.startswith(("data:", "blob:")) and urlsplit(url).netloc != host]
    assert not off_host, f"the page requested {off_host}"
    assert not problems, "\n".join(problems)
    paths = {urlsplit(url).path for url in requested if url.startswith("http")}
    for needed in ("/schema", "/schema/openapi.json"):
        assert needed in paths, sorted(paths)
    assert any(path.endswith("/swagger-ui-bundle.js") for path in paths), sorted(paths)
    # They went through the proxy: the network really was restricted for them.
    through_proxy = {urlsplit(line.split(" ", 1)[1]).path for line in proxy.requests}
    assert paths <= through_proxy, (sorted(paths), sorted(through_proxy))

    assert 'class="btn authorize' in dom, "no Authorize button: the bearer scheme is not shown"
    absent = [
        op["operationId"]
        for _, _, op in operations(document)
        if f'id="operations-{op["tags"][0]}-{op["operationId"]}"' not in dom
        or html.escape(op["summary"], quote=False) not in dom
    ]
    assert not absent, f"operations not rendered: {absent}\n--- DOM ---\n{dom[:3000]}"

    # "Try it out" sends the key it was given, to this host, and shows the answer.
    assert tried["result"].get("value") == "200", tried
    sent = [
        event["params"]["request"]
        for event in page.events
        if event.get("method") == "Network.requestWillBeSent"
        and urlsplit(event["params"]["request"]["url"]).path == "/v1/accounts"
    ]
    assert [request["headers"].get("Authorization") for request in sent] == [f"Bearer {key}"], sent
