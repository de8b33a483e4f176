"""Account controls over HTTP against PostgreSQL: overdraft limits, maximum balances,
freezing and closing, the account history, and history import (`imported_at`).

Every refusal is checked twice: the first answer, and a retry with the same id after the
cause has gone away (the outcome of an id is permanent: the retry gets the same refusal,
and nothing moved)."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from ledger import domain
from tests.integration.helpers import assert_problem, open_account, transfer


class _As:
    """The session's client, with another key on every request."""

    def __init__(self, client: AsyncTestClient, key: str) -> None:
        self._client, self._headers = client, {"Authorization": f"Bearer {key}"}

    async def post(self, url: str, **kwargs: Any) -> Any:
        return await self._client.post(url, headers=self._headers, **kwargs)

    async def patch(self, url: str, **kwargs: Any) -> Any:
        return await self._client.patch(url, headers=self._headers, **kwargs)


@pytest.fixture
async def poster_client(client: AsyncTestClient) -> _As:
    created = await client.post("/v1/keys", json={"role": "poster", "name": "account controls tests"})
    assert created.status_code == 201, created.text
    return _As(client, created.json()["key"])


async def _account(client: AsyncTestClient, account_id: str, **fields: Any) -> dict:
    response = await client.post("/v1/accounts", json={"id": account_id, "currency": "EUR", **fields})
    assert response.status_code == 201, response.text
    return response.json()


async def _balance(client: AsyncTestClient, account_id: str) -> dict:
    return (await client.get(f"/v1/accounts/{account_id}")).json()["balance"]


async def _patch(client: AsyncTestClient, account_id: str, **fields: Any) -> Any:
    return await client.patch(f"/v1/accounts/{account_id}", json=fields)


async def _refused_and_replayed(
    client: AsyncTestClient, transfer_id: str, debit: str, credit: str, amount: int, code: str, **fields: Any
) -> dict:
    first = await transfer(client, transfer_id, debit, credit, amount, **fields)
    body = assert_problem(first, 422 if code != "account_not_found" else 404, code)
    again = await transfer(client, transfer_id, debit, credit, amount, **fields)
    assert again.status_code == first.status_code and again.json() == body
    assert again.headers["idempotent-replayed"] == "true"
    stored = (await client.get(f"/v1/transfers/{transfer_id}")).json()
    assert stored["status"] == "rejected" and stored["code"] == code
    return body


async def _verify(client: AsyncTestClient) -> None:
    report = (await client.post("/v1/audit/verify", json={})).json()
    assert report["ok"], report["problems"]


async def test_an_overdraft_limit_bounds_available_pending_included(client: AsyncTestClient, uid: str) -> None:
    """available may go down to -overdraft_limit, reservations included, and no further;
    a refusal is recorded, and stays the answer after the limit is raised."""
    line, shop = f"line-{uid}", f"shop-{uid}"
    account = await _account(client, line, overdraft_limit=100)
    assert account["overdraft_limit"] == 100 and account["max_balance"] is None and account["status"] == "open"
    await _account(client, shop)
    hold = await transfer(client, f"hold-{uid}", line, shop, 60, pending=True)
    assert hold.status_code == 201
    assert (await transfer(client, f"ok-{uid}", line, shop, 40)).status_code == 201
    assert await _balance(client, line) == {
        "posted": -40,
        "pending_debits": 60,
        "pending_credits": 0,
        "available": -100,
    }
    await _refused_and_replayed(client, f"over-{uid}", line, shop, 1, "insufficient_funds")
    assert (await _patch(client, line, overdraft_limit=500)).status_code == 200
    # The id keeps its outcome; a new id may use the new limit.
    await _refused_and_replayed(client, f"over-{uid}", line, shop, 1, "insufficient_funds")
    assert (await transfer(client, f"more-{uid}", line, shop, 400)).status_code == 201
    assert (await _balance(client, line))["available"] == -500
    await _verify(client)


