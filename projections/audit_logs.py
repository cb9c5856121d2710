"""Audit-log read model: one row per command, projected from its events' provenance.

- ``audit_logs``: one row per command (one ``causation_id``), grouping every event it
  appended that carries provenance. ``domain.audit_actions`` says what each event
  contributes; the highest-ranked event names the row's action and target (ties: the
  earliest event), details are the union of the events' allow-listed scalar fields.
  A command's events may arrive in several batches (or, with Kafka, partitions), so a
  row is upserted and merged in a way that does not depend on arrival order.
  ``result`` is ``failure`` only for a refusal recorded under an ``Idempotency-Key``
  (a refusal without one appends nothing, so it leaves no row). Scope columns:
  ``project_id``, ``org_id`` and ``subject_user_id`` (the user the command concerns:
  the owner of the balance, the lease, the payment), from the events themselves or
  from what earlier events said about the same aggregate.
- ``audit_log_scopes``: aggregate id -> the (project, org, user) its events named, so a
  later event of the aggregate (a release, an adjustment) lands in the same scope.

A batch is written in one statement per table (``INSERT ... SELECT * FROM unnest(...)``,
one typed array per column, sent in binary): the batch's events of one command are
merged in Python first (``_merge``, the same rule as the upsert's), as one statement
may not update a row twice.

``finance_audit`` (projections.finance) sits beside this read model: it is per-event
billing evidence (``BillingAuditEvidence``) that the finance views join; this one is
the per-command log of every area. Both take the acting user from
``domain.audit_actions.actor_user_id``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg import Connection, Cursor
from psycopg.sql import SQL, Composed, Identifier
from psycopg.types.json import Jsonb

from domain.audit_actions import actor, fact, own_scope, related_ids, result_of, row_id
from projections.store import Item, typed_arrays

#: column -> SQL type, in table order (``ddl``); ``_upsert`` sends one typed array per column
TYPES = {"id": "uuid", "rank": "integer", "lead_notification_id": "bigint",
         "first_notification_id": "bigint", "occurred_at": "timestamptz",
         "correlation_id": "text", "causation_id": "text", "actor_user_id": "uuid",
         "actor_service_account_id": "uuid", "actor_role": "text", "actor_ref": "text",
         "source": "text", "action": "text", "target_type": "text", "target_id": "text",
         "result": "text", "details": "jsonb", "project_id": "uuid", "org_id": "uuid",
         "subject_user_id": "uuid", "event_count": "integer"}
COLUMNS = tuple(TYPES)
#: columns the leading (highest-ranked, then earliest) event decides
LEAD = ("rank", "lead_notification_id", "action", "target_type", "target_id", "result")
#: sort name -> (column, direction) keys; ties by occurred_at desc, then id (api-conventions §10.2)
_TIE = (("occurred_at", "desc"), ("id", "desc"))
SORTS: dict[str, tuple[tuple[str, str], ...]] = {
    "occurred_at_desc": _TIE,
    "occurred_at_asc": (("occurred_at", "asc"), ("id", "asc")),
    "action_asc": (("action", "asc"), *_TIE),
    "action_desc": (("action", "desc"), *_TIE),
    "result_asc": (("result", "asc"), *_TIE),
    "result_desc": (("result", "desc"), *_TIE),
    "target_asc": (("target_type", "asc"), ("target_id", "asc"), *_TIE),
    "target_desc": (("target_type", "desc"), ("target_id", "desc"), *_TIE),
}
TEXT_KEYS = ("action", "result", "target_type", "target_id")


class AuditLogs:
    name = "audit_logs"
    tables = ("audit_logs", "audit_log_scopes")

    def ddl(self, schema: str) -> list[str]:
        s = f'"{schema}"'
        scoped = [f"CREATE INDEX IF NOT EXISTS audit_logs_{c} ON {s}.audit_logs"
                  f" ({c}, occurred_at DESC, id DESC)"
                  for c in ("actor_user_id", "subject_user_id", "project_id", "org_id",
                            "correlation_id")]
        return [
            f"CREATE TABLE IF NOT EXISTS {s}.audit_logs ("
            " id uuid PRIMARY KEY, rank integer NOT NULL, lead_notification_id bigint NOT NULL,"
            " first_notification_id bigint NOT NULL, occurred_at timestamptz NOT NULL,"
            " correlation_id text NOT NULL, causation_id text, actor_user_id uuid,"
            " actor_service_account_id uuid, actor_role text NOT NULL, actor_ref text NOT NULL,"
            " source text NOT NULL, action text NOT NULL, target_type text NOT NULL,"
            " target_id text NOT NULL, result text NOT NULL, details jsonb NOT NULL,"
            " project_id uuid, org_id uuid, subject_user_id uuid, event_count integer NOT NULL)",
            f"CREATE INDEX IF NOT EXISTS audit_logs_recent ON {s}.audit_logs"
            " (occurred_at DESC, id DESC)", *scoped,
            f"CREATE TABLE IF NOT EXISTS {s}.audit_log_scopes ("
            " aggregate_id uuid PRIMARY KEY, project_id uuid, org_id uuid, user_id uuid)",
        ]

    def apply(self, cur: Cursor[Any], schema: str, event: Any, notification_id: int) -> None:
        self.apply_many(cur, schema, [Item(notification_id, event)])

    def apply_many(self, cur: Cursor[Any], schema: str, items: Sequence[Item]) -> None:
        """Learn scopes, group the batch's events by command, upsert one row per command."""
        learned: dict[UUID, tuple[UUID | None, UUID | None, UUID | None]] = {}
        audited = []
        for item in items:
            scope = own_scope(item.event)
            if any(scope) and item.event.originator_id not in learned:
                learned[item.event.originator_id] = scope
            if isinstance(getattr(item.event, "provenance", None), dict):
                audited.append(item)
        if learned:
            projects, orgs, users = zip(*learned.values())
            cur.execute(SQL("INSERT INTO {0}.audit_log_scopes SELECT * FROM unnest(%b::uuid[],"
                            " %b::uuid[], %b::uuid[], %b::uuid[])"
                            " ON CONFLICT (aggregate_id) DO NOTHING").format(Identifier(schema)),
                        (list(learned), list(projects), list(orgs), list(users)))
        if not audited:
            return
        wanted = {i for item in audited for i in related_ids(item.event)} - learned.keys()
        known = dict(learned)
        if wanted:
            cur.execute(SQL("SELECT * FROM {0}.audit_log_scopes WHERE aggregate_id = ANY(%s)")
                        .format(Identifier(schema)), (list(wanted),))
            known.update({row["aggregate_id"]: (row["project_id"], row["org_id"], row["user_id"])
                          for row in cur.fetchall()})
        rows: dict[UUID, dict[str, Any]] = {}
        for item in audited:
            row = _row(item, known)
            found = rows.get(row["id"])
            rows[row["id"]] = row if found is None else _merge(found, row)
        _upsert(cur, schema, list(rows.values()))


