"""Core ledger: accounts, transfers (every outcome of every id) and the per-account journal.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Names are wrapped in op.f(): they are final, so the naming convention of the models'
# metadata (which Alembic applies to operations) must not prefix them a second time.
IDENTIFIER = "^[A-Za-z0-9._:-]{1,64}$"
CURRENCY = "^[A-Z]{3}$"
TIMESTAMP = postgresql.TIMESTAMP(timezone=True)


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("currency", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=True),
        sa.Column("allow_negative_balance", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("metadata", postgresql.JSONB(), server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.Column("debits_posted", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("credits_posted", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("pending_debits", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("pending_credits", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("entries_count", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_entry_hash", sa.LargeBinary(), nullable=True),
        sa.Column("last_entry_at", TIMESTAMP, nullable=True),
        sa.Column("created_at", TIMESTAMP, server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_accounts"),
        sa.CheckConstraint(f"id ~ '{IDENTIFIER}'", name=op.f("ck_accounts_id_format")),
        sa.CheckConstraint(f"currency ~ '{CURRENCY}'", name=op.f("ck_accounts_currency_format")),
        sa.CheckConstraint("char_length(name) BETWEEN 1 AND 256", name=op.f("ck_accounts_name_length")),
        sa.CheckConstraint("jsonb_typeof(metadata) = 'object'", name=op.f("ck_accounts_metadata_object")),
        sa.CheckConstraint(
            "debits_posted >= 0 AND credits_posted >= 0 AND pending_debits >= 0 AND pending_credits >= 0",
            name=op.f("ck_accounts_totals_not_negative"),
        ),
        sa.CheckConstraint("entries_count >= 0", name=op.f("ck_accounts_entries_count_not_negative")),
        sa.CheckConstraint(
            "allow_negative_balance OR credits_posted::numeric - debits_posted - pending_debits >= 0",
            name=op.f("ck_accounts_balance_not_negative"),
        ),
        sa.CheckConstraint(
            "last_entry_hash IS NULL OR octet_length(last_entry_hash) = 32",
            name=op.f("ck_accounts_last_entry_hash_length"),
        ),
    )
    op.create_index("ix_accounts_currency_id", "accounts", ["currency", "id"])

    op.create_table(
        "transfers",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("debit_account_id", sa.Text(), nullable=False),
        sa.Column("credit_account_id", sa.Text(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.Text(), nullable=True),
        sa.Column("pending", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("code", sa.Text(), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("metadata", postgresql.JSONB(), server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.Column("request_hash", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_transfers"),
        sa.CheckConstraint(f"id ~ '{IDENTIFIER}'", name=op.f("ck_transfers_id_format")),
        sa.CheckConstraint("amount > 0", name=op.f("ck_transfers_amount_positive")),
        sa.CheckConstraint(f"currency ~ '{CURRENCY}'", name=op.f("ck_transfers_currency_format")),
        sa.CheckConstraint(
            "status IN ('posted', 'pending', 'voided', 'expired', 'rejected')", name=op.f("ck_transfers_status_known")
        ),
        sa.CheckConstraint("(status = 'rejected') = (code IS NOT NULL)", name=op.f("ck_transfers_code_iff_rejected")),
        sa.CheckConstraint(
            "status = 'rejected' OR debit_account_id <> credit_account_id", name=op.f("ck_transfers_accounts_different")
        ),
        sa.CheckConstraint(
            "status = 'rejected' OR currency IS NOT NULL", name=op.f("ck_transfers_currency_when_applied")
        ),
        sa.CheckConstraint("char_length(description) <= 512", name=op.f("ck_transfers_description_length")),
        sa.CheckConstraint("jsonb_typeof(metadata) = 'object'", name=op.f("ck_transfers_metadata_object")),
        sa.CheckConstraint("octet_length(request_hash) = 32", name=op.f("ck_transfers_request_hash_length")),
        sa.CheckConstraint("updated_at >= created_at", name=op.f("ck_transfers_updated_after_created")),
    )
    op.create_index("ix_transfers_created_at_id", "transfers", ["created_at", "id"])
    op.create_index(
        "ix_transfers_debit_account_id_created_at_id", "transfers", ["debit_account_id", "created_at", "id"]
    )
    op.create_index(
        "ix_transfers_credit_account_id_created_at_id", "transfers", ["credit_account_id", "created_at", "id"]
    )

    op.create_table(
        "entries",
        sa.Column("account_id", sa.Text(), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("transfer_id", sa.Text(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("balance_after", sa.BigInteger(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("hash", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("account_id", "sequence", name="pk_entries"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name="fk_entries_account_id_accounts"),
        sa.ForeignKeyConstraint(["transfer_id"], ["transfers.id"], name="fk_entries_transfer_id_transfers"),
        sa.UniqueConstraint("transfer_id", "account_id", name="uq_entries_transfer_id_account_id"),
        sa.CheckConstraint("sequence >= 1", name=op.f("ck_entries_sequence_positive")),
        sa.CheckConstraint("amount <> 0", name=op.f("ck_entries_amount_not_zero")),
        sa.CheckConstraint("octet_length(hash) = 32", name=op.f("ck_entries_hash_length")),
    )
    op.create_index("ix_entries_account_id_created_at_sequence", "entries", ["account_id", "created_at", "sequence"])


def downgrade() -> None:
    op.drop_index("ix_entries_account_id_created_at_sequence", table_name="entries")
    op.drop_table("entries")
    op.drop_index("ix_transfers_credit_account_id_created_at_id", table_name="transfers")
    op.drop_index("ix_transfers_debit_account_id_created_at_id", table_name="transfers")
    op.drop_index("ix_transfers_created_at_id", table_name="transfers")
    op.drop_table("transfers")
    op.drop_index("ix_accounts_currency_id", table_name="accounts")
    op.drop_table("accounts")
