"""Workloads read model: the V3 workbench rows and V3 tasks (allocations §6.4).

Fed by ``Allocation`` events. Each row keeps a copy of the allocation's state
(``state_of``), moved with the aggregate's own code (``fold``), and its *steps* (the
statuses it entered, ``domain.workload_views.step_of``); the JSON is built from them by
``domain.workload_views``, so a rebuild reproduces every row.

- ``v3_workload_rows``: one row per workload (a compute row per allocation; app rows
  will join with their own ``kind``), with the columns lists filter, count and page on.
  What depends on the clock is kept as the moment it changes: ``archive_after`` (the
  row is history from then on) and ``action_until`` (the end of a recovery window).
- ``v3_tasks``: one row per launch, release and restart, with its ``V3TaskSummary``
  and timeline.

The queries read the usage (accrued cost), billing ledger (balances) and inventory
(node liveness) tables beside these, so their answers are as current as the least
current of those read models (``PROJECTIONS``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg import Cursor
from psycopg.sql import SQL, Composed, Identifier
from psycopg.types.json import Jsonb

from domain.allocation_views import complete
from domain.allocations import Allocation
from domain.inventory import fold, state_of
from domain.workload_views import (COUNT_BUCKETS, OwnerFunds, actionable_until, archive_after,
                                   compute_tasks, entered_at, hourly_rate, metered,
                                   search_text, step_of)
from projections.store import Item

#: the read models a workload query reads
PROJECTIONS = ("workloads", "usage", "billing_ledger", "inventory")
ROW_COLUMNS = ("id", "kind", "allocation_id", "project_id", "owner_user_id", "status",
               "created_at", "status_at", "archive_after", "action_until", "metered",
               "rate_minor", "rate_currency", "search_text", "node_id", "state", "steps",
               "notification_id")


class Workloads:
    name = "workloads"
    tables = ("v3_workload_rows", "v3_tasks")

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
            f"CREATE INDEX IF NOT EXISTS v3_workload_rows_page ON {s}.v3_workload_rows"
            " (project_id, created_at DESC, id DESC)",
            f"CREATE INDEX IF NOT EXISTS v3_workload_rows_burn ON {s}.v3_workload_rows"
            " (owner_user_id) WHERE metered",
            f"CREATE TABLE IF NOT EXISTS {s}.v3_tasks ("
            " id uuid PRIMARY KEY, workload_id text NOT NULL, project_id uuid NOT NULL,"
            " kind text NOT NULL, status text NOT NULL, created_at timestamptz NOT NULL,"
            " task jsonb NOT NULL, timeline jsonb NOT NULL, notification_id bigint NOT NULL)",
            f"CREATE INDEX IF NOT EXISTS v3_tasks_page ON {s}.v3_tasks"
            " (project_id, created_at DESC, id DESC)",
        ]

    def apply(self, cur: Cursor[Any], schema: str, event: Any, notification_id: int) -> None:
        self.apply_many(cur, schema, [Item(notification_id, event)])

    def apply_many(self, cur: Cursor[Any], schema: str, items: Sequence[Item]) -> None:
        """Fold the batch in memory (each touched allocation loaded once), then write
        each touched row and its tasks once."""
        mine = [item for item in items if isinstance(item.event, Allocation.Event)]
        if not mine:
            return
        s = Identifier(schema)
        cur.execute(SQL("SELECT allocation_id, state, steps FROM {0}.v3_workload_rows"
                        " WHERE id = ANY(%s)").format(s),
                    (list({str(item.event.originator_id) for item in mine}),))
        stored = {row["allocation_id"]: (row["state"], row["steps"]) for row in cur.fetchall()}
        folded: dict[UUID, Any] = {}
        steps: dict[UUID, list[dict[str, Any]]] = {}
        last: dict[UUID, int] = {}
        for item in mine:
            key = item.event.originator_id
            if key in folded:
                item.event.mutate(folded[key])
            elif key in stored or isinstance(item.event, Allocation.Created):
                state, known = stored.get(key, (None, []))
                folded[key], steps[key] = fold(Allocation, state, item.event), list(known)
            else:
                continue  # a lease this read model never kept (see below)
            step = step_of(item.event)
            if step is not None:
                steps[key].append(step)
            last[key] = item.notification_id
        rows, tasks = [], []
        for key, aggregate in folded.items():
            state = state_of(aggregate)
            if not complete(state["lease"]):
                continue  # imported or planted by a test: nothing to show a workbench
            rows.append(_row_values(state, steps[key], last[key]))
            tasks += [(t["task"]["id"], state["_id"], state["lease"]["project_id"],
                       t["task"]["kind"], t["task"]["status"], t["task"]["created_at"],
                       Jsonb(t["task"]), Jsonb(t["timeline"]), last[key])
                      for t in compute_tasks(state, steps[key])]
        cur.executemany(SQL(
            "INSERT INTO {0}.v3_workload_rows (" + ", ".join(ROW_COLUMNS) + ") VALUES ("
            + ", ".join(["%s"] * len(ROW_COLUMNS)) + ") ON CONFLICT (id) DO UPDATE SET "
            + ", ".join(f"{c} = EXCLUDED.{c}" for c in ROW_COLUMNS[1:])).format(s), rows)
        cur.executemany(SQL(
            "INSERT INTO {0}.v3_tasks VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, task = EXCLUDED.task,"
            " timeline = EXCLUDED.timeline, notification_id = EXCLUDED.notification_id")
            .format(s), tasks)


def _row_values(state: dict[str, Any], steps: list[dict[str, Any]],
                notification_id: int) -> tuple[Any, ...]:
    """A compute row's ``ROW_COLUMNS``."""
    lease, rate = state["lease"], hourly_rate(state)
    return (state["_id"], "compute", state["_id"], lease["project_id"],
            lease["requested_by_user_id"], state["status"], lease["created_at"],
            entered_at(steps), archive_after(state, steps), actionable_until(state, steps),
            metered(state), rate["amount_minor"], rate["currency"], search_text(state),
            lease["node_id"], Jsonb(state), Jsonb(steps), notification_id)


