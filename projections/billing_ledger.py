"""Billing ledger read model: accounts, ledger entries and per-currency balances.

Fed by ``BillingAccount`` events; read by ``getBillingBalance`` (and, later, the
ledger lists, diagnostics and exports). A balance row is the running sum of its
entries; ``tests`` check it against the entries and against the aggregate.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from psycopg import Cursor
from psycopg.sql import SQL, Identifier
from psycopg.types.json import Jsonb

from domain.billing import BillingAccount


class BillingLedger:
    name = "billing_ledger"
    tables = ("billing_accounts", "ledger_entries", "balances")

    def ddl(self, schema: str) -> list[str]:
        s = f'"{schema}"'
        return [
            f"CREATE TABLE IF NOT EXISTS {s}.billing_accounts ("
            " account_id uuid PRIMARY KEY, owner_user_id uuid NOT NULL UNIQUE,"
            " primary_currency text NOT NULL, opened_at timestamptz NOT NULL,"
            " notification_id bigint NOT NULL)",
            f"CREATE TABLE IF NOT EXISTS {s}.ledger_entries ("
            " entry_id uuid PRIMARY KEY, account_id uuid NOT NULL, owner_user_id uuid NOT NULL,"
            " seq integer NOT NULL, entry_type text NOT NULL, amount_minor bigint NOT NULL,"
            " currency text NOT NULL, reference_type text, reference_id text,"
            " legs jsonb NOT NULL, balance_after_minor bigint NOT NULL, prev_hash text NOT NULL,"
            " entry_hash text NOT NULL, correlation_id text, occurred_at timestamptz NOT NULL,"
            " notification_id bigint NOT NULL, UNIQUE (account_id, seq))",
            f"CREATE INDEX IF NOT EXISTS ledger_entries_owner ON {s}.ledger_entries"
            " (owner_user_id, occurred_at, entry_id)",
            f"CREATE TABLE IF NOT EXISTS {s}.balances ("
            " owner_user_id uuid NOT NULL, currency text NOT NULL, amount_minor bigint NOT NULL,"
            " notification_id bigint NOT NULL, PRIMARY KEY (owner_user_id, currency))",
        ]

    def apply(self, cur: Cursor[Any], schema: str, event: Any, notification_id: int) -> None:
        s = Identifier(schema)
        if isinstance(event, BillingAccount.Created):
            cur.execute(SQL("INSERT INTO {0}.billing_accounts VALUES (%s, %s, %s, %s, %s)").format(s),
                        (event.originator_id, event.owner_user_id, event.primary_currency,
                         event.timestamp, notification_id))
        elif isinstance(event, BillingAccount.LedgerEntryPosted):
            cur.execute(SQL(
                "INSERT INTO {0}.ledger_entries (entry_id, account_id, owner_user_id, seq,"
                " entry_type, amount_minor, currency, reference_type, reference_id, legs,"
                " balance_after_minor, prev_hash, entry_hash, correlation_id, occurred_at,"
                " notification_id) SELECT %s, %s, owner_user_id, %s, %s, %s, %s, %s, %s, %s,"
                " %s, %s, %s, %s, %s, %s FROM {0}.billing_accounts WHERE account_id = %s"
            ).format(s), (
                event.entry_id, event.originator_id, event.seq, event.entry_type,
                event.amount_minor, event.currency, event.reference_type, event.reference_id,
                Jsonb(event.legs), event.balance_after_minor, event.prev_hash, event.entry_hash,
                event.provenance.get("correlation_id"), event.occurred_at, notification_id,
                event.originator_id))
            if cur.rowcount != 1:
                raise LookupError(f"ledger entry for unknown account {event.originator_id}")
            cur.execute(SQL(
                "INSERT INTO {0}.balances SELECT owner_user_id, %s, %s, %s"
                " FROM {0}.billing_accounts WHERE account_id = %s"
                " ON CONFLICT (owner_user_id, currency) DO UPDATE SET"
                " amount_minor = {0}.balances.amount_minor + EXCLUDED.amount_minor,"
                " notification_id = EXCLUDED.notification_id").format(s),
                (event.currency, event.amount_minor, notification_id, event.originator_id))


def account_balances(cur: Cursor[Any], schema: str, owner_user_id: UUID
                     ) -> tuple[str | None, list[tuple[str, int]]]:
    """(primary currency or None when no account exists, [(currency, amount_minor)])."""
    s = Identifier(schema)
    cur.execute(SQL("SELECT primary_currency FROM {0}.billing_accounts WHERE owner_user_id = %s")
                .format(s), (owner_user_id,))
    row = cur.fetchone()
    if row is None:
        return None, []
    cur.execute(SQL("SELECT currency, amount_minor FROM {0}.balances WHERE owner_user_id = %s"
                    " ORDER BY currency").format(s), (owner_user_id,))
    return row["primary_currency"], [(r["currency"], r["amount_minor"]) for r in cur.fetchall()]
