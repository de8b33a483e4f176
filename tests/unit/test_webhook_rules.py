"""The pure parts of webhooks: the allow-list against server-side request forgery, the
retry schedule, and the secret derived from the chain key."""

from __future__ import annotations

import dataclasses
import statistics

import pytest

from ledger.errors import WebhookUrlNotAllowed
from ledger.integrity import ChainKey, Keyring
from ledger.service.webhooks import Webhooks, check_target, derive_secret, parse_allowed_hosts
from ledger.settings import Settings, SettingsError

DEFAULT = parse_allowed_hosts(Settings().webhook_allowed_hosts)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "http://localhost/hook",
        "https://[::1]:9443/x",
        "http://127.9.9.9/",
        "http://LOCALHOST/",
    ],
)
async def test_loopback_is_allowed_by_default(url: str) -> None:
    await check_target(url, DEFAULT)


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/",
        "http://192.168.1.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:10.0.0.1]/",  # an IPv4 address in IPv6 clothing
        "http://[fe80::1]/",
        "http://167772161/",  # 10.0.0.1 written as one number: resolved, then refused
        "http://localhost.evil.test/",
        "gopher://127.0.0.1/",
        "http://a:b@localhost/",
    ],
)
async def test_everything_else_is_refused_by_default(url: str) -> None:
    with pytest.raises(WebhookUrlNotAllowed):
        await check_target(url, DEFAULT)


async def test_names_suffixes_networks_and_star() -> None:
    rules = parse_allowed_hosts("hooks.example.com, *.partner.test, 10.1.0.0/16, 2001:db8::/32")
    await check_target("https://hooks.example.com/x", rules)
    await check_target("https://deep.a.partner.test/x", rules)
    await check_target("http://10.1.200.3/x", rules)
    await check_target("http://[2001:db8::5]/x", rules)
    for url in ("https://partner.test/x", "https://xhooks.example.com/x", "http://10.2.0.1/", "http://127.0.0.1/"):
        with pytest.raises(WebhookUrlNotAllowed):
            await check_target(url, rules)
    await check_target("http://10.9.9.9/", parse_allowed_hosts("*"))
    with pytest.raises(SettingsError):
        parse_allowed_hosts("exa mple.com")


def test_retries_back_off_exponentially_with_jitter_up_to_the_cap() -> None:
    settings = dataclasses.replace(Settings(), webhook_backoff_base_seconds=1.0, webhook_backoff_max_seconds=60.0)
    webhooks = Webhooks.__new__(Webhooks)
    webhooks._settings = settings  # type: ignore[attr-defined]
    for attempt, ceiling in ((1, 1), (2, 2), (3, 4), (6, 32), (7, 60), (50, 60)):
        delays = [webhooks.backoff_seconds(attempt) for _ in range(200)]
        assert ceiling / 2 <= min(delays) and max(delays) <= ceiling
        assert len(set(delays)) > 100, "no jitter"
        assert statistics.median(delays) == pytest.approx(ceiling * 0.75, rel=0.15)


def test_the_secret_depends_on_the_chain_key_the_id_and_the_nonce() -> None:
    keyring = Keyring([ChainKey("k1", b"a" * 32), ChainKey("k0", b"b" * 32)])
    secret = derive_secret(keyring, "k1", "wh_1", b"n" * 16)
    assert secret.startswith("whsec_") and secret == derive_secret(keyring, "k1", "wh_1", b"n" * 16)
    others = {
        derive_secret(keyring, "k0", "wh_1", b"n" * 16),
        derive_secret(keyring, "k1", "wh_2", b"n" * 16),
        derive_secret(keyring, "k1", "wh_1", b"m" * 16),
    }
    assert secret not in others and len(others) == 3
    with pytest.raises(LookupError):
        derive_secret(keyring, "gone", "wh_1", b"n" * 16)
