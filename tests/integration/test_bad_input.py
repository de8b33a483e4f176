"""Bad input gets a clear 4xx problem response and changes nothing."""

from __future__ import annotations

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.service.pagination import encode_cursor
from tests.integration.helpers import assert_problem, open_account

JSON = {"content-type": "application/json"}


def transfer_body(uid: str, amount: str = "5", extra: str = "") -> bytes:
    return (
        f'{{"id":"bad-{uid}","debit_account_id":"src-{uid}","credit_account_id":"dst-{uid}","amount":{amount}{extra}}}'
    ).encode()


@pytest.mark.parametrize(
    ("amount", "extra"),
    [
        ("0", ""),
        ("-5", ""),
        ("5.0", ""),
        ("5.5", ""),
        ('"5"', ""),
        ("true", ""),
        ("null", ""),
        ("9223372036854775808", ""),
        ("1" + "0" * 400, ""),
        ("5", ',"ammount":5'),
        ("5", ',"balance":1000000'),
        ("5", ',"currency":"eur"'),
        ("5", ',"metadata":{"a":{"b":"c"}}'),
        ("5", ',"description":"\\u0000"'),
        ("5", ',"timeout_seconds":10'),
        ("5", ',"metadata":{' + ",".join(f'"k{n}":"v"' for n in range(17)) + "}"),
        ("5", ',"metadata":{"k":"' + "v" * 513 + '"}'),
        ("5", ',"metadata":{"":"v"}'),
        ("5", ',"description":"' + "d" * 513 + '"'),
    ],
)
async def test_invalid_transfers_are_400_and_record_nothing(
    client: AsyncTestClient, engine: AsyncEngine, uid: str, amount: str, extra: str
) -> None:
    await open_account(client, f"src-{uid}", negative=True)
    await open_account(client, f"dst-{uid}")
    response = await client.post("/v1/transfers", content=transfer_body(uid, amount, extra), headers=JSON)
    problem = assert_problem(response, 400, "validation_error")
    assert problem["errors"] and {"field", "message"} <= set(problem["errors"][0])
    async with engine.connect() as connection:
        stored = (
            await connection.execute(text("SELECT count(*) FROM transfers WHERE id = :id"), {"id": f"bad-{uid}"})
        ).scalar()
    assert stored == 0
    # The id is still free: the same id with a valid body applies.
    assert (await client.post("/v1/transfers", content=transfer_body(uid), headers=JSON)).status_code == 201


@pytest.mark.parametrize("field", ["id", "debit_account_id", "credit_account_id"])
async def test_oversized_and_malformed_ids_are_400(client: AsyncTestClient, uid: str, field: str) -> None:
    for bad in ("x" * 65, "", "a b", "a|b", "é"):
        body = {"id": f"id-{uid}", "debit_account_id": f"a-{uid}", "credit_account_id": f"b-{uid}", "amount": 1}
        body[field] = bad
        assert_problem(await client.post("/v1/transfers", json=body), 400, "validation_error")
    too_long = await client.post("/v1/accounts", json={"id": "x" * 65, "currency": "EUR"})
    assert_problem(too_long, 400, "validation_error")


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"[]", b"null", b'"text"', b"\xff\xfe\x00", b'{"id":"\\ud800"}', b"[" * 10_000 + b"]" * 10_000],
)
async def test_malformed_bodies_are_400(client: AsyncTestClient, raw: bytes) -> None:
    response = await client.post("/v1/transfers", content=raw, headers=JSON)
    assert_problem(response, 400, "validation_error")


async def test_bodies_that_are_not_json_are_415(client: AsyncTestClient, uid: str) -> None:
    response = await client.post("/v1/transfers", content=transfer_body(uid), headers={"content-type": "text/plain"})
    assert response.status_code in (400, 415)
    assert response.headers["content-type"].startswith("application/problem+json")
    form = await client.post(
        "/v1/accounts", content=b'{"currency":"EUR"}', headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert form.status_code in (400, 415)


async def test_oversized_bodies_are_413(client: AsyncTestClient) -> None:
    huge = b'{"currency":"EUR","name":"' + b"x" * 2_000_000 + b'"}'
    assert_problem(await client.post("/v1/accounts", content=huge, headers=JSON), 413, "request_too_large")


@pytest.mark.parametrize(
    "url",
    [
        "/v1/accounts?limit=0",
        "/v1/accounts?limit=1001",
        "/v1/accounts?limit=ten",
        "/v1/accounts?currency=euro",
        "/v1/transfers?status=lost",
        "/v1/transfers?account_id=bad%20id",
        "/v1/transfers?from=last-week",
        "/v1/accounts/x/changes?limit=0",
        "/v1/accounts/x/changes?limit=many",
    ],
)
async def test_invalid_query_parameters_are_400(client: AsyncTestClient, url: str) -> None:
    assert_problem(await client.get(url), 400, "validation_error")


async def test_forged_cursors_are_400(client: AsyncTestClient) -> None:
    """Cursors are opaque but decodable: whatever a client puts in one is a 400, including
    values the database driver could not bind (beyond bigint, NUL, beyond year 9999)."""
    forged = [
        "/v1/accounts?cursor=forged",
        "/v1/transfers?cursor=WzFd",
        "/v1/accounts/x/entries?cursor=WyJ4Il0",
        "/v1/accounts?cursor=" + encode_cursor(["\u0000"]),
        "/v1/accounts/x/entries?cursor=" + encode_cursor([10**30]),
        "/v1/transfers?cursor=" + encode_cursor([2**62, "x"]),
        "/v1/transfers?cursor=" + encode_cursor([10**30, "x"]),
        "/v1/accounts/x/changes?cursor=forged",
        "/v1/accounts/x/changes?cursor=" + encode_cursor([10**30]),
        "/v1/accounts/x/changes?cursor=" + encode_cursor(["x"]),
    ]
    for url in forged:
        assert_problem(await client.get(url), 400, "invalid_cursor")


@pytest.mark.parametrize(
    "url",
    [
        "/v1/accounts/x/balance?as_of=0001-01-01T00:00:00%2B14:00",
        "/v1/accounts/x/balance?as_of=9999-12-31T23:59:59-14:00",
        "/v1/transfers?from=0001-01-01T00:00:00%2B14:00",
        "/v1/accounts/x/entries?to=9999-12-31T23:59:59-14:00",
    ],
)
async def test_timestamps_without_a_utc_form_are_400(client: AsyncTestClient, url: str) -> None:
    assert_problem(await client.get(url), 400, "validation_error")


@pytest.mark.parametrize("moment", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "2026-02-30T00:00:00Z"])
async def test_imported_at_without_a_utc_form_is_400_and_records_nothing(
    client: AsyncTestClient, uid: str, moment: str
) -> None:
    body = {"id": f"imp-{uid}", "debit_account_id": "a", "credit_account_id": "b", "amount": 1, "imported_at": moment}
    assert_problem(await client.post("/v1/transfers", json=body), 400, "validation_error")
    assert_problem(await client.post("/v1/transfers/batch", json={"transfers": [body]}), 400, "validation_error")
    assert (await client.get(f"/v1/transfers/imp-{uid}")).status_code == 404


async def test_unknown_routes_and_methods_are_problems_too(client: AsyncTestClient) -> None:
    assert_problem(await client.get("/v2/accounts"), 404, "not_found")
    assert_problem(await client.delete("/v1/accounts"), 405, "method_not_allowed")
