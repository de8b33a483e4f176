"""Signed checkpoints, kept outside the database: what a keyed chain alone cannot catch.

A keyed chain detects any change inside an account's journal, but not its last entries
deleted together with the account row rolled back to match: a prefix of a valid chain
is valid. Nor can a seal tell a deleted transfer, or a voided reservation put back to
`pending` with the seal it had then. Both need a memory of the past that the database's
writers cannot edit. A checkpoint is that memory: a JSON file in `LEDGER_CHECKPOINT_DIR`
(default `<data dir>/checkpoints`), MAC'd with the chain key, holding

- every account's head: its number of entries and the hash of its last entry;
- a transfer cut-off instant, the number of transfers created up to it, and how many of
  those were voided or expired up to it (statuses that never change again);
- the MAC of the previous checkpoint, so the files form a chain of their own.

Verification (`ledger.service.audit`) then requires the database to extend the latest
checkpoint: every account still there, its chain at least as long, with the same hash at
the checkpointed head; the same number of transfers up to the cut-off, as many of them
settled. Each new checkpoint is only written if the database extends the previous one;
otherwise nothing is written and the tampering is logged as an error (so the last good
checkpoint stays the reference).

The cut-off is the earliest start of any transaction still running when the checkpoint
is taken (or the clock when none is): a transaction that commits later wrote times after
its own start, so it can never add a transfer below the cut-off, and counts below it are
final. Changes after the last checkpoint are covered by the keyed chain and the seals
only: take checkpoints often (`LEDGER_CHECKPOINT_INTERVAL_SECONDS`, 60 by default), and
copy them somewhere the database's administrators cannot write.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hmac
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger.integrity import LEGACY_KEY_ID, ChainKey, Keyring

logger = logging.getLogger("ledger.checkpoints")

FORMAT = "ledger-checkpoint-v1"
PREFIX = "checkpoint-"

CUTOFF = text(
    """
    SELECT least(clock_timestamp(), min(xact_start)) - interval '1 microsecond' FROM pg_stat_activity
    WHERE datname = current_database() AND pid <> pg_backend_pid() AND xact_start IS NOT NULL
    """
)
HEADS = text("SELECT id, entries_count, last_entry_hash FROM accounts ORDER BY id")
TRANSFER_COUNTS = text(
    """
    SELECT count(*) AS total,
           count(*) FILTER (WHERE status IN ('voided', 'expired') AND updated_at <= :cutoff) AS settled
    FROM transfers WHERE created_at <= :cutoff
    """
)
# Entries a new checkpoint would pin that no live key vouches for (the legacy chain, a
# revoked key): a checkpoint must never make them look trusted.
UNVOUCHED = text(
    """
    SELECT p.id, e.sequence, e.key_id
    FROM unnest(CAST(:ids AS text[]), CAST(:after AS bigint[])) AS p(id, after)
    JOIN entries e ON e.account_id = p.id AND e.sequence > p.after
    WHERE e.key_id <> ALL(CAST(:live AS text[]))
    LIMIT 10
    """
)
HEADS_NOW = text(
    """
    SELECT p.id, a.id IS NOT NULL AS present, a.entries_count, e.hash
    FROM unnest(CAST(:ids AS text[]), CAST(:counts AS bigint[])) AS p(id, count)
    LEFT JOIN accounts a ON a.id = p.id
    LEFT JOIN entries e ON e.account_id = p.id AND e.sequence = p.count
    """
)


class CheckpointError(Exception):
    """A checkpoint file that cannot be trusted: unreadable, unknown key, bad MAC."""


class TamperDetected(Exception):
    """The database does not extend the last checkpoint."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(f"{len(problems)} differences from the last checkpoint: " + "; ".join(problems[:10]))
        self.problems = problems


