"""`ledger.client` against a real `ledger serve`: every method round-trips (sync and
async), every problem raises its exception, iterators cross pages, and retries by id
apply a transfer exactly once when answers are lost, delayed or refused with 503
(through a scripted proxy in front of the real server). The headline test crashes and
restarts the server's PostgreSQL under a run of 200 transfers."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
import string
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import msgspec
import pytest

from ledger.client import (
    USER_AGENT,
    AccountChangeRefused,
    AccountExistsWithDifferentFields,
    AccountNotFound,
    AsyncLedgerClient,
    Conflict,
    ConnectionFailed,
    DecisionRefused,
    Forbidden,
    InsufficientFunds,
    InvalidCursor,
    KeyNotFound,
    LedgerClient,
    NewTransfer,
    OutcomeUnknown,
    Refused,
    TooLarge,
    TransferExistsWithDifferentFields,
    TransferNotFound,
    Unauthenticated,
    Unavailable,
    ValidationFailed,
)
from ledger.client.errors import CODE_CLASSES, problem_from_response
from tests import provision
from tests.conftest import free_port

# Fast retries for the tests; the waits the service asks for (Retry-After) still apply.
FAST = {"base_backoff": 0.01, "max_backoff": 0.05, "timeout": 15}


@pytest.fixture
def ledger(server_url: str) -> Iterator[LedgerClient]:
    with LedgerClient(server_url, provision.ADMIN_KEY, **FAST) as client:
        yield client


def open_funded(ledger: LedgerClient, uid: str, funds: int = 1000) -> tuple[str, str, str]:
    """A bank (may go negative), alice funded from it, and an empty shop."""
    bank = ledger.create_account("EUR", id=f"bank-{uid}", allow_negative_balance=True).id
    alice = ledger.create_account("EUR", id=f"alice-{uid}").id
    shop = ledger.create_account("EUR", id=f"shop-{uid}").id
    ledger.create_transfer(bank, alice, funds, id=f"fund-{uid}")
    return bank, alice, shop


def journal(ledger: LedgerClient, account_id: str) -> list[tuple[str, int]]:
    return [(entry.transfer_id, entry.amount) for entry in ledger.iter_entries(account_id)]


# -- round trips -------------------------------------------------------------------------


def test_accounts_and_transfers_round_trip_with_ids_replays_and_refusals(ledger: LedgerClient, uid: str) -> None:
    """Creates return typed results carrying the id (generated when none is given);
    repeats are replays; refusals raise `Refused` subclasses carrying the transfer id,
    are recorded, and replay as refusals."""
    bank, alice, shop = open_funded(ledger, uid)
    assert ledger.create_account("EUR", id=bank, allow_negative_balance=True).replayed is True
    with pytest.raises(AccountExistsWithDifferentFields) as conflict:
        ledger.create_account("USD", id=bank)
    assert (conflict.value.status, conflict.value.code) == (409, "account_exists_with_different_fields")
    assert conflict.value.request_id

    generated = ledger.create_account("EUR", name="no id given", metadata={"k": "v"})
    assert len(generated.id) == 36 and generated.metadata == {"k": "v"} and generated.replayed is False
    fetched = ledger.get_account(alice)
    assert (fetched.balance.posted, fetched.balance.available, fetched.entries_count) == (1000, 1000, 1)
    assert fetched.created_at.tzinfo is not None
    with pytest.raises(AccountNotFound):
        ledger.get_account(f"missing-{uid}")

    paid = ledger.create_transfer(alice, shop, 250, description="order 1", metadata={"order": "1"})
    assert (paid.status, paid.amount, paid.replayed, paid.metadata) == ("posted", 250, False, {"order": "1"})
    again = ledger.create_transfer(alice, shop, 250, id=paid.id, description="order 1", metadata={"order": "1"})
    assert again.replayed is True and again.created_at == paid.created_at
    with pytest.raises(TransferExistsWithDifferentFields):
        ledger.create_transfer(alice, shop, 251, id=paid.id)
    assert ledger.get_transfer(paid.id).status == "posted"
    with pytest.raises(TransferNotFound):
        ledger.get_transfer(f"missing-{uid}")

    refused_id = f"too-much-{uid}"
    with pytest.raises(InsufficientFunds) as refusal:
        ledger.create_transfer(alice, shop, 5000, id=refused_id)
    assert (refusal.value.status, refusal.value.transfer_id, refusal.value.replayed) == (422, refused_id, False)
    with pytest.raises(InsufficientFunds) as replayed_refusal:
        ledger.create_transfer(alice, shop, 5000, id=refused_id)
    assert replayed_refusal.value.replayed is True
    rejected = ledger.get_transfer(refused_id)
    assert (rejected.status, rejected.code) == ("rejected", "insufficient_funds")
    # A transfer to a missing account is a recorded refusal (an outcome), not a lookup miss.
    with pytest.raises(Refused) as missing:
        ledger.create_transfer(alice, f"nobody-{uid}", 1, id=f"to-nobody-{uid}")
    assert not isinstance(missing.value, AccountNotFound)
    assert (missing.value.status, missing.value.code, missing.value.transfer_id) == (
        404,
        "account_not_found",
        f"to-nobody-{uid}",
    )
    with pytest.raises(ValidationFailed) as invalid:
        ledger.create_transfer(alice, shop, 10, currency="euro")
    assert invalid.value.code == "validation_error" and invalid.value.errors
    with pytest.raises(TypeError):
        ledger.create_transfer(alice, shop, 1.5)  # type: ignore[arg-type]
    assert journal(ledger, alice) == [(f"fund-{uid}", 1000), (paid.id, -250)]


def test_two_phase_reversals_and_batches_round_trip(ledger: LedgerClient, uid: str) -> None:
    """Post, void and reverse return the transfer; decisions that cannot be made raise
    `DecisionRefused`, excess reversals `Refused`, oversized batches `TooLarge`; batch
    items without ids get generated ones, reported in the results."""
    _, alice, shop = open_funded(ledger, uid, funds=100)
    hold = ledger.create_transfer(alice, shop, 50, id=f"hold-{uid}", pending=True, timeout_seconds=600)
    assert (hold.status, hold.pending, hold.expires_at is not None) == ("pending", True, True)
    with pytest.raises(DecisionRefused) as over:
        ledger.post_transfer(hold.id, amount=51)
    assert (over.value.status, over.value.code) == (422, "exceeds_pending_amount")
    posted = ledger.post_transfer(hold.id, amount=40)
    assert (posted.status, posted.posted_amount) == ("posted", 40)
    assert ledger.post_transfer(hold.id, amount=40).posted_amount == 40  # the same decision again
    with pytest.raises(DecisionRefused) as twice:
        ledger.void_transfer(hold.id)
    assert (twice.value.status, twice.value.code) == (409, "pending_transfer_already_posted")
    second = ledger.create_transfer(alice, shop, 5, pending=True)
    assert ledger.void_transfer(second.id).status == "voided"

    refund = ledger.reverse_transfer(hold.id, amount=15)
    assert (refund.reversal_of, refund.amount, refund.debit_account_id) == (hold.id, 15, shop)
    assert ledger.reverse_transfer(hold.id, id=refund.id, amount=15).replayed is True
    with pytest.raises(Refused) as excess:
        ledger.reverse_transfer(hold.id, amount=26)
    assert excess.value.code == "exceeds_reversible_amount"

    result = ledger.create_batch(
        [
            NewTransfer(debit_account_id=alice, credit_account_id=shop, amount=1, linked=True),
            {"debit_account_id": alice, "credit_account_id": shop, "amount": 10_000},
            NewTransfer(debit_account_id=alice, credit_account_id=shop, amount=2, id=f"b3-{uid}"),
        ]
    )
    assert [(r.status, r.code) for r in result.results] == [
        ("rejected", "linked_transfer_failed"),
        ("rejected", "insufficient_funds"),
        ("created", None),
    ]
    assert all(r.id for r in result.results) and result.results[2].id == f"b3-{uid}"
    assert result.results[2].transfer is not None and result.results[2].transfer.amount == 2
    with pytest.raises(TooLarge) as too_large:
        ledger.create_batch([NewTransfer(debit_account_id=alice, credit_account_id=shop, amount=1)] * 1001)
    assert (too_large.value.status, too_large.value.code) == (413, "batch_too_large")
    # 100 - 40 posted + 15 refunded - 2 from the batch.
    assert ledger.get_account(alice).balance.posted == 73


def test_history_audit_keys_and_auth_round_trip(ledger: LedgerClient, server_url: str, uid: str) -> None:
    """Balance as of a moment, the trial balance, audit verification, health, API keys
    (create, list, revoke) and the auth problems, each through its typed method."""
    _, alice, shop = open_funded(ledger, uid)
    between = datetime.now(UTC)
    time.sleep(0.01)
    ledger.create_transfer(alice, shop, 300)
    assert ledger.get_balance(alice).posted == 700
    then = ledger.get_balance(alice, as_of=between)
    assert (then.account_id, then.posted, then.sequence) == (alice, 1000, 1)
    with pytest.raises(ValueError):
        ledger.get_balance(alice, as_of=datetime.now())  # no time zone: refused before sending
    entries = ledger.list_entries(alice, start=between - timedelta(seconds=1))
    assert [e.balance_after for e in entries.data] == [1000, 700] and entries.next_cursor is None
    trial = ledger.trial_balance(currency="EUR")
    assert [(t.currency, t.difference) for t in trial.balances] == [("EUR", 0)]
    report = ledger.audit_verify(account_id=alice)
    assert report.ok and report.accounts_checked == 1 and report.entries_checked == 2
    assert ledger.health_live().status == "ok"
    ready = ledger.health_ready()
    assert ready.status == "ok" and ready.checks["database"] == "ok"

    created = ledger.create_key("poster", name=f"checkout-{uid}")
    assert created.key and created.role == "poster" and created.revoked_at is None
    assert created.id in {key.id for key in ledger.iter_keys(page_size=2)}
    with LedgerClient(server_url, created.key, **FAST) as poster:
        assert poster.get_account(alice).id == alice
        with pytest.raises(Forbidden) as forbidden:
            poster.create_account("EUR", allow_negative_balance=True)
        assert forbidden.value.status == 403
        with pytest.raises(Forbidden):
            poster.list_keys()
        revoked = ledger.revoke_key(created.id)
        assert revoked.revoked_at is not None and revoked.id == created.id
        deadline = time.monotonic() + 10  # a revoked key stops working within 5 s
        while True:
            try:
                poster.get_account(alice)
            except Unauthenticated as error:
                assert (error.status, error.code) == (401, "unauthenticated")
                break
            assert time.monotonic() < deadline, "the revoked key still works"
            time.sleep(0.2)
    with pytest.raises(KeyNotFound):
        ledger.revoke_key(f"key_missing{uid}")
    with LedgerClient(server_url, "lk_not-a-key", **FAST) as stranger, pytest.raises(Unauthenticated):
        stranger.list_accounts(limit=1)
    with pytest.raises(InvalidCursor):
        ledger.list_accounts(cursor="not-a-cursor-the-service-issued")


class CountingTransport(httpx.HTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.requests: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return super().handle_request(request)


def test_iterators_cross_pages_and_requests_name_the_client(server_url: str, uid: str) -> None:
    """With a page size of 2, iter_entries, iter_transfers, iter_accounts and iter_keys
    follow next_cursor through several pages and yield every item once, in order; every
    request carries the client's User-Agent."""
    transport = CountingTransport()
    with LedgerClient(server_url, provision.ADMIN_KEY, transport=transport, **FAST) as ledger:
        _, alice, shop = open_funded(ledger, uid)
        paid = [ledger.create_transfer(alice, shop, n, id=f"p{n}-{uid}").id for n in range(1, 7)]
        currency = "Q" + "".join(random.choices(string.ascii_uppercase, k=2))
        mine = [ledger.create_account(currency, id=f"{n}-{uid}").id for n in range(5)]

        before = len(transport.requests)
        entries = list(ledger.iter_entries(alice, page_size=2))
        assert [e.sequence for e in entries] == list(range(1, 8))
        assert [e.transfer_id for e in entries] == [f"fund-{uid}", *paid]
        assert len(transport.requests) - before == 4  # 2 + 2 + 2 + 1
        assert [t.id for t in ledger.iter_transfers(account_id=shop, page_size=2)] == paid
        listed = [a.id for a in ledger.iter_accounts(currency=currency, page_size=2)]
        assert listed == sorted(set(listed)) and set(mine) <= set(listed)
        keys = [ledger.create_key("auditor", name=f"{n}-{uid}").id for n in range(3)]
        listed_keys = [k.id for k in ledger.iter_keys(page_size=2)]
        assert len(listed_keys) == len(set(listed_keys)) and set(keys) <= set(listed_keys)
    assert {request.headers["user-agent"] for request in transport.requests} == {USER_AGENT}
    assert USER_AGENT.startswith("ledger-client/0.")


