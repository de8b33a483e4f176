"""Audit: verify the ledger against itself, against the chain keys and against the last
checkpoint, each from one consistent snapshot; trial balances and statements.

Verification trusts nothing the database says about itself. It walks every account's
journal in sequence order, every transfer, and reports each problem precisely
(account, sequence or transfer, code):

- journal: `sequence_gap` (an entry deleted or moved), `hash_mismatch` (the entry's
  keyed hash does not match its content and its predecessor: changed, inserted or
  reordered), `unknown_chain_key` (its key is not in the keyring), `balance_after_mismatch`
  (not the running sum), `time_out_of_order`, `negative_balance` (an account that may not
  go negative did);
- keys and checkpoints: `unpinned_legacy_entry`, `revoked_chain_key` (an entry of the old
  unkeyed chain, or under a revoked key, beyond the last checkpoint's head: only a
  checkpoint can vouch for those), `checkpoint_mismatch` (the entry at a checkpointed head
  is not the one checkpointed), `journal_truncated`, `account_missing`,
  `transfers_missing`, `settled_transfers_changed`, `checkpoint_invalid`;
- account rows: `entries_count_mismatch`, `last_hash_mismatch`, `balance_mismatch` and
  `pending_mismatch` (totals that disagree with the journal or with pending transfers),
  `account_seal_mismatch`, `unsealed_account`;
- account histories (`account_changes`): `change_sequence_gap`, `change_hash_mismatch` (a
  change altered, inserted or reordered without the chain key), `change_history_mismatch`
  (a change's `before` is not what the history said last, or the account row's status,
  limits, name or metadata are not what its history says);
- transfer rows: `transfer_seal_mismatch`, `unsealed_transfer`, and against the journal
  `transfer_entries_mismatch` (a posted transfer needs exactly its two entries, of its
  posted amount, on its accounts; any other status none), `reversed_amount_mismatch`
  (not the sum of its posted reversals), `reversal_mismatch` (a reversal not in the
  opposite direction of what it reverses), `currency_mismatch`, `entry_without_transfer`.

Reads go in keyset pages, so memory does not grow with the ledger; the hashing yields to
the event loop every `YIELD_EVERY` entries, so a verification never stalls other requests;
a progress callback lets the CLI show how far it is.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from types import SimpleNamespace
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger.errors import AccountNotFound
from ledger.integrity import (
    LEGACY_KEY_ID,
    Keyring,
    account_message,
    change_hash,
    entry_hash,
    seal_is_valid,
    transfer_message,
)
from ledger.service.checkpoints import Checkpoint, transfer_counts
from ledger.service.records import TransferRecord

CONTROLS = ("status", "overdraft_limit", "max_balance")
# Pages small enough that reading one (the rows are built in one go) does not hold the
# event loop for more than a few milliseconds.
ACCOUNT_PAGE = 500
ENTRY_PAGE = 1000
TRANSFER_PAGE = 500
MAX_PROBLEMS = 1000
YIELD_EVERY = 256

SNAPSHOT = text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
ACCOUNTS = text(
    """
    SELECT id, currency, name, allow_negative_balance, metadata, seal, seal_key, debits_posted, credits_posted,
           pending_debits, pending_credits, entries_count, last_entry_hash, status, overdraft_limit, max_balance
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
    SELECT sequence, transfer_id, amount, balance_after, created_at, hash, key_id FROM entries
    WHERE account_id = :account AND sequence > :after ORDER BY sequence LIMIT :limit
    """
)
# An account's history of changes (few rows per account: read whole).
CHANGES = text(
    """
    SELECT sequence, changed_at, changed_by, before, after, state, hash, key_id FROM account_changes
    WHERE account_id = :account ORDER BY sequence
    """
)
COUNT_ACCOUNTS = text("SELECT count(*) FROM accounts WHERE CAST(:only AS text) IS NULL OR id = :only")
_TRANSFER_CHECK_COLUMNS = """
    t.id, t.debit_account_id, t.credit_account_id, t.amount, t.currency, t.pending, t.status, t.code,
    t.description, t.metadata, t.request_hash, t.created_at, t.updated_at, t.timeout_seconds, t.expires_at,
    t.posted_amount, t.reversal_of, t.reversed_amount, t.missing_account, t.imported_at, t.seal, t.seal_key,
    ARRAY(SELECT e.account_id FROM entries e WHERE e.transfer_id = t.id ORDER BY e.account_id, e.amount) AS entry_accounts,
    ARRAY(SELECT e.amount FROM entries e WHERE e.transfer_id = t.id ORDER BY e.account_id, e.amount) AS entry_amounts,
    CAST(COALESCE((SELECT sum(r.amount) FROM transfers r WHERE r.reversal_of = t.id AND r.status = 'posted'), 0)
         AS bigint) AS reversed_total,
    d.currency AS debit_currency, c.currency AS credit_currency,
    o.id IS NOT NULL AS original_found, o.debit_account_id AS original_debit, o.credit_account_id AS original_credit
