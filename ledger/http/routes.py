"""The v1 endpoints. Each handler decodes, calls the service, encodes; nothing else."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, TypeVar
from urllib.parse import quote

from litestar import Controller, Request, Response, get, patch, post
from litestar.datastructures import State
from litestar.params import JSONBody, PathParameter, QueryParameter

from ledger.domain import BatchItem, TransferRequest
from ledger.errors import AccountNotFound, BatchTooLarge, InvalidRequest, TransferNotFound
from ledger.http.auth import ADMIN, MOVE_MONEY, READ, principal, require_admin_for
from ledger.http.body import decode_strict, path_identifier
from ledger.http.metadata import metadata_filter
from ledger.http.problems import READ_PROBLEMS, WRITE_PROBLEMS, documented, refusal_response, replayed
from ledger.http.render import account_out, balance_out, batch_result_out, entry_out, refusal_detail, transfer_out
from ledger.http.schemas import (
    CURRENCY_RE,
    IDENTIFIER_RE,
    AccountBalanceOut,
    AccountChangeOut,
    AccountChangePage,
    AccountCreate,
    AccountOut,
    AccountPage,
    AccountUpdate,
    BatchCreate,
    BatchOut,
    EntryPage,
    PostPending,
    Reverse,
    TransferCreate,
    TransferOut,
    TransferPage,
    VoidPending,
    format_timestamp,
    parse_timestamp,
)
from ledger.http.streaming import BudgetedStream, ExportCut
from ledger.models import TRANSFER_STATUSES
from ledger.service import audit
from ledger.service.records import TransferOutcome

T = TypeVar("T")
REPLAYED = {"Idempotent-Replayed": "true"}

Limit = Annotated[int | None, QueryParameter(ge=1, le=1000, description="Page size, 1 to 1000 (default 100)")]
Cursor = Annotated[str | None, QueryParameter(max_length=512, description="Opaque cursor from next_cursor")]
AccountId = Annotated[str, PathParameter(description="The account's id")]
TransferId = Annotated[str, PathParameter(description="The transfer's id")]
CurrencyFilter = Annotated[
    str | None, QueryParameter(description="Only accounts in this currency", pattern=r"^[A-Z]{3}$")
]
AccountFilter = Annotated[str | None, QueryParameter(description="Transfers debiting or crediting this account")]
StatusFilter = Annotated[str | None, QueryParameter(description="posted, pending, voided, expired or rejected")]
AsOf = Annotated[str | None, QueryParameter(description="RFC 3339; default now", format="date-time")]
From = Annotated[str | None, QueryParameter(name="from", description="RFC 3339, inclusive", format="date-time")]
To = Annotated[str | None, QueryParameter(name="to", description="RFC 3339, inclusive", format="date-time")]


def _timestamp(field: str, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_timestamp(field, value)
    except ValueError as error:
        raise InvalidRequest(str(error), [{"field": field, "message": str(error)}]) from error


def _query_identifier(field: str, value: str | None) -> str | None:
    if value is not None and not IDENTIFIER_RE.fullmatch(value):
        raise InvalidRequest(
            f"`{field}` is not a valid identifier", [{"field": field, "message": "not a valid identifier"}]
        )
    return value


def _page_size(state: State, limit: int | None) -> int:
    if limit is None:
        return int(state.settings.default_page_size)
    maximum = state.settings.max_page_size
    if limit > maximum:
        raise InvalidRequest(
            f"`limit` must be at most {maximum}", [{"field": "limit", "message": f"at most {maximum}"}]
        )
    return limit


class AccountController(Controller):
    path = "/v1/accounts"
    tags = ["accounts"]

    @post(
        "/",
        operation_id="createAccount",
        status_code=201,
        opt=MOVE_MONEY,
        responses={**documented(*WRITE_PROBLEMS), 200: replayed(AccountOut)},
    )
    async def create_account(
        self, request: Request, state: State, data: JSONBody[AccountCreate]
    ) -> Response[AccountOut]:
        """Open an account. Same `id` and same fields: 200 with the stored account and
        `Idempotent-Replayed: true`; same `id`, other fields: 409."""
        body = await decode_strict(request, AccountCreate)
        if body.allow_negative_balance:
            # Money enters the ledger from such accounts: a poster could otherwise mint it.
            require_admin_for(request, "open an account that may go negative (`allow_negative_balance`)")
        if body.overdraft_limit:
            # The same: an overdraft lets money out of an account that holds none.
            require_admin_for(request, "open an account with an overdraft (`overdraft_limit` above 0)")
        outcome = await state.ledger.accounts.open(
            account_id=body.id,
            currency=body.currency,
            name=body.name,
            allow_negative_balance=body.allow_negative_balance,
            metadata=body.metadata,
            overdraft_limit=body.overdraft_limit,
            max_balance=body.max_balance,
            changed_by=principal(request).key_id,
        )
        if outcome.created:
            return Response(
                account_out(outcome.account),
                status_code=201,
                headers={"Location": f"/v1/accounts/{outcome.account.id}"},
            )
        return Response(account_out(outcome.account), status_code=200, headers=REPLAYED)

    @get("/", operation_id="listAccounts", opt=READ, responses=documented(*READ_PROBLEMS))
    async def list_accounts(
        self,
        request: Request,
        state: State,
        limit: Limit = None,
        cursor: Cursor = None,
        currency: CurrencyFilter = None,
    ) -> Response[AccountPage]:
        """Accounts ordered by id, keyset-paginated; `metadata[KEY]=VALUE` keeps those whose
        metadata holds every pair."""
        if currency is not None and not CURRENCY_RE.fullmatch(currency):
            raise InvalidRequest(
                "`currency` must be three upper-case letters", [{"field": "currency", "message": "^[A-Z]{3}$"}]
            )
        size, metadata = _page_size(state, limit), metadata_filter(request)
        routed = await state.reads.read(
            lambda on: on.queries.accounts(currency=currency, limit=size, cursor=cursor, metadata=metadata)
        )
        page = routed.value
        return Response(
            AccountPage(data=[account_out(a) for a in page.items], next_cursor=page.next_cursor), headers=routed.headers
        )

    @patch(
        "/{account_id:str}",
        operation_id="updateAccount",
        opt=ADMIN,
        responses=documented(400, 401, 403, 404, 409, 415, 503),
    )
    async def update_account(
        self, request: Request, state: State, account_id: AccountId, data: JSONBody[AccountUpdate]
    ) -> AccountOut:
        """Change an account's `status` (`open`, `frozen`, `closed`), `overdraft_limit`,
        `max_balance`, `name` or `metadata` (replaced whole), under the account's lock.
        Only the fields sent change; each effective change is kept in the account's history
        (`/changes`) and is an `account.changed` event. Closing needs a zero balance and no
        reservation (409 `account_not_empty`) and is final (409 `account_closed`); a limit
        the present balance already breaks is 409 `balance_outside_limits`."""
        body = await decode_strict(request, AccountUpdate)
        path_identifier(account_id, AccountNotFound, "account")
        account = await state.ledger.accounts.update(account_id, body.changes(), principal(request).key_id)
        return account_out(account)

    @get(
        "/{account_id:str}/changes",
        operation_id="listAccountChanges",
        opt=READ,
        responses=documented(*READ_PROBLEMS, 404),
    )
    async def list_changes(
        self, state: State, account_id: AccountId, limit: Limit = None, cursor: Cursor = None
    ) -> AccountChangePage:
        """Every change of the account, oldest first: when, by which key (`changed_by`),
        which fields, their values before and after, and the change's link in the account's
        hash chain of changes (checked by `POST /v1/audit/verify`)."""
        path_identifier(account_id, AccountNotFound, "account")
        page = await state.ledger.accounts.changes(account_id, limit=_page_size(state, limit), cursor=cursor)
        return AccountChangePage(
            data=[
                AccountChangeOut(
                    account_id=c.account_id,
                    sequence=c.sequence,
                    changed_at=format_timestamp(c.changed_at),
                    changed_by=c.changed_by,
                    fields=c.fields,
                    before=c.before,
                    after=c.after,
                    hash=c.hash.hex(),
                )
                for c in page.items
            ],
            next_cursor=page.next_cursor,
        )

    @get("/{account_id:str}", operation_id="getAccount", opt=READ, responses=documented(*READ_PROBLEMS, 404))
    async def get_account(self, state: State, account_id: AccountId) -> AccountOut:
        """One account with its balances and journal length."""
        path_identifier(account_id, AccountNotFound, "account")
        return account_out(await state.ledger.queries.account(account_id))

    @get(
        "/{account_id:str}/entries",
        operation_id="listAccountEntries",
        opt=READ,
        responses=documented(*READ_PROBLEMS, 404),
    )
    async def list_entries(
        self,
        request: Request,
        state: State,
        account_id: AccountId,
        limit: Limit = None,
        cursor: Cursor = None,
        start: From = None,
        end: To = None,
    ) -> Response[EntryPage]:
        """The account's journal, oldest first: sequence 1, 2, 3... with no gaps. With
        `Accept: text/csv` the whole statement (every page, within from/to) streams as CSV
        up to the account's last entry when the export started."""
        path_identifier(account_id, AccountNotFound, "account")
        if "text/csv" in request.headers.get("accept", ""):
            return await csv_statement(state, account_id, _timestamp("from", start), _timestamp("to", end))  # type: ignore[return-value]
        start_at, end_at, size = _timestamp("from", start), _timestamp("to", end), _page_size(state, limit)
        routed = await state.reads.read(
            lambda on: on.queries.entries(account_id, start=start_at, end=end_at, limit=size, cursor=cursor)
        )
        page = routed.value
        return Response(
            EntryPage(data=[entry_out(e) for e in page.items], next_cursor=page.next_cursor), headers=routed.headers
        )

    @get(
        "/{account_id:str}/balance",
        operation_id="getAccountBalance",
        opt=READ,
        responses=documented(*READ_PROBLEMS, 404),
    )
    async def get_balance(
        self,
        state: State,
        account_id: AccountId,
        as_of: AsOf = None,
    ) -> Response[AccountBalanceOut]:
        """The posted balance after the last entry at or before `as_of`."""
        path_identifier(account_id, AccountNotFound, "account")
        moment = _timestamp("as_of", as_of)
        if moment is None:
            # The balance now is what payment services poll right after a transfer: the
            # primary answers it, with no extra round trip.
            return Response(balance_out(await state.ledger.queries.balance(account_id, None)))
        routed = await state.reads.read(lambda on: on.queries.balance(account_id, moment))
        return Response(balance_out(routed.value), headers=routed.headers)


