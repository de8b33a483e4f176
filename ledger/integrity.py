"""Tamper evidence that does not trust the database: keyed chains, sealed rows, checkpoints.

Whoever can write to the database (its owner, a superuser, a stolen backup restored
elsewhere) can change any row and recompute any public hash. What they do not have is
the chain key, which lives outside the database (a file in the data directory, mode
0600, or `LEDGER_CHAIN_KEYS`). Everything the ledger must be able to vouch for carries a
MAC under that key:

- every journal entry's `hash` is HMAC-SHA256 over the entry and the previous entry's
  hash of the same account (a keyed hash chain: changing, inserting, deleting or
  reordering an entry breaks every later link);
- every transfer, account and API key row carries a `seal`, an HMAC over all of its
  fields, recomputed by the service whenever it changes the row (a forged or edited
  row, a forged API key, a flipped `allow_negative_balance` do not verify);
- checkpoints, written outside the database, pin every account's head (sequence and
  hash) and the number of transfers up to a cut-off, under the same key: a chain cut
  short (its last entries deleted, the account row rolled back) or a deleted transfer no
  longer matches the last checkpoint (`ledger.service.checkpoints`).

Each MAC names its key by id, so keys can be rotated: the keyring lists keys newest
first; the newest signs, the older ones only verify. A key marked `revoked` (it leaked)
still verifies what a checkpoint pinned before it was revoked, and nothing after: an
entry under it beyond the last checkpoint's head is reported, as is an entry of the
legacy, unkeyed SHA-256 chain of earlier versions.

Canonical forms (an auditor holding the key recomputes them; README "Tamper evidence"):

- entry: the UTF-8 string
  `ledger-entry-v2|<key id>|<account id>|<sequence>|<transfer id>|<amount>|<balance after>|<created at, microseconds since 1970-01-01T00:00:00Z>|<previous entry's hash, lower-case hex; empty for sequence 1>`
  (identifiers cannot contain `|`); `hash` = HMAC-SHA256(key, string);
- transfer, account, API key: a JSON array with no whitespace, strings as JSON strings
  (UTF-8, not ASCII-escaped), integers as decimal strings (JSON numbers cannot carry 64
  bits exactly everywhere), booleans and null as such, timestamps as microseconds since
  the epoch (a decimal string), bytes as lower-case hex, metadata as `[[key, value], ...]`
  sorted by key; the field order is given by the functions below (a transfer's
  `missing_account` is last, and only when it is not null); `seal` =
  HMAC-SHA256(key, UTF-8 of the array).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

LEGACY_KEY_ID = ""  # entries written before chain keys existed: plain SHA-256, version 1
KEY_ID_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
SECRET_BYTES = 32
ENTRY_VERSION = "ledger-entry-v2"
LEGACY_ENTRY_VERSION = "ledger-entry-v1"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class KeyringError(ValueError):
    """The chain keys are missing, malformed or do not match the database."""


@dataclass(frozen=True, slots=True)
class ChainKey:
    id: str
    secret: bytes = field(repr=False)
    # A leaked key: it verifies what checkpoints pinned, it never signs again.
    revoked: bool = False

    def mac(self, message: str) -> bytes:
        return hmac.digest(self.secret, message.encode("utf-8"), "sha256")


class Keyring:
    """Chain keys, newest first: the first signs, all of them verify."""

    def __init__(self, keys: Sequence[ChainKey]) -> None:
        if not keys:
            raise KeyringError("a keyring needs at least one key")
        ids = [key.id for key in keys]
        if len(set(ids)) != len(ids):
            raise KeyringError(f"chain key ids must be unique, got {', '.join(ids)}")
        if keys[0].revoked:
            raise KeyringError(f"the first chain key signs new rows and cannot be revoked ({keys[0].id})")
        self.keys = tuple(keys)
        self._by_id = {key.id: key for key in keys}

    @property
    def active(self) -> ChainKey:
        return self.keys[0]

    def get(self, key_id: str | None) -> ChainKey | None:
        return self._by_id.get(key_id or "\0")

    def is_live(self, key_id: str | None) -> bool:
        """A key that may sign rows written after the last checkpoint."""
        key = self.get(key_id)
        return key is not None and not key.revoked

    @property
    def ids(self) -> list[str]:
        return [key.id for key in self.keys]


def new_chain_key() -> ChainKey:
    return ChainKey("k" + secrets.token_hex(4), secrets.token_bytes(SECRET_BYTES))


def parse_keyring(text: str) -> Keyring:
    """`id:secret` items (secret in base64url, 32 bytes), newest first, separated by
    newlines or commas, each optionally followed by `:revoked`; `#` starts a comment."""
    keys = []
    items = [item for line in text.splitlines() for item in line.split("#", 1)[0].split(",")]
    for item in items:
        line = item.strip()
        if not line:
            continue
        key_id, separator, rest = line.partition(":")
        key_id = key_id.strip()
        if not separator or not KEY_ID_RE.fullmatch(key_id):
            raise KeyringError(f"a chain key must be `id:secret` with an id of [a-z0-9_-] (1 to 32), got {key_id!r}")
        encoded, _, flag = rest.strip().partition(":")
        if flag not in ("", "revoked"):
            raise KeyringError(f"chain key {key_id!r}: unknown flag {flag!r} (only `revoked`)")
        try:
            secret = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        except (binascii.Error, ValueError) as error:
            raise KeyringError(f"chain key {key_id!r}: the secret is not base64url") from error
        if len(secret) < SECRET_BYTES:
            raise KeyringError(f"chain key {key_id!r}: the secret must be at least {SECRET_BYTES} bytes")
        keys.append(ChainKey(key_id, secret, revoked=flag == "revoked"))
    return Keyring(keys)


def format_keyring(keyring: Keyring) -> str:
    lines = [
        "# Chain keys of the ledger, newest first: the first signs, all verify (see README, Tamper evidence).",
        "# Keep this file outside the database's reach, and back it up: without it history cannot be verified.",
    ]
    for key in keyring.keys:
        encoded = base64.urlsafe_b64encode(key.secret).rstrip(b"=").decode()
        lines.append(f"{key.id}:{encoded}{':revoked' if key.revoked else ''}")
    return "\n".join(lines) + "\n"


def write_secret_file(path: Path, text: str, *, replace: bool = False) -> None:
    """Write a file only its owner can read (0600), atomically; never over an existing
    file unless `replace`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(temporary, path)
        else:
            # A hard link fails if the target exists: two processes starting at once
            # cannot both create a key file, and neither overwrites the other's.
            os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_keyring(configured: str | None, path: Path, *, create: bool) -> tuple[Keyring, bool]:
    """The keyring from `LEDGER_CHAIN_KEYS` when set, else from `path`; with `create`, a
    missing file is created with one new key. Returns (keyring, created)."""
    if configured:
        return parse_keyring(configured), False
    if path.exists():
        _require_private(path)
        return parse_keyring(path.read_text()), False
    if not create:
        raise KeyringError(f"no chain key: {path} does not exist and LEDGER_CHAIN_KEYS is not set")
    keyring = Keyring([new_chain_key()])
    try:
        write_secret_file(path, format_keyring(keyring))
    except FileExistsError:
        return parse_keyring(path.read_text()), False  # another process created it first
    return keyring, True


