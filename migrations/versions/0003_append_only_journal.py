"""The journal is append-only, enforced by PostgreSQL itself.

Row triggers refuse UPDATE and DELETE on `entries`; a statement trigger refuses TRUNCATE
(which does not fire row triggers). The service never needs either: a transfer's history
changes only by new entries (reversals), and pending transfers keep their state on their
`transfers` row.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION ledger_refuse_journal_change() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'the journal is append-only: % on % is not allowed', TG_OP, TG_TABLE_NAME
                USING ERRCODE = 'insufficient_privilege';
        END
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER entries_append_only BEFORE UPDATE OR DELETE ON entries "
        "FOR EACH ROW EXECUTE FUNCTION ledger_refuse_journal_change()"
    )
    op.execute(
        "CREATE TRIGGER entries_no_truncate BEFORE TRUNCATE ON entries "
        "FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_journal_change()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER entries_no_truncate ON entries")
    op.execute("DROP TRIGGER entries_append_only ON entries")
    op.execute("DROP FUNCTION ledger_refuse_journal_change()")
