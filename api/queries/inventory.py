"""Inventory queries, all from the ``inventory`` read model: node lists and slots, SKU
lists, allocation limits and the concurrency policy, the V3 compute catalog and the
V3 quota posture. Every V3 twin is one handler under both paths.

Filter mappings (docs/decisions.md):
- ``listNodeSummaries`` ``status`` is the public status: ``online`` = ``active``,
  ``offline`` = ``offline``, ``maintenance`` = ``cordoned|draining``.
- ``adminListNodes`` ``status`` is the administrative state, whatever the liveness:
  ``active``, ``retired``, ``removing``, ``maintenance`` = ``cordoned|draining``.
- Removed (tombstoned) nodes never list. Node lists are ordered by id, SKU lists and
  the catalog by sku.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Literal
from urllib.parse import quote
from uuid import UUID

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from api.auth import Principal, admin, authenticate, project_scope
from api.errors import ApiError
from api.pagination import encode_cursor, page_request, pagination_block
from api.queries import CACHE_HEADER, cached_query
from domain.skus import RESOURCE_CLASSES, iso
from projections.inventory import (catalog_counts, catalog_page, concurrency_policy,
                                   list_nodes, list_skus, live_allocation_count, node_slots)
from projections.store import SCHEMA

router = APIRouter()
PROJECTION = "inventory"
#: free units at or below which a SKU is ``limited`` rather than ``available``
LIMITED_UNITS = 2
PUBLIC_STATUS = {"online": ("active",), "offline": ("offline",),
                 "maintenance": ("cordoned", "draining")}
ADMIN_STATE = {"active": ("active",), "retired": ("retired",), "removing": ("removing",),
               "maintenance": ("cordoned", "draining")}
ResourceClass = Literal["gpu_baremetal", "gpu_slice", "cpu_vm", "cpu_baremetal", "control_plane"]
Fetch = Callable[[Any, str | None, int], list[tuple[str, dict[str, Any]]]]


def _page(request: Request, principal: Principal, *, operation_id: str,
          filters: dict[str, Any], cursor: str | None, page_size: int | None, fetch: Fetch,
          extra: Callable[[Any], dict[str, Any]] | None = None) -> JSONResponse:
    """A keyset-paginated list: ``fetch(cur, after, limit)`` gives (key, item) rows in
    key order; ``extra(cur)`` adds whole-list fields (counts, meta)."""
    secret = request.app.state.settings.jwt_secret
    bound = {k: None if v is None else str(v) for k, v in filters.items()}
    binding = {"operation_id": operation_id, "sort": "key_asc", "filters": bound,
               "scope": principal.scope_key}
    page = page_request(secret, cursor=cursor, page_size=page_size, **binding)
    after = str(page.after[0]) if page.after else None

    def compute(cur: Any) -> dict[str, Any]:
        rows = fetch(cur, after, page.page_size + 1)
        next_cursor = None
        if len(rows) > page.page_size:
            rows = rows[:page.page_size]
            next_cursor = encode_cursor(secret, last_key=[rows[-1][0]], **binding)
        body = {"items": [item for _, item in rows],
                "pagination": pagination_block(next_cursor, page.page_size)}
        return {**body, **(extra(cur) if extra else {})}

    return cached_query(request, principal, operation_id=operation_id, projection=PROJECTION,
                        query={**bound, "cursor": cursor, "page_size": page.page_size},
                        compute=compute)


def v3_meta() -> dict[str, Any]:
    return {"generated_at": iso(datetime.now(timezone.utc)), "cache": "miss"}


def with_meta_cache(response: JSONResponse) -> JSONResponse:
    """Make ``meta.cache`` say what ``X-Read-Model-Cache`` says (a cached body still
    holds the state it was computed in)."""
    body = json.loads(response.body)
    body["meta"]["cache"] = response.headers[CACHE_HEADER]
    answer = JSONResponse(body)
    for name in (CACHE_HEADER, "X-Ledger-Read-Position"):
        answer.headers[name] = response.headers[name]
    return answer


# ---- nodes ----------------------------------------------------------------------------------
@router.get("/api/v1/nodes", operation_id="listNodeSummaries")
def list_node_summaries(request: Request, principal: Principal = Depends(authenticate),
                        cursor: str | None = None, page_size: int | None = Query(default=None),
                        status: Literal["online", "offline", "maintenance"] | None = None,
                        region_code: str | None = None) -> JSONResponse:
    values = PUBLIC_STATUS[status] if status else None
    return _page(request, principal, operation_id="listNodeSummaries",
                 filters={"status": status, "region_code": region_code},
                 cursor=cursor, page_size=page_size,
                 fetch=lambda cur, after, limit: list_nodes(
                     cur, SCHEMA, view="summary", column="status", values=values,
                     region_code=region_code, after=after, limit=limit))


@router.get("/api/v1/admin/nodes", operation_id="adminListNodes")
def admin_list_nodes(request: Request, principal: Principal = Depends(admin),
                     cursor: str | None = None, page_size: int | None = Query(default=None),
                     status: Literal["active", "retired", "removing", "maintenance"] | None = None,
                     region_code: str | None = None) -> JSONResponse:
    values = ADMIN_STATE[status] if status else None
    return _page(request, principal, operation_id="adminListNodes",
                 filters={"status": status, "region_code": region_code},
                 cursor=cursor, page_size=page_size,
                 fetch=lambda cur, after, limit: list_nodes(
                     cur, SCHEMA, view="admin", column="admin_state", values=values,
                     region_code=region_code, after=after, limit=limit))


@router.get("/api/v1/admin/nodes/{node_id}/resource-slots",
            operation_id="adminListNodeResourceSlots")
@router.get("/api/v1/platform/lifecycle/nodes/{node_id}/resource-slots",
            operation_id="listV3PlatformNodeResourceSlots")
@router.get("/api/v1/v3/platform/lifecycle/nodes/{node_id}/resource-slots",
            operation_id="listV3PlatformNodeResourceSlotsCompat")
def admin_list_node_resource_slots(node_id: UUID, request: Request,
                                   principal: Principal = Depends(admin)) -> JSONResponse:

    def compute(cur: Any) -> dict[str, Any]:
        slots = node_slots(cur, SCHEMA, node_id)
        if slots is None:
            raise ApiError(404, "node_not_found", "node not found", node_id=str(node_id))
        return {"items": slots}

    return cached_query(request, principal, operation_id="adminListNodeResourceSlots",
                        projection=PROJECTION, query={"node_id": str(node_id)}, compute=compute)


# ---- SKUs -----------------------------------------------------------------------------------
@router.get("/api/v1/skus", operation_id="listSkus")
def list_public_skus(request: Request, principal: Principal = Depends(authenticate),
                     cursor: str | None = None,
                     page_size: int | None = Query(default=None)) -> JSONResponse:
    return _page(request, principal, operation_id="listSkus", filters={}, cursor=cursor,
                 page_size=page_size,
                 fetch=lambda cur, after, limit: list_skus(
                     cur, SCHEMA, view="public", active_only=True, after=after, limit=limit))


@router.get("/api/v1/admin/skus", operation_id="adminListSkus")
def admin_list_skus(request: Request, principal: Principal = Depends(admin),
                    cursor: str | None = None,
                    page_size: int | None = Query(default=None)) -> JSONResponse:
    return _page(request, principal, operation_id="adminListSkus", filters={}, cursor=cursor,
                 page_size=page_size,
                 fetch=lambda cur, after, limit: list_skus(
                     cur, SCHEMA, view="admin", active_only=False, after=after, limit=limit))


# ---- limits and policy ------------------------------------------------------------------------
def allocation_limits(cur: Any, user_id: UUID) -> dict[str, Any]:
    """The contract's ``AllocationLimits``: the policy value against the caller's live
    allocations (the count admission decides with)."""
    maximum = concurrency_policy(cur, SCHEMA)["value"]
    current = live_allocation_count(cur, SCHEMA, user_id)
    return {"max_concurrent_allocations": maximum, "current_concurrent_allocations": current,
            "available_allocation_slots": max(0, maximum - current)}


@router.get("/api/v1/allocations/limits", operation_id="getAllocationLimits")
def get_allocation_limits(request: Request,
                          principal: Principal = Depends(authenticate)) -> JSONResponse:
    project_scope(request, principal)
    return cached_query(request, principal, operation_id="getAllocationLimits",
                        projection=PROJECTION, query={},
                        compute=lambda cur: allocation_limits(cur, principal.user_id))


@router.get("/api/v1/admin/allocations/limits/policy",
            operation_id="adminGetAllocationConcurrencyPolicy")
@router.get("/api/v1/v3/platform/config/quotas/allocation-concurrency",
            operation_id="getV3PlatformConfigAllocationConcurrencyPolicyCompat")
def get_concurrency_policy(request: Request,
                           principal: Principal = Depends(admin)) -> JSONResponse:
    return cached_query(request, principal, operation_id="adminGetAllocationConcurrencyPolicy",
                        projection=PROJECTION, query={},
                        compute=lambda cur: concurrency_policy(cur, SCHEMA))


def quota_posture(limits: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """``blocked`` with no headroom; ``near_limit`` when the headroom is at most
    max(1, ⌈20% of the cap⌉) (inventory-and-placement §5.4); else ``ok``."""
    headroom, maximum = limits["available_allocation_slots"], limits["max_concurrent_allocations"]
    if headroom == 0:
        return "blocked", [{"severity": "error", "title": "Allocation limit reached",
                            "summary": f"All {maximum} concurrent allocations are in use;"
                                       " release one before launching another.",
                            "action_label": None, "action_href": None}]
    if headroom <= max(1, math.ceil(0.2 * maximum)):
        return "near_limit", [{"severity": "warn", "title": "Close to the allocation limit",
                               "summary": f"{headroom} of {maximum} concurrent allocations left.",
                               "action_label": None, "action_href": None}]
    return "ok", []


@router.get("/api/v1/access/quotas", operation_id="getV3AccessQuotaPosture")
@router.get("/api/v1/v3/access/quotas", operation_id="getV3AccessQuotaPostureCompat")
def get_access_quota_posture(request: Request,
                             principal: Principal = Depends(authenticate)) -> JSONResponse:
    project = project_scope(request, principal)

    def compute(cur: Any) -> dict[str, Any]:
        limits = allocation_limits(cur, principal.user_id)
        posture, signals = quota_posture(limits)
        # no project read model holds names yet: the project is named by its id
        return {"project_id": str(project), "project_name": str(project),
                "user_id": str(principal.user_id), "limits": limits, "posture": posture,
                "signals": signals, "meta": v3_meta()}

    return with_meta_cache(cached_query(
        request, principal, operation_id="getV3AccessQuotaPosture", projection=PROJECTION,
        query={"project_id": str(project)}, compute=compute))


# ---- V3 compute catalog -----------------------------------------------------------------------
def availability(units: int) -> str:
    return "unavailable" if units == 0 else "limited" if units <= LIMITED_UNITS else "available"


def capacity_basis(ready: int, on_demand: int) -> str:
    return {(False, False): "none", (True, False): "ready_worker",
            (False, True): "provider_capacity", (True, True): "mixed"}[(ready > 0, on_demand > 0)]


CAPACITY_NOTES = {"unavailable": "No capacity is free for this SKU right now.",
                  "limited": "Only a few units of this SKU are free right now.",
                  "available": "Units of this SKU are free to launch now."}


def compute_sku_json(sku: dict[str, Any], units: int) -> dict[str, Any]:
    """The contract's ``V3ComputeSkuSummary`` from an ``AdminSku`` and its free units.
    GPU and baremetal SKUs launch from ready nodes only: no on-demand units."""
    res = sku["resources"]
    classes = {k: sku[k] for k in ("resource_class", "billing_unit", "scheduling_unit")}
    accelerator = None
    if res.get("accelerator_count") or res.get("accelerator_vendor"):
        accelerator = {"vendor": res.get("accelerator_vendor") or sku["vendor"],
                       "model": res.get("accelerator_model"),
                       "count": res.get("accelerator_count") or 0,
                       "memory_mib": res.get("accelerator_memory_mib"), "partition_profile": None}
    state = availability(units)
    return {"sku": sku["sku"], "display_name": sku["display_name"], "vendor": sku["vendor"],
            "family_id": sku["family_id"], "family_version": sku["family_version"],
            "family_display_name": sku["family_display_name"], **classes,
            "resources": {**classes, "accelerator": accelerator,
                          "cpu": {"vcpu_count": res["vcpu_count"], "architecture": None}
                          if res.get("vcpu_count") else None,
                          "memory": {"memory_mib": res["memory_mib"]}
                          if res.get("memory_mib") else None,
                          "local_storage": None},
            "unit_price": sku["unit_price"], "availability_state": state,
            "available_units": units, "ready_units": units, "on_demand_units": 0,
            "capacity_basis": capacity_basis(units, 0), "shared_capacity": False,
            "capacity_note": CAPACITY_NOTES[state], "image_count": 0,
            "launch_href": f"/compute/launch?sku={quote(sku['sku'], safe='')}"}


def catalog_counts_json(by_class: dict[str, tuple[int, int]]) -> dict[str, int]:
    counts = {cls: by_class.get(cls, (0, 0))[0] for cls in RESOURCE_CLASSES}
    return {"total": sum(counts.values()), **counts,
            "available": sum(free for _, free in by_class.values())}


@router.get("/api/v1/compute", operation_id="getV3ComputeCatalog")
@router.get("/api/v1/v3/compute", operation_id="getV3ComputeCatalogCompat")
def get_compute_catalog(request: Request, principal: Principal = Depends(authenticate),
                        cursor: str | None = None, page_size: int | None = Query(default=None),
                        resource_class: ResourceClass | None = None,
                        search: str | None = Query(default=None, max_length=120),
                        region_code: str | None = None) -> JSONResponse:
    project_scope(request, principal)
    filters = {"resource_class": resource_class, "search": search, "region_code": region_code}

    def fetch(cur: Any, after: str | None, limit: int) -> list[tuple[str, dict[str, Any]]]:
        rows = catalog_page(cur, SCHEMA, after=after, limit=limit, **filters)
        return [(sku, compute_sku_json(admin, units)) for sku, admin, units in rows]

    def extra(cur: Any) -> dict[str, Any]:
        return {"images": [], "counts": catalog_counts_json(catalog_counts(cur, SCHEMA, **filters)),
                "meta": v3_meta()}

    return with_meta_cache(_page(request, principal, operation_id="getV3ComputeCatalog",
                                  filters=filters, cursor=cursor, page_size=page_size,
                                  fetch=fetch, extra=extra))
