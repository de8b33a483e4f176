"""Running the ledger spread out: PgBouncer, a streaming replica, several instances behind HAProxy (issue 13)."""
