"""Events: an outbox written with every change, a gap-free feed, webhook subscriptions.

- `event_outbox`: one row per event, inserted by the statement that makes the change (in
  the same transaction, after the accounts were locked), so an event exists exactly when
  its change committed. Its `id` comes from an identity sequence drawn under the account
  locks: for one account, a later change always has a larger id.
- `events`: the feed. A single sequencer at a time (`ledger.service.events`) moves every
  outbox row its snapshot sees into `events`, numbered by `position` in id order. A row
  becomes visible only when its transaction commits, which is not in id order; but a
  snapshot that sees a change of an account also sees every earlier change of it (the
  earlier transaction committed before it released the lock the later one waited for),
  so positions keep each account's journal order, and a position once given is never
  given again, nor skipped. `sequence` keeps the outbox id (what a naive reader would
  page on: see tests/integration/test_events.py).
- `event_feed`: the last position given, and how far retention has pruned the feed.
- `webhooks` and `webhook_deliveries`: subscriptions, each with its cursor in the feed,
  and one row per event to deliver, retried with backoff until the retry horizon.

The serving role may delete outbox rows (once moved), and feed rows and delivery history
older than the retention: events are a copy of what the journal holds, not the
record itself, which stays append-only.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

SERVICE_ROLE = "ledger_service"
EVENT_TYPES = (
    "account.created",
    "account.changed",
    "transfer.posted",
    "transfer.pending",
    "transfer.rejected",
    "transfer.voided",
    "transfer.expired",
)
TYPE_CHECK = "type IN (" + ", ".join(f"'{t}'" for t in EVENT_TYPES) + ")"
# An event names an account (account events) or a transfer and both its accounts.
SUBJECT_CHECK = "(type LIKE 'account.%') = (transfer_id IS NULL) AND (transfer_id IS NULL) = (other_account_id IS NULL)"
GRANTS = {
    "event_outbox": ("SELECT", "INSERT", "DELETE"),
    "events": ("SELECT", "INSERT", "DELETE"),
    "event_feed": ("SELECT", "UPDATE (last_position, pruned_through)"),
    "webhooks": ("SELECT", "INSERT", "UPDATE (status, cursor, failing_since, last_error, deleted_at)"),
    "webhook_deliveries": (
        "SELECT",
        "INSERT",
        "DELETE",
        "UPDATE (status, attempts, next_attempt_at, locked_until, last_attempt_at, last_status_code, last_error, "
        "delivered_at)",
    ),
}


def _event_columns() -> list[sa.Column]:
    return [
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("transfer_id", sa.Text(), nullable=True),
        sa.Column("account_id", sa.Text(), nullable=False),
        sa.Column("other_account_id", sa.Text(), nullable=True),
        sa.Column("created_at", sa.TIMESTAMP(timezone=True), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "event_outbox",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        *_event_columns(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_event_outbox")),
        sa.CheckConstraint(TYPE_CHECK, name=op.f("ck_event_outbox_type_known")),
        sa.CheckConstraint(SUBJECT_CHECK, name=op.f("ck_event_outbox_subject")),
    )
    op.create_table(
        "events",
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        *_event_columns(),
        sa.PrimaryKeyConstraint("position", name=op.f("pk_events")),
        sa.CheckConstraint(TYPE_CHECK, name=op.f("ck_events_type_known")),
        sa.CheckConstraint(SUBJECT_CHECK, name=op.f("ck_events_subject")),
        sa.CheckConstraint("position >= 1", name=op.f("ck_events_position_positive")),
    )
    # `account_id=` filters: an account's events are found through these, in feed order,
    # without reading anybody else's.
    op.create_index(op.f("ix_events_account_id_position"), "events", ["account_id", "position"])
    op.create_index(op.f("ix_events_other_account_id_position"), "events", ["other_account_id", "position"])
    op.create_table(
        "event_feed",
        sa.Column("id", sa.SmallInteger(), nullable=False),
        sa.Column("last_position", sa.BigInteger(), nullable=False),
        sa.Column("pruned_through", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_event_feed")),
        sa.CheckConstraint("id = 1", name=op.f("ck_event_feed_one_row")),
        sa.CheckConstraint("pruned_through <= last_position", name=op.f("ck_event_feed_pruned_before_last")),
    )
    op.execute("INSERT INTO event_feed (id, last_position, pruned_through) VALUES (1, 0, 0)")
    op.create_table(
        "webhooks",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("types", ARRAY(sa.Text()), nullable=True),
        # The secret is not stored: it is HMAC(chain key `secret_key`, id and nonce), so
        # someone reading the database cannot sign deliveries (ledger.service.webhooks).
        sa.Column("secret_key", sa.Text(), nullable=False),
        sa.Column("secret_nonce", sa.LargeBinary(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("cursor", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.TIMESTAMP(timezone=True), nullable=False),
        sa.Column("created_by", sa.Text(), nullable=True),
        sa.Column("failing_since", sa.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("deleted_at", sa.TIMESTAMP(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhooks")),
        sa.CheckConstraint("status IN ('active', 'failing', 'deleted')", name=op.f("ck_webhooks_status_known")),
        sa.CheckConstraint("(status = 'deleted') = (deleted_at IS NOT NULL)", name=op.f("ck_webhooks_deleted")),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("webhook_id", sa.Text(), nullable=False),
        sa.Column("event_position", sa.BigInteger(), nullable=False),
        sa.Column("event_type", sa.Text(), nullable=False),
        # The body is fixed when the delivery is created: every retry sends the same bytes.
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.TIMESTAMP(timezone=True), nullable=False),
        sa.Column("next_attempt_at", sa.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("locked_until", sa.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("last_attempt_at", sa.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("delivered_at", sa.TIMESTAMP(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
        sa.ForeignKeyConstraint(
            ["webhook_id"], ["webhooks.id"], name=op.f("fk_webhook_deliveries_webhook_id_webhooks")
        ),
        sa.UniqueConstraint(
            "webhook_id", "event_position", name=op.f("uq_webhook_deliveries_webhook_id_event_position")
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'delivered', 'failed', 'cancelled')", name=op.f("ck_webhook_deliveries_status_known")
        ),
    )
    # What the delivery workers claim: due deliveries only, whatever the history's size.
    op.create_index(
        op.f("ix_webhook_deliveries_next_attempt_at"),
        "webhook_deliveries",
        ["next_attempt_at"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    for table, privileges in GRANTS.items():
        for privilege in privileges:
            op.execute(f"GRANT {privilege} ON {table} TO {SERVICE_ROLE}")


def downgrade() -> None:
    for table in GRANTS:
        op.execute(f"REVOKE ALL ON {table} FROM {SERVICE_ROLE}")
    op.drop_table("webhook_deliveries")
    op.drop_table("webhooks")
    op.drop_table("event_feed")
    op.drop_table("events")
    op.drop_table("event_outbox")
