"""Workloads read model: the V3 workbench rows and V3 tasks (allocations §6.4,
app-instances §6.4).

Fed by ``Allocation``, ``AppInstance`` and ``AppCatalogEntry`` events, and by the
``UsageRecord`` events of ``app_runtime`` meters. Each row keeps a copy of its
aggregate's state (``state_of``), moved with the aggregate's own code (``fold``), and
its *steps* (the statuses it entered: ``domain.workload_views.step_of`` for a lease,
``domain.app_workload_views.app_step_of`` for an app); the JSON is built from them by
those modules, so a rebuild reproduces every row.

- ``v3_workload_rows``: one row per workload, a compute row per allocation (``kind``
  ``compute``) and an app row per app instance (its V3 kind), with the columns lists
  filter, count and page on. What depends on the clock is kept as the moment it
  changes: ``archive_after`` (the row is history from then on) and ``action_until``
  (the end of a recovery window). An app row lists the allocations it holds live
  bindings on (``bound_allocation_ids``): the compute rows it blocks.
- ``v3_tasks``: one row per launch, release, restart, and app launch or operation,
  with its ``V3TaskSummary`` and timeline.
- ``v3_app_meters``: one row per ``app_runtime`` meter, with its hourly rate and
  whether it is open; ``v3_app_kinds``: each catalog app's V3 kind
  (``domain.app_catalog_views.app_kind`` of its folded ``AppCatalogEntry``). Both are
  kept apart from the app rows and joined at query time, so they are right whatever
  order the events of different aggregates arrive in, and an app row's kind follows
  its catalog entry.

The queries read the usage (accrued cost), billing ledger (balances) and inventory
(node liveness) tables beside these, so their answers are as current as the least
current of those read models (``PROJECTIONS``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg import Cursor
from psycopg.sql import SQL, Composed, Identifier
from psycopg.types.json import Jsonb

from domain import app_workload_views as apps
from domain.allocation_views import complete
from domain.allocations import Allocation
from domain.app_catalog_views import app_kind
from domain.app_instances import AppInstance
from domain.apps import AppCatalogEntry
from domain.inventory import fold, state_of
from domain.usage import UsageRecord
from domain.workload_views import (COUNT_BUCKETS, OwnerFunds, actionable_until, archive_after,
                                   compute_tasks, entered_at, hourly_rate, metered,
                                   search_text, step_of)
from projections.store import Item

#: the read models a workload query reads
PROJECTIONS = ("workloads", "usage", "billing_ledger", "inventory")
ROW_COLUMNS = ("id", "kind", "allocation_id", "project_id", "owner_user_id", "status",
               "created_at", "status_at", "archive_after", "action_until", "metered",
               "rate_minor", "rate_currency", "search_text", "node_id", "state", "steps",
               "notification_id", "app_instance_id", "bound_allocation_ids", "app_slug")
#: the ``kind`` column of every app row (its V3 kind is its catalog kind, joined at
#: query time from ``v3_app_kinds``: ``KIND_SQL``)
APP_FAMILY = "app"
#: a row's V3 kind, in SQL (``w`` the row, ``k`` its app's ``v3_app_kinds`` row)
KIND_SQL = ("(CASE WHEN w.kind = 'compute' THEN 'compute' WHEN k.kind IN ("
            + ", ".join(f"'{kind}'" for kind in apps.WORKLOAD_KINDS) + ") THEN k.kind"
            " ELSE 'app' END)")


class Workloads:
    name = "workloads"
    tables = ("v3_workload_rows", "v3_tasks", "v3_app_meters", "v3_app_kinds")

    def ddl(self, schema: str) -> list[str]:
        s = f'"{schema}"'
        return [
            f"CREATE TABLE IF NOT EXISTS {s}.v3_workload_rows ("
            " id text PRIMARY KEY, kind text NOT NULL, allocation_id uuid,"
            " project_id uuid NOT NULL, owner_user_id uuid NOT NULL, status text NOT NULL,"
            " created_at timestamptz NOT NULL, status_at timestamptz NOT NULL,"
            " archive_after timestamptz, action_until timestamptz, metered boolean NOT NULL,"
            " rate_minor bigint NOT NULL, rate_currency text NOT NULL,"
            " search_text text NOT NULL, node_id uuid, state jsonb NOT NULL,"
            " steps jsonb NOT NULL, notification_id bigint NOT NULL)",
            f"ALTER TABLE {s}.v3_workload_rows ADD COLUMN IF NOT EXISTS app_instance_id uuid",
            f"ALTER TABLE {s}.v3_workload_rows ADD COLUMN IF NOT EXISTS"
            " bound_allocation_ids uuid[] NOT NULL DEFAULT '{}'",
            f"ALTER TABLE {s}.v3_workload_rows ADD COLUMN IF NOT EXISTS app_slug text",
            f"CREATE INDEX IF NOT EXISTS v3_workload_rows_page ON {s}.v3_workload_rows"
            " (project_id, created_at DESC, id DESC)",
            f"CREATE INDEX IF NOT EXISTS v3_workload_rows_burn ON {s}.v3_workload_rows"
            " (owner_user_id) WHERE metered",
            f"CREATE INDEX IF NOT EXISTS v3_workload_rows_bound ON {s}.v3_workload_rows"
            " USING gin (bound_allocation_ids)",
            f"CREATE TABLE IF NOT EXISTS {s}.v3_tasks ("
            " id uuid PRIMARY KEY, workload_id text NOT NULL, project_id uuid NOT NULL,"
            " kind text NOT NULL, status text NOT NULL, created_at timestamptz NOT NULL,"
            " task jsonb NOT NULL, timeline jsonb NOT NULL, notification_id bigint NOT NULL)",
            f"CREATE INDEX IF NOT EXISTS v3_tasks_page ON {s}.v3_tasks"
            " (project_id, created_at DESC, id DESC)",
            f"CREATE TABLE IF NOT EXISTS {s}.v3_app_meters ("
            " id uuid PRIMARY KEY, app_instance_id uuid NOT NULL, owner_user_id uuid NOT NULL,"
            " rate_minor bigint NOT NULL, currency text NOT NULL, open boolean NOT NULL,"
            " notification_id bigint NOT NULL)",
            f"CREATE INDEX IF NOT EXISTS v3_app_meters_app ON {s}.v3_app_meters"
            " (app_instance_id) WHERE open",
            f"CREATE INDEX IF NOT EXISTS v3_app_meters_owner ON {s}.v3_app_meters"
            " (owner_user_id) WHERE open",
            f"CREATE TABLE IF NOT EXISTS {s}.v3_app_kinds ("
            " id uuid PRIMARY KEY, slug text NOT NULL UNIQUE, kind text NOT NULL,"
            " state jsonb NOT NULL, notification_id bigint NOT NULL)",
        ]

    def apply(self, cur: Cursor[Any], schema: str, event: Any, notification_id: int) -> None:
        self.apply_many(cur, schema, [Item(notification_id, event)])

    def apply_many(self, cur: Cursor[Any], schema: str, items: Sequence[Item]) -> None:
        """Fold the batch in memory (each touched aggregate loaded once), then write
        each touched row and its tasks once."""
        s = Identifier(schema)
        rows: list[tuple[Any, ...]] = []
        tasks: list[tuple[Any, ...]] = []
        leases = [item for item in items if isinstance(item.event, Allocation.Event)]
        for state, steps, last in _fold(cur, s, leases, Allocation, step_of):
            if not complete(state["lease"]):
                continue  # imported or planted by a test: nothing to show a workbench
            rows.append(_row_values(state, steps, last))
            tasks += _task_values(state["_id"], state["lease"]["project_id"],
                                  compute_tasks(state, steps), last)
        instances = [item for item in items if isinstance(item.event, AppInstance.Event)]
        for state, steps, last in _fold(cur, s, instances, AppInstance, apps.app_step_of):
            rows.append(_app_row_values(state, steps, last))
            tasks += _task_values(state["_id"], state["spec"]["project_id"],
                                  apps.app_tasks(state, steps), last)
        _apply_meters(cur, s, items)
        _apply_kinds(cur, s, [item for item in items
                              if isinstance(item.event, AppCatalogEntry.Event)])
        if rows:
            cur.executemany(SQL(
                "INSERT INTO {0}.v3_workload_rows (" + ", ".join(ROW_COLUMNS) + ") VALUES ("
                + ", ".join(["%s"] * len(ROW_COLUMNS)) + ") ON CONFLICT (id) DO UPDATE SET "
                + ", ".join(f"{c} = EXCLUDED.{c}" for c in ROW_COLUMNS[1:])).format(s), rows)
        if tasks:
            cur.executemany(SQL(
                "INSERT INTO {0}.v3_tasks VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, task = EXCLUDED.task,"
                " timeline = EXCLUDED.timeline, notification_id = EXCLUDED.notification_id")
                .format(s), tasks)


def _fold(cur: Cursor[Any], s: Identifier, mine: list[Item], cls: type[Any],
          step: Callable[[Any], dict[str, Any] | None]
          ) -> list[tuple[dict[str, Any], list[dict[str, Any]], int]]:
    """(state, steps, last notification id) of every row ``mine`` touches, after the
    batch: each row loaded once, moved by the aggregate's own code."""
    if not mine:
        return []
    cur.execute(SQL("SELECT id, state, steps FROM {0}.v3_workload_rows WHERE id = ANY(%s)")
                .format(s), (list({str(item.event.originator_id) for item in mine}),))
    stored = {row["id"]: (row["state"], row["steps"]) for row in cur.fetchall()}
    folded: dict[str, Any] = {}
    steps: dict[str, list[dict[str, Any]]] = {}
    last: dict[str, int] = {}
    for item in mine:
        key = str(item.event.originator_id)
        if key in folded:
            item.event.mutate(folded[key])
        elif key in stored or isinstance(item.event, cls.Created):
            state, known = stored.get(key, (None, []))
            folded[key], steps[key] = fold(cls, state, item.event), list(known)
        else:
            continue  # an aggregate this read model never kept (see the callers)
        entered = step(item.event)
        if entered is not None:
            steps[key].append(entered)
        last[key] = item.notification_id
    return [(state_of(aggregate), steps[key], last[key]) for key, aggregate in folded.items()]


