"""Every write of money, in one statement: new transfer rows, state changes of existing
ones, journal entries, account states and the events they make (`event_outbox`, read by
`ledger.service.events`), set-based, in one round trip.

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
                               expires_at, reversal_of, missing_account, imported_at, seal, seal_key)
        SELECT t.id, t.debit_account_id, t.credit_account_id, t.amount, t.currency, t.pending, t.status, t.code,
               t.description, t.metadata, t.request_hash, t.created_at, t.created_at, t.timeout_seconds,
               t.expires_at, t.reversal_of, t.missing_account, t.imported_at, t.seal, :seal_key
        FROM unnest(CAST(:t_ids AS text[]), CAST(:t_debit_account_ids AS text[]),
                    CAST(:t_credit_account_ids AS text[]), CAST(:t_amounts AS bigint[]),
                    CAST(:t_currencies AS text[]), CAST(:t_pendings AS boolean[]), CAST(:t_statuses AS text[]),
                    CAST(:t_codes AS text[]), CAST(:t_descriptions AS text[]), CAST(:t_metadata AS jsonb[]),
                    CAST(:t_request_hashes AS bytea[]), CAST(:t_created_ats AS timestamptz[]),
                    CAST(:t_timeouts AS integer[]), CAST(:t_expires_ats AS timestamptz[]),
                    CAST(:t_reversal_ofs AS text[]), CAST(:t_missing_accounts AS text[]),
                    CAST(:t_imported_ats AS timestamptz[]), CAST(:t_seals AS bytea[]))
             AS t(id, debit_account_id, credit_account_id, amount, currency, pending, status, code, description,
                  metadata, request_hash, created_at, timeout_seconds, expires_at, reversal_of, missing_account,
                  imported_at, seal)
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
    ), new_events AS (
        INSERT INTO event_outbox (type, transfer_id, account_id, other_account_id, created_at)
        SELECT v.type, v.transfer_id, v.account_id, v.other_account_id, v.created_at
        FROM unnest(CAST(:v_types AS text[]), CAST(:v_transfer_ids AS text[]), CAST(:v_account_ids AS text[]),
                    CAST(:v_other_account_ids AS text[]), CAST(:v_created_ats AS timestamptz[]))
             WITH ORDINALITY AS v(type, transfer_id, account_id, other_account_id, created_at, n)
        WHERE (SELECT ok FROM complete)
        ORDER BY v.n
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
    # The events of the write, in the order they happened: (type, transfer row after it).
    events: list[tuple[str, TransferRecord]] = field(default_factory=list)

    def new_transfer(self, record: TransferRecord) -> None:
        self.transfers.append(record)
        self.events.append((f"transfer.{record.status}", record))

    def change_transfer(self, record: TransferRecord, event: str | None) -> None:
        """`record` is the transfer's row as it will be after the change; `event` the
        event type it makes (None for a change that is not an event of its own, such as
        the reversed amount of a transfer, which its reversal's event tells)."""
        self.changes[record.id] = record
        if event is not None:
            self.events.append((event, record))

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


def write_parameters(writes: Writes, key: ChainKey) -> dict[str, Any]:
    """WRITE's parameters: transfer rows sealed with `key`, the key that also hashed the
    entries (every entry of a transaction uses the active key)."""
    if any(entry.key_id != key.id for entry in writes.entries):
        raise AssertionError("entries were hashed with another key than the one writing them")
    new = writes.transfers
    changes = list(writes.changes.values())
    accounts = list(writes.accounts.values())
    return {
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
        "t_missing_accounts": [t.missing_account for t in new],
        "t_imported_ats": [t.imported_at for t in new],
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
        "v_types": [event for event, _ in writes.events],
        "v_transfer_ids": [t.id for _, t in writes.events],
        "v_account_ids": [t.debit_account_id for _, t in writes.events],
        "v_other_account_ids": [t.credit_account_id for _, t in writes.events],
        "v_created_ats": [t.updated_at for _, t in writes.events],
    }


async def write(session: Executor, writes: Writes, key: ChainKey) -> None:
    """Write everything in one statement through SQLAlchemy (posts, voids, reversals,
    expiry); raises IdsClaimed when another request stored one of the new ids first."""
    if not writes:
        return
    inserted = set((await session.execute(WRITE, write_parameters(writes, key))).scalar_one())
    claimed = {t.id for t in writes.transfers} - inserted
    if claimed:
        raise IdsClaimed(claimed)
