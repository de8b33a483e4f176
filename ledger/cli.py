"""`ledger serve`, `ledger migrate`, `ledger keys ...`, `ledger audit ...` and `ledger db ...`.

Every failure a user can cause (a setting, an unreachable database, a taken port) ends
the command with one line naming the cause and a non-zero exit, before anything claims
to be serving; a traceback is for bugs."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import logging.config
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger import __version__, migrate
from ledger.integrity import Keyring, KeyringError, load_keyring, rotate_keyring
from ledger.observability import logging_config, share_worker_metrics, stop_sharing_worker_metrics
from ledger.settings import Settings, SettingsError

logger = logging.getLogger("ledger")
T = TypeVar("T")


class StartupError(Exception):
    """The service must not start (or the command not run) as configured."""


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{parts.username or ''}@{host}:{parts.port or ''}{parts.path}"


@contextmanager
def _database_errors(url: str) -> Iterator[None]:
    """Turn a database that cannot be reached or used into one line naming it and why."""
    import asyncpg
    from sqlalchemy.exc import DBAPIError, InterfaceError

    try:
        yield
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, DBAPIError, InterfaceError) as error:
        raise StartupError(f"cannot use the database at {_redacted(url)}: {_root_cause(error)}") from error


def _root_cause(error: BaseException) -> str:
    """The innermost error's first line: what the driver or the kernel said."""
    seen: set[int] = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = getattr(error, "orig", None) or error.__cause__
        if not isinstance(inner, BaseException):
            break
        error = inner
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _check_port(host: str, port: int) -> None:
    """Fail before starting anything if the HTTP port cannot be bound (as uvicorn binds
    it: SO_REUSEADDR, so a restart's TIME_WAIT connections do not count)."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise StartupError(f"cannot listen on {host}:{port}: {error.strerror}") from error
    family, kind, protocol, _, address = addresses[0]
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            raise StartupError(
                f"cannot listen on {host}:{port}: {error.strerror} (is another service using the port? "
                "choose another with --port or LEDGER_PORT)"
            ) from error


@dataclass
class Database:
    """Where the service serves (a least-privileged role) and where migrations run (the
    tables' owner), and the embedded server started for them, if any."""

    serving_url: str
    migration_url: str
    embedded: Any = None

    def stop(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()


def _database(settings: Settings) -> Database:
    if settings.database_url:
        return Database(settings.database_url, settings.migration_database_url or settings.database_url)
    from ledger.embedded import EmbeddedPostgres

    embedded = EmbeddedPostgres(settings.data_dir)
    owner_url = embedded.start()
    logger.info(
        "embedded PostgreSQL at %s (data in %s, passwords in %s)",
        _redacted(owner_url),
        embedded.data_dir,
        embedded.credentials_file,
    )
    return Database(embedded.service_url, owner_url, embedded)


def _keyring(settings: Settings, *, create: bool) -> Keyring:
    try:
        keyring, created = load_keyring(settings.chain_keys, settings.chain_key_file, create=create)
    except (KeyringError, OSError) as error:
        raise StartupError(
            f"chain keys: {error}. Set LEDGER_CHAIN_KEYS, or LEDGER_DATA_DIR to a directory the service can write "
            "(see README, Tamper evidence)"
        ) from error
    if created:
        logger.warning(
            "created the chain key %s in %s: back this file up, apart from the database; without it the "
            "ledger's history can no longer be verified",
            keyring.active.id,
            settings.chain_key_file,
        )
    return keyring


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _sighup_as_sigterm(signum: int, frame: object) -> None:
    # A closed terminal: shut down as on SIGTERM (uvicorn finishes in-flight requests,
    # then the embedded PostgreSQL stops) instead of dying on the spot.
    os.kill(os.getpid(), signal.SIGTERM)


def serve(settings: Settings) -> int:
    import uvicorn

    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal into the handler
    # it found: make that handler unwind the stack, so that `finally` stops the embedded
    # PostgreSQL instead of the process dying with it still running.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    signal.signal(signal.SIGHUP, _sighup_as_sigterm)
    if settings.insecure_disable_auth:
        logger.warning("AUTHENTICATION IS DISABLED (LEDGER_INSECURE_DISABLE_AUTH=true): every client is admin")
    _check_port(settings.host, settings.port)
    database = _database(settings)
    metrics_directory = None
    try:
        with _database_errors(database.migration_url):
            migrate.upgrade(database.migration_url, pooler=settings.database_pooler)
        # Created only once the database answered: a start that fails earlier leaves nothing.
        keyring = _keyring(settings, create=True)
        # With several workers, where each publishes its metrics for whichever one is scraped.
        metrics_directory = share_worker_metrics(settings.data_dir, settings.workers)
        with _database_errors(database.serving_url):
            asyncio.run(_prepare(settings, database, keyring))
        # Worker processes build their app from the environment: hand them the serving
        # URL only; the owner's never reaches them.
        os.environ["LEDGER_DATABASE_URL"] = database.serving_url
        os.environ.pop("LEDGER_MIGRATION_DATABASE_URL", None)
        logger.info("serving on http://%s:%s (docs at /schema)", settings.host, settings.port)
        uvicorn.run(
            "ledger.http.app:create_app_from_env",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_level=settings.log_level,
            access_log=False,
            # Header size and time limits per connection (ledger.http.protocol).
            http="ledger.http.protocol:LimitedHttpToolsProtocol",
            timeout_keep_alive=settings.keep_alive_timeout_seconds,
            # In-flight requests finish on SIGTERM; after this many seconds they are cut.
            timeout_graceful_shutdown=10,
            log_config=logging_config(settings.log_level),
            server_header=False,
            # The service uses no client address or scheme: rewriting them from
            # X-Forwarded-* headers on every request would be work for nothing.
            proxy_headers=False,
        )
    finally:
        database.stop()
        stop_sharing_worker_metrics(metrics_directory)
    return 0


async def _prepare(settings: Settings, database: Database, keyring: Keyring) -> None:
    """Checks before serving: the serving role's privileges, the chain keys against the
    database, and the first start's admin key."""
    from ledger.database import create_engine, inspect_serving_role
    from ledger.service import keys

    engine = create_engine(settings, database.serving_url, pool_size=1, max_overflow=0)
    try:
        async with engine.connect() as connection:
            report = await inspect_serving_role(connection)
        if report.missing:
            raise StartupError(
                f"the database role {report.role!r} lacks what serving needs ({', '.join(report.missing)}): "
                "it must be a member of ledger_service, which the migrations grant (README, Database roles)"
            )
        if report.privileged:
            reasons = ", ".join(report.privileged)
            if not settings.allow_privileged_role:
                raise StartupError(
                    f"refusing to serve as the database role {report.role!r}, which has more power than serving "
                    f"needs: {reasons}. It could rewrite the journal it is meant to protect. Serve as a member of "
                    "ledger_service (LEDGER_DATABASE_URL) and migrate as the owner (LEDGER_MIGRATION_DATABASE_URL); "
                    "see README, Database roles. LEDGER_ALLOW_PRIVILEGED_ROLE=true overrides this."
                )
            logger.warning(
                "serving as the privileged database role %r (%s) because LEDGER_ALLOW_PRIVILEGED_ROLE=true: the "
                "database does not protect the journal from this service",
                report.role,
                reasons,
            )
        async with engine.connect() as connection:
            query = text("SELECT DISTINCT seal_key FROM accounts WHERE seal_key IS NOT NULL")
            sealed_with = {row[0] for row in await connection.execute(query)}
        unknown = sorted(sealed_with - set(keyring.ids))
        if unknown:
            raise StartupError(
                f"the database's accounts are sealed with chain key(s) {', '.join(unknown)}, which the keyring "
                f"({'LEDGER_CHAIN_KEYS' if settings.chain_keys else settings.chain_key_file}) does not have: restore "
                "the key file; a ledger served with another key could not verify its own history"
            )
        if settings.insecure_disable_auth or settings.admin_key:
            return
        try:
            created = await keys.bootstrap_admin_key(engine, keyring.active, settings.admin_key_file)
        except OSError as error:
            logger.error(
                "could not store a first admin key in %s (%s): none was created. Create one with "
                "`ledger keys create --role admin`, or set LEDGER_ADMIN_KEY",
                settings.admin_key_file,
                error,
            )
            return
        if created is not None:
            _announce_admin_key(settings, created[1])
    finally:
        await engine.dispose()


def _announce_admin_key(settings: Settings, key: str) -> None:
    path = settings.admin_key_file
    print(
        "\n"
        "  First start: an admin API key was created. It is shown this once, and kept in\n"
        f"  {path} (readable by you only):\n\n"
        f"      {key}\n\n"
        "  Every request needs it (or a key made with it):\n"
        f'      curl -H "Authorization: Bearer $(cat {path})" http://{settings.host}:{settings.port}/v1/accounts\n'
        "  Create narrower keys with `ledger keys create --role poster|auditor` or POST /v1/keys.\n",
        file=sys.stderr,
        flush=True,
    )


def run_migrations(settings: Settings) -> int:
    database = _database(settings)
    try:
        with _database_errors(database.migration_url):
            migrate.upgrade(database.migration_url, pooler=settings.database_pooler)
        logger.info("database at %s is at revision %s", _redacted(database.migration_url), migrate.head_revision())
    finally:
        database.stop()
    return 0


def _on_database(
    settings: Settings, work: Callable[[AsyncEngine], Awaitable[T]], *, migrate_first: bool = False, owner: bool = False
) -> T:
    """Run `work` with an engine on the configured (or embedded) database, as the serving
    role (or the owner), then clean up."""
    from ledger.database import create_engine

    database = _database(settings)
    try:
        if migrate_first:
            with _database_errors(database.migration_url):
                migrate.upgrade(database.migration_url, pooler=settings.database_pooler)

        async def run() -> T:
            engine = create_engine(settings, database.migration_url if owner else database.serving_url)
            try:
                return await work(engine)
            finally:
                await engine.dispose()

        with _database_errors(database.migration_url if owner else database.serving_url):
            return asyncio.run(run())
    finally:
        database.stop()


def _progress(done: int, total: int, entries: int) -> None:
    if sys.stderr.isatty() or done == total or done % 1000 == 0:
        width = 30
        filled = width * done // max(total, 1)
        print(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} accounts, {entries} entries",
            end="" if done < total else "\n",
            file=sys.stderr,
            flush=True,
        )


def audit_verify(settings: Settings, account_id: str | None, checkpoint_file: str | None) -> int:
    """Verify the ledger; print the report as JSON; exit 1 when anything is wrong."""
    from pathlib import Path

    from ledger.service import audit, checkpoints

    keyring = _keyring(settings, create=False)
    checkpoint, error = None, None
    try:
        if checkpoint_file:
            checkpoint = checkpoints.load(Path(checkpoint_file), keyring)
        else:
            checkpoint = checkpoints.latest(settings.checkpoints, keyring)
    except checkpoints.CheckpointError as invalid:
        error = str(invalid)

    report = _on_database(
        settings,
        lambda engine: audit.verify(engine, keyring, account_id, checkpoint, _progress, checkpoint_error=error),
    )
    print(
        json.dumps(
            {
                "ok": report.ok,
                "accounts_checked": report.accounts_checked,
                "entries_checked": report.entries_checked,
                "transfers_checked": report.transfers_checked,
                "checkpoint": str(checkpoint.path) if checkpoint is not None else None,
                "problems": [
                    {
                        "account_id": problem.account_id,
                        "sequence": problem.sequence,
                        "code": problem.code,
                        "detail": problem.detail,
                        **({"transfer_id": problem.transfer_id} if problem.transfer_id else {}),
                    }
                    for problem in report.problems
                ],
                "problems_total": report.problems_total,
            },
            indent=2,
        )
    )
    return 0 if report.ok else 1


def audit_checkpoint(settings: Settings) -> int:
    """Write a checkpoint now (if anything changed since the last); exit 1 on tampering."""
    from ledger.service import checkpoints

    keyring = _keyring(settings, create=False)
    try:
        checkpoint = _on_database(
            settings, lambda engine: checkpoints.take(engine, keyring, settings.checkpoints, settings.checkpoint_keep)
        )
    except (checkpoints.TamperDetected, checkpoints.CheckpointError) as error:
        print(f"no checkpoint written: {error}", file=sys.stderr)
        return 1
    if checkpoint is None:
        print("nothing changed since the last checkpoint", file=sys.stderr)
    else:
        print(checkpoint.path)
    return 0


def audit_rotate(settings: Settings) -> int:
    if settings.chain_keys:
        raise StartupError(
            "LEDGER_CHAIN_KEYS is set: put a new `id:secret` first in it yourself (README, Tamper evidence)"
        )
    key = rotate_keyring(settings.chain_key_file)
    print(
        f"chain key {key.id} is now first in {settings.chain_key_file}. Restart every instance (with this file), "
        "then run `ledger audit checkpoint`.",
        file=sys.stderr,
    )
    return 0


def audit_reseal(settings: Settings) -> int:
    """Seal every row not sealed with the active key (rows from before seals existed, or
    last changed under an older key) with it, then checkpoint: run `ledger audit verify`
    first, since this trusts the rows as they are."""
    from ledger.service import reseal

    keyring = _keyring(settings, create=False)
    counts = _on_database(settings, lambda engine: reseal.reseal(engine, keyring), owner=True)
    print(f"sealed {json.dumps(counts)}", file=sys.stderr)
    return audit_checkpoint(settings)


def keys_command(settings: Settings, arguments: argparse.Namespace) -> int:
    from ledger.service import keys

    if arguments.keys_command == "create":
        keyring = _keyring(settings, create=True)
        record, key = _on_database(
            settings,
            lambda engine: keys.create_key(engine, keyring.active, arguments.role, arguments.name, "cli"),
            migrate_first=True,
        )
        print(key)
        print(f"created {record.role} key {record.id}; store it now, it cannot be shown again", file=sys.stderr)
        return 0
    if arguments.keys_command == "revoke":
        record = _on_database(settings, lambda engine: keys.revoke_key(engine, arguments.id, "cli"))
        print(f"revoked {record.id} ({record.role}) at {record.revoked_at}; it stops working within 5 s")
        return 0

    async def every_key(engine: AsyncEngine) -> list[keys.ApiKeyRecord]:
        records, cursor = [], None
        while True:
            page = await keys.list_keys(engine, 1000, cursor)
            records += page.items
            if page.next_cursor is None:
                return records
            cursor = page.next_cursor

    records = _on_database(settings, every_key)
    print(f"{'id':<22} {'role':<8} {'created':<20} {'revoked':<20} name")
    for record in records:
        revoked = record.revoked_at.strftime("%Y-%m-%d %H:%M:%S") if record.revoked_at else "-"
        print(
            f"{record.id:<22} {record.role:<8} {record.created_at.strftime('%Y-%m-%d %H:%M:%S'):<20} "
            f"{revoked:<20} {record.name or ''}"
        )
    return 0


def db_command(settings: Settings, arguments: argparse.Namespace) -> int:
    """`ledger db status|stop`: the embedded PostgreSQL of LEDGER_DATA_DIR, whoever started it."""
    from ledger.embedded import EmbeddedPostgres

    if settings.database_url:
        print(
            "note: LEDGER_DATABASE_URL is set, so the service does not use the embedded PostgreSQL",
            file=sys.stderr,
        )
    embedded = EmbeddedPostgres(settings.data_dir)
    if (embedded.pgdata / "PG_VERSION").exists():
        embedded._prepare_permissions()
    else:
        print(f"no embedded PostgreSQL in {embedded.data_dir}")
        return 3 if arguments.db_command == "status" else 0
    if arguments.db_command == "stop":
        stopped = embedded.stop_server()
        print(f"stopped the embedded PostgreSQL in {embedded.data_dir}" if stopped else "not running")
        return 0
    port = embedded._running_port()
    if port is None:
        print(f"not running (data in {embedded.pgdata})")
        return 3
    owner = embedded.owner()
    print(
        f"running on 127.0.0.1:{port} (pid {embedded.postmaster_pid}, data in {embedded.pgdata}), "
        + (
            f"owned by ledger process {owner}"
            if owner
            else "owned by no live ledger process (the next start adopts it)"
        )
    )
    return 0


def cluster_command(arguments: argparse.Namespace) -> int:
    from pathlib import Path

    from ledger.cluster import stack

    directory = Path(arguments.dir)
    if arguments.cluster_command == "up":
        try:
            state = stack.up(directory, arguments.instances, arguments.port, arguments.synchronous_commit)
        except RuntimeError as error:
            print(f"ledger: {error}", file=sys.stderr)
            return 2
        key_file = Path(state["admin_key_file"])
        # No first key is made when LEDGER_ADMIN_KEY is set: that one is the admin key.
        key = key_file.read_text().strip() if key_file.exists() else "$LEDGER_ADMIN_KEY"
        kept = f"kept in {key_file}" if key_file.exists() else "from LEDGER_ADMIN_KEY"
        print(
            f"cluster ready: {state['base_url']}\n"
            f"  admin key: {key}  ({kept})\n"
            f"  primary 127.0.0.1:{state['primary']['port']}, synchronous standby 127.0.0.1:{state['standby']['port']}, "
            f"PgBouncer 127.0.0.1:{state['pgbouncer']['port']}, "
            f"instances {', '.join(str(i['port']) for i in state['instances'])}\n"
            f'  try: curl -H "Authorization: Bearer {key}" {state["base_url"]}/v1/accounts\n'
            f"  stop it with `make cluster-down` (ledger cluster down --dir {directory})"
        )
        return 0
    if arguments.cluster_command == "down":
        stopped = stack.down(directory)
        print("cluster stopped" if stopped else f"no cluster running from {directory}")
        return 0
    state = stack.read_state(directory)
    if not state:
        print(f"no cluster in {directory}")
        return 3
    print(json.dumps(state, indent=2))
    return 0 if state.get("status") not in ("stopped", "failed") else 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ledger", description="A double-entry banking ledger on PostgreSQL.")
    parser.add_argument("--version", action="version", version=f"ledger {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="apply migrations and serve HTTP")
    serve_parser.add_argument("--host", help="address to bind (LEDGER_HOST, default 127.0.0.1)")
    serve_parser.add_argument("--port", type=int, help="port (LEDGER_PORT, default 8000)")
    serve_parser.add_argument("--workers", type=int, help="worker processes (LEDGER_WORKERS, default 1)")
    commands.add_parser("migrate", help="apply migrations and exit")
    keys_parser = commands.add_parser("keys", help="manage API keys")
    keys_commands = keys_parser.add_subparsers(dest="keys_command", required=True)
    create_parser = keys_commands.add_parser("create", help="create a key and print it once")
    create_parser.add_argument("--role", required=True, choices=["admin", "poster", "auditor"])
    create_parser.add_argument("--name", help="a label for the key")
    keys_commands.add_parser("list", help="list every key (never the key itself)")
    revoke_parser = keys_commands.add_parser("revoke", help="revoke a key (effective within 5 s)")
    revoke_parser.add_argument("id", help="the key's id (key_...)")
    audit_parser = commands.add_parser("audit", help="audit the journal")
    audit_commands = audit_parser.add_subparsers(dest="audit_command", required=True)
    verify_parser = audit_commands.add_parser(
        "verify", help="check every chain, seal and balance against the last checkpoint; exit 1 on any problem"
    )
    verify_parser.add_argument("--account", help="verify this account (and its transfers) only")
    verify_parser.add_argument("--checkpoint", help="compare with this checkpoint file instead of the newest")
    audit_commands.add_parser("checkpoint", help="write a signed checkpoint of every account's head now")
    audit_commands.add_parser("rotate-chain-key", help="put a new chain key first in the key file")
    audit_commands.add_parser(
        "reseal", help="seal every row with the active chain key, then checkpoint (as the owner role)"
    )
    statement_parser = commands.add_parser("statement", help="print an account's statement (ledger.statement)")
    statement_parser.add_argument("account", help="the account's id")
    for option, dest in (("--from", "start"), ("--to", "end")):
        statement_parser.add_argument(option, dest=dest, metavar="TIMESTAMP", help="RFC 3339 with an offset, inclusive")
    statement_parser.add_argument("--format", choices=["text", "csv"], default="text", help="default: text")
    import_parser = commands.add_parser(
        "import", help="load a transfer history (CSV or JSON lines) into a running service, resumably (ledger.importer)"
    )
    from ledger import importer

    importer.add_arguments(import_parser)
    db_parser = commands.add_parser("db", help="the embedded PostgreSQL (LEDGER_DATA_DIR)")
    db_commands = db_parser.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("status", help="is it running, on which port, and who owns it (exit 3: not running)")
    db_commands.add_parser("stop", help="stop it, whoever started it")
    cluster_parser = commands.add_parser(
        "cluster", help="a local scaled-out deployment: primary, synchronous standby, PgBouncer, instances, HAProxy"
    )
    cluster_commands = cluster_parser.add_subparsers(dest="cluster_command", required=True)
    cluster_up = cluster_commands.add_parser("up", help="start it (in the background) and print its URL and admin key")
    cluster_up.add_argument("--instances", type=int, default=2, help="service instances (default 2)")
    cluster_up.add_argument("--port", type=int, default=8080, help="HAProxy's port, the base URL (default 8080)")
    cluster_up.add_argument(
        "--synchronous-commit",
        choices=["on", "remote_apply", "remote_write", "local"],
        default="on",
        help="on (default): acknowledged once flushed on the standby too; remote_apply: also visible there; "
        "remote_write: received there; local: the standby asynchronous",
    )
    for name in ("up", "down", "status"):
        target = cluster_up if name == "up" else cluster_commands.add_parser(name, help=f"{name} the cluster")
        target.add_argument("--dir", default=".ledger-cluster", help="its state and data (default .ledger-cluster)")
    arguments = parser.parse_args(argv)

    overrides = {
        name: value for name in ("host", "port", "workers") if (value := getattr(arguments, name, None)) is not None
    }
    try:
        settings = Settings.from_env(**overrides)
    except SettingsError as error:
        print(f"ledger: {error}", file=sys.stderr)
        return 2
    level = settings.log_level
    if arguments.command not in ("serve", "migrate") and not os.environ.get("LEDGER_LOG_LEVEL"):
        # A command whose output is its answer (a key, a statement, a status) says only
        # warnings and errors besides it, unless asked for more.
        level = "warning"
    logging.config.dictConfig(logging_config(level))
    from ledger.embedded import EmbeddedPostgresError

    try:
        if arguments.command == "serve":
            return serve(settings)
        if arguments.command == "db":
            return db_command(settings, arguments)
        if arguments.command == "cluster":
            return cluster_command(arguments)
        if arguments.command == "keys":
            return keys_command(settings, arguments)
        if arguments.command == "audit":
            if arguments.audit_command == "verify":
                return audit_verify(settings, arguments.account, arguments.checkpoint)
            if arguments.audit_command == "checkpoint":
                return audit_checkpoint(settings)
            if arguments.audit_command == "rotate-chain-key":
                return audit_rotate(settings)
            return audit_reseal(settings)
        if arguments.command == "import":
            return importer.run(settings, arguments)
        if arguments.command == "statement":
            from ledger import statement

            return statement.run(settings, arguments, _on_database)
        return run_migrations(settings)
    except (StartupError, KeyringError) as error:
        print(f"ledger: {error}", file=sys.stderr)
        return 2
    except EmbeddedPostgresError as error:
        # Its message ends with PostgreSQL's log tail: the first line says what failed.
        print(
            f"ledger: embedded PostgreSQL: {str(error).splitlines()[0]} (log: {settings.data_dir}/postgresql.log)",
            file=sys.stderr,
        )
        return 2
    except OSError as error:
        # A directory or file the configuration names that cannot be made or read
        # (LEDGER_DATA_DIR, a key file): the system's own words, on one line.
        print(f"ledger: {error.strerror or error}: {error.filename or ''} (check LEDGER_DATA_DIR)", file=sys.stderr)
        return 2