def _task_values(workload_id: str, project_id: str, found: list[dict[str, Any]],
                 notification_id: int) -> list[tuple[Any, ...]]:
    return [(t["task"]["id"], workload_id, project_id, t["task"]["kind"], t["task"]["status"],
             t["task"]["created_at"], Jsonb(t["task"]), Jsonb(t["timeline"]), notification_id)
            for t in found]


def _row_values(state: dict[str, Any], steps: list[dict[str, Any]],
                notification_id: int) -> tuple[Any, ...]:
    """A compute row's ``ROW_COLUMNS``."""
    lease, rate = state["lease"], hourly_rate(state)
    return (state["_id"], "compute", state["_id"], lease["project_id"],
            lease["requested_by_user_id"], state["status"], lease["created_at"],
            entered_at(steps), archive_after(state, steps), actionable_until(state, steps),
            metered(state), rate["amount_minor"], rate["currency"], search_text(state),
            lease["node_id"], Jsonb(state), Jsonb(steps), notification_id, None, [], None)


def _app_row_values(state: dict[str, Any], steps: list[dict[str, Any]],
                    notification_id: int) -> tuple[Any, ...]:
    """An app row's ``ROW_COLUMNS``; its rate lives in ``v3_app_meters``."""
    spec = state["spec"]
    member = apps.primary_member(state) or {}
    return (state["_id"], APP_FAMILY, apps.primary_allocation_id(state),
            spec["project_id"], spec["requested_by_user_id"], apps.v3_status(state),
            steps[0]["at"], apps.entered_at(steps), apps.archive_after(state, steps),
            apps.actionable_until(state, steps), False, 0, "", apps.search_text(state),
            member.get("bound_node_id"), Jsonb(state), Jsonb(steps), notification_id,
            state["_id"], [UUID(a) for a in apps.bound_allocations(state)], spec["app_slug"])