async def test_async_client_round_trips_and_iterates(server_url: str, uid: str) -> None:
    """The async client: the same methods, results and exceptions, async iterators across
    pages, and concurrent creates of one id settling as one transfer."""
    async with AsyncLedgerClient(server_url, provision.ADMIN_KEY, **FAST) as ledger:
        bank = (await ledger.create_account("EUR", id=f"bank-{uid}", allow_negative_balance=True)).id
        alice = (await ledger.create_account("EUR", id=f"alice-{uid}")).id
        funded = await asyncio.gather(*(ledger.create_transfer(bank, alice, 500, id=f"fund-{uid}") for _ in range(8)))
        assert sorted(t.replayed for t in funded) == [False] + [True] * 7
        with pytest.raises(InsufficientFunds):
            await ledger.create_transfer(alice, bank, 501)
        for n in range(4):
            await ledger.create_transfer(alice, bank, 10 + n, id=f"back{n}-{uid}")
        entries = [e.amount async for e in ledger.iter_entries(alice, page_size=2)]
        assert entries == [500, -10, -11, -12, -13]
        transfers = [t.id async for t in ledger.iter_transfers(account_id=alice, status="rejected", page_size=1)]
        assert len(transfers) == 1
        assert (await ledger.get_account(alice)).balance.available == 454
        assert (await ledger.get_balance(alice)).posted == 454
        assert (await ledger.audit_verify(account_id=alice)).ok
        assert (await ledger.trial_balance(currency="EUR")).balances[0].difference == 0
        assert (await ledger.health_ready()).status == "ok"
        created = await ledger.create_key("auditor")
        assert created.id in [k.id async for k in ledger.iter_keys(page_size=3)]
        assert (await ledger.revoke_key(created.id)).revoked_at is not None
        hold = await ledger.create_transfer(alice, bank, 4, pending=True)
        assert (await ledger.void_transfer(hold.id)).status == "voided"
        with pytest.raises(DecisionRefused):
            await ledger.post_transfer(hold.id)
        refund = await ledger.reverse_transfer(f"back0-{uid}")
        assert (refund.amount, refund.reversal_of) == (10, f"back0-{uid}")
        batch = await ledger.create_batch([NewTransfer(debit_account_id=alice, credit_account_id=bank, amount=1)])
        assert batch.results[0].status == "created"
        with pytest.raises(TransferNotFound):
            await ledger.get_transfer(f"missing-{uid}")