async def _optional_body(request: Request, kind: type[T]) -> T | None:
    """Post, void and audit verification take a body of optional fields: `{}`, JSON
    `null` or an empty body mean none (the Content-Type must still say JSON, see
    `ledger.http.body`); anything else is decoded strictly."""
    if not await request.body():
        return None
    return await decode_strict(request, kind | None)  # type: ignore[arg-type]


# New columns go at the end: consumers that read the CSV by position keep working.
CSV_COLUMNS = (
    "account_id", "sequence", "transfer_id", "amount", "balance_after", "created_at", "hash", "key_id",
    "counterparty_account_id", "description",
)  # fmt: skip


_NEEDS_QUOTES = re.compile(r'[",\r\n]')


def csv_text(value: str | None) -> str:
    """Free text as an RFC 4180 field: quoted (quotes doubled) when it holds a comma, a
    quote or a line break. By hand rather than with the csv module, which formats a page
    at half the speed, and a page holds an export slot."""
    if value is None:
        return ""
    return '"' + value.replace('"', '""') + '"' if _NEEDS_QUOTES.search(value) else value


async def csv_statement(state: State, account_id: str, start: datetime | None, end: datetime | None) -> BudgetedStream:
    """The statement as CSV, page by page. A page borrows a connection of the audit pool
    only while it is read, so a slow reader holds no database connection; and reading and
    formatting a page takes one of the process's export slots (LEDGER_EXPORT_CONCURRENCY),
    so however many exports run, they use the CPU one page at a time, and every other
    request gets its turn in between."""
    # Every page from the side that answered the first query (the replica when it had
    # caught up with the request): the statement ends at the entry read then.
    routed = await state.reads.read(lambda on: audit.statement_pages(on.engine, account_id, start, end))
    pages = aiter(routed.value)
    slots: asyncio.Semaphore = state.export_slots

    async def lines() -> AsyncIterator[bytes]:
        yield (",".join(CSV_COLUMNS) + "\r\n").encode()
        while True:
            try:
                async with slots:
                    rows = await anext(pages, None)
                    if rows is None:
                        return
                    # Ids are [A-Za-z0-9._:-], the other fields numbers, timestamps and hex:
                    # only the description, free text, may need CSV quoting.
                    chunk = "".join(
                        f"{account_id},{r.sequence},{r.transfer_id},{r.amount},{r.balance_after},"
                        f"{format_timestamp(r.created_at)},{r.hash.hex()},{r.key_id},"
                        f"{r.counterparty_account_id or ''},{csv_text(r.description)}\r\n"
                        for r in rows
                    ).encode()
            except Exception as error:
                # Mid-stream there is no status left to send: the response must end incomplete.
                raise ExportCut(f"reading the statement failed: {type(error).__name__}") from error
            yield chunk

    return BudgetedStream(
        lines(),
        budget_seconds=state.settings.export_timeout_seconds,
        media_type=CSV_MEDIA_TYPE,
        headers={"Content-Disposition": statement_disposition(account_id), **routed.headers},
    )