def _apply_kinds(cur: Cursor[Any], s: Identifier, mine: list[Item]) -> None:
    """Each catalog app's V3 kind (``app_kind`` of its folded state): what its
    instances' rows are listed and filtered as."""
    if not mine:
        return
    cur.execute(SQL("SELECT id, state FROM {0}.v3_app_kinds WHERE id = ANY(%s)").format(s),
                (list({item.event.originator_id for item in mine}),))
    stored = {row["id"]: row["state"] for row in cur.fetchall()}
    folded: dict[UUID, tuple[Any, int]] = {}
    for item in mine:
        key = item.event.originator_id
        if key in folded:
            item.event.mutate(folded[key][0])
            folded[key] = (folded[key][0], item.notification_id)
        elif key in stored or isinstance(item.event, AppCatalogEntry.Created):
            folded[key] = (fold(AppCatalogEntry, stored.get(key), item.event),
                           item.notification_id)
    cur.executemany(SQL(
        "INSERT INTO {0}.v3_app_kinds VALUES (%s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE"
        " SET kind = EXCLUDED.kind, state = EXCLUDED.state,"
        " notification_id = EXCLUDED.notification_id").format(s),
        [(key, app.slug, app_kind(app), Jsonb(state_of(app)), last)
         for key, (app, last) in folded.items()])