def test_account_controls_round_trip(ledger: LedgerClient, uid: str) -> None:
    """Limits at opening, update_account (only the fields given; None removes a limit),
    the history, refusals as `Refused` and impossible changes as `AccountChangeRefused`."""
    _, alice, shop = open_funded(ledger, uid, funds=100)
    wallet = ledger.create_account("EUR", id=f"wallet-{uid}", max_balance=50, overdraft_limit=0)
    assert (wallet.status, wallet.max_balance, wallet.overdraft_limit) == ("open", 50, 0)
    with pytest.raises(Refused) as capped:
        ledger.create_transfer(alice, wallet.id, 51, id=f"cap-{uid}")
    assert capped.value.code == "exceeds_max_balance" and capped.value.transfer_id == f"cap-{uid}"
    frozen = ledger.update_account(alice, status="frozen", name="Alice")
    assert (frozen.status, frozen.name, frozen.max_balance) == ("frozen", "Alice", None)
    with pytest.raises(Refused) as refused:
        ledger.create_transfer(alice, shop, 1, id=f"out-{uid}")
    assert refused.value.code == "account_frozen"
    with pytest.raises(AccountChangeRefused) as not_empty:
        ledger.update_account(alice, status="closed")
    assert not_empty.value.code == "account_not_empty"
    assert ledger.update_account(wallet.id, max_balance=None).max_balance is None
    changes = list(ledger.iter_account_changes(alice, page_size=1))
    assert [(c.fields, c.before, c.after) for c in changes] == [
        (["status", "name"], {"status": "open", "name": None}, {"status": "frozen", "name": "Alice"})
    ]
    assert changes[0].changed_by == "LEDGER_ADMIN_KEY"
    with pytest.raises(ValueError):
        ledger.update_account(alice)


