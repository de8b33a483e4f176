"""Readable history: every entry names the other account of its transfer and the
transfer's description (JSON and CSV, after the fields that were there before), and
`ledger statement` prints an account's period with opening and closing balances that
agree with the ledger, line by line."""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import re
from collections.abc import Iterator

import pytest
from litestar.testing import AsyncTestClient

from ledger import cli, statement
from tests import provision
from tests.integration.helpers import open_account, transfer

ENTRY_FIELDS = [
    "account_id", "sequence", "transfer_id", "amount", "balance_after", "created_at", "hash", "key_id",
    "counterparty_account_id", "description",
]  # fmt: skip
# Free text that would break a naive CSV or a line-per-entry statement.
AWKWARD = 'Hotel "Lion", room 12\nsecond line'


async def entries_of(client: AsyncTestClient, account_id: str, **params: str) -> list[dict]:
    entries, cursor = [], None
    while True:
        query = {**params, "limit": "2", **({"cursor": cursor} if cursor else {})}
        response = await client.get(f"/v1/accounts/{account_id}/entries", params=query)
        assert response.status_code == 200, response.text
        page = response.json()
        entries += page["data"]
        if not (cursor := page["next_cursor"]):
            return entries


async def build_history(client: AsyncTestClient, uid: str) -> tuple[str, str, str]:
    """Alice is paid by the bank, buys at the shop (no description), holds money for the
    shop and has part of it posted, is refunded part of the purchase (a reversal), pays the
    shop again and is paid again: 6 entries, credits and debits, 4 different transfers'
    kinds."""
    bank, alice, shop = f"bank-{uid}", f"alice-{uid}", f"shop-{uid}"
    await open_account(client, bank, negative=True)
    await open_account(client, alice)
    await open_account(client, shop)
    moves = [
        (f"pay-{uid}", bank, alice, 100_000, {"description": "Salary, May"}),
        (f"buy-{uid}", alice, shop, 2_550, {}),
        (f"hold-{uid}", alice, shop, 4_000, {"pending": True, "description": AWKWARD}),
    ]
    for transfer_id, debit, credit, amount, fields in moves:
        assert (await transfer(client, transfer_id, debit, credit, amount, **fields)).status_code == 201
    assert (await client.post(f"/v1/transfers/hold-{uid}/post", json={"amount": 3_000})).status_code == 200
    refund = await client.post(f"/v1/transfers/buy-{uid}/reverse", json={"id": f"refund-{uid}", "amount": 550})
    assert refund.status_code == 201, refund.text
    assert (await transfer(client, f"rent-{uid}", alice, shop, 50_001, description="=HYPERLINK(1)")).status_code == 201
    assert (await transfer(client, f"bonus-{uid}", bank, alice, 7, description="")).status_code == 201
    return bank, alice, shop


async def test_entries_name_the_counterparty_and_the_description_of_their_transfer(
    client: AsyncTestClient, uid: str
) -> None:
    """For each side of each kind of transfer (plain, without description, posted from
    pending, a reversal), the entry's counterparty is the transfer's other account and its
    description the transfer's, checked against the transfer as GET /v1/transfers shows it;
    the old fields come first in their old order, and the hashes still verify."""
    bank, alice, shop = await build_history(client, uid)
    alice_entries = await entries_of(client, alice)
    assert [e["transfer_id"] for e in alice_entries] == [
        f"pay-{uid}", f"buy-{uid}", f"hold-{uid}", f"refund-{uid}", f"rent-{uid}", f"bonus-{uid}",
    ]  # fmt: skip
    assert [e["counterparty_account_id"] for e in alice_entries] == [bank, shop, shop, shop, shop, bank]
    assert [e["description"] for e in alice_entries] == [
        "Salary, May", None, AWKWARD, f"reversal of buy-{uid}", "=HYPERLINK(1)", "",
    ]  # fmt: skip
    shop_entries = await entries_of(client, shop)
    assert [e["counterparty_account_id"] for e in shop_entries] == [alice] * 4
    assert [e["amount"] for e in shop_entries] == [2_550, 3_000, -550, 50_001]

    for entry in alice_entries + shop_entries + await entries_of(client, bank):
        assert list(entry) == ENTRY_FIELDS
        moved = (await client.get(f"/v1/transfers/{entry['transfer_id']}")).json()
        sides = {
            moved["debit_account_id"]: moved["credit_account_id"],
            moved["credit_account_id"]: moved["debit_account_id"],
        }
        assert entry["counterparty_account_id"] == sides[entry["account_id"]] != entry["account_id"]
        assert (entry["amount"] < 0) == (entry["account_id"] == moved["debit_account_id"])
        assert entry["description"] == moved["description"]

    # A time window reads the same fields.
    window = await entries_of(client, alice, **{"from": alice_entries[2]["created_at"]})
    assert window == alice_entries[2:]
    for account_id in (bank, alice, shop):
        report = (await client.post("/v1/audit/verify", json={"account_id": account_id})).json()
        assert report["ok"] is True, report["problems"]


