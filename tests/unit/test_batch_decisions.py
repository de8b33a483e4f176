"""Batch decisions in memory: items in order, linked chains all-or-nothing, replays
inside and across batches."""

from __future__ import annotations

from ledger.domain import BatchItem, chains, decide_batch
from tests.unit.test_domain import KEY, NOW, account, request


def item(transfer_id: str, debit: str, credit: str, amount: int, linked: bool = False) -> BatchItem:
    return BatchItem(request(id=transfer_id, debit_account_id=debit, credit_account_id=credit, amount=amount), linked)


def outcome(decisions: list) -> list[tuple[str, str | None]]:
    return [(d.status, d.code) for d in decisions]


def test_units_are_single_items_or_chains_closed_by_an_unlinked_item() -> None:
    flags = [False, True, True, False, True, False, True]
    items = [item(str(i), "a", "b", 1, linked) for i, linked in enumerate(flags)]
    assert chains(items) == [(0, 1, False), (1, 4, False), (4, 6, False), (6, 7, True)]


def test_unlinked_items_succeed_or_fail_alone_against_the_evolving_balances() -> None:
    """The second spend sees the first one's effect; its refusal does not undo it."""
    accounts = {"a": account("a", credits=100), "b": account("b")}
    decisions = decide_batch(
        [item("1", "a", "b", 70), item("2", "a", "b", 70), item("3", "a", "b", 30)], {}, accounts, NOW, KEY
    )
    assert outcome(decisions) == [("created", None), ("rejected", "insufficient_funds"), ("created", None)]
    assert accounts["a"].posted == 0 and accounts["b"].posted == 100
    assert [d.plan.entries[1].sequence for d in decisions if d.plan] == [1, 2]


def test_a_failed_chain_is_undone_whole_and_its_other_items_say_why() -> None:
    accounts = {"a": account("a", credits=100), "b": account("b"), "c": account("c")}
    before = dict(accounts)
    items = [item("1", "a", "b", 60, linked=True), item("2", "b", "c", 60, linked=True), item("3", "a", "c", 60)]
    assert outcome(decide_batch(items, {}, accounts, NOW, KEY)) == [
        ("rejected", "linked_transfer_failed"),
        ("rejected", "linked_transfer_failed"),
        ("rejected", "insufficient_funds"),
    ]
    assert accounts == before
    assert all(d.recorded for d in decide_batch(items, {}, dict(before), NOW, KEY))


def test_items_after_the_failure_in_a_chain_are_not_applied() -> None:
    accounts = {"a": account("a", credits=10), "b": account("b")}
    items = [item("1", "a", "b", 50, linked=True), item("2", "a", "b", 5)]
    assert outcome(decide_batch(items, {}, accounts, NOW, KEY)) == [
        ("rejected", "insufficient_funds"),
        ("rejected", "linked_transfer_failed"),
    ]
    assert accounts["a"].posted == 10


def test_a_chain_left_open_applies_nothing() -> None:
    accounts = {"a": account("a", credits=100), "b": account("b")}
    items = [item("1", "a", "b", 5), item("2", "a", "b", 5, linked=True), item("3", "a", "b", 5, linked=True)]
    assert outcome(decide_batch(items, {}, accounts, NOW, KEY)) == [
        ("created", None),
        ("rejected", "linked_chain_open"),
        ("rejected", "linked_chain_open"),
    ]
    assert accounts["a"].posted == 95


def test_replays_and_conflicts_inside_and_across_batches() -> None:
    """A stored id with the same fields is replayed, with other fields it is a conflict
    that is not recorded; a repeated id later in the same batch replays the first."""
    first = item("old", "a", "b", 5)
    existing = {"old": (first.request.fingerprint(), True)}
    accounts = {"a": account("a", credits=100), "b": account("b")}
    items = [first, item("old", "a", "b", 6), item("new", "a", "b", 7), item("new", "a", "b", 7)]
    decisions = decide_batch(items, existing, accounts, NOW, KEY)
    assert outcome(decisions) == [
        ("replayed", None),
        ("rejected", "transfer_exists_with_different_fields"),
        ("created", None),
        ("replayed", None),
    ]
    assert not decisions[1].recorded
    assert accounts["b"].posted == 7


def test_a_replayed_refusal_fails_its_chain() -> None:
    refused = item("r", "a", "b", 500, linked=True)
    existing = {"r": (refused.request.fingerprint(), False)}
    accounts = {"a": account("a", credits=100), "b": account("b")}
    decisions = decide_batch([refused, item("n", "a", "b", 5)], existing, accounts, NOW, KEY)
    assert outcome(decisions) == [("replayed", None), ("rejected", "linked_transfer_failed")]
    assert accounts["a"].posted == 100
