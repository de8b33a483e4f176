"""What a user sees of refusals, problems and statements: a refusal's currency, the
account an account_not_found names (stable on every replay, sealed), a specific title
for every problem code, and a statement's download headers."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any
from urllib.parse import unquote

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger import errors
from ledger.domain import MAX_AMOUNT
from ledger.http.problems import HTTP_CODES
from ledger.integrity import seal, transfer_message
from ledger.service.records import TransferRecord
from ledger.service.transfers import fetch_transfer
from tests import provision
from tests.integration.helpers import assert_problem, lenient_decision, open_account, transfer


async def refused_twice(
    client: AsyncTestClient, status: int, code: str, transfer_id: str, *args: Any, **fields: Any
) -> dict:
    """Refuse a transfer, then repeat it: the replay's body is byte for byte the first."""
    first = await transfer(client, transfer_id, *args, **fields)
    problem = assert_problem(first, status, code)
    again = await transfer(client, transfer_id, *args, **fields)
    assert again.headers["idempotent-replayed"] == "true"
    assert (again.status_code, again.content) == (first.status_code, first.content)
    return problem


async def stored_currency(client: AsyncTestClient, transfer_id: str) -> str | None:
    stored = (await client.get(f"/v1/transfers/{transfer_id}")).json()
    assert stored["status"] == "rejected", stored
    return stored["currency"]


async def verified(client: AsyncTestClient, account_id: str) -> dict:
    response = await client.post("/v1/audit/verify", json={"account_id": account_id})
    assert response.status_code == 200, response.text
    return response.json()


# -- 1. the currency of a refusal ----------------------------------------------------------


async def test_a_refusal_between_accounts_of_one_currency_is_recorded_in_it(client: AsyncTestClient, uid: str) -> None:
    """insufficient_funds, accounts_must_be_different, balance_overflow and account_not_found
    with the debit account found: the refusal is in the accounts' currency, as stored and
    on replay, and its row verifies. Unknown or ambiguous stays null (no debit account;
    accounts in two currencies without a requested one); a requested currency is kept."""
    poor, bank, dollars = f"poor-{uid}", f"bank-{uid}", f"usd-{uid}"
    await open_account(client, poor)
    await open_account(client, bank, negative=True)
    await open_account(client, dollars, currency="USD")
    await open_account(client, f"full-{uid}", negative=True)
    await open_account(client, f"sink-{uid}")
    assert (await transfer(client, f"max-{uid}", f"full-{uid}", f"sink-{uid}", MAX_AMOUNT)).status_code == 201

    expected = {
        f"if-{uid}": (422, "insufficient_funds", (poor, bank, 10), {}, "EUR"),
        f"same-{uid}": (422, "accounts_must_be_different", (poor, poor, 1), {}, "EUR"),
        f"ovf-{uid}": (422, "balance_overflow", (f"full-{uid}", f"sink-{uid}", 1), {}, "EUR"),
        f"nf-credit-{uid}": (404, "account_not_found", (poor, f"ghost-{uid}", 1), {}, "EUR"),
        f"nf-debit-{uid}": (404, "account_not_found", (f"ghost-{uid}", poor, 1), {}, None),
        f"nf-both-{uid}": (404, "account_not_found", (f"ghost-{uid}", f"ghost2-{uid}", 1), {}, None),
        f"fx-{uid}": (422, "currency_mismatch", (bank, dollars, 1), {}, None),
        f"fx-usd-{uid}": (422, "currency_mismatch", (bank, poor, 1), {"currency": "USD"}, "USD"),
        f"same-usd-{uid}": (422, "accounts_must_be_different", (poor, poor, 1), {"currency": "USD"}, "USD"),
    }
    for transfer_id, (status, code, args, fields, currency) in expected.items():
        await refused_twice(client, status, code, transfer_id, *args, **fields)
        assert await stored_currency(client, transfer_id) == currency, transfer_id
    for account_id in (poor, bank, f"full-{uid}"):
        report = await verified(client, account_id)
        assert report["ok"], report["problems"]


async def test_a_failed_linked_chain_records_its_items_in_their_currency(client: AsyncTestClient, uid: str) -> None:
    """A chain whose second item is refused: both items are recorded in EUR, the one that
    would have succeeded (linked_transfer_failed) as well as the refused one."""
    bank, alice = f"bank-{uid}", f"alice-{uid}"
    await open_account(client, bank, negative=True)
    await open_account(client, alice)
    items = [
        {"id": f"leg1-{uid}", "debit_account_id": bank, "credit_account_id": alice, "amount": 5, "linked": True},
        {"id": f"leg2-{uid}", "debit_account_id": alice, "credit_account_id": bank, "amount": 50},
        {"id": f"open-{uid}", "debit_account_id": bank, "credit_account_id": alice, "amount": 1, "linked": True},
    ]
    response = await client.post("/v1/transfers/batch", json={"transfers": items})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["code"] for r in results] == ["linked_transfer_failed", "insufficient_funds", "linked_chain_open"]
    assert [r["transfer"]["currency"] for r in results] == ["EUR"] * 3
    for item in items:
        assert await stored_currency(client, item["id"]) == "EUR"
    assert (await verified(client, alice))["ok"]