"""
_TRANSFER_JOINS = """
    LEFT JOIN accounts d ON d.id = t.debit_account_id
    LEFT JOIN accounts c ON c.id = t.credit_account_id
    LEFT JOIN transfers o ON o.id = t.reversal_of
"""
TRANSFERS = text(
    f"SELECT {_TRANSFER_CHECK_COLUMNS} FROM transfers t {_TRANSFER_JOINS} WHERE t.id > :after ORDER BY t.id LIMIT :limit"
)
# One account's transfers, one side at a time, each through its own index.
ACCOUNT_TRANSFERS = {
    side: text(
        f"""
        SELECT {_TRANSFER_CHECK_COLUMNS} FROM transfers t {_TRANSFER_JOINS}
        WHERE t.{side}_account_id = :account AND (t.created_at, t.id) > (:after_time, :after_id)
        ORDER BY t.created_at, t.id LIMIT :limit
        """
    )
    for side in ("debit", "credit")
}
COUNT_ENTRIES = text("SELECT count(*) FROM entries")
ORPHAN_ENTRIES = text(
    """
    SELECT e.account_id, e.sequence, e.transfer_id FROM entries e
    WHERE NOT EXISTS (SELECT 1 FROM transfers t WHERE t.id = e.transfer_id) LIMIT 100
    """
)
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
EPOCH_START = datetime.fromisoformat("0001-01-01T00:00:00+00:00")


@dataclass(frozen=True, slots=True)
class AuditProblem:
    account_id: str
    sequence: int | None
    code: str
    detail: str
    transfer_id: str | None = None


@dataclass
class AuditReport:
    accounts_checked: int = 0
    entries_checked: int = 0
    transfers_checked: int = 0
    problems: list[AuditProblem] = field(default_factory=list)
    problems_total: int = 0
    checkpoint: Checkpoint | None = None

    @property
    def ok(self) -> bool:
        return self.problems_total == 0

    def add(
        self, account_id: str, sequence: int | None, code: str, detail: str, transfer_id: str | None = None
    ) -> None:
        self.problems_total += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(AuditProblem(account_id, sequence, code, detail, transfer_id))


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


async def verify(
    engine: AsyncEngine,
    keyring: Keyring,
    account_id: str | None = None,
    checkpoint: Checkpoint | None = None,
    progress: Progress | None = None,
    checkpoint_error: str | None = None,
) -> AuditReport:
    """Verify the whole ledger (or one account and its transfers) in one snapshot, against
    `checkpoint` when there is one. `checkpoint_error` reports a checkpoint that could not
    be trusted."""
    report = AuditReport(checkpoint=checkpoint)
    if checkpoint_error is not None:
        report.add(account_id or "", None, "checkpoint_invalid", checkpoint_error)
    async with engine.connect() as connection:
        await _snapshot(connection)
        total = (await connection.execute(COUNT_ACCOUNTS, {"only": account_id})).scalar_one()
        if account_id is not None and total == 0:
            if checkpoint is not None and account_id in checkpoint.heads:
                report.add(account_id, None, "account_missing", "the account is in the last checkpoint, not here")
                return report
            raise AccountNotFound(f"no account with id {account_id!r}")
        walk = _Walk(keyring, report, checkpoint)
        await walk.accounts(connection, account_id, total, progress)
        await walk.transfers(connection, account_id)
        if account_id is None:
            await walk.whole_ledger(connection)
        await connection.rollback()
    return report


class _Walk:
    def __init__(self, keyring: Keyring, report: AuditReport, checkpoint: Checkpoint | None) -> None:
        self.keyring = keyring
        self.report = report
        self.checkpoint = checkpoint
        self.heads = checkpoint.heads if checkpoint is not None else {}
        self.seen_accounts: set[str] = set()
        self.entries_of_transfers = 0

    async def accounts(
        self, connection: AsyncConnection, only: str | None, total: int, progress: Progress | None
    ) -> None:
        after = ""
        while True:
            params = {"after": after, "only": only, "limit": ACCOUNT_PAGE}
            accounts = (await connection.execute(ACCOUNTS, params)).mappings().all()
            if not accounts:
                return
            pending = {
                row["id"]: row
                for row in (await connection.execute(PENDING, {"ids": [a["id"] for a in accounts]})).mappings()
            }
            for account in accounts:
                await self.account(connection, account, pending[account["id"]])
                self.report.accounts_checked += 1
                if progress is not None:
                    progress(self.report.accounts_checked, total, self.report.entries_checked)
            after = accounts[-1]["id"]

    async def account(self, connection: AsyncConnection, account: Any, pending: Any) -> None:
        report = self.report
        account_id = account["id"]
        self.seen_accounts.add(account_id)
        fields = SimpleNamespace(
            **{k: account[k] for k in ("id", "currency", "name", "allow_negative_balance", "metadata")},
            **{k: account[k] for k in CONTROLS},
        )
        self._seal(
            account_id, None, "account", account["seal_key"], account["seal"], lambda k: account_message(k, fields)
        )
        overdraft_limits = await self.changes(connection, account)
        pinned_count, pinned_hash = self.heads.get(account_id, (0, None))
        may_go_negative = account["allow_negative_balance"]
        # The journal's balances never went below the largest overdraft the account ever
        # had (the limit in force at each entry is not kept; this bound is).
        floor = -max(overdraft_limits)
        expected_sequence, running = 1, 0
        previous_hash: bytes | None = None
        previous_time: datetime | None = None
        last_sequence = 0
        after = 0
        while True:
            params = {"account": account_id, "after": after, "limit": ENTRY_PAGE}
            entries = (await connection.execute(ENTRIES, params)).all()
            if not entries:
                break
            for entry in entries:
                sequence = entry.sequence
                if sequence != expected_sequence:
                    report.add(
                        account_id, sequence, "sequence_gap", f"expected sequence {expected_sequence}, found {sequence}"
                    )
                running += entry.amount
                if entry.balance_after != running:
                    report.add(
                        account_id, sequence, "balance_after_mismatch",
                        f"balance_after is {entry.balance_after}, the amounts sum to {running}",
                    )  # fmt: skip
                    running = entry.balance_after  # report the next problem, not this one again
                if not may_go_negative and entry.balance_after < floor:
                    report.add(
                        account_id, sequence, "negative_balance",
                        "the account may not go negative (beyond its overdraft limit), and it did",
                    )  # fmt: skip
                self._entry_link(account_id, entry, previous_hash, sequence <= pinned_count)
                if sequence == pinned_count and bytes(entry.hash) != pinned_hash:
                    report.add(
                        account_id, sequence, "checkpoint_mismatch", "this entry is not the one the checkpoint pinned"
                    )
                if previous_time is not None and entry.created_at < previous_time:
                    report.add(account_id, sequence, "time_out_of_order", "the entry is earlier than the one before it")
                previous_hash, previous_time = bytes(entry.hash), entry.created_at
                expected_sequence = sequence + 1
                last_sequence = sequence
                report.entries_checked += 1
                if report.entries_checked % YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # let other requests run between slices of hashing
            after = entries[-1].sequence

        if last_sequence < pinned_count:
            report.add(
                account_id, None, "journal_truncated",
                f"the journal ends at {last_sequence}, the last checkpoint saw {pinned_count} entries",
            )  # fmt: skip
        if account["entries_count"] != last_sequence:
            report.add(
                account_id, None, "entries_count_mismatch",
                f"the account counts {account['entries_count']} entries, the journal ends at {last_sequence}",
            )  # fmt: skip
        if (bytes(account["last_entry_hash"]) if account["last_entry_hash"] else None) != previous_hash:
            report.add(account_id, None, "last_hash_mismatch", "the account's last hash is not its last entry's")
        posted = account["credits_posted"] - account["debits_posted"]
        if posted != running:
            report.add(
                account_id, None, "balance_mismatch", f"the account says {posted}, its journal sums to {running}"
            )
        if (account["pending_debits"], account["pending_credits"]) != (pending["debits"], pending["credits"]):
            report.add(
                account_id, None, "pending_mismatch",
                f"pending {account['pending_debits']}/{account['pending_credits']}, "
                f"its pending transfers {pending['debits']}/{pending['credits']}",
            )  # fmt: skip

    async def changes(self, connection: AsyncConnection, account: Any) -> set[int]:
        """Check the account's history of changes: numbered from 0 (its opening; accounts
        opened before revision 0008 start at 1) without gaps, each link of the keyed hash
        chain valid, each change's `before` what the history said last, and the history's
        last word on each field what the account row holds. Return every overdraft limit
        the account has had (0 for none)."""
        report, account_id = self.report, account["id"]
        rows = (await connection.execute(CHANGES, {"account": account_id})).all()
        known: dict[str, Any] = {}
        previous: bytes | None = None
        expected = 0 if rows and rows[0].sequence == 0 else 1
        limits = {account["overdraft_limit"] or 0}
        for row in rows:
            sequence = row.sequence
            if sequence != expected:
                report.add(account_id, None, "change_sequence_gap", f"expected change {expected}, found {sequence}")
            key = self.keyring.get(row.key_id)
            if key is None or not hmac.compare_digest(
                change_hash(
                    key, previous, account_id, sequence, row.changed_at, row.changed_by, row.before, row.after,
                    row.state,
                ),
                bytes(row.hash),
            ):  # fmt: skip
                report.add(
                    account_id, None, "change_hash_mismatch",
                    f"change {sequence} does not match its content and its predecessor under key {row.key_id!r}",
                )  # fmt: skip
            for name, value in row.before.items():
                if name in known and known[name] != value:
                    report.add(
                        account_id, None, "change_history_mismatch",
                        f"change {sequence} says {name} was {value!r}, the change before set {known[name]!r}",
                    )  # fmt: skip
            for side in (row.before, row.after):
                if side.get("overdraft_limit") is not None:
                    limits.add(side["overdraft_limit"])
            known.update(row.after)
            previous, expected = bytes(row.hash), sequence + 1
        for name, value in known.items():
            if name in (*CONTROLS, "name", "metadata") and account[name] != value:
                report.add(
                    account_id, None, "change_history_mismatch",
                    f"the account's {name} is {account[name]!r}, its history of changes says {value!r}",
                )  # fmt: skip
        return limits

    def _entry_link(self, account_id: str, entry: Any, previous_hash: bytes | None, pinned: bool) -> None:
        """Check the entry's hash under the key it names. Entries beyond the last
        checkpoint's head must be under a live key: the legacy chain and revoked keys are
        only vouched for by a checkpoint."""
        report, sequence = self.report, entry.sequence
        key_id = entry.key_id
        if key_id == LEGACY_KEY_ID:
            key = None
            if not pinned:
                report.add(
                    account_id, sequence, "unpinned_legacy_entry",
                    "an entry of the unkeyed chain that no checkpoint vouches for (run `ledger audit reseal`)",
                )  # fmt: skip
        else:
            key = self.keyring.get(key_id)
            if key is None:
                report.add(
                    account_id, sequence, "unknown_chain_key", f"hashed with chain key {key_id!r}, not in the keyring"
                )
                return
            if key.revoked and not pinned:
                report.add(account_id, sequence, "revoked_chain_key", f"hashed with the revoked chain key {key_id!r}")
        recomputed = entry_hash(
            key, previous_hash, account_id, sequence, entry.transfer_id, entry.amount, entry.balance_after,
            entry.created_at,
        )  # fmt: skip
        if recomputed != bytes(entry.hash):
            report.add(account_id, sequence, "hash_mismatch", "the hash does not match the entry and its predecessor")

    def _seal(
        self, account_id: str, transfer_id: str | None, kind: str, key_id: str | None, stored: Any, message: Any
    ) -> None:
        if stored is None:
            self.report.add(account_id, None, f"unsealed_{kind}", f"the {kind} has no seal", transfer_id)
        elif not seal_is_valid(self.keyring, key_id, bytes(stored), message):
            self.report.add(
                account_id, None, f"{kind}_seal_mismatch",
                f"the {kind}'s seal does not match its fields under chain key {key_id!r}", transfer_id,
            )  # fmt: skip
        elif not self.keyring.is_live(key_id):
            self.report.add(
                account_id, None, "revoked_chain_key", f"the {kind} is sealed with the revoked key {key_id!r}",
                transfer_id,
            )  # fmt: skip

    async def transfers(self, connection: AsyncConnection, only: str | None) -> None:
        if only is None:
            after = ""
            while True:
                rows = (await connection.execute(TRANSFERS, {"after": after, "limit": TRANSFER_PAGE})).all()
                if not rows:
                    return
                await self._check_transfers(rows, None)
                after = rows[-1].id
        for statement in ACCOUNT_TRANSFERS.values():
            after_time, after_id = EPOCH_START, ""
            while True:
                params = {"account": only, "after_time": after_time, "after_id": after_id, "limit": TRANSFER_PAGE}
                rows = (await connection.execute(statement, params)).all()
                if not rows:
                    break
                await self._check_transfers(rows, only)
                after_time, after_id = rows[-1].created_at, rows[-1].id

    async def _check_transfers(self, rows: list[Any], account_id: str | None) -> None:
        for number, row in enumerate(rows, 1):
            self.transfer(row, account_id)
            if number % YIELD_EVERY == 0:
                await asyncio.sleep(0)
        await asyncio.sleep(0)

    def transfer(self, row: Any, account_id: str | None = None) -> None:
        """Check a transfer row; its problems are reported under `account_id` (the account
        verified) or its debit account."""
        report = self.report
        record = TransferRecord.from_row(row._mapping)
        where = account_id or record.debit_account_id
        report.transfers_checked += 1
        self._seal(where, record.id, "transfer", row.seal_key, row.seal, lambda k: transfer_message(k, record))
        entries = sorted(zip(row.entry_accounts, row.entry_amounts, strict=True))
        self.entries_of_transfers += len(entries)
        if record.status == "posted":
            posted = record.posted_amount if record.pending else record.amount
            expected = sorted([(record.debit_account_id, -(posted or 0)), (record.credit_account_id, posted or 0)])
            if entries != expected:
                report.add(
                    where, None, "transfer_entries_mismatch",
                    f"posted {posted} from {record.debit_account_id!r} to {record.credit_account_id!r}; "
                    f"the journal has {entries}", record.id,
                )  # fmt: skip
        elif entries:
            report.add(
                where, None, "transfer_entries_mismatch",
                f"a {record.status} transfer has journal entries: {entries}", record.id,
            )  # fmt: skip
        if record.status != "rejected" and not (record.currency == row.debit_currency == row.credit_currency):
            report.add(
                where, None, "currency_mismatch",
                f"the transfer is in {record.currency}, its accounts in {row.debit_currency} and {row.credit_currency}",
                record.id,
            )  # fmt: skip
        if record.reversed_amount != row.reversed_total:
            report.add(
                where, None, "reversed_amount_mismatch",
                f"reversed_amount is {record.reversed_amount}, its posted reversals sum to {row.reversed_total}",
                record.id,
            )  # fmt: skip
        if record.reversal_of is not None and not (
            row.original_found
            and (record.debit_account_id, record.credit_account_id) == (row.original_credit, row.original_debit)
        ):
            report.add(
                where, None, "reversal_mismatch",
                f"not the opposite direction of transfer {record.reversal_of!r}", record.id,
            )  # fmt: skip

    async def whole_ledger(self, connection: AsyncConnection) -> None:
        report = self.report
        total_entries = (await connection.execute(COUNT_ENTRIES)).scalar_one()
        if total_entries != self.entries_of_transfers:
            for row in (await connection.execute(ORPHAN_ENTRIES)).all():
                report.add(
                    row.account_id, row.sequence, "entry_without_transfer",
                    f"the entry names transfer {row.transfer_id!r}, which does not exist", row.transfer_id,
                )  # fmt: skip
        checkpoint = self.checkpoint
        if checkpoint is None:
            return
        for account_id in sorted(set(checkpoint.heads) - self.seen_accounts):
            report.add(account_id, None, "account_missing", "the account is in the last checkpoint, not here")
        total, settled = await transfer_counts(connection, checkpoint.cutoff)
        cutoff = checkpoint.cutoff.isoformat()
        if total != checkpoint.transfers:
            report.add(
                "", None, "transfers_missing",
                f"{total} transfers created up to {cutoff}; the last checkpoint counted {checkpoint.transfers}",
            )  # fmt: skip
        if settled != checkpoint.settled:
            report.add(
                "", None, "settled_transfers_changed",
                f"{settled} transfers voided or expired up to {cutoff}; the last checkpoint counted {checkpoint.settled}",
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


STATEMENT_PAGE = 1000
# Each entry with its transfer's other account and description (not part of the hashed
# entry), one primary-key lookup per row; an outer join, so the statement stays whole
# even if a transfer row were missing (verification reports entry_without_transfer).
STATEMENT = text(
    """
    SELECT e.sequence, e.transfer_id, e.amount, e.balance_after, e.created_at, e.hash, e.key_id,
           CASE WHEN e.amount > 0 THEN t.debit_account_id ELSE t.credit_account_id END AS counterparty_account_id,
           t.description
    FROM entries e LEFT JOIN transfers t ON t.id = e.transfer_id
    WHERE e.account_id = :account AND e.sequence > :after AND e.sequence <= :last
      AND (CAST(:start AS timestamptz) IS NULL OR e.created_at >= :start)
      AND (CAST(:end AS timestamptz) IS NULL OR e.created_at <= :end)
    ORDER BY e.sequence LIMIT :limit
    """
)
ACCOUNT_HEAD = text("SELECT entries_count FROM accounts WHERE id = :account")


async def statement_pages(
    engine: AsyncEngine, account_id: str, start: datetime | None, end: datetime | None
) -> AsyncIterator[list]:  # the awaited result is the iterator
    """An account's statement up to its last entry when the export starts, page by page.

    The journal is append-only and numbered, so pages read in separate short transactions
    up to that entry form one consistent statement: no snapshot, and no connection, is
    held while the client reads. The account's existence is checked before the caller
    starts streaming, so a missing account is a 404, not a broken stream. Memory holds
    one page at a time."""
    async with engine.connect() as connection:
        last = (await connection.execute(ACCOUNT_HEAD, {"account": account_id})).scalar()
    if last is None:
        raise AccountNotFound(f"no account with id {account_id!r}")

    async def pages() -> AsyncIterator[list]:
        after = 0
        while after < last:
            params = {"account": account_id, "after": after, "last": last, "start": start, "end": end}
            async with engine.connect() as connection:
                rows = (await connection.execute(STATEMENT, {**params, "limit": STATEMENT_PAGE})).all()
            if not rows:
                return
            yield rows
            after = rows[-1].sequence

    return pages()
