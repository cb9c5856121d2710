"""Reconciliation runs read model: one row per run, for the admin and V3 finance lists,
the run details and the ``current`` posture (the latest completed run).

Fed by ``ReconciliationRun`` events; rows read back through
``domain.reconciliation.run_json``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg import Cursor
from psycopg.sql import SQL, Composed, Identifier
from psycopg.types.json import Jsonb

from domain.reconciliation import ReconciliationRun, pending_summary

#: sort field (the contract's ``sort`` prefix) -> column
SORT_COLUMNS = {"created_at": "created_at", "checked_at": "checked_at", "status": "status"}


class ReconciliationRuns:
    name = "reconciliation"
    tables = ("reconciliation_runs",)

    def ddl(self, schema: str) -> list[str]:
        s = f'"{schema}"'
        return [
            f"CREATE TABLE IF NOT EXISTS {s}.reconciliation_runs ("
            " id uuid PRIMARY KEY, requested_by_user_id uuid, status text NOT NULL,"
            " summary jsonb NOT NULL, checked_at timestamptz NOT NULL, severity text NOT NULL,"
            " failure_reason text, correlation_id text NOT NULL,"
            " created_at timestamptz NOT NULL, completed_at timestamptz,"
            " ledger_problem_count integer NOT NULL DEFAULT 0, stats jsonb NOT NULL,"
            " findings jsonb NOT NULL, notification_id bigint NOT NULL)",
            f"CREATE INDEX IF NOT EXISTS reconciliation_runs_created ON {s}.reconciliation_runs"
            " (created_at, id)",
            f"CREATE INDEX IF NOT EXISTS reconciliation_runs_checked ON {s}.reconciliation_runs"
            " (status, checked_at, id)",
        ]

    def apply(self, cur: Cursor[Any], schema: str, event: Any, notification_id: int) -> None:
        s = Identifier(schema)
        if isinstance(event, ReconciliationRun.Created):
            cur.execute(SQL(
                "INSERT INTO {0}.reconciliation_runs (id, requested_by_user_id, status, summary,"
                " checked_at, severity, correlation_id, created_at, stats, findings,"
                " notification_id) VALUES (%s, %s, 'running', %s, %s, 'warn', %s, %s, '{{}}',"
                " '[]', %s)").format(s), (
                event.originator_id, event.requested_by_user_id,
                Jsonb(pending_summary(event.timestamp)), event.timestamp,
                event.provenance.get("correlation_id") or "", event.timestamp, notification_id))
            return
        if isinstance(event, ReconciliationRun.Completed):
            changes = {"status": "completed", "stats": Jsonb(event.stats),
                       "findings": Jsonb(event.findings),
                       "ledger_problem_count": int(event.stats.get("ledger_problem_count", 0))}
        elif isinstance(event, ReconciliationRun.Failed):
            changes = {"status": "failed", "failure_reason": event.failure_reason}
        else:
            return
        changes.update({"summary": Jsonb(event.summary),
                        "checked_at": datetime.fromisoformat(event.summary["checked_at"]),
                        "severity": event.summary["severity"], "completed_at": event.timestamp})
        assignments = SQL(", ").join(SQL("{0} = %s").format(Identifier(k)) for k in changes)
        cur.execute(SQL("UPDATE {0}.reconciliation_runs SET {1}, notification_id = %s"
                        " WHERE id = %s").format(s, assignments),
                    (*changes.values(), notification_id, event.originator_id))
        if cur.rowcount != 1:
            raise LookupError(f"reconciliation run {event.originator_id} is not in the read model")


def get_run(cur: Cursor[Any], schema: str, run_id: UUID) -> dict[str, Any] | None:
    cur.execute(SQL("SELECT * FROM {0}.reconciliation_runs WHERE id = %s").format(
        Identifier(schema)), (run_id,))
    row = cur.fetchone()
    return None if row is None else dict(row)


def latest_completed(cur: Cursor[Any], schema: str) -> dict[str, Any] | None:
    """The run that last checked (``current`` posture), or None before any."""
    cur.execute(SQL("SELECT * FROM {0}.reconciliation_runs WHERE status = 'completed'"
                    " ORDER BY checked_at DESC, id DESC LIMIT 1").format(Identifier(schema)))
    row = cur.fetchone()
    return None if row is None else dict(row)


def list_runs(cur: Cursor[Any], schema: str, *, statuses: list[str] | None = None,
              since: datetime | None = None, until: datetime | None = None,
              correlation_id: str | None = None, search: str | None = None,
              sort: str = "created_at_desc", after: tuple[Any, UUID] | None = None,
              limit: int) -> list[dict[str, Any]]:
    """Runs in ``sort`` order (``<field>_<asc|desc>``, ties by id in the same direction);
    ``after`` is the last (sort value, id) seen. ``search`` is a case-insensitive
    substring of the id, status, severity, correlation id or failure reason."""
    field, _, direction = sort.rpartition("_")
    column = Identifier(SORT_COLUMNS[field])
    where: list[Composed | SQL] = [SQL("TRUE")]
    params: list[Any] = []
    if statuses:
        where.append(SQL("status = ANY(%s)"))
        params.append(list(statuses))
    for name, op, value in (("correlation_id", "=", correlation_id), ("created_at", ">=", since),
                            ("created_at", "<=", until)):
        if value is not None:
            where.append(SQL("{0} " + op + " %s").format(Identifier(name)))
            params.append(value)
    if search:
        where.append(SQL("strpos(lower(concat_ws(' ', id::text, status, severity, correlation_id,"
                         " failure_reason)), lower(%s)) > 0"))
        params.append(search)
    if after is not None:
        op = "<" if direction == "desc" else ">"
        where.append(SQL("({0}, id) " + op + " (%s, %s)").format(column))
        params += [after[0], after[1]]
    order = SQL("DESC" if direction == "desc" else "ASC")
    cur.execute(SQL("SELECT * FROM {0}.reconciliation_runs WHERE {1}"
                    " ORDER BY {2} {3}, id {3} LIMIT %s").format(
        Identifier(schema), SQL(" AND ").join(where), column, order), (*params, limit))
    return [dict(row) for row in cur.fetchall()]
