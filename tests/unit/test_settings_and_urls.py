"""Settings from the environment and the database URL forms operators paste."""

from __future__ import annotations

from pathlib import Path

import pytest

from ledger.database import DatabaseUrlError, libpq_url, normalize_database_url
from ledger.settings import Settings, SettingsError


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u:p@h:5432/db", "postgresql+asyncpg://u:p@h:5432/db"),
        ("postgres://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("postgresql+asyncpg://u:p%40x@h/db", "postgresql+asyncpg://u:p%40x@h/db"),
        ("postgresql://u@h/db?sslmode=require", "postgresql+asyncpg://u@h/db?ssl=require"),
    ],
)
def test_libpq_and_sqlalchemy_url_forms_are_both_accepted(given: str, expected: str) -> None:
    assert normalize_database_url(given) == expected


def test_urls_for_other_databases_are_refused_clearly() -> None:
    with pytest.raises(DatabaseUrlError, match="postgresql://"):
        normalize_database_url("mysql://u@h/db")


def test_libpq_form_round_trips_for_command_line_tools() -> None:
    assert libpq_url("postgresql+asyncpg://u@h/db?ssl=require") == "postgresql://u@h/db?sslmode=require"


def test_settings_are_read_from_ledger_variables() -> None:
    settings = Settings.from_env(
        {
            "LEDGER_POOL_SIZE": "7",
            "LEDGER_POOL_PRE_PING": "off",
            "LEDGER_DATA_DIR": "/srv/ledger",
            "LEDGER_POOL_TIMEOUT_SECONDS": "2.5",
        }
    )
    assert settings.pool_size == 7 and settings.pool_pre_ping is False
    assert settings.data_dir == Path("/srv/ledger") and settings.pool_timeout_seconds == 2.5


@pytest.mark.parametrize(
    "environment",
    [
        {"LEDGER_POOL_SIZE": "many"},
        {"LEDGER_POOL_SIZE": "0"},
        {"LEDGER_POOL_PRE_PING": "perhaps"},
        {"LEDGER_LOCK_TIMEOUT_MS": "20000", "LEDGER_STATEMENT_TIMEOUT_MS": "10000"},
        {"LEDGER_DEFAULT_PAGE_SIZE": "2000"},
    ],
)
def test_unusable_settings_fail_at_start_with_the_variable_named(environment: dict[str, str]) -> None:
    with pytest.raises(SettingsError, match="LEDGER_"):
        Settings.from_env(environment)
