"""LEDGER_DATABASE_POOLER: what the service sends a transaction pooler (the real PgBouncer
is in tests/e2e/test_pgbouncer.py)."""

from __future__ import annotations

import pytest

from ledger.database import driver_arguments, server_settings, transaction_settings, with_transaction_settings
from ledger.settings import Settings, SettingsError

# The startup parameters PgBouncer 1.18 tracks and restores on every server connection it
# hands a client (pgbouncer(5), ignore_startup_parameters): it refuses any other.
PGBOUNCER_TRACKED = {"client_encoding", "datestyle", "timezone", "standard_conforming_strings", "application_name"}


def test_a_pooler_the_service_does_not_know_is_one_line() -> None:
    with pytest.raises(
        SettingsError, match=r"^LEDGER_DATABASE_POOLER must be one of none, transaction, got 'session'$"
    ):
        Settings.from_env({"LEDGER_DATABASE_POOLER": "session"})
    assert Settings.from_env({}).database_pooler == "none"
    assert Settings.from_env({"LEDGER_DATABASE_POOLER": "transaction"}).database_pooler == "transaction"


def test_behind_a_transaction_pooler_only_tracked_startup_parameters_and_no_named_statements() -> None:
    pooled = Settings(database_pooler="transaction")
    assert {name.lower() for name in server_settings(pooled)} <= PGBOUNCER_TRACKED
    arguments = driver_arguments(pooled)
    assert arguments["statement_cache_size"] == 0 and arguments["prepared_statement_cache_size"] == 0
    assert arguments["prepared_statement_name_func"]() == ""
    # Without it: the session settings at connect, asyncpg's and SQLAlchemy's caches.
    direct = driver_arguments(Settings())
    assert "lock_timeout" in direct["server_settings"] and "statement_cache_size" not in direct


def test_the_limits_come_with_the_begin_and_a_callers_own_set_local_still_wins() -> None:
    limits = transaction_settings(Settings(lock_timeout_ms=1500, statement_timeout_ms=7000))
    assert limits.startswith("SET LOCAL lock_timeout = 1500; SET LOCAL statement_timeout = 7000;")
    assert with_transaction_settings("BEGIN;", limits) == f"BEGIN; {limits}"
    assert (
        with_transaction_settings("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;", limits)
        == f"BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; {limits}"
    )
    assert with_transaction_settings("BEGIN; SET LOCAL lock_timeout = 250", limits) == (
        f"BEGIN; {limits}; SET LOCAL lock_timeout = 250"
    )
