"""Account controls: limits, status, an append-only history of account changes, imported
history and metadata indexes.

- `accounts.status` (`open`, `frozen`, `closed`), `overdraft_limit` and `max_balance`
  (null: no limit). The service decides every transfer against them under the account
  locks; the CHECKs below refuse, again, any state that breaks them, so a bug cannot store
  it: the overdraft rule becomes `available >= -overdraft_limit` (same constraint name, so
  the service still maps it to `insufficient_funds`), `posted + pending_credits` may not
  pass `max_balance`, and a closed account holds nothing, posted or pending.
- `account_changes`: one row per change of an account's status, limits, name or metadata
  (which fields, before and after, when, by which API key), numbered 1, 2, 3... per
  account, with the account's creation as row 0 (every field, `before` empty), chained by
  a keyed hash like the journal; append-only, enforced by the journal's triggers.
  Verification folds it from row 0 and compares the result with the account row. `state`
  is the account right after the change (what its event renders). Accounts opened before
  this revision have no row 0: their fold starts from what the first change says.
- `transfers.imported_at`: set on a transfer loaded from the system being replaced; its
  entries carry that time, its `created_at` is when this ledger recorded it (so the
  checkpoints' count of transfers recorded up to their cut-off stays exact).
- `event_outbox.change_sequence` / `events.change_sequence`: an account event names the
  history row it renders (`account.created` row 0; null for events made before this
  revision, rendered from the account row as before).
- `ix_transfers_pending_updated_at` (pending transfers only): reservations settled after
  an instant, for balances summed `as_of` it.
- GIN indexes (`jsonb_path_ops`) over non-empty metadata of accounts and transfers, for
  `metadata[KEY]=VALUE` filters (`metadata @> '{"KEY": "VALUE"}'`). Partial: rows without
  metadata (most transfers) add nothing to the index, so the write path pays only for the
  rows that carry metadata.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

SERVICE_ROLE = "ledger_service"
OLD_BALANCE_CHECK = "allow_negative_balance OR credits_posted::numeric - debits_posted - pending_debits >= 0"
BALANCE_CHECK = "allow_negative_balance OR credits_posted::numeric - debits_posted - pending_debits >= -COALESCE(overdraft_limit, 0)"
MAX_BALANCE_CHECK = "max_balance IS NULL OR credits_posted::numeric - debits_posted + pending_credits <= max_balance"
CLOSED_CHECK = "status <> 'closed' OR (credits_posted = debits_posted AND pending_debits = 0 AND pending_credits = 0)"
CHANGE_SEQUENCE_CHECK = (
    "(type <> 'account.changed' OR change_sequence IS NOT NULL) AND (type LIKE 'account.%' OR change_sequence IS NULL)"
)
NON_EMPTY = "metadata <> '{}'::jsonb"


def upgrade() -> None:
    op.add_column("accounts", sa.Column("status", sa.Text(), server_default=sa.text("'open'"), nullable=False))
    op.add_column("accounts", sa.Column("overdraft_limit", sa.BigInteger(), nullable=True))
    op.add_column("accounts", sa.Column("max_balance", sa.BigInteger(), nullable=True))
    op.create_check_constraint(op.f("ck_accounts_status_known"), "accounts", "status IN ('open', 'frozen', 'closed')")
    op.create_check_constraint(
        op.f("ck_accounts_limits_not_negative"), "accounts", "overdraft_limit >= 0 AND max_balance >= 0"
    )
    op.drop_constraint(op.f("ck_accounts_balance_not_negative"), "accounts", type_="check")
    op.create_check_constraint(op.f("ck_accounts_balance_not_negative"), "accounts", BALANCE_CHECK)
    op.create_check_constraint(op.f("ck_accounts_within_max_balance"), "accounts", MAX_BALANCE_CHECK)
    op.create_check_constraint(op.f("ck_accounts_closed_empty"), "accounts", CLOSED_CHECK)

    op.create_table(
        "account_changes",
        sa.Column("account_id", sa.Text(), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("changed_at", sa.TIMESTAMP(timezone=True), nullable=False),
        # The API key that made the change (its id), `LEDGER_ADMIN_KEY`, or `cli`.
        sa.Column("changed_by", sa.Text(), nullable=True),
        # Only the fields that changed, before and after.
        sa.Column("before", JSONB(), nullable=False),
        sa.Column("after", JSONB(), nullable=False),
        sa.Column("state", JSONB(), nullable=False),
        sa.Column("hash", sa.LargeBinary(), nullable=False),
        sa.Column("key_id", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("account_id", "sequence", name=op.f("pk_account_changes")),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name=op.f("fk_account_changes_account_id_accounts")),
        sa.CheckConstraint("sequence >= 0", name=op.f("ck_account_changes_sequence_not_negative")),
        sa.CheckConstraint("octet_length(hash) = 32", name=op.f("ck_account_changes_hash_length")),
        sa.CheckConstraint(
            "jsonb_typeof(before) = 'object' AND jsonb_typeof(after) = 'object'",
            name=op.f("ck_account_changes_objects"),
        ),
    )
    op.execute(
        "CREATE TRIGGER account_changes_append_only BEFORE UPDATE OR DELETE ON account_changes "
        "FOR EACH ROW EXECUTE FUNCTION ledger_refuse_journal_change()"
    )
    op.execute(
        "CREATE TRIGGER account_changes_no_truncate BEFORE TRUNCATE ON account_changes "
        "FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_journal_change()"
    )

    op.add_column("transfers", sa.Column("imported_at", sa.TIMESTAMP(timezone=True), nullable=True))
    op.create_check_constraint(
        op.f("ck_transfers_imported_posted"),
        "transfers",
        "imported_at IS NULL OR (imported_at <= created_at AND NOT pending)",
    )
    for table in ("event_outbox", "events"):
        op.add_column(table, sa.Column("change_sequence", sa.BigInteger(), nullable=True))
        op.create_check_constraint(
            op.f(f"ck_{table}_change_names_sequence"),
            table,
            CHANGE_SEQUENCE_CHECK,
        )
    for table in ("accounts", "transfers"):
        op.create_index(
            f"ix_{table}_metadata",
            table,
            ["metadata"],
            postgresql_using="gin",
            postgresql_ops={"metadata": "jsonb_path_ops"},
            postgresql_where=sa.text(NON_EMPTY),
        )

    # Balances as of an instant count the reservations alive then, among them those
    # settled after it: found by when they were settled, among pending transfers only.
    op.create_index("ix_transfers_pending_updated_at", "transfers", ["updated_at"], postgresql_where=sa.text("pending"))

    op.execute(
        f"GRANT UPDATE (status, overdraft_limit, max_balance, name, metadata, seal, seal_key) ON accounts TO {SERVICE_ROLE}"
    )
    op.execute(f"GRANT SELECT, INSERT ON account_changes TO {SERVICE_ROLE}")


def downgrade() -> None:
    op.execute(f"REVOKE ALL ON account_changes FROM {SERVICE_ROLE}")
    op.execute(
        f"REVOKE UPDATE (status, overdraft_limit, max_balance, name, metadata, seal, seal_key) ON accounts "
        f"FROM {SERVICE_ROLE}"
    )
    op.drop_index("ix_transfers_pending_updated_at", table_name="transfers")
    for table in ("accounts", "transfers"):
        op.drop_index(f"ix_{table}_metadata", table_name=table)
    for table in ("event_outbox", "events"):
        op.drop_constraint(op.f(f"ck_{table}_change_names_sequence"), table, type_="check")
        op.drop_column(table, "change_sequence")
    op.drop_constraint(op.f("ck_transfers_imported_posted"), "transfers", type_="check")
    op.drop_column("transfers", "imported_at")
    op.drop_table("account_changes")
    op.drop_constraint(op.f("ck_accounts_closed_empty"), "accounts", type_="check")
    op.drop_constraint(op.f("ck_accounts_within_max_balance"), "accounts", type_="check")
    op.drop_constraint(op.f("ck_accounts_balance_not_negative"), "accounts", type_="check")
    op.create_check_constraint(op.f("ck_accounts_balance_not_negative"), "accounts", OLD_BALANCE_CHECK)
    op.drop_constraint(op.f("ck_accounts_limits_not_negative"), "accounts", type_="check")
    op.drop_constraint(op.f("ck_accounts_status_known"), "accounts", type_="check")
    op.drop_column("accounts", "max_balance")
    op.drop_column("accounts", "overdraft_limit")
    op.drop_column("accounts", "status")