def test_following_the_feed_resumes_from_a_stored_event_id(ledger: LedgerClient, uid: str) -> None:
    """`follow_events` against the real feed: typed objects, filters, and a consumer that
    stops, stores the id of the last event it processed and resumes right after it."""
    head = ledger.list_events(limit=1000)
    while head.data:
        head = ledger.list_events(after=head.next_cursor, limit=1000)
    bank = ledger.create_account("EUR", id=f"bank-{uid}", allow_negative_balance=True).id
    alice = ledger.create_account("EUR", id=f"alice-{uid}").id
    for n in range(5):
        ledger.create_transfer(bank, alice, 100 + n, id=f"t{n}-{uid}")
    seen = []
    for event in ledger.follow_events(after=head.next_cursor, account_id=alice, wait=2, page_size=2):
        seen.append(event)
        if len(seen) == 3:
            break  # the consumer stops here, having processed three
    assert [e.type for e in seen] == ["account.created", "transfer.posted", "transfer.posted"]
    assert seen[0].account.id == alice and seen[1].transfer.amount == 100
    stored = seen[-1].id
    rest = list(ledger.follow_events(after=stored, account_id=alice, wait=2, stop_when_idle=True))
    assert [e.transfer.id for e in rest] == [f"t{n}-{uid}" for n in (2, 3, 4)]
    posted = list(ledger.follow_events(after=head.next_cursor, types=["transfer.posted"], stop_when_idle=True, wait=1))
    assert [e.transfer.id for e in posted if e.transfer.id.endswith(uid)] == [f"t{n}-{uid}" for n in range(5)]


