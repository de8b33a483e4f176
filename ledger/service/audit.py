"""Audit: verify the journal against itself and against the account totals, and read a
trial balance, each from one consistent snapshot.

Verification walks every account's journal in sequence order and reports each problem
precisely (account, sequence, code):

- `sequence_gap`: a sequence is missing or out of order (an entry deleted or moved);
- `hash_mismatch`: an entry's hash does not match its content and the previous entry's
  hash (a changed amount, balance, time or transfer, or a reordered or removed entry);
- `balance_after_mismatch`: balance_after is not the running sum of the amounts;
- `time_out_of_order`: an entry is earlier than the one before it;
- `entries_count_mismatch`, `last_hash_mismatch`, `balance_mismatch`: the account row
  disagrees with its journal (a forged balance);
- `pending_mismatch`: pending totals disagree with the account's pending transfers.

The walk reads accounts and entries in keyset pages, so memory does not grow with the
ledger; a progress callback lets the CLI show how far it is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger.domain import entry_hash
from ledger.errors import AccountNotFound

ACCOUNT_PAGE = 500
ENTRY_PAGE = 5000
MAX_PROBLEMS = 1000

SNAPSHOT = text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
ACCOUNTS = text(
    """
    SELECT id, debits_posted, credits_posted, pending_debits, pending_credits, entries_count, last_entry_hash
    FROM accounts WHERE id > :after AND (CAST(:only AS text) IS NULL OR id = :only) ORDER BY id LIMIT :limit
    """
)
PENDING = text(
    """
    SELECT a.id,
           COALESCE((SELECT sum(amount) FROM transfers t WHERE t.debit_account_id = a.id AND t.status = 'pending'), 0) AS debits,
           COALESCE((SELECT sum(amount) FROM transfers t WHERE t.credit_account_id = a.id AND t.status = 'pending'), 0) AS credits
    FROM unnest(CAST(:ids AS text[])) AS a(id)
    """
)
ENTRIES = text(
    """
    SELECT sequence, transfer_id, amount, balance_after, created_at, hash FROM entries
    WHERE account_id = :account AND sequence > :after ORDER BY sequence LIMIT :limit
    """
)
COUNT_ACCOUNTS = text("SELECT count(*) FROM accounts WHERE CAST(:only AS text) IS NULL OR id = :only")
TRIAL_BALANCE_NOW = text(
    """
    SELECT currency, sum(debits_posted) AS debits, sum(credits_posted) AS credits FROM accounts
    WHERE CAST(:currency AS text) IS NULL OR currency = :currency GROUP BY currency ORDER BY currency
    """
)
TRIAL_BALANCE_AS_OF = text(
    """
    SELECT a.currency,
           COALESCE(sum(-e.amount) FILTER (WHERE e.amount < 0), 0) AS debits,
           COALESCE(sum(e.amount) FILTER (WHERE e.amount > 0), 0) AS credits
    FROM entries e JOIN accounts a ON a.id = e.account_id
    WHERE e.created_at <= :as_of AND (CAST(:currency AS text) IS NULL OR a.currency = :currency)
    GROUP BY a.currency ORDER BY a.currency
    """
)


@dataclass(frozen=True, slots=True)
class AuditProblem:
    account_id: str
    sequence: int | None
    code: str
    detail: str


@dataclass
class AuditReport:
    accounts_checked: int = 0
    entries_checked: int = 0
    problems: list[AuditProblem] = field(default_factory=list)
    problems_total: int = 0

    @property
    def ok(self) -> bool:
        return self.problems_total == 0

    def add(self, account_id: str, sequence: int | None, code: str, detail: str) -> None:
        self.problems_total += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(AuditProblem(account_id, sequence, code, detail))


@dataclass(frozen=True, slots=True)
class CurrencyTotals:
    currency: str
    debits: int
    credits: int

    @property
    def difference(self) -> int:
        return self.debits - self.credits


Progress = Callable[[int, int, int], None]  # accounts done, accounts total, entries done


async def _snapshot(connection: AsyncConnection) -> None:
    await connection.begin()
    await connection.execute(SNAPSHOT)


async def verify(engine: AsyncEngine, account_id: str | None = None, progress: Progress | None = None) -> AuditReport:
    report = AuditReport()
    async with engine.connect() as connection:
        await _snapshot(connection)
        total = (await connection.execute(COUNT_ACCOUNTS, {"only": account_id})).scalar_one()
        if account_id is not None and total == 0:
            raise AccountNotFound(f"no account with id {account_id!r}")
        after = ""
        while True:
            accounts = (
                (await connection.execute(ACCOUNTS, {"after": after, "only": account_id, "limit": ACCOUNT_PAGE}))
                .mappings()
                .all()
            )
            if not accounts:
                break
            pending = {
                row["id"]: row
                for row in (await connection.execute(PENDING, {"ids": [a["id"] for a in accounts]})).mappings()
            }
            for account in accounts:
                await _verify_account(connection, account, pending[account["id"]], report)
                report.accounts_checked += 1
                if progress is not None:
                    progress(report.accounts_checked, total, report.entries_checked)
            after = accounts[-1]["id"]
        await connection.rollback()
    return report


async def _verify_account(connection: AsyncConnection, account: dict, pending: dict, report: AuditReport) -> None:
    account_id = account["id"]
    expected_sequence, running = 1, 0
    previous_hash: bytes | None = None
    previous_time: datetime | None = None
    last_sequence = 0
    after = 0
    while True:
        entries = (
            (await connection.execute(ENTRIES, {"account": account_id, "after": after, "limit": ENTRY_PAGE}))
            .mappings()
            .all()
        )
        if not entries:
            break
        for entry in entries:
            sequence = entry["sequence"]
            if sequence != expected_sequence:
                report.add(
                    account_id, sequence, "sequence_gap", f"expected sequence {expected_sequence}, found {sequence}"
                )
            running += entry["amount"]
            if entry["balance_after"] != running:
                report.add(
                    account_id, sequence, "balance_after_mismatch",
                    f"balance_after is {entry['balance_after']}, the amounts sum to {running}",
                )  # fmt: skip
                running = entry["balance_after"]  # report the next problem, not this one again
            recomputed = entry_hash(
                previous_hash, account_id, sequence, entry["transfer_id"], entry["amount"], entry["balance_after"],
                entry["created_at"],
            )  # fmt: skip
            if recomputed != entry["hash"]:
                report.add(
                    account_id, sequence, "hash_mismatch", "the hash does not match the entry and its predecessor"
                )
            if previous_time is not None and entry["created_at"] < previous_time:
                report.add(account_id, sequence, "time_out_of_order", "the entry is earlier than the one before it")
            previous_hash, previous_time = entry["hash"], entry["created_at"]
            expected_sequence = sequence + 1
            last_sequence = sequence
            report.entries_checked += 1
        after = entries[-1]["sequence"]

    if account["entries_count"] != last_sequence:
        report.add(
            account_id, None, "entries_count_mismatch",
            f"the account counts {account['entries_count']} entries, the journal ends at {last_sequence}",
        )  # fmt: skip
    if account["last_entry_hash"] != previous_hash:
        report.add(account_id, None, "last_hash_mismatch", "the account's last hash is not its last entry's")
    posted = account["credits_posted"] - account["debits_posted"]
    if posted != running:
        report.add(account_id, None, "balance_mismatch", f"the account says {posted}, its journal sums to {running}")
    if (account["pending_debits"], account["pending_credits"]) != (pending["debits"], pending["credits"]):
        report.add(
            account_id, None, "pending_mismatch",
            f"pending {account['pending_debits']}/{account['pending_credits']}, "
            f"its pending transfers {pending['debits']}/{pending['credits']}",
        )  # fmt: skip


async def trial_balance(
    engine: AsyncEngine, currency: str | None, as_of: datetime | None
) -> tuple[datetime, list[CurrencyTotals]]:
    """Per currency, the sums of debits and of credits over all accounts, from one snapshot."""
    async with engine.connect() as connection:
        await _snapshot(connection)
        moment = as_of or (await connection.execute(text("SELECT clock_timestamp()"))).scalar_one()
        if as_of is None:
            rows = (await connection.execute(TRIAL_BALANCE_NOW, {"currency": currency})).mappings().all()
        else:
            rows = (
                (await connection.execute(TRIAL_BALANCE_AS_OF, {"currency": currency, "as_of": as_of})).mappings().all()
            )
        await connection.rollback()
    return moment, [CurrencyTotals(row["currency"], int(row["debits"]), int(row["credits"])) for row in rows]


STATEMENT_PAGE = 2000
STATEMENT = text(
    """
    SELECT sequence, transfer_id, amount, balance_after, created_at, hash FROM entries
    WHERE account_id = :account AND sequence > :after
      AND (CAST(:start AS timestamptz) IS NULL OR created_at >= :start)
      AND (CAST(:end AS timestamptz) IS NULL OR created_at <= :end)
    ORDER BY sequence LIMIT :limit
    """
)
ACCOUNT_EXISTS = text("SELECT EXISTS (SELECT 1 FROM accounts WHERE id = :account)")


async def statement_pages(
    engine: AsyncEngine, account_id: str, start: datetime | None, end: datetime | None
) -> AsyncIterator[list]:  # the awaited result is the iterator
    """An account's whole statement, page by page from one snapshot: the first page is
    read (and the account's existence checked) before the caller starts streaming, so a
    missing account is a 404, not a broken stream. Memory holds one page at a time."""
    connection = await engine.connect()
    try:
        await _snapshot(connection)
        if not (await connection.execute(ACCOUNT_EXISTS, {"account": account_id})).scalar_one():
            raise AccountNotFound(f"no account with id {account_id!r}")
    except BaseException:
        await connection.close()
        raise

    async def pages() -> AsyncIterator[list]:
        try:
            after = 0
            while True:
                rows = (
                    await connection.execute(
                        STATEMENT,
                        {"account": account_id, "after": after, "start": start, "end": end, "limit": STATEMENT_PAGE},
                    )
                ).all()
                if not rows:
                    return
                yield rows
                after = rows[-1].sequence
        finally:
            await connection.rollback()
            await connection.close()

    return pages()