async def test_the_csv_export_appends_the_new_columns_after_key_id(client: AsyncTestClient, uid: str) -> None:
    """The CSV header is the old eight columns then the two new ones; every row reads
    back, with a CSV parser, as the JSON entry does, free text quoted (a comma, quotes and
    a line break survive); the old columns keep their positions."""
    _, alice, _ = await build_history(client, uid)
    expected = await entries_of(client, alice)
    response = await client.get(f"/v1/accounts/{alice}/entries", headers={"Accept": "text/csv"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(response.text, newline="")))
    assert rows[0] == ENTRY_FIELDS
    assert len(rows) == 1 + len(expected)
    for row, entry in zip(rows[1:], expected, strict=True):
        as_text = {key: "" if value is None else str(value) for key, value in entry.items()}
        assert row == [as_text[field] for field in ENTRY_FIELDS]
    assert rows[3][9] == AWKWARD and rows[2][9] == ""


# -- ledger statement -------------------------------------------------------------------


@pytest.fixture
def cli_environment(
    monkeypatch: pytest.MonkeyPatch, ledger_database: provision.LedgerDatabase, uid: str
) -> Iterator[None]:
    """`ledger.cli.main` on the session's database, as `ledger` would run from a shell;
    the logging set-up it installs is undone afterwards, so later tests' logging is theirs."""
    for name, value in provision.server_environment(ledger_database, provision.DATA_DIR / f"cli-{uid}").items():
        monkeypatch.setenv(name, value)
    loggers = [logging.getLogger(name) for name in ("", "ledger", "uvicorn", "uvicorn.error", "alembic")]
    saved = [(lg, lg.level, list(lg.handlers), lg.propagate, lg.disabled) for lg in loggers]
    yield
    for lg, level, handlers, propagate, disabled in saved:
        lg.setLevel(level)
        lg.handlers[:] = handlers
        lg.propagate, lg.disabled = propagate, disabled


async def run_cli(capsys: pytest.CaptureFixture[str], *arguments: str) -> tuple[int, str, str]:
    """`ledger ...` in-process; in a thread, because the CLI runs its own event loop."""
    capsys.readouterr()
    code = await asyncio.to_thread(cli.main, list(arguments))
    out, err = capsys.readouterr()
    return code, out, err


def minor_units(money: str, exponent: int) -> int:
    """The inverse of the statement's money format, kept independent of it."""
    negative, digits = money.startswith("-"), money.lstrip("-").replace(",", "")
    whole, _, fraction = digits.partition(".")
    assert len(fraction) == exponent, money
    value = int(whole) * 10**exponent + int(fraction or 0)
    return -value if negative else value


MONEY = r"-?[\d,]+(?:\.\d+)?"


