"""Payment sessions read model: one row per session, for the admin lists and details."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg import Cursor
from psycopg.sql import SQL, Identifier

from domain.payments import PaymentSession, session_json

COLUMNS = ("id", "org_id", "initiated_by_user_id", "stripe_checkout_session_id",
           "stripe_payment_intent_id", "requested_amount_minor", "requested_currency",
           "credited_amount_minor", "credited_currency", "status", "initiated_at",
           "checkout_completed_at", "credited_at", "failed_at", "failure_reason",
           "ledger_entry_id", "correlation_id", "created_at")


class Payments:
    name = "payments"
    tables = ("payment_sessions",)

    def ddl(self, schema: str) -> list[str]:
        s = f'"{schema}"'
        return [
            f"CREATE TABLE IF NOT EXISTS {s}.payment_sessions ("
            " id uuid PRIMARY KEY, org_id uuid NOT NULL, initiated_by_user_id uuid NOT NULL,"
            " stripe_checkout_session_id text NOT NULL, stripe_payment_intent_id text,"
            " requested_amount_minor bigint NOT NULL, requested_currency text NOT NULL,"
            " credited_amount_minor bigint, credited_currency text, status text NOT NULL,"
            " initiated_at timestamptz NOT NULL, checkout_completed_at timestamptz,"
            " credited_at timestamptz, failed_at timestamptz, failure_reason text,"
            " ledger_entry_id uuid, correlation_id text NOT NULL, created_at timestamptz NOT NULL,"
            " notification_id bigint NOT NULL)",
            f"CREATE INDEX IF NOT EXISTS payment_sessions_order ON {s}.payment_sessions"
            " (created_at DESC, id DESC)",
        ]

    def apply(self, cur: Cursor[Any], schema: str, event: Any, notification_id: int) -> None:
        s = Identifier(schema)
        if isinstance(event, PaymentSession.Created):
            cur.execute(SQL(
                "INSERT INTO {0}.payment_sessions (id, org_id, initiated_by_user_id,"
                " stripe_checkout_session_id, requested_amount_minor, requested_currency, status,"
                " initiated_at, correlation_id, created_at, notification_id)"
                " VALUES (%s, %s, %s, %s, %s, %s, 'initiated', %s, %s, %s, %s)").format(s),
                (event.originator_id, event.org_id, event.initiated_by_user_id,
                 event.provider_session_id, event.amount_minor, event.currency, event.timestamp,
                 event.provenance.get("correlation_id") or "", event.timestamp, notification_id))
            return
        changes: dict[str, Any] | None = None
        if isinstance(event, PaymentSession.CheckoutCompleted):
            changes = {"status": "checkout_completed",
                       "stripe_payment_intent_id": event.payment_intent_id,
                       "credited_amount_minor": event.credited_amount_minor,
                       "credited_currency": event.currency,
                       "checkout_completed_at": event.timestamp}
        elif isinstance(event, PaymentSession.Credited):
            changes = {"status": "credited", "ledger_entry_id": event.ledger_entry_id,
                       "credited_amount_minor": event.amount_minor,
                       "credited_currency": event.currency, "credited_at": event.timestamp}
        elif isinstance(event, PaymentSession.Expired):
            changes = {"status": "expired"}
        elif isinstance(event, PaymentSession.Failed):
            changes = {"status": "failed_reconcile", "failure_reason": event.failure_reason,
                       "failed_at": event.timestamp}
        if changes is None:
            return
        assignments = SQL(", ").join(SQL("{0} = %s").format(Identifier(k)) for k in changes)
        cur.execute(SQL("UPDATE {0}.payment_sessions SET {1}, notification_id = %s"
                        " WHERE id = %s").format(s, assignments),
                    (*changes.values(), notification_id, event.originator_id))
        if cur.rowcount != 1:
            raise LookupError(f"payment session {event.originator_id} is not in the read model")


def get_session(cur: Cursor[Any], schema: str, session_id: UUID) -> dict[str, Any] | None:
    cur.execute(SQL("SELECT * FROM {0}.payment_sessions WHERE id = %s").format(Identifier(schema)),
                (session_id,))
    row = cur.fetchone()
    return None if row is None else session_json(row)


def list_sessions(cur: Cursor[Any], schema: str, *, user_id: UUID | None, status: str | None,
                  since: datetime | None, until: datetime | None,
                  after: tuple[datetime, UUID] | None, limit: int) -> list[dict[str, Any]]:
    """Newest first, ties broken by id; ``after`` is the last (created_at, id) seen."""
    where, params = [SQL("TRUE")], []
    for column, op, value in (("initiated_by_user_id", "=", user_id), ("status", "=", status),
                              ("created_at", ">=", since), ("created_at", "<=", until)):
        if value is not None:
            where.append(SQL("{0} " + op + " %s").format(Identifier(column)))
            params.append(value)
    if after is not None:
        where.append(SQL("(created_at, id) < (%s, %s)"))
        params += [after[0], after[1]]
    cur.execute(SQL("SELECT * FROM {0}.payment_sessions WHERE {1}"
                    " ORDER BY created_at DESC, id DESC LIMIT %s").format(
        Identifier(schema), SQL(" AND ").join(where)), (*params, limit))
    return [dict(row) for row in cur.fetchall()]
