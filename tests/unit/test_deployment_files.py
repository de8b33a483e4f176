"""docker-compose.yml and the Dockerfile cannot be run here (no Docker engine), so their
contract with the service is checked statically: they parse, PostgreSQL is pinned and
health-checked with a volume, and every variable the service is given is one it reads."""

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
    url = environment["LEDGER_DATABASE_URL"]
    assert normalize_database_url(url).startswith("postgresql+asyncpg://")
    assert "@postgres:" in url, "the service reaches PostgreSQL by its compose service name"
    assert ledger["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert ledger["build"] == "." and (ROOT / "Dockerfile").exists()


def test_the_image_serves_the_migrations_it_needs() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for needed in ("COPY ledger", "COPY migrations", "pip install -e .", 'ledger", "serve'):
        assert needed in dockerfile, needed
