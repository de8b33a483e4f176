"""`ledger statement`: one account's history for people, as text or CSV.

The ledger stores integer minor units; a statement shows money in the currency's major
unit, with as many decimals as ISO 4217 gives it (`ISO_4217_EXPONENTS`; 2 for any
currency not in the table). The statement reads straight from the database, like the
other CLI commands, in the same pages as the CSV export (`ledger.service.audit.STATEMENT`):
memory holds one page at a time, however long the journal.

It is consistent without holding a snapshot: the account's journal is append-only and
numbered, so the statement covers the entries up to the one that was last when it
started (`entries_count` then), and the opening balance is read below that same head.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TextIO, TypeVar

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.errors import AccountNotFound
from ledger.http.schemas import format_timestamp, parse_timestamp
from ledger.service.audit import STATEMENT, STATEMENT_PAGE
from ledger.settings import Settings

T = TypeVar("T")

# Decimals of the currencies whose minor unit is not the hundredth (ISO 4217); every
# other currency is shown with DEFAULT_EXPONENT. A code the ledger accepts but ISO does
# not know (any three capitals) gets the default too.
DEFAULT_EXPONENT = 2
ISO_4217_EXPONENTS = {
    "BIF": 0, "CLP": 0, "DJF": 0, "GNF": 0, "ISK": 0, "JPY": 0, "KMF": 0, "KRW": 0, "PYG": 0, "RWF": 0,
    "UGX": 0, "UYI": 0, "VND": 0, "VUV": 0, "XAF": 0, "XOF": 0, "XPF": 0,
    "BHD": 3, "IQD": 3, "JOD": 3, "KWD": 3, "LYD": 3, "OMR": 3, "TND": 3,
    "CLF": 4, "UYW": 4,
}  # fmt: skip

ACCOUNT = text(
    "SELECT id, name, currency, entries_count, debits_posted, credits_posted FROM accounts WHERE id = :account"
)
# The last entry before `start` (its balance is the opening balance), and the last at or
# before `end` (where the period's entries stop), below the statement's head: each one
# lookup in the (account_id, created_at, sequence) index, in the balance endpoint's order.
OPENING = text(
    """
    SELECT sequence, balance_after FROM entries
    WHERE account_id = :account AND created_at < :moment AND sequence <= :last
    ORDER BY created_at DESC, sequence DESC LIMIT 1
    """
)
CLOSING = text(
    """
    SELECT sequence FROM entries
    WHERE account_id = :account AND created_at <= :moment AND sequence <= :last
    ORDER BY created_at DESC, sequence DESC LIMIT 1
    """
)


def exponent_of(currency: str) -> int:
    return ISO_4217_EXPONENTS.get(currency, DEFAULT_EXPONENT)


def format_money(amount_minor: int, exponent: int, *, grouping: bool = True) -> str:
    """Minor units as a decimal in the major unit, exactly (integer arithmetic, no float):
    -123456 with exponent 2 is `-1,234.56` (`-1234.56` without grouping)."""
    major, minor = divmod(abs(amount_minor), 10**exponent)
    whole = f"{major:,}" if grouping else str(major)
    sign = "-" if amount_minor < 0 else ""
    return f"{sign}{whole}.{minor:0{exponent}d}" if exponent else f"{sign}{whole}"


@dataclass(frozen=True, slots=True)
class Head:
    """The account, the sequences the period's entries lie between (opening_sequence
    excluded, last_sequence included), and the balance it opens with."""

    account_id: str
    name: str | None
    currency: str
    last_sequence: int
    # No balance, entry amount or total of this account can exceed this in magnitude:
    # balances are partial sums of credits minus debits.
    largest_minor: int
    opening_balance: int
    opening_sequence: int


@dataclass(slots=True)
class Totals:
    """Sums of the period's entries; `debits` and `credits` are magnitudes (a statement
    shows the debits' total signed, like the amounts)."""

    closing_balance: int
    debits: int = 0
    debit_entries: int = 0
    credits: int = 0
    credit_entries: int = 0
    # Entries whose balance_after is not the previous balance plus their amount: the
    # journal was altered, and only `ledger audit verify` can say how.
    inconsistent: int = 0

    @property
    def entries(self) -> int:
        return self.debit_entries + self.credit_entries

    def add(self, amount: int, balance_after: int) -> None:
        if balance_after != self.closing_balance + amount:
            self.inconsistent += 1
        if amount < 0:
            self.debits -= amount
            self.debit_entries += 1
        else:
            self.credits += amount
            self.credit_entries += 1
        self.closing_balance = balance_after