def _scope_of(event: Any, known: dict[UUID, tuple[Any, Any, Any]]) -> list[Any]:
    scope = list(own_scope(event))
    for aggregate_id in related_ids(event):
        for index, value in enumerate(known.get(aggregate_id, (None, None, None))):
            if scope[index] is None:
                scope[index] = value
    return scope


def _row(item: Item, known: dict[UUID, tuple[Any, Any, Any]]) -> dict[str, Any]:
    event, provenance = item.event, item.event.provenance
    said = fact(event)
    user, service_account, role, ref = actor(provenance)
    project, org, subject = _scope_of(event, known)
    return {"id": row_id(provenance, event), "rank": said.rank,
            "lead_notification_id": item.notification_id,
            "first_notification_id": item.notification_id, "occurred_at": event.timestamp,
            "correlation_id": str(provenance.get("correlation_id") or ""),
            "causation_id": provenance.get("causation_id"), "actor_user_id": user,
            "actor_service_account_id": service_account, "actor_role": role, "actor_ref": ref,
            "source": str(provenance.get("source") or "system"), "action": said.action,
            "target_type": said.target_type, "target_id": said.target_id,
            "result": result_of(said), "details": said.details, "project_id": project,
            "org_id": org, "subject_user_id": subject, "event_count": 1}


def _leads(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a["rank"], -a["lead_notification_id"]) > (b["rank"], -b["lead_notification_id"])