async def test_the_async_client_follows_the_feed(server_url: str, uid: str) -> None:
    async with AsyncLedgerClient(server_url, provision.ADMIN_KEY, **FAST) as ledger:
        page = await ledger.list_events(limit=1000)
        while page.data:
            page = await ledger.list_events(after=page.next_cursor, limit=1000)
        await ledger.create_account("EUR", id=f"solo-{uid}")
        events = [e async for e in ledger.follow_events(after=page.next_cursor, wait=2, stop_when_idle=True)]
        assert f"solo-{uid}" in [e.account.id for e in events if e.account is not None]


def test_every_code_the_server_emits_has_an_exception_class() -> None:
    """Each code of `ledger.errors` and `ledger.http.problems` maps to a class; a recorded
    refusal (a problem carrying `transfer_id`) raises `Refused` whatever its code, and a
    code this client does not know falls back to its status's family."""
    from ledger import errors as server
    from ledger.http.problems import HTTP_CODES

    server_codes = {
        cls.code for cls in vars(server).values() if isinstance(cls, type) and issubclass(cls, server.LedgerError)
    } - {"ledger_error", "conflict"}
    server_codes |= set(server.DecisionRefused.STATUSES) | {code for code, _ in HTTP_CODES.values()}
    server_codes |= {"internal_error", "request_header_fields_too_large", "request_too_large"}
    assert server_codes <= set(CODE_CLASSES), server_codes - set(CODE_CLASSES)

    def raised(status: int, **body: object) -> type:
        content = json.dumps({"type": "x", "title": "t", "status": status, "detail": "d", **body}).encode()
        return type(problem_from_response(httpx.Response(status, content=content)))

    for code, (status, _) in server.TransferRefused.REASONS.items():
        assert issubclass(raised(status, code=code, transfer_id="t-1"), Refused), code
    assert raised(422, code="insufficient_funds", transfer_id="t-1") is InsufficientFunds
    assert raised(409, code="a_code_from_the_future") is Conflict
    assert raised(502) is Unavailable  # an HTML page from a proxy: no problem body at all


# -- retries through a scripted proxy -----------------------------------------------------


