"""What the OpenAPI document says about each operation, by `operation_id`: a summary, a
description (what it does, idempotency, the main problem codes) and examples of the main
bodies. `ledger.http.openapi` puts them into the document at start-up and adds who may
call each operation from the roles its route requires, so that line cannot drift from
the code.

A new endpoint needs an entry here (`tests/e2e/test_docs.py` fails without one), and its
examples must be valid against its schemas (the same test checks them; schemathesis also
sends the request examples to a real server).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class OperationDoc:
    summary: str
    description: str
    # Example name -> request body.
    requests: dict[str, Any] = field(default_factory=dict)
    # Status -> example name -> response body.
    responses: dict[int, dict[str, Any]] = field(default_factory=dict)


API_DESCRIPTION = """\
A double-entry ledger: accounts, idempotent transfers, an append-only journal.

**Authentication.** Every `/v1` operation needs an API key, sent as `Authorization: Bearer <key>`.
The first start of `ledger serve` writes an admin key to `.ledger/admin.key` (the directory is
`LEDGER_DATA_DIR`); make more with `ledger keys create --role admin|poster|auditor` on the server, or
`POST /v1/keys` with an admin key. On this page: **Authorize**, paste the key (without `Bearer`), then
**Try it out** on any operation. The key stays in this browser tab.

Health, metrics and these docs need no key.

