"""`ledger import FILE`: load a whole transfer history from the system being replaced.

The history goes in over HTTP, as any client's transfers do (the service alone decides
and records them), in batches of `POST /v1/transfers/batch` with each transfer's
`imported_at` (contract 1.1, admin keys only), so every entry carries its original time
and `GET /v1/accounts/{id}/balance?as_of=` answers for any instant of the past.

How it goes, and why:

1. Both files are read and checked in full before anything is sent (`--accounts` first,
   then the transfers): a bad row is reported with its line number and nothing changes
   in the ledger. Only what the file alone can show is checked here (fields, amounts,
   timestamps, repeated ids); whether the history fits the ledger (accounts that exist,
   funds, time order per account) is the service's decision, as for any transfer.
2. The accounts are opened, idempotently by id: an account that already exists with the
   same fields answers a replay, one with other fields is an error (409).
3. The transfers are sent in file order, one batch at a time: a batch is sent only once
   the previous one is acknowledged, because the service refuses an `imported_at`
   earlier than an account's last entry, so the order of the file must be the order of
   arrival. Batches are idempotent by transfer id: a batch sent twice (a retry after a
   503 or a lost answer, a re-run of the whole file) answers `replayed` for what was
   already applied and moves no money twice.
4. After each acknowledged batch a small state file (`FILE.import-state`) records where
   the file was read up to, atomically (temporary file, fsync, rename): a run that dies
   at any point is resumed by running the same command again, which starts there (the
   batch in flight when it died may be sent again: it replays). The state file names the
   input's SHA-256, so a changed input is never resumed by mistake. A finished import
   removes it: running the command again re-sends the whole file, which all replays.
5. A transfer the service refuses (`rejected` in its batch result) stops the import with
   exit status 1, naming the line, the id and the code. The service records refusals
   permanently: that id's outcome is `rejected` for good, and re-sending it replays the
   refusal. The other items of the same batch were decided on their own (a batch is not
   all-or-nothing), and the message says how many of them were applied.

Exit status: 0 every transfer created or replayed; 1 the data was refused (a bad row, a
rejected transfer, an account or transfer id that exists with other fields); 2 the
import could not run or go on (options, key, unreadable file, a service that stays
unavailable: run again to resume); 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import msgspec

from ledger.domain import IDENTIFIER_RE, MAX_AMOUNT

# -- limits, each named ---------------------------------------------------------------------

# The contract's largest batch; the service may be configured lower (LEDGER_MAX_BATCH_SIZE):
# a 413 then splits the batch in two (see `_send`).
MAX_BATCH_SIZE = 1000
DEFAULT_BATCH_SIZE = 1000
# The service's default LEDGER_MAX_BODY_BYTES. Batches are cut to stay under it, since a
# thousand transfers with long descriptions and full metadata would not fit in one body.
DEFAULT_MAX_REQUEST_BYTES = 1_048_576
# `{"transfers":[` ... `]}` around the items.
BATCH_ENVELOPE_BYTES = 16
# How long one batch is retried while the service is unavailable (503, connection
# refused, lost answers), before the import stops (exit 2, resumable).
DEFAULT_RETRY_SECONDS = 600.0
BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 30.0
# One HTTP attempt: a batch of 1000 imported transfers is one transaction on the
# service, which may wait for a group commit or a lock on a loaded server.
REQUEST_TIMEOUT_SECONDS = 60.0
# Accounts are independent of each other: opened a few at a time.
ACCOUNT_CONCURRENCY = 8
# Progress: a redraw of the bar at most this often on a terminal; a line this often
# otherwise (a log file or CI).
TTY_REFRESH_SECONDS = 0.2
PLAIN_PROGRESS_SECONDS = 10.0
PROGRESS_BAR_WIDTH = 30

STATE_VERSION = 1
STATE_SUFFIX = ".import-state"

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
CURRENCY_RE = re.compile(r"[A-Z]{3}")
DIGITS_RE = re.compile(r"[0-9]+")
MAX_METADATA_KEYS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
MAX_DESCRIPTION_CHARS = 512
MAX_NAME_CHARS = 256

TRANSFER_REQUIRED = ("id", "debit_account_id", "credit_account_id", "amount", "imported_at")
TRANSFER_FIELDS = (*TRANSFER_REQUIRED, "currency", "description", "metadata", "pending")
ACCOUNT_REQUIRED = ("id", "currency")
ACCOUNT_FIELDS = (*ACCOUNT_REQUIRED, "name", "allow_negative_balance", "metadata", "overdraft_limit", "max_balance")
# Fields of the contract that a history import cannot carry, and why.
NOT_IMPORTABLE = {
    "timeout_seconds": "applies to pending transfers, which cannot be imported (a history is posted transfers)",
    "linked": "is not supported by ledger import (each transfer is imported on its own)",
}


# -- errors ---------------------------------------------------------------------------------


class ImportFailed(Exception):
    """The import stops. `status` is the exit status: 1 when the data was refused (here
    or by the service), 2 when the import could not run or go on."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class InputError(ImportFailed):
    """A row of an input file that cannot be sent: `line` is its first line (1-based)."""

    def __init__(self, path: Path, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}", 1)
        self.path = path
        self.line = line