async def test_a_max_balance_bounds_posted_plus_pending_credits(client: AsyncTestClient, uid: str) -> None:
    bank, wallet = f"bank-{uid}", f"wallet-{uid}"
    await open_account(client, bank, negative=True)
    await _account(client, wallet, max_balance=1000)
    assert (await transfer(client, f"in-{uid}", bank, wallet, 800)).status_code == 201
    assert (await transfer(client, f"res-{uid}", bank, wallet, 200, pending=True)).status_code == 201
    body = await _refused_and_replayed(client, f"cap-{uid}", bank, wallet, 1, "exceeds_max_balance")
    assert wallet in body["detail"]
    assert (await client.post(f"/v1/transfers/res-{uid}/void", json={})).status_code == 200
    assert (await transfer(client, f"fill-{uid}", bank, wallet, 200)).status_code == 201
    assert await _balance(client, wallet) == {
        "posted": 1000,
        "pending_debits": 0,
        "pending_credits": 0,
        "available": 1000,
    }
    # A reversal is a new transfer: it may not push its credit account past the cap.
    assert (await transfer(client, f"out-{uid}", wallet, bank, 300)).status_code == 201
    assert (await transfer(client, f"in2-{uid}", bank, wallet, 300)).status_code == 201
    reversal = await client.post(f"/v1/transfers/out-{uid}/reverse", json={"id": f"rev-{uid}"})
    assert_problem(reversal, 422, "exceeds_max_balance")
    assert (await _balance(client, wallet))["posted"] == 1000
    await _verify(client)


async def test_a_linked_chain_fails_whole_when_one_leg_breaks_a_limit(client: AsyncTestClient, uid: str) -> None:
    """Currency exchange through liquidity accounts: the chain's second leg would pass the
    destination's cap, so neither leg moves, each recorded with its code."""
    alice_eur, fx_eur, fx_usd, alice_usd = (f"{n}-{uid}" for n in ("alice-eur", "fx-eur", "fx-usd", "alice-usd"))
    bank = f"bank-{uid}"
    await open_account(client, bank, negative=True)
    await _account(client, alice_eur)
    await _account(client, fx_eur)
    await client.post("/v1/accounts", json={"id": fx_usd, "currency": "USD", "allow_negative_balance": True})
    await client.post("/v1/accounts", json={"id": alice_usd, "currency": "USD", "max_balance": 1000})
    assert (await transfer(client, f"fund-{uid}", bank, alice_eur, 1000)).status_code == 201
    legs = [
        {"id": f"leg1-{uid}", "debit_account_id": alice_eur, "credit_account_id": fx_eur, "amount": 1000,
         "linked": True},
        {"id": f"leg2-{uid}", "debit_account_id": fx_usd, "credit_account_id": alice_usd, "amount": 1100},
    ]  # fmt: skip
    results = (await client.post("/v1/transfers/batch", json={"transfers": legs})).json()["results"]
    assert [(r["status"], r["code"]) for r in results] == [
        ("rejected", "linked_transfer_failed"),
        ("rejected", "exceeds_max_balance"),
    ]
    assert (await _balance(client, alice_eur))["posted"] == 1000
    legs[1]["amount"] = 1000
    legs[0]["id"], legs[1]["id"] = f"leg1b-{uid}", f"leg2b-{uid}"
    results = (await client.post("/v1/transfers/batch", json={"transfers": legs})).json()["results"]
    assert [r["status"] for r in results] == ["created", "created"]
    await _verify(client)


async def test_only_an_admin_opens_an_account_with_an_overdraft(
    client: AsyncTestClient, uid: str, poster_client: _As
) -> None:
    forbidden = await poster_client.post(
        "/v1/accounts", json={"id": f"od-{uid}", "currency": "EUR", "overdraft_limit": 1}
    )
    assert_problem(forbidden, 403, "forbidden")
    assert (await client.get(f"/v1/accounts/od-{uid}")).status_code == 404
    # No overdraft (0) and a cap take nothing out of the ledger: a poster may set them.
    allowed = await poster_client.post(
        "/v1/accounts", json={"id": f"capped-{uid}", "currency": "EUR", "overdraft_limit": 0, "max_balance": 10}
    )
    assert allowed.status_code == 201, allowed.text
    patched = await poster_client.patch(f"/v1/accounts/capped-{uid}", json={"status": "frozen"})
    assert_problem(patched, 403, "forbidden")
    assert (await client.get(f"/v1/accounts/capped-{uid}")).json()["status"] == "open"


