"""Inventory read model: nodes, their free capacity, placement claims, SKUs and the
allocation concurrency policy.

Each aggregate row keeps a copy of the aggregate's state (``state_of``) and moves it
with the aggregate's own code (``fold``); every JSON column is then derived by the
functions the command side answers with (``domain.inventory_views``,
``admin_sku_json``, ``policy_json``), so a node reads back exactly as it was written.
Fed by ``NodeInventory``, ``Sku``, ``AllocationConcurrencyPolicy`` and
``UserAllocationQuota`` events; the host registry and node directory are write-side
only.

- ``inventory_nodes``: one row per node ever registered (``listed`` false once
  tombstoned), with its ``NodeAdmin``, ``NodeSummary`` and slot list.
- ``inventory_capacity``: units a new claim could take now, per (node, shape, SKU):
  a free schedulable node counts 1 for its SKU (baremetal), every free approved slice
  slot counts 1 for the slot's SKU (gpu_slice). The catalog sums it.
- ``inventory_claims``: one row per placement claim.
- ``inventory_skus``: one row per SKU; ``allocation_policy``: the policy's one row;
  ``allocation_quotas``: each user's live allocations (the count admission caps).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate
from psycopg import Cursor
from psycopg.sql import SQL, Identifier, Placeholder
from psycopg.types.json import Jsonb

from domain.allocations import UserAllocationQuota
from domain.inventory import NodeInventory, fold, state_of
from domain.inventory_views import claim_json, node_admin_json, node_summary_json, slot_json
from domain.skus import (DEFAULT_MAX_CONCURRENT, AllocationConcurrencyPolicy, Sku,
                         admin_sku_json, policy_json, public_sku_json)
from projections.store import Item


def _node_columns(node: NodeInventory) -> dict[str, Any]:
    slots = sorted(node.slots.values(), key=lambda s: s["slot_index"])
    return {"listed": node.listed, "status": node.status, "admin_state": node.admin_state,
            "region_code": node.identity["region_code"], "sku": node.identity["sku"],
            "admin": Jsonb(node_admin_json(node)), "summary": Jsonb(node_summary_json(node)),
            "slots": Jsonb([slot_json(s) for s in slots])}


def _sku_columns(sku: Sku) -> dict[str, Any]:
    return {"sku": sku.sku, "active": sku.active, "resource_class": sku.spec["resource_class"],
            "shape": sku.shape, "admin": Jsonb(admin_sku_json(sku.sku, sku.spec, sku.active)),
            "public": Jsonb(public_sku_json(sku.sku, sku.spec))}


def _policy_columns(policy: AllocationConcurrencyPolicy) -> dict[str, Any]:
    return {"value": policy.value, "body": Jsonb(policy_json(
        policy.value, policy.effective_at, policy.created_by, policy.reason,
        policy.correlation_id))}


def _quota_columns(quota: UserAllocationQuota) -> dict[str, Any]:
    return {"user_id": UUID(quota.user_id), "live": len(quota.live)}


#: aggregate class -> (table, derived columns)
TABLES = {NodeInventory: ("inventory_nodes", _node_columns),
          Sku: ("inventory_skus", _sku_columns),
          AllocationConcurrencyPolicy: ("allocation_policy", _policy_columns),
          UserAllocationQuota: ("allocation_quotas", _quota_columns)}


def capacity(node: NodeInventory) -> list[tuple[str, str, int]]:
    """(shape, sku, units) a new claim could take on ``node`` now (placement's own
    filters: ``baremetal_free`` and ``free_slice_slots`` on a schedulable node)."""
    if not node.listed or not node.schedulable_status:
        return []
    found = [("baremetal", node.identity["sku"], 1)] if node.baremetal_free() else []
    for sku in node.slice_skus():
        units = len(node.free_slice_slots(sku))
        if units:
            found.append(("gpu_slice", sku, units))
    return found


def _claims_touched(event: Any) -> list[str]:
    if isinstance(event, NodeInventory.ClaimsReserved):
        return [claim["id"] for claim in event.claims]
    if isinstance(event, NodeInventory.ClaimsMoved):
        return list(event.claim_ids)
    return []


class Inventory:
    name = "inventory"
    tables = ("inventory_nodes", "inventory_capacity", "inventory_claims", "inventory_skus",
              "allocation_policy", "allocation_quotas")

    def ddl(self, schema: str) -> list[str]:
        s = f'"{schema}"'
        return [
            f"CREATE TABLE IF NOT EXISTS {s}.inventory_nodes ("
            " id uuid PRIMARY KEY, state jsonb NOT NULL, listed boolean NOT NULL,"
            " status text NOT NULL, admin_state text NOT NULL, region_code text NOT NULL,"
            " sku text NOT NULL, admin jsonb NOT NULL, summary jsonb NOT NULL,"
            " slots jsonb NOT NULL, notification_id bigint NOT NULL)",
            f"CREATE TABLE IF NOT EXISTS {s}.inventory_capacity ("
            " node_id uuid NOT NULL, shape text NOT NULL, sku text NOT NULL,"
            " region_code text NOT NULL, units integer NOT NULL,"
            " PRIMARY KEY (node_id, shape, sku))",
            f"CREATE INDEX IF NOT EXISTS inventory_capacity_sku ON {s}.inventory_capacity"
            " (sku, shape, region_code)",
            f"CREATE TABLE IF NOT EXISTS {s}.inventory_claims ("
            " id uuid PRIMARY KEY, allocation_id uuid NOT NULL, node_id uuid NOT NULL,"
            " user_id uuid, project_id uuid, sku text NOT NULL, status text NOT NULL,"
            " claim jsonb NOT NULL, notification_id bigint NOT NULL)",
            f"CREATE INDEX IF NOT EXISTS inventory_claims_user ON {s}.inventory_claims"
            " (user_id, status)",
            f"CREATE INDEX IF NOT EXISTS inventory_claims_allocation ON {s}.inventory_claims"
            " (allocation_id)",
            f"CREATE TABLE IF NOT EXISTS {s}.inventory_skus ("
            " id uuid PRIMARY KEY, state jsonb NOT NULL, sku text NOT NULL UNIQUE,"
            " active boolean NOT NULL, resource_class text NOT NULL, shape text,"
            " admin jsonb NOT NULL, public jsonb NOT NULL, notification_id bigint NOT NULL)",
            f"CREATE TABLE IF NOT EXISTS {s}.allocation_policy ("
            " id uuid PRIMARY KEY, state jsonb NOT NULL, value integer NOT NULL,"
            " body jsonb NOT NULL, notification_id bigint NOT NULL)",
            f"CREATE TABLE IF NOT EXISTS {s}.allocation_quotas ("
            " id uuid PRIMARY KEY, state jsonb NOT NULL, user_id uuid NOT NULL UNIQUE,"
            " live integer NOT NULL, notification_id bigint NOT NULL)",
        ]

    def apply(self, cur: Cursor[Any], schema: str, event: Any, notification_id: int) -> None:
        self.apply_many(cur, schema, [Item(notification_id, event)])

    def apply_many(self, cur: Cursor[Any], schema: str, items: Sequence[Item]) -> None:
        """Fold the batch in memory (each touched aggregate loaded once), then write
        each touched row once."""
        mine = [(cls, item) for item in items for cls in TABLES
                if isinstance(item.event, cls.Event)]
        if not mine:
            return
        stored = _load(cur, schema, mine)
        folded: dict[UUID, Any] = {}
        touched: dict[UUID, tuple[type[Aggregate], int]] = {}
        claims: dict[UUID, dict[str, int]] = {}  # node -> claim id -> last notification
        for cls, item in mine:
            key = item.event.originator_id
            if key in folded:  # already restored in this batch: move it on, as fold does
                item.event.mutate(folded[key])
            else:
                folded[key] = fold(cls, stored.get(key), item.event)
            touched[key] = (cls, item.notification_id)
            claims.setdefault(key, {}).update(
                (claim_id, item.notification_id) for claim_id in _claims_touched(item.event))
        for key, (cls, notification_id) in touched.items():
            aggregate = folded[key]
            _upsert(cur, schema, cls, aggregate, notification_id)
            if cls is NodeInventory:
                _write_capacity(cur, schema, aggregate)
                _write_claims(cur, schema, aggregate, claims[key])


def _load(cur: Cursor[Any], schema: str, mine: list[tuple[type[Aggregate], Item]]
          ) -> dict[UUID, dict[str, Any]]:
    """The stored state (``state_of``) of every aggregate the batch touches."""
    states: dict[UUID, dict[str, Any]] = {}
    for cls, (table, _) in TABLES.items():
        ids = list({item.event.originator_id for c, item in mine if c is cls})
        if ids:
            cur.execute(SQL("SELECT id, state FROM {0}.{1} WHERE id = ANY(%s)").format(
                Identifier(schema), Identifier(table)), (ids,))
            states.update((row["id"], row["state"]) for row in cur.fetchall())
    return states


def _upsert(cur: Cursor[Any], schema: str, cls: type[Aggregate], aggregate: Any,
            notification_id: int) -> None:
    table, columns_of = TABLES[cls]
    values = {"id": aggregate.id, "state": Jsonb(state_of(aggregate)), **columns_of(aggregate),
              "notification_id": notification_id}
    names = [Identifier(name) for name in values]
    cur.execute(SQL("INSERT INTO {0}.{1} ({2}) VALUES ({3}) ON CONFLICT (id) DO UPDATE SET {4}")
                .format(Identifier(schema), Identifier(table), SQL(", ").join(names),
                        SQL(", ").join(Placeholder() * len(names)),
                        SQL(", ").join(SQL("{0} = EXCLUDED.{0}").format(n) for n in names[1:])),
                list(values.values()))


def _write_capacity(cur: Cursor[Any], schema: str, node: NodeInventory) -> None:
    s = Identifier(schema)
    cur.execute(SQL("DELETE FROM {0}.inventory_capacity WHERE node_id = %s").format(s), (node.id,))
    rows = [(node.id, shape, sku, node.identity["region_code"], units)
            for shape, sku, units in capacity(node)]
    if rows:
        cur.executemany(SQL("INSERT INTO {0}.inventory_capacity VALUES (%s, %s, %s, %s, %s)")
                        .format(s), rows)


def _write_claims(cur: Cursor[Any], schema: str, node: NodeInventory,
                  touched: dict[str, int]) -> None:
    """Upsert the claims the batch changed, each with the last event that changed it."""
    rows = [(c["id"], c["allocation_id"], c["node_id"], c.get("user_id"), c.get("project_id"),
             c["sku"], c["status"], Jsonb(claim_json(c)), touched[c["id"]])
            for c in (node.claims[i] for i in sorted(touched))]
    if rows:
        cur.executemany(SQL(
            "INSERT INTO {0}.inventory_claims VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, claim = EXCLUDED.claim,"
            " notification_id = EXCLUDED.notification_id").format(Identifier(schema)), rows)


# ---- queries ---------------------------------------------------------------------------
def list_nodes(cur: Cursor[Any], schema: str, *, view: str, column: str,
               values: Sequence[str] | None, region_code: str | None, after: str | None,
               limit: int) -> list[tuple[str, dict[str, Any]]]:
    """(id, ``view`` JSON) of listed nodes, by id; ``column`` (``status`` or
    ``admin_state``) in ``values`` when given."""
    where, params = [SQL("listed")], []
    if values is not None:
        where.append(SQL("{0} = ANY(%s)").format(Identifier(column)))
        params.append(list(values))
    if region_code is not None:
        where.append(SQL("region_code = %s"))
        params.append(region_code)
    if after is not None:
        where.append(SQL("id > %s"))
        params.append(UUID(after))
    cur.execute(SQL("SELECT id, {0} AS body FROM {1}.inventory_nodes WHERE {2}"
                    " ORDER BY id LIMIT %s").format(Identifier(view), Identifier(schema),
                                                   SQL(" AND ").join(where)),
                (*params, limit))
    return [(str(row["id"]), row["body"]) for row in cur.fetchall()]


def node_slots(cur: Cursor[Any], schema: str, node_id: UUID) -> list[dict[str, Any]] | None:
    """A listed node's slots by ``slot_index``, or None for an unknown or removed node."""
    cur.execute(SQL("SELECT slots FROM {0}.inventory_nodes WHERE id = %s AND listed").format(
        Identifier(schema)), (node_id,))
    row = cur.fetchone()
    return None if row is None else row["slots"]


