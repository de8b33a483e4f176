"""Chain keys and seals, without I/O but for the key file: keyrings parse and print back,
refuse what they cannot use, seals cover every field of a row, and the key file is
created readable by its owner only and never overwritten by a second process."""

from __future__ import annotations

import dataclasses
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ledger.http.body import repeated_key
from ledger.integrity import (
    ChainKey,
    Keyring,
    KeyringError,
    account_message,
    api_key_message,
    format_keyring,
    load_keyring,
    new_chain_key,
    parse_keyring,
    seal,
    seal_is_valid,
    transfer_message,
)
from ledger.service.records import TransferRecord

NOW = datetime(2026, 11, 26, 12, 0, 0, 123456, tzinfo=UTC)


def test_a_keyring_prints_and_parses_back_newest_first_with_revocations() -> None:
    keys = [new_chain_key(), dataclasses.replace(new_chain_key(), revoked=True), new_chain_key()]
    parsed = parse_keyring(format_keyring(Keyring(keys)))
    assert parsed.keys == tuple(keys) and parsed.active == keys[0]
    assert parsed.is_live(keys[0].id) and not parsed.is_live(keys[1].id) and not parsed.is_live("nope")
    inline = ",".join(line for line in format_keyring(Keyring(keys)).splitlines() if not line.startswith("#"))
    assert parse_keyring(inline).keys == tuple(keys), "LEDGER_CHAIN_KEYS takes the same items, comma-separated"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "# only a comment",
        "Bad-Id:" + "A" * 43,
        "k1:short",
        "k1:" + "!" * 43,
        "k1:" + "A" * 43 + ":expired",
        f"k1:{'A' * 43}\nk1:{'B' * 43}",
        f"k1:{'A' * 43}:revoked",
    ],
)
def test_a_keyring_refuses_what_it_cannot_use(text: str) -> None:
    """No key, a malformed id or secret, a short secret, an unknown flag, a repeated id,
    or a revoked key in first place (it would sign new rows)."""
    with pytest.raises(KeyringError):
        parse_keyring(text)


def test_the_key_file_is_private_and_created_once(tmp_path: Path) -> None:
    path = tmp_path / "data" / "chain-keys"
    created, was_created = load_keyring(None, path, create=True)
    assert was_created and stat.S_IMODE(path.stat().st_mode) == 0o600
    again, was_created = load_keyring(None, path, create=True)
    assert not was_created and again.keys == created.keys
    path.chmod(0o644)
    with pytest.raises(KeyringError, match="readable by others"):
        load_keyring(None, path, create=False)
    with pytest.raises(KeyringError, match="does not exist"):
        load_keyring(None, tmp_path / "missing", create=False)


def _transfer() -> TransferRecord:
    return TransferRecord(
        id="t1", debit_account_id="a", credit_account_id="b", amount=100, currency="EUR", pending=True,
        status="posted", code=None, description="d", metadata={"x": "1", "y": "2"}, created_at=NOW,
        updated_at=NOW + timedelta(seconds=1), request_hash=b"\x01" * 32, timeout_seconds=60,
        expires_at=NOW + timedelta(minutes=1), posted_amount=80, reversal_of=None, reversed_amount=10,
    )  # fmt: skip


def test_a_transfer_seal_covers_every_field_and_its_key() -> None:
    """Any field changed, or the seal checked under another key (or another key id),
    and the seal no longer verifies; metadata order does not matter."""
    key = ChainKey("k1", b"\x05" * 32)
    keyring = Keyring([key])
    record = _transfer()
    stored = seal(key, transfer_message(key.id, record))
    assert seal_is_valid(keyring, "k1", stored, lambda k: transfer_message(k, record))
    reordered = dataclasses.replace(record, metadata={"y": "2", "x": "1"})
    assert seal_is_valid(keyring, "k1", stored, lambda k: transfer_message(k, reordered))
    changes = {
        "id": "t2", "debit_account_id": "c", "credit_account_id": "c", "amount": 101, "currency": "USD",
        "pending": False, "status": "voided", "code": "x", "description": "e", "metadata": {"x": "2"},
        "created_at": NOW + timedelta(microseconds=1), "updated_at": NOW, "request_hash": b"\x02" * 32,
        "timeout_seconds": 61, "expires_at": None, "posted_amount": 81, "reversal_of": "t0", "reversed_amount": 11,
        "missing_account": "debit", "imported_at": NOW - timedelta(days=1),
    }  # fmt: skip
    assert set(changes) == {f.name for f in dataclasses.fields(TransferRecord)}
    for field, value in changes.items():
        changed = dataclasses.replace(record, **{field: value})
        assert not seal_is_valid(keyring, "k1", stored, lambda k, c=changed: transfer_message(k, c)), field
    assert not seal_is_valid(
        Keyring([ChainKey("k1", b"\x06" * 32)]), "k1", stored, lambda k: transfer_message(k, record)
    )
    assert not seal_is_valid(keyring, "k2", stored, lambda k: transfer_message(k, record))
    assert not seal_is_valid(keyring, "k1", None, lambda k: transfer_message(k, record))


