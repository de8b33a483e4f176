"""Opening accounts, idempotently by id."""

from __future__ import annotations

import secrets
from types import SimpleNamespace

from sqlalchemy import select, text
from sqlalchemy.dialects.postgresql import insert

from ledger.errors import AccountExistsWithDifferentFields
from ledger.integrity import ChainKey, account_message, seal
from ledger.models import Account
from ledger.service.queries import ACCOUNT_COLUMNS, STORED_ACCOUNT_COLUMNS
from ledger.service.records import AccountOutcome, AccountRecord
from ledger.service.unit_of_work import Executor, UnitOfWork

ACCOUNT_CREATED = text(
    "INSERT INTO event_outbox (type, account_id, created_at) VALUES ('account.created', :id, :created_at)"
)


def new_account_id() -> str:
    # 128 random bits: unguessable and, in practice, never colliding.
    return "acc_" + secrets.token_hex(16)


class AccountService:
    def __init__(self, unit_of_work: UnitOfWork, key: ChainKey) -> None:
        self._unit_of_work = unit_of_work
        self._key = key

    async def open(
        self,
        *,
        currency: str,
        account_id: str | None = None,
        name: str | None = None,
        allow_negative_balance: bool = False,
        metadata: dict[str, str] | None = None,
    ) -> AccountOutcome:
        """Open an account; the same id with the same fields returns the stored one."""
        fields = {
            "id": account_id or new_account_id(),
            "currency": currency,
            "name": name,
            "allow_negative_balance": allow_negative_balance,
            "metadata": metadata or {},
        }
        sealed = {
            "seal": seal(self._key, account_message(self._key.id, SimpleNamespace(**fields))),
            "seal_key": self._key.id,
        }

        async def work(session: Executor) -> AccountOutcome:
            # ON CONFLICT DO NOTHING waits for a concurrent insert of the same id to
            # commit, so the SELECT below always finds the winner.
            inserted = (
                (
                    await session.execute(
                        insert(Account)
                        .values(**{("metadata_" if k == "metadata" else k): v for k, v in fields.items()}, **sealed)
                        .on_conflict_do_nothing(index_elements=[Account.id])
                        .returning(*STORED_ACCOUNT_COLUMNS)
                    )
                )
                .mappings()
                .first()
            )
            if inserted is not None:
                # Its event, in the same transaction: the account exists exactly when its
                # event does (ledger.service.events).
                await session.execute(ACCOUNT_CREATED, {"id": inserted["id"], "created_at": inserted["created_at"]})
                await session.commit()
                return AccountOutcome(AccountRecord.from_row(inserted), created=True)
            row = (await session.execute(select(*ACCOUNT_COLUMNS).where(Account.id == fields["id"]))).mappings().one()
            existing = AccountRecord.from_row(row)
            stored = {
                "id": existing.id,
                "currency": existing.currency,
                "name": existing.name,
                "allow_negative_balance": existing.allow_negative_balance,
                "metadata": existing.metadata,
            }
            if stored != fields:
                differing = sorted(k for k in fields if fields[k] != stored[k])
                raise AccountExistsWithDifferentFields(
                    f"account {existing.id!r} exists with different {', '.join(differing)}"
                )
            return AccountOutcome(existing, created=False)

        return await self._unit_of_work.run(work)