def list_skus(cur: Cursor[Any], schema: str, *, view: str, active_only: bool,
              after: str | None, limit: int) -> list[tuple[str, dict[str, Any]]]:
    """(sku, ``view`` JSON: ``admin`` or ``public``) by sku."""
    cur.execute(SQL("SELECT sku, {0} AS body FROM {1}.inventory_skus"
                    " WHERE (active OR NOT %s) AND (%s::text IS NULL OR sku > %s)"
                    " ORDER BY sku LIMIT %s").format(Identifier(view), Identifier(schema)),
                (active_only, after, after, limit))
    return [(row["sku"], row["body"]) for row in cur.fetchall()]


def concurrency_policy(cur: Cursor[Any], schema: str) -> dict[str, Any]:
    """The ``AdminAllocationConcurrencyPolicy`` (the default until one is set)."""
    cur.execute(SQL("SELECT body FROM {0}.allocation_policy").format(Identifier(schema)))
    row = cur.fetchone()
    return row["body"] if row else policy_json(DEFAULT_MAX_CONCURRENT, None, None, None, None)


def live_allocation_count(cur: Cursor[Any], schema: str, user_id: UUID) -> int:
    """The live allocations of ``user_id``: what admission counts against the cap."""
    cur.execute(SQL("SELECT live FROM {0}.allocation_quotas WHERE user_id = %s").format(
        Identifier(schema)), (user_id,))
    row = cur.fetchone()
    return 0 if row is None else int(row["live"])


