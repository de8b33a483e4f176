"""Service records to response bodies."""

from __future__ import annotations

from ledger.http.schemas import (
    AccountBalanceOut,
    AccountOut,
    Balance,
    BatchResultOut,
    EntryOut,
    TransferOut,
    format_timestamp,
)
from ledger.service.groups import BatchResult
from ledger.service.records import AccountRecord, BalanceRecord, EntryRecord, TransferRecord


def account_out(account: AccountRecord) -> AccountOut:
    return AccountOut(
        id=account.id,
        currency=account.currency,
        name=account.name,
        allow_negative_balance=account.allow_negative_balance,
        metadata=account.metadata,
        created_at=format_timestamp(account.created_at),
        balance=Balance(
            posted=account.posted,
            pending_debits=account.pending_debits,
            pending_credits=account.pending_credits,
            available=account.available,
        ),
        entries_count=account.entries_count,
        status=account.status,  # type: ignore[arg-type]
        overdraft_limit=account.overdraft_limit,
        max_balance=account.max_balance,
    )


def transfer_out(transfer: TransferRecord) -> TransferOut:
    return TransferOut(
        id=transfer.id,
        debit_account_id=transfer.debit_account_id,
        credit_account_id=transfer.credit_account_id,
        amount=transfer.amount,
        currency=transfer.currency,
        status=transfer.status,  # type: ignore[arg-type]
        code=transfer.code,
        pending=transfer.pending,
        posted_amount=transfer.posted_amount,
        expires_at=format_timestamp(transfer.expires_at) if transfer.expires_at else None,
        reversal_of=transfer.reversal_of,
        description=transfer.description,
        metadata=transfer.metadata,
        created_at=format_timestamp(transfer.created_at),
        updated_at=format_timestamp(transfer.updated_at),
        imported_at=format_timestamp(transfer.imported_at) if transfer.imported_at else None,
    )


def entry_out(entry: EntryRecord) -> EntryOut:
    return EntryOut(
        account_id=entry.account_id,
        sequence=entry.sequence,
        transfer_id=entry.transfer_id,
        amount=entry.amount,
        balance_after=entry.balance_after,
        created_at=format_timestamp(entry.created_at),
        hash=entry.hash.hex(),
        key_id=entry.key_id,
        counterparty_account_id=entry.counterparty_account_id,
        description=entry.description,
    )


def balance_out(balance: BalanceRecord) -> AccountBalanceOut:
    return AccountBalanceOut(
        account_id=balance.account_id,
        as_of=format_timestamp(balance.as_of),
        posted=balance.posted,
        sequence=balance.sequence,
    )


def refusal_detail(transfer: TransferRecord) -> str:
    """A refusal's detail, derived from the stored record only, so that a replay returns
    exactly the body the first answer had."""
    reason = transfer.code
    debit, credit = transfer.debit_account_id, transfer.credit_account_id
    if reason == "account_not_found":
        missing = transfer.missing_account
        if missing == "both":
            return f"accounts {debit!r} and {credit!r} do not exist"
        if missing in ("debit", "credit"):
            account = debit if missing == "debit" else credit
            return f"account {account!r} does not exist"
        # Recorded before revision 0006, which did not store which one was missing.
        return f"the debit account {debit!r} or the credit account {credit!r} does not exist"
    if reason == "insufficient_funds":
        return f"account {debit!r} does not have {transfer.amount} available"
    if reason == "currency_mismatch":
        wanted = f"{transfer.currency} " if transfer.currency else ""
        return f"the transfer's {wanted}currency does not match both accounts' ({debit!r}, {credit!r})"
    if reason == "accounts_must_be_different":
        return f"debit_account_id and credit_account_id are both {debit!r}"
    if reason == "balance_overflow":
        return "an account's posted total would exceed 9223372036854775807"
    if reason == "exceeds_max_balance":
        return f"account {credit!r} would hold more than its max_balance (posted plus pending credits)"
    if reason in ("account_frozen", "account_closed"):
        # Which of the two was not recorded with the refusal; the accounts' histories say.
        return f"account {debit!r} or {credit!r} is {reason.removeprefix('account_')}"
    if reason == "imported_at_out_of_order":
        return (
            "imported_at is in the future, or earlier than the last entry of "
            f"account {debit!r} or {credit!r}: import each account's history in time order"
        )
    return f"transfer refused: {reason}"


def batch_result_out(result: BatchResult) -> BatchResultOut:
    return BatchResultOut(
        index=result.index,
        id=result.id,
        status=result.status,  # type: ignore[arg-type]
        code=result.code,
        transfer=transfer_out(result.transfer) if result.transfer is not None else None,
    )
