"""Reads: accounts, transfers, an account's journal and its balance as of an instant."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Select,
    and_,
    case,
    cast,
    exists,
    func,
    literal_column,
    or_,
    select,
    tuple_,
)

from ledger.domain import epoch_microseconds
from ledger.errors import AccountNotFound, TransferNotFound
from ledger.models import Account, Entry, Transfer
from ledger.service.metadata import CUSTOM_PLANS
from ledger.service.metadata import matches as metadata_matches
from ledger.service.pagination import cursor_time, decode_cursor, encode_cursor
from ledger.service.records import AccountRecord, BalanceRecord, EntryRecord, Page, TransferRecord
from ledger.service.unit_of_work import Executor, UnitOfWork

# 'pending' as a literal, not a bound parameter: the service's statements run with
# generic plans (ledger.database), and a generic plan can only use the partial indexes
# on pending transfers (`WHERE status = 'pending'`) when the query states the same
# literal. With a parameter, reading an account scanned every transfer it ever had.
PENDING = literal_column("'pending'")


def _due_reserved(side: ColumnElement) -> ColumnElement:
    """What the account has reserved on `side` in reservations past expiry but not yet
    released: reads already treat those funds as free (lazy expiry)."""
    return func.coalesce(
        select(func.sum(Transfer.amount))
        .where(side == Account.id, Transfer.status == PENDING, Transfer.expires_at <= func.clock_timestamp())
        .correlate(Account)
        .scalar_subquery(),
        0,
    )


# An account row as stored (a new account has no reservations to net out).
STORED_ACCOUNT_COLUMNS = (
    Account.id,
    Account.currency,
    Account.name,
    Account.allow_negative_balance,
    Account.metadata_.label("metadata"),
    Account.created_at,
    Account.debits_posted,
    Account.credits_posted,
    Account.pending_debits,
    Account.pending_credits,
    Account.entries_count,
    Account.status,
    Account.overdraft_limit,
    Account.max_balance,
)
# The columns a read returns for an account: pending totals net of due reservations
# (sum(bigint) is numeric in PostgreSQL: cast back, so balances stay integers).
_NET_PENDING = {
    "pending_debits": cast(Account.pending_debits - _due_reserved(Transfer.debit_account_id), BigInteger),
    "pending_credits": cast(Account.pending_credits - _due_reserved(Transfer.credit_account_id), BigInteger),
}
ACCOUNT_COLUMNS = tuple(
    _NET_PENDING[column.key].label(column.key) if column.key in _NET_PENDING else column
    for column in STORED_ACCOUNT_COLUMNS
)
# A reservation past expiry reads as expired even before it is released.
EFFECTIVE_STATUS = case(
    (and_(Transfer.status == PENDING, Transfer.expires_at <= func.clock_timestamp()), "expired"),
    else_=Transfer.status,
)
TRANSFER_COLUMNS = tuple(
    EFFECTIVE_STATUS.label("status") if column.key == "status" else column for column in Transfer.__table__.columns
)
ENTRY_COLUMNS = tuple(Entry.__table__.columns)
# What an entry reads with, from its transfer (joined on the transfers' primary key, one
# index lookup per entry of the page): a credit entry's counterparty is the transfer's
# debit account, a debit entry's its credit account.
ENTRY_TRANSFER_COLUMNS = (
    case((Entry.amount > 0, Transfer.debit_account_id), else_=Transfer.credit_account_id).label(
        "counterparty_account_id"
    ),
    Transfer.description,
)


class LedgerQueries:
    def __init__(self, unit_of_work: UnitOfWork) -> None:
        self._unit_of_work = unit_of_work

    async def account(self, account_id: str) -> AccountRecord:
        async def work(session: Executor) -> AccountRecord:
            row = (await session.execute(select(*ACCOUNT_COLUMNS).where(Account.id == account_id))).mappings().first()
            if row is None:
                raise AccountNotFound(f"no account with id {account_id!r}")
            return AccountRecord.from_row(row)

        return await self._unit_of_work.run(work)

    async def accounts(
        self, *, currency: str | None, limit: int, cursor: str | None, metadata: Mapping[str, str] | None = None
    ) -> Page[AccountRecord]:
        statement = select(*ACCOUNT_COLUMNS).order_by(Account.id).limit(limit + 1)
        if currency is not None:
            statement = statement.where(Account.currency == currency)
        if metadata:
            statement = statement.where(metadata_matches(Account.metadata_, metadata))
        if cursor is not None:
            (after,) = decode_cursor(cursor, (str,))
            statement = statement.where(Account.id > after)
        rows = await self._rows(statement, custom_plan=bool(metadata))
        items = [AccountRecord.from_row(row) for row in rows[:limit]]
        return Page(items, encode_cursor([items[-1].id]) if len(rows) > limit else None)

    async def transfer(self, transfer_id: str) -> TransferRecord:
        rows = await self._rows(select(*TRANSFER_COLUMNS).where(Transfer.id == transfer_id))
        if not rows:
            raise TransferNotFound(f"no transfer with id {transfer_id!r}")
        return TransferRecord.from_row(rows[0])

    async def transfers(
        self,
        *,
        account_id: str | None,
        status: str | None,
        start: datetime | None,
        end: datetime | None,
        limit: int,
        cursor: str | None,
        metadata: Mapping[str, str] | None = None,
    ) -> Page[TransferRecord]:
        """Transfers oldest first, keyset-paginated on (created_at, id)."""
        statement = select(*TRANSFER_COLUMNS).order_by(Transfer.created_at, Transfer.id).limit(limit + 1)
        if metadata:
            statement = statement.where(metadata_matches(Transfer.metadata_, metadata))
        if account_id is not None:
            statement = statement.where(
                or_(Transfer.debit_account_id == account_id, Transfer.credit_account_id == account_id)
            )
        if status is not None:
            statement = statement.where(EFFECTIVE_STATUS == status)
        if start is not None:
            statement = statement.where(Transfer.created_at >= start)
        if end is not None:
            statement = statement.where(Transfer.created_at <= end)
        if cursor is not None:
            after_us, after_id = decode_cursor(cursor, (int, str))
            after_time = cursor_time(after_us)
            statement = statement.where(tuple_(Transfer.created_at, Transfer.id) > tuple_(after_time, after_id))
        rows = await self._rows(statement, custom_plan=bool(metadata))
        items = [TransferRecord.from_row(row) for row in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            next_cursor = encode_cursor([epoch_microseconds(items[-1].created_at), items[-1].id])
        return Page(items, next_cursor)

    async def entries(
        self, account_id: str, *, start: datetime | None, end: datetime | None, limit: int, cursor: str | None
    ) -> Page[EntryRecord]:
        """An account's journal, oldest first, keyset-paginated on sequence, each entry with
        its transfer's counterparty and description."""
        # An outer join: the journal reads whole and gap-free even if a transfer row were
        # missing (the audit reports that as entry_without_transfer).
        statement = (
            select(*ENTRY_COLUMNS, *ENTRY_TRANSFER_COLUMNS)
            .outerjoin(Transfer, Transfer.id == Entry.transfer_id)
            .where(Entry.account_id == account_id)
            .order_by(Entry.sequence)
            .limit(limit + 1)
        )
        if start is not None:
            statement = statement.where(Entry.created_at >= start)
        if end is not None:
            statement = statement.where(Entry.created_at <= end)
        if cursor is not None:
            (after,) = decode_cursor(cursor, (int,))
            statement = statement.where(Entry.sequence > after)

        async def work(session: Executor) -> list:
            rows = (await session.execute(statement)).mappings().all()
            if not rows:
                await _require_account(session, account_id)
            return list(rows)

        rows = await self._unit_of_work.run(work)
        items = [EntryRecord(**row) for row in rows[:limit]]
        return Page(items, encode_cursor([items[-1].sequence]) if len(rows) > limit else None)

    async def balance(self, account_id: str, as_of: datetime | None) -> BalanceRecord:
        """The posted balance after the account's last entry at or before `as_of`."""

        async def work(session: Executor) -> BalanceRecord:
            moment = as_of
            if moment is None:
                moment = (await session.execute(select(func.clock_timestamp()))).scalar_one()
            row = (
                await session.execute(
                    select(Entry.balance_after, Entry.sequence)
                    .where(Entry.account_id == account_id, Entry.created_at <= moment)
                    .order_by(Entry.created_at.desc(), Entry.sequence.desc())
                    .limit(1)
                )
            ).first()
            if row is None:
                await _require_account(session, account_id)
                return BalanceRecord(account_id, moment, 0, 0)
            return BalanceRecord(account_id, moment, row.balance_after, row.sequence)

        return await self._unit_of_work.run(work)

    async def _rows(self, statement: Select, *, custom_plan: bool = False) -> list:
        async def work(session: Executor) -> list:
            if custom_plan:
                # A metadata filter's best plan depends on its value: a rare one is read
                # through the GIN index, a common one by walking the list's order; a
                # generic plan always walked, reading the whole table for a rare value
                # (tests/integration/test_plans.py).
                await session.execute(CUSTOM_PLANS)
            return list((await session.execute(statement)).mappings().all())

        return await self._unit_of_work.run(work)


async def _require_account(session: Executor, account_id: str) -> None:
    found = (await session.execute(select(exists().where(Account.id == account_id)))).scalar_one()
    if not found:
        raise AccountNotFound(f"no account with id {account_id!r}")