def _catalog_where(resource_class: str | None, search: str | None) -> tuple[SQL, list[Any]]:
    where, params = [SQL("s.active")], []
    if resource_class is not None:
        where.append(SQL("s.resource_class = %s"))
        params.append(resource_class)
    if search:
        pattern = "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        where.append(SQL("concat_ws(' ', s.sku, s.admin->>'display_name', s.admin->>'vendor',"
                         " s.admin->>'family_display_name') ILIKE %s"))
        params.append(pattern)
    return SQL(" AND ").join(where), params


_UNITS = ("WITH units AS (SELECT sku, shape, sum(units)::int AS units FROM {0}.inventory_capacity"
          " WHERE (%s::text IS NULL OR region_code = %s) GROUP BY sku, shape)")
_JOINED = (" FROM {0}.inventory_skus s LEFT JOIN units u ON u.sku = s.sku AND u.shape = s.shape"
           " WHERE {1}")


def catalog_page(cur: Cursor[Any], schema: str, *, resource_class: str | None,
                 search: str | None, region_code: str | None, after: str | None,
                 limit: int) -> list[tuple[str, dict[str, Any], int]]:
    """(sku, ``AdminSku`` JSON, free units) of active SKUs by sku; units within
    ``region_code`` when given."""
    where, params = _catalog_where(resource_class, search)
    cur.execute(SQL(_UNITS + " SELECT s.sku, s.admin, coalesce(u.units, 0) AS units" + _JOINED
                    + " AND (%s::text IS NULL OR s.sku > %s) ORDER BY s.sku LIMIT %s").format(
        Identifier(schema), where), (region_code, region_code, *params, after, after, limit))
    return [(row["sku"], row["admin"], row["units"]) for row in cur.fetchall()]


