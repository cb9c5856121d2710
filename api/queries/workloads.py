"""V3 workbench queries: ``listV3Workloads``, ``getV3WorkloadDetail``, ``listV3Tasks``
and ``getV3TaskDetail``, each one handler under its ``/api/v1`` path and its
``/api/v1/v3`` (``…Compat``) twin, from the ``workloads`` read model.

The project (``X-Project-ID``) is resolved before anything is read or cached and is
part of every cache key and cursor binding. A workload or task of another project is
404 ``allocation_not_found``, exactly as one that does not exist. Lists are newest
first (``created_at``, then id); ``counts`` cover the whole project whatever the
filters. The JSON is built at query time by ``domain.workload_views`` (compute rows)
and ``domain.app_workload_views`` (app rows), with the clock (actionability, history,
runway), the usage cost, the owner's balance, the node's liveness, an app's open meters
and primary allocation, and the app using a compute row's allocation read beside the
row.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse

from api.auth import Principal, authenticate, project_scope
from api.errors import ApiError
from api.pagination import encode_cursor, page_request, pagination_block
from api.queries import cached_query
from api.queries.inventory import with_meta_cache
from domain import app_workload_views as apps
from domain.skus import iso
from domain.workload_views import (action_band_item, compute_workload_detail,
                                   compute_workload_json)
from projections.store import SCHEMA
from projections.workloads import (PROJECTIONS, actionable_workloads, get_task, get_workload,
                                   list_tasks, list_workloads, owner_funds, task_counts,
                                   workload_counts)

router = APIRouter()
WorkloadStatus = Literal["requested", "provisioning", "active", "idle", "stopped", "completed",
                         "restarting", "restart_failed", "releasing", "released", "failed",
                         "release_failed"]
WorkloadKind = Literal["compute", "jupyter", "vllm", "training", "scheduler", "kubernetes", "app"]
TaskStatus = Literal["queued", "running", "succeeded", "failed", "canceled", "unknown"]
#: at most this many rows in a list's ``action_band`` (the most recent entries first)
ACTION_BAND_LIMIT = 20
#: (cursor key, item) rows of one page: ``fetch(cur, now, after, limit)``
Fetch = Callable[[Any, datetime, list[Any] | None, int], list[tuple[list[Any], dict[str, Any]]]]


def _meta(now: datetime) -> dict[str, Any]:
    return {"generated_at": iso(now), "cache": "miss"}


def _answer(request: Request, principal: Principal, *, operation_id: str,
            projection: str | tuple[str, ...], query: dict[str, Any],
            compute: Callable[[Any, datetime], dict[str, Any]]) -> JSONResponse:
    """A cached V3 read: ``compute(cur, now)`` builds the body without ``meta``."""

    def body(cur: Any) -> dict[str, Any]:
        now = datetime.now(timezone.utc)
        return {**compute(cur, now), "meta": _meta(now)}

    return with_meta_cache(cached_query(request, principal, operation_id=operation_id,
                                        projection=projection, query=query, compute=body))


def _paged(request: Request, principal: Principal, *, operation_id: str,
           projection: str | tuple[str, ...], filters: dict[str, Any], cursor: str | None,
           page_size: int | None, fetch: Fetch,
           extra: Callable[[Any, datetime], dict[str, Any]]) -> JSONResponse:
    """A keyset page (newest first) plus whole-list fields from ``extra(cur, now)``."""
    secret = request.app.state.settings.jwt_secret
    bound = {k: None if v is None else str(v) for k, v in filters.items()}
    binding = {"operation_id": operation_id, "sort": "created_at_desc", "filters": bound,
               "scope": principal.scope_key}
    page = page_request(secret, cursor=cursor, page_size=page_size, **binding)

    def compute(cur: Any, now: datetime) -> dict[str, Any]:
        rows = fetch(cur, now, page.after, page.page_size + 1)
        next_cursor = None
        if len(rows) > page.page_size:
            rows = rows[:page.page_size]
            next_cursor = encode_cursor(secret, last_key=rows[-1][0], **binding)
        return {"items": [item for _, item in rows], **extra(cur, now),
                "pagination": pagination_block(next_cursor, page.page_size)}

    return _answer(request, principal, operation_id=operation_id, projection=projection,
                   query={**bound, "cursor": cursor, "page_size": page.page_size},
                   compute=compute)


def _not_found(**details: str) -> ApiError:
    return ApiError(404, "allocation_not_found", "not found in this project", **details)


# ---- workloads --------------------------------------------------------------------------------
def workload_json(cur: Any, row: dict[str, Any], viewer: UUID, now: datetime,
                   funds: dict[UUID, Any]) -> dict[str, Any]:
    """A row's ``V3WorkloadSummary`` (a lease's or an app's); the cost projection shows
    the balance only on the caller's own workloads (``funds`` caches the caller's
    account per request)."""
    mine = row["owner"] == str(viewer)
    if mine and viewer not in funds:
        funds[viewer] = owner_funds(cur, SCHEMA, viewer)
    visible = funds[viewer] if mine else None
    if row["kind"] != "compute":
        return apps.app_workload_json(row["state"], row["steps"], now=now,
                                      open_rate=row["open_rate"], usage_cost=row["accrued"],
                                      owner_currency=row["owner_currency"],
                                      allocation=row["allocation"], funds=visible,
                                      catalog_kind=row["catalog_kind"],
                                      catalog_name=row["catalog_name"])
    blocking = None if row["host"] is None else \
        apps.blocking_app_use(row["host"], row["state"]["_id"])
    return compute_workload_json(row["state"], row["steps"], now=now, usage_cost=row["accrued"],
                                 node=row["node"], funds=visible, blocking=blocking)


def _band_item(row: dict[str, Any]) -> dict[str, Any]:
    if row["kind"] != "compute":
        return apps.action_band_item(row["state"])
    return action_band_item(row["state"])


@router.get("/api/v1/workloads", operation_id="listV3Workloads")
@router.get("/api/v1/v3/workloads", operation_id="listV3WorkloadsCompat")
def list_v3_workloads(request: Request, principal: Principal = Depends(authenticate),
                      cursor: str | None = None, page_size: int | None = Query(default=None),
                      status: WorkloadStatus | None = None, kind: WorkloadKind | None = None,
                      search: str | None = Query(default=None, max_length=120),
                      include_history: bool = False) -> JSONResponse:
    project = project_scope(request, principal)
    filters = {"status": status, "kind": kind, "search": search,
               "include_history": include_history}
    funds: dict[UUID, Any] = {}

    def fetch(cur: Any, now: datetime, after: list[Any] | None,
              limit: int) -> list[tuple[list[Any], dict[str, Any]]]:
        rows = list_workloads(cur, SCHEMA, project, now, after=after, limit=limit, **filters)
        return [(row["key"], workload_json(cur, row, principal.user_id, now, funds))
                for row in rows]

    def extra(cur: Any, now: datetime) -> dict[str, Any]:
        band = actionable_workloads(cur, SCHEMA, project, now, ACTION_BAND_LIMIT)
        return {"action_band": [_band_item(row) for row in band],
                "counts": workload_counts(cur, SCHEMA, project, now)}

    return _paged(request, principal, operation_id="listV3Workloads", projection=PROJECTIONS,
                  filters={"project_id": project, **filters}, cursor=cursor,
                  page_size=page_size, fetch=fetch, extra=extra)


@router.get("/api/v1/workloads/{workload_id}", operation_id="getV3WorkloadDetail")
@router.get("/api/v1/v3/workloads/{workload_id}", operation_id="getV3WorkloadDetailCompat")
def get_v3_workload_detail(request: Request,
                           workload_id: str = Path(min_length=1, max_length=128),
                           principal: Principal = Depends(authenticate)) -> JSONResponse:
    project = project_scope(request, principal)

    def compute(cur: Any, now: datetime) -> dict[str, Any]:
        row = get_workload(cur, SCHEMA, project, workload_id)
        if row is None:
            raise _not_found(workload_id=workload_id)
        workload = workload_json(cur, row, principal.user_id, now, {})
        if row["kind"] != "compute":
            return apps.app_workload_detail(row["state"], row["steps"], workload, now,
                                            row["allocation"])
        return compute_workload_detail(row["state"], row["steps"], workload, now)

    return _answer(request, principal, operation_id="getV3WorkloadDetail", projection=PROJECTIONS,
                   query={"project_id": str(project), "workload_id": workload_id},
                   compute=compute)


# ---- tasks ------------------------------------------------------------------------------------
@router.get("/api/v1/tasks", operation_id="listV3Tasks")
@router.get("/api/v1/v3/tasks", operation_id="listV3TasksCompat")
def list_v3_tasks(request: Request, principal: Principal = Depends(authenticate),
                  cursor: str | None = None, page_size: int | None = Query(default=None),
                  status: TaskStatus | None = None) -> JSONResponse:
    project = project_scope(request, principal)
    return _paged(request, principal, operation_id="listV3Tasks", projection="workloads",
                  filters={"project_id": project, "status": status}, cursor=cursor,
                  page_size=page_size,
                  fetch=lambda cur, now, after, limit: list_tasks(
                      cur, SCHEMA, project, status=status, after=after, limit=limit),
                  extra=lambda cur, now: {"counts": task_counts(cur, SCHEMA, project)})


@router.get("/api/v1/tasks/{task_id}", operation_id="getV3TaskDetail")
@router.get("/api/v1/v3/tasks/{task_id}", operation_id="getV3TaskDetailCompat")
def get_v3_task_detail(task_id: UUID, request: Request,
                       principal: Principal = Depends(authenticate)) -> JSONResponse:
    project = project_scope(request, principal)

    def compute(cur: Any, now: datetime) -> dict[str, Any]:
        found = get_task(cur, SCHEMA, project, task_id)
        if found is None:
            raise _not_found(task_id=str(task_id))
        task, timeline = found
        return {"task": task, "timeline": timeline,
                "context": {"project": task["project_name"],
                            "resource_href": f"/api/v1/workloads/{task['resource_id']}",
                            "timeline_source": "allocation_timeline"
                            if task["resource_kind"] == "allocation" else "synthetic"}}

    return _answer(request, principal, operation_id="getV3TaskDetail", projection="workloads",
                   query={"project_id": str(project), "task_id": str(task_id)},
                   compute=compute)
