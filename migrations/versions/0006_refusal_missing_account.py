"""A refusal for a missing account records which account was missing.

`transfers.missing_account` ("debit", "credit" or "both", for `account_not_found` only)
is decided with the refusal and stored with it, so that its answer can name the
account(s) on every replay, forever. Rows recorded before this revision have none and
keep their wording. The column is sealed only when it is set (`ledger.integrity`), so
existing seals stay valid.

The serving role inserts it: INSERT on `transfers` is granted on the whole table
(revision 0005), which covers a column added later; UPDATE is granted per column and
this one is not among them (a refusal never changes).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

CHECK = "missing_account IS NULL OR (code = 'account_not_found' AND missing_account IN ('debit', 'credit', 'both'))"


def upgrade() -> None:
    # Nullable, without a default: no row is rewritten (validating the CHECK reads them once).
    op.add_column("transfers", sa.Column("missing_account", sa.Text(), nullable=True))
    op.create_check_constraint(op.f("ck_transfers_missing_account_known"), "transfers", CHECK)


def downgrade() -> None:
    op.drop_constraint(op.f("ck_transfers_missing_account_known"), "transfers", type_="check")
    op.drop_column("transfers", "missing_account")
