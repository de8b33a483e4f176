"""Trust boundaries: a least-privilege role to serve with, keyed chains and sealed rows,
ids made only of dots refused.

- `ledger_service` (NOLOGIN) holds exactly what the service needs: SELECT and INSERT on
  every table, UPDATE only on the columns that change after a row is written (balances
  and chain heads of accounts; status, amounts posted or reversed and the seal of
  transfers; revocation of API keys), nothing on the journal but SELECT and INSERT. No
  DELETE, no TRUNCATE, no DDL, no ownership: it cannot disable the append-only triggers.
  The role that serves logs in as a member of it (`GRANT ledger_service TO ...`); the
  role that runs migrations owns the tables. Creating the role needs CREATEROLE; where
  the migration role lacks it, a superuser creates it first (README, "Database roles").
- `entries.key_id` names the chain key of each entry's hash (empty: the SHA-256 chain of
  earlier versions); transfers, accounts and API keys gain `seal` and `seal_key`
  (`ledger.integrity`). Rows written before this revision stay unsealed until
  `ledger audit seal-legacy` seals them.
- `.` and `..` are not identifiers: `/v1/accounts/./entries` would be ambiguous.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

SERVICE_ROLE = "ledger_service"
IDENTIFIER = "id ~ '^[A-Za-z0-9._:-]{1,64}$' AND id !~ '^\\.+$'"
OLD_IDENTIFIER = "id ~ '^[A-Za-z0-9._:-]{1,64}$'"
SEALED = ("accounts", "transfers", "api_keys")

# What the service may do, table by table. UPDATE is granted per column.
GRANTS = {
    "alembic_version": ("SELECT",),
    "accounts": (
        "SELECT",
        "INSERT",
        "UPDATE (debits_posted, credits_posted, pending_debits, pending_credits, entries_count, last_entry_hash, "
        "last_entry_at)",
    ),
    "transfers": ("SELECT", "INSERT", "UPDATE (status, posted_amount, reversed_amount, updated_at, seal, seal_key)"),
    "entries": ("SELECT", "INSERT"),
    "api_keys": ("SELECT", "INSERT", "UPDATE (revoked_at, revoked_by)"),
}


def upgrade() -> None:
    op.add_column("entries", sa.Column("key_id", sa.Text(), server_default=sa.text("''"), nullable=False))
    op.alter_column("entries", "key_id", server_default=None)
    op.create_check_constraint(op.f("ck_entries_key_id_format"), "entries", "key_id ~ '^([a-z0-9][a-z0-9_-]{0,31})?$'")
    for table in SEALED:
        op.add_column(table, sa.Column("seal", sa.LargeBinary(), nullable=True))
        op.add_column(table, sa.Column("seal_key", sa.Text(), nullable=True))
        op.create_check_constraint(
            op.f(f"ck_{table}_seal_shape"),
            table,
            "(seal IS NULL) = (seal_key IS NULL) AND (seal IS NULL OR octet_length(seal) = 32)",
        )
    op.add_column("api_keys", sa.Column("created_by", sa.Text(), nullable=True))
    op.add_column("api_keys", sa.Column("revoked_by", sa.Text(), nullable=True))
    for table in ("accounts", "transfers"):
        op.drop_constraint(op.f(f"ck_{table}_id_format"), table, type_="check")
        op.create_check_constraint(op.f(f"ck_{table}_id_format"), table, IDENTIFIER)

    op.execute(
        f"""
        DO $$
        BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{SERVICE_ROLE}') THEN
                CREATE ROLE {SERVICE_ROLE} NOLOGIN;
            END IF;
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN
                NULL;  -- created by a concurrent migration of another database
            WHEN insufficient_privilege THEN
                RAISE EXCEPTION 'the migration role may not create the role {SERVICE_ROLE}'
                    USING HINT = 'as a superuser: CREATE ROLE {SERVICE_ROLE} NOLOGIN; then migrate again';
        END
        $$
        """
    )
    op.execute(f"DO $$ BEGIN EXECUTE format('GRANT USAGE ON SCHEMA %I TO {SERVICE_ROLE}', current_schema()); END $$")
    for table, privileges in GRANTS.items():
        for privilege in privileges:
            op.execute(f"GRANT {privilege} ON {table} TO {SERVICE_ROLE}")


def downgrade() -> None:
    for table in GRANTS:
        op.execute(f"REVOKE ALL ON {table} FROM {SERVICE_ROLE}")
    op.execute(f"DO $$ BEGIN EXECUTE format('REVOKE USAGE ON SCHEMA %I FROM {SERVICE_ROLE}', current_schema()); END $$")
    # The role itself stays: other databases of the cluster may use it.
    for table in ("accounts", "transfers"):
        op.drop_constraint(op.f(f"ck_{table}_id_format"), table, type_="check")
        op.create_check_constraint(op.f(f"ck_{table}_id_format"), table, OLD_IDENTIFIER)
    op.drop_column("api_keys", "revoked_by")
    op.drop_column("api_keys", "created_by")
    for table in SEALED:
        op.drop_constraint(op.f(f"ck_{table}_seal_shape"), table, type_="check")
        op.drop_column(table, "seal_key")
        op.drop_column(table, "seal")
    op.drop_constraint(op.f("ck_entries_key_id_format"), "entries", type_="check")
    op.drop_column("entries", "key_id")