def rotate_keyring(path: Path) -> ChainKey:
    """Put a new key first in the key file (the old ones stay, to verify older rows)."""
    if not path.exists():
        raise KeyringError(f"{path} does not exist")
    _require_private(path)
    keyring = parse_keyring(path.read_text())
    key = new_chain_key()
    write_secret_file(path, format_keyring(Keyring([key, *keyring.keys])), replace=True)
    return key


def _require_private(path: Path) -> None:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise KeyringError(f"{path} is readable by others (mode {mode:o}); chmod 600 it")


# -- canonical forms and MACs -----------------------------------------------------------


def microseconds(moment: datetime) -> int:
    if moment.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    delta = moment - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def entry_message(
    key_id: str,
    previous_hash: bytes | None,
    account_id: str,
    sequence: int,
    transfer_id: str,
    amount: int,
    balance_after: int,
    created_at: datetime,
) -> str:
    version = ENTRY_VERSION if key_id != LEGACY_KEY_ID else LEGACY_ENTRY_VERSION
    fields = [version] if key_id == LEGACY_KEY_ID else [version, key_id]
    fields += [
        account_id,
        str(sequence),
        transfer_id,
        str(amount),
        str(balance_after),
        str(microseconds(created_at)),
        previous_hash.hex() if previous_hash else "",
    ]
    return "|".join(fields)