# -- reading the files ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Record:
    """One row as read: `line` is where it starts; `end_offset` and `end_line` are the
    byte offset and the count of lines read once it is consumed (where a resumed run
    starts); `values` are strings for CSV, JSON values for JSON lines."""

    line: int
    end_offset: int
    end_line: int
    values: dict[str, Any]


def detect_format(path: Path, given: str | None) -> str:
    if given:
        return given
    found = FORMATS.get(path.suffix.lower())
    if found is None:
        raise ImportFailed(
            f"{path}: cannot tell the format from the name: use .csv, .jsonl or .ndjson, or --format csv|jsonl", 2
        )
    return found


class _Position:
    """Bytes and lines consumed so far: the line iterator advances it as the parser
    pulls lines, so it says where a record ends as soon as the record is returned."""

    def __init__(self, offset: int, line: int) -> None:
        self.offset = offset
        self.line = line


def _decoded_lines(path: Path, handle: io.BufferedReader, position: _Position) -> Iterator[str]:
    for raw in handle:
        first = position.offset == 0
        position.offset += len(raw)
        position.line += 1
        try:
            # A byte order mark (spreadsheets write one) belongs to no field.
            yield raw.decode("utf-8-sig" if first else "utf-8")
        except UnicodeDecodeError as error:
            raise InputError(path, position.line, f"not UTF-8 text ({error.reason} at byte {error.start})") from None


def read_records(path: Path, format: str, start_offset: int = 0, start_line: int = 0) -> Iterator[Record]:
    """Every row of `path` from `start_offset` (a record boundary, `start_line` lines
    into the file), with where it starts and ends."""
    if format == "csv":
        yield from _csv_records(path, start_offset, start_line)
    else:
        yield from _jsonl_records(path, start_offset, start_line)


def _csv_records(path: Path, start_offset: int, start_line: int) -> Iterator[Record]:
    with path.open("rb") as handle:
        position = _Position(0, 0)
        lines = _decoded_lines(path, handle, position)
        reader = csv.reader(lines, strict=True)
        try:
            header = next(reader, None)
        except csv.Error as error:
            raise InputError(path, position.line, f"not valid CSV: {error}") from None
        if header is None:
            raise InputError(path, 1, "the file is empty: the first line must name the columns")
        columns = [name.strip() for name in header]
        if len(set(columns)) != len(columns):
            raise InputError(path, 1, f"a column is named twice: {columns}")
        if start_offset:
            # Resuming: the header was read above; the rows go on where the last
            # acknowledged batch ended.
            handle.seek(start_offset)
            position.offset, position.line = start_offset, start_line
            lines = _decoded_lines(path, handle, position)
            reader = csv.reader(lines, strict=True)
        while True:
            first_line = position.line + 1
            try:
                row = next(reader, None)
            except csv.Error as error:
                raise InputError(path, first_line, f"not valid CSV: {error}") from None
            if row is None:
                return
            if not row or row == [""]:
                continue
            if len(row) != len(columns):
                raise InputError(path, first_line, f"{len(row)} values for the {len(columns)} columns of the header")
            yield Record(first_line, position.offset, position.line, dict(zip(columns, row, strict=True)))


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # As the service does: an object that repeats a key has no single meaning.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {key!r} appears twice")
        result[key] = value
    return result


def _json(text: str) -> Any:
    return json.loads(text, object_pairs_hook=_no_repeated_keys, parse_constant=_no_constant)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _jsonl_records(path: Path, start_offset: int, start_line: int) -> Iterator[Record]:
    with path.open("rb") as handle:
        handle.seek(start_offset)
        position = _Position(start_offset, start_line)
        for text in _decoded_lines(path, handle, position):
            if not text.strip():
                continue
            try:
                values = _json(text)
            except ValueError as error:
                raise InputError(path, position.line, f"not valid JSON: {error}") from None
            if not isinstance(values, dict):
                raise InputError(path, position.line, "each line must be one JSON object")
            yield Record(position.line, position.offset, position.line, values)


# -- checking rows --------------------------------------------------------------------------


def _present(values: dict[str, Any], name: str, text_form: bool) -> Any:
    """The value of `name`, or None when absent (in CSV: an empty cell)."""
    value = values.get(name)
    if text_form and isinstance(value, str) and value.strip() == "":
        return None
    return value


def _identifier(value: Any, name: str) -> str:
    if not isinstance(value, str) or not IDENTIFIER_RE.fullmatch(value):
        raise ValueError(f"`{name}` must be 1 to 64 characters of [A-Za-z0-9._:-], not only dots, got {value!r}")
    return value


def _integer(value: Any, name: str, text_form: bool, minimum: int) -> int:
    if text_form:
        text = value.strip()
        if not DIGITS_RE.fullmatch(text):
            raise ValueError(f"`{name}` must be a whole number of minor units (digits only), got {value!r}")
        number = int(text)
    else:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"`{name}` must be a JSON integer of minor units, got {json.dumps(value)}")
        number = value
    if not minimum <= number <= MAX_AMOUNT:
        raise ValueError(f"`{name}` must be between {minimum} and {MAX_AMOUNT}, got {number}")
    return number