async def read_head(engine: AsyncEngine, account_id: str, start: datetime | None, end: datetime | None) -> Head:
    async with engine.connect() as connection:
        account = (await connection.execute(ACCOUNT, {"account": account_id})).first()
        if account is None:
            raise AccountNotFound(f"no account with id {account_id!r}")
        opening, last_sequence = None, account.entries_count
        if start is not None:
            parameters = {"account": account_id, "moment": start, "last": last_sequence}
            opening = (await connection.execute(OPENING, parameters)).first()
        if end is not None:
            parameters = {"account": account_id, "moment": end, "last": last_sequence}
            last_sequence = (await connection.execute(CLOSING, parameters)).scalar() or 0
    return Head(
        account_id=account.id,
        name=account.name,
        currency=account.currency,
        last_sequence=last_sequence,
        largest_minor=max(account.debits_posted, account.credits_posted),
        opening_balance=opening.balance_after if opening else 0,
        opening_sequence=opening.sequence if opening else 0,
    )


async def entry_pages(
    engine: AsyncEngine, head: Head, start: datetime | None, end: datetime | None
) -> AsyncIterator[list[Any]]:
    """The period's entries, a page per short transaction. Entry times never go back
    within an account (the writer stamps each entry no earlier than the one before), so
    the period starts after the opening entry, and no page re-reads the history before it."""
    after = head.opening_sequence
    while after < head.last_sequence:
        parameters = {"account": head.account_id, "after": after, "last": head.last_sequence, "start": start}
        async with engine.connect() as connection:
            rows = (await connection.execute(STATEMENT, {**parameters, "end": end, "limit": STATEMENT_PAGE})).all()
        if rows:
            yield rows
        if len(rows) < STATEMENT_PAGE:
            return
        after = rows[-1].sequence


class Renderer(Protocol):
    def header(self, head: Head, start: datetime | None, end: datetime | None) -> None: ...
    def entries(self, rows: list[Any]) -> None: ...
    def footer(self, head: Head, totals: Totals) -> None: ...


def _moment(moment: datetime, *, exact: bool) -> str:
    moment = moment.astimezone(UTC)
    shown = moment.strftime("%Y-%m-%d %H:%M:%S")
    return f"{shown}.{moment.microsecond:06d}" if exact and moment.microsecond else shown


def _count(entries: int) -> str:
    return "1 entry" if entries == 1 else f"{entries} entries"


