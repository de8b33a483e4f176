"""Two-phase transfers (pending, post, void, expiry) and reversals.

A pending transfer's state lives on its `transfers` row (status, posted_amount,
updated_at); the journal (`entries`) only ever gains rows, when money is posted.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TIMESTAMP = postgresql.TIMESTAMP(timezone=True)

CHECKS = {
    "ck_transfers_timeout_range": "timeout_seconds BETWEEN 1 AND 2592000",
    "ck_transfers_expiry_only_when_pending": "(expires_at IS NULL AND timeout_seconds IS NULL) OR pending",
    "ck_transfers_pending_status": "pending OR status IN ('posted', 'rejected')",
    "ck_transfers_posted_amount_range": "posted_amount BETWEEN 1 AND amount",
    "ck_transfers_posted_amount_when_posted": "(posted_amount IS NOT NULL) = (pending AND status = 'posted')",
    "ck_transfers_reversed_amount_range": "reversed_amount >= 0 AND reversed_amount <= COALESCE(posted_amount, amount)",
    "ck_transfers_reversal_not_pending": "reversal_of IS NULL OR NOT pending",
}


def upgrade() -> None:
    op.add_column("transfers", sa.Column("timeout_seconds", sa.Integer(), nullable=True))
    op.add_column("transfers", sa.Column("expires_at", TIMESTAMP, nullable=True))
    op.add_column("transfers", sa.Column("posted_amount", sa.BigInteger(), nullable=True))
    op.add_column("transfers", sa.Column("reversal_of", sa.Text(), nullable=True))
    op.add_column(
        "transfers", sa.Column("reversed_amount", sa.BigInteger(), server_default=sa.text("0"), nullable=False)
    )
    op.create_foreign_key(op.f("fk_transfers_reversal_of_transfers"), "transfers", "transfers", ["reversal_of"], ["id"])
    for name, condition in CHECKS.items():
        op.create_check_constraint(op.f(name), "transfers", condition)
    # The sweeper and the lazy expiry look for due reservations, overall and per account.
    op.create_index(
        "ix_transfers_expires_at", "transfers", ["expires_at"], postgresql_where=sa.text("status = 'pending'")
    )
    op.create_index(
        "ix_transfers_debit_account_id_expires_at",
        "transfers",
        ["debit_account_id", "expires_at"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index(
        "ix_transfers_credit_account_id_expires_at",
        "transfers",
        ["credit_account_id", "expires_at"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index(
        "ix_transfers_reversal_of", "transfers", ["reversal_of"], postgresql_where=sa.text("reversal_of IS NOT NULL")
    )


def downgrade() -> None:
    op.drop_index("ix_transfers_reversal_of", table_name="transfers")
    op.drop_index("ix_transfers_credit_account_id_expires_at", table_name="transfers")
    op.drop_index("ix_transfers_debit_account_id_expires_at", table_name="transfers")
    op.drop_index("ix_transfers_expires_at", table_name="transfers")
    for name in CHECKS:
        op.drop_constraint(op.f(name), "transfers", type_="check")
    op.drop_constraint(op.f("fk_transfers_reversal_of_transfers"), "transfers", type_="foreignkey")
    for column in ("reversed_amount", "reversal_of", "posted_amount", "expires_at", "timeout_seconds"):
        op.drop_column("transfers", column)
