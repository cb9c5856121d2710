"""Payment disputes read model: one row per provider dispute, for the admin list and
detail. Fed by ``PaymentDispute`` events; rows read back through
``domain.disputes.dispute_json``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg import Cursor
from psycopg.sql import SQL, Identifier
from psycopg.types.json import Jsonb

from domain.disputes import TERMINAL, PaymentDispute, dispute_json


class Disputes:
    name = "disputes"
    tables = ("payment_disputes",)

    def ddl(self, schema: str) -> list[str]:
        s = f'"{schema}"'
        return [
            f"CREATE TABLE IF NOT EXISTS {s}.payment_disputes ("
            " id uuid PRIMARY KEY, org_id uuid NOT NULL, user_id uuid, payment_session_id uuid,"
            " provider text NOT NULL, provider_dispute_id text NOT NULL UNIQUE,"
            " provider_charge_id text, provider_payment_intent_id text, status text NOT NULL,"
            " provider_status text, reason text, amount_minor bigint NOT NULL,"
            " currency text NOT NULL, evidence_due_at timestamptz,"
            " evidence_submitted_at timestamptz, closed_at timestamptz, provider_event_id text,"
            " chargeback_ledger_entry_id uuid, reversal_ledger_entry_id uuid,"
            " correlation_id text, metadata jsonb NOT NULL, created_at timestamptz NOT NULL,"
            " updated_at timestamptz NOT NULL, notification_id bigint NOT NULL)",
            f"CREATE INDEX IF NOT EXISTS payment_disputes_order ON {s}.payment_disputes"
            " (created_at DESC, id DESC)",
        ]

    def apply(self, cur: Cursor[Any], schema: str, event: Any, notification_id: int) -> None:
        s = Identifier(schema)
        if isinstance(event, PaymentDispute.Created):
            cur.execute(SQL(
                "INSERT INTO {0}.payment_disputes (id, org_id, user_id, payment_session_id,"
                " provider, provider_dispute_id, provider_charge_id, provider_payment_intent_id,"
                " status, reason, amount_minor, currency, provider_event_id, correlation_id,"
                " metadata, created_at, updated_at, notification_id) VALUES (%s, %s, %s, %s,"
                " %s, %s, %s, %s, 'opened', %s, %s, %s, %s, %s, %s, %s, %s, %s)").format(s), (
                event.originator_id, event.org_id, event.user_id, event.payment_session_id,
                event.provider, event.provider_dispute_id, event.provider_charge_id,
                event.provider_payment_intent_id, event.reason, event.amount_minor,
                event.currency, event.provider_event_id, event.provenance.get("correlation_id"),
                Jsonb(event.metadata), event.timestamp, event.timestamp, notification_id))
            return
        if isinstance(event, PaymentDispute.StatusChanged):
            terminal = event.status in TERMINAL
            cur.execute(SQL(
                "UPDATE {0}.payment_disputes SET status = %s, provider_status = %s,"
                " evidence_due_at = COALESCE(%s, evidence_due_at),"
                " evidence_submitted_at = CASE WHEN %s AND evidence_submitted_at IS NULL"
                "   THEN %s ELSE evidence_submitted_at END,"
                " closed_at = CASE WHEN %s THEN %s ELSE closed_at END,"
                " provider_event_id = %s, updated_at = %s, notification_id = %s"
                " WHERE id = %s").format(s), (
                event.status, event.provider_status, event.evidence_due_at,
                event.status == "evidence_submitted", event.timestamp, terminal,
                event.timestamp, event.provider_event_id, event.timestamp, notification_id,
                event.originator_id))
        elif isinstance(event, (PaymentDispute.ChargebackLinked, PaymentDispute.ReversalLinked)):
            reversal = isinstance(event, PaymentDispute.ReversalLinked)
            column = "reversal_ledger_entry_id" if reversal else "chargeback_ledger_entry_id"
            cur.execute(SQL("UPDATE {0}.payment_disputes SET {1} = %s, updated_at = %s,"
                            " notification_id = %s WHERE id = %s").format(s, Identifier(column)),
                        (event.ledger_entry_id, event.timestamp, notification_id,
                         event.originator_id))
        else:
            return
        if cur.rowcount != 1:
            raise LookupError(f"dispute {event.originator_id} is not in the read model")


def get_dispute(cur: Cursor[Any], schema: str, dispute_id: UUID) -> dict[str, Any] | None:
    cur.execute(SQL("SELECT * FROM {0}.payment_disputes WHERE id = %s").format(Identifier(schema)),
                (dispute_id,))
    row = cur.fetchone()
    return None if row is None else dispute_json(row)


def list_disputes(cur: Cursor[Any], schema: str, *, status: str | None,
                  provider_dispute_id: str | None, after: tuple[datetime, UUID] | None,
                  limit: int) -> list[dict[str, Any]]:
    """Newest first, ties broken by id; ``after`` is the last (created_at, id) seen."""
    where, params = [SQL("TRUE")], []
    for column, value in (("status", status), ("provider_dispute_id", provider_dispute_id)):
        if value is not None:
            where.append(SQL("{0} = %s").format(Identifier(column)))
            params.append(value)
    if after is not None:
        where.append(SQL("(created_at, id) < (%s, %s)"))
        params += [after[0], after[1]]
    cur.execute(SQL("SELECT * FROM {0}.payment_disputes WHERE {1}"
                    " ORDER BY created_at DESC, id DESC LIMIT %s").format(
        Identifier(schema), SQL(" AND ").join(where)), (*params, limit))
    return [dict(row) for row in cur.fetchall()]
