"""Invoices read model: ``invoices`` (one row per invoice revision, with its running
total and status) and ``invoice_lines``.

Fed by ``Invoice`` events; read by ``listBillingInvoices`` and ``getBillingInvoice``.
Every read is scoped to the payer (``owner_user_id``, the user whose ledger was
charged for the lines).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg import Cursor
from psycopg.sql import SQL, Identifier
from psycopg.types.json import Jsonb

from domain.invoices import Invoice

LINE_COLUMNS = ("id", "invoice_id", "seq", "line_type", "description", "amount_minor",
                "currency", "rated_usage_line_id", "usage_record_id", "ledger_entry_id",
                "bill_from", "bill_to", "created_at", "notification_id")


class Invoices:
    name = "invoices"
    tables = ("invoices", "invoice_lines")

    def ddl(self, schema: str) -> list[str]:
        s = f'"{schema}"'
        return [
            f"CREATE TABLE IF NOT EXISTS {s}.invoices ("
            " id uuid PRIMARY KEY, owner_user_id uuid NOT NULL, org_id uuid NOT NULL,"
            " currency text NOT NULL, period text NOT NULL, period_start timestamptz NOT NULL,"
            " period_end timestamptz NOT NULL, revision integer NOT NULL, replaces uuid,"
            " status text NOT NULL, total_minor bigint NOT NULL, tax_total_minor bigint NOT NULL,"
            " tax_treatment text NOT NULL, tax_snapshot jsonb NOT NULL,"
            " applied_minor bigint NOT NULL, line_count integer NOT NULL,"
            " issued_at timestamptz, due_at timestamptz, finalized_at timestamptz,"
            " voided_at timestamptz, replaced_by uuid, created_at timestamptz NOT NULL,"
            " notification_id bigint NOT NULL)",
            f"CREATE INDEX IF NOT EXISTS invoices_by_owner ON {s}.invoices"
            " (owner_user_id, period_start, id)",
            f"CREATE TABLE IF NOT EXISTS {s}.invoice_lines ("
            " id uuid PRIMARY KEY, invoice_id uuid NOT NULL, seq integer NOT NULL,"
            " line_type text NOT NULL, description text NOT NULL, amount_minor bigint NOT NULL,"
            " currency text NOT NULL, rated_usage_line_id uuid, usage_record_id uuid,"
            " ledger_entry_id uuid, bill_from timestamptz, bill_to timestamptz,"
            " created_at timestamptz NOT NULL, notification_id bigint NOT NULL,"
            " UNIQUE (invoice_id, seq))",
            f"CREATE INDEX IF NOT EXISTS invoice_lines_by_rated_line ON {s}.invoice_lines"
            " (rated_usage_line_id)",
        ]

    def apply(self, cur: Cursor[Any], schema: str, event: Any, notification_id: int) -> None:
        s = Identifier(schema)
        if isinstance(event, Invoice.Created):
            cur.execute(SQL(
                "INSERT INTO {0}.invoices (id, owner_user_id, org_id, currency, period,"
                " period_start, period_end, revision, replaces, status, total_minor,"
                " tax_total_minor, tax_treatment, tax_snapshot, applied_minor, line_count,"
                " created_at, notification_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s,"
                " 'draft', 0, 0, 'not_configured', '{{}}', 0, 0, %s, %s)").format(s),
                (event.originator_id, event.owner_user_id, event.org_id, event.currency,
                 event.period, event.period_start, event.period_end, event.revision,
                 event.replaces, event.timestamp, notification_id))
        elif isinstance(event, (Invoice.LineAdded, Invoice.LinesCarried)):
            lines = [event.line] if isinstance(event, Invoice.LineAdded) else event.lines
            if not lines:
                return
            cur.execute(SQL("UPDATE {0}.invoices SET line_count = line_count + %s,"
                            " total_minor = total_minor + %s, notification_id = %s"
                            " WHERE id = %s RETURNING currency, line_count").format(s),
                        (len(lines), sum(line["amount_minor"] for line in lines),
                         notification_id, event.originator_id))
            row = cur.fetchone()
            if row is None:
                raise LookupError(f"invoice {event.originator_id} is not in the read model")
            first = row["line_count"] - len(lines) + 1
            cur.executemany(SQL(
                "INSERT INTO {0}.invoice_lines (" + ", ".join(LINE_COLUMNS) + ") VALUES ("
                + ", ".join(["%s"] * len(LINE_COLUMNS)) + ")").format(s),
                [(line["id"], event.originator_id, first + n, line["line_type"],
                  line["description"], line["amount_minor"], row["currency"],
                  line.get("rated_usage_line_id"), line.get("usage_record_id"),
                  line.get("ledger_entry_id"), line.get("bill_from"), line.get("bill_to"),
                  line["created_at"], notification_id) for n, line in enumerate(lines)])
        elif isinstance(event, Invoice.Finalized):
            self._update(cur, s, event, notification_id, status="issued",
                         total_minor=event.total_minor, tax_total_minor=event.tax_total_minor,
                         tax_treatment=event.tax_treatment,
                         tax_snapshot=Jsonb(event.tax_snapshot), issued_at=event.issued_at,
                         due_at=event.due_at, finalized_at=event.finalized_at)
        elif isinstance(event, Invoice.PaymentApplied):
            self._update(cur, s, event, notification_id, status=event.status,
                         applied_minor=event.applied_minor)
        elif isinstance(event, Invoice.BecameDue):
            self._update(cur, s, event, notification_id, status="due")
        elif isinstance(event, Invoice.WrittenOff):
            self._update(cur, s, event, notification_id, status="write_off")
        elif isinstance(event, Invoice.Voided):
            self._update(cur, s, event, notification_id, status="void",
                         voided_at=event.voided_at, replaced_by=event.replaced_by)

    @staticmethod
    def _update(cur: Cursor[Any], s: Identifier, event: Any, notification_id: int,
                **columns: Any) -> None:
        assignments = SQL(", ").join(SQL("{0} = %s").format(Identifier(c)) for c in columns)
        cur.execute(SQL("UPDATE {0}.invoices SET {1}, notification_id = %s WHERE id = %s")
                    .format(s, assignments),
                    (*columns.values(), notification_id, event.originator_id))
        if cur.rowcount != 1:
            raise LookupError(f"invoice {event.originator_id} is not in the read model")


# ---- queries ------------------------------------------------------------------------
def list_invoices(cur: Cursor[Any], schema: str, *, owner: UUID, status: str | None,
                  after: tuple[datetime, UUID] | None, limit: int) -> list[dict[str, Any]]:
    """The payer's invoices, latest month first (``period_start`` then id, descending)."""
    clauses, params = [SQL("owner_user_id = %s")], [owner]
    if status is not None:
        clauses.append(SQL("status = %s"))
        params.append(status)
    if after is not None:
        clauses.append(SQL("(period_start, id) < (%s, %s)"))
        params += list(after)
    cur.execute(SQL("SELECT * FROM {0}.invoices WHERE {1}"
                    " ORDER BY period_start DESC, id DESC LIMIT %s").format(
        Identifier(schema), SQL(" AND ").join(clauses)), (*params, limit))
    return [dict(row) for row in cur.fetchall()]


def get_invoice(cur: Cursor[Any], schema: str, *, owner: UUID, invoice_id: UUID
                ) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """The invoice and its lines (in the order they were added), if it is the payer's."""
    s = Identifier(schema)
    cur.execute(SQL("SELECT * FROM {0}.invoices WHERE id = %s AND owner_user_id = %s")
                .format(s), (invoice_id, owner))
    row = cur.fetchone()
    if row is None:
        return None
    cur.execute(SQL("SELECT * FROM {0}.invoice_lines WHERE invoice_id = %s ORDER BY seq")
                .format(s), (invoice_id,))
    return dict(row), [dict(line) for line in cur.fetchall()]