# Litestar appends "; charset=utf-8" to every text/* media type (as for /metrics).
CSV_MEDIA_TYPE = "text/csv"
_UNSAFE_IN_FILENAME = re.compile(r"[^A-Za-z0-9._-]")


def statement_disposition(account_id: str) -> str:
    """An attachment named after the account: `filename` with only characters every file
    system takes (`:` is not one on Windows, and Finder shows it as `/`), and the exact
    id in RFC 6266's `filename*` for clients that read it."""
    name = f"{account_id}-statement.csv"
    safe = _UNSAFE_IN_FILENAME.sub("_", name)
    return f"attachment; filename=\"{safe}\"; filename*=UTF-8''{quote(name, safe='')}"


def transfer_request(body: TransferCreate) -> TransferRequest:
    return TransferRequest(
        id=body.id,
        debit_account_id=body.debit_account_id,
        credit_account_id=body.credit_account_id,
        amount=body.amount,
        currency=body.currency,
        pending=body.pending,
        timeout_seconds=body.timeout_seconds,
        description=body.description,
        metadata=body.metadata,
        imported_at=body.imported_at,
    )


def transfer_response(outcome: TransferOutcome, state: State) -> Response:
    transfer = outcome.transfer
    state.metrics.transfer_outcome("replayed" if outcome.replayed else (transfer.code or "created"))
    headers = dict(REPLAYED) if outcome.replayed else {}
    if transfer.status == "rejected":
        assert transfer.code is not None
        return refusal_response(transfer.code, refusal_detail(transfer), transfer.id, headers=headers or None)
    headers["Location"] = f"/v1/transfers/{transfer.id}"
    return Response(transfer_out(transfer), status_code=201, headers=headers)


