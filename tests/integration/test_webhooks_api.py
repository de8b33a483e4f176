"""Webhook subscriptions over HTTP: what may be subscribed (the allow-list against
server-side request forgery), the secret shown once and derived, not stored, and the
subscription's life (listed, found, deleted: its pending deliveries cancelled)."""

from __future__ import annotations

import dataclasses

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.http.app import create_app
from ledger.integrity import parse_keyring
from ledger.service.webhooks import derive_secret
from ledger.settings import Settings
from tests import provision
from tests.integration.helpers import assert_problem

REFUSED_TARGETS = [
    "http://10.0.0.1/hook",  # a private network
    "http://169.254.169.254/latest/meta-data/",  # a cloud metadata service
    "http://[fd00::1]/hook",
    "http://0.0.0.0:8000/",
    "http://user:secret@127.0.0.1/hook",  # credentials in the URL
    "ftp://127.0.0.1/hook",
    "file:///etc/passwd",
    "http:///no-host",
    "http://127.0.0.1:99999/",  # no such port
    "http://example.invalid/hook",  # not resolvable, not listed
]


@pytest.mark.parametrize("url", REFUSED_TARGETS)
async def test_targets_outside_the_allow_list_are_refused_and_nothing_is_stored(
    client: AsyncTestClient, engine: AsyncEngine, url: str
) -> None:
    async with engine.connect() as connection:
        before = await connection.scalar(text("SELECT count(*) FROM webhooks"))
    assert_problem(await client.post("/v1/webhooks", json={"url": url}), 422, "webhook_url_not_allowed")
    async with engine.connect() as connection:
        assert await connection.scalar(text("SELECT count(*) FROM webhooks")) == before


async def test_bodies_that_are_not_a_subscription_are_400(client: AsyncTestClient) -> None:
    for body in (
        {},
        {"url": ""},
        {"url": "http://127.0.0.1/x", "types": []},
        {"url": "http://127.0.0.1/x", "types": ["transfer.exploded"]},
        {"url": "http://127.0.0.1/x", "secret": "mine"},
        {"url": 5},
    ):
        assert_problem(await client.post("/v1/webhooks", json=body), 400, "validation_error")


async def test_a_subscription_is_listed_without_its_secret_and_deleted_for_good(
    client: AsyncTestClient, engine: AsyncEngine
) -> None:
    created = await client.post(
        "/v1/webhooks", json={"url": "http://localhost:9/orders", "types": ["transfer.posted", "transfer.voided"]}
    )
    assert created.status_code == 201, created.text
    webhook = created.json()
    assert created.headers["cache-control"] == "no-store"
    assert webhook["secret"].startswith("whsec_") and len(webhook["secret"]) > 40
    assert webhook["types"] == ["transfer.posted", "transfer.voided"] and webhook["status"] == "active"
    fetched = (await client.get(f"/v1/webhooks/{webhook['id']}")).json()
    assert "secret" not in fetched and fetched["url"] == "http://localhost:9/orders"
    listed = []
    cursor = None
    while True:
        page = (await client.get("/v1/webhooks", params={"limit": 1, **({"cursor": cursor} if cursor else {})})).json()
        listed += page["data"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert webhook["id"] in [w["id"] for w in listed]
    # The secret is nowhere in the database: it is derived from the chain key.
    async with engine.connect() as connection:
        row = (
            (await connection.execute(text("SELECT * FROM webhooks WHERE id = :id"), {"id": webhook["id"]}))
            .mappings()
            .one()
        )
    assert webhook["secret"] not in repr(dict(row))
    keyring = parse_keyring(provision.CHAIN_KEYS)
    assert derive_secret(keyring, row["secret_key"], row["id"], row["secret_nonce"]) == webhook["secret"]
    # A pending delivery is cancelled with its subscription.
    async with engine.begin() as connection:
        await connection.execute(
            text(
                "INSERT INTO webhook_deliveries (webhook_id, event_position, event_type, body, status, attempts, "
                "created_at, next_attempt_at) VALUES (:id, 1, 'transfer.posted', '\\x7b7d', 'pending', 0, now(), "
                "now() + interval '1 hour')"
            ),
            {"id": webhook["id"]},
        )
    deleted = await client.delete(f"/v1/webhooks/{webhook['id']}")
    assert deleted.status_code == 200 and deleted.json()["status"] == "deleted"
    assert (await client.delete(f"/v1/webhooks/{webhook['id']}")).json()["status"] == "deleted"
    (delivery,) = (await client.get(f"/v1/webhooks/{webhook['id']}/deliveries")).json()["data"]
    assert delivery["status"] == "cancelled" and delivery["next_attempt_at"] is None
    assert webhook["id"] not in [
        w["id"] for w in (await client.get("/v1/webhooks", params={"limit": 1000})).json()["data"]
    ]
    assert_problem(await client.get("/v1/webhooks/wh_nope"), 404, "webhook_not_found")


async def test_the_allow_list_setting_opens_what_it_names_only(settings: Settings) -> None:
    custom = dataclasses.replace(settings, webhook_allowed_hosts="hooks.example.com,*.partner.test,10.1.0.0/16")
    async with AsyncTestClient(create_app(custom)) as client:
        client.headers.update(provision.API_HEADERS)
        for url in ("https://hooks.example.com/x", "https://a.partner.test/x", "http://10.1.2.3/x"):
            assert (await client.post("/v1/webhooks", json={"url": url})).status_code == 201, url
        for url in ("http://127.0.0.1/x", "http://10.2.0.1/x", "https://partner.test/x", "https://evil.example.com/x"):
            assert_problem(await client.post("/v1/webhooks", json={"url": url}), 422, "webhook_url_not_allowed")