def catalog_counts(cur: Cursor[Any], schema: str, *, resource_class: str | None,
                   search: str | None, region_code: str | None) -> dict[str, tuple[int, int]]:
    """resource_class -> (SKUs, SKUs with a free unit) over every matching active SKU."""
    where, params = _catalog_where(resource_class, search)
    cur.execute(SQL(_UNITS + " SELECT s.resource_class, count(*) AS n,"
                    " count(*) FILTER (WHERE coalesce(u.units, 0) > 0) AS free" + _JOINED
                    + " GROUP BY s.resource_class").format(Identifier(schema), where),
                (region_code, region_code, *params))
    return {row["resource_class"]: (row["n"], row["free"]) for row in cur.fetchall()}


def sku_capacity(cur: Cursor[Any], schema: str, sku: str, region_code: str | None
                 ) -> tuple[dict[str, Any], bool, int, int] | None:
    """(``AdminSku`` JSON, active, free units, most free units on one node) of ``sku``,
    within ``region_code`` when given; None for an unknown SKU."""
    cur.execute(SQL("SELECT s.admin, s.active, coalesce(sum(c.units), 0)::int AS units,"
                    " coalesce(max(c.units), 0)::int AS best FROM {0}.inventory_skus s"
                    " LEFT JOIN {0}.inventory_capacity c ON c.sku = s.sku AND c.shape = s.shape"
                    " AND (%s::text IS NULL OR c.region_code = %s)"
                    " WHERE s.sku = %s GROUP BY s.sku, s.admin, s.active").format(Identifier(schema)),
                (region_code, region_code, sku))
    row = cur.fetchone()
    return None if row is None else (row["admin"], row["active"], row["units"], row["best"])