class TransferController(Controller):
    path = "/v1/transfers"
    tags = ["transfers"]

    @post(
        "/batch",
        operation_id="createTransferBatch",
        status_code=200,
        opt=MOVE_MONEY,
        responses=documented(*WRITE_PROBLEMS),
    )
    async def create_batch(self, request: Request, state: State, data: JSONBody[BatchCreate]) -> BatchOut:
        """Apply 1 to 1000 transfers in order, one result per item. Each item keeps the
        single-transfer guarantees (its own id, its own recorded outcome, replays);
        `"linked": true` ties an item to the next, and a chain succeeds or fails whole."""
        body = await decode_strict(request, BatchCreate)
        if any(item.imported_at is not None for item in body.transfers):
            require_admin_for(request, "import history (`imported_at`)")
        if len(body.transfers) > state.settings.max_batch_size:
            raise BatchTooLarge(
                f"a batch holds at most {state.settings.max_batch_size} transfers, got {len(body.transfers)}"
            )
        items = [BatchItem(request=transfer_request(item), linked=item.linked) for item in body.transfers]
        results = await state.ledger.transfers.create_batch(items)
        for result in results:
            state.metrics.transfer_outcome(result.status if result.status != "rejected" else result.code or "rejected")
        return BatchOut(results=[batch_result_out(result) for result in results])

    @post(
        "/",
        operation_id="createTransfer",
        status_code=201,
        opt=MOVE_MONEY,
        responses={**documented(*WRITE_PROBLEMS), 200: replayed(TransferOut)},
    )
    async def create_transfer(
        self, request: Request, state: State, data: JSONBody[TransferCreate]
    ) -> Response[TransferOut]:
        """Apply a transfer once per `id`. A repeat returns the original status and body
        with `Idempotent-Replayed: true`; refusals (404/422) are recorded and replayed too."""
        body = await decode_strict(request, TransferCreate)
        if body.imported_at is not None:
            # History written with another time than the clock's: only an admin may.
            require_admin_for(request, "import history (`imported_at`)")
        outcome = await state.ledger.transfers.create(transfer_request(body))
        return transfer_response(outcome, state)

    @post(
        "/{transfer_id:str}/post",
        operation_id="postPendingTransfer",
        status_code=200,
        opt=MOVE_MONEY,
        responses=documented(*WRITE_PROBLEMS),
    )
    async def post_pending(
        self, request: Request, state: State, transfer_id: TransferId, data: JSONBody[PostPending | None] = None
    ) -> TransferOut:
        """Post a pending transfer, fully or partly (the rest is released). Repeating the
        same post returns the same 200; a different second decision is a 409."""
        body = await _optional_body(request, PostPending)
        path_identifier(transfer_id, TransferNotFound, "transfer")
        return transfer_out(await state.ledger.transfers.post(transfer_id, body.amount if body else None))

    @post(
        "/{transfer_id:str}/void",
        operation_id="voidPendingTransfer",
        status_code=200,
        opt=MOVE_MONEY,
        responses=documented(*WRITE_PROBLEMS),
    )
    async def void_pending(
        self, request: Request, state: State, transfer_id: TransferId, data: JSONBody[VoidPending | None] = None
    ) -> TransferOut:
        """Void a pending transfer: its reservation is released. Repeating it returns the same
        200. The body is `{}` (or `null`, or empty), sent as application/json."""
        await _optional_body(request, VoidPending)
        path_identifier(transfer_id, TransferNotFound, "transfer")
        return transfer_out(await state.ledger.transfers.void(transfer_id))

    @post(
        "/{transfer_id:str}/reverse",
        operation_id="reverseTransfer",
        status_code=201,
        opt=MOVE_MONEY,
        responses={**documented(*WRITE_PROBLEMS), 200: replayed(TransferOut)},
    )
    async def reverse(
        self, request: Request, state: State, transfer_id: TransferId, data: JSONBody[Reverse]
    ) -> Response[TransferOut]:
        """Reverse a posted transfer with a new transfer in the opposite direction,
        idempotent by its own `id`; reversals of one transfer never exceed its posted amount."""
        body = await decode_strict(request, Reverse)
        path_identifier(transfer_id, TransferNotFound, "transfer")
        return transfer_response(await state.ledger.transfers.reverse(transfer_id, body.id, body.amount), state)

    @get("/", operation_id="listTransfers", opt=READ, responses=documented(*READ_PROBLEMS))
    async def list_transfers(
        self,
        request: Request,
        state: State,
        limit: Limit = None,
        cursor: Cursor = None,
        start: From = None,
        end: To = None,
        account_id: AccountFilter = None,
        status: StatusFilter = None,
    ) -> Response[TransferPage]:
        """Transfers oldest first (rejected ones included), filtered and keyset-paginated;
        `metadata[KEY]=VALUE` keeps those whose metadata holds every pair."""
        if status is not None and status not in TRANSFER_STATUSES:
            raise InvalidRequest(
                f"`status` must be one of {', '.join(TRANSFER_STATUSES)}",
                [{"field": "status", "message": "unknown status"}],
            )
        filters = {
            "account_id": _query_identifier("account_id", account_id),
            "status": status,
            "start": _timestamp("from", start),
            "end": _timestamp("to", end),
            "limit": _page_size(state, limit),
            "cursor": cursor,
            "metadata": metadata_filter(request),
        }
        routed = await state.reads.read(lambda on: on.queries.transfers(**filters))
        page = routed.value
        return Response(
            TransferPage(data=[transfer_out(t) for t in page.items], next_cursor=page.next_cursor),
            headers=routed.headers,
        )

    @get("/{transfer_id:str}", operation_id="getTransfer", opt=READ, responses=documented(*READ_PROBLEMS, 404))
    async def get_transfer(self, state: State, transfer_id: TransferId) -> TransferOut:
        """A transfer in its current state, rejected ones included."""
        path_identifier(transfer_id, TransferNotFound, "transfer")
        return transfer_out(await state.ledger.queries.transfer(transfer_id))