async def test_a_frozen_account_neither_sends_nor_receives_until_reopened(client: AsyncTestClient, uid: str) -> None:
    bank, alice, bob = f"bank-{uid}", f"alice-{uid}", f"bob-{uid}"
    await open_account(client, bank, negative=True)
    await _account(client, alice)
    await _account(client, bob)
    assert (await transfer(client, f"fund-{uid}", bank, alice, 500)).status_code == 201
    frozen = await _patch(client, alice, status="frozen")
    assert frozen.status_code == 200 and frozen.json()["status"] == "frozen"
    await _refused_and_replayed(client, f"out-{uid}", alice, bob, 10, "account_frozen")
    await _refused_and_replayed(client, f"in-{uid}", bank, alice, 10, "account_frozen")
    batch = await client.post(
        "/v1/transfers/batch",
        json={"transfers": [{"id": f"b-{uid}", "debit_account_id": bob, "credit_account_id": alice, "amount": 1}]},
    )
    assert batch.json()["results"][0]["code"] == "account_frozen"
    reopened = await _patch(client, alice, status="open")
    assert reopened.json()["status"] == "open"
    await _refused_and_replayed(client, f"out-{uid}", alice, bob, 10, "account_frozen")
    assert (await transfer(client, f"out2-{uid}", alice, bob, 10)).status_code == 201
    assert (await _balance(client, alice))["posted"] == 490
    await _verify(client)


async def test_a_reservation_made_before_a_freeze_may_be_posted_or_voided(client: AsyncTestClient, uid: str) -> None:
    """The documented decision: a freeze stops new money movement, not the settlement of
    reservations granted before it (a card capture after the card was blocked)."""
    bank, card, merchant = f"bank-{uid}", f"card-{uid}", f"merchant-{uid}"
    await open_account(client, bank, negative=True)
    await _account(client, card)
    await _account(client, merchant)
    await transfer(client, f"fund-{uid}", bank, card, 100)
    assert (await transfer(client, f"auth1-{uid}", card, merchant, 30, pending=True)).status_code == 201
    assert (await transfer(client, f"auth2-{uid}", card, merchant, 20, pending=True)).status_code == 201
    await _patch(client, card, status="frozen")
    await _refused_and_replayed(client, f"auth3-{uid}", card, merchant, 5, "account_frozen", pending=True)
    captured = await client.post(f"/v1/transfers/auth1-{uid}/post", json={"amount": 25})
    assert captured.status_code == 200 and captured.json()["posted_amount"] == 25
    assert (await client.post(f"/v1/transfers/auth2-{uid}/void", json={})).status_code == 200
    assert await _balance(client, card) == {"posted": 75, "pending_debits": 0, "pending_credits": 0, "available": 75}
    await _verify(client)


async def test_closing_needs_an_empty_account_and_is_final(client: AsyncTestClient, uid: str) -> None:
    bank, alice = f"bank-{uid}", f"alice-{uid}"
    await open_account(client, bank, negative=True)
    await _account(client, alice)
    await transfer(client, f"fund-{uid}", bank, alice, 50)
    assert_problem(await _patch(client, alice, status="closed"), 409, "account_not_empty")
    await transfer(client, f"back-{uid}", alice, bank, 50)
    await transfer(client, f"hold-{uid}", bank, alice, 5, pending=True)
    assert_problem(await _patch(client, alice, status="closed"), 409, "account_not_empty")
    await client.post(f"/v1/transfers/hold-{uid}/void", json={})
    closed = await _patch(client, alice, status="closed")
    assert closed.status_code == 200 and closed.json()["status"] == "closed"
    # Repeating the close changes nothing and is not an error; anything else is refused.
    assert (await _patch(client, alice, status="closed")).status_code == 200
    for change in ({"status": "open"}, {"status": "frozen"}, {"name": "x"}, {"max_balance": 5}):
        assert_problem(await _patch(client, alice, **change), 409, "account_closed")
    await _refused_and_replayed(client, f"late-{uid}", bank, alice, 1, "account_closed")
    await _refused_and_replayed(client, f"late2-{uid}", alice, bank, 1, "account_closed")
    changes = (await client.get(f"/v1/accounts/{alice}/changes")).json()["data"]
    assert [(c["before"], c["after"]) for c in changes] == [({"status": "open"}, {"status": "closed"})]
    await _verify(client)