@dataclass
class ScriptedProxy:
    """An HTTP/1.1 proxy in front of the real server. Faults queued with `fault` apply to
    the next requests matching a method and path, in order:

    - "drop": forward the request, let the server act, then close the client's connection
      without an answer (the client cannot know the transfer was applied);
    - "503": answer 503 `unavailable` with `Retry-After: <retry_after>` without forwarding.
    """

    upstream: str
    retry_after: str = "1"
    faults: list[tuple[str, str, str]] = field(default_factory=list)
    seen: list[tuple[float, str, str, str]] = field(default_factory=list)
    url: str = ""

    def fault(self, method: str, path: str, action: str, times: int = 1) -> None:
        self.faults.extend([(method, path, action)] * times)

    def requests(self, method: str, path: str) -> list[tuple[float, str]]:
        return [(moment, action) for moment, m, p, action in self.seen if (m, p) == (method, path)]

    def _take(self, method: str, path: str) -> str:
        for index, (m, p, action) in enumerate(self.faults):
            if (m, p) == (method, path):
                del self.faults[index]
                return action
        return "forward"

    async def start(self) -> None:
        self._http = httpx.AsyncClient(base_url=self.upstream, timeout=30)
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        self._server.close()
        await self._http.aclose()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                method, target, _ = head[0].split(" ", 2)
                headers = [tuple(part.strip() for part in line.split(":", 1)) for line in head[1:] if line]
                length = int(next((v for k, v in headers if k.lower() == "content-length"), "0"))
                body = await reader.readexactly(length) if length else b""
                path = target.split("?", 1)[0]
                action = self._take(method, path)
                self.seen.append((time.monotonic(), method, path, action))
                if action == "503":
                    problem = {"type": "urn:ledger:problem:unavailable", "title": "Service unavailable",
                               "status": 503, "detail": "scripted", "code": "unavailable"}  # fmt: skip
                    self._answer(writer, 503, {"Content-Type": "application/problem+json",
                                               "Retry-After": self.retry_after}, json.dumps(problem).encode())  # fmt: skip
                    await writer.drain()
                    continue
                hop = {"host", "connection", "content-length", "accept-encoding", "keep-alive"}
                response = await self._http.request(
                    method, target, headers=[(k, v) for k, v in headers if k.lower() not in hop], content=body
                )
                if action == "drop":
                    writer.transport.abort()
                    return
                skip = {"content-length", "transfer-encoding", "connection", "content-encoding"}
                self._answer(
                    writer,
                    response.status_code,
                    {k: v for k, v in response.headers.items() if k.lower() not in skip},
                    response.content,
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @staticmethod
    def _answer(writer: asyncio.StreamWriter, status: int, headers: dict[str, str], body: bytes) -> None:
        lines = [f"HTTP/1.1 {status} X", *(f"{k}: {v}" for k, v in headers.items()), f"Content-Length: {len(body)}"]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)