def _apply_meters(cur: Cursor[Any], s: Identifier, items: Sequence[Item]) -> None:
    """``app_runtime`` meters: a row when one opens (with its hourly rate), closed when
    it stops (a stop of any other meter matches no row)."""
    opened: dict[UUID, tuple[Any, ...]] = {}
    stopped: list[UUID] = []
    for item in items:
        event = item.event
        meter = event.meter if isinstance(event, UsageRecord.Created) else {}
        if meter.get("usage_source") == "app_runtime" and meter.get("app_instance_id"):
            rate = apps.meter_rate(event)
            opened[event.originator_id] = (
                event.originator_id, event.meter["app_instance_id"],
                event.meter["requested_by_user_id"], rate["amount_minor"], rate["currency"],
                True, item.notification_id)
        elif isinstance(event, UsageRecord.Stopped):
            stopped.append(event.originator_id)
    if opened:
        cur.executemany(SQL("INSERT INTO {0}.v3_app_meters VALUES (%s, %s, %s, %s, %s, %s, %s)"
                            " ON CONFLICT (id) DO NOTHING").format(s), list(opened.values()))
    if stopped:
        cur.execute(SQL("UPDATE {0}.v3_app_meters SET open = false WHERE id = ANY(%s)")
                    .format(s), (stopped,))


# ---- queries: workloads -------------------------------------------------------------------
#: a row with what other read models add to it: Σ usage cost (a lease's meter, or an
#: app's ``app_runtime`` meters), the node's liveness; for an app row its open meters'
#: rate, its owner's currency and its primary allocation's compute row; for a compute
#: row the live app that uses its allocation
_ROW_SELECT = (
    "SELECT w.kind, k.kind AS catalog_kind, k.state #>> '{{details,display_name}}'"
    " AS catalog_name, w.owner_user_id, w.allocation_id, w.state,"
    " w.steps, w.created_at, w.id,"
    " u.cost_minor AS accrued_minor, u.currency AS accrued_currency,"
    " n.status AS node_status, n.listed AS node_listed, m.rate_minor AS open_rate_minor,"
    " m.currency AS open_rate_currency, a.primary_currency AS owner_currency,"
    " p.state AS allocation_state, b.state AS host_state"
    " FROM {0}.v3_workload_rows w"
    " LEFT JOIN LATERAL (SELECT sum(cost_minor)::bigint AS cost_minor, min(currency) AS currency"
    "  FROM {0}.usage_records r WHERE r.requested_by_user_id = w.owner_user_id"
    "  AND ((w.kind = 'compute' AND r.allocation_id = w.allocation_id)"
    "   OR (w.kind <> 'compute' AND r.app_instance_id = w.app_instance_id"
    "       AND r.usage_source = 'app_runtime'))) u ON true"
    " LEFT JOIN {0}.inventory_nodes n ON n.id = w.node_id"
    " LEFT JOIN {0}.v3_app_kinds k ON k.slug = w.app_slug"
    " LEFT JOIN LATERAL (SELECT sum(rate_minor)::bigint AS rate_minor, min(currency) AS currency"
    "  FROM {0}.v3_app_meters am WHERE w.kind <> 'compute'"
    "  AND am.app_instance_id = w.app_instance_id AND am.open HAVING count(*) > 0) m ON true"
    " LEFT JOIN {0}.billing_accounts a ON w.kind <> 'compute'"
    "  AND a.owner_user_id = w.owner_user_id"
    " LEFT JOIN {0}.v3_workload_rows p ON w.kind <> 'compute' AND p.kind = 'compute'"
    "  AND p.id = w.allocation_id::text"
    " LEFT JOIN LATERAL (SELECT h.state FROM {0}.v3_workload_rows h WHERE w.kind = 'compute'"
    "  AND h.kind <> 'compute' AND h.project_id = w.project_id"
    "  AND h.bound_allocation_ids @> ARRAY[w.allocation_id]"
    "  ORDER BY h.created_at DESC LIMIT 1) b ON true")


