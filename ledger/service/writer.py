"""Every write of money, in one statement: new transfer rows, state changes of existing
ones, journal entries and account states, set-based, in one round trip.

New transfer rows are inserted with ON CONFLICT DO NOTHING: when another request stored
one of the ids first, nothing else of the statement takes effect (every other part is
conditioned on all rows having been inserted) and `IdsClaimed` says which ids were
taken, so the caller can roll back to its savepoint and answer with their outcome.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import text

from ledger.domain import LockedAccount, TransferPlan, TransferRequest
from ledger.service.unit_of_work import Executor

WRITE = text(
    """
    WITH new_transfers AS (
        INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, currency, pending, status, code,
                               description, metadata, request_hash, created_at, updated_at, timeout_seconds,
                               expires_at, reversal_of)
        SELECT t.id, t.debit_account_id, t.credit_account_id, t.amount, t.currency, t.pending, t.status, t.code,
               t.description, t.metadata, t.request_hash, t.created_at, t.created_at, t.timeout_seconds,
               t.expires_at, t.reversal_of
        FROM unnest(CAST(:t_ids AS text[]), CAST(:t_debit_account_ids AS text[]),
                    CAST(:t_credit_account_ids AS text[]), CAST(:t_amounts AS bigint[]),
                    CAST(:t_currencies AS text[]), CAST(:t_pendings AS boolean[]), CAST(:t_statuses AS text[]),
                    CAST(:t_codes AS text[]), CAST(:t_descriptions AS text[]), CAST(:t_metadata AS jsonb[]),
                    CAST(:t_request_hashes AS bytea[]), CAST(:t_created_ats AS timestamptz[]),
                    CAST(:t_timeouts AS integer[]), CAST(:t_expires_ats AS timestamptz[]),
                    CAST(:t_reversal_ofs AS text[]))
             AS t(id, debit_account_id, credit_account_id, amount, currency, pending, status, code, description,
                  metadata, request_hash, created_at, timeout_seconds, expires_at, reversal_of)
        ON CONFLICT (id) DO NOTHING
        RETURNING id
    ), complete AS (
        SELECT count(*) = :expected AS ok FROM new_transfers
    ), changed_transfers AS (
        UPDATE transfers
        SET status = u.status, posted_amount = u.posted_amount, reversed_amount = u.reversed_amount,
            updated_at = u.updated_at
        FROM unnest(CAST(:c_ids AS text[]), CAST(:c_statuses AS text[]), CAST(:c_posted_amounts AS bigint[]),
                    CAST(:c_reversed_amounts AS bigint[]), CAST(:c_updated_ats AS timestamptz[]))
             AS u(id, status, posted_amount, reversed_amount, updated_at)
        WHERE transfers.id = u.id AND (SELECT ok FROM complete)
    ), new_entries AS (
        INSERT INTO entries (account_id, sequence, transfer_id, amount, balance_after, created_at, hash)
        SELECT * FROM unnest(CAST(:e_account_ids AS text[]), CAST(:e_sequences AS bigint[]),
                             CAST(:e_transfer_ids AS text[]), CAST(:e_amounts AS bigint[]),
                             CAST(:e_balances AS bigint[]), CAST(:e_created_ats AS timestamptz[]),
                             CAST(:e_hashes AS bytea[]))
        WHERE (SELECT ok FROM complete)
    ), changed_accounts AS (
        UPDATE accounts
        SET debits_posted = a.debits_posted, credits_posted = a.credits_posted,
            pending_debits = a.pending_debits, pending_credits = a.pending_credits,
            entries_count = a.entries_count, last_entry_hash = a.last_entry_hash, last_entry_at = a.last_entry_at
        FROM unnest(CAST(:a_ids AS text[]), CAST(:a_debits_posted AS bigint[]), CAST(:a_credits_posted AS bigint[]),
                    CAST(:a_pending_debits AS bigint[]), CAST(:a_pending_credits AS bigint[]),
                    CAST(:a_entries_counts AS bigint[]), CAST(:a_last_entry_hashes AS bytea[]),
                    CAST(:a_last_entry_ats AS timestamptz[]))
             AS a(id, debits_posted, credits_posted, pending_debits, pending_credits, entries_count,
                  last_entry_hash, last_entry_at)
        WHERE accounts.id = a.id AND (SELECT ok FROM complete)
    )
    SELECT COALESCE(array_agg(id), '{}') FROM new_transfers
    """
)


class IdsClaimed(Exception):
    """Ids another request stored first; nothing of the write took effect."""

    def __init__(self, ids: set[str]) -> None:
        super().__init__(f"{len(ids)} transfer ids were claimed concurrently")
        self.ids = ids


@dataclass
class Writes:
    """What one unit of work will write, gathered while deciding."""

    transfers: list[dict[str, Any]] = field(default_factory=list)
    changes: dict[str, dict[str, Any]] = field(default_factory=dict)
    entries: list[tuple[Any, ...]] = field(default_factory=list)
    accounts: dict[str, LockedAccount] = field(default_factory=dict)

    def new_transfer(
        self,
        request: TransferRequest,
        *,
        status: str,
        code: str | None,
        currency: str | None,
        created_at: datetime,
        expires_at: datetime | None = None,
        reversal_of: str | None = None,
        request_hash: bytes | None = None,
    ) -> None:
        self.transfers.append(
            {
                "id": request.id,
                "debit_account_id": request.debit_account_id,
                "credit_account_id": request.credit_account_id,
                "amount": request.amount,
                "currency": currency,
                "pending": request.pending,
                "status": status,
                "code": code,
                "description": request.description,
                "metadata": json.dumps(request.metadata or {}),
                "request_hash": request_hash or request.fingerprint(),
                "created_at": created_at,
                "timeout_seconds": request.timeout_seconds if request.pending else None,
                "expires_at": expires_at,
                "reversal_of": reversal_of,
            }
        )

    def change_transfer(
        self, transfer_id: str, *, status: str, posted_amount: int | None, reversed_amount: int, updated_at: datetime
    ) -> None:
        self.changes[transfer_id] = {
            "id": transfer_id,
            "status": status,
            "posted_amount": posted_amount,
            "reversed_amount": reversed_amount,
            "updated_at": updated_at,
        }

    def plan(self, transfer_id: str, plan: TransferPlan) -> None:
        for entry in plan.entries:
            self.entries.append(
                (
                    entry.account_id,
                    entry.sequence,
                    transfer_id,
                    entry.amount,
                    entry.balance_after,
                    plan.created_at,
                    entry.hash,
                )
            )
        for account in plan.accounts:
            self.account(account)

    def account(self, account: LockedAccount) -> None:
        self.accounts[account.id] = account

    def __bool__(self) -> bool:
        return bool(self.transfers or self.changes or self.entries or self.accounts)


def _columns(rows: list[dict[str, Any]], prefix: str, keys: list[str], names: list[str]) -> dict[str, list[Any]]:
    return {f"{prefix}_{name}": [row[key] for row in rows] for key, name in zip(keys, names, strict=True)}


async def write(session: Executor, writes: Writes) -> None:
    if not writes:
        return
    transfer_keys = [
        "id", "debit_account_id", "credit_account_id", "amount", "currency", "pending", "status", "code",
        "description", "metadata", "request_hash", "created_at", "timeout_seconds", "expires_at", "reversal_of",
    ]  # fmt: skip
    transfer_names = [
        "ids", "debit_account_ids", "credit_account_ids", "amounts", "currencies", "pendings", "statuses", "codes",
        "descriptions", "metadata", "request_hashes", "created_ats", "timeouts", "expires_ats", "reversal_ofs",
    ]  # fmt: skip
    changes = list(writes.changes.values())
    accounts = list(writes.accounts.values())
    parameters: dict[str, Any] = {
        "expected": len(writes.transfers),
        **_columns(writes.transfers, "t", transfer_keys, transfer_names),
        **_columns(
            changes,
            "c",
            ["id", "status", "posted_amount", "reversed_amount", "updated_at"],
            ["ids", "statuses", "posted_amounts", "reversed_amounts", "updated_ats"],
        ),
        "e_account_ids": [e[0] for e in writes.entries],
        "e_sequences": [e[1] for e in writes.entries],
        "e_transfer_ids": [e[2] for e in writes.entries],
        "e_amounts": [e[3] for e in writes.entries],
        "e_balances": [e[4] for e in writes.entries],
        "e_created_ats": [e[5] for e in writes.entries],
        "e_hashes": [e[6] for e in writes.entries],
        "a_ids": [a.id for a in accounts],
        "a_debits_posted": [a.debits_posted for a in accounts],
        "a_credits_posted": [a.credits_posted for a in accounts],
        "a_pending_debits": [a.pending_debits for a in accounts],
        "a_pending_credits": [a.pending_credits for a in accounts],
        "a_entries_counts": [a.entries_count for a in accounts],
        "a_last_entry_hashes": [a.last_entry_hash for a in accounts],
        "a_last_entry_ats": [a.last_entry_at for a in accounts],
    }
    inserted = set((await session.execute(WRITE, parameters)).scalar_one())
    claimed = {row["id"] for row in writes.transfers} - inserted
    if claimed:
        raise IdsClaimed(claimed)


# The hot path's write (`TransferService.create`): one new transfer, its two journal
# entries (none for a reservation: pass NULL account ids) and both accounts, with scalar
# parameters. The set-based WRITE binds some 40 arrays even for one transfer, and array
# encoding was a visible share of the service's CPU. Same rule as WRITE: when the id
# already exists nothing is written, and the count says so.
WRITE_ONE_SQL = """
WITH new_transfer AS (
    INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, currency, pending, status,
                           description, metadata, request_hash, created_at, updated_at, timeout_seconds, expires_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10, $11, $11, $12, $13)
    ON CONFLICT (id) DO NOTHING
    RETURNING id
), new_entries AS (
    INSERT INTO entries (account_id, sequence, transfer_id, amount, balance_after, created_at, hash)
    SELECT e.account_id, e.sequence, $1, e.amount, e.balance_after, $11, e.hash
    FROM (VALUES ($14::text, $15::bigint, $16::bigint, $17::bigint, $18::bytea),
                 ($19::text, $20::bigint, $21::bigint, $22::bigint, $23::bytea))
         AS e(account_id, sequence, amount, balance_after, hash)
    WHERE e.account_id IS NOT NULL AND EXISTS (SELECT FROM new_transfer)
), changed_accounts AS (
    UPDATE accounts
    SET debits_posted = a.debits_posted, credits_posted = a.credits_posted,
        pending_debits = a.pending_debits, pending_credits = a.pending_credits,
        entries_count = a.entries_count, last_entry_hash = a.last_entry_hash, last_entry_at = a.last_entry_at
    FROM (VALUES ($24::text, $25::bigint, $26::bigint, $27::bigint, $28::bigint, $29::bigint, $30::bytea,
                  $31::timestamptz),
                 ($32::text, $33::bigint, $34::bigint, $35::bigint, $36::bigint, $37::bigint, $38::bytea,
                  $39::timestamptz))
         AS a(id, debits_posted, credits_posted, pending_debits, pending_credits, entries_count, last_entry_hash,
              last_entry_at)
    WHERE accounts.id = a.id AND EXISTS (SELECT FROM new_transfer)
)
SELECT count(*) FROM new_transfer
"""


def write_one_arguments(request: TransferRequest, plan: TransferPlan, fingerprint: bytes) -> list[Any]:
    """WRITE_ONE_SQL's parameters, in order."""
    arguments: list[Any] = [
        request.id, request.debit_account_id, request.credit_account_id, request.amount, plan.currency,
        request.pending, plan.status, request.description, json.dumps(request.metadata or {}), fingerprint,
        plan.created_at, request.timeout_seconds if request.pending else None, plan.expires_at,
    ]  # fmt: skip
    if len(plan.entries) not in (0, 2) or len(plan.accounts) != 2:
        raise AssertionError("a single transfer writes two entries or none, and two accounts")
    entries = plan.entries or (None, None)
    for entry in entries:
        if entry is None:
            arguments += [None, None, None, None, None]
        else:
            arguments += [entry.account_id, entry.sequence, entry.amount, entry.balance_after, entry.hash]
    for account in plan.accounts:
        arguments += [
            account.id, account.debits_posted, account.credits_posted, account.pending_debits,
            account.pending_credits, account.entries_count, account.last_entry_hash, account.last_entry_at,
        ]  # fmt: skip
    return arguments