def _boolean(value: Any, name: str, text_form: bool) -> bool:
    if text_form:
        text = value.strip().lower()
        if text in ("true", "1"):
            return True
        if text in ("false", "0"):
            return False
        raise ValueError(f"`{name}` must be true or false, got {value!r}")
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be true or false, got {json.dumps(value)}")
    return value


def _text(value: Any, name: str, limit: int, *, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise ValueError(f"`{name}` must be a string")
    if len(value) > limit or (not allow_empty and not value):
        raise ValueError(f"`{name}` must be {'1' if not allow_empty else '0'} to {limit} characters, has {len(value)}")
    if "\x00" in value:
        raise ValueError(f"`{name}` must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"`{name}` is not valid Unicode text") from None
    return value


def _metadata(value: Any, text_form: bool) -> dict[str, str]:
    if text_form:
        try:
            value = _json(value)
        except ValueError as error:
            raise ValueError(f"`metadata` must be a JSON object of strings: {error}") from None
    if not isinstance(value, dict):
        raise ValueError("`metadata` must be a JSON object of strings")
    if len(value) > MAX_METADATA_KEYS:
        raise ValueError(f"`metadata` has {len(value)} keys, at most {MAX_METADATA_KEYS} are allowed")
    for key, item in value.items():
        if not key:
            raise ValueError("`metadata` keys must not be empty")
        _text(key, "metadata key", MAX_METADATA_KEY_CHARS)
        _text(item, f"metadata.{key}", MAX_METADATA_VALUE_CHARS)
    return dict(value)


def parse_timestamp(value: Any, name: str, text_form: bool) -> datetime:
    """An RFC 3339 timestamp with its offset, in UTC. Digits past microseconds (the
    ledger's precision) are dropped, which keeps the order of the times."""
    if not isinstance(value, str):
        raise ValueError(f"`{name}` must be an RFC 3339 timestamp string, got {json.dumps(value)}")
    text = value.strip()
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise ValueError(f"`{name}` is not an RFC 3339 timestamp: {value!r}") from None
    if moment.tzinfo is None or "T" not in text.upper().replace(" ", "T"):
        raise ValueError(f"`{name}` needs a date, a time and an offset (e.g. 2024-03-01T09:30:00Z), got {value!r}")
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00:00+14:00 is before year 1 in UTC
        raise ValueError(f"`{name}` has no UTC form (before year 1 or after 9999): {value!r}") from None


def transfer_from_record(values: dict[str, Any], text_form: bool, now: datetime) -> dict[str, Any]:
    """The batch item of one row, checked as the service would check it; raises
    ValueError with a message for people."""
    for name in values:
        if name in NOT_IMPORTABLE and _present(values, name, text_form) is not None:
            raise ValueError(f"`{name}` {NOT_IMPORTABLE[name]}")
        if name not in TRANSFER_FIELDS and name not in NOT_IMPORTABLE:
            raise ValueError(f"unknown field `{name}` (the fields are {', '.join(TRANSFER_FIELDS)})")
    missing = [name for name in TRANSFER_REQUIRED if _present(values, name, text_form) is None]
    if missing:
        raise ValueError(f"missing {', '.join(f'`{name}`' for name in missing)}")
    item: dict[str, Any] = {
        "id": _identifier(values["id"], "id"),
        "debit_account_id": _identifier(values["debit_account_id"], "debit_account_id"),
        "credit_account_id": _identifier(values["credit_account_id"], "credit_account_id"),
        "amount": _integer(values["amount"], "amount", text_form, 1),
    }
    if item["debit_account_id"] == item["credit_account_id"]:
        # The service would refuse it with accounts_must_be_different, recorded for good.
        raise ValueError(f"debit_account_id and credit_account_id are both {item['debit_account_id']!r}")
    imported_at = parse_timestamp(values["imported_at"], "imported_at", text_form)
    if imported_at >= now:
        raise ValueError(f"`imported_at` must be in the past, got {values['imported_at']!r}")
    item["imported_at"] = imported_at
    currency = _present(values, "currency", text_form)
    if currency is not None:
        if not isinstance(currency, str) or not CURRENCY_RE.fullmatch(currency):
            raise ValueError(f"`currency` must be three upper-case letters, got {currency!r}")
        item["currency"] = currency
    pending = _present(values, "pending", text_form)
    if pending is not None and _boolean(pending, "pending", text_form):
        raise ValueError("`pending` transfers cannot be imported: a history is posted transfers")
    description = _present(values, "description", text_form)
    if description is not None:
        item["description"] = _text(description, "description", MAX_DESCRIPTION_CHARS)
    metadata = _present(values, "metadata", text_form)
    if metadata is not None:
        item["metadata"] = _metadata(metadata, text_form)
    return item


def account_from_record(values: dict[str, Any], text_form: bool) -> dict[str, Any]:
    """The `POST /v1/accounts` fields of one row, checked; raises ValueError."""
    unknown = [name for name in values if name not in ACCOUNT_FIELDS]
    if unknown:
        raise ValueError(f"unknown field `{unknown[0]}` (the fields are {', '.join(ACCOUNT_FIELDS)})")
    missing = [name for name in ACCOUNT_REQUIRED if _present(values, name, text_form) is None]
    if missing:
        # The id is required: opening the accounts again must find the same ones.
        raise ValueError(f"missing {', '.join(f'`{name}`' for name in missing)}")
    account: dict[str, Any] = {"id": _identifier(values["id"], "id")}
    currency = values["currency"]
    if not isinstance(currency, str) or not CURRENCY_RE.fullmatch(currency):
        raise ValueError(f"`currency` must be three upper-case letters, got {currency!r}")
    account["currency"] = currency
    name = _present(values, "name", text_form)
    if name is not None:
        account["name"] = _text(name, "name", MAX_NAME_CHARS, allow_empty=False)
    allow_negative = _present(values, "allow_negative_balance", text_form)
    account["allow_negative_balance"] = (
        _boolean(allow_negative, "allow_negative_balance", text_form) if allow_negative is not None else False
    )
    metadata = _present(values, "metadata", text_form)
    if metadata is not None:
        account["metadata"] = _metadata(metadata, text_form)
    for limit in ("overdraft_limit", "max_balance"):
        value = _present(values, limit, text_form)
        if value is not None:
            account[limit] = _integer(value, limit, text_form, 0)
    return account


@dataclass
class Scan:
    """What checking a whole file found: its rows and digest (the identity a state file
    is checked against)."""

    rows: int
    sha256: str
    size: int


def file_digest(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def check_transfers(path: Path, format: str, now: datetime) -> Scan:
    """Check every row of the transfers file; raise InputError at the first bad one."""
    seen: dict[str, int] = {}
    rows = 0
    text_form = format == "csv"
    for record in read_records(path, format):
        try:
            item = transfer_from_record(record.values, text_form, now)
        except ValueError as error:
            raise InputError(path, record.line, str(error)) from None
        earlier = seen.setdefault(item["id"], record.line)
        if earlier != record.line:
            raise InputError(path, record.line, f"the transfer id {item['id']!r} is already used on line {earlier}")
        rows += 1
    if rows == 0:
        raise ImportFailed(f"{path}: no transfers in the file", 1)
    return Scan(rows, *file_digest(path))


def load_accounts(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """Every account of the accounts file with its line, checked (a few per customer at
    most: they are kept in memory)."""
    format = detect_format(path, None)
    accounts: list[tuple[int, dict[str, Any]]] = []
    seen: dict[str, int] = {}
    for record in read_records(path, format):
        try:
            account = account_from_record(record.values, format == "csv")
        except ValueError as error:
            raise InputError(path, record.line, str(error)) from None
        earlier = seen.setdefault(account["id"], record.line)
        if earlier != record.line:
            raise InputError(path, record.line, f"the account id {account['id']!r} is already used on line {earlier}")
        accounts.append((record.line, account))
    return accounts


# -- the state file -------------------------------------------------------------------------


@dataclass
class State:
    """Where an import stands, as of its last acknowledged batch."""

    input_sha256: str
    input_size: int
    format: str
    offset: int = 0
    line: int = 0
    rows: int = 0
    created: int = 0
    replayed: int = 0
    accounts_sha256: str | None = None
    accounts_created: int = 0
    accounts_replayed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, **self.__dict__, "updated_at": datetime.now(UTC).isoformat()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> State:
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"version {data.get('version')!r}, expected {STATE_VERSION}")
        names = set(cls.__dataclass_fields__)
        return cls(**{key: value for key, value in data.items() if key in names})


def read_state(path: Path) -> State | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return State.from_json(json.loads(text))
    except (ValueError, TypeError) as error:
        raise ImportFailed(
            f"{path}: not a state file of this version of ledger import ({error}); remove it to start over "
            "(already imported transfers will replay)",
            2,
        ) from None


def write_state(path: Path, state: State) -> None:
    """Replace the state file atomically: a crash leaves the old one or the new one,
    never a torn one, and the new one is on disk before the import goes on."""
    directory = path.parent
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        with os.fdopen(descriptor, "w") as handle:
            json.dump(state.to_json(), handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    # The rename itself is durable only once the directory is.
    directory_descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_descriptor)
    finally:
        os.close(directory_descriptor)


# -- progress -------------------------------------------------------------------------------


class Progress:
    """A bar redrawn in place on a terminal; a plain line every PLAIN_PROGRESS_SECONDS
    otherwise; nothing with --quiet."""

    def __init__(self, total: int, stream: TextIO, *, quiet: bool, clock: Callable[[], float] = time.monotonic):
        self.total = total
        self.stream = stream
        self.quiet = quiet
        self.tty = stream.isatty()
        self.clock = clock
        self.started = clock()
        self.first_done: int | None = None
        self.last_shown = self.started
        self.drawn = False

    def update(self, done: int, *, force: bool = False) -> None:
        if self.quiet:
            return
        if self.first_done is None:
            self.first_done = done
        now = self.clock()
        interval = TTY_REFRESH_SECONDS if self.tty else PLAIN_PROGRESS_SECONDS
        if not force and now - self.last_shown < interval:
            return
        self.last_shown = now
        self.stream.write(self.render(done, now))
        self.stream.flush()
        self.drawn = True

    def render(self, done: int, now: float) -> str:
        elapsed = now - self.started
        sent = done - (self.first_done or 0)
        rate = sent / elapsed if elapsed > 0 else 0.0
        share = done / self.total if self.total else 1.0
        remaining = (self.total - done) / rate if rate > 0 else None
        eta = f"{int(remaining // 60)}:{int(remaining % 60):02d}" if remaining is not None else "?"
        if self.tty:
            filled = int(PROGRESS_BAR_WIDTH * share)
            bar = "#" * filled + "." * (PROGRESS_BAR_WIDTH - filled)
            return f"\r[{bar}] {share:4.0%} {done}/{self.total} transfers, {rate:.0f}/s, {eta} left "
        return f"ledger import: {done}/{self.total} transfers ({share:.0%}), {rate:.0f}/s, {eta} left\n"

    def finish(self, done: int) -> None:
        if self.quiet:
            return
        if self.tty:
            self.update(done, force=True)
            self.stream.write("\n")
            self.stream.flush()

    def note(self, message: str) -> None:
        """A message that must not be drawn over by the bar."""
        prefix = "\n" if self.tty and self.drawn else ""
        self.stream.write(f"{prefix}ledger import: {message}\n")
        self.stream.flush()
        self.drawn = False


# -- sending --------------------------------------------------------------------------------


@dataclass
class Options:
    path: Path
    format: str
    state_path: Path
    accounts_path: Path | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    retry_seconds: float = DEFAULT_RETRY_SECONDS
    quiet: bool = False


@dataclass
class Pending:
    """A batch being sent: its items, the line each came from, and where the file is read
    up to once it is acknowledged."""

    items: list[dict[str, Any]]
    lines: list[int]
    end_offset: int
    end_line: int
    # Where the file is read up to before the batch (for a stop in its middle).
    start_offset: int
    start_line: int
    item_ends: list[tuple[int, int]] = field(default_factory=list)


def _item_bytes(item: dict[str, Any]) -> int:
    # The item as the client encodes it (the timestamp as its 27-character string), and
    # the comma after it.
    return len(msgspec.json.encode({**item, "imported_at": "2000-01-01T00:00:00.000000Z"})) + 1


def batches(
    path: Path, format: str, state: State, batch_size: int, max_request_bytes: int, now: datetime
) -> Iterator[Pending]:
    """The rows after the state's position, in file order, cut into batches of at most
    `batch_size` items and `max_request_bytes` bytes."""
    text_form = format == "csv"
    batch: Pending | None = None
    size = BATCH_ENVELOPE_BYTES
    offset, line = state.offset, state.line
    for record in read_records(path, format, state.offset, state.line):
        try:
            item = transfer_from_record(record.values, text_form, now)
        except ValueError as error:
            # Checked before anything was sent: only a file changed since then gets here.
            raise InputError(path, record.line, f"{error} (the file changed during the import?)") from None
        weight = _item_bytes(item)
        if batch is not None and (len(batch.items) >= batch_size or size + weight > max_request_bytes):
            yield batch
            batch = None
        if batch is None:
            batch = Pending([], [], offset, line, offset, line)
            size = BATCH_ENVELOPE_BYTES
        batch.items.append(item)
        batch.lines.append(record.line)
        batch.item_ends.append((record.end_offset, record.end_line))
        batch.end_offset, batch.end_line = record.end_offset, record.end_line
        offset, line = record.end_offset, record.end_line
        size += weight
    if batch is not None:
        yield batch


def _split(batch: Pending) -> tuple[Pending, Pending]:
    half = len(batch.items) // 2
    first_end = batch.item_ends[half - 1]
    first = Pending(
        batch.items[:half], batch.lines[:half], *first_end, batch.start_offset, batch.start_line, batch.item_ends[:half]
    )
    second = Pending(
        batch.items[half:],
        batch.lines[half:],
        batch.end_offset,
        batch.end_line,
        *first_end,
        batch.item_ends[half:],
    )
    return first, second


class Importer:
    """One run of `ledger import`: owns the client, the state and the progress."""

    def __init__(self, client: Any, options: Options, *, stderr: TextIO, stdout: TextIO) -> None:
        self.client = client
        self.options = options
        self.stderr = stderr
        self.stdout = stdout

    # Errors of the client, imported here so that `ledger import --help` stays quick.
    def _errors(self) -> Any:
        from ledger.client import errors

        return errors

    def _call_with_retries(self, what: str, progress: Progress | None, call: Callable[[], Any]) -> Any:
        """`call`, again and again while the service is unavailable (the client already
        retried it a few times), with growing waits, for at most `retry_seconds`. Safe
        because everything sent here is keyed by ids: a repeat replays."""
        errors = self._errors()
        deadline = time.monotonic() + self.options.retry_seconds
        delay = BACKOFF_FIRST_SECONDS
        while True:
            try:
                return call()
            except (errors.Unavailable, errors.OutcomeUnknown, errors.ConnectionFailed) as error:
                if time.monotonic() + delay > deadline:
                    raise ImportFailed(
                        f"{what}: the service stayed unavailable for {self.options.retry_seconds:.0f} s ({error}). "
                        "Everything acknowledged is saved: run the same command again to resume.",
                        2,
                    ) from error
                message = f"{what}: service unavailable ({_short(error)}), trying again in {delay:.0f} s"
                if progress is not None:
                    progress.note(message)
                else:
                    print(f"ledger import: {message}", file=self.stderr, flush=True)
                time.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_SECONDS)
            except errors.Unauthenticated as error:
                raise ImportFailed(f"{what}: the API key was refused ({error})", 2) from error
            except errors.Forbidden as error:
                raise ImportFailed(
                    f"{what}: forbidden ({error}): importing history (imported_at) and opening accounts that may go "
                    "negative need an admin key",
                    2,
                ) from error

    # -- accounts ---------------------------------------------------------------------------

    def open_accounts(self, accounts: list[tuple[int, dict[str, Any]]], path: Path) -> tuple[int, int]:
        errors = self._errors()
        # Once one account stops the import (the service gone for good, the key refused),
        # the others are not tried: each would wait out the same retries.
        stopped = threading.Event()

        def open_one(line: int, account: dict[str, Any]) -> tuple[int, str, Any]:
            if stopped.is_set():
                return line, "skipped", None
            fields = dict(account)
            currency = fields.pop("currency")
            try:
                opened = self._call_with_retries(
                    f"{path}:{line}: account {account['id']!r}",
                    None,
                    lambda: self.client.create_account(currency, **fields),
                )
            except errors.AccountExistsWithDifferentFields as error:
                return line, "conflict", error
            except errors.ProblemError as error:
                return line, "refused", error
            except ImportFailed as error:
                stopped.set()
                return line, "failed", error
            return line, "replayed" if opened.replayed else "created", None

        with ThreadPoolExecutor(ACCOUNT_CONCURRENCY) as pool:
            outcomes = list(pool.map(lambda pair: open_one(*pair), accounts))
        created = sum(1 for _, kind, _ in outcomes if kind == "created")
        replayed = sum(1 for _, kind, _ in outcomes if kind == "replayed")
        failures = [outcome for outcome in outcomes if outcome[1] == "failed"]
        if failures:
            raise failures[0][2]
        ids = {line: account["id"] for line, account in accounts}
        for line, kind, error in outcomes:
            account_id = ids[line]
            if kind == "conflict":
                raise InputError(
                    path,
                    line,
                    f"the account {account_id!r} already exists with other fields (409 {error.code}): "
                    "nothing was changed for it",
                )
            if kind == "refused":
                raise InputError(path, line, f"the service refused the account {account_id!r}: {error}")
        return created, replayed

    # -- transfers --------------------------------------------------------------------------

    def send(self, batch: Pending, progress: Progress) -> list[Any]:
        """Send one batch until it is acknowledged; a batch the service finds too large
        is sent as two halves. Returns the results in order."""
        errors = self._errors()
        where = f"{self.options.path}:{batch.lines[0]}"
        try:
            result = self._call_with_retries(
                f"the batch from line {batch.lines[0]}", progress, lambda: self.client.create_batch(batch.items)
            )
        except errors.TooLarge as error:
            if len(batch.items) == 1:
                raise ImportFailed(
                    f"{where}: the service refuses this transfer as too large ({error}): raise the service's "
                    "LEDGER_MAX_BODY_BYTES",
                    1,
                ) from error
            # The service's limits are lower than the batch (LEDGER_MAX_BATCH_SIZE or
            # LEDGER_MAX_BODY_BYTES): nothing of it was applied, so halves are safe.
            first, second = _split(batch)
            return [*self.send(first, progress), *self.send(second, progress)]
        except errors.ValidationFailed as error:
            raise ImportFailed(
                f"{where}: the service refused the batch of lines {batch.lines[0]}-{batch.lines[-1]} as invalid "
                f"(nothing of it was applied): {error}{_field_errors(error, batch.lines)}",
                1,
            ) from error
        except errors.ProblemError as error:
            raise ImportFailed(
                f"{where}: the service answered the batch with {error} (nothing acknowledged after line "
                f"{batch.start_line}; run again to resume)",
                2,
            ) from error
        results = list(result.results)
        sent_ids = [item["id"] for item in batch.items]
        if [item.id for item in results] != sent_ids:
            raise ImportFailed(f"{where}: the service's batch answer does not match the batch sent", 2)
        return results


def _short(error: BaseException) -> str:
    status = getattr(error, "status", None)
    code = getattr(error, "code", None)
    return f"{status} {code}" if status else type(error).__name__


def _field_errors(error: Any, lines: Sequence[int]) -> str:
    """The service's field errors, with the line of each item named by index."""
    found = []
    for item in getattr(error, "errors", []) or []:
        match = re.search(r"transfers\[(\d+)\]", item.field)
        line = f"line {lines[int(match.group(1))]}: " if match and int(match.group(1)) < len(lines) else ""
        found.append(f"{line}{item.field}: {item.message}")
    return ("; " + "; ".join(found)) if found else ""


def _refusal_message(path: Path, line: int, transfer_id: str, code: str | None, replayed: bool) -> str:
    if code == "transfer_exists_with_different_fields":
        return (
            f"{path}:{line}: the transfer {transfer_id!r} already exists in the ledger with other fields "
            f"({code}): nothing was recorded for this row; the ledger keeps the transfer it has under this id"
        )
    when = "was refused by an earlier run" if replayed else "was refused"
    return (
        f"{path}:{line}: the transfer {transfer_id!r} {when}: {code}. The service records refusals permanently: "
        f"this id's outcome is rejected for good, and sending it again replays the refusal"
    )


def run_import(client: Any, options: Options, *, stdout: TextIO, stderr: TextIO) -> int:
    """The whole import; returns the exit status (raises ImportFailed on a stop)."""
    started = time.monotonic()
    now = datetime.now(UTC)
    accounts = load_accounts(options.accounts_path) if options.accounts_path else []
    scan = check_transfers(options.path, options.format, now)
    state = read_state(options.state_path)
    resumed = state is not None
    if state is not None:
        if (state.input_sha256, state.input_size, state.format) != (scan.sha256, scan.size, options.format):
            raise ImportFailed(
                f"{options.path} is not the file {options.state_path} was written for (its content changed). "
                f"To import it from the start, remove {options.state_path}: what was already imported replays.",
                2,
            )
    else:
        state = State(scan.sha256, scan.size, options.format)
    importer = Importer(client, options, stderr=stderr, stdout=stdout)
    if options.accounts_path is not None:
        accounts_digest, _ = file_digest(options.accounts_path)
        if state.accounts_sha256 != accounts_digest:
            state.accounts_created, state.accounts_replayed = importer.open_accounts(accounts, options.accounts_path)
            state.accounts_sha256 = accounts_digest
            write_state(options.state_path, state)
    if resumed and not options.quiet:
        print(
            f"ledger import: resuming {options.path} after line {state.line} ({state.rows} of {scan.rows} transfers "
            f"acknowledged by earlier runs)",
            file=stderr,
            flush=True,
        )
    progress = Progress(scan.rows, stderr, quiet=options.quiet)
    first_rows = state.rows
    resumed_after = f", resumed after line {state.line}" if resumed else ""
    # The rate counts from here; a terminal shows the bar at once, a log waits for news.
    progress.update(state.rows, force=progress.tty)
    for batch in batches(
        options.path, options.format, state, options.batch_size, options.max_request_bytes, datetime.now(UTC)
    ):
        results = importer.send(batch, progress)
        for index, result in enumerate(results):
            refused = result.status == "rejected" or (
                result.status == "replayed" and result.transfer is not None and result.transfer.status == "rejected"
            )
            if refused:
                applied_after = sum(1 for later in results[index + 1 :] if later.status == "created")
                # Acknowledged up to the row before the refused one: a re-run stops on it again.
                state.offset, state.line = (
                    batch.item_ends[index - 1] if index else (batch.start_offset, batch.start_line)
                )
                state.rows += index
                state.created += sum(1 for earlier in results[:index] if earlier.status == "created")
                state.replayed += sum(1 for earlier in results[:index] if earlier.status == "replayed")
                write_state(options.state_path, state)
                progress.finish(state.rows)
                message = _refusal_message(
                    options.path, batch.lines[index], result.id, result.code, result.status == "replayed"
                )
                if applied_after:
                    message += (
                        f". {applied_after} later transfer(s) of the same batch (lines up to {batch.lines[-1]}) were "
                        "applied, each on its own"
                    )
                raise ImportFailed(message + ".", 1)
            if result.transfer is not None and result.transfer.imported_at != batch.items[index]["imported_at"]:
                # A service that took the transfer without its time would load the
                # history at the wrong instants: stop at the first one.
                kept = result.transfer.imported_at.isoformat() if result.transfer.imported_at else "none"
                raise ImportFailed(
                    f"{options.path}:{batch.lines[index]}: the service kept the transfer {result.id!r} with "
                    f"imported_at {kept}, not the file's {batch.items[index]['imported_at'].isoformat()}: does it "
                    "support history import (contract 1.1)?",
                    2,
                )
        state.offset, state.line = batch.end_offset, batch.end_line
        state.rows += len(results)
        state.created += sum(1 for result in results if result.status == "created")
        state.replayed += sum(1 for result in results if result.status == "replayed")
        write_state(options.state_path, state)
        progress.update(state.rows)
    progress.finish(state.rows)
    # Done: a state file left behind would make the next run of this command send
    # nothing; without it, the next run re-sends everything, which all replays.
    options.state_path.unlink(missing_ok=True)
    seconds = time.monotonic() - started
    sent = state.rows - first_rows
    accounts_line = (
        f"; accounts: {state.accounts_created} created, {state.accounts_replayed} replayed"
        if options.accounts_path
        else ""
    )
    print(
        f"imported {state.rows} transfers from {options.path}: {state.created} created, {state.replayed} replayed"
        f"{accounts_line}; this run sent {sent} in {seconds:.1f} s ({sent / seconds if seconds > 0 else 0:.0f} "
        f"transfers/s){resumed_after}",
        file=stdout,
        flush=True,
    )
    return 0


# -- the command ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="the transfers: CSV with a header row, or JSON lines")
    parser.add_argument(
        "--format", choices=["csv", "jsonl"], help="the transfers file's format (default: from its extension)"
    )
    parser.add_argument(
        "--accounts", type=Path, metavar="FILE", help="accounts (CSV or JSON lines) to open first, by id"
    )
    parser.add_argument(
        "--state", type=Path, metavar="PATH", help=f"where progress is kept for a resume (default: FILE{STATE_SUFFIX})"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"transfers per request, 1 to {MAX_BATCH_SIZE} (default {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help=f"largest request body, the service's LEDGER_MAX_BODY_BYTES (default {DEFAULT_MAX_REQUEST_BYTES})",
    )
    parser.add_argument(
        "--retry-seconds",
        type=float,
        default=DEFAULT_RETRY_SECONDS,
        help=f"how long to retry a batch while the service is unavailable (default {DEFAULT_RETRY_SECONDS:.0f})",
    )
    parser.add_argument("--url", help="the service (LEDGER_URL; default http://LEDGER_HOST:LEDGER_PORT)")
    parser.add_argument(
        "--api-key",
        "--key",
        dest="api_key",
        help="an admin key (LEDGER_API_KEY, LEDGER_KEY or LEDGER_ADMIN_KEY; default $LEDGER_DATA_DIR/admin.key). "
        "A key on the command line is visible to other users of the machine: prefer the environment",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")


def _service_url(arguments: argparse.Namespace, settings: Any) -> str:
    if arguments.url:
        return str(arguments.url)
    if os.environ.get("LEDGER_URL"):
        return os.environ["LEDGER_URL"]
    host = settings.host if settings.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


def _api_key(arguments: argparse.Namespace, settings: Any) -> str:
    for candidate in (
        arguments.api_key,
        os.environ.get("LEDGER_API_KEY"),
        os.environ.get("LEDGER_KEY"),
        settings.admin_key,
    ):
        if candidate:
            return str(candidate).strip()
    key_file = Path(settings.admin_key_file)
    try:
        return key_file.read_text().strip()
    except OSError:
        raise ImportFailed(
            f"no API key: pass --api-key, or set LEDGER_API_KEY (an admin key), or run where {key_file} is readable",
            2,
        ) from None


def run(settings: Any, arguments: argparse.Namespace) -> int:
    """`ledger import`: the exit status, with one line on stderr saying why on a stop."""
    try:
        return _run(settings, arguments)
    except ImportFailed as error:
        print(f"ledger import: {error}", file=sys.stderr, flush=True)
        return error.status
    except KeyboardInterrupt:
        print(
            "\nledger import: interrupted; everything acknowledged is saved: run the same command again to resume",
            file=sys.stderr,
            flush=True,
        )
        return 130
    except OSError as error:
        # A file that cannot be read, or a state file that cannot be written: the
        # system's words and the path, on one line.
        print(f"ledger import: {error.strerror or error}: {error.filename or ''}", file=sys.stderr, flush=True)
        return 2


def _run(settings: Any, arguments: argparse.Namespace) -> int:
    from ledger.client import LedgerClient

    path: Path = arguments.file
    if not 1 <= arguments.batch_size <= MAX_BATCH_SIZE:
        raise ImportFailed(f"--batch-size must be 1 to {MAX_BATCH_SIZE}, got {arguments.batch_size}", 2)
    if arguments.max_request_bytes < 1024:
        raise ImportFailed(f"--max-request-bytes must be at least 1024, got {arguments.max_request_bytes}", 2)
    if arguments.retry_seconds < 0:
        raise ImportFailed("--retry-seconds must not be negative", 2)
    for given in (path, arguments.accounts):
        if given is not None and not given.is_file():
            raise ImportFailed(f"{given}: no such file", 2)
    options = Options(
        path=path,
        format=detect_format(path, arguments.format),
        state_path=arguments.state or path.with_name(path.name + STATE_SUFFIX),
        accounts_path=arguments.accounts,
        batch_size=arguments.batch_size,
        max_request_bytes=arguments.max_request_bytes,
        retry_seconds=arguments.retry_seconds,
        quiet=arguments.quiet,
    )
    if options.accounts_path is not None:
        detect_format(options.accounts_path, None)
    url, key = _service_url(arguments, settings), _api_key(arguments, settings)
    with path.open("rb") as lock:
        # One import per input file at a time: two would race on the state file and on
        # the order of arrival. The lock goes with the process, even on SIGKILL.
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ImportFailed(f"{path}: another ledger import of this file is running", 2) from None
        with LedgerClient(
            url,
            key,
            timeout=REQUEST_TIMEOUT_SECONDS,
            total_timeout=2 * REQUEST_TIMEOUT_SECONDS,
            max_connections=ACCOUNT_CONCURRENCY,
            max_keepalive_connections=ACCOUNT_CONCURRENCY,
        ) as client:
            return run_import(client, options, stdout=sys.stdout, stderr=sys.stderr)
