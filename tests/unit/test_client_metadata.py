"""The client's metadata filters and aggregated balances, against a stand-in of the server
on `httpx.MockTransport`: `metadata=` becomes one `metadata[KEY]=VALUE` parameter per
pair (brackets, `&`, `=` and accents in keys and values survive the round trip), the
iterators send the filter with every page, `aggregate_balances` sends currency, filter
and `as_of` and reads sums beyond 64 bits as Python ints, on the blocking and the async
client alike; a naive `as_of` or a non-string filter value is refused before sending."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest

from ledger.client import AggregateBalance, AsyncLedgerClient, LedgerClient, ValidationFailed

BASE_URL = "http://ledger.test"
FAST = {"base_backoff": 0.001, "max_backoff": 0.002}
STAMP = "2026-11-27T04:00:00.000000Z"
HUGE = 9_223_372_036_854_775_807 * 3  # three balances at the bigint limit


def pairs_of(request: httpx.Request) -> list[tuple[str, str]]:
    """The query as the server's parser (ledger.http.metadata) reads it: percent-decoded
    UTF-8, in order."""
    return parse_qsl(urlsplit(str(request.url)).query, keep_blank_values=True, strict_parsing=False)


def account(account_id: str) -> dict[str, Any]:
    return {
        "id": account_id,
        "currency": "EUR",
        "metadata": {"tier": "gold"},
        "created_at": STAMP,
        "balance": {"posted": 1, "pending_debits": 0, "pending_credits": 0, "available": 1},
    }


def respond(body: Any, status: int = 200) -> httpx.Response:
    content_type = "application/problem+json" if status >= 400 else "application/json"
    return httpx.Response(status, content=json.dumps(body).encode(), headers={"content-type": content_type})


def aggregate_body(**changes: Any) -> dict[str, Any]:
    return {
        "currency": "EUR",
        "accounts": 3,
        "posted": HUGE,
        "pending_debits": 5,
        "pending_credits": 0,
        "available": HUGE - 5,
        "as_of": STAMP,
        **changes,
    }


def blocking(handler: Callable[[httpx.Request], httpx.Response]) -> LedgerClient:
    return LedgerClient(BASE_URL, "test-key", transport=httpx.MockTransport(handler), **FAST)


def asynchronous(handler: Callable[[httpx.Request], httpx.Response]) -> AsyncLedgerClient:
    return AsyncLedgerClient(BASE_URL, "test-key", transport=httpx.MockTransport(handler), **FAST)


ODD = {"a]b[c": "x&y=z+1 ✓", "région": "Île"}


def test_list_filters_are_sent_as_metadata_key_parameters_on_every_page() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/v1/accounts":
            cursor = dict(pairs_of(request)).get("cursor")
            page = (
                {"data": [account("a-2")], "next_cursor": None}
                if cursor
                else {"data": [account("a-1")], "next_cursor": "c1"}
            )
            return respond(page)
        return respond({"data": [], "next_cursor": None})

    with blocking(handler) as ledger:
        ids = [a.id for a in ledger.iter_accounts(currency="EUR", metadata=ODD, page_size=1)]
        ledger.list_transfers(account_id="a-1", metadata={"order": "87"})
    assert ids == ["a-1", "a-2"]
    first, second, transfers = seen
    assert pairs_of(first) == [("currency", "EUR"), ("limit", "1"), *((f"metadata[{k}]", v) for k, v in ODD.items())]
    assert ("cursor", "c1") in pairs_of(second) and [p for p in pairs_of(second) if p[0].startswith("metadata")] == [
        (f"metadata[{k}]", v) for k, v in ODD.items()
    ]
    assert transfers.url.path == "/v1/transfers"
    assert pairs_of(transfers) == [("account_id", "a-1"), ("metadata[order]", "87")]


def test_without_a_filter_no_metadata_parameter_is_sent() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return respond({"data": [], "next_cursor": None})

    with blocking(handler) as ledger:
        ledger.list_accounts()
        ledger.list_accounts(metadata={})
        ledger.list_transfers()
    assert [request.url.query for request in seen] == [b"", b"", b""]


def test_aggregate_balances_sends_its_parameters_and_reads_big_sums() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return respond(aggregate_body())

    moment = datetime(2026, 11, 1, tzinfo=UTC)
    with blocking(handler) as ledger:
        total = ledger.aggregate_balances("EUR", {"tier": "gold"}, as_of=moment)
        ledger.aggregate_balances("USD")
    assert isinstance(total, AggregateBalance)
    assert (total.accounts, total.posted, total.available) == (3, HUGE, HUGE - 5)
    assert total.as_of == datetime(2026, 11, 27, 4, tzinfo=UTC)
    assert seen[0].url.path == "/v1/balances/aggregate"
    assert pairs_of(seen[0]) == [("currency", "EUR"), ("as_of", moment.isoformat()), ("metadata[tier]", "gold")]
    assert pairs_of(seen[1]) == [("currency", "USD")]


async def test_the_async_client_filters_and_aggregates_the_same_way() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/v1/balances/aggregate":
            return respond(aggregate_body(accounts=1))
        if request.url.path == "/v1/transfers":
            return respond({"data": [], "next_cursor": None})
        return respond({"data": [account("a-1")], "next_cursor": None})

    async with asynchronous(handler) as ledger:
        page = await ledger.list_accounts(metadata={"tier": "gold"})
        listed = [t async for t in ledger.iter_transfers(metadata={"order": "87"}, page_size=5)]
        total = await ledger.aggregate_balances("EUR", metadata=ODD)
    assert [a.id for a in page.data] == ["a-1"] and listed == [] and total.posted == HUGE and total.accounts == 1
    assert pairs_of(seen[0]) == [("metadata[tier]", "gold")]
    assert pairs_of(seen[1]) == [("limit", "5"), ("metadata[order]", "87")]
    assert pairs_of(seen[2]) == [("currency", "EUR"), *((f"metadata[{k}]", v) for k, v in ODD.items())]


def test_a_refused_filter_raises_validation_failed_with_the_field() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return respond(
            {
                "type": "urn:ledger:problem:validation_error",
                "title": "The request is not valid",
                "status": 400,
                "detail": "`metadata[a]`: given twice with different values",
                "code": "validation_error",
                "errors": [{"field": "metadata[a]", "message": "given twice with different values"}],
            },
            400,
        )

    with blocking(handler) as ledger, pytest.raises(ValidationFailed) as raised:
        ledger.aggregate_balances("EUR", {"a": "1"}, as_of=datetime(2030, 1, 1, tzinfo=UTC))
    assert raised.value.status == 400 and raised.value.errors[0].field == "metadata[a]"


def test_naive_times_and_non_string_values_are_refused_before_sending() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("nothing may be sent")

    with blocking(handler) as ledger:
        with pytest.raises(ValueError, match="time zone"):
            ledger.aggregate_balances("EUR", as_of=datetime(2026, 1, 1))
        with pytest.raises(TypeError, match="strings"):
            ledger.list_accounts(metadata={"tier": 1})  # type: ignore[dict-item]
        with pytest.raises(TypeError, match="strings"):
            ledger.aggregate_balances("EUR", {"tier": None})  # type: ignore[dict-item]
