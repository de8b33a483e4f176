"""`POST /v1/transfers` answers the same bytes with and without the framework.

Two services, one with the fast path (ledger.http.fast) and one without, each on a fresh
ledger of its own, get the same requests in the same order: created, replayed, refused
and replayed refusals, a reused id, an unknown account, and every kind of request the fast
path hands to the framework (bad bodies, bad keys, wrong role, other media types, a query
string). Every answer must be identical: status, headers in order (but the request id)
and body (but the times). So must what each counted in its metrics."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from ledger.http import fast
from ledger.http.app import create_app
from ledger.settings import Settings
from tests import provision

TIME = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z")


@pytest.fixture(scope="module")
def two_ledgers(
    postgres_server_url: str, service_login: tuple[str, str], settings: Settings
) -> Iterator[tuple[Settings, Settings]]:
    with (
        provision.migrated_database(postgres_server_url, "ledger_fast", service_login) as fast,
        provision.migrated_database(postgres_server_url, "ledger_framework", service_login) as framework,
    ):
        yield (
            replace(settings, database_url=fast.service_url, transfer_fast_path=True),
            replace(settings, database_url=framework.service_url, transfer_fast_path=False),
        )


@pytest.fixture(scope="module")
async def clients(two_ledgers: tuple[Settings, Settings]) -> AsyncIterator[list[tuple[AsyncTestClient, Any]]]:
    fast_app, framework_app = create_app(two_ledgers[0]), create_app(two_ledgers[1])
    async with AsyncTestClient(fast_app) as fast, AsyncTestClient(framework_app) as framework:
        yield [(fast, fast_app), (framework, framework_app)]


def _answer(response: Any) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    headers = [(name, value) for name, value in response.headers.raw if name.lower() != b"x-request-id"]
    return response.status_code, headers, TIME.sub(b"<time>", response.content)


REQUESTS: list[tuple[str, dict[str, str], bytes | None]] = [
    # (what, extra headers, raw body); the admin key unless the headers say otherwise.
    ("created", {}, b'{"id":"t1","debit_account_id":"bank","credit_account_id":"alice","amount":500}'),
    ("replayed", {}, b'{"id":"t1","debit_account_id":"bank","credit_account_id":"alice","amount":500}'),
    ("same id, other amount", {}, b'{"id":"t1","debit_account_id":"bank","credit_account_id":"alice","amount":7}'),
    ("pending", {}, b'{"id":"t2","debit_account_id":"alice","credit_account_id":"bank","amount":100,'
     b'"pending":true,"timeout_seconds":60,"description":"hold \\u00e9","metadata":{"k":"v"}}'),
    ("refused", {}, b'{"id":"t3","debit_account_id":"alice","credit_account_id":"bank","amount":100000}'),
    ("refusal replayed", {}, b'{"id":"t3","debit_account_id":"alice","credit_account_id":"bank","amount":100000}'),
    ("unknown account", {}, b'{"id":"t4","debit_account_id":"alice","credit_account_id":"nobody","amount":1}'),
    ("currency mismatch", {}, b'{"id":"t5","debit_account_id":"alice","credit_account_id":"usd","amount":1}'),
    ("same account", {}, b'{"id":"t6","debit_account_id":"alice","credit_account_id":"alice","amount":1}'),
    ("amount as a string", {}, b'{"id":"t7","debit_account_id":"bank","credit_account_id":"alice","amount":"1"}'),
    ("amount as a float", {}, b'{"id":"t7","debit_account_id":"bank","credit_account_id":"alice","amount":1.0}'),
    ("unknown field", {}, b'{"id":"t7","debit_account_id":"bank","credit_account_id":"alice","amount":1,"x":1}'),
    ("repeated key", {}, b'{"id":"t7","debit_account_id":"bank","credit_account_id":"alice","amount":1,"amount":9}'),
    ("not UTF-8", {}, b'{"id":"t7","debit_account_id":"bank","credit_account_id":"alice\xff","amount":1}'),
    ("not JSON", {}, b'{"id":"t7",'),
    ("nested too deeply", {}, b"[" * 100_000),
    ("id of dots", {}, b'{"id":"..","debit_account_id":"bank","credit_account_id":"alice","amount":1}'),
    ("no key", {"Authorization": ""}, b'{"id":"t8","debit_account_id":"bank","credit_account_id":"alice","amount":1}'),
    ("unknown key", {"Authorization": "Bearer lk_nobody_has_this_key_000000000000"},
     b'{"id":"t8","debit_account_id":"bank","credit_account_id":"alice","amount":1}'),
    ("basic auth", {"Authorization": "Basic YTpi"},
     b'{"id":"t8","debit_account_id":"bank","credit_account_id":"alice","amount":1}'),
    ("auditor key", {"Authorization": "AUDITOR"},
     b'{"id":"t8","debit_account_id":"bank","credit_account_id":"alice","amount":1}'),
    ("text/plain", {"Content-Type": "text/plain"},
     b'{"id":"t8","debit_account_id":"bank","credit_account_id":"alice","amount":1}'),
    ("no content type", {"Content-Type": ""},
     b'{"id":"t8","debit_account_id":"bank","credit_account_id":"alice","amount":1}'),
    ("+json media type", {"Content-Type": "application/vnd.ledger+json; charset=utf-8"},
     b'{"id":"t8","debit_account_id":"bank","credit_account_id":"alice","amount":1}'),
    ("empty body", {}, b""),
    ("too large", {}, b'{"id":"t9","description":"' + b"x" * 2_000_000 + b'"}'),
    ("query string", {"_query": "dry_run=1"},
     b'{"id":"t10","debit_account_id":"bank","credit_account_id":"alice","amount":1}'),
    ("a poster's transfer", {"Authorization": "POSTER"},
     b'{"id":"t11","debit_account_id":"bank","credit_account_id":"alice","amount":2}'),
]  # fmt: skip


async def _key(client: AsyncTestClient, role: str) -> str:
    response = await client.post("/v1/keys", json={"role": role}, headers=provision.API_HEADERS)
    assert response.status_code == 201, response.text
    return str(response.json()["key"])


async def test_both_paths_answer_the_same_bytes(
    clients: list[tuple[AsyncTestClient, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    answered_fast: list[str] = []
    answer = fast._answer

    async def counted(state: Any, error_request: Any, body: Any, send: Any) -> None:
        answered_fast.append(body.id)
        await answer(state, error_request, body, send)

    monkeypatch.setattr(fast, "_answer", counted)
    keys: list[dict[str, str]] = []
    for client, _ in clients:
        for account in (
            {"id": "bank", "currency": "EUR", "allow_negative_balance": True},
            {"id": "alice", "currency": "EUR"},
            {"id": "usd", "currency": "USD"},
        ):
            assert (await client.post("/v1/accounts", json=account, headers=provision.API_HEADERS)).status_code == 201
        keys.append({"AUDITOR": await _key(client, "auditor"), "POSTER": await _key(client, "poster")})
    for what, extra, body in REQUESTS:
        answers = []
        for (client, _), own_keys in zip(clients, keys, strict=True):
            headers = {**provision.API_HEADERS, "Content-Type": "application/json", **extra}
            query = headers.pop("_query", None)
            if headers["Authorization"] in own_keys:
                headers["Authorization"] = f"Bearer {own_keys[headers['Authorization']]}"
            headers = {name: value for name, value in headers.items() if value}
            response = await client.post(
                "/v1/transfers" + (f"?{query}" if query else ""), content=body, headers=headers
            )
            answers.append(_answer(response))
        assert answers[0] == answers[1], f"{what}: the two paths answered differently"
        assert answers[0][0] < 500, f"{what}: {answers[0]}"
    fast_metrics, framework_metrics = (app.state.metrics.snapshot() for _, app in clients)
    for figure in ("requests", "outcomes"):
        assert sorted(map(str, fast_metrics[figure])) == sorted(map(str, framework_metrics[figure])), figure
    # And the fast path did answer what it should, and only that (the rest went to the framework).
    assert answered_fast == ["t1", "t1", "t1", "t2", "t3", "t3", "t4", "t5", "t6", "t8", "t11"]


async def test_a_client_gone_mid_body_is_answered_as_the_framework_does(
    clients: list[tuple[AsyncTestClient, Any]],
) -> None:
    """The fast path reads the body itself; a disconnect before its end must reach the
    framework, which answers 499 and applies nothing."""
    answers = []
    for _, app in clients:
        messages = [
            {"type": "http.request", "body": b'{"id":"gone","deb', "more_body": True},
            {"type": "http.disconnect"},
        ]
        sent: list[dict[str, Any]] = []

        async def receive(messages: list[dict[str, Any]] = messages) -> dict[str, Any]:
            # As an ASGI server does: once the client is gone, every receive says so.
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message: dict[str, Any], sent: list[dict[str, Any]] = sent) -> None:
            sent.append(message)

        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"200"),
            (b"authorization", provision.API_HEADERS["Authorization"].encode()),
        ]
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/v1/transfers", "raw_path": b"/v1/transfers", "query_string": b"", "root_path": "",
            "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {},
        }  # fmt: skip
        await app(scope, receive, send)
        answers.append(sent[0]["status"] if sent else None)
    assert answers == [499, 499]