def _money(minor: Any, currency: str | None) -> dict[str, Any] | None:
    return None if minor is None else {"amount_minor": int(minor), "currency": currency}


def _row(row: dict[str, Any]) -> dict[str, Any]:
    """A workload row as the query layer uses it: kind, owner, state, steps, accrued
    cost (None when no usage record exists), node (None when unknown); an app row adds
    its open meters' rate (None when none is open), its owner's currency and its
    primary allocation's state; a compute row the state of the app using it."""
    node = None if row["node_status"] is None else {"status": row["node_status"],
                                                    "listed": row["node_listed"]}
    return {"kind": row["kind"], "catalog_kind": row["catalog_kind"],
            "catalog_name": row["catalog_name"],
            "owner": str(row["owner_user_id"]), "state": row["state"],
            "steps": row["steps"],
            "accrued": _money(row["accrued_minor"], row["accrued_currency"]), "node": node,
            "open_rate": _money(row["open_rate_minor"], row["open_rate_currency"]),
            "owner_currency": row["owner_currency"], "allocation": row["allocation_state"],
            "host": row["host_state"], "key": [row["created_at"].isoformat(), row["id"]]}


def _workload_where(project_id: UUID, now: datetime, *, status: str | None, kind: str | None,
                    search: str | None, include_history: bool) -> tuple[Composed, list[Any]]:
    clauses, params = [SQL("w.project_id = %s")], [project_id]
    if status is not None:
        clauses.append(SQL("w.status = %s"))
        params.append(status)
    elif not include_history:  # an explicit status filter is a history query
        clauses.append(SQL("(w.archive_after IS NULL OR w.archive_after > %s)"))
        params.append(now)
    if kind is not None:
        clauses.append(SQL(KIND_SQL + " = %s"))
        params.append(kind)
    if search:
        clauses.append(SQL("strpos(w.search_text, %s) > 0"))
        params.append(search.lower())
    return SQL(" AND ").join(clauses), params


def list_workloads(cur: Cursor[Any], schema: str, project_id: UUID, now: datetime, *,
                   status: str | None, kind: str | None, search: str | None,
                   include_history: bool, after: list[Any] | None, limit: int
                   ) -> list[dict[str, Any]]:
    """One page of the project's rows, newest first (``created_at``, then id, both
    descending); ``after`` is the last row's ``key``."""
    where, params = _workload_where(project_id, now, status=status, kind=kind, search=search,
                                    include_history=include_history)
    if after is not None:
        where = SQL("{0} AND (w.created_at, w.id) < (%s, %s)").format(where)
        params += [datetime.fromisoformat(after[0]), after[1]]
    cur.execute(SQL(_ROW_SELECT + " WHERE {1} ORDER BY w.created_at DESC, w.id DESC LIMIT %s")
                .format(Identifier(schema), where), (*params, limit))
    return [_row(row) for row in cur.fetchall()]


def get_workload(cur: Cursor[Any], schema: str, project_id: UUID,
                 workload_id: str) -> dict[str, Any] | None:
    """The row, or None when it does not exist in ``project_id``."""
    cur.execute(SQL(_ROW_SELECT + " WHERE w.id = %s AND w.project_id = %s").format(
        Identifier(schema)), (workload_id, project_id))
    row = cur.fetchone()
    return None if row is None else _row(row)


def app_workloads(cur: Cursor[Any], schema: str, project_id: UUID, app_slug: str,
                  limit: int = 200) -> list[dict[str, Any]]:
    """The project's rows of the app's instances that are not gone, newest first."""
    cur.execute(SQL(_ROW_SELECT + " WHERE w.project_id = %s AND w.app_slug = %s"
                    " AND w.status <> 'released' ORDER BY w.created_at DESC, w.id DESC"
                    " LIMIT %s").format(Identifier(schema)), (project_id, app_slug, limit))
    return [_row(row) for row in cur.fetchall()]


def actionable_workloads(cur: Cursor[Any], schema: str, project_id: UUID, now: datetime,
                         limit: int) -> list[dict[str, Any]]:
    """The project's rows still inside their recovery window, latest entry first."""
    cur.execute(SQL(_ROW_SELECT + " WHERE w.project_id = %s AND w.action_until > %s"
                    " ORDER BY w.status_at DESC, w.id DESC LIMIT %s").format(Identifier(schema)),
                (project_id, now, limit))
    return [_row(row) for row in cur.fetchall()]