# ---- queries: workloads -------------------------------------------------------------------
#: a row with what other read models add to it: Σ usage cost, the node's liveness
_ROW_SELECT = (
    "SELECT w.state, w.steps, w.created_at, w.id, u.cost_minor AS accrued_minor,"
    " u.currency AS accrued_currency, n.status AS node_status, n.listed AS node_listed"
    " FROM {0}.v3_workload_rows w"
    " LEFT JOIN LATERAL (SELECT sum(cost_minor)::bigint AS cost_minor, min(currency) AS currency"
    "  FROM {0}.usage_records r WHERE r.requested_by_user_id = w.owner_user_id"
    "  AND r.allocation_id = w.allocation_id) u ON true"
    " LEFT JOIN {0}.inventory_nodes n ON n.id = w.node_id")


def _row(row: dict[str, Any]) -> dict[str, Any]:
    """A workload row as the query layer uses it: state, steps, accrued cost (None when
    no usage record exists) and node (None when unknown)."""
    accrued = None if row["accrued_minor"] is None else {
        "amount_minor": int(row["accrued_minor"]), "currency": row["accrued_currency"]}
    node = None if row["node_status"] is None else {"status": row["node_status"],
                                                    "listed": row["node_listed"]}
    return {"state": row["state"], "steps": row["steps"], "accrued": accrued, "node": node,
            "key": [row["created_at"].isoformat(), row["id"]]}


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
        clauses.append(SQL("w.kind = %s"))
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
    hourly burn of the owner's metered workloads, by currency."""
    s = Identifier(schema)
    cur.execute(SQL("SELECT a.primary_currency, b.currency, b.amount_minor"
                    " FROM {0}.billing_accounts a LEFT JOIN {0}.balances b"
                    " ON b.owner_user_id = a.owner_user_id WHERE a.owner_user_id = %s")
                .format(s), (owner,))
    rows = cur.fetchall()
    balances = {row["currency"]: int(row["amount_minor"]) for row in rows if row["currency"]}
    cur.execute(SQL("SELECT rate_currency, sum(rate_minor)::bigint AS burn"
                    " FROM {0}.v3_workload_rows WHERE metered AND owner_user_id = %s"
                    " GROUP BY rate_currency").format(s), (owner,))
    burn = {row["rate_currency"]: int(row["burn"]) for row in cur.fetchall()}
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
