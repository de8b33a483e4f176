"""A property-based model test: a small in-memory model of the ledger, written from the
contract alone, and the real service are driven by the same random sequence of account
openings (with overdraft limits and maximum balances), transfers (posted and pending),
posts, voids, expiries, reversals, batches with linked chains, replays, and account
changes (freeze, reopen, close, new limits). After every step the statuses and codes the service answers
must be the model's, and so must the balances of the accounts involved; at the end every
balance and every transfer's status is compared, and posted balances of each currency
sum to zero."""

from __future__ import annotations

import copy
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from litestar.testing import TestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.database import create_engine
from ledger.http.app import create_app
from ledger.settings import Settings
from tests import provision

CURRENCIES = ("EUR", "USD")


@dataclass
class ModelAccount:
    currency: str
    negative: bool
    posted: int = 0
    pending_debits: int = 0
    pending_credits: int = 0
    status: str = "open"
    overdraft_limit: int | None = None
    max_balance: int | None = None

    def breaks(self, overdraft_limit: int | None, max_balance: int | None) -> bool:
        """Whether the present balance is outside these limits."""
        below = not self.negative and self.available < -(overdraft_limit or 0)
        return below or (max_balance is not None and self.posted + self.pending_credits > max_balance)

    @property
    def available(self) -> int:
        return self.posted - self.pending_debits


@dataclass
class ModelTransfer:
    debit: str
    credit: str
    amount: int
    currency: str | None
    pending: bool
    status: str
    code: str | None = None
    posted_amount: int | None = None
    reversed: int = 0


@pytest.fixture(scope="module")
def model_client(service_database_url: str, database_url: str) -> Iterator[TestClient]:
    # The sweeper is off so that expiry happens exactly when the model says (the
    # `expire` rule moves a reservation's expiry into the past, as the database's owner:
    # the service's role may not; reads and decisions then apply it lazily).
    settings = provision.settings_for(service_database_url, expiry_sweep_interval_seconds=0)
    with TestClient(create_app(settings)) as client:
        client.headers.update(provision.API_HEADERS)
        LedgerMachine.owner_engine = client.blocking_portal.call(_owner_engine, database_url)
        yield client
        client.blocking_portal.call(LedgerMachine.owner_engine.dispose)


async def _owner_engine(database_url: str) -> AsyncEngine:
    return create_engine(Settings(database_url=database_url))