**Errors** are RFC 9457 problem details (`application/problem+json`) whose `code` is a stable reason.
**Money** is an integer count of minor units. **Retries** with the same `id` are always safe.
**Events**: `GET /v1/events` is a gap-free feed of every change; webhooks deliver it signed.
"""

CREATED_AT = "2026-11-24T21:59:03.123456Z"
UPDATED_AT = "2026-11-24T21:59:03.123456Z"


def _account(**changes: Any) -> dict[str, Any]:
    return {
        "id": "acc_alice",
        "currency": "EUR",
        "name": "Alice",
        "allow_negative_balance": False,
        "metadata": {"customer": "c-1042"},
        "created_at": CREATED_AT,
        "balance": {"posted": 0, "pending_debits": 0, "pending_credits": 0, "available": 0},
        "entries_count": 0,
        "status": "open",
        "overdraft_limit": None,
        "max_balance": None,
        **changes,
    }


def _transfer(**changes: Any) -> dict[str, Any]:
    return {
        "id": "tr_0001",
        "debit_account_id": "acc_alice",
        "credit_account_id": "acc_bob",
        "amount": 1250,
        "currency": "EUR",
        "status": "posted",
        "code": None,
        "pending": False,
        "posted_amount": None,
        "expires_at": None,
        "reversal_of": None,
        "description": "Invoice 2026-0042",
        "metadata": {},
        "created_at": CREATED_AT,
        "updated_at": UPDATED_AT,
        "imported_at": None,
        **changes,
    }


def _problem(status: int, code: str, title: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": f"urn:ledger:problem:{code}",
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
        **extra,
    }


PENDING = _transfer(
    id="tr_hold_7",
    amount=5000,
    status="pending",
    pending=True,
    expires_at="2026-11-24T22:59:03.123456Z",
    description="Card authorisation",
)
PAGINATION = (
    "Keyset-paginated: `limit` (1 to 1000, default 100) and `cursor`, the `next_cursor` of the previous page "
    "(`null` on the last page). A cursor the service did not issue is 400 `invalid_cursor`."
)
REPLAY = (
    "**Idempotent** by `id`: the same request again returns the stored outcome, with its original status "
    "and body, and the header `Idempotent-Replayed: true`; the same `id` with other fields is 409"
)

REPLICA = (
    "With a replica configured (`LEDGER_REPLICA_DATABASE_URL`), served by it once it has replayed every write "
    "acknowledged before the request, else by the primary (the same answer either way); the response then carries "
    "`Ledger-Read-Source: replica|primary` and `Ledger-Replica-Lag-Ms` (README, Scaling out)."
)

OPERATIONS: dict[str, OperationDoc] = {
    # -- accounts -------------------------------------------------------------------------
    "createAccount": OperationDoc(
        summary="Open an account",
        description=(
            "Opens an account in one currency. Without `id` the service picks one.\n\n"
            f"{REPLAY} `account_exists_with_different_fields`.\n\n"
            "Only an admin key may open an account with `allow_negative_balance: true` (money enters the ledger "
            "from such accounts); a poster gets 403 `forbidden`.\n\n"
            "Problems: 400 `validation_error` (unknown field, bad currency or id), 403 `forbidden`, "
            "409 `account_exists_with_different_fields`, 503 `unavailable` (retry with the same `id`)."
        ),
        requests={
            "customer": {"id": "acc_alice", "currency": "EUR", "name": "Alice", "metadata": {"customer": "c-1042"}},
            "settlement (admin only)": {
                "id": "acc_bank_settlement",
                "currency": "EUR",
                "name": "Settlement",
                "allow_negative_balance": True,
            },
        },
        responses={
            201: {"opened": _account()},
            200: {"replayed": _account()},
            409: {
                "other fields": _problem(
                    409,
                    "account_exists_with_different_fields",
                    "An account with this id exists with different fields",
                    "account acc_alice exists with currency EUR",
                )
            },
        },
    ),
    "listAccounts": OperationDoc(
        summary="List accounts",
        description=(
            "Accounts ordered by id, optionally of one `currency`, and with `metadata[KEY]=VALUE` only those whose "
            f"metadata holds every pair (`metadata[tier]=gold&metadata[region]=eu`). {PAGINATION}\n\n{REPLICA}"
        ),
        responses={200: {"a page": {"data": [_account()], "next_cursor": None}}},
    ),
    "updateAccount": OperationDoc(
        summary="Change an account's status, limits, name or metadata",
        description=(
            "Admin only. Only the fields sent change: `status` (`open`, `frozen`, `closed`), `overdraft_limit` and "
            "`max_balance` (`null` removes the limit), `name` (`null` clears it), `metadata` (replaced whole). The "
            "change is made under the account's lock, so every transfer is decided wholly before or wholly after "
            "it, and is kept in the account's history (`GET /v1/accounts/{id}/changes`) and the event feed "
            "(`account.changed`). Sending the values the account already has changes nothing (a retry is safe).\n\n"
            "A frozen account neither sends nor receives (transfers touching it are refused with 422 "
            "`account_frozen`, recorded); reservations made before the freeze may still be posted or voided. "
            "Closing needs `posted == 0` and no reservation, and is final.\n\n"
            "Problems: 400 `validation_error`, 404 `account_not_found`, 409 `account_not_empty` (closing an account "
            "that holds money or reservations), 409 `account_closed` (any change of a closed account), 409 "
            "`balance_outside_limits` (a limit the present balance already breaks)."
        ),
        requests={
            "freeze": {"status": "frozen"},
            "credit line": {"overdraft_limit": 50000},
            "cap and rename": {"max_balance": 100000, "name": "Alice (wallet)"},
            "close": {"status": "closed"},
        },
        responses={
            200: {"frozen": _account(status="frozen")},
            409: {
                "not empty": _problem(
                    409,
                    "account_not_empty",
                    "The account still holds money or reservations",
                    "account 'acc_alice' holds 1250 posted, 0 pending debits and 0 pending credits: it can be "
                    "closed only when all are 0",
                )
            },
        },
    ),
    "listAccountChanges": OperationDoc(
        summary="List an account's changes",
        description=(
            "Every change of the account's status, limits, name or metadata, oldest first: `sequence` (1, 2, 3...), "
            "`changed_at`, `changed_by` (the id of the API key that made it, or `LEDGER_ADMIN_KEY`), `fields`, "
            "their values `before` and `after`, and `hash`, the change's link in the account's keyed hash chain of "
            f"changes, which `POST /v1/audit/verify` checks. {PAGINATION}\n\nProblems: 404 `account_not_found`."
        ),
        responses={
            200: {
                "a freeze": {
                    "data": [
                        {
                            "account_id": "acc_alice",
                            "sequence": 1,
                            "changed_at": UPDATED_AT,
                            "changed_by": "key_3f9a1c",
                            "fields": ["status"],
                            "before": {"status": "open"},
                            "after": {"status": "frozen"},
                            "hash": "9c1f" * 16,
                        }
                    ],
                    "next_cursor": None,
                }
            }
        },
    ),
    "getAccount": OperationDoc(
        summary="Get an account",
        description=(
            "One account with its balances (`posted`, `pending_debits`, `pending_credits`, `available = posted - "
            "pending_debits`) and the length of its journal.\n\nProblems: 404 `account_not_found`."
        ),
        responses={
            200: {
                "with a balance": _account(
                    balance={"posted": 8750, "pending_debits": 5000, "pending_credits": 0, "available": 3750},
                    entries_count=3,
                )
            }
        },
    ),
    "listAccountEntries": OperationDoc(
        summary="List an account's journal entries",
        description=(
            "The account's journal, oldest first: `sequence` counts 1, 2, 3... with no gaps; `amount` is signed "
            "(credit +, debit -) and `balance_after` is the posted balance; `hash` chains each entry to the "
            "previous one. `from` and `to` (RFC 3339, inclusive) bound the time.\n\n"
            f"{PAGINATION}\n\n"
            "With `Accept: text/csv` the whole statement (every page, within `from`/`to`) streams as CSV, up to "
            "the last entry when the export started.\n\nProblems: 404 `account_not_found`."
            f"\n\n{REPLICA}"
        ),
    ),
    "getAccountBalance": OperationDoc(
        summary="Get an account's balance at a moment",
        description=(
            "The posted balance after the last entry at or before `as_of` (RFC 3339; default now), with that "
            "entry's `sequence` (0 before the first).\n\nProblems: 400 `validation_error` (bad `as_of`), "
            "404 `account_not_found`."
            f"\n\nWith `as_of`: {REPLICA[0].lower()}{REPLICA[1:]} Without it the primary answers, with no such header."
        ),
    ),
    # -- transfers ------------------------------------------------------------------------
    "createTransfer": OperationDoc(
        summary="Create a transfer",
        description=(
            "Moves `amount` (minor units, an integer) from `debit_account_id` to `credit_account_id`. "
            "With `pending: true` it only reserves the amount (`timeout_seconds`: it expires and is released "
            "on its own); post or void it later.\n\n"
            f"{REPLAY} `transfer_exists_with_different_fields`. A transfer id has exactly one outcome: refusals "
            "are recorded under the id and replayed like successes, and no number of retries or racing copies "
            "moves money twice. After a 503 or a lost connection, retry with the same `id`.\n\n"
            "Problems: 400 `validation_error`, 404 `account_not_found`, 409 "
            "`transfer_exists_with_different_fields`, 422 `insufficient_funds`, `currency_mismatch`, "
            "`accounts_must_be_different`, 503 `unavailable`, `lock_timeout` or `overloaded` (see `Retry-After`)."
        ),
        requests={
            "payment": {
                "id": "tr_0001",
                "debit_account_id": "acc_alice",
                "credit_account_id": "acc_bob",
                "amount": 1250,
                "currency": "EUR",
                "description": "Invoice 2026-0042",
            },
            "reservation (pending)": {
                "id": "tr_hold_7",
                "debit_account_id": "acc_alice",
                "credit_account_id": "acc_merchant",
                "amount": 5000,
                "pending": True,
                "timeout_seconds": 3600,
                "description": "Card authorisation",
            },
        },
        responses={
            201: {"posted": _transfer(), "pending": PENDING},
            200: {"replayed": _transfer()},
            422: {
                "insufficient funds": _problem(
                    422,
                    "insufficient_funds",
                    "Insufficient funds",
                    "account acc_alice has 300 available, the transfer needs 1250",
                    transfer_id="tr_0001",
                )
            },
        },
    ),
    "createTransferBatch": OperationDoc(
        summary="Create up to 1000 transfers at once",
        description=(
            "Applies 1 to 1000 transfers in order, with one result per item (`created`, `replayed` or "
            "`rejected` with its `code`). Each item keeps the guarantees of a single transfer: its own `id`, "
            "its own recorded outcome, replays. `linked: true` ties an item to the next: a chain of linked items "
            "succeeds or fails as a whole (multi-leg transactions); in a failed chain the failing item carries "
            "its own code and the others `linked_transfer_failed`, and a chain the last item leaves open fails "
            "with `linked_chain_open`.\n\n"
            "Refusals of items are in the results (the answer is still 200). Problems: 400 `validation_error` "
            "(the whole batch is refused), 413 `batch_too_large`, 503 (retry the same batch: applied items "
            "replay)."
        ),
        requests={
            "a linked chain": {
                "transfers": [
                    {
                        "id": "tr_order_88:pay",
                        "debit_account_id": "acc_alice",
                        "credit_account_id": "acc_merchant",
                        "amount": 2000,
                        "linked": True,
                    },
                    {
                        "id": "tr_order_88:fee",
                        "debit_account_id": "acc_merchant",
                        "credit_account_id": "acc_fees",
                        "amount": 60,
                    },
                ]
            }
        },
        responses={
            200: {
                "both created": {
                    "results": [
                        {
                            "index": 0,
                            "id": "tr_order_88:pay",
                            "status": "created",
                            "transfer": _transfer(
                                id="tr_order_88:pay", credit_account_id="acc_merchant", amount=2000, description=None
                            ),
                        },
                        {
                            "index": 1,
                            "id": "tr_order_88:fee",
                            "status": "created",
                            "transfer": _transfer(
                                id="tr_order_88:fee",
                                debit_account_id="acc_merchant",
                                credit_account_id="acc_fees",
                                amount=60,
                                description=None,
                            ),
                        },
                    ]
                }
            }
        },
    ),
    "listTransfers": OperationDoc(
        summary="List transfers",
        description=(
            "Transfers oldest first, rejected ones included; filter by `account_id` (debited or credited), "
            f"`status`, time (`from`, `to`, inclusive) and metadata (`metadata[KEY]=VALUE`, every pair must "
            f"match). {PAGINATION}"
            f"\n\n{REPLICA}"
        ),
    ),
    "getTransfer": OperationDoc(
        summary="Get a transfer",
        description=(
            "A transfer in its current state: `posted`, `pending`, `voided`, `expired` or `rejected` (then "
            "`code` says why).\n\nProblems: 404 `transfer_not_found`."
        ),
        responses={200: {"posted": _transfer(), "pending": PENDING}},
    ),
    "postPendingTransfer": OperationDoc(
        summary="Post a pending transfer",
        description=(
            "Posts a pending transfer: all of it, or `amount` of it (the rest is released). The body is `{}` "
            "(or `null`) for the full amount, sent as `application/json`.\n\n"
            "**Idempotent**: repeating the same post returns the same 200. A different second decision is a "
            "409.\n\nProblems: 404 `transfer_not_found`, 409 `pending_transfer_already_posted`, "
            "`pending_transfer_already_voided`, `pending_transfer_expired`, `transfer_not_pending`, "
            "422 `exceeds_pending_amount`."
        ),
        requests={"all of it": {}, "part of it": {"amount": 3000}},
        responses={200: {"posted in part": {**PENDING, "status": "posted", "posted_amount": 3000}}},
    ),
    "voidPendingTransfer": OperationDoc(
        summary="Void a pending transfer",
        description=(
            "Voids a pending transfer: its reservation is released and nothing is posted. The body is `{}` "
            "(or `null`), sent as `application/json`.\n\n"
            "**Idempotent**: repeating the void returns the same 200.\n\nProblems: 404 `transfer_not_found`, "
            "409 `pending_transfer_already_posted`, `pending_transfer_expired`, `transfer_not_pending`."
        ),
        requests={"void": {}},
        responses={200: {"voided": {**PENDING, "status": "voided"}}},
    ),
    "reverseTransfer": OperationDoc(
        summary="Reverse a posted transfer",
        description=(
            "Creates a new posted transfer, with its own `id`, in the opposite direction (`reversal_of` names "
            "the original), of `amount` (default: all that is still reversible). The reversals of one transfer "
            f"never exceed its posted amount.\n\n{REPLAY}.\n\n"
            "Problems: 404 `transfer_not_found`, 422 `exceeds_reversible_amount`, `transfer_not_posted`, "
            "`insufficient_funds`."
        ),
        requests={"a partial refund": {"id": "tr_0001:refund-1", "amount": 250}, "all of it": {"id": "tr_0001:rev"}},
        responses={
            201: {
                "reversed": _transfer(
                    id="tr_0001:refund-1",
                    debit_account_id="acc_bob",
                    credit_account_id="acc_alice",
                    amount=250,
                    reversal_of="tr_0001",
                    description=None,
                )
            }
        },
    ),
    # -- audit ----------------------------------------------------------------------------
    "getTrialBalance": OperationDoc(
        summary="Get the trial balance",
        description=(
            "Read from one consistent snapshot: per currency the sum of debits, of credits, and their "
            "difference, which is always 0. `as_of` (RFC 3339) reads the ledger as it was then."
            f"\n\n{REPLICA}"
        ),
    ),
    "getAggregateBalance": OperationDoc(
        summary="Get balances summed over accounts",
        description=(
            "The balances of the accounts of one `currency` (required) whose metadata holds every "
            "`metadata[KEY]=VALUE` pair (all accounts of the currency without a pair), summed from one consistent "
            "snapshot: `accounts` counted, `posted`, `pending_debits`, `pending_credits`, `available = posted - "
            "pending_debits`. Sums are JSON integers and may exceed 64 bits.\n\n"
            "`as_of` (RFC 3339, not in the future) sums each account's posted balance after its last entry at or "
            "before it, and the reservations alive then; which accounts match is decided by their metadata now, and "
            "`accounts` counts those that existed then.\n\nProblems: 400 `validation_error` (no currency, a "
            "malformed metadata filter, an `as_of` in the future)."
            f"\n\n{REPLICA}"
        ),
        responses={
            200: {
                "gold-tier customers": {
                    "currency": "EUR",
                    "accounts": 1250,
                    "posted": 18250000,
                    "pending_debits": 42000,
                    "pending_credits": 0,
                    "available": 18208000,
                    "as_of": CREATED_AT,
                }
            }
        },
    ),
    "verifyJournal": OperationDoc(
        summary="Verify the journal",
        description=(
            "Recomputes every account's balance from its entries, checks every entry's keyed hash chain and "
            "every transfer against its entries, and compares with the newest checkpoint. `ok: false` lists the "
            'problems found. The body is `{}` (whole ledger) or `{"account_id": ...}` (one account). Requests '
            "made while a run is going on share the next run. Reads only: safe to repeat.\n\n"
            "Problems: 404 `account_not_found`, 503 `overloaded` (too many verifications at once)."
            f"\n\n{REPLICA}"
        ),
        requests={"the whole ledger": {}, "one account": {"account_id": "acc_alice"}},
        responses={
            200: {
                "sound": {
                    "ok": True,
                    "accounts_checked": 2,
                    "entries_checked": 6,
                    "problems": [],
                    "problems_total": 0,
                    "transfers_checked": 3,
                    "checkpoint": {
                        "taken_at": "2026-11-24T21:00:00.000000Z",
                        "key_id": "k1",
                        "accounts": 2,
                        "transfers": 3,
                    },
                }
            }
        },
    ),
    # -- keys -----------------------------------------------------------------------------
    "createKey": OperationDoc(
        summary="Create an API key",
        description=(
            "Creates a key with one role: `admin` (everything, keys included), `poster` (accounts and "
            "transfers, reads) or `auditor` (reads and verification). The key is in this answer only: the "
            "service keeps its SHA-256. Not idempotent: each call makes a new key. The command line does the "
            "same: `ledger keys create --role ROLE`."
        ),
        requests={"a poster": {"role": "poster", "name": "checkout service"}},
        responses={
            201: {
                "created": {
                    "id": "key_3f9a1c0b7d2e4a65",
                    "role": "poster",
                    "name": "checkout service",
                    "created_at": CREATED_AT,
                    "revoked_at": None,
                    "created_by": "key_0a1b2c3d4e5f6071",
                    "revoked_by": None,
                    "key": "lk_Xq3vT0s9bH2mWk8yPz5rLc1nJf7dGa4eUo6iRt0wYh2",
                }
            }
        },
    ),
    "listKeys": OperationDoc(
        summary="List API keys",
        description=f"Every key, oldest first, revoked ones included; never the key itself. {PAGINATION}",
    ),
    "revokeKey": OperationDoc(
        summary="Revoke an API key",
        description=(
            "The key stops working within 5 seconds in every process. **Idempotent**: revoking it again "
            "answers the same. `LEDGER_ADMIN_KEY` is not a stored key: change the setting instead.\n\n"
            "Problems: 404 `key_not_found`."
        ),
    ),
    # -- events and webhooks ----------------------------------------------------------------
    "listEvents": OperationDoc(
        summary="Follow the event feed",
        description=(
            "Every committed change of money or accounts, once, in feed order: each account's events in the "
            "order of its journal, nothing from rolled-back work, and no event skipped by a transaction that "
            "committed late (the feed is numbered by a sequencer after commit, not by a sequence drawn before "
            "it). Start without `after` (the oldest event kept) and follow `next_cursor`, which is never "
            "null; an event's `id` is a cursor too. `wait` (0 to 30 s) long-polls: the answer comes as soon "
            "as an event is there. `types` (comma-separated) and `account_id` filter.\n\n"
            "Problems: 400 `invalid_cursor`, 410 `cursor_expired` (events after the cursor were removed by "
            "retention: reconcile, then start again without a cursor)."
        ),
        responses={
            200: {
                "a page": {
                    "data": [
                        {
                            "type": "transfer.posted",
                            "id": "evt_1042",
                            "created_at": CREATED_AT,
                            "data": _transfer(),
                        }
                    ],
                    "next_cursor": "evt_1042",
                }
            }
        },
    ),
    "createWebhook": OperationDoc(
        summary="Subscribe a URL to events",
        description=(
            "Every event after now (of `types`, or all) is POSTed to `url` as JSON, at least once, with "
            "`Ledger-Event-Id` (the same on every retry) and `Ledger-Signature: t=<unix seconds>,v1=<hex "
            'HMAC-SHA256(secret, "<t>.<raw body>")>`. Any 2xx acknowledges; anything else is retried with '
            "exponential backoff for `LEDGER_WEBHOOK_RETRY_HORIZON_SECONDS` (a day), then the subscription is "
            "marked `failing`. The `secret` is in this answer only. Not idempotent: each call subscribes "
            "again.\n\nProblems: 422 `webhook_url_not_allowed` (the host is not allowed by "
            "`LEDGER_WEBHOOK_ALLOWED_HOSTS`, loopback only by default; credentials in the URL; not http(s))."
        ),
        requests={"orders": {"url": "http://127.0.0.1:9000/ledger-events", "types": ["transfer.posted"]}},
        responses={
            201: {
                "created": {
                    "id": "wh_3f1c0b7d2e4a650011223344",
                    "url": "http://127.0.0.1:9000/ledger-events",
                    "types": ["transfer.posted"],
                    "status": "active",
                    "created_at": CREATED_AT,
                    "failing_since": None,
                    "last_error": None,
                    "secret": "whsec_Xq3vT0s9bH2mWk8yPz5rLc1nJf7dGa4eUo6iRt0wYh2",
                }
            }
        },
    ),
    "listWebhooks": OperationDoc(
        summary="List webhook subscriptions",
        description=f"Subscriptions not deleted, with their status (`active` or `failing`). {PAGINATION}",
    ),
    "getWebhook": OperationDoc(
        summary="Get a webhook subscription",
        description="Its status: `failing` (with `failing_since` and `last_error`) once a delivery ran out of retries, "
        "until one succeeds again.\n\nProblems: 404 `webhook_not_found`.",
    ),
    "deleteWebhook": OperationDoc(
        summary="Delete a webhook subscription",
        description="No more deliveries; those not made yet are cancelled. **Idempotent**.\n\n"
        "Problems: 404 `webhook_not_found`.",
    ),
    "listWebhookDeliveries": OperationDoc(
        summary="A subscription's delivery history",
        description=(
            "One delivery per event, newest first: `pending` (to be tried, again), `delivered`, `failed` "
            "(past the retry horizon) or `cancelled`, with attempts, the last answer and the next attempt. "
            f"{PAGINATION}\n\nProblems: 404 `webhook_not_found`."
        ),
    ),
    # -- operations -----------------------------------------------------------------------
    "healthLive": OperationDoc(
        summary="Liveness",
        description="200 while the process is up and serving. For orchestrators.",
    ),
    "healthReady": OperationDoc(
        summary="Readiness",
        description=(
            "200 when the database answers and its schema is at this build's migration head; 503 otherwise, "
            "with the failing check. For load balancers."
        ),
    ),
    "metrics": OperationDoc(
        summary="Prometheus metrics",
        description="Requests, latencies, transfer outcomes, retries and the connection pool, in Prometheus text format.",
    ),
}
