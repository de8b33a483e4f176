"""Metadata queries: `metadata[KEY]=VALUE` filters on the account and transfer lists, and
balances aggregated over the accounts a filter matches (issue 15).

A filter is a flat string-to-string map; a row matches when its metadata holds every
pair (`metadata @> filter`). Both tables carry a partial GIN index over non-empty
metadata (`ix_accounts_metadata`, `ix_transfers_metadata`, revision 0008), so every
filter here also says `metadata <> '{}'::jsonb`, as a literal: PostgreSQL uses a partial
index only when it can prove the query implies the index's predicate, and it does not
infer it from `@>` (tests/integration/test_plans.py shows both). The predicate changes
nothing about the answer: a filter has at least one pair, which empty metadata never
contains. Filtered statements are planned with their values (`CUSTOM_PLANS`): a value
few rows hold is read through the index, one most rows hold by walking the list's own
order; the generic plans the service uses elsewhere always walked, reading the whole
table for a rare value.

The aggregate (`aggregate_balances`) sums over the matching accounts of one currency
from one snapshot (a REPEATABLE READ READ ONLY transaction, like the trial balance):

- now (no `as_of`): from the account rows, with reservations past expiry but not yet
  released netted out, exactly as every account read shows them (lazy expiry);
- as of an instant: `posted` is, per account, the `balance_after` of its last entry at
  or before it (the same rule as `GET /v1/accounts/{id}/balance?as_of=`, one index probe
  per account); `pending_*` sum the reservations alive then: pending transfers created at
  or before it and neither settled (posted, voided, released) by then nor past their
  expiry (reads treat a reservation past expiry as free, released or not).

Which accounts match is decided by their metadata and currency *now*, also with `as_of`:
the ledger keeps metadata changes in the account history, not as a queryable timeline,
and "the gold-tier accounts' balances at the end of last month" is the question this
answers. With `as_of`, `accounts` counts the matching accounts that existed then (opened
at or before it, or holding an entry at or before it: imported history predates the
account row); those opened later hold nothing then and add nothing to the sums.

Sums are computed in `numeric`: 100,000 balances near the bigint limit add up past it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, and_, literal_column, text
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.errors import InvalidRequest

# The partial indexes' predicate, as the literal they were created with.
NON_EMPTY = literal_column("'{}'::jsonb")

# A metadata filter's best plan depends on its value (one that three accounts hold is
# three index probes, one that most hold is a scan), and filtered reads are rare next to
# transfers: they are planned each time with their values, not with the generic plans the
# service prepares everything else with (ledger.database).
CUSTOM_PLANS = text("SET LOCAL plan_cache_mode = force_custom_plan")
# The aggregate's first statement: it takes the snapshot, reads the clock the answer is
# stamped with, and switches to custom plans for the transaction, in one round trip.
SNAPSHOT_CLOCK = text("SELECT clock_timestamp(), set_config('plan_cache_mode', 'force_custom_plan', true)")


def matches(column: ColumnElement, metadata: Mapping[str, str]) -> ColumnElement[bool]:
    """`column @> metadata`, in a form the partial GIN index serves (module docstring)."""
    assert metadata, "an empty filter matches every row: leave the filter out instead"
    return and_(column.contains(dict(metadata)), column != NON_EMPTY)


def _account_filter(alias: str, metadata: Mapping[str, str] | None) -> str:
    """The SQL condition on accounts `alias`: the currency, and the metadata when given."""
    condition = f"{alias}.currency = :currency"
    if metadata:
        condition += f" AND {alias}.metadata @> CAST(:metadata AS jsonb) AND {alias}.metadata <> '{{}}'::jsonb"
    return condition


def _now_sql(metadata: Mapping[str, str] | None) -> str:
    # Pending totals net of reservations past expiry and not yet released, each side
    # through the partial index on pending expiries (few rows: the expiry worker
    # releases them within seconds).
    due = """
        (SELECT COALESCE(sum(t.amount::numeric), 0) FROM transfers t
         WHERE t.status = 'pending' AND t.expires_at <= :moment
           AND t.{side}_account_id IN (SELECT a.id FROM accounts a WHERE {filter}))
    """
    return f"""
        SELECT count(*) AS accounts,
               COALESCE(sum(a.credits_posted::numeric - a.debits_posted), 0) AS posted,
               COALESCE(sum(a.pending_debits::numeric), 0)
                 - {due.format(side="debit", filter=_account_filter("a", metadata))} AS pending_debits,
               COALESCE(sum(a.pending_credits::numeric), 0)
                 - {due.format(side="credit", filter=_account_filter("a", metadata))} AS pending_credits
        FROM accounts a WHERE {_account_filter("a", metadata)}
    """


# A reservation is alive at :as_of when it was made by then, was still pending then
# (still pending now, or settled after it: posting and voiding stamp updated_at, and a
# post's entries carry the same time) and had not expired by then.
ALIVE_AT = """
    t.pending AND t.created_at <= :as_of AND (t.status = 'pending' OR t.updated_at > :as_of)
    AND (t.expires_at IS NULL OR t.expires_at > :as_of)
