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


    def apply_many(self, cur: Cursor[Any], schema: str, items: Any) -> None:
        """The same as ``apply`` for each item, in a few set-based statements: account
        openings first (an account's entries always follow its opening), then every
        entry, then one balance upsert per (account, currency) with the summed amount."""
        s = Identifier(schema)
        opened = [(i.event.originator_id, i.event.owner_user_id, i.event.primary_currency,
                   i.event.timestamp, i.notification_id)
                  for i in items if isinstance(i.event, BillingAccount.Created)]
        entries = [i for i in items if isinstance(i.event, BillingAccount.LedgerEntryPosted)]
        if opened:
            cur.executemany(SQL("INSERT INTO {0}.billing_accounts VALUES (%s, %s, %s, %s, %s)")
                            .format(s), opened)
        if not entries:
            return
        cur.execute(SQL("SELECT account_id, owner_user_id FROM {0}.billing_accounts"
                        " WHERE account_id = ANY(%s)").format(s),
                    (list({i.event.originator_id for i in entries}),))
        owners = {row["account_id"]: row["owner_user_id"] for row in cur.fetchall()}
        rows, deltas = [], {}
        for item in entries:
            e = item.event
            if e.originator_id not in owners:
                raise LookupError(f"ledger entry for unknown account {e.originator_id}")
            owner = owners[e.originator_id]
            rows.append((e.entry_id, e.originator_id, owner, e.seq, e.entry_type, e.amount_minor,
                         e.currency, e.reference_type, e.reference_id, Jsonb(e.legs),
                         e.balance_after_minor, e.prev_hash, e.entry_hash,
                         e.provenance.get("correlation_id"), e.occurred_at, item.notification_id))
            amount, _ = deltas.get((owner, e.currency), (0, 0))
            deltas[(owner, e.currency)] = (amount + e.amount_minor, item.notification_id)
        cur.executemany(SQL("INSERT INTO {0}.ledger_entries VALUES"
                            " (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)")
                        .format(s), rows)
        cur.executemany(SQL(
            "INSERT INTO {0}.balances VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (owner_user_id, currency) DO UPDATE SET"
            " amount_minor = {0}.balances.amount_minor + EXCLUDED.amount_minor,"
            " notification_id = EXCLUDED.notification_id").format(s),
            [(owner, currency, amount, nid) for (owner, currency), (amount, nid) in deltas.items()])


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
