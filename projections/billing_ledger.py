"""Billing ledger read model: accounts, ledger entries and per-currency balances.

Fed by ``BillingAccount`` events; read by ``getBillingBalance`` (and, later, the
ledger lists, diagnostics and exports). A balance row is the running sum of its
entries; ``tests`` check it against the entries and against the aggregate.

A batch of events is written in one statement per table: ``INSERT ... SELECT * FROM
unnest(...)`` with one typed array parameter per column (``executemany`` costs a
Bind/Execute and per-row dumping for every row). The balance upsert gets one row per
(owner, currency), the batch's entries summed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

from psycopg import Cursor
from psycopg.sql import SQL, Identifier
from psycopg.types.json import Jsonb

from domain.billing import BillingAccount
from projections.store import Item, columns, typed_arrays

#: SQL types of each table's columns, in table order (``ddl``), for ``unnest`` arrays
ACCOUNT_TYPES = ("uuid", "uuid", "text", "timestamptz", "bigint")
ENTRY_TYPES = ("uuid", "uuid", "uuid", "integer", "text", "bigint", "text", "text", "text",
               "jsonb", "bigint", "text", "text", "text", "timestamptz", "bigint")
BALANCE_TYPES = ("uuid", "text", "bigint", "bigint")


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
        self.apply_many(cur, schema, [Item(notification_id, event)])

    def apply_many(self, cur: Cursor[Any], schema: str, items: Sequence[Item]) -> None:
        """Apply events in one statement per table: account openings first (an account's
        entries always follow its opening), then every entry, then one balance upsert
        row per (owner, currency) with the summed amount and the last notification id."""
        s = Identifier(schema)
        opened = [(i.event.originator_id, i.event.owner_user_id, i.event.primary_currency,
                   i.event.timestamp, i.notification_id)
                  for i in items if isinstance(i.event, BillingAccount.Created)]
        entries = [i for i in items if isinstance(i.event, BillingAccount.LedgerEntryPosted)]
        if opened:
            cur.execute(SQL("INSERT INTO {0}.billing_accounts SELECT * FROM unnest({1})")
                        .format(s, typed_arrays(ACCOUNT_TYPES)), columns(opened))
        if not entries:
            return
        cur.execute(SQL("SELECT account_id, owner_user_id FROM {0}.billing_accounts"
                        " WHERE account_id = ANY(%s)").format(s),
                    (list({i.event.originator_id for i in entries}),))
        owners = {row["account_id"]: row["owner_user_id"] for row in cur.fetchall()}
        rows = []
        deltas: dict[tuple[UUID, str], tuple[int, int]] = {}
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
        cur.execute(SQL("INSERT INTO {0}.ledger_entries SELECT * FROM unnest({1})")
                    .format(s, typed_arrays(ENTRY_TYPES)), columns(rows))
        # one row per (owner, currency): ON CONFLICT DO UPDATE may touch a row only once
        cur.execute(SQL(
            "INSERT INTO {0}.balances SELECT * FROM unnest({1})"
            " ON CONFLICT (owner_user_id, currency) DO UPDATE SET"
            " amount_minor = {0}.balances.amount_minor + EXCLUDED.amount_minor,"
            " notification_id = EXCLUDED.notification_id").format(s, typed_arrays(BALANCE_TYPES)),
            columns([(owner, currency, amount, nid)
                      for (owner, currency), (amount, nid) in deltas.items()]))


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