async def test_a_statement_of_a_window_opens_and_closes_on_the_ledger_s_balances(
    client: AsyncTestClient, uid: str, cli_environment: None, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A window in the middle of Alice's history (her entries 2 to 5), read two entries
    per page: the opening balance is the balance endpoint's just before the window, each
    line's running balance is the one before plus the line's amount and equals the
    entry's balance_after, the closing balance is the balance endpoint's at the window's
    end, and the totals and count add up; each entry is one line (the line break in a
    description is escaped), amounts are right-aligned."""
    monkeypatch.setattr(statement, "STATEMENT_PAGE", 2)
    _, alice, _ = await build_history(client, uid)
    entries = await entries_of(client, alice)
    inside = entries[1:5]
    start, end = inside[0]["created_at"], inside[-1]["created_at"]

    code, out, err = await run_cli(capsys, "statement", alice, "--from", start, "--to", end)
    assert code == 0, err
    lines = out.splitlines()
    opening = (await client.get(f"/v1/accounts/{alice}/balance", params={"as_of": entries[0]["created_at"]})).json()
    closing = (await client.get(f"/v1/accounts/{alice}/balance", params={"as_of": end})).json()
    assert opening["posted"] == entries[0]["balance_after"] == 100_000
    assert lines[0] == f"Statement of account {alice}"
    assert re.fullmatch(r"Currency\s+EUR \(2 decimals\)", lines[1])
    assert minor_units(re.fullmatch(rf"Opening balance\s+({MONEY})", lines[3]).group(1), 2) == opening["posted"]

    table = [line for line in lines if line.startswith(inside[0]["created_at"][:4]) and f"-{uid}" in line]
    assert len(table) == len(inside)
    running = opening["posted"]
    for line, entry in zip(table, inside, strict=True):
        amount, balance, transfer_id, counterparty = line[21:].split()[:4]
        assert (transfer_id, counterparty) == (entry["transfer_id"], entry["counterparty_account_id"])
        running += minor_units(amount, 2)
        assert minor_units(amount, 2) == entry["amount"]
        assert minor_units(balance, 2) == running == entry["balance_after"]
        assert line.startswith(entry["created_at"][:19].replace("T", " "))
    assert "room 12\\nsecond line" in table[1] and '"Lion"' in table[1]
    # Right-aligned: every line's amount and balance end in the same column.
    cells = [re.match(rf"^.{{19}}\s+({MONEY})\s+({MONEY})\s", line) for line in table]
    assert len({(cell.end(1), cell.end(2)) for cell in cells}) == 1, table
    for label in ("Opening balance", "Closing balance"):
        assert re.search(rf"^{label}\s+{MONEY}$", out, re.M).end() - out.rfind("\n", 0, out.index(label)) - 1 == cells[
            0
        ].end(2)

    footer = dict(re.findall(rf"^(Closing balance|Total debits|Total credits|Entries)\s+({MONEY})", out, re.M))
    assert minor_units(footer["Closing balance"], 2) == running == closing["posted"]
    assert minor_units(footer["Total debits"], 2) == sum(e["amount"] for e in inside if e["amount"] < 0)
    assert minor_units(footer["Total credits"], 2) == sum(e["amount"] for e in inside if e["amount"] > 0)
    assert int(footer["Entries"]) == len(inside)
    assert minor_units(footer["Closing balance"], 2) == (
        opening["posted"] + minor_units(footer["Total credits"], 2) + minor_units(footer["Total debits"], 2)
    )

    # From the first entry the statement opens at 0 and closes on the account's balance.
    code, out, _ = await run_cli(capsys, "statement", alice)
    posted = (await client.get(f"/v1/accounts/{alice}")).json()["balance"]["posted"]
    assert code == 0 and minor_units(re.search(rf"^Closing balance\s+({MONEY})", out, re.M).group(1), 2) == posted
    assert re.search(r"^Opening balance\s+0\.00$", out, re.M) and re.search(r"^Entries\s+6$", out, re.M)


async def test_a_csv_statement_reads_back_to_the_ledger(
    client: AsyncTestClient, uid: str, cli_environment: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--format csv`: an opening row, one row per entry in the window with amount and
    balance in euros, totals and a closing row, which a CSV parser reads back to the
    ledger's minor units; a description that looks like a formula is neutralized."""
    _, alice, _ = await build_history(client, uid)
    entries = await entries_of(client, alice)
    code, out, err = await run_cli(capsys, "statement", alice, "--from", entries[3]["created_at"], "--format", "csv")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out, newline="")))
    assert [row["line"] for row in rows] == [
        "opening",
        "entry",
        "entry",
        "entry",
        "total_debits",
        "total_credits",
        "closing",
    ]
    assert {row["account_id"] for row in rows} == {alice} and {row["currency"] for row in rows} == {"EUR"}
    assert minor_units(rows[0]["balance"], 2) == entries[2]["balance_after"]
    for row, entry in zip(rows[1:4], entries[3:], strict=True):
        assert (row["transfer_id"], row["counterparty_account_id"]) == (
            entry["transfer_id"],
            entry["counterparty_account_id"],
        )
        assert (minor_units(row["amount"], 2), minor_units(row["balance"], 2)) == (
            entry["amount"],
            entry["balance_after"],
        )
    assert rows[2]["description"] == "'=HYPERLINK(1)"
    assert minor_units(rows[-1]["balance"], 2) == entries[-1]["balance_after"]
    assert minor_units(rows[4]["amount"], 2) == -50_001 and minor_units(rows[5]["amount"], 2) == 550 + 7


async def test_a_statement_shows_a_currency_in_its_minor_units_and_refuses_what_it_cannot_print(
    client: AsyncTestClient, uid: str, cli_environment: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """Yen have no decimals (1234567 minor units print as 1,234,567); an unknown account
    is one line on stderr and exit 1, nothing on stdout; a timestamp without an offset is
    refused with exit 2."""
    await open_account(client, f"yen-bank-{uid}", currency="JPY", negative=True)
    await open_account(client, f"yen-{uid}", currency="JPY")
    await transfer(client, f"yen-pay-{uid}", f"yen-bank-{uid}", f"yen-{uid}", 1_234_567)
    code, out, _ = await run_cli(capsys, "statement", f"yen-{uid}")
    assert code == 0 and re.search(r"^Closing balance\s+1,234,567$", out, re.M) and "no decimals" in out

    code, out, err = await run_cli(capsys, "statement", f"nobody-{uid}")
    assert (code, out) == (1, "") and err.count("\n") == 1 and f"nobody-{uid}" in err
    code, out, err = await run_cli(capsys, "statement", f"yen-{uid}", "--from", "2026-01-01T00:00:00")
    assert (code, out) == (2, "") and "--from" in err


@pytest.mark.parametrize(
    ("amount_minor", "currency", "shown"),
    [(0, "EUR", "0.00"), (5, "EUR", "0.05"), (-123456, "USD", "-1,234.56"), (-7, "JPY", "-7"), (1001, "KWD", "1.001"),
     (9_223_372_036_854_775_807, "XYZ", "92,233,720,368,547,758.07")],
)  # fmt: skip
def test_money_is_shown_exactly_in_the_currency_s_decimals(amount_minor: int, currency: str, shown: str) -> None:
    """Integer arithmetic, ISO 4217 decimals, 2 for a code not in the table, exact even
    at the largest balance (a float would round it)."""
    assert statement.format_money(amount_minor, statement.exponent_of(currency)) == shown
    assert minor_units(shown, statement.exponent_of(currency)) == amount_minor