async def test_an_expired_reservation_does_not_keep_an_account_open(client: AsyncTestClient, uid: str) -> None:
    """A reservation past its expiry but not yet released holds nothing: closing releases
    it on the way rather than refusing."""
    bank, alice = f"bank-{uid}", f"alice-{uid}"
    await open_account(client, bank, negative=True)
    await _account(client, alice)
    await transfer(client, f"hold-{uid}", bank, alice, 5, pending=True, timeout_seconds=1)
    await asyncio.sleep(1.2)
    closed = await _patch(client, alice, status="closed")
    assert closed.status_code == 200, closed.text
    assert (await client.get(f"/v1/transfers/hold-{uid}")).json()["status"] == "expired"
    await _verify(client)


async def test_a_limit_the_balance_already_breaks_is_refused_and_changes_nothing(
    client: AsyncTestClient, uid: str
) -> None:
    bank, alice = f"bank-{uid}", f"alice-{uid}"
    await open_account(client, bank, negative=True)
    await _account(client, alice, overdraft_limit=100)
    await transfer(client, f"in-{uid}", bank, alice, 300)
    await transfer(client, f"out-{uid}", alice, bank, 350)  # available -50
    assert_problem(await _patch(client, alice, overdraft_limit=10), 409, "balance_outside_limits")
    assert_problem(await _patch(client, alice, overdraft_limit=None), 409, "balance_outside_limits")
    await transfer(client, f"res-{uid}", bank, alice, 40, pending=True)  # posted -50, pending credits 40
    await transfer(client, f"in2-{uid}", bank, alice, 60)  # posted 10, + pending credits 40 = 50
    assert_problem(await _patch(client, alice, max_balance=49), 409, "balance_outside_limits")
    account = (await client.get(f"/v1/accounts/{alice}")).json()
    assert account["overdraft_limit"] == 100 and account["max_balance"] is None
    assert (await client.get(f"/v1/accounts/{alice}/changes")).json()["data"] == []
    ok = await _patch(client, alice, overdraft_limit=0, max_balance=50)
    assert ok.status_code == 200, ok.text
    await _refused_and_replayed(client, f"cap-{uid}", bank, alice, 1, "exceeds_max_balance")
    await _verify(client)


