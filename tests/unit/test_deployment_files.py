"""docker-compose.yml and the Dockerfile cannot be run here (no Docker engine), so their
contract with the service is checked statically: they parse, PostgreSQL is pinned and
health-checked with a volume, every variable the service is given is one it reads, it
serves as a least-privileged role and migrates as the owner, and its secrets come from
the environment, not from the file."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from ledger.database import normalize_database_url
from ledger.settings import setting_names

ROOT = Path(__file__).resolve().parents[2]


def test_compose_runs_a_pinned_healthy_postgres_with_a_volume() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    postgres = compose["services"]["postgres"]
    assert re.fullmatch(r"postgres:\d+(\.\d+)?", postgres["image"]), "pin the PostgreSQL major version"
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    volume = postgres["volumes"][0].split(":")[0]
    assert volume in compose["volumes"]


def test_compose_wires_the_service_through_settings_it_reads() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    ledger = compose["services"]["ledger"]
    environment = ledger["environment"]
    assert set(environment) <= set(setting_names()), set(environment) - set(setting_names())
    for name in ("LEDGER_DATABASE_URL", "LEDGER_MIGRATION_DATABASE_URL"):
        url = environment[name]
        assert normalize_database_url(url).startswith("postgresql+asyncpg://")
        assert "@postgres:" in url, "the service reaches PostgreSQL by its compose service name"
    assert ledger["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert ledger["build"] == "." and (ROOT / "Dockerfile").exists()


def test_compose_serves_as_the_least_privileged_role_it_creates() -> None:
    """The serving URL's user is the login the init script makes a member of
    ledger_service; migrations run as the owner (POSTGRES_USER); the data directory
    (chain keys, checkpoints) is a volume of its own; no secret is written in the file."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    environment = compose["services"]["ledger"]["environment"]
    # The URLs hold ${...:?...} interpolations, which no URL parser reads as a password.
    serving = re.match(r"postgresql://([^:]+):", environment["LEDGER_DATABASE_URL"]).group(1)  # type: ignore[union-attr]
    owner = re.match(r"postgresql://([^:]+):", environment["LEDGER_MIGRATION_DATABASE_URL"]).group(1)  # type: ignore[union-attr]
    assert owner == compose["services"]["postgres"]["environment"]["POSTGRES_USER"] and serving != owner
    init = compose["configs"]["ledger-roles"]["content"]
    assert f"CREATE ROLE {serving} LOGIN" in init and "IN ROLE ledger_service" in init
    assert "/docker-entrypoint-initdb.d/" in compose["services"]["postgres"]["configs"][0]["target"]
    data_dir = environment["LEDGER_DATA_DIR"]
    assert any(volume.endswith(f":{data_dir}") for volume in compose["services"]["ledger"]["volumes"])
    text = (ROOT / "docker-compose.yml").read_text()
    for secret in ("LEDGER_ADMIN_KEY", "LEDGER_OWNER_PASSWORD", "LEDGER_APP_PASSWORD"):
        assert re.search(rf"\$\{{{secret}:\?", text), f"{secret} must come from the environment, required"


def test_the_image_serves_the_migrations_it_needs() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for needed in ("COPY ledger", "COPY migrations", "pip install -e .", 'ledger", "serve', "USER ledger"):
        assert needed in dockerfile, needed
