"""Refunds read model: one row per refund request, for the admin, caller and V3 finance
lists. Fed by ``Refund`` events; rows read back through ``domain.refunds.refund_json``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg import Cursor
from psycopg.sql import SQL, Identifier

from domain.refunds import Refund

#: sort field (the contract's ``sort`` prefix) -> column
SORT_COLUMNS = {"id": "id", "created_at": "created_at", "updated_at": "updated_at",
                "status": "status", "amount": "amount_minor"}


class Refunds:
    name = "refunds"
    tables = ("refunds",)

    def ddl(self, schema: str) -> list[str]:
        s = f'"{schema}"'
        return [
            f"CREATE TABLE IF NOT EXISTS {s}.refunds ("
            " id uuid PRIMARY KEY, org_id uuid NOT NULL, user_id uuid NOT NULL,"
            " requested_by_user_id uuid, amount_minor bigint NOT NULL, currency text NOT NULL,"
            " reason text NOT NULL, payment_reference text, mode text NOT NULL, outcome text,"
            " status text NOT NULL, provider_refund_id text, internal_ledger_entry_id uuid,"
            " correlation_id text NOT NULL, created_at timestamptz NOT NULL,"
            " updated_at timestamptz NOT NULL, notification_id bigint NOT NULL)",
            f"CREATE INDEX IF NOT EXISTS refunds_user ON {s}.refunds (user_id, created_at, id)",
        ]

    def apply(self, cur: Cursor[Any], schema: str, event: Any, notification_id: int) -> None:
        s = Identifier(schema)
        if isinstance(event, Refund.Created):
            cur.execute(SQL(
                "INSERT INTO {0}.refunds (id, org_id, user_id, requested_by_user_id,"
                " amount_minor, currency, reason, payment_reference, mode, status,"
                " correlation_id, created_at, updated_at, notification_id)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, 'accepted', %s, %s, %s, %s)"
            ).format(s), (
                event.originator_id, event.org_id, event.user_id, event.requested_by_user_id,
                event.amount_minor, event.currency, event.reason, event.payment_reference,
                event.mode, event.provenance.get("correlation_id") or "", event.timestamp,
                event.timestamp, notification_id))
            return
        changes: dict[str, Any] | None = None
        if isinstance(event, Refund.PolicyApplied):
            changes = {"outcome": event.outcome, "amount_minor": event.amount_minor}
        elif isinstance(event, Refund.Completed):
            changes = {"status": "completed", "provider_refund_id": event.provider_refund_id,
                       "internal_ledger_entry_id": event.internal_ledger_entry_id}
        elif isinstance(event, Refund.Failed):
            changes = {"status": "failed", "provider_refund_id": event.provider_refund_id}
        if changes is None:
            return
        changes["updated_at"] = event.timestamp
        assignments = SQL(", ").join(SQL("{0} = %s").format(Identifier(k)) for k in changes)
        cur.execute(SQL("UPDATE {0}.refunds SET {1}, notification_id = %s WHERE id = %s")
                    .format(s, assignments),
                    (*changes.values(), notification_id, event.originator_id))
        if cur.rowcount != 1:
            raise LookupError(f"refund {event.originator_id} is not in the read model")


def list_refunds(cur: Cursor[Any], schema: str, *, user_id: UUID, status: str | None,
                 correlation_id: str | None = None, since: datetime | None = None,
                 until: datetime | None = None, sort: str = "created_at_desc",
                 after: tuple[Any, UUID] | None = None, limit: int) -> list[dict[str, Any]]:
    """One user's refunds in ``sort`` order (``<field>_<asc|desc>``, ties by id in the
    same direction); ``after`` is the last (sort value, id) seen."""
    field, _, direction = sort.rpartition("_")
    column = Identifier(SORT_COLUMNS[field])
    descending = direction == "desc"
    where, params = [SQL("user_id = %s")], [user_id]
    for name, op, value in (("status", "=", status), ("correlation_id", "=", correlation_id),
                            ("created_at", ">=", since), ("created_at", "<=", until)):
        if value is not None:
            where.append(SQL("{0} " + op + " %s").format(Identifier(name)))
            params.append(value)
    if after is not None:
        op = "<" if descending else ">"
        if field == "id":
            where.append(SQL("id " + op + " %s"))
            params.append(after[1])
        else:
            where.append(SQL("({0}, id) " + op + " (%s, %s)").format(column))
            params += [after[0], after[1]]
    order = SQL("DESC" if descending else "ASC")
    cur.execute(SQL("SELECT * FROM {0}.refunds WHERE {1} ORDER BY {2} {3}, id {3} LIMIT %s")
                .format(Identifier(schema), SQL(" AND ").join(where), column, order),
                (*params, limit))
    return [dict(row) for row in cur.fetchall()]
