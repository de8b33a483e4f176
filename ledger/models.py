"""The tables, as SQLAlchemy models.

Alembic migrations are the only source of the schema; these models mirror them so that
queries are typed and so that a test can prove the two never drift (`alembic check`).

Invariants are enforced twice: in Python before anything is written, and here as
constraints, so that a bug in the service cannot store money that does not add up.

- `Account`: balances are kept as running totals of posted and pending debits and credits
  (all non-negative), so a balance is `credits_posted - debits_posted` and the database
  can refuse an overdraft with a CHECK.
- `Transfer` (the design's "Transaction model"): one row per transfer id, for every
  outcome including refusals, which is what makes an id's outcome permanent.
- `Entry`: the journal, one row per account touched by a transfer, numbered 1, 2, 3...
  per account, with the posted balance after it and a SHA-256 chained to the previous
  entry of the same account.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, TIMESTAMP
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Constraint names are part of the contract between the database and the service: the
# service maps a violated constraint back to a refusal code by its name.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

IDENTIFIER_PATTERN = "^[A-Za-z0-9._:-]{1,64}$"
# Ids made only of dots would make paths such as /v1/accounts/./entries ambiguous.
IDENTIFIER_CHECK = f"id ~ '{IDENTIFIER_PATTERN}' AND id !~ '^\\.+$'"
CURRENCY_PATTERN = "^[A-Z]{3}$"
TRANSFER_STATUSES = ("posted", "pending", "voided", "expired", "rejected")

Timestamp = TIMESTAMP(timezone=True)
SEAL_SHAPE = "(seal IS NULL) = (seal_key IS NULL) AND (seal IS NULL OR octet_length(seal) = 32)"
MISSING_ACCOUNT_CHECK = (
    "missing_account IS NULL OR (code = 'account_not_found' AND missing_account IN ('debit', 'credit', 'both'))"
)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    currency: Mapped[str] = mapped_column(Text, nullable=False)
    name: Mapped[str | None] = mapped_column(Text, nullable=True)
    allow_negative_balance: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("false"))
    metadata_: Mapped[dict[str, str]] = mapped_column(
        "metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb")
    )
    debits_posted: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    credits_posted: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    pending_debits: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    pending_credits: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    # The sequence of the account's last journal entry (0 before the first one).
    entries_count: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    # The hash and time of the last entry, kept here so that appending an entry needs
    # no extra read: the transfer already holds this row locked.
    last_entry_hash: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    last_entry_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    created_at: Mapped[datetime] = mapped_column(Timestamp, nullable=False, server_default=text("now()"))
    # HMAC of the account's fields under the chain key `seal_key` (ledger.integrity).
    seal: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    seal_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Account controls (revision 0008): a frozen account neither sends nor receives, a
    # closed one never again; null limits are no limits.
    status: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("'open'"))
    overdraft_limit: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    max_balance: Mapped[int | None] = mapped_column(BigInteger, nullable=True)

    __table_args__ = (
        CheckConstraint(IDENTIFIER_CHECK, name="id_format"),
        CheckConstraint(f"currency ~ '{CURRENCY_PATTERN}'", name="currency_format"),
        CheckConstraint("char_length(name) BETWEEN 1 AND 256", name="name_length"),
        CheckConstraint("status IN ('open', 'frozen', 'closed')", name="status_known"),
        CheckConstraint("overdraft_limit >= 0 AND max_balance >= 0", name="limits_not_negative"),
        CheckConstraint(
            "max_balance IS NULL OR credits_posted::numeric - debits_posted + pending_credits <= max_balance",
            name="within_max_balance",
        ),
        CheckConstraint(
            "status <> 'closed' OR (credits_posted = debits_posted AND pending_debits = 0 AND pending_credits = 0)",
            name="closed_empty",
        ),
        Index(
            "ix_accounts_metadata",
            "metadata",
            postgresql_using="gin",
            postgresql_ops={"metadata": "jsonb_path_ops"},
            postgresql_where=text("metadata <> '{}'::jsonb"),
        ),
        CheckConstraint(SEAL_SHAPE, name="seal_shape"),
        CheckConstraint("jsonb_typeof(metadata) = 'object'", name="metadata_object"),
        CheckConstraint(
            "debits_posted >= 0 AND credits_posted >= 0 AND pending_debits >= 0 AND pending_credits >= 0",
            name="totals_not_negative",
        ),
        CheckConstraint("entries_count >= 0", name="entries_count_not_negative"),
        # numeric arithmetic: the difference of two bigints can overflow bigint. The name
        # predates overdraft limits: the service maps it to `insufficient_funds`.
        CheckConstraint(
            "allow_negative_balance OR "
            "credits_posted::numeric - debits_posted - pending_debits >= -COALESCE(overdraft_limit, 0)",
            name="balance_not_negative",
        ),
        CheckConstraint("last_entry_hash IS NULL OR octet_length(last_entry_hash) = 32", name="last_entry_hash_length"),
        Index(None, "currency", "id"),
    )


class Transfer(Base):
    """One row per transfer id, whatever its outcome: the id's permanent record."""

    __tablename__ = "transfers"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    # No foreign keys to accounts here: a refusal with `account_not_found` is recorded
    # under the ids the client sent. The journal (`entries`) references both tables.
    debit_account_id: Mapped[str] = mapped_column(Text, nullable=False)
    credit_account_id: Mapped[str] = mapped_column(Text, nullable=False)
    amount: Mapped[int] = mapped_column(BigInteger, nullable=False)
    currency: Mapped[str | None] = mapped_column(Text, nullable=True)
    pending: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("false"))
    status: Mapped[str] = mapped_column(Text, nullable=False)
    code: Mapped[str | None] = mapped_column(Text, nullable=True)
    description: Mapped[str | None] = mapped_column(Text, nullable=True)
    metadata_: Mapped[dict[str, str]] = mapped_column(
        "metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb")
    )
    # SHA-256 of the request's canonical form: a repeat under the same id is a replay
    # only when this matches, otherwise it is a conflict (409).
    request_hash: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    created_at: Mapped[datetime] = mapped_column(Timestamp, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(Timestamp, nullable=False)
    # Two-phase transfers: a reservation may expire; posting may take less than reserved.
    timeout_seconds: Mapped[int | None] = mapped_column(Integer, nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    posted_amount: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # Reversals: the transfer a reversal reverses, and how much of this one is reversed.
    reversal_of: Mapped[str | None] = mapped_column(Text, ForeignKey("transfers.id"), nullable=True)
    reversed_amount: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    # An account_not_found refusal: which of its accounts did not exist when it was
    # decided, so that its answer names them on every replay (null before revision 0006).
    missing_account: Mapped[str | None] = mapped_column(Text, nullable=True)
    # HMAC of every field above under the chain key `seal_key`, recomputed at each change.
    seal: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    seal_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    # A transfer loaded from the system being replaced (revision 0008): when it happened,
    # its entries' time; `created_at` is when this ledger recorded it.
    imported_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)

    __table_args__ = (
        CheckConstraint(IDENTIFIER_CHECK, name="id_format"),
        CheckConstraint(SEAL_SHAPE, name="seal_shape"),
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint("imported_at IS NULL OR (imported_at <= created_at AND NOT pending)", name="imported_posted"),
        Index(
            "ix_transfers_metadata",
            "metadata",
            postgresql_using="gin",
            postgresql_ops={"metadata": "jsonb_path_ops"},
            postgresql_where=text("metadata <> '{}'::jsonb"),
        ),
        CheckConstraint("timeout_seconds BETWEEN 1 AND 2592000", name="timeout_range"),
        CheckConstraint("(expires_at IS NULL AND timeout_seconds IS NULL) OR pending", name="expiry_only_when_pending"),
        CheckConstraint("pending OR status IN ('posted', 'rejected')", name="pending_status"),
        CheckConstraint("posted_amount BETWEEN 1 AND amount", name="posted_amount_range"),
        CheckConstraint(
            "(posted_amount IS NOT NULL) = (pending AND status = 'posted')", name="posted_amount_when_posted"
        ),
        CheckConstraint(
            "reversed_amount >= 0 AND reversed_amount <= COALESCE(posted_amount, amount)", name="reversed_amount_range"
        ),
        CheckConstraint("reversal_of IS NULL OR NOT pending", name="reversal_not_pending"),
        CheckConstraint(MISSING_ACCOUNT_CHECK, name="missing_account_known"),
        CheckConstraint(f"currency ~ '{CURRENCY_PATTERN}'", name="currency_format"),
        CheckConstraint("status IN ('posted', 'pending', 'voided', 'expired', 'rejected')", name="status_known"),
        CheckConstraint("(status = 'rejected') = (code IS NOT NULL)", name="code_iff_rejected"),
        CheckConstraint("status = 'rejected' OR debit_account_id <> credit_account_id", name="accounts_different"),
        CheckConstraint("status = 'rejected' OR currency IS NOT NULL", name="currency_when_applied"),
        CheckConstraint("char_length(description) <= 512", name="description_length"),
        CheckConstraint("jsonb_typeof(metadata) = 'object'", name="metadata_object"),
        CheckConstraint("octet_length(request_hash) = 32", name="request_hash_length"),
        CheckConstraint("updated_at >= created_at", name="updated_after_created"),
        Index(None, "created_at", "id"),
        Index(None, "debit_account_id", "created_at", "id"),
        Index(None, "credit_account_id", "created_at", "id"),
        Index("ix_transfers_expires_at", "expires_at", postgresql_where=text("status = 'pending'")),
        Index(
            "ix_transfers_debit_account_id_expires_at",
            "debit_account_id",
            "expires_at",
            postgresql_where=text("status = 'pending'"),
        ),
        Index(
            "ix_transfers_credit_account_id_expires_at",
            "credit_account_id",
            "expires_at",
            postgresql_where=text("status = 'pending'"),
        ),
        Index("ix_transfers_pending_updated_at", "updated_at", postgresql_where=text("pending")),
        Index("ix_transfers_reversal_of", "reversal_of", postgresql_where=text("reversal_of IS NOT NULL")),
    )


class Entry(Base):
    """A journal line: one account's side of one transfer."""

    __tablename__ = "entries"

    account_id: Mapped[str] = mapped_column(Text, ForeignKey("accounts.id"), nullable=False)
    sequence: Mapped[int] = mapped_column(BigInteger, nullable=False)
    transfer_id: Mapped[str] = mapped_column(Text, ForeignKey("transfers.id"), nullable=False)
    # Signed: credits are positive, debits negative.
    amount: Mapped[int] = mapped_column(BigInteger, nullable=False)
    balance_after: Mapped[int] = mapped_column(BigInteger, nullable=False)
    created_at: Mapped[datetime] = mapped_column(Timestamp, nullable=False)
    hash: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    # The chain key of `hash` (ledger.integrity); empty for the unkeyed SHA-256 chain of
    # entries written before chain keys existed.
    key_id: Mapped[str] = mapped_column(Text, nullable=False)

    __table_args__ = (
        PrimaryKeyConstraint("account_id", "sequence"),
        CheckConstraint("key_id ~ '^([a-z0-9][a-z0-9_-]{0,31})?$'", name="key_id_format"),
        # A transfer touches an account at most once: applying it twice is impossible
        # even for a buggy caller, because the second journal line cannot be stored.
        UniqueConstraint("transfer_id", "account_id"),
        CheckConstraint("sequence >= 1", name="sequence_positive"),
        CheckConstraint("amount <> 0", name="amount_not_zero"),
        CheckConstraint("octet_length(hash) = 32", name="hash_length"),
        # Balances "as of" an instant and statements "from/to" search by time within an
        # account; per account, time order is sequence order (see domain.decide_transfer).
        Index(None, "account_id", "created_at", "sequence"),
    )


class AccountChange(Base):
    """One change of an account's status, limits, name or metadata (row 0: its creation):
    append-only, numbered per account, chained by a keyed hash (ledger.integrity.change_hash)."""

    __tablename__ = "account_changes"

    account_id: Mapped[str] = mapped_column(Text, ForeignKey("accounts.id"), nullable=False)
    sequence: Mapped[int] = mapped_column(BigInteger, nullable=False)
    changed_at: Mapped[datetime] = mapped_column(Timestamp, nullable=False)
    changed_by: Mapped[str | None] = mapped_column(Text, nullable=True)
    before: Mapped[dict[str, object]] = mapped_column(JSONB, nullable=False)
    after: Mapped[dict[str, object]] = mapped_column(JSONB, nullable=False)
    # The account right after the change (fields and balances): what its event renders.
    state: Mapped[dict[str, object]] = mapped_column(JSONB, nullable=False)
    hash: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    key_id: Mapped[str] = mapped_column(Text, nullable=False)

    __table_args__ = (
        PrimaryKeyConstraint("account_id", "sequence"),
        CheckConstraint("sequence >= 0", name="sequence_not_negative"),
        CheckConstraint("octet_length(hash) = 32", name="hash_length"),
        CheckConstraint("jsonb_typeof(before) = 'object' AND jsonb_typeof(after) = 'object'", name="objects"),
    )


class ApiKey(Base):
    """An API key: only its SHA-256 is stored; the key itself is shown once, at creation."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    name: Mapped[str | None] = mapped_column(Text, nullable=True)
    role: Mapped[str] = mapped_column(Text, nullable=False)
    key_hash: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    created_at: Mapped[datetime] = mapped_column(Timestamp, nullable=False, server_default=text("now()"))
    revoked_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    # Who created and who revoked the key: a key id, `LEDGER_ADMIN_KEY` or `cli`.
    created_by: Mapped[str | None] = mapped_column(Text, nullable=True)
    revoked_by: Mapped[str | None] = mapped_column(Text, nullable=True)
    # HMAC of (id, role, key_hash) under the chain key: a key row written into the
    # database by anyone but the service does not authenticate anybody.
    seal: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    seal_key: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (
        UniqueConstraint("key_hash"),
        CheckConstraint(SEAL_SHAPE, name="seal_shape"),
        CheckConstraint("role IN ('admin', 'poster', 'auditor')", name="role_known"),
        CheckConstraint("octet_length(key_hash) = 32", name="key_hash_length"),
        CheckConstraint("char_length(name) <= 256", name="name_length"),
    )


EVENT_TYPES = (
    "account.created",
    "account.changed",
    "transfer.posted",
    "transfer.pending",
    "transfer.rejected",
    "transfer.voided",
    "transfer.expired",
)
EVENT_TYPE_CHECK = "type IN (" + ", ".join(f"'{t}'" for t in EVENT_TYPES) + ")"
EVENT_SUBJECT_CHECK = (
    "(type LIKE 'account.%') = (transfer_id IS NULL) AND (transfer_id IS NULL) = (other_account_id IS NULL)"
)

CHANGE_SEQUENCE_CHECK = (
    "(type <> 'account.changed' OR change_sequence IS NOT NULL) AND (type LIKE 'account.%' OR change_sequence IS NULL)"
)


class EventOutbox(Base):
    """Events written with their change, not yet in the feed (ledger.service.events)."""

    __tablename__ = "event_outbox"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    type: Mapped[str] = mapped_column(Text, nullable=False)
    transfer_id: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The account (account events), or the transfer's debit and credit accounts.
    account_id: Mapped[str] = mapped_column(Text, nullable=False)
    other_account_id: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(Timestamp, nullable=False)
    # An account.changed event: the account_changes row it renders.
    change_sequence: Mapped[int | None] = mapped_column(BigInteger, nullable=True)

    __table_args__ = (
        CheckConstraint(EVENT_TYPE_CHECK, name="type_known"),
        CheckConstraint(EVENT_SUBJECT_CHECK, name="subject"),
        CheckConstraint(CHANGE_SEQUENCE_CHECK, name="change_names_sequence"),
    )


class Event(Base):
    """The feed: events numbered gap-free in an order that keeps each account's journal order."""

    __tablename__ = "events"

    position: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    # The event's outbox id.
    sequence: Mapped[int] = mapped_column(BigInteger, nullable=False)
    type: Mapped[str] = mapped_column(Text, nullable=False)
    transfer_id: Mapped[str | None] = mapped_column(Text, nullable=True)
    account_id: Mapped[str] = mapped_column(Text, nullable=False)
    other_account_id: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(Timestamp, nullable=False)
    change_sequence: Mapped[int | None] = mapped_column(BigInteger, nullable=True)

    __table_args__ = (
        CheckConstraint(EVENT_TYPE_CHECK, name="type_known"),
        CheckConstraint(EVENT_SUBJECT_CHECK, name="subject"),
        CheckConstraint(CHANGE_SEQUENCE_CHECK, name="change_names_sequence"),
        CheckConstraint("position >= 1", name="position_positive"),
        Index(None, "account_id", "position"),
        Index(None, "other_account_id", "position"),
    )


class EventFeed(Base):
    """One row: the last position given and how far retention pruned the feed."""

    __tablename__ = "event_feed"

    id: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    last_position: Mapped[int] = mapped_column(BigInteger, nullable=False)
    pruned_through: Mapped[int] = mapped_column(BigInteger, nullable=False)

    __table_args__ = (
        CheckConstraint("id = 1", name="one_row"),
        CheckConstraint("pruned_through <= last_position", name="pruned_before_last"),
    )


class Webhook(Base):
    """A subscription: where to POST which events, and how far into the feed it has got."""

    __tablename__ = "webhooks"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    url: Mapped[str] = mapped_column(Text, nullable=False)
    types: Mapped[list[str] | None] = mapped_column(ARRAY(Text), nullable=True)
    secret_key: Mapped[str] = mapped_column(Text, nullable=False)
    secret_nonce: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    status: Mapped[str] = mapped_column(Text, nullable=False)
    cursor: Mapped[int] = mapped_column(BigInteger, nullable=False)
    created_at: Mapped[datetime] = mapped_column(Timestamp, nullable=False)
    created_by: Mapped[str | None] = mapped_column(Text, nullable=True)
    failing_since: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    deleted_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)

    __table_args__ = (
        CheckConstraint("status IN ('active', 'failing', 'deleted')", name="status_known"),
        CheckConstraint("(status = 'deleted') = (deleted_at IS NOT NULL)", name="deleted"),
    )


class WebhookDelivery(Base):
    """One event to deliver to one subscription, and how its attempts went."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    webhook_id: Mapped[str] = mapped_column(Text, ForeignKey("webhooks.id"), nullable=False)
    event_position: Mapped[int] = mapped_column(BigInteger, nullable=False)
    event_type: Mapped[str] = mapped_column(Text, nullable=False)
    body: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    status: Mapped[str] = mapped_column(Text, nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False)
    created_at: Mapped[datetime] = mapped_column(Timestamp, nullable=False)
    next_attempt_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    locked_until: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    last_attempt_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    last_status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    delivered_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)

    __table_args__ = (
        UniqueConstraint("webhook_id", "event_position"),
        CheckConstraint("status IN ('pending', 'delivered', 'failed', 'cancelled')", name="status_known"),
        Index(None, "next_attempt_at", postgresql_where=text("status = 'pending'")),
    )