class LedgerMachine(RuleBasedStateMachine):
    client: TestClient
    owner_engine: AsyncEngine

    def __init__(self) -> None:
        super().__init__()
        self.prefix = secrets.token_hex(4)
        self.accounts: dict[str, ModelAccount] = {}
        self.transfers: dict[str, ModelTransfer] = {}
        self.creations: list[tuple[dict, int, str | None]] = []
        self.touched: set[str] = set()
        self.count = 0

    # -- helpers ---------------------------------------------------------------------

    def new_id(self, kind: str) -> str:
        self.count += 1
        return f"{self.prefix}-{kind}{self.count}"

    def refusal(self, debit: str, credit: str, amount: int, currency: str | None) -> str | None:
        if debit == credit:
            return "accounts_must_be_different"
        if debit not in self.accounts or credit not in self.accounts:
            return "account_not_found"
        for status in ("closed", "frozen"):
            if status in (self.accounts[debit].status, self.accounts[credit].status):
                return f"account_{status}"
        wanted = currency or self.accounts[debit].currency
        if self.accounts[debit].currency != wanted or self.accounts[credit].currency != wanted:
            return "currency_mismatch"
        source, target = self.accounts[debit], self.accounts[credit]
        if not source.negative and source.available - amount < -(source.overdraft_limit or 0):
            return "insufficient_funds"
        if target.max_balance is not None and target.posted + target.pending_credits + amount > target.max_balance:
            return "exceeds_max_balance"
        return None

    def apply(self, transfer: ModelTransfer) -> None:
        debit, credit = self.accounts[transfer.debit], self.accounts[transfer.credit]
        if transfer.pending:
            debit.pending_debits += transfer.amount
            credit.pending_credits += transfer.amount
        else:
            debit.posted -= transfer.amount
            credit.posted += transfer.amount
        self.touched |= {transfer.debit, transfer.credit}

    def release(self, transfer: ModelTransfer) -> None:
        self.accounts[transfer.debit].pending_debits -= transfer.amount
        self.accounts[transfer.credit].pending_credits -= transfer.amount
        self.touched |= {transfer.debit, transfer.credit}

    def account_ids(self) -> list[str]:
        return sorted(self.accounts)

    # -- rules -----------------------------------------------------------------------

    @initialize()
    def open_houses(self) -> None:
        for currency in CURRENCIES:
            self.open(currency, True, None, None)

    @rule(
        currency=st.sampled_from(CURRENCIES),
        negative=st.booleans(),
        overdraft_limit=st.one_of(st.none(), st.integers(0, 300)),
        max_balance=st.one_of(st.none(), st.integers(0, 1500)),
    )
    def open(self, currency: str, negative: bool, overdraft_limit: int | None, max_balance: int | None) -> None:
        account_id = self.new_id("acct")
        body = {"id": account_id, "currency": currency, "allow_negative_balance": negative}
        body |= {"overdraft_limit": overdraft_limit, "max_balance": max_balance}
        response = self.client.post("/v1/accounts", json=body)
        assert response.status_code == 201, response.text
        self.accounts[account_id] = ModelAccount(
            currency, negative, overdraft_limit=overdraft_limit, max_balance=max_balance
        )

    @precondition(lambda self: self.accounts)
    @rule(
        data=st.data(),
        status=st.one_of(st.none(), st.sampled_from(("open", "frozen", "closed"))),
        overdraft_limit=st.one_of(st.just("same"), st.none(), st.integers(0, 300)),
        max_balance=st.one_of(st.just("same"), st.none(), st.integers(0, 1500)),
    )
    def change(self, data: st.DataObject, status: str | None, overdraft_limit: object, max_balance: object) -> None:
        """PATCH an account: freeze, reopen, close, new limits, or nothing new."""
        account_id = data.draw(st.sampled_from(self.account_ids()))
        account = self.accounts[account_id]
        body: dict[str, object] = {}
        if status is not None:
            body["status"] = status
        if overdraft_limit != "same":
            body["overdraft_limit"] = overdraft_limit
        if max_balance != "same":
            body["max_balance"] = max_balance
        new = {"status": account.status, "overdraft_limit": account.overdraft_limit,
               "max_balance": account.max_balance, **body}  # fmt: skip
        expected: tuple[int, str | None] = (200, None)
        if new == {"status": account.status, "overdraft_limit": account.overdraft_limit,
                   "max_balance": account.max_balance}:  # fmt: skip
            expected = (200, None)
        elif account.status == "closed":
            expected = (409, "account_closed")
        elif new["status"] == "closed" and (account.posted or account.pending_debits or account.pending_credits):
            expected = (409, "account_not_empty")
        elif account.breaks(new["overdraft_limit"], new["max_balance"]):  # type: ignore[arg-type]
            expected = (409, "balance_outside_limits")
        response = self.client.patch(f"/v1/accounts/{account_id}", json=body)
        assert (response.status_code, response.json().get("code")) == expected, (account, body, response.text)
        if expected[0] == 200:
            account.status = new["status"]  # type: ignore[assignment]
            account.overdraft_limit = new["overdraft_limit"]  # type: ignore[assignment]
            account.max_balance = new["max_balance"]  # type: ignore[assignment]
        self.touched.add(account_id)

    @rule(data=st.data(), amount=st.integers(1, 400), pending=st.booleans(), explicit_currency=st.booleans())
    def transfer(self, data: st.DataObject, amount: int, pending: bool, explicit_currency: bool) -> None:
        choices = [*self.account_ids(), f"{self.prefix}-ghost"]
        debit = data.draw(st.sampled_from(choices))
        credit = data.draw(st.sampled_from(choices))
        currency = data.draw(st.sampled_from(CURRENCIES)) if explicit_currency else None
        transfer_id = self.new_id("t")
        body = {
            "id": transfer_id,
            "debit_account_id": debit,
            "credit_account_id": credit,
            "amount": amount,
            "pending": pending,
        }
        if currency:
            body["currency"] = currency
        code = self.refusal(debit, credit, amount, currency)
        response = self.client.post("/v1/transfers", json=body)
        status = 201 if code is None else (404 if code == "account_not_found" else 422)
        assert response.status_code == status, (body, response.text)
        if code is not None:
            assert response.json()["code"] == code
        model = ModelTransfer(
            debit, credit, amount, currency, pending, "rejected" if code else ("pending" if pending else "posted"), code
        )
        self.transfers[transfer_id] = model
        if code is None:
            self.apply(model)
        self.creations.append((body, status, code))

    @precondition(lambda self: self.creations)
    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        body, status, code = data.draw(st.sampled_from(self.creations))
        path = "/v1/transfers" if "reverse_of" not in body else f"/v1/transfers/{body['reverse_of']}/reverse"
        payload = {k: v for k, v in body.items() if k != "reverse_of"}
        response = self.client.post(path, json=payload)
        assert response.status_code == status and response.headers["idempotent-replayed"] == "true", response.text
        assert (response.json().get("code") if status != 201 else None) == code

    @precondition(lambda self: self.transfers)
    @rule(data=st.data(), amount=st.one_of(st.none(), st.integers(1, 450)))
    def post(self, data: st.DataObject, amount: int | None) -> None:
        transfer_id = data.draw(st.sampled_from(sorted(self.transfers)))
        t = self.transfers[transfer_id]
        expected: tuple[int, str | None]
        if not t.pending or t.status == "rejected":
            expected = (409, "transfer_not_pending")
        elif t.status == "expired":
            expected = (409, "pending_transfer_expired")
        elif t.status == "voided":
            expected = (409, "pending_transfer_already_voided")
        elif t.status == "posted":
            expected = (
                (200, None) if (amount or t.amount) == t.posted_amount else (409, "pending_transfer_already_posted")
            )
        elif amount is not None and amount > t.amount:
            expected = (422, "exceeds_pending_amount")
        else:
            posted = amount or t.amount
            self.release(t)
            self.accounts[t.debit].posted -= posted
            self.accounts[t.credit].posted += posted
            t.status, t.posted_amount = "posted", posted
            expected = (200, None)
        response = self.client.post(
            f"/v1/transfers/{transfer_id}/post", json={} if amount is None else {"amount": amount}
        )
        assert (response.status_code, response.json().get("code")) == expected, response.text

    @precondition(lambda self: self.transfers)
    @rule(data=st.data())
    def void(self, data: st.DataObject) -> None:
        transfer_id = data.draw(st.sampled_from(sorted(self.transfers)))
        t = self.transfers[transfer_id]
        if not t.pending or t.status == "rejected":
            expected = (409, "transfer_not_pending")
        elif t.status == "expired":
            expected = (409, "pending_transfer_expired")
        elif t.status == "posted":
            expected = (409, "pending_transfer_already_posted")
        else:
            if t.status == "pending":
                self.release(t)
                t.status = "voided"
            expected = (200, None)
        response = self.client.post(f"/v1/transfers/{transfer_id}/void", json={})
        assert (response.status_code, response.json().get("code")) == expected, response.text

    @precondition(lambda self: any(t.status == "pending" for t in self.transfers.values()))
    @rule(data=st.data())
    def expire(self, data: st.DataObject) -> None:
        """Time passes for one reservation: its expiry moves into the past."""
        transfer_id = data.draw(st.sampled_from(sorted(i for i, t in self.transfers.items() if t.status == "pending")))

        async def backdate() -> None:
            async with self.owner_engine.begin() as connection:
                await connection.execute(
                    text(
                        "UPDATE transfers SET expires_at = clock_timestamp() - interval '1 second', timeout_seconds = 1 WHERE id = :id"
                    ),
                    {"id": transfer_id},
                )

        self.client.blocking_portal.call(backdate)
        t = self.transfers[transfer_id]
        self.release(t)
        t.status = "expired"

    @precondition(lambda self: self.transfers)
    @rule(data=st.data(), amount=st.one_of(st.none(), st.integers(1, 200)))
    def reverse(self, data: st.DataObject, amount: int | None) -> None:
        original_id = data.draw(st.sampled_from(sorted(self.transfers)))
        t = self.transfers[original_id]
        reversal_id = self.new_id("r")
        code: str | None = None
        if t.status != "posted":
            code = "transfer_not_posted"
        else:
            reversible = (t.posted_amount if t.pending else t.amount) - t.reversed
            resolved = amount if amount is not None else reversible
            if resolved <= 0 or resolved > reversible:
                code = "exceeds_reversible_amount"
            else:
                code = self.refusal(t.credit, t.debit, resolved, t.currency)
        body = {"id": reversal_id, **({"amount": amount} if amount is not None else {})}
        response = self.client.post(f"/v1/transfers/{original_id}/reverse", json=body)
        status = 201 if code is None else 422
        assert response.status_code == status, (original_id, t, body, response.text)
        if code is None:
            reversal = ModelTransfer(t.credit, t.debit, resolved, t.currency, False, "posted")
            self.apply(reversal)
            t.reversed += resolved
            self.transfers[reversal_id] = reversal
        else:
            assert response.json()["code"] == code
            self.transfers[reversal_id] = ModelTransfer(t.credit, t.debit, 1, None, False, "rejected", code)
        self.creations.append(({**body, "reverse_of": original_id}, status, code))

    @rule(
        data=st.data(),
        shape=st.lists(st.tuples(st.integers(1, 300), st.booleans(), st.booleans()), min_size=1, max_size=5),
    )
    def batch(self, data: st.DataObject, shape: list[tuple[int, bool, bool]]) -> None:
        accounts = self.account_ids()
        items = []
        for amount, pending, linked in shape:
            debit, credit = data.draw(st.sampled_from(accounts)), data.draw(st.sampled_from(accounts))
            items.append({"id": self.new_id("b"), "debit_account_id": debit, "credit_account_id": credit,
                          "amount": amount, "pending": pending, "linked": linked})  # fmt: skip
        expected: list[tuple[str, str | None]] = []
        start = 0
        units = []
        for index, item in enumerate(items):
            if not item["linked"]:
                units.append((start, index + 1, False))
                start = index + 1
        if start < len(items):
            units.append((start, len(items), True))
        for first, end, is_open in units:
            chain = end - first > 1 or is_open
            snapshot = copy.deepcopy(self.accounts)
            touched = set(self.touched)
            unit: list[tuple[str, str | None]] = []
            failed = False
            for item in items[first:end]:
                if is_open:
                    unit.append(("rejected", "linked_chain_open"))
                elif failed:
                    unit.append(("rejected", "linked_transfer_failed"))
                else:
                    code = self.refusal(item["debit_account_id"], item["credit_account_id"], item["amount"], None)
                    if code:
                        unit.append(("rejected", code))
                        failed = chain
                    else:
                        self.apply(
                            ModelTransfer(
                                item["debit_account_id"],
                                item["credit_account_id"],
                                item["amount"],
                                None,
                                item["pending"],
                                "",
                            )
                        )
                        unit.append(("created", None))
            if chain and (failed or is_open):
                self.accounts = snapshot
                self.touched = (
                    touched | {i["debit_account_id"] for i in items} | {i["credit_account_id"] for i in items}
                )
                unit = [("rejected", "linked_transfer_failed") if s == "created" else (s, c) for s, c in unit]
            expected.extend(unit)
        response = self.client.post("/v1/transfers/batch", json={"transfers": items})
        assert response.status_code == 200, response.text
        got = [(r["status"], r.get("code")) for r in response.json()["results"]]
        assert got == expected, (items, got, expected)
        for item, (status, code) in zip(items, expected, strict=True):
            state = "rejected" if status == "rejected" else ("pending" if item["pending"] else "posted")
            self.transfers[item["id"]] = ModelTransfer(
                item["debit_account_id"], item["credit_account_id"], item["amount"], None, item["pending"], state, code
            )

    # -- checks ----------------------------------------------------------------------

    def check_account(self, account_id: str) -> None:
        model = self.accounts[account_id]
        stored = self.client.get(f"/v1/accounts/{account_id}").json()
        assert (stored["status"], stored["overdraft_limit"], stored["max_balance"]) == (
            model.status,
            model.overdraft_limit,
            model.max_balance,
        ), account_id
        balance = stored["balance"]
        assert balance == {
            "posted": model.posted,
            "pending_debits": model.pending_debits,
            "pending_credits": model.pending_credits,
            "available": model.available,
        }, account_id

    @invariant()
    def touched_accounts_agree(self) -> None:
        for account_id in sorted(self.touched):
            self.check_account(account_id)
        self.touched.clear()
        for currency in CURRENCIES:
            assert sum(a.posted for a in self.accounts.values() if a.currency == currency) == 0

    def teardown(self) -> None:
        for account_id in self.accounts:
            self.check_account(account_id)
        for transfer_id, model in self.transfers.items():
            stored = self.client.get(f"/v1/transfers/{transfer_id}").json()
            assert (stored["status"], stored["code"]) == (model.status, model.code), transfer_id


def test_the_service_behaves_like_the_model(model_client: TestClient) -> None:
    LedgerMachine.client = model_client
    run_state_machine_as_test(
        LedgerMachine,
        settings=settings(
            max_examples=30,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ),
    )