def workload_counts(cur: Cursor[Any], schema: str, project_id: UUID,
                    now: datetime) -> dict[str, int]:
    """``counts`` over every row of the project, whatever the list's filters."""
    buckets = [SQL("count(*) FILTER (WHERE status = ANY(%s)) AS {0}").format(Identifier(name))
               for name in COUNT_BUCKETS]
    cur.execute(SQL("SELECT {0}, count(*) FILTER (WHERE action_until > %s) AS needs_action"
                    " FROM {1}.v3_workload_rows WHERE project_id = %s").format(
        SQL(", ").join(buckets), Identifier(schema)),
        (*(list(statuses) for statuses in COUNT_BUCKETS.values()), now, project_id))
    row = cur.fetchone()
    return {name: int(row[name]) for name in (*COUNT_BUCKETS, "needs_action")}


def owner_funds(cur: Cursor[Any], schema: str, owner: UUID) -> OwnerFunds:
    """The owner's primary currency and balances (billing ledger read model) and the
    hourly burn of the owner's metered leases and open app meters, by currency."""
    s = Identifier(schema)
    cur.execute(SQL("SELECT a.primary_currency, b.currency, b.amount_minor"
                    " FROM {0}.billing_accounts a LEFT JOIN {0}.balances b"
                    " ON b.owner_user_id = a.owner_user_id WHERE a.owner_user_id = %s")
                .format(s), (owner,))
    rows = cur.fetchall()
    balances = {row["currency"]: int(row["amount_minor"]) for row in rows if row["currency"]}
    cur.execute(SQL("SELECT currency, sum(rate)::bigint AS burn FROM ("
                    " SELECT rate_currency AS currency, rate_minor AS rate"
                    " FROM {0}.v3_workload_rows WHERE metered AND owner_user_id = %s"
                    " UNION ALL SELECT currency, rate_minor FROM {0}.v3_app_meters"
                    " WHERE open AND owner_user_id = %s) burning GROUP BY currency").format(s),
                (owner, owner))
    burn = {row["currency"]: int(row["burn"]) for row in cur.fetchall()}
    return OwnerFunds(rows[0]["primary_currency"] if rows else None, balances, burn)


# ---- queries: tasks ------------------------------------------------------------------------
def list_tasks(cur: Cursor[Any], schema: str, project_id: UUID, *, status: str | None,
               after: list[Any] | None, limit: int) -> list[tuple[list[Any], dict[str, Any]]]:
    """(key, ``V3TaskSummary``) of one page of the project's tasks, newest first."""
    clauses, params = [SQL("project_id = %s")], [project_id]
    if status is not None:
        clauses.append(SQL("status = %s"))
        params.append(status)
    if after is not None:
        clauses.append(SQL("(created_at, id) < (%s, %s)"))
        params += [datetime.fromisoformat(after[0]), UUID(after[1])]
    cur.execute(SQL("SELECT id, created_at, task FROM {0}.v3_tasks WHERE {1}"
                    " ORDER BY created_at DESC, id DESC LIMIT %s").format(
        Identifier(schema), SQL(" AND ").join(clauses)), (*params, limit))
    return [([row["created_at"].isoformat(), str(row["id"])], row["task"])
            for row in cur.fetchall()]


def task_counts(cur: Cursor[Any], schema: str, project_id: UUID) -> dict[str, int]:
    """Tasks of the project by status; ``canceled`` and ``unknown`` are not counted."""
    cur.execute(SQL("SELECT status, count(*) AS n FROM {0}.v3_tasks WHERE project_id = %s"
                    " GROUP BY status").format(Identifier(schema)), (project_id,))
    found = {row["status"]: int(row["n"]) for row in cur.fetchall()}
    return {status: found.get(status, 0) for status in ("queued", "running", "succeeded", "failed")}


def get_task(cur: Cursor[Any], schema: str, project_id: UUID,
             task_id: UUID) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """(``V3TaskSummary``, timeline), or None when the task is not in ``project_id``."""
    cur.execute(SQL("SELECT task, timeline FROM {0}.v3_tasks WHERE id = %s AND project_id = %s")
                .format(Identifier(schema)), (task_id, project_id))
    row = cur.fetchone()
    return None if row is None else (row["task"], row["timeline"])