def test_rows_sealed_before_missing_account_existed_still_verify() -> None:
    """Revision 0006 added `missing_account` to the transfer seal only when it is set: the
    seal of a row without it is the one computed before (pinned here, from the earlier
    code), and recording it on such a row, or clearing it, breaks the seal."""
    key = ChainKey("k1", b"\x05" * 32)
    keyring = Keyring([key])
    refusal = dataclasses.replace(_transfer(), status="rejected", code="account_not_found", currency=None)
    before_0006 = bytes.fromhex("2f9a9315a155095ae64e306dbf43c67d92f9e11658a403120f0cf68c1575df06")
    assert seal(key, transfer_message(key.id, refusal)) == before_0006
    named = dataclasses.replace(refusal, missing_account="credit")
    assert not seal_is_valid(keyring, "k1", before_0006, lambda k: transfer_message(k, named))
    stored = seal(key, transfer_message(key.id, named))
    for other in ("debit", "both", None):
        changed = dataclasses.replace(named, missing_account=other)
        assert not seal_is_valid(keyring, "k1", stored, lambda k, c=changed: transfer_message(k, c)), other


def test_account_seals_cover_status_and_limits_and_keep_older_seals() -> None:
    """Revision 0008's controls are sealed only when they differ from an account's state
    before it (open, no limits): an account sealed before keeps its seal (pinned from the
    earlier code), and freezing, closing or setting a limit without the key breaks it."""
    key = ChainKey("k1", b"\x05" * 32)
    account = dataclasses.make_dataclass(
        "A",
        ["id", "currency", "name", "allow_negative_balance", "metadata", ("status", str, "open"),
         ("overdraft_limit", int | None, None), ("max_balance", int | None, None)],
    )  # fmt: skip
    base = account("a", "EUR", None, False, {})
    legacy = dataclasses.make_dataclass("L", ["id", "currency", "name", "allow_negative_balance", "metadata"])
    assert account_message("k1", base) == account_message("k1", legacy("a", "EUR", None, False, {}))
    reference = seal(key, account_message("k1", base))
    changed = [
        dataclasses.replace(base, status="frozen"),
        dataclasses.replace(base, status="closed"),
        dataclasses.replace(base, overdraft_limit=0),
        dataclasses.replace(base, overdraft_limit=100),
        dataclasses.replace(base, max_balance=0),
        dataclasses.replace(base, max_balance=100),
        dataclasses.replace(base, overdraft_limit=100, max_balance=100),
    ]
    seals = {seal(key, account_message("k1", c)) for c in changed}
    assert reference not in seals and len(seals) == len(changed)


def test_account_and_key_seals_cover_their_controls() -> None:
    key = ChainKey("k1", b"\x05" * 32)
    account = dataclasses.make_dataclass("A", ["id", "currency", "name", "allow_negative_balance", "metadata"])
    base = account("a", "EUR", None, False, {})
    reference = seal(key, account_message("k1", base))
    for changed in (dataclasses.replace(base, allow_negative_balance=True), dataclasses.replace(base, currency="USD")):
        assert seal(key, account_message("k1", changed)) != reference
    api_key = dataclasses.make_dataclass("K", ["id", "role", "key_hash"])
    admin = api_key("key_1", "admin", b"\x00" * 32)
    assert seal(key, api_key_message("k1", admin)) != seal(
        key, api_key_message("k1", api_key("key_1", "poster", b"\x00" * 32))
    )


@pytest.mark.parametrize(
    ("body", "repeated"),
    [
        (b'{"amount": 1, "amount": 1000}', "amount"),
        (b'{"transfers": [{"id": "a", "id": "b"}]}', "id"),
        (b'{"metadata": {"k": "1", "k": "2"}}', "k"),
        (b'{"a\\u0062": 1, "ab": 2}', "ab"),
        (b'{"transfers": [{"id": "a"}, {"id": "b"}]}', None),
        (b'{"id": "x", "metadata": {"id": "y"}}', None),
        (b"{not json", None),
        (b"", None),
    ],
)
def test_repeated_keys_are_found_in_any_object_and_only_there(body: bytes, repeated: str | None) -> None:
    """A key repeated in one object, at any depth, even spelled with an escape; the same
    key in different objects is fine; what does not parse is left to the decoder."""
    assert repeated_key(body) == repeated
