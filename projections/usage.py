"""Usage read model: ``usage_records`` (one row per meter, with its accrued cost) and
``rated_usage_lines`` (one row per rated slice).

Fed by ``UsageRecord`` events; read by ``listBillingUsage``, ``exportBillingUsageCsv``
(streamed through a server-side cursor), ``listBillingRatedUsage`` and
``getBillingRatedUsage``. Every read is scoped to the record's owner
(``requested_by_user_id``, the user whose ledger is charged).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg import Connection, Cursor
from psycopg.sql import SQL, Composed, Identifier
from psycopg.types.json import Jsonb

from domain.usage import UsageRecord

#: sort name -> (column, direction); every order breaks ties by id in the same direction
SORTS = {"start_time_desc": ("start_time", "DESC"), "start_time_asc": ("start_time", "ASC"),
         "cost_desc": ("cost_minor", "DESC"), "cost_asc": ("cost_minor", "ASC")}
RECORD_FIELDS = ("usage_source", "usage_unit", "allocation_id", "app_instance_id",
                 "requested_by_user_id", "org_id", "project_id", "sku", "units",
                 "control_plane_component", "operating_mode", "control_plane_scope",
                 "runtime_backend")


class Usage:
    name = "usage"
    tables = ("usage_records", "rated_usage_lines")

    def ddl(self, schema: str) -> list[str]:
        s = f'"{schema}"'
        return [
            f"CREATE TABLE IF NOT EXISTS {s}.usage_records ("
            " id uuid PRIMARY KEY, usage_source text NOT NULL, usage_unit text NOT NULL,"
            " allocation_id uuid, app_instance_id uuid, requested_by_user_id uuid NOT NULL,"
            " org_id uuid, project_id uuid, sku text, units bigint NOT NULL,"
            " control_plane_component boolean NOT NULL, operating_mode text,"
            " control_plane_scope text, runtime_backend text, start_time timestamptz NOT NULL,"
            " end_time timestamptz, last_billed_at timestamptz, cost_minor bigint NOT NULL,"
            " currency text NOT NULL, pricing_source text NOT NULL, pricing_plan_id uuid,"
            " pricing_plan_version text, pricing_snapshot jsonb NOT NULL, fx_snapshot jsonb,"
            " notification_id bigint NOT NULL)",
            f"CREATE INDEX IF NOT EXISTS usage_records_by_start ON {s}.usage_records"
            " (requested_by_user_id, start_time, id)",
            f"CREATE INDEX IF NOT EXISTS usage_records_by_cost ON {s}.usage_records"
            " (requested_by_user_id, cost_minor, id)",
            f"CREATE TABLE IF NOT EXISTS {s}.rated_usage_lines ("
            " id uuid PRIMARY KEY, usage_record_id uuid NOT NULL, org_id uuid, project_id uuid,"
            " requested_by_user_id uuid NOT NULL, usage_source text NOT NULL,"
            " usage_unit text NOT NULL, bill_from timestamptz NOT NULL,"
            " bill_to timestamptz NOT NULL, unit_quantity_millis bigint NOT NULL,"
            " units bigint NOT NULL, unit_price_minor bigint NOT NULL,"
            " unit_price_currency text NOT NULL, amount_minor bigint NOT NULL,"
            " amount_currency text NOT NULL, pricing_source text NOT NULL, pricing_plan_id uuid,"
            " pricing_plan_version text, pricing_snapshot jsonb NOT NULL, fx_snapshot jsonb,"
            " rating_key text NOT NULL UNIQUE, ledger_entry_id uuid, invoice_line_id uuid,"
            " invoice_id uuid, created_at timestamptz NOT NULL, notification_id bigint NOT NULL)",
            f"CREATE INDEX IF NOT EXISTS rated_usage_lines_by_owner ON {s}.rated_usage_lines"
            " (requested_by_user_id, bill_from, id)",
            f"CREATE INDEX IF NOT EXISTS rated_usage_lines_by_record ON {s}.rated_usage_lines"
            " (usage_record_id, bill_from)",
        ]

    def apply(self, cur: Cursor[Any], schema: str, event: Any, notification_id: int) -> None:
        s = Identifier(schema)
        if isinstance(event, UsageRecord.Created):
            meter, terms = event.meter, event.terms
            fx = terms["fx_snapshot"]
            cur.execute(SQL(
                "INSERT INTO {0}.usage_records (id, " + ", ".join(RECORD_FIELDS) + ", start_time,"
                " cost_minor, currency, pricing_source, pricing_plan_id, pricing_plan_version,"
                " pricing_snapshot, fx_snapshot, notification_id) VALUES (%s, "
                + "%s, " * len(RECORD_FIELDS) + "%s, 0, %s, %s, %s, %s, %s, %s, %s)").format(s),
                (event.originator_id, *(meter[f] for f in RECORD_FIELDS), event.start_time,
                 terms["amount_currency"], terms["pricing_source"], terms["pricing_plan_id"],
                 terms["pricing_plan_version"], Jsonb(terms["pricing_snapshot"]),
                 None if fx is None else Jsonb(fx), notification_id))
        elif isinstance(event, UsageRecord.SliceRated):
            cur.execute(SQL(
                "INSERT INTO {0}.rated_usage_lines SELECT %s, r.id, r.org_id, r.project_id,"
                " r.requested_by_user_id, r.usage_source, r.usage_unit, %s, %s, %s, %s, %s, %s,"
                " %s, %s, r.pricing_source, r.pricing_plan_id, r.pricing_plan_version,"
                " r.pricing_snapshot, r.fx_snapshot, %s, %s, NULL, NULL, %s, %s"
                " FROM {0}.usage_records r WHERE r.id = %s").format(s), (
                event.rated_usage_line_id, event.bill_from, event.bill_to,
                event.unit_quantity_millis, event.units, event.unit_price["amount_minor"],
                event.unit_price["currency"], event.amount["amount_minor"],
                event.amount["currency"], event.rating_key, event.ledger_entry_id,
                event.timestamp, notification_id, event.originator_id))
            if cur.rowcount != 1:
                raise LookupError(f"usage record {event.originator_id} is not in the read model")
            cur.execute(SQL("UPDATE {0}.usage_records SET last_billed_at = %s, cost_minor = %s,"
                            " notification_id = %s WHERE id = %s").format(s),
                        (event.bill_to, event.cost_after_minor, notification_id,
                         event.originator_id))
        elif isinstance(event, UsageRecord.Stopped):
            cur.execute(SQL("UPDATE {0}.usage_records SET end_time = %s, notification_id = %s"
                            " WHERE id = %s").format(s),
                        (event.end_time, notification_id, event.originator_id))
            if cur.rowcount != 1:
                raise LookupError(f"usage record {event.originator_id} is not in the read model")


# ---- queries ------------------------------------------------------------------------
@dataclass(frozen=True)
class UsageFilter:
    """The caller and the list's filters. ``since``/``until`` select records whose
    usage interval ``[start_time, end_time or now)`` overlaps ``[since, until)``."""

    owner: UUID
    allocation_id: UUID | None = None
    app_instance_id: UUID | None = None
    usage_source: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def where(self) -> tuple[Composed, list[Any]]:
        clauses, params = [SQL("requested_by_user_id = %s")], [self.owner]
        for column, value in (("allocation_id", self.allocation_id),
                              ("app_instance_id", self.app_instance_id),
                              ("usage_source", self.usage_source)):
            if value is not None:
                clauses.append(SQL("{0} = %s").format(Identifier(column)))
                params.append(value)
        if self.since is not None:
            clauses.append(SQL("(end_time IS NULL OR end_time > %s)"))
            params.append(self.since)
        if self.until is not None:
            clauses.append(SQL("start_time < %s"))
            params.append(self.until)
        return SQL(" AND ").join(clauses), params


def _usage_sql(schema: str, where: Composed, sort: str, keyset: bool) -> Composed:
    column, direction = SORTS[sort]
    op = "<" if direction == "DESC" else ">"
    after = SQL("")
    if keyset:
        after = SQL(" AND ({0}, id) " + op + " (%s, %s)").format(Identifier(column))
    return SQL("SELECT * FROM {0}.usage_records WHERE {1}{2} ORDER BY {3} "
               + direction + ", id " + direction).format(
        Identifier(schema), where, after, Identifier(column))


def list_usage(cur: Cursor[Any], schema: str, filters: UsageFilter, *, sort: str,
               after: tuple[Any, UUID] | None, limit: int) -> list[dict[str, Any]]:
    """One page in ``sort`` order; ``after`` is the last (sort value, id) seen."""
    where, params = filters.where()
    query = _usage_sql(schema, where, sort, after is not None)
    cur.execute(SQL("{0} LIMIT %s").format(query),
                (*params, *(after or ()), limit))
    return [dict(row) for row in cur.fetchall()]


def stream_usage(conn: Connection[Any], schema: str, filters: UsageFilter, *, sort: str,
                 chunk: int = 500) -> Iterator[dict[str, Any]]:
    """Every matching record in ``sort`` order through a server-side cursor, ``chunk``
    rows per round trip: an export of any size never sits in memory."""
    where, params = filters.where()
    with conn.transaction(), conn.cursor(name="usage_export") as cur:
        cur.itersize = chunk
        cur.execute(_usage_sql(schema, where, sort, False), params)
        yield from cur


def sort_value(row: dict[str, Any], sort: str) -> Any:
    return row[SORTS[sort][0]]


#: A rated line with the invoice it is on now: the line of the newest invoice revision
#: that is not void (``invoices`` read model, same schema). A void re-issues its lines
#: on a new revision, so the link is joined at read time rather than frozen into
#: ``rated_usage_lines`` (whose own ``invoice_id``/``invoice_line_id`` columns stay null).
LINES_WITH_INVOICE = (
    "SELECT l.*, inv.id AS linked_invoice_line_id, inv.invoice_id AS linked_invoice_id"
    " FROM {0}.rated_usage_lines l LEFT JOIN LATERAL ("
    " SELECT il.id, il.invoice_id FROM {0}.invoice_lines il"
    " JOIN {0}.invoices i ON i.id = il.invoice_id"
    " WHERE il.rated_usage_line_id = l.id AND i.status <> 'void'"
    " ORDER BY i.revision DESC LIMIT 1) inv ON true")


def _linked(row: Any) -> dict[str, Any]:
    found = dict(row)
    found["invoice_line_id"] = found.pop("linked_invoice_line_id")
    found["invoice_id"] = found.pop("linked_invoice_id")
    return found


def list_lines(cur: Cursor[Any], schema: str, *, owner: UUID, usage_record_id: UUID | None,
               after: tuple[datetime, UUID] | None, limit: int) -> list[dict[str, Any]]:
    """The owner's rated lines, newest slice first (``bill_from`` then id, descending)."""
    clauses, params = [SQL("l.requested_by_user_id = %s")], [owner]
    if usage_record_id is not None:
        clauses.append(SQL("l.usage_record_id = %s"))
        params.append(usage_record_id)
    if after is not None:
        clauses.append(SQL("(l.bill_from, l.id) < (%s, %s)"))
        params += list(after)
    cur.execute(SQL(LINES_WITH_INVOICE + " WHERE {1} ORDER BY l.bill_from DESC, l.id DESC"
                    " LIMIT %s").format(
        Identifier(schema), SQL(" AND ").join(clauses)), (*params, limit))
    return [_linked(row) for row in cur.fetchall()]


def get_line(cur: Cursor[Any], schema: str, *, owner: UUID, line_id: UUID) -> dict[str, Any] | None:
    """The line if it exists and the owner's ledger was charged for it."""
    cur.execute(SQL(LINES_WITH_INVOICE + " WHERE l.id = %s AND l.requested_by_user_id = %s")
                .format(Identifier(schema)), (line_id, owner))
    row = cur.fetchone()
    return None if row is None else _linked(row)