def entry_hash(
    key: ChainKey | None,
    previous_hash: bytes | None,
    account_id: str,
    sequence: int,
    transfer_id: str,
    amount: int,
    balance_after: int,
    created_at: datetime,
) -> bytes:
    """The entry's link in its account's chain: HMAC-SHA256 under `key`, or, for entries
    written before chain keys existed (`key` None), the plain SHA-256 of version 1."""
    key_id = key.id if key is not None else LEGACY_KEY_ID
    message = entry_message(key_id, previous_hash, account_id, sequence, transfer_id, amount, balance_after, created_at)
    if key is None:
        return hashlib.sha256(message.encode("utf-8")).digest()
    return key.mac(message)


def _text(value: object) -> object:
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, datetime):
        return str(microseconds(value))
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, Mapping):
        return [[str(k), str(v)] for k, v in sorted(value.items())]
    if isinstance(value, list | tuple):
        return [_text(item) for item in value]
    raise TypeError(f"no canonical form for {type(value).__name__}")


def canonical(fields: Iterable[object]) -> str:
    return json.dumps([_text(value) for value in fields], separators=(",", ":"), ensure_ascii=False)


def transfer_message(key_id: str, transfer: Any) -> str:
    fields = [
        "ledger-transfer-v1", key_id, transfer.id, transfer.debit_account_id, transfer.credit_account_id,
        transfer.amount, transfer.currency, transfer.pending, transfer.status, transfer.code,
        transfer.description, transfer.metadata or {}, transfer.request_hash, transfer.created_at,
        transfer.updated_at, transfer.timeout_seconds, transfer.expires_at, transfer.posted_amount,
        transfer.reversal_of, transfer.reversed_amount,
    ]  # fmt: skip
    # Added by revision 0006, and only when set: rows sealed before it (all without it)
    # keep their seals, and setting, changing or clearing it breaks the seal.
    if transfer.missing_account is not None:
        fields.append(transfer.missing_account)
    # Added by revision 0008, the same way: only imported transfers carry it.
    imported_at = getattr(transfer, "imported_at", None)
    if imported_at is not None:
        fields.append(["imported_at", imported_at])
    return canonical(fields)


def account_message(key_id: str, account: Any) -> str:
    # Balances are not sealed: they change with every transfer and are verified against
    # the journal instead. `created_at` is set by the database at insert, so it is not
    # known when the seal is computed; nothing is decided on it.
    fields = [
        "ledger-account-v1", key_id, account.id, account.currency, account.name,
        account.allow_negative_balance, account.metadata or {},
    ]  # fmt: skip
    # The controls of revision 0008, only when they differ from what every account had
    # before it (open, no limits): older seals stay valid, and any change breaks them.
    status = getattr(account, "status", "open")
    overdraft_limit = getattr(account, "overdraft_limit", None)
    max_balance = getattr(account, "max_balance", None)
    if (status, overdraft_limit, max_balance) != ("open", None, None):
        fields.append(["controls", status, overdraft_limit, max_balance])
    return canonical(fields)


def json_text(value: object) -> str:
    """A JSON value's one canonical text (sorted keys, no spaces)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def change_hash(
    key: ChainKey,
    previous_hash: bytes | None,
    account_id: str,
    sequence: int,
    changed_at: datetime,
    changed_by: str | None,
    before: object,
    after: object,
    state: object,
) -> bytes:
    """The link of an account change (`account_changes`) in its account's chain of
    changes: HMAC-SHA256 under the chain key, covering the previous link, as the journal's."""
    return key.mac(
        canonical(
            [
                "ledger-account-change-v1", key.id, account_id, sequence, changed_at, changed_by,
                json_text(before), json_text(after), json_text(state), previous_hash or b"",
            ]
        )
    )  # fmt: skip


def api_key_message(key_id: str, api_key: Any) -> str:
    return canonical(["ledger-api-key-v1", key_id, api_key.id, api_key.role, api_key.key_hash])


def seal(key: ChainKey, message: str) -> bytes:
    return key.mac(message)


def seal_is_valid(keyring: Keyring, key_id: str | None, stored: bytes | None, message_for: Any) -> bool:
    """Whether `stored` is the seal of the row under the key it names; `message_for`
    builds the row's canonical form for a key id."""
    key = keyring.get(key_id)
    if key is None or stored is None:
        return False
    return hmac.compare_digest(key.mac(message_for(key.id)), bytes(stored))
