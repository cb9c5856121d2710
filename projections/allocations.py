"""Allocations read model: every lease and its sanitised timeline (allocations §6.4).

- ``allocations``: one row per lease. ``state`` is a copy of the ``Allocation``
  aggregate (``state_of``) moved with the aggregate's own code (``fold``), beside the
  columns the lists filter and sort on. The contract's ``Allocation`` is built at query
  time by ``domain.allocation_views.allocation_json`` (what the commands answer with)
  from ``state`` and the lease's placement claims in the inventory read model's
  ``inventory_claims`` (the claims live on ``NodeInventory``). A lease recorded without
  its scope (``served`` false: imported, or planted by a test) is kept but not served.
- ``allocation_timeline``: the lease's timeline items (allocations §3.3) in ``seq``
  order. One ``allocation_state`` item per status entered, one ``placement_claim``
  item per claim, one ``node_task`` item per node task. Items are appended and then
  only updated in place, and their status only moves forward: ``pending`` →
  ``running`` → a final status, which never changes again (nor does the item). The
  ``requested`` item is always ``seq`` 0 (its claims are reserved in the same save and
  may come first in the log); every other item takes the next ``seq``.

Fed by ``Allocation`` events and ``NodeInventory`` claim events. No raw task params or
output are kept: a task item holds its type, ids, times and the safe ``summary``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg import Cursor
from psycopg.sql import SQL, Identifier
from psycopg.types.json import Jsonb

from domain.allocation_views import allocation_json, complete
from domain.allocations import Allocation
from domain.inventory import NodeInventory, fold, state_of
from domain.skus import iso
from projections.store import Item

#: statuses a lease passes through (its state item runs while they are current)
TRANSITIONAL = ("requested", "provisioning", "restarting", "releasing")
FAILURES = ("failed", "restart_failed", "release_failed")
#: a claim's status -> its item's status
CLAIM_ITEM = {"reserved": "pending", "provisioning": "running", "releasing": "running",
              "active": "succeeded", "released": "succeeded", "failed": "failed"}
#: a node task's result -> its item's status
TASK_ITEM = {"success": "succeeded", "failed": "failed", "rejected": "failed",
             "expired": "failed", "superseded": "skipped"}
RANK = {"pending": 0, "running": 1}  # anything else is final
RELEASE_SUMMARY = {"user": "release requested", "admin_force": "force-released by an operator"}
COLUMNS = ("allocation_id", "seq", "kind", "ref", "name", "status", "task_id", "node_id",
           "started_at", "completed_at", "summary", "notification_id")


def _uuid(value: Any) -> UUID | None:
    try:
        return UUID(str(value)) if value is not None else None
    except ValueError:
        return None


def _row_columns(a: Allocation) -> dict[str, Any]:
    """The filter and sort columns. Never raises on an odd lease: a read model that
    cannot apply an event stalls every read model of the batch."""
    lease = a.lease
    scope = {"project_id": _uuid(lease.get("project_id")), "org_id": _uuid(lease.get("org_id")),
             "user_id": _uuid(lease.get("requested_by_user_id"))}
    try:
        created_at = datetime.fromisoformat(lease["created_at"])
    except (KeyError, TypeError, ValueError):
        created_at = None
    served = created_at is not None and complete(lease) and None not in scope.values()
    return {**scope, "node_id": _uuid(lease.get("node_id")), "status": a.status,
            "created_at": created_at or a.created_on, "served": served}


# ---- timeline items ---------------------------------------------------------------------------
@dataclass
class Timeline:
    """The open (pending or running) items and the next ``seq`` of the leases a batch
    touches; ``apply`` moves them on, ``write`` upserts the items that changed."""

    open: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    next_seq: dict[str, int] = field(default_factory=dict)
    changed: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, cur: Cursor[Any], schema: str, allocation_ids: list[UUID]) -> Timeline:
        found = cls()
        s = Identifier(schema)
        cur.execute(SQL("SELECT allocation_id, max(seq) AS last FROM {0}.allocation_timeline"
                        " WHERE allocation_id = ANY(%s) GROUP BY allocation_id").format(s),
                    (allocation_ids,))
        found.next_seq = {str(row["allocation_id"]): max(row["last"], 0) + 1
                          for row in cur.fetchall()}
        cur.execute(SQL("SELECT * FROM {0}.allocation_timeline WHERE allocation_id = ANY(%s)"
                        " AND status IN ('pending', 'running')").format(s), (allocation_ids,))
        for row in cur.fetchall():
            item = {k: (str(v) if isinstance(v, UUID) else v) for k, v in row.items()}
            found.open[(item["allocation_id"], item["kind"], item["ref"] or "")] = item
        return found

    def add(self, allocation_id: str, kind: str, ref: str | None, notification_id: int, *,
            seq: int | None = None, **fields: Any) -> None:
        if seq is None:
            seq = self.next_seq.get(allocation_id, 1)
            self.next_seq[allocation_id] = seq + 1
        item = {"allocation_id": allocation_id, "seq": seq, "kind": kind, "ref": ref,
                "task_id": None, "node_id": None, "started_at": None, "completed_at": None,
                "summary": None, **fields, "notification_id": notification_id}
        self._touch(item)

    def move(self, allocation_id: str, kind: str, ref: str | None, status: str,
             notification_id: int, **fields: Any) -> None:
        """Move an open item on to ``status`` (never back; a final item stays as it is)."""
        item = self.open.get((allocation_id, kind, ref or ""))
        if item is None or RANK.get(status, 2) <= RANK[item["status"]]:
            return
        item.update(status=status, notification_id=notification_id, **fields)
        self._touch(item)

    def _touch(self, item: dict[str, Any]) -> None:
        key = (item["allocation_id"], item["kind"], item["ref"] or "")
        if item["status"] in RANK:
            self.open[key] = item
        else:
            self.open.pop(key, None)
        self.changed[(item["allocation_id"], item["seq"])] = item

    def apply(self, event: Any, notification_id: int) -> None:
        at, n = iso(event.timestamp), notification_id
        if isinstance(event, NodeInventory.ClaimsReserved):
            for claim in event.claims:
                index = (claim.get("resource_snapshot") or {}).get("slot_index")
                name = "node_exclusive" if claim["claim_kind"] == "node_exclusive" \
                    else f"slot:{index}"
                status = CLAIM_ITEM.get(claim["status"], "unknown")
                self.add(event.allocation_id, "placement_claim", claim["id"], n, name=name,
                         status=status, node_id=claim["node_id"], started_at=at,
                         completed_at=None if status in RANK else at)
            return
        if isinstance(event, NodeInventory.ClaimsMoved):
            status = CLAIM_ITEM.get(event.to, "unknown")
            for claim_id in event.claim_ids:
                self.move(event.allocation_id, "placement_claim", claim_id, status, n,
                          completed_at=None if status in RANK else at)
            return
        allocation_id = str(event.originator_id)
        if isinstance(event, Allocation.Created):
            self.add(allocation_id, "allocation_state", None, n, seq=0, name="requested",
                     status="running", started_at=at)
        elif isinstance(event, Allocation.Moved):
            self._state_entered(allocation_id, event, at, n)
        elif isinstance(event, Allocation.TaskIssued):
            task = event.task
            self.add(allocation_id, "node_task", task["task_id"], n, name=task["task_type"],
                     status="pending", task_id=task["task_id"], node_id=task["node_id"])
        elif isinstance(event, Allocation.TaskDispatched):
            self.move(allocation_id, "node_task", event.task_id, "running", n, started_at=at)
        elif isinstance(event, Allocation.TaskCompleted):
            self.move(allocation_id, "node_task", event.task_id,
                      TASK_ITEM.get(event.result, "unknown"), n, completed_at=at,
                      summary=event.summary)

    def _state_entered(self, allocation_id: str, event: Any, at: str, n: int) -> None:
        """The status left ends its item (``failed`` when it led to a failure), the
        status entered opens one (running while transitional, else final at once)."""
        to = event.to
        self.move(allocation_id, "allocation_state", None,
                  "failed" if to in FAILURES else "succeeded", n, completed_at=at)
        status = "running" if to in TRANSITIONAL else "failed" if to in FAILURES else "succeeded"
        self.add(allocation_id, "allocation_state", None, n, name=to, status=status,
                 started_at=at, completed_at=None if status == "running" else at,
                 summary=_state_summary(event))

    def write(self, cur: Cursor[Any], schema: str) -> None:
        if not self.changed:
            return
        names = SQL(", ").join(Identifier(c) for c in COLUMNS)
        updates = SQL(", ").join(SQL("{0} = EXCLUDED.{0}").format(Identifier(c))
                                 for c in COLUMNS[2:])
        cur.executemany(SQL("INSERT INTO {0}.allocation_timeline ({1}) VALUES ({2})"
                            " ON CONFLICT (allocation_id, seq) DO UPDATE SET {3}").format(
            Identifier(schema), names, SQL(", ").join(SQL("%s") for _ in COLUMNS), updates),
            [[_uuid(item[c]) if c in ("task_id", "node_id") else item[c] for c in COLUMNS]
             for item in self.changed.values()])


def _state_summary(event: Any) -> str | None:
    """What a state item says: the reason of a failure (the ``Allocation`` shows it as
    well), who asked for a release, how a lease ended without node work."""
    if event.to in FAILURES:
        return event.reason
    details = event.details
    if event.to == "releasing":
        mode = details.get("mode")
        return RELEASE_SUMMARY.get(mode, f"release requested ({mode})")
    if event.to == "released" and details.get("without_node_work"):
        return "released before any node work"
    if event.to == "released" and details.get("force_cleanup"):
        return "cleaned up by an operator"
    return None


# ---- the projection ---------------------------------------------------------------------------
def _allocation_of(event: Any) -> str | None:
    if isinstance(event, Allocation.Event):
        return str(event.originator_id)
    if isinstance(event, (NodeInventory.ClaimsReserved, NodeInventory.ClaimsMoved)):
        return event.allocation_id
    return None


class Allocations:
    name = "allocations"
    tables = ("allocations", "allocation_timeline")

    def ddl(self, schema: str) -> list[str]:
        s = f'"{schema}"'
        indexes = [f"CREATE INDEX IF NOT EXISTS allocations_{c} ON {s}.allocations"
                   f" ({c}, created_at DESC, id DESC)"
                   for c in ("project_id", "org_id", "user_id", "node_id", "status")]
        return [
            f"CREATE TABLE IF NOT EXISTS {s}.allocations ("
            " id uuid PRIMARY KEY, state jsonb NOT NULL, project_id uuid, org_id uuid,"
            " user_id uuid, node_id uuid, status text NOT NULL, created_at timestamptz NOT NULL,"
            " served boolean NOT NULL, notification_id bigint NOT NULL)",
            f"CREATE INDEX IF NOT EXISTS allocations_created ON {s}.allocations"
            " (created_at DESC, id DESC)", *indexes,
            f"CREATE TABLE IF NOT EXISTS {s}.allocation_timeline ("
            " allocation_id uuid NOT NULL, seq integer NOT NULL, kind text NOT NULL, ref text,"
            " name text NOT NULL, status text NOT NULL, task_id uuid, node_id uuid,"
            " started_at text, completed_at text, summary text, notification_id bigint NOT NULL,"
            " PRIMARY KEY (allocation_id, seq))",
        ]

    def apply(self, cur: Cursor[Any], schema: str, event: Any, notification_id: int) -> None:
        self.apply_many(cur, schema, [Item(notification_id, event)])

    def apply_many(self, cur: Cursor[Any], schema: str, items: Sequence[Item]) -> None:
        """Fold the batch in memory (each touched lease loaded once), then write each
        touched row and timeline item once."""
        mine = [item for item in items if _allocation_of(item.event) is not None]
        if not mine:
            return
        touched_ids = list({UUID(_allocation_of(item.event)) for item in mine})
        timeline = Timeline.load(cur, schema, touched_ids)
        leases = [item for item in mine if isinstance(item.event, Allocation.Event)]
        stored = _load(cur, schema, list({item.event.originator_id for item in leases}))
        folded: dict[UUID, Any] = {}
        last: dict[UUID, int] = {}
        for item in mine:
            event = item.event
            if isinstance(event, Allocation.Event):
                key = event.originator_id
                if key in folded:  # already restored in this batch: move it on, as fold does
                    event.mutate(folded[key])
                else:
                    folded[key] = fold(Allocation, stored.get(key), event)
                last[key] = item.notification_id
            timeline.apply(event, item.notification_id)
        for key, allocation in folded.items():
            _upsert(cur, schema, allocation, last[key])
        timeline.write(cur, schema)


def _load(cur: Cursor[Any], schema: str, ids: list[UUID]) -> dict[UUID, dict[str, Any]]:
    if not ids:
        return {}
    cur.execute(SQL("SELECT id, state FROM {0}.allocations WHERE id = ANY(%s)").format(
        Identifier(schema)), (ids,))
    return {row["id"]: row["state"] for row in cur.fetchall()}


def _upsert(cur: Cursor[Any], schema: str, allocation: Allocation, notification_id: int) -> None:
    values = {"id": allocation.id, "state": Jsonb(state_of(allocation)),
              **_row_columns(allocation), "notification_id": notification_id}
    names = [Identifier(name) for name in values]
    cur.execute(SQL("INSERT INTO {0}.allocations ({1}) VALUES ({2}) ON CONFLICT (id) DO UPDATE"
                    " SET {3}").format(Identifier(schema), SQL(", ").join(names),
                                       SQL(", ").join(SQL("%s") for _ in names),
                                       SQL(", ").join(SQL("{0} = EXCLUDED.{0}").format(n)
                                                      for n in names[1:])),
                list(values.values()))


# ---- queries ----------------------------------------------------------------------------------
#: the lease's claims on its node as ``allocation_of`` lists them (reservation order)
_WITH_CLAIMS = (
    "SELECT a.id, a.created_at, a.project_id, a.org_id, a.state, coalesce((SELECT"
    " jsonb_agg(c.claim ORDER BY (c.claim->>'created_at')::timestamptz,"
    " (c.claim->'resource_snapshot'->>'slot_index')::int NULLS FIRST, c.id)"
    " FROM {0}.inventory_claims c WHERE c.allocation_id = a.id AND c.node_id = a.node_id),"
    " '[]'::jsonb) AS claims FROM {0}.allocations a")


@dataclass(frozen=True)
class Found:
    created_at: datetime
    id: UUID
    project_id: UUID
    org_id: UUID
    body: dict[str, Any]  # the contract's ``Allocation``


def _found(row: dict[str, Any]) -> Found:
    return Found(row["created_at"], row["id"], row["project_id"], row["org_id"],
                 allocation_json(row["state"], row["claims"]))


def list_allocations(cur: Cursor[Any], schema: str, *, project_id: UUID | None = None,
                     org_id: UUID | None = None, user_id: UUID | None = None,
                     node_id: UUID | None = None, status: str | None = None,
                     after: tuple[datetime, UUID] | None = None, limit: int) -> list[Found]:
    """Leases newest first (``created_at desc, id desc``), each filter applied when
    given; ``after`` is the last (created_at, id) seen."""
    where, params = [SQL("a.served")], []
    for column, value in (("project_id", project_id), ("org_id", org_id), ("user_id", user_id),
                          ("node_id", node_id), ("status", status)):
        if value is not None:
            where.append(SQL("a.{0} = %s").format(Identifier(column)))
            params.append(value)
    if after is not None:
        where.append(SQL("(a.created_at, a.id) < (%s, %s)"))
        params += [after[0], after[1]]
    cur.execute(SQL(_WITH_CLAIMS + " WHERE {1} ORDER BY a.created_at DESC, a.id DESC LIMIT %s")
                .format(Identifier(schema), SQL(" AND ").join(where)), (*params, limit))
    return [_found(row) for row in cur.fetchall()]


def get_allocation(cur: Cursor[Any], schema: str, allocation_id: UUID) -> Found | None:
    cur.execute(SQL(_WITH_CLAIMS + " WHERE a.id = %s AND a.served").format(Identifier(schema)),
                (allocation_id,))
    row = cur.fetchone()
    return None if row is None else _found(row)


def allocation_head(cur: Cursor[Any], schema: str, allocation_id: UUID
                    ) -> tuple[str, UUID] | None:
    """(status, project_id) of a lease, or None for an unknown one."""
    cur.execute(SQL("SELECT status, project_id FROM {0}.allocations WHERE id = %s AND served")
                .format(Identifier(schema)), (allocation_id,))
    row = cur.fetchone()
    return None if row is None else (row["status"], row["project_id"])


def timeline_page(cur: Cursor[Any], schema: str, allocation_id: UUID, *, before: int | None,
                  limit: int) -> list[tuple[int, dict[str, Any]]]:
    """(seq, ``AllocationTimelineItem``) newest first, below ``before`` when given."""
    cur.execute(SQL("SELECT * FROM {0}.allocation_timeline WHERE allocation_id = %s"
                    " AND (%s::int IS NULL OR seq < %s) ORDER BY seq DESC LIMIT %s").format(
        Identifier(schema)), (allocation_id, before, before, limit))
    return [(row["seq"], timeline_item_json(row)) for row in cur.fetchall()]


def timeline_item_json(row: dict[str, Any]) -> dict[str, Any]:
    started, completed = row["started_at"], row["completed_at"]
    duration = None
    if started and completed:
        seconds = (datetime.fromisoformat(completed) - datetime.fromisoformat(started))
        duration = max(0, int(seconds.total_seconds()))
    return {"kind": row["kind"], "name": row["name"], "status": row["status"],
            "task_id": None if row["task_id"] is None else str(row["task_id"]),
            "node_id": None if row["node_id"] is None else str(row["node_id"]),
            "started_at": started, "completed_at": completed, "duration_seconds": duration,
            "summary": row["summary"]}