def _merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The same merge ``_upsert`` makes in SQL, for two parts of one batch."""
    lead, other = (new, old) if _leads(new, old) else (old, new)
    merged = dict(old)
    merged.update({c: lead[c] for c in LEAD})
    merged["details"] = {**other["details"], **lead["details"]}
    merged["occurred_at"] = min(old["occurred_at"], new["occurred_at"])
    merged["first_notification_id"] = min(old["first_notification_id"],
                                          new["first_notification_id"])
    for column in ("project_id", "org_id", "subject_user_id"):
        merged[column] = old[column] or new[column]
    merged["event_count"] = old["event_count"] + new["event_count"]
    return merged


def _upsert(cur: Cursor[Any], schema: str, rows: list[dict[str, Any]]) -> None:
    """One statement for the batch: ``rows`` holds one row per id (``apply_many`` merged
    them), as ON CONFLICT DO UPDATE may touch a row only once per statement."""
    cur.execute(_upsert_sql(schema),
                [[Jsonb(row[c]) for row in rows] if c == "details" else [row[c] for row in rows]
                 for c in COLUMNS])


@lru_cache(maxsize=8)
def _upsert_sql(schema: str) -> SQL:
    """The upsert of ``_upsert``, composed once per schema (it has many parts)."""
    leads = SQL("(EXCLUDED.rank > a.rank OR (EXCLUDED.rank = a.rank"
                " AND EXCLUDED.lead_notification_id < a.lead_notification_id))")
    sets = [SQL("{0} = CASE WHEN {1} THEN EXCLUDED.{0} ELSE a.{0} END").format(
        Identifier(c), leads) for c in LEAD]
    sets += [SQL("details = CASE WHEN {0} THEN a.details || EXCLUDED.details"
                 " ELSE EXCLUDED.details || a.details END").format(leads),
             SQL("occurred_at = LEAST(a.occurred_at, EXCLUDED.occurred_at)"),
             SQL("first_notification_id = LEAST(a.first_notification_id,"
                 " EXCLUDED.first_notification_id)"),
             SQL("event_count = a.event_count + EXCLUDED.event_count")]
    sets += [SQL("{0} = COALESCE(a.{0}, EXCLUDED.{0})").format(Identifier(c))
             for c in ("project_id", "org_id", "subject_user_id")]
    return SQL(SQL("INSERT INTO {0}.audit_logs AS a ({1}) SELECT * FROM unnest({2})"
                   " ON CONFLICT (id) DO UPDATE SET {3}").format(
        Identifier(schema), SQL(", ").join(Identifier(c) for c in COLUMNS),
        typed_arrays(tuple(TYPES.values())),
        SQL(", ").join(sets)).as_string())


# ---- queries ------------------------------------------------------------------------------
@dataclass(frozen=True)
class AuditFilter:
    """Which rows a list or export reads. Scope first (any of them set narrows it),
    then the caller's filters; ``None`` or an empty tuple means "any"."""

    visible_to: UUID | None = None  # the caller's own rows: actor or subject
    project_id: UUID | None = None
    org_id: UUID | None = None
    actor_user_id: UUID | None = None
    actor_roles: tuple[str, ...] = ()
    actions: tuple[str, ...] = ()
    target_type: str | None = None
    correlation_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def where(self) -> tuple[list[Composed | SQL], list[Any]]:
        clauses: list[Composed | SQL] = [SQL("TRUE")]
        params: list[Any] = []
        if self.visible_to is not None:
            clauses.append(SQL("(actor_user_id = %s OR actor_service_account_id = %s"
                               " OR subject_user_id = %s)"))
            params += [self.visible_to] * 3
        for column, op, value in (("project_id", "=", self.project_id),
                                  ("org_id", "=", self.org_id),
                                  ("actor_user_id", "=", self.actor_user_id),
                                  ("target_type", "=", self.target_type),
                                  ("correlation_id", "=", self.correlation_id),
                                  ("occurred_at", ">=", self.since),
                                  ("occurred_at", "<=", self.until)):
            if value is not None:
                clauses.append(SQL("{0} " + op + " %s").format(Identifier(column)))
                params.append(value)
        for column, values in (("actor_role", self.actor_roles), ("action", self.actions)):
            if values:
                clauses.append(SQL("{0} = ANY(%s)").format(Identifier(column)))
                params.append(list(values))
        return clauses, params


def _column(name: str) -> Composed:
    return SQL("{0} COLLATE \"C\"" if name in TEXT_KEYS else "{0}").format(Identifier(name))


