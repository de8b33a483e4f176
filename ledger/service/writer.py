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

from ledger.domain import EntryPlan, LockedAccount, TransferPlan
from ledger.integrity import ChainKey, seal, transfer_message
from ledger.service.records import TransferRecord
from ledger.service.unit_of_work import Executor

WRITE = text(
    """
    WITH new_transfers AS (
        INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, currency, pending, status, code,
                               description, metadata, request_hash, created_at, updated_at, timeout_seconds,
                               expires_at, reversal_of, seal, seal_key)
        SELECT t.id, t.debit_account_id, t.credit_account_id, t.amount, t.currency, t.pending, t.status, t.code,
               t.description, t.metadata, t.request_hash, t.created_at, t.created_at, t.timeout_seconds,
               t.expires_at, t.reversal_of, t.seal, :seal_key
        FROM unnest(CAST(:t_ids AS text[]), CAST(:t_debit_account_ids AS text[]),
                    CAST(:t_credit_account_ids AS text[]), CAST(:t_amounts AS bigint[]),
                    CAST(:t_currencies AS text[]), CAST(:t_pendings AS boolean[]), CAST(:t_statuses AS text[]),
                    CAST(:t_codes AS text[]), CAST(:t_descriptions AS text[]), CAST(:t_metadata AS jsonb[]),
                    CAST(:t_request_hashes AS bytea[]), CAST(:t_created_ats AS timestamptz[]),
                    CAST(:t_timeouts AS integer[]), CAST(:t_expires_ats AS timestamptz[]),
                    CAST(:t_reversal_ofs AS text[]), CAST(:t_seals AS bytea[]))
             AS t(id, debit_account_id, credit_account_id, amount, currency, pending, status, code, description,
                  metadata, request_hash, created_at, timeout_seconds, expires_at, reversal_of, seal)
        ON CONFLICT (id) DO NOTHING
        RETURNING id
    ), complete AS (
        SELECT count(*) = :expected AS ok FROM new_transfers
    ), changed_transfers AS (
        UPDATE transfers
        SET status = u.status, posted_amount = u.posted_amount, reversed_amount = u.reversed_amount,
            updated_at = u.updated_at, seal = u.seal, seal_key = :seal_key
        FROM unnest(CAST(:c_ids AS text[]), CAST(:c_statuses AS text[]), CAST(:c_posted_amounts AS bigint[]),
                    CAST(:c_reversed_amounts AS bigint[]), CAST(:c_updated_ats AS timestamptz[]),
                    CAST(:c_seals AS bytea[]))
             AS u(id, status, posted_amount, reversed_amount, updated_at, seal)
        WHERE transfers.id = u.id AND (SELECT ok FROM complete)
    ), new_entries AS (
        INSERT INTO entries (account_id, sequence, transfer_id, amount, balance_after, created_at, hash, key_id)
        SELECT *, :seal_key FROM unnest(CAST(:e_account_ids AS text[]), CAST(:e_sequences AS bigint[]),
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
    """What one unit of work will write, gathered while deciding: transfer rows as they
    will be stored (new ones, and existing ones after their change), journal entries and
    account states. The transfer rows are sealed when written (`write`)."""

    transfers: list[TransferRecord] = field(default_factory=list)
    changes: dict[str, TransferRecord] = field(default_factory=dict)
    entries: list[EntryPlan] = field(default_factory=list)
    entry_transfers: list[tuple[str, datetime]] = field(default_factory=list)
    accounts: dict[str, LockedAccount] = field(default_factory=dict)

    def new_transfer(self, record: TransferRecord) -> None:
        self.transfers.append(record)

    def change_transfer(self, record: TransferRecord) -> None:
        """`record` is the transfer's row as it will be after the change."""
        self.changes[record.id] = record

    def plan(self, transfer_id: str, plan: TransferPlan) -> None:
        for entry in plan.entries:
            self.entries.append(entry)
            self.entry_transfers.append((transfer_id, plan.created_at))
        for account in plan.accounts:
            self.account(account)

    def account(self, account: LockedAccount) -> None:
        self.accounts[account.id] = account

    def __bool__(self) -> bool:
        return bool(self.transfers or self.changes or self.entries or self.accounts)


def _columns(rows: list[dict[str, Any]], prefix: str, keys: list[str], names: list[str]) -> dict[str, list[Any]]:
    return {f"{prefix}_{name}": [row[key] for row in rows] for key, name in zip(keys, names, strict=True)}


def transfer_seal(key: ChainKey, record: TransferRecord) -> bytes:
    return seal(key, transfer_message(key.id, record))


async def write(session: Executor, writes: Writes, key: ChainKey) -> None:
    """Write everything in one statement; transfer rows are sealed with `key`, the key
    that also hashed the entries (every entry of a transaction uses the active key)."""
    if not writes:
        return
    if any(entry.key_id != key.id for entry in writes.entries):
        raise AssertionError("entries were hashed with another key than the one writing them")
    new = writes.transfers
    changes = list(writes.changes.values())
    accounts = list(writes.accounts.values())
    parameters: dict[str, Any] = {
        "expected": len(new),
        "seal_key": key.id,
        "t_ids": [t.id for t in new],
        "t_debit_account_ids": [t.debit_account_id for t in new],
        "t_credit_account_ids": [t.credit_account_id for t in new],
        "t_amounts": [t.amount for t in new],
        "t_currencies": [t.currency for t in new],
        "t_pendings": [t.pending for t in new],
        "t_statuses": [t.status for t in new],
        "t_codes": [t.code for t in new],
        "t_descriptions": [t.description for t in new],
        "t_metadata": [json.dumps(t.metadata) for t in new],
        "t_request_hashes": [t.request_hash for t in new],
        "t_created_ats": [t.created_at for t in new],
        "t_timeouts": [t.timeout_seconds for t in new],
        "t_expires_ats": [t.expires_at for t in new],
        "t_reversal_ofs": [t.reversal_of for t in new],
        "t_seals": [transfer_seal(key, t) for t in new],
        "c_ids": [c.id for c in changes],
        "c_statuses": [c.status for c in changes],
        "c_posted_amounts": [c.posted_amount for c in changes],
        "c_reversed_amounts": [c.reversed_amount for c in changes],
        "c_updated_ats": [c.updated_at for c in changes],
        "c_seals": [transfer_seal(key, c) for c in changes],
        "e_account_ids": [e.account_id for e in writes.entries],
        "e_sequences": [e.sequence for e in writes.entries],
        "e_transfer_ids": [transfer_id for transfer_id, _ in writes.entry_transfers],
        "e_amounts": [e.amount for e in writes.entries],
        "e_balances": [e.balance_after for e in writes.entries],
        "e_created_ats": [created_at for _, created_at in writes.entry_transfers],
        "e_hashes": [e.hash for e in writes.entries],
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
    claimed = {t.id for t in new} - inserted
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
                           description, metadata, request_hash, created_at, updated_at, timeout_seconds, expires_at,
                           seal, seal_key)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10, $11, $11, $12, $13, $40, $41)
    ON CONFLICT (id) DO NOTHING
    RETURNING id
), new_entries AS (
    INSERT INTO entries (account_id, sequence, transfer_id, amount, balance_after, created_at, hash, key_id)
    SELECT e.account_id, e.sequence, $1, e.amount, e.balance_after, $11, e.hash, $41
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


def write_one_arguments(record: TransferRecord, plan: TransferPlan, key: ChainKey) -> list[Any]:
    """WRITE_ONE_SQL's parameters, in order, for the row `record` decided by `plan`."""
    arguments: list[Any] = [
        record.id, record.debit_account_id, record.credit_account_id, record.amount, record.currency,
        record.pending, record.status, record.description, json.dumps(record.metadata), record.request_hash,
        record.created_at, record.timeout_seconds, record.expires_at,
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
    arguments += [transfer_seal(key, record), key.id]
    return arguments