async def test_a_refusal_the_database_made_is_recorded_in_the_accounts_currency(
    client: AsyncTestClient, monkeypatch: pytest.MonkeyPatch, uid: str
) -> None:
    """The path where a CHECK refused what a (simulated) wrong decision allowed: the
    recorded insufficient_funds carries the accounts' currency too, and verifies."""
    await open_account(client, f"bank-{uid}", currency="USD", negative=True)
    await open_account(client, f"poor-{uid}", currency="USD")
    lenient_decision(monkeypatch)
    await refused_twice(client, 422, "insufficient_funds", f"over-{uid}", f"poor-{uid}", f"bank-{uid}", 50)
    monkeypatch.undo()
    assert await stored_currency(client, f"over-{uid}") == "USD"
    assert (await verified(client, f"poor-{uid}"))["ok"]


# -- 2. account_not_found names the missing account -----------------------------------------


async def test_account_not_found_names_the_missing_accounts_on_every_replay(client: AsyncTestClient, uid: str) -> None:
    """The detail names the account that did not exist (or both), on the first answer and
    on every replay, even after that account is created; an item refused in a batch is
    answered the same when its id is repeated as a single transfer."""
    real, nope, other = f"a:1-{uid}", f"zz:nope-{uid}", f"zz:other-{uid}"
    await open_account(client, real, negative=True)
    cases = {
        f"credit-{uid}": ((real, nope, 1), f"account {nope!r} does not exist"),
        f"debit-{uid}": ((nope, real, 1), f"account {nope!r} does not exist"),
        f"both-{uid}": ((nope, other, 1), f"accounts {nope!r} and {other!r} do not exist"),
    }
    first = {}
    for transfer_id, (args, detail) in cases.items():
        problem = await refused_twice(client, 404, "account_not_found", transfer_id, *args)
        assert problem["detail"] == detail
        first[transfer_id] = (await transfer(client, transfer_id, *args)).content

    batch = [{"id": f"item-{uid}", "debit_account_id": real, "credit_account_id": nope, "amount": 2}]
    assert (await client.post("/v1/transfers/batch", json={"transfers": batch})).json()["results"][0]["code"] == (
        "account_not_found"
    )
    from_batch = await transfer(client, f"item-{uid}", real, nope, 2)
    assert assert_problem(from_batch, 404, "account_not_found")["detail"] == f"account {nope!r} does not exist"

    await open_account(client, nope)  # the cause is gone; the outcome, and its words, stay
    for transfer_id, (args, _) in cases.items():
        again = await transfer(client, transfer_id, *args)
        assert again.content == first[transfer_id]


async def test_the_missing_account_is_sealed_and_old_refusals_keep_their_wording(
    client: AsyncTestClient, engine: AsyncEngine, uid: str
) -> None:
    """Changing or clearing `missing_account` behind the service's back breaks the row's
    seal (verification reports transfer_seal_mismatch). A refusal recorded before the
    column existed (no value, sealed without it) verifies and keeps the old wording."""
    real, nope = f"real-{uid}", f"nope-{uid}"
    await open_account(client, real, negative=True)
    transfer_id = f"nf-{uid}"
    await refused_twice(client, 404, "account_not_found", transfer_id, real, nope, 1)

    async def owner(statement: str, **params: object) -> None:
        async with engine.begin() as connection:
            await connection.execute(text(statement), {"id": transfer_id, **params})

    async def seal_problems() -> set[tuple[str, str | None]]:
        report = await verified(client, real)
        return {(p["code"], p["transfer_id"]) for p in report["problems"]}

    try:
        for forged in ("debit", "both", None):
            await owner("UPDATE transfers SET missing_account = :m WHERE id = :id", m=forged)
            assert ("transfer_seal_mismatch", transfer_id) in await seal_problems(), forged
        await owner("UPDATE transfers SET missing_account = 'credit' WHERE id = :id")
        assert await seal_problems() == set()

        # A row as revision 0005 wrote it: no missing_account, sealed without it.
        async with engine.connect() as connection:
            stored = await fetch_transfer(connection, transfer_id)  # type: ignore[arg-type]
        assert stored is not None and stored.missing_account == "credit"
        legacy: TransferRecord = replace(stored, missing_account=None)
        key = provision.KEYRING.active
        await owner(
            "UPDATE transfers SET missing_account = NULL, seal = :seal, seal_key = :key WHERE id = :id",
            seal=seal(key, transfer_message(key.id, legacy)),
            key=key.id,
        )
        assert await seal_problems() == set()
        old = assert_problem(await transfer(client, transfer_id, real, nope, 1), 404, "account_not_found")
        assert old["detail"] == f"the debit account {real!r} or the credit account {nope!r} does not exist"
    finally:
        # Leave the shared database verifying, whatever happened above.
        await owner("UPDATE transfers SET missing_account = 'credit' WHERE id = :id")
        async with engine.connect() as connection:
            restored = await fetch_transfer(connection, transfer_id)  # type: ignore[arg-type]
        assert restored is not None
        key = provision.KEYRING.active
        await owner(
            "UPDATE transfers SET seal = :seal, seal_key = :key WHERE id = :id",
            seal=seal(key, transfer_message(key.id, restored)),
            key=key.id,
        )
    assert (await verified(client, real))["ok"]