@contextmanager
def scripted_proxy(upstream: str) -> Iterator[ScriptedProxy]:
    """The proxy on an event loop of its own thread, so that sync and async tests can
    both use it."""
    proxy = ScriptedProxy(upstream)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(proxy.start(), loop).result(10)
    try:
        yield proxy
    finally:
        asyncio.run_coroutine_threadsafe(proxy.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_a_lost_answer_is_retried_by_id_and_the_transfer_applied_once(
    ledger: LedgerClient, server_url: str, uid: str
) -> None:
    """The proxy forwards the transfer, the server applies it, and the connection drops
    before the answer: the client retries with the same id and body, gets the replay,
    and the journal holds the transfer once."""
    _, alice, shop = open_funded(ledger, uid)
    with scripted_proxy(server_url) as proxy, LedgerClient(proxy.url, provision.ADMIN_KEY, **FAST) as client:
        proxy.fault("POST", "/v1/transfers", "drop")
        transfer = client.create_transfer(alice, shop, 300)
        assert transfer.replayed is True  # the first attempt was applied; its answer was lost
        assert [action for _, action in proxy.requests("POST", "/v1/transfers")] == ["drop", "forward"]
    assert journal(ledger, alice) == [(f"fund-{uid}", 1000), (transfer.id, -300)]
    assert journal(ledger, shop) == [(transfer.id, 300)]


async def test_the_async_client_retries_a_lost_answer_by_id_too(server_url: str, uid: str) -> None:
    """As above with the async client, for a reversal (idempotent by its own id) and a
    post of a pending transfer (the same decision again answers the same)."""
    with LedgerClient(server_url, provision.ADMIN_KEY, **FAST) as ledger:
        _, alice, shop = open_funded(ledger, uid)
        paid = ledger.create_transfer(alice, shop, 100)
        hold = ledger.create_transfer(alice, shop, 50, pending=True)
    with scripted_proxy(server_url) as proxy:
        async with AsyncLedgerClient(proxy.url, provision.ADMIN_KEY, **FAST) as client:
            proxy.fault("POST", f"/v1/transfers/{paid.id}/reverse", "drop")
            refund = await client.reverse_transfer(paid.id, amount=40)
            proxy.fault("POST", f"/v1/transfers/{hold.id}/post", "drop")
            posted = await client.post_transfer(hold.id, amount=30)
    assert refund.replayed is True and posted.posted_amount == 30
    with LedgerClient(server_url, provision.ADMIN_KEY, **FAST) as ledger:
        assert journal(ledger, shop) == [(paid.id, 100), (refund.id, -40), (hold.id, 30)]


def test_503_is_retried_after_the_retry_after_the_service_asked_for(
    ledger: LedgerClient, server_url: str, uid: str
) -> None:
    """A 503 with `Retry-After: 1` is retried with the same id after at least 1 s (the
    client's own backoff is 0.05 s at most); a read that only ever gets 503 raises
    `Unavailable` once its attempts are spent."""
    _, alice, shop = open_funded(ledger, uid)
    with scripted_proxy(server_url) as proxy, LedgerClient(proxy.url, provision.ADMIN_KEY, **FAST) as client:
        proxy.fault("POST", "/v1/transfers", "503")
        transfer = client.create_transfer(alice, shop, 10)
        (first, refused), (second, forwarded) = proxy.requests("POST", "/v1/transfers")
        assert (refused, forwarded) == ("503", "forward")
        assert second - first >= 0.95
        assert transfer.replayed is False  # the 503 never reached the server
    with scripted_proxy(server_url) as proxy:
        proxy.retry_after = "0"
        proxy.fault("GET", f"/v1/accounts/{alice}", "503", times=3)
        with LedgerClient(proxy.url, provision.ADMIN_KEY, **{**FAST, "max_attempts": 3}) as client:
            with pytest.raises(Unavailable) as unavailable:
                client.get_account(alice)
    assert (unavailable.value.status, unavailable.value.code, unavailable.value.retry_after) == (503, "unavailable", 0)
    assert len(proxy.requests("GET", f"/v1/accounts/{alice}")) == 3
    assert journal(ledger, shop) == [(transfer.id, 10)]


def test_an_unsettled_write_raises_outcome_unknown_with_its_id_and_settles_later(
    ledger: LedgerClient, server_url: str, uid: str
) -> None:
    """Every attempt's answer lost: `OutcomeUnknown` carries the id; calling again later
    with that id gets the replay, and the money moved once. A write that never reached a
    server raises `ConnectionFailed` instead, and a key creation (no id) is not retried
    once it may have been applied."""
    _, alice, shop = open_funded(ledger, uid)
    with scripted_proxy(server_url) as proxy:
        with LedgerClient(proxy.url, provision.ADMIN_KEY, **{**FAST, "max_attempts": 3}) as client:
            proxy.fault("POST", "/v1/transfers", "drop", times=3)
            with pytest.raises(OutcomeUnknown) as unknown:
                client.create_transfer(alice, shop, 70)
            assert unknown.value.id is not None and unknown.value.attempts == 3
            assert unknown.value.id in str(unknown.value)
            settled = client.create_transfer(alice, shop, 70, id=unknown.value.id)
            assert settled.replayed is True

            proxy.fault("POST", "/v1/keys", "drop")
            with pytest.raises(OutcomeUnknown) as key_unknown:
                client.create_key("auditor")
            assert key_unknown.value.id is None
            assert len(proxy.requests("POST", "/v1/keys")) == 1
    assert journal(ledger, alice)[1:] == [(settled.id, -70)]

    with LedgerClient(f"http://127.0.0.1:{free_port()}", provision.ADMIN_KEY, **{**FAST, "max_attempts": 2}) as client:
        with pytest.raises(ConnectionFailed) as unreachable:
            client.create_transfer(alice, shop, 1)
    assert unreachable.value.attempts == 2


# -- the headline: PostgreSQL crashes under load ------------------------------------------


@pytest.mark.faults
def test_crash_and_restart_of_postgres_under_200_client_transfers_settles_each_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """200 transfers from 8 threads through one `LedgerClient` while the service's
    PostgreSQL is crashed (immediate shutdown) and restarted in the middle: every call
    ends with success or a recorded refusal, each transfer id is in the journal exactly
    once (2 entries) or not at all, money is conserved, and the applied transfers are
    exactly the successful calls."""
    from loadtest.faults import bench

    caplog.set_level(logging.INFO, logger="ledger.client")
    prefix = f"h{secrets.token_hex(3)}"
    rng = random.Random(7)
    with bench() as instance:
        settings = {"timeout": 5, "total_timeout": 60, "max_attempts": 200, "base_backoff": 0.05, "max_backoff": 0.5}
        with LedgerClient(instance.base_url, instance.api_key, max_connections=8, **settings) as client:
            bank = client.create_account("EUR", id=f"{prefix}-bank", allow_negative_balance=True).id
            accounts = [client.create_account("EUR", id=f"{prefix}-{n}").id for n in range(8)]
            client.create_batch(
                [NewTransfer(debit_account_id=bank, credit_account_id=a, amount=2000) for a in accounts]
            )
            planned = [(f"{prefix}-t{n}", *rng.sample(accounts, 2), rng.randint(1, 700)) for n in range(200)]
            done: list[float] = []

            def send(transfer: tuple[str, str, str, int]) -> tuple[str, str]:
                transfer_id, debit, credit, amount = transfer
                time.sleep(0.05)  # paced, so that the crash lands in the middle of the run
                try:
                    result = client.create_transfer(debit, credit, amount, id=transfer_id)
                    assert (result.id, result.status, result.amount) == (transfer_id, "posted", amount)
                    return transfer_id, "posted"
                except Refused as refusal:
                    assert refusal.transfer_id == transfer_id
                    return transfer_id, refusal.code
                finally:
                    done.append(time.monotonic())

            with ThreadPoolExecutor(8) as pool:
                futures = [pool.submit(send, transfer) for transfer in planned]
                while len(done) < 40:
                    time.sleep(0.01)
                instance.postgres.crash()
                crashed_at = time.monotonic()
                time.sleep(1.0)
                instance.postgres.restart()
                restarted_at = time.monotonic()
                outcomes = dict(future.result(timeout=90) for future in futures)
            audit = client.audit_verify()
        stored = asyncio.run(_stored(instance.database_url, prefix))

    completed_after_crash = sum(1 for moment in done if moment > crashed_at)
    retries = sum(1 for record in caplog.records if "retrying" in record.getMessage())
    print(
        f"\n{len(outcomes)} calls: {sum(o == 'posted' for o in outcomes.values())} posted, "
        f"{sum(o != 'posted' for o in outcomes.values())} refused, {completed_after_crash} ended after the crash, "
        f"{retries} retries, down {restarted_at - crashed_at:.1f} s"
    )
    assert completed_after_crash > 50, "the crash must land while calls are in flight"
    assert any(moment > restarted_at for moment in done)
    assert retries > 0, "no call was retried"
    transfers, entries, total = stored
    succeeded = {tid for tid, outcome in outcomes.items() if outcome == "posted"}
    refused = {tid: code for tid, code in outcomes.items() if code != "posted"}
    assert len(outcomes) == 200 and succeeded and set(refused.values()) <= {"insufficient_funds"}
    assert {tid for tid, status in transfers.items() if status == "posted"} == succeeded
    assert {tid for tid, status in transfers.items() if status == "rejected"} == set(refused)
    assert all(entries.get(tid) == 2 for tid in succeeded)
    assert set(entries) == succeeded, "a refused transfer has entries"
    assert total == 0, "money was created or destroyed"
    assert audit.ok, audit.problems


async def _stored(database_url: str, prefix: str) -> tuple[dict[str, str], dict[str, int], int]:
    connection = await asyncpg.connect(database_url)
    try:
        transfers = dict(await connection.fetch("SELECT id, status FROM transfers WHERE id LIKE $1 || '-t%'", prefix))
        entries = dict(
            await connection.fetch(
                "SELECT transfer_id, count(*) FROM entries WHERE transfer_id LIKE $1 || '-t%' GROUP BY transfer_id",
                prefix,
            )
        )
        total = await connection.fetchval(
            "SELECT COALESCE(sum(credits_posted - debits_posted), 0) FROM accounts WHERE id LIKE $1 || '-%'", prefix
        )
    finally:
        await connection.close()
    return transfers, entries, int(total)


def test_results_tolerate_fields_a_newer_server_adds() -> None:
    """Decoding ignores unknown fields and defaults the ones an older server lacks."""
    from ledger.client import Transfer

    body = {
        "id": "t", "debit_account_id": "a", "credit_account_id": "b", "amount": 5, "status": "settled",
        "created_at": "2026-11-24T21:59:03.123456Z", "updated_at": "2026-11-24T21:59:03.123456Z",
        "a_field_from_the_future": {"x": 1},
    }  # fmt: skip
    transfer = msgspec.json.decode(json.dumps(body), type=Transfer)
    assert (transfer.status, transfer.metadata, transfer.code) == ("settled", {}, None)
