"""Pure ledger rules, without I/O: transfer decisions, refusals, the keyed hash chain and
request fingerprints."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ledger.domain import (
    MAX_AMOUNT,
    LockedAccount,
    TransferRequest,
    decide_transfer,
    epoch_microseconds,
)
from ledger.errors import TransferRefused
from ledger.integrity import ChainKey, entry_hash

NOW = datetime(2026, 11, 24, 12, 0, 0, 123456, tzinfo=UTC)
KEY = ChainKey("ktest", b"\x07" * 32)


def account(
    account_id: str,
    *,
    credits: int = 0,
    debits: int = 0,
    negative: bool = False,
    currency: str = "EUR",
    **extra: object,
) -> LockedAccount:
    values = dict(
        id=account_id,
        currency=currency,
        allow_negative_balance=negative,
        debits_posted=debits,
        credits_posted=credits,
        pending_debits=0,
        pending_credits=0,
        entries_count=0,
        last_entry_hash=None,
        last_entry_at=None,
    )
    values.update(extra)
    return LockedAccount(**values)  # type: ignore[arg-type]


def request(**fields: object) -> TransferRequest:
    values: dict[str, object] = dict(id="t1", debit_account_id="a", credit_account_id="b", amount=100)
    values.update(fields)
    return TransferRequest(**values)  # type: ignore[arg-type]


def refusal(req: TransferRequest, accounts: dict[str, LockedAccount]) -> str:
    with pytest.raises(TransferRefused) as caught:
        decide_transfer(req, accounts, NOW, KEY)
    return caught.value.reason


def test_a_transfer_debits_one_account_and_credits_the_other_by_the_same_amount() -> None:
    """The plan moves exactly `amount`: the debit entry is -amount, the credit +amount,
    each balance_after is the new posted balance and sequences advance by one."""
    plan = decide_transfer(
        request(amount=40), {"a": account("a", credits=100, entries_count=3), "b": account("b")}, NOW, KEY
    )
    debit, credit = plan.entries
    assert (debit.account_id, debit.amount, debit.balance_after, debit.sequence) == ("a", -40, 60, 4)
    assert (credit.account_id, credit.amount, credit.balance_after, credit.sequence) == ("b", 40, 40, 1)
    assert plan.accounts[0].debits_posted == 40 and plan.accounts[1].credits_posted == 40
    assert plan.currency == "EUR"


@pytest.mark.parametrize(
    ("req", "accounts", "reason"),
    [
        (request(credit_account_id="a"), {"a": account("a", credits=500)}, "accounts_must_be_different"),
        (request(), {"b": account("b")}, "account_not_found"),
        (request(), {"a": account("a", credits=500)}, "account_not_found"),
        (request(currency="USD"), {"a": account("a", credits=500), "b": account("b")}, "currency_mismatch"),
        (request(), {"a": account("a", credits=500), "b": account("b", currency="USD")}, "currency_mismatch"),
        (request(amount=101), {"a": account("a", credits=100), "b": account("b")}, "insufficient_funds"),
        (
            request(amount=2),
            {"a": account("a", negative=True, debits=MAX_AMOUNT - 1), "b": account("b")},
            "balance_overflow",
        ),
        (
            request(amount=2),
            {"a": account("a", negative=True), "b": account("b", credits=MAX_AMOUNT - 1)},
            "balance_overflow",
        ),
    ],
)
def test_each_refusal_has_its_contract_code(
    req: TransferRequest, accounts: dict[str, LockedAccount], reason: str
) -> None:
    """Every way a transfer can be refused maps to its stable code."""
    assert refusal(req, accounts) == reason


def test_exactly_the_available_balance_may_be_spent_and_not_one_cent_more() -> None:
    """The boundary: spending the whole balance is allowed, one more is refused."""
    accounts = {"a": account("a", credits=100), "b": account("b")}
    assert decide_transfer(request(amount=100), accounts, NOW, KEY).entries[0].balance_after == 0
    assert refusal(request(amount=101), accounts) == "insufficient_funds"


def test_pending_debits_reduce_what_is_available() -> None:
    """Reserved funds are not available to spend."""
    accounts = {"a": account("a", credits=100, pending_debits=30), "b": account("b")}
    assert refusal(request(amount=71), accounts) == "insufficient_funds"
    decide_transfer(request(amount=70), accounts, NOW, KEY)


def test_accounts_that_allow_it_may_go_negative() -> None:
    plan = decide_transfer(request(amount=500), {"a": account("a", negative=True), "b": account("b")}, NOW, KEY)
    assert plan.entries[0].balance_after == -500


def test_entry_time_never_goes_back_behind_the_accounts_last_entry() -> None:
    """If the clock steps back, entries keep the journal's time order (as_of relies on it)."""
    later = NOW + timedelta(seconds=5)
    plan = decide_transfer(
        request(), {"a": account("a", credits=500, last_entry_at=later), "b": account("b")}, NOW, KEY
    )
    assert plan.created_at == later


def test_the_hash_chain_covers_every_field_the_previous_hash_and_the_key() -> None:
    """Changing any hashed field, the previous hash, or the key (its secret or its id)
    changes the entry's hash: without the key nobody can compute a valid link."""
    base = dict(
        key=KEY,
        previous_hash=b"\x01" * 32,
        account_id="a",
        sequence=2,
        transfer_id="t",
        amount=-5,
        balance_after=10,
        created_at=NOW,
    )
    reference = entry_hash(**base)  # type: ignore[arg-type]
    assert len(reference) == 32 and entry_hash(**base) == reference  # type: ignore[arg-type]
    changes = {
        "key": ChainKey("ktest", b"\x08" * 32),
        "previous_hash": b"\x02" * 32,
        "account_id": "b",
        "sequence": 3,
        "transfer_id": "u",
        "amount": -6,
        "balance_after": 11,
        "created_at": NOW + timedelta(microseconds=1),
    }
    for field, value in changes.items():
        assert entry_hash(**{**base, field: value}) != reference, field  # type: ignore[arg-type]
    assert entry_hash(**{**base, "key": ChainKey("kother", KEY.secret)}) != reference  # type: ignore[arg-type]


def test_the_canonical_forms_are_the_documented_ones() -> None:
    """An auditor holding the key recomputes a hash from the README's description with
    hmac alone; entries of earlier versions keep their plain SHA-256 form."""
    import hashlib
    import hmac

    micros = str(epoch_microseconds(NOW)).encode()
    keyed = hmac.new(KEY.secret, b"ledger-entry-v2|ktest|a|1|t|5|5|" + micros + b"|", hashlib.sha256).digest()
    assert entry_hash(KEY, None, "a", 1, "t", 5, 5, NOW) == keyed
    legacy = hashlib.sha256(b"ledger-entry-v1|a|1|t|5|5|" + micros + b"|").digest()
    assert entry_hash(None, None, "a", 1, "t", 5, 5, NOW) == legacy
    assert epoch_microseconds(datetime(1970, 1, 1, 0, 0, 1, 5, tzinfo=UTC)) == 1_000_005


def test_fingerprints_match_for_the_same_request_only() -> None:
    """Defaults and metadata key order do not matter; any field that differs does."""
    same = request(metadata={"x": "1", "y": "2"}).fingerprint()
    assert request(metadata={"y": "2", "x": "1"}, pending=False).fingerprint() == same
    for change in (
        {"amount": 101},
        {"currency": "EUR"},
        {"description": "d"},
        {"metadata": {"x": "1"}},
        {"credit_account_id": "c"},
    ):
        assert request(**{"metadata": {"x": "1", "y": "2"}, **change}).fingerprint() != same, change