@dataclass(frozen=True)
class Checkpoint:
    taken_at: datetime
    key_id: str
    previous: str | None
    cutoff: datetime
    transfers: int
    settled: int
    heads: dict[str, tuple[int, bytes | None]]
    mac: str = ""
    path: Path | None = field(default=None, compare=False)

    def body(self) -> dict[str, object]:
        return {
            "format": FORMAT,
            "key_id": self.key_id,
            "taken_at": _timestamp(self.taken_at),
            "previous": self.previous,
            "transfers": {
                "cutoff": _timestamp(self.cutoff),
                "count": str(self.transfers),
                "settled": str(self.settled),
            },
            "accounts": [
                [account_id, str(count), head.hex() if head else ""] for account_id, (count, head) in self.heads.items()
            ],
        }


def canonical(body: dict[str, object]) -> str:
    """The MAC'd form: the body without `mac`, keys sorted, no whitespace, UTF-8."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def sign(key: ChainKey, checkpoint: Checkpoint) -> str:
    return key.mac(canonical(checkpoint.body())).hex()


def load(path: Path, keyring: Keyring) -> Checkpoint:
    try:
        document = json.loads(path.read_text())
        if document.get("format") != FORMAT:
            raise CheckpointError(f"{path.name}: not a {FORMAT} file")
        body = {key: value for key, value in document.items() if key != "mac"}
        key = keyring.get(document["key_id"])
        if key is None:
            raise CheckpointError(f"{path.name}: signed with chain key {document['key_id']!r}, not in the keyring")
        if not hmac.compare_digest(key.mac(canonical(body)).hex(), str(document["mac"])):
            raise CheckpointError(f"{path.name}: its MAC does not match its content (altered, or another ledger's)")
        transfers = document["transfers"]
        return Checkpoint(
            taken_at=datetime.fromisoformat(document["taken_at"]),
            key_id=document["key_id"],
            previous=document["previous"],
            cutoff=datetime.fromisoformat(transfers["cutoff"]),
            transfers=int(transfers["count"]),
            settled=int(transfers["settled"]),
            heads={
                account_id: (int(count), bytes.fromhex(head) if head else None)
                for account_id, count, head in document["accounts"]
            },
            mac=document["mac"],
            path=path,
        )
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path.name}: unreadable ({type(error).__name__}: {error})") from error


def paths(directory: Path) -> list[Path]:
    """Checkpoint files, oldest first (their names sort by time)."""
    if not directory.is_dir():
        return []
    return sorted(path for path in directory.glob(f"{PREFIX}*.json") if path.is_file())


def latest(directory: Path, keyring: Keyring) -> Checkpoint | None:
    """The newest checkpoint, or None when there is none; CheckpointError if the newest
    file cannot be trusted (it is never silently skipped for an older one)."""
    files = paths(directory)
    return load(files[-1], keyring) if files else None


async def transfer_counts(connection: AsyncConnection, cutoff: datetime) -> tuple[int, int]:
    row = (await connection.execute(TRANSFER_COUNTS, {"cutoff": cutoff})).one()
    return int(row.total), int(row.settled)


async def differences(connection: AsyncConnection, checkpoint: Checkpoint) -> list[str]:
    """How the database (in the connection's snapshot) fails to extend `checkpoint`."""
    problems = []
    ids = list(checkpoint.heads)
    counts = [checkpoint.heads[account_id][0] for account_id in ids]
    rows = (await connection.execute(HEADS_NOW, {"ids": ids, "counts": counts})).all()
    for row in rows:
        count, head = checkpoint.heads[row.id]
        if not row.present:
            problems.append(f"account {row.id!r} is gone")
        elif row.entries_count < count:
            problems.append(f"account {row.id!r} has {row.entries_count} entries, the checkpoint {count}")
        elif count and (row.hash is None or bytes(row.hash) != head):
            problems.append(f"account {row.id!r}: entry {count} is not the one checkpointed")
    total, settled = await transfer_counts(connection, checkpoint.cutoff)
    if total != checkpoint.transfers:
        problems.append(f"{total} transfers up to the cut-off, the checkpoint counted {checkpoint.transfers}")
    if settled != checkpoint.settled:
        problems.append(f"{settled} voided or expired up to the cut-off, the checkpoint counted {checkpoint.settled}")
    return problems


async def take(engine: AsyncEngine, keyring: Keyring, directory: Path, keep: int) -> Checkpoint | None:
    """Write a new checkpoint if the database changed since the last one and extends it;
    return it (None when nothing changed). Raises TamperDetected when the database does
    not extend the last checkpoint, CheckpointError when that one cannot be trusted."""
    previous = latest(directory, keyring)
    async with engine.connect() as connection:
        # The cut-off is read before the snapshot is taken: a transaction that commits
        # between the two started before the cut-off was read, so it cannot be below it.
        cutoff = (await connection.execute(CUTOFF)).scalar_one()
        await connection.rollback()
        await connection.begin()
        await connection.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
        taken_at = (await connection.execute(text("SELECT clock_timestamp()"))).scalar_one()
        heads = {
            row.id: (int(row.entries_count), bytes(row.last_entry_hash) if row.last_entry_hash else None)
            for row in (await connection.execute(HEADS)).all()
        }
        total, settled = await transfer_counts(connection, cutoff)
        problems = await differences(connection, previous) if previous is not None else []
        problems += await _unvouched(connection, keyring, heads, previous)
        if problems:
            raise TamperDetected(problems)
        await connection.rollback()
    if previous is not None and heads == previous.heads and (total, settled) == (previous.transfers, previous.settled):
        return None
    key = keyring.active
    unsigned = Checkpoint(taken_at, key.id, previous.mac if previous else None, cutoff, total, settled, heads)
    checkpoint = replace(unsigned, mac=sign(key, unsigned))
    path = _write(directory, checkpoint)
    for old in paths(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return replace(checkpoint, path=path)


async def _unvouched(
    connection: AsyncConnection,
    keyring: Keyring,
    heads: dict[str, tuple[int, bytes | None]],
    previous: Checkpoint | None,
) -> list[str]:
    """Entries since the previous checkpoint under no live key. Without a previous one,
    the unkeyed entries of a ledger upgraded from before chain keys are pinned as they
    are (trust on first use): the first checkpoint is what vouches for them from then on."""
    pinned = previous.heads if previous is not None else {}
    grown = {
        key: pinned.get(key, (0, None))[0] for key, (count, _) in heads.items() if count > pinned.get(key, (0, None))[0]
    }
    if not grown:
        return []
    live = [key.id for key in keyring.keys if not key.revoked] + ([LEGACY_KEY_ID] if previous is None else [])
    params = {"ids": list(grown), "after": list(grown.values()), "live": live}
    rows = (await connection.execute(UNVOUCHED, params)).all()
    return [f"account {row.id!r}: entry {row.sequence} is under key {row.key_id!r}, which may not sign" for row in rows]


def _write(directory: Path, checkpoint: Checkpoint) -> Path:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    name = f"{PREFIX}{checkpoint.taken_at.strftime('%Y%m%dT%H%M%S%fZ')}.json"
    path = directory / name
    temporary = directory / f".{name}.tmp"
    document = {**checkpoint.body(), "mac": checkpoint.mac}
    with temporary.open("w") as handle:
        json.dump(document, handle, separators=(",", ":"))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return path


@contextlib.contextmanager
def _exclusive(directory: Path) -> Iterator[bool]:
    """Whether this process may write checkpoints now (one writer per directory)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    with (directory / ".lock").open("a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


async def run_checkpointer(engine: AsyncEngine, keyring: Keyring, directory: Path, interval: float, keep: int) -> None:
    """Take a checkpoint at start, then every `interval` seconds, until cancelled."""
    while True:
        try:
            with _exclusive(directory) as allowed:
                if allowed:
                    checkpoint = await take(engine, keyring, directory, keep)
                    if checkpoint is not None:
                        logger.info("checkpoint %s: %d accounts", checkpoint.path, len(checkpoint.heads))
        except asyncio.CancelledError:
            raise
        except (TamperDetected, CheckpointError) as error:
            logger.error("no checkpoint written, the ledger may have been tampered with: %s", error)
        except Exception as error:  # an outage: try again at the next interval
            logger.warning("checkpoint failed: %s", error)
        await asyncio.sleep(interval)