def _printable(value: str) -> str:
    """Control and format characters escaped (`\\n`, `\\u202e`): a description cannot add
    lines to the statement, or reorder what a terminal shows."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in value)


class TextStatement:
    """Columns: date and time (UTC), amount, running balance, transfer, counterparty,
    description. The money columns come first, right-aligned at a width that fits any
    amount of this account, so they line up on every page even though ids are up to 64
    characters; the free-text description is last."""

    DATE_WIDTH = 19
    ID_WIDTH = 24
    LABEL_WIDTH = 16

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._exponent = DEFAULT_EXPONENT
        self._width = 0

    def _money(self, amount_minor: int) -> str:
        return format_money(amount_minor, self._exponent).rjust(self._width)

    def _labelled(self, label: str, amount_minor: int) -> str:
        """A header or footer amount, in the balance column."""
        return f"{label:<{self.DATE_WIDTH + self._width + 4}}{self._money(amount_minor)}"

    def _line(self, *cells: str) -> str:
        return "  ".join(cells).rstrip() + "\n"

    def header(self, head: Head, start: datetime | None, end: datetime | None) -> None:
        self._exponent = exponent_of(head.currency)
        self._width = max(len("Balance"), len(format_money(-head.largest_minor, self._exponent)))
        name = f" ({_printable(head.name)})" if head.name else ""
        since = f"{_moment(start, exact=True)} UTC" if start else "the first entry"
        until = f"{_moment(end, exact=True)} UTC" if end else "the last entry"
        decimals = "no decimals" if self._exponent == 0 else f"{self._exponent} decimals"
        label = self.LABEL_WIDTH
        self._out.write(
            f"Statement of account {head.account_id}{name}\n"
            f"{'Currency':<{label}}{head.currency} ({decimals})\n"
            f"{'Period':<{label}}{since} to {until}\n"
            f"{self._labelled('Opening balance', head.opening_balance)}\n\n"
            + self._line(
                "Date (UTC)".ljust(self.DATE_WIDTH),
                "Amount".rjust(self._width),
                "Balance".rjust(self._width),
                "Transfer".ljust(self.ID_WIDTH),
                "Counterparty".ljust(self.ID_WIDTH),
                "Description",
            )
        )

    def entries(self, rows: list[Any]) -> None:
        self._out.write(
            "".join(
                self._line(
                    _moment(row.created_at, exact=False),
                    self._money(row.amount),
                    self._money(row.balance_after),
                    row.transfer_id.ljust(self.ID_WIDTH),
                    (row.counterparty_account_id or "?").ljust(self.ID_WIDTH),
                    _printable(row.description or ""),
                )
                for row in rows
            )
        )

    def footer(self, head: Head, totals: Totals) -> None:
        self._out.write(
            "\n"
            f"{self._labelled('Total debits', -totals.debits)}  {_count(totals.debit_entries)}\n"
            f"{self._labelled('Total credits', totals.credits)}  {_count(totals.credit_entries)}\n"
            f"{self._labelled('Closing balance', totals.closing_balance)}\n"
            f"{'Entries':<{self.DATE_WIDTH + self._width + 4}}{totals.entries:>{self._width}}\n"
        )


# A text cell starting with one of these is a formula to a spreadsheet.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _spreadsheet_safe(value: str | None) -> str:
    """Free text (descriptions, names) as a spreadsheet shows it, never as a formula
    (OWASP, CSV injection): such a cell is prefixed with an apostrophe."""
    if not value:
        return ""
    return f"'{value}" if value.startswith(FORMULA_STARTS) else value


class CsvStatement:
    """One row per line of the statement, each with the account and the currency, `line`
    saying which: `opening` (its `sequence` is the last entry before the period, its
    `description` the account's name), `entry`, `total_debits`, `total_credits`,
    `closing`. Money is in the major unit without grouping (`-1234.56`), timestamps are
    RFC 3339 in UTC."""

    COLUMNS = (
        "account_id",
        "line",
        "created_at",
        "sequence",
        "transfer_id",
        "counterparty_account_id",
        "description",
        "amount",
        "balance",
        "currency",
    )

    def __init__(self, out: TextIO) -> None:
        self._writer = csv.writer(out, lineterminator="\r\n")
        self._account_id = ""
        self._exponent = DEFAULT_EXPONENT
        self._currency = ""

    def _money(self, amount_minor: int) -> str:
        return format_money(amount_minor, self._exponent, grouping=False)

    def header(self, head: Head, start: datetime | None, end: datetime | None) -> None:
        self._account_id, self._exponent, self._currency = head.account_id, exponent_of(head.currency), head.currency
        self._writer.writerow(self.COLUMNS)
        since = format_timestamp(start) if start else ""
        name = _spreadsheet_safe(head.name)
        self._row("opening", since, head.opening_sequence, "", "", name, "", self._money(head.opening_balance))

    def _row(self, *cells: object) -> None:
        self._writer.writerow((self._account_id, *cells, self._currency))

    def entries(self, rows: list[Any]) -> None:
        self._writer.writerows(
            (
                self._account_id,
                "entry",
                format_timestamp(row.created_at),
                row.sequence,
                row.transfer_id,
                row.counterparty_account_id or "",
                _spreadsheet_safe(row.description),
                self._money(row.amount),
                self._money(row.balance_after),
                self._currency,
            )
            for row in rows
        )

    def footer(self, head: Head, totals: Totals) -> None:
        # The totals rows say how many entries they add up in `description`.
        self._row("total_debits", "", "", "", "", _count(totals.debit_entries), self._money(-totals.debits), "")
        self._row("total_credits", "", "", "", "", _count(totals.credit_entries), self._money(totals.credits), "")
        self._row("closing", "", "", "", "", _count(totals.entries), "", self._money(totals.closing_balance))


async def write_statement(
    engine: AsyncEngine,
    account_id: str,
    start: datetime | None,
    end: datetime | None,
    out: TextIO,
    format_name: str = "text",
) -> Totals:
    """Write the statement to `out`, a page at a time; AccountNotFound if there is no
    such account (before anything is written)."""
    head = await read_head(engine, account_id, start, end)
    renderer: Renderer = CsvStatement(out) if format_name == "csv" else TextStatement(out)
    renderer.header(head, start, end)
    totals = Totals(closing_balance=head.opening_balance)
    async for rows in entry_pages(engine, head, start, end):
        for row in rows:
            totals.add(row.amount, row.balance_after)
        renderer.entries(rows)
        out.flush()
    renderer.footer(head, totals)
    out.flush()
    return totals


def _timestamp(option: str, value: str | None) -> datetime | None:
    return None if value is None else parse_timestamp(option, value)


def run(
    settings: Settings,
    arguments: argparse.Namespace,
    on_database: Callable[[Settings, Callable[[AsyncEngine], Awaitable[T]]], T],
) -> int:
    """`ledger statement ACCOUNT [--from] [--to] [--format]`: 0 when printed, 1 for an
    unknown account or a journal whose balances do not add up, 2 for bad options."""
    try:
        start = _timestamp("--from", arguments.start)
        end = _timestamp("--to", arguments.end)
    except ValueError as error:
        print(f"ledger statement: {str(error).replace('`', '')}", file=sys.stderr)
        return 2
    if start is not None and end is not None and start > end:
        print("ledger statement: --from is after --to", file=sys.stderr)
        return 2
    try:
        totals = on_database(
            settings,
            lambda engine: write_statement(engine, arguments.account, start, end, sys.stdout, arguments.format),
        )
    except AccountNotFound as error:
        print(f"ledger statement: {error}", file=sys.stderr)
        return 1
    if totals.inconsistent:
        print(
            f"ledger statement: {totals.inconsistent} entries' balances do not follow from the one before: "
            "run `ledger audit verify`",
            file=sys.stderr,
        )
        return 1
    return 0
