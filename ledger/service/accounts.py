"""Opening accounts idempotently by id, changing their controls, and their history.

Every account's mutable fields (`name`, `metadata`, `status`, `overdraft_limit`,
`max_balance`) are kept, change by change, in `account_changes`: row 0 is the account as
opened, each later row one `PATCH` (only the fields it changed, before and after, when,
by which key), numbered without gaps and chained by a keyed hash like the journal, so
verification can fold the history and compare it with the account row
(`ledger.service.audit`). A change is made under the account's row lock, the same lock
every transfer of the account takes, so a transfer is decided either wholly before a
change (old limits, old status) or wholly after it.

Each change is an event too (`account.created`, `account.changed`), written in the same
transaction, rendered from the history row's `state` (the account right after it).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import datetime
from types import SimpleNamespace
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.dialects.postgresql import insert

from ledger.domain import LockedAccount
from ledger.errors import (
    AccountAlreadyClosed,
    AccountExistsWithDifferentFields,
    AccountNotEmpty,
    AccountNotFound,
    BalanceOutsideLimits,
    InvalidRequest,
)
from ledger.integrity import ChainKey, account_message, change_hash, seal
from ledger.models import Account
from ledger.service.expiry import release_due
from ledger.service.locking import lock_accounts
from ledger.service.pagination import decode_cursor, encode_cursor
from ledger.service.queries import ACCOUNT_COLUMNS, STORED_ACCOUNT_COLUMNS
from ledger.service.records import AccountOutcome, AccountRecord, Page
from ledger.service.unit_of_work import Executor, UnitOfWork
from ledger.service.writer import Writes, write

# The fields a PATCH may change, in the order the history lists them.
MUTABLE_FIELDS = ("status", "overdraft_limit", "max_balance", "name", "metadata")
STATUSES = ("open", "frozen", "closed")

ACCOUNT_EVENT = text(
    "INSERT INTO event_outbox (type, account_id, created_at, change_sequence) "
    "VALUES (:type, :id, :created_at, :sequence)"
)
INSERT_CHANGE = text(
    """
    INSERT INTO account_changes (account_id, sequence, changed_at, changed_by, before, after, state, hash, key_id)
    VALUES (:account_id, :sequence, :changed_at, :changed_by, CAST(:before AS jsonb), CAST(:after AS jsonb),
            CAST(:state AS jsonb), :hash, :key_id)
    """
)
LAST_CHANGE = text("SELECT sequence, hash FROM account_changes WHERE account_id = :id ORDER BY sequence DESC LIMIT 1")
CREATION = text("SELECT after FROM account_changes WHERE account_id = :id AND sequence = 0")
UPDATE_ACCOUNT = text(
    """
    UPDATE accounts SET status = :status, overdraft_limit = :overdraft_limit, max_balance = :max_balance,
                        name = :name, metadata = CAST(:metadata AS jsonb), seal = :seal, seal_key = :seal_key
    WHERE id = :id
    """
)
CHANGES = text(
    """
    SELECT account_id, sequence, changed_at, changed_by, before, after, hash FROM account_changes
    WHERE account_id = :id AND sequence > :after ORDER BY sequence LIMIT :limit
    """
)
ACCOUNT_EXISTS = text("SELECT 1 FROM accounts WHERE id = :id")


def new_account_id() -> str:
    # 128 random bits: unguessable and, in practice, never colliding.
    return "acc_" + secrets.token_hex(16)


@dataclass(frozen=True, slots=True)
class AccountChange:
    account_id: str
    sequence: int
    changed_at: datetime
    changed_by: str | None
    before: dict[str, Any]
    after: dict[str, Any]
    hash: bytes

    @property
    def fields(self) -> list[str]:
        return [field for field in MUTABLE_FIELDS if field in self.after or field in self.before]


def account_state(fields: dict[str, Any], account: LockedAccount | AccountRecord | None) -> dict[str, Any]:
    """The account right after a change: its mutable fields and its balances."""
    return {
        **{field: fields[field] for field in MUTABLE_FIELDS},
        "debits_posted": account.debits_posted if account else 0,
        "credits_posted": account.credits_posted if account else 0,
        "pending_debits": account.pending_debits if account else 0,
        "pending_credits": account.pending_credits if account else 0,
        "entries_count": account.entries_count if account else 0,
    }


def check_limits(account: LockedAccount, overdraft_limit: int | None, max_balance: int | None) -> None:
    """Limits apply from now on, to an account that already respects them: a limit the
    present balance breaks is refused (lower it after the balance has come back), so the
    database's CHECKs hold at every moment and no transfer is ever judged against a bound
    the account was already past."""
    floor = None if account.allow_negative_balance else -(overdraft_limit or 0)
    if floor is not None and account.available < floor:
        raise BalanceOutsideLimits(
            f"account {account.id!r} has {account.available} available, below -{overdraft_limit or 0}"
        )
    if max_balance is not None and account.posted + account.pending_credits > max_balance:
        raise BalanceOutsideLimits(
            f"account {account.id!r} holds {account.posted} posted and {account.pending_credits} pending credits, "
            f"more than {max_balance}"
        )


class AccountService:
    def __init__(self, unit_of_work: UnitOfWork, key: ChainKey) -> None:
        self._unit_of_work = unit_of_work
        self._key = key

    async def open(
        self,
        *,
        currency: str,
        account_id: str | None = None,
        name: str | None = None,
        allow_negative_balance: bool = False,
        metadata: dict[str, str] | None = None,
        overdraft_limit: int | None = None,
        max_balance: int | None = None,
        changed_by: str | None = None,
    ) -> AccountOutcome:
        """Open an account; the same id with the same fields returns the stored one."""
        fields = {
            "id": account_id or new_account_id(),
            "currency": currency,
            "name": name,
            "allow_negative_balance": allow_negative_balance,
            "metadata": metadata or {},
            "overdraft_limit": overdraft_limit,
            "max_balance": max_balance,
        }
        sealed = {
            "seal": seal(self._key, account_message(self._key.id, SimpleNamespace(**fields, status="open"))),
            "seal_key": self._key.id,
        }

        async def work(session: Executor) -> AccountOutcome:
            # ON CONFLICT DO NOTHING waits for a concurrent insert of the same id to
            # commit, so the SELECT below always finds the winner.
            inserted = (
                (
                    await session.execute(
                        insert(Account)
                        .values(**{("metadata_" if k == "metadata" else k): v for k, v in fields.items()}, **sealed)
                        .on_conflict_do_nothing(index_elements=[Account.id])
                        .returning(*STORED_ACCOUNT_COLUMNS)
                    )
                )
                .mappings()
                .first()
            )
            if inserted is not None:
                record = AccountRecord.from_row(inserted)
                # Its history starts with the account as opened (row 0), and its event is
                # written in the same transaction: the account exists exactly when both do.
                after = {field: getattr(record, field) for field in MUTABLE_FIELDS}
                await self._append_change(session, record.id, 0, None, record.created_at, changed_by, {}, after,
                                          account_state(after, None))  # fmt: skip
                await session.execute(
                    ACCOUNT_EVENT,
                    {"type": "account.created", "id": record.id, "created_at": record.created_at, "sequence": 0},
                )
                await session.commit()
                return AccountOutcome(record, created=True)
            row = (await session.execute(select(*ACCOUNT_COLUMNS).where(Account.id == fields["id"]))).mappings().one()
            existing = AccountRecord.from_row(row)
            # A replay is judged against the account as it was opened (changes made since
            # by PATCH do not turn a retry of the creation into a conflict).
            opened = (await session.execute(CREATION, {"id": existing.id})).scalar_one_or_none() or {
                field: getattr(existing, field) for field in MUTABLE_FIELDS
            }
            stored = {
                "id": existing.id,
                "currency": existing.currency,
                "name": opened["name"],
                "allow_negative_balance": existing.allow_negative_balance,
                "metadata": opened["metadata"],
                "overdraft_limit": opened["overdraft_limit"],
                "max_balance": opened["max_balance"],
            }
            if stored != fields:
                differing = sorted(k for k in fields if fields[k] != stored[k])
                raise AccountExistsWithDifferentFields(
                    f"account {existing.id!r} exists with different {', '.join(differing)}"
                )
            return AccountOutcome(existing, created=False)

        return await self._unit_of_work.run(work)

    async def update(self, account_id: str, changes: dict[str, Any], changed_by: str | None) -> AccountRecord:
        """Change an account's status, limits, name or metadata under its row lock; each
        effective change is one history row and one `account.changed` event. Fields set
        to the values they have change nothing (a retried PATCH is harmless)."""
        unknown = set(changes) - set(MUTABLE_FIELDS)
        if unknown:
            raise InvalidRequest(f"unknown fields: {', '.join(sorted(unknown))}")
        if "status" in changes and changes["status"] not in STATUSES:
            raise InvalidRequest(f"`status` must be one of {', '.join(STATUSES)}")
        if "metadata" in changes and changes["metadata"] is None:
            changes = {**changes, "metadata": {}}

        async def work(session: Executor) -> AccountRecord:
            accounts, now = await lock_accounts(session, [account_id])
            account = accounts.get(account_id)
            if account is None:
                raise AccountNotFound(f"no account with id {account_id!r}")
            # Reservations past their expiry are released first: they hold nothing any
            # more, and a close must not be refused for them.
            writes = Writes()
            await release_due(session, accounts, now, writes)
            await write(session, writes, self._key)
            account = accounts[account_id]
            row = (await session.execute(select(*ACCOUNT_COLUMNS).where(Account.id == account_id))).mappings().one()
            current = AccountRecord.from_row(row)
            values = {field: getattr(current, field) for field in MUTABLE_FIELDS}
            changed = {field: value for field, value in changes.items() if values[field] != value}
            if not changed:
                await session.commit()
                return current
            if current.status == "closed":
                raise AccountAlreadyClosed(f"account {account_id!r} is closed; closing is final")
            new = {**values, **changed}
            if new["status"] == "closed" and (
                account.posted != 0 or account.pending_debits != 0 or account.pending_credits != 0
            ):
                raise AccountNotEmpty(
                    f"account {account_id!r} holds {account.posted} posted, {account.pending_debits} pending debits "
                    f"and {account.pending_credits} pending credits: it can be closed only when all are 0"
                )
            check_limits(account, new["overdraft_limit"], new["max_balance"])
            fields = SimpleNamespace(
                id=current.id, currency=current.currency, allow_negative_balance=current.allow_negative_balance, **new
            )
            await session.execute(
                UPDATE_ACCOUNT,
                {
                    "id": account_id,
                    **{field: new[field] for field in MUTABLE_FIELDS if field != "metadata"},
                    "metadata": json.dumps(new["metadata"]),
                    "seal": seal(self._key, account_message(self._key.id, fields)),
                    "seal_key": self._key.id,
                },
            )
            last = (await session.execute(LAST_CHANGE, {"id": account_id})).first()
            sequence = last.sequence + 1 if last is not None else 1
            before = {field: values[field] for field in changed}
            await self._append_change(
                session, account_id, sequence, bytes(last.hash) if last is not None else None, now, changed_by,
                before, changed, account_state(new, account),
            )  # fmt: skip
            await session.execute(
                ACCOUNT_EVENT, {"type": "account.changed", "id": account_id, "created_at": now, "sequence": sequence}
            )
            updated = AccountRecord.from_row(
                (await session.execute(select(*ACCOUNT_COLUMNS).where(Account.id == account_id))).mappings().one()
            )
            await session.commit()
            return updated

        return await self._unit_of_work.run(work)

    async def _append_change(
        self,
        session: Executor,
        account_id: str,
        sequence: int,
        previous_hash: bytes | None,
        changed_at: datetime,
        changed_by: str | None,
        before: dict[str, Any],
        after: dict[str, Any],
        state: dict[str, Any],
    ) -> None:
        key = self._key
        await session.execute(
            INSERT_CHANGE,
            {
                "account_id": account_id,
                "sequence": sequence,
                "changed_at": changed_at,
                "changed_by": changed_by,
                "before": json.dumps(before),
                "after": json.dumps(after),
                "state": json.dumps(state),
                "hash": change_hash(
                    key, previous_hash, account_id, sequence, changed_at, changed_by, before, after, state
                ),
                "key_id": key.id,
            },
        )

    async def changes(self, account_id: str, *, limit: int, cursor: str | None) -> Page[AccountChange]:
        """The account's changes, oldest first (row 0, the opening, is not a change)."""
        after = decode_cursor(cursor, (int,))[0] if cursor is not None else 0

        async def work(session: Executor) -> Page[AccountChange]:
            rows = (await session.execute(CHANGES, {"id": account_id, "after": after, "limit": limit + 1})).all()
            if not rows and (await session.execute(ACCOUNT_EXISTS, {"id": account_id})).first() is None:
                raise AccountNotFound(f"no account with id {account_id!r}")
            items = [
                AccountChange(r.account_id, r.sequence, r.changed_at, r.changed_by, r.before, r.after, bytes(r.hash))
                for r in rows[:limit]
            ]
            next_cursor = encode_cursor([items[-1].sequence]) if len(rows) > limit else None
            return Page(items, next_cursor)

        return await self._unit_of_work.run(work)