"""


def _as_of_sql(metadata: Mapping[str, str] | None) -> str:
    """Nothing indexes "two-phase transfers settled after an instant", so the reservations
    alive then are found among the matching accounts' transfers made by then. With a
    filter, per account through the transfers' (debit|credit)_account_id, created_at
    indexes: it reads the matching accounts' history, never more than all of it (the
    planner, estimating, preferred scanning every transfer even for 1% of the accounts:
    140 of 166 ms at 100,000 accounts, loadtest.aggregate). Without one, every account
    of the currency is summed: one scan of transfers per side is the cheapest way."""
    if metadata:
        held = """
            (SELECT sum(t.amount) FROM transfers t WHERE t.{side}_account_id = a.id AND {alive})
        """
        return f"""
            SELECT count(*) FILTER (WHERE per.existed) AS accounts,
                   COALESCE(sum(per.posted::numeric), 0) AS posted,
                   COALESCE(sum(per.held_debits::numeric), 0) AS pending_debits,
                   COALESCE(sum(per.held_credits::numeric), 0) AS pending_credits
            FROM (
                SELECT a.created_at <= :as_of OR last.balance_after IS NOT NULL AS existed,
                       last.balance_after AS posted,
                       {held.format(side="debit", alive=ALIVE_AT)} AS held_debits,
                       {held.format(side="credit", alive=ALIVE_AT)} AS held_credits
                FROM accounts a
                LEFT JOIN LATERAL (
                    SELECT e.balance_after FROM entries e
                    WHERE e.account_id = a.id AND e.created_at <= :as_of
                    ORDER BY e.created_at DESC, e.sequence DESC LIMIT 1
                ) last ON true
                WHERE {_account_filter("a", metadata)}
            ) per
        """
    alive = """
        (SELECT COALESCE(sum(t.amount::numeric), 0) FROM transfers t
         WHERE {alive} AND t.{side}_account_id IN (SELECT a.id FROM accounts a WHERE {filter}))
    """
    return f"""
        SELECT count(*) FILTER (WHERE a.created_at <= :as_of OR last.balance_after IS NOT NULL) AS accounts,
               COALESCE(sum(last.balance_after::numeric), 0) AS posted,
               {alive.format(side="debit", alive=ALIVE_AT, filter=_account_filter("a", None))} AS pending_debits,
               {alive.format(side="credit", alive=ALIVE_AT, filter=_account_filter("a", None))} AS pending_credits
        FROM accounts a
        LEFT JOIN LATERAL (
            SELECT e.balance_after FROM entries e
            WHERE e.account_id = a.id AND e.created_at <= :as_of
            ORDER BY e.created_at DESC, e.sequence DESC LIMIT 1
        ) last ON true
        WHERE {_account_filter("a", None)}
    """


def aggregate_sql(metadata: Mapping[str, str] | None, as_of: datetime | None) -> str:
    """The aggregate's statement (exposed for the plan tests and the benchmark)."""
    return _as_of_sql(metadata) if as_of is not None else _now_sql(metadata)


def aggregate_parameters(
    currency: str, metadata: Mapping[str, str] | None, as_of: datetime | None, moment: datetime
) -> dict[str, object]:
    parameters: dict[str, object] = {"currency": currency}
    if metadata:
        parameters["metadata"] = json.dumps(dict(metadata), ensure_ascii=False)
    if as_of is not None:
        parameters["as_of"] = as_of
    else:
        parameters["moment"] = moment
    return parameters


@dataclass(frozen=True, slots=True)
class AggregateBalance:
    currency: str
    accounts: int
    posted: int
    pending_debits: int
    pending_credits: int
    as_of: datetime

    @property
    def available(self) -> int:
        return self.posted - self.pending_debits


async def aggregate_balances(
    engine: AsyncEngine, currency: str, metadata: Mapping[str, str] | None, as_of: datetime | None
) -> AggregateBalance:
    """Balances summed over the accounts of `currency` whose metadata holds `metadata`
    (all of them without), now or as of an instant, from one snapshot (module docstring).
    An `as_of` later than the snapshot is refused: transfers still to come could change
    the answer for it."""
    async with engine.connect() as pooled:
        # One BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY (the driver sends the level
        # with the BEGIN); the pool resets both when the connection returns.
        connection = await pooled.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        await connection.begin()
        moment = (await connection.execute(SNAPSHOT_CLOCK)).scalar_one()
        if as_of is not None and as_of > moment:
            await connection.rollback()
            raise InvalidRequest(
                "`as_of` is in the future: an aggregate as of an instant not yet reached could still change",
                [{"field": "as_of", "message": "must not be later than now"}],
            )
        row = (
            (
                await connection.execute(
                    text(aggregate_sql(metadata, as_of)), aggregate_parameters(currency, metadata, as_of, moment)
                )
            )
            .mappings()
            .one()
        )
        await connection.rollback()
    return AggregateBalance(
        currency=currency,
        accounts=int(row["accounts"]),
        posted=int(row["posted"]),
        pending_debits=int(row["pending_debits"]),
        pending_credits=int(row["pending_credits"]),
        as_of=as_of if as_of is not None else moment,
    )