# -- 3. a specific title for every problem code ----------------------------------------------


def emitted_titles() -> dict[str, set[str]]:
    """Every code the service can answer with, and the titles it comes with: the error
    classes, the refusal tables (as instances carry them) and the framework's codes."""
    titles: dict[str, set[str]] = {}
    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, errors.LedgerError) and cls.code != errors.LedgerError.code:
            titles.setdefault(cls.code, set()).add(cls.title)
    for reason in errors.TransferRefused.REASONS:
        titles.setdefault(reason, set()).add(errors.TransferRefused(reason, "").title)
    for reason in errors.DecisionRefused.STATUSES:
        titles.setdefault(reason, set()).add(errors.DecisionRefused(reason, "").title)
    for code, title in HTTP_CODES.values():
        titles.setdefault(code, set()).add(title)
    return titles


def test_every_code_has_a_title_of_its_own() -> None:
    """No code falls back to the base class's "Ledger error", and no two codes share a
    title (a title says which problem it is, as the code does)."""
    titles = emitted_titles()
    assert set(errors.DecisionRefused.STATUSES) | set(errors.TransferRefused.REASONS) <= set(titles)
    generic = {code: found for code, found in titles.items() if errors.LedgerError.title in found or "" in found}
    assert generic == {}
    codes_by_title: dict[str, set[str]] = {}
    for code, found in titles.items():
        for title in found:
            codes_by_title.setdefault(title, set()).add(code)
    assert {title: codes for title, codes in codes_by_title.items() if len(codes) > 1} == {}


async def test_a_refused_decision_is_answered_with_its_title(client: AsyncTestClient, uid: str) -> None:
    await open_account(client, f"bank-{uid}", negative=True)
    await open_account(client, f"shop-{uid}")
    assert (await transfer(client, f"hold-{uid}", f"bank-{uid}", f"shop-{uid}", 5, pending=True)).status_code == 201
    assert (await client.post(f"/v1/transfers/hold-{uid}/void", json={})).status_code == 200
    problem = assert_problem(
        await client.post(f"/v1/transfers/hold-{uid}/post", json={}), 409, "pending_transfer_already_voided"
    )
    assert problem["title"] == errors.DecisionRefused("pending_transfer_already_voided", "").title
    assert problem["title"] != errors.LedgerError.title


# -- 4. the statement's download headers -----------------------------------------------------


async def test_a_statement_downloads_with_a_safe_file_name_and_one_charset(client: AsyncTestClient, uid: str) -> None:
    """`text/csv; charset=utf-8` once; `filename` holds only [A-Za-z0-9._-] (no `:`, which
    Windows refuses), and `filename*` (RFC 6266) the exact account id."""
    account_id = f"a:1.{uid}"
    await open_account(client, f"bank-{uid}", negative=True)
    await open_account(client, account_id)
    assert (await transfer(client, f"t-{uid}", f"bank-{uid}", account_id, 7)).status_code == 201
    response = await client.get(f"/v1/accounts/{account_id}/entries", headers={"Accept": "text/csv"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    disposition = response.headers["content-disposition"]
    match = re.fullmatch(r"attachment; filename=\"([^\"]*)\"; filename\*=UTF-8''(\S+)", disposition)
    assert match is not None, disposition
    assert match.group(1) == f"a_1.{uid}-statement.csv"
    assert re.fullmatch(r"[A-Za-z0-9._-]+", match.group(1))
    assert unquote(match.group(2)) == f"{account_id}-statement.csv"
    assert ":" not in match.group(2)
    assert response.text.splitlines()[1].startswith(f"{account_id},1,t-{uid},7,")