async def test_every_change_is_kept_with_its_key_and_before_and_after(client: AsyncTestClient, uid: str) -> None:
    alice = f"alice-{uid}"
    await _account(client, alice, name="Alice", metadata={"tier": "gold"})
    steps = [
        {"name": "Alice B."},
        {"metadata": {"tier": "platinum", "region": "eu"}, "max_balance": 5000},
        {"status": "frozen"},
        {"status": "frozen", "name": "Alice B."},  # changes nothing: no history row
        {"status": "open", "max_balance": None, "overdraft_limit": 0},
    ]
    for step in steps:
        response = await _patch(client, alice, **step)
        assert response.status_code == 200, response.text
    account = (await client.get(f"/v1/accounts/{alice}")).json()
    assert (account["name"], account["metadata"], account["status"]) == (
        "Alice B.",
        {"tier": "platinum", "region": "eu"},
        "open",
    )
    assert (account["max_balance"], account["overdraft_limit"]) == (None, 0)
    pages: list[dict] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await client.get(f"/v1/accounts/{alice}/changes", params=params)).json()
        pages.extend(page["data"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [c["sequence"] for c in pages] == [1, 2, 3, 4]
    assert [(c["fields"], c["before"], c["after"]) for c in pages] == [
        (["name"], {"name": "Alice"}, {"name": "Alice B."}),
        (["max_balance", "metadata"], {"max_balance": None, "metadata": {"tier": "gold"}},
         {"max_balance": 5000, "metadata": {"tier": "platinum", "region": "eu"}}),
        (["status"], {"status": "open"}, {"status": "frozen"}),
        (["status", "overdraft_limit", "max_balance"], {"status": "frozen", "overdraft_limit": None,
         "max_balance": 5000}, {"status": "open", "overdraft_limit": 0, "max_balance": None}),
    ]  # fmt: skip
    assert all(c["changed_by"] == "LEDGER_ADMIN_KEY" and c["changed_at"].endswith("Z") for c in pages)
    assert [c["changed_at"] for c in pages] == sorted(c["changed_at"] for c in pages)
    assert_problem(await client.get(f"/v1/accounts/missing-{uid}/changes"), 404, "account_not_found")
    assert_problem(await _patch(client, f"missing-{uid}", status="frozen"), 404, "account_not_found")
    await _verify(client)


@pytest.mark.parametrize(
    "body",
    [
        {"status": "deleted"},
        {"overdraft_limit": -1},
        {"max_balance": 1.5},
        {"max_balance": "10"},
        {"overdraft_limit": 2**63},
        {"name": ""},
        {"metadata": {"k": 1}},
        {"balance": 10},
        {"currency": "USD"},
        {"allow_negative_balance": True},
        {"status": None},
    ],
)
async def test_bad_changes_are_400_and_change_nothing(client: AsyncTestClient, uid: str, body: dict) -> None:
    alice = f"alice-{uid}"
    before = await _account(client, alice, name="A")
    assert_problem(await client.patch(f"/v1/accounts/{alice}", json=body), 400, "validation_error")
    assert (await client.get(f"/v1/accounts/{alice}")).json() == before


async def test_a_creation_retried_after_a_change_is_still_a_replay(client: AsyncTestClient, uid: str) -> None:
    body = {"id": f"acct-{uid}", "currency": "EUR", "name": "A", "max_balance": 10}
    assert (await client.post("/v1/accounts", json=body)).status_code == 201
    await _patch(client, f"acct-{uid}", name="B", max_balance=20)
    again = await client.post("/v1/accounts", json=body)
    assert again.status_code == 200 and again.json()["name"] == "B" and again.json()["max_balance"] == 20
    assert_problem(await client.post("/v1/accounts", json={**body, "max_balance": 11}), 409,
                   "account_exists_with_different_fields")  # fmt: skip


def _blind_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulate a decision that ignores limits and status: the accounts it is given look
    open and unbounded, the states it returns keep the stored controls (what the CHECKs
    read)."""
    decide = domain.decide_transfer

    def blind(request, accounts, now, key):  # type: ignore[no-untyped-def]
        believed = {
            k: dataclasses.replace(
                a, status="open", overdraft_limit=None, max_balance=None, allow_negative_balance=True
            )
            for k, a in accounts.items()
        }
        plan = decide(request, believed, now, key)
        return dataclasses.replace(
            plan,
            accounts=tuple(
                dataclasses.replace(
                    a, status=accounts[a.id].status, overdraft_limit=accounts[a.id].overdraft_limit,
                    max_balance=accounts[a.id].max_balance, allow_negative_balance=accounts[a.id].allow_negative_balance,
                )
                for a in plan.accounts
            ),
        )  # fmt: skip

    monkeypatch.setattr(domain, "decide_transfer", blind)


async def test_postgresql_refuses_what_a_wrong_decision_would_allow(
    client: AsyncTestClient, uid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CHECKs stand behind the Python rules: with the decision blind to limits and
    status, the database refuses each write and the refusal it stands for is recorded."""
    bank, line, wallet, gone = f"bank-{uid}", f"line-{uid}", f"wallet-{uid}", f"gone-{uid}"
    await open_account(client, bank, negative=True)
    await _account(client, line, overdraft_limit=10)
    await _account(client, wallet, max_balance=10)
    await _account(client, gone)
    await _patch(client, gone, status="closed")
    _blind_decision(monkeypatch)
    for transfer_id, debit, credit, amount, code in [
        (f"od-{uid}", line, bank, 11, "insufficient_funds"),
        (f"cap-{uid}", bank, wallet, 11, "exceeds_max_balance"),
        (f"closed-{uid}", bank, gone, 1, "account_closed"),
    ]:
        await _refused_and_replayed(client, transfer_id, debit, credit, amount, code)
    for account_id in (line, wallet, gone):
        assert (await _balance(client, account_id))["posted"] == 0
    monkeypatch.undo()
    await _verify(client)


# -- history import ------------------------------------------------------------------------


def _at(days_ago: float) -> str:
    return (datetime.now(UTC) - timedelta(days=days_ago)).isoformat().replace("+00:00", "Z")


async def test_imported_history_keeps_journals_in_time_order_and_as_of_exact(client: AsyncTestClient, uid: str) -> None:
    bank, alice, bob = f"bank-{uid}", f"alice-{uid}", f"bob-{uid}"
    await open_account(client, bank, negative=True)
    await _account(client, alice)
    await _account(client, bob)
    history = [(f"h1-{uid}", bank, alice, 100, 30), (f"h2-{uid}", alice, bob, 40, 20), (f"h3-{uid}", bank, bob, 5, 10)]
    times = {}
    for transfer_id, debit, credit, amount, days in history:
        times[transfer_id] = _at(days)
        response = await transfer(client, transfer_id, debit, credit, amount, imported_at=times[transfer_id])
        assert response.status_code == 201, response.text
        assert response.json()["imported_at"] == times[transfer_id].replace("Z", "")[:26] + "Z"
        assert response.json()["created_at"] > response.json()["imported_at"]
    entries = (await client.get(f"/v1/accounts/{alice}/entries")).json()["data"]
    assert [e["created_at"][:10] for e in entries] == [_at(30)[:10], _at(20)[:10]]
    for days, posted in ((31, 0), (25, 100), (15, 60), (0, 60)):
        balance = (await client.get(f"/v1/accounts/{alice}/balance", params={"as_of": _at(days)})).json()
        assert balance["posted"] == posted, (days, balance)
    # Earlier than an account's last entry, or in the future: refused and recorded.
    await _refused_and_replayed(client, f"old-{uid}", bank, alice, 1, "imported_at_out_of_order", imported_at=_at(25))
    await _refused_and_replayed(client, f"future-{uid}", bank, alice, 1, "imported_at_out_of_order",
                                imported_at=_at(-1))  # fmt: skip
    # The same instant as the last entry is in order; live transfers follow the import.
    same = await transfer(client, f"same-{uid}", bank, bob, 1, imported_at=times[f"h3-{uid}"])
    assert same.status_code == 201, same.text
    live = await transfer(client, f"live-{uid}", alice, bob, 1)
    assert live.status_code == 201 and live.json()["imported_at"] is None
    # An imported id is idempotent like any other.
    replay = await transfer(client, f"h1-{uid}", bank, alice, 100, imported_at=times[f"h1-{uid}"])
    assert replay.status_code == 201 and replay.headers["idempotent-replayed"] == "true"
    other = await transfer(client, f"h1-{uid}", bank, alice, 100, imported_at=_at(29))
    assert_problem(other, 409, "transfer_exists_with_different_fields")
    await _verify(client)


async def test_importing_is_for_admins_and_for_posted_transfers(
    client: AsyncTestClient, uid: str, poster_client: _As
) -> None:
    bank, alice = f"bank-{uid}", f"alice-{uid}"
    await open_account(client, bank, negative=True)
    await _account(client, alice)
    body = {"id": f"imp-{uid}", "debit_account_id": bank, "credit_account_id": alice, "amount": 5,
            "imported_at": _at(1)}  # fmt: skip
    assert_problem(await poster_client.post("/v1/transfers", json=body), 403, "forbidden")
    batch = {"transfers": [{**body, "id": f"impb-{uid}"}]}
    assert_problem(await poster_client.post("/v1/transfers/batch", json=batch), 403, "forbidden")
    assert_problem(await client.post("/v1/transfers", json={**body, "pending": True}), 400, "validation_error")
    assert_problem(await client.post("/v1/transfers", json={**body, "imported_at": "2026-01-01T00:00:00"}), 400,
                   "validation_error")  # fmt: skip
    assert_problem(await client.post("/v1/transfers", json={**body, "imported_at": "yesterday"}), 400,
                   "validation_error")  # fmt: skip
    for transfer_id in (f"imp-{uid}", f"impb-{uid}"):
        assert (await client.get(f"/v1/transfers/{transfer_id}")).status_code == 404
