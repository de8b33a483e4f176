"""Apply Alembic migrations from code (`ledger migrate`, `ledger serve`, tests)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

# The migrations live beside the package, at the top of the repository: the service is
# installed editable (`pip install -e .`), in development and in the Docker image alike.
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(database_url: str, pooler: str = "none") -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Passed as an attribute rather than an option: ConfigParser would interpret any
    # `%` in a password.
    config.attributes["database_url"] = database_url
    # LEDGER_DATABASE_POOLER: migrations may go through the same pooler as serving.
    config.attributes["database_pooler"] = pooler
    return config


def upgrade(database_url: str, revision: str = "head", *, pooler: str = "none") -> None:
    command.upgrade(alembic_config(database_url, pooler), revision)


def downgrade(database_url: str, revision: str) -> None:
    command.downgrade(alembic_config(database_url), revision)


def head_revision() -> str:
    heads = ScriptDirectory.from_config(alembic_config("")).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"migrations must have exactly one head, found {heads}")
    return heads[0]