def _after(sort: str, after: list[Any]) -> tuple[Composed | SQL, list[Any]]:
    """Rows after ``after`` (the last row's key values) in ``sort`` order."""
    keys = SORTS[sort]
    alternatives: list[Composed] = []
    params: list[Any] = []
    for index, (column, direction) in enumerate(keys):
        parts = [SQL("{0} = %s").format(_column(c)) for c, _ in keys[:index]]
        parts.append(SQL("{0} " + ("<" if direction == "desc" else ">") + " %s").format(
            _column(column)))
        params += list(after[:index + 1])
        alternatives.append(SQL("(") + SQL(" AND ").join(parts) + SQL(")"))
    return SQL("(") + SQL(" OR ").join(alternatives) + SQL(")"), params


def _select(schema: str, filters: AuditFilter, sort: str, after: list[Any] | None
            ) -> tuple[Composed, list[Any]]:
    clauses, params = filters.where()
    if after is not None:
        clause, more = _after(sort, after)
        clauses.append(clause)
        params += more
    order = SQL(", ").join(SQL("{0} " + d.upper()).format(_column(c)) for c, d in SORTS[sort])
    return SQL("SELECT * FROM {0}.audit_logs WHERE {1} ORDER BY {2}").format(
        Identifier(schema), SQL(" AND ").join(clauses), order), params


def sort_key(row: dict[str, Any], sort: str) -> list[Any]:
    """The row's key in ``sort`` order (the cursor's ``after``)."""
    return [row[c] for c, _ in SORTS[sort]]


def list_audit_logs(cur: Cursor[Any], schema: str, filters: AuditFilter, *, sort: str,
                    after: list[Any] | None, limit: int) -> list[dict[str, Any]]:
    query, params = _select(schema, filters, sort, after)
    cur.execute(query + SQL(" LIMIT %s"), (*params, limit))
    return [dict(row) for row in cur.fetchall()]


def stream_audit_logs(conn: Connection[Any], schema: str, filters: AuditFilter, *, sort: str,
                      chunk: int = 500) -> Iterator[dict[str, Any]]:
    """Every matching row in ``sort`` order through a server-side cursor."""
    query, params = _select(schema, filters, sort, None)
    with conn.transaction(), conn.cursor(name="audit_export") as cur:
        cur.itersize = chunk
        cur.execute(query, params)
        yield from cur


# ---- rows as the contract's JSON ------------------------------------------------------------
def _iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def _label(value: str) -> str:
    return value.replace("_", " ").replace(".", " ").capitalize()


def audit_log_json(row: dict[str, Any]) -> dict[str, Any]:
    """A row as the contract's ``AuditLogEntry``; ``metadata`` holds only the row's
    allow-listed details plus where the command came from."""
    target_id = row["target_id"] or None
    action = row["action"]
    metadata = {**row["details"], "source": row["source"], "event_count": row["event_count"]}
    actor_label = row["actor_ref"] if row["actor_role"] != "system" else \
        f"system ({row['actor_ref']})"
    target_label = f"{row['target_type']} {target_id}" if target_id else row["target_type"]
    failed = row["result"] == "failure"
    return {
        "id": str(row["id"]),
        "actor_user_id": None if row["actor_user_id"] is None else str(row["actor_user_id"]),
        "actor_service_account_id": None if row["actor_service_account_id"] is None
        else str(row["actor_service_account_id"]),
        "actor_role": row["actor_role"], "action": action, "target_type": row["target_type"],
        "target_id": target_id, "result": row["result"], "correlation_id": row["correlation_id"],
        "occurred_at": _iso(row["occurred_at"]), "metadata": metadata,
        "presentation": {
            "actor_label": actor_label, "target_label": target_label,
            "target_type_label": _label(row["target_type"]), "action_label": _label(action),
            "action_category": action.split(".")[0],
            "action_family": ".".join(action.split(".")[:2]),
            "summary": f"{actor_label} {'failed to ' if failed else ''}{action} on {target_label}",
            "result_label": "Failed" if failed else "Succeeded",
            "severity": "error" if failed else "success",
            "safe_details": dict(row["details"]),
            "debug_refs": {"correlation_id": row["correlation_id"],
                           "request_id": row["correlation_id"] or None,
                           "actor_ref": row["actor_ref"],
                           "target_ref": f"{row['target_type']}:{target_id}" if target_id
                           else None},
        },
    }


#: the CSV export's columns, in order (``metadata`` as canonical JSON)
CSV_COLUMNS = ("id", "occurred_at", "actor_role", "actor_user_id", "actor_service_account_id",
               "action", "target_type", "target_id", "result", "correlation_id", "metadata")
