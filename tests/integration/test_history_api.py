"""An account's journal and its balance as of an instant, as auditors read them."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime

from litestar.testing import AsyncTestClient

from tests import provision
from tests.integration.helpers import assert_problem, open_account, transfer


def documented_hash(
    key_id: str,
    previous: bytes | None,
    account: str,
    sequence: int,
    transfer_id: str,
    amount: int,
    balance: int,
    at: str,
) -> bytes:
    """The README's canonical form of an entry, written out again here independently of
    the service's code: HMAC-SHA256 under the chain key the entry names."""
    moment = datetime.fromisoformat(at) - datetime(1970, 1, 1, tzinfo=UTC)
    microseconds = (moment.days * 86_400 + moment.seconds) * 1_000_000 + moment.microseconds
    fields = ["ledger-entry-v2", key_id, account, sequence, transfer_id, amount, balance, microseconds]
    message = "|".join(map(str, fields)) + "|" + (previous.hex() if previous else "")
    key = provision.KEYRING.get(key_id)
    assert key is not None, f"unknown chain key {key_id!r}"
    return hmac.new(key.secret, message.encode(), hashlib.sha256).digest()


async def test_the_journal_pages_gap_free_with_running_balances_and_a_hash_chain(
    client: AsyncTestClient, uid: str
) -> None:
    """Seven transfers in and out, read 3 per page: sequences 1..7, each balance_after is
    the running sum, and each hash recomputes from the documented canonical form, the chain
    key and the previous entry's hash."""
    await open_account(client, f"bank-{uid}", negative=True)
    await open_account(client, f"dave-{uid}")
    amounts = [500, -100, 200, -50, 25, -575, 1]
    for i, amount in enumerate(amounts):
        debit, credit = (f"bank-{uid}", f"dave-{uid}") if amount > 0 else (f"dave-{uid}", f"bank-{uid}")
        assert (await transfer(client, f"h{i}-{uid}", debit, credit, abs(amount))).status_code == 201

    entries, cursor = [], None
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = (await client.get(f"/v1/accounts/dave-{uid}/entries", params=params)).json()
        assert len(page["data"]) <= 3
        entries += page["data"]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert [e["sequence"] for e in entries] == list(range(1, 8))
    assert [e["amount"] for e in entries] == amounts
    running, previous = 0, None
    for entry in entries:
        running += entry["amount"]
        assert entry["balance_after"] == running
        assert entry["key_id"] == provision.KEYRING.active.id
        expected = documented_hash(
            entry["key_id"], previous, f"dave-{uid}", entry["sequence"], entry["transfer_id"], entry["amount"],
            running, entry["created_at"],
        )  # fmt: skip
        assert entry["hash"] == expected.hex()
        previous = expected
    assert (await client.get(f"/v1/accounts/dave-{uid}")).json()["balance"]["posted"] == running == 1


async def test_entries_filter_by_time_and_unknown_accounts_are_404(client: AsyncTestClient, uid: str) -> None:
    await open_account(client, f"bank-{uid}", negative=True)
    await open_account(client, f"erin-{uid}")
    for i in range(4):
        await transfer(client, f"f{i}-{uid}", f"bank-{uid}", f"erin-{uid}", 10)
    everything = (await client.get(f"/v1/accounts/erin-{uid}/entries")).json()["data"]
    window = (
        await client.get(
            f"/v1/accounts/erin-{uid}/entries",
            params={"from": everything[1]["created_at"], "to": everything[2]["created_at"]},
        )
    ).json()["data"]
    assert [e["sequence"] for e in window] == [2, 3]
    assert (await client.get(f"/v1/accounts/erin-{uid}/entries?limit=1")).json()["next_cursor"] is not None
    assert_problem(await client.get(f"/v1/accounts/nobody-{uid}/entries"), 404, "account_not_found")


async def test_balance_as_of_an_instant_is_the_balance_after_the_last_entry_by_then(
    client: AsyncTestClient, uid: str
) -> None:
    """Before the first entry: 0 at sequence 0; at each entry's time: that entry's
    balance_after; without as_of: the current balance."""
    await open_account(client, f"bank-{uid}", negative=True)
    account = await open_account(client, f"fay-{uid}")
    for i, amount in enumerate((300, 200, 100)):
        await transfer(client, f"b{i}-{uid}", f"bank-{uid}", f"fay-{uid}", amount)
    entries = (await client.get(f"/v1/accounts/fay-{uid}/entries")).json()["data"]

    before = (await client.get(f"/v1/accounts/fay-{uid}/balance", params={"as_of": account["created_at"]})).json()
    assert before["posted"] == 0 and before["sequence"] == 0
    for entry in entries:
        balance = (await client.get(f"/v1/accounts/fay-{uid}/balance", params={"as_of": entry["created_at"]})).json()
        assert (balance["posted"], balance["sequence"]) == (entry["balance_after"], entry["sequence"])
        assert balance["as_of"] == entry["created_at"] and balance["account_id"] == f"fay-{uid}"
    now = (await client.get(f"/v1/accounts/fay-{uid}/balance")).json()
    assert (now["posted"], now["sequence"]) == (600, 3)

    assert_problem(
        await client.get(f"/v1/accounts/fay-{uid}/balance", params={"as_of": "yesterday"}), 400, "validation_error"
    )
    assert_problem(
        await client.get(f"/v1/accounts/fay-{uid}/balance", params={"as_of": "2026-01-01T00:00:00"}),
        400,
        "validation_error",
    )
    assert_problem(await client.get(f"/v1/accounts/nobody-{uid}/balance"), 404, "account_not_found")


async def test_the_csv_statement_streams_every_page_from_one_snapshot(client: AsyncTestClient, uid: str) -> None:
    """4,500 entries (more than two pages of the stream) with `Accept: text/csv`: a
    header, then every entry in sequence order whose hash chain recomputes; from/to
    narrow it; an unknown account is a JSON 404 before any streaming."""
    bank, long = f"bank-{uid}", f"long-{uid}"
    await open_account(client, bank, negative=True)
    await open_account(client, long)
    for batch in range(5):
        items = [
            {"id": f"csv-{uid}-{batch}-{i}", "debit_account_id": bank, "credit_account_id": long, "amount": 1 + i % 7}
            for i in range(900)
        ]
        response = await client.post("/v1/transfers/batch", json={"transfers": items})
        assert {r["status"] for r in response.json()["results"]} == {"created"}

    response = await client.get(f"/v1/accounts/{long}/entries", headers={"Accept": "text/csv"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    lines = response.text.strip().split("\r\n")
    assert lines[0] == (
        "account_id,sequence,transfer_id,amount,balance_after,created_at,hash,key_id,counterparty_account_id,description"
    )
    rows = [line.split(",") for line in lines[1:]]
    assert [int(row[1]) for row in rows] == list(range(1, 4501))
    running, previous = 0, None
    for row in rows:
        running += int(row[3])
        assert int(row[4]) == running
        expected = documented_hash(row[7], previous, long, int(row[1]), row[2], int(row[3]), running, row[5])
        assert row[6] == expected.hex()
        previous = expected

    window = await client.get(
        f"/v1/accounts/{long}/entries", params={"from": rows[10][5], "to": rows[10][5]}, headers={"Accept": "text/csv"}
    )
    # One batch shares one instant: the window holds that whole batch's entries.
    assert all(line.split(",")[5] == rows[10][5] for line in window.text.strip().split("\r\n")[1:])
    missing = await client.get(f"/v1/accounts/nobody-{uid}/entries", headers={"Accept": "text/csv"})
    assert_problem(missing, 404, "account_not_found")
