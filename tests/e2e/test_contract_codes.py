"""Over a real server process: every code of the contract's batch, two-phase and
reversal sections that the concurrency tests do not already reach."""

from __future__ import annotations

import httpx

from tests import provision


def leg(transfer_id: str, debit: str, credit: str, amount: int, **extra: object) -> dict:
    return {"id": transfer_id, "debit_account_id": debit, "credit_account_id": credit, "amount": amount, **extra}


async def test_batch_two_phase_and_reversal_codes_end_to_end(server_url: str, uid: str) -> None:
    bank, alice, shop = f"bank-{uid}", f"alice-{uid}", f"shop-{uid}"
    async with httpx.AsyncClient(base_url=server_url, headers=provision.API_HEADERS, timeout=30) as client:
        await client.post("/v1/accounts", json={"id": bank, "currency": "EUR", "allow_negative_balance": True})
        for account_id in (alice, shop):
            await client.post("/v1/accounts", json={"id": account_id, "currency": "EUR"})
        assert (await client.post("/v1/transfers", json=leg(f"fund-{uid}", bank, alice, 100))).status_code == 201

        results = (
            await client.post(
                "/v1/transfers/batch",
                json={"transfers": [
                    leg(f"a-{uid}", alice, shop, 80, linked=True), leg(f"b-{uid}", alice, shop, 80),
                    leg(f"c-{uid}", alice, shop, 1, linked=True),
                ]},
            )
        ).json()["results"]  # fmt: skip
        assert [r.get("code") for r in results] == ["linked_transfer_failed", "insufficient_funds", "linked_chain_open"]
        too_large = await client.post(
            "/v1/transfers/batch", json={"transfers": [leg(f"x-{uid}", alice, shop, 1)] * 1001}
        )
        assert (too_large.status_code, too_large.json()["code"]) == (413, "batch_too_large")

        assert (
            await client.post("/v1/transfers", json=leg(f"hold-{uid}", alice, shop, 50, pending=True))
        ).status_code == 201
        over = await client.post(f"/v1/transfers/hold-{uid}/post", json={"amount": 51})
        assert (over.status_code, over.json()["code"]) == (422, "exceeds_pending_amount")
        not_pending = await client.post(f"/v1/transfers/fund-{uid}/void", json={})
        assert (not_pending.status_code, not_pending.json()["code"]) == (409, "transfer_not_pending")
        assert (await client.post(f"/v1/transfers/hold-{uid}/post", json={})).json()["posted_amount"] == 50

        refund = await client.post(f"/v1/transfers/hold-{uid}/reverse", json={"id": f"refund-{uid}", "amount": 20})
        assert refund.status_code == 201 and refund.json()["reversal_of"] == f"hold-{uid}"
        excess = await client.post(f"/v1/transfers/hold-{uid}/reverse", json={"id": f"refund2-{uid}", "amount": 31})
        assert (excess.status_code, excess.json()["code"]) == (422, "exceeds_reversible_amount")
        alice_balance = (await client.get(f"/v1/accounts/{alice}")).json()["balance"]
        assert alice_balance == {"posted": 70, "pending_debits": 0, "pending_credits": 0, "available": 70}
