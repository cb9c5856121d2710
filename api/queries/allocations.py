"""Allocation queries, from the ``allocations`` read model (and the ``inventory`` one for
the leases' placement claims and the ``limits`` block): the caller's leases, project,
org and admin lists, one lease, and its timeline.

Scopes (docs/decisions.md):
- ``listAllocations`` lists the caller's own leases in the ``X-Project-ID`` project
  (the per-user ``limits`` it carries are the caller's); ``listProjectAllocations``
  lists every lease of a project the caller is a member of. ``getAllocationById`` and
  the timeline answer any lease of the header's project, as release and restart act on
  any lease of it.
- The org operations need the token's tenant to be ``org_id`` (a caller without a
  tenant: their personal org); the admin ones need ``platform.admin``.
- A lease outside the scope is 404 ``allocation_not_found``, exactly as a random id.
- ``limits`` are the caller's, except on ``adminListAllocations`` filtered by
  ``user_id``: that user's. Lists check ``page_size`` and ``cursor`` before a path's
  scope (400 before 403: it reveals nothing), as every paginated list does.

Lists are newest first (``created_at desc, id desc``) with signed keyset cursors; the
timeline's first page holds its newest ``limit`` items, its cursor pages to older
ones, and each page lists its items in ascending ``seq``.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from api.auth import Principal, admin, authenticate, project_scope, require_member
from api.errors import ApiError
from api.pagination import PageRequest, encode_cursor, page_request, pagination_block
from api.queries import cached_query
from api.queries.inventory import allocation_limits
from domain.admission import personal_org_id
from domain.skus import iso
from projections.allocations import (allocation_head, get_allocation, list_allocations,
                                     timeline_page)
from projections.store import SCHEMA

router = APIRouter()
#: the read models an ``Allocation`` is built from (its claims live in ``inventory``)
READ_MODELS = ("allocations", "inventory")
SORT = "created_at_desc"
Status = Literal["requested", "provisioning", "active", "restarting", "restart_failed",
                 "releasing", "released", "failed", "release_failed"]


def _not_found(allocation_id: UUID) -> ApiError:
    return ApiError(404, "allocation_not_found", "allocation not found",
                    allocation_id=str(allocation_id))


def _tenant(principal: Principal, org_id: UUID) -> None:
    own = principal.tenant_id or personal_org_id(principal.user_id)
    if org_id != own:
        raise ApiError(403, "insufficient_permissions", "no access to this organization")


# ---- lists ------------------------------------------------------------------------------------
def _page(request: Request, principal: Principal, operation_id: str, *,
          cursor: str | None, page_size: int | None, filters: dict[str, Any]) -> PageRequest:
    return page_request(request.app.state.settings.jwt_secret, cursor=cursor,
                        page_size=page_size, operation_id=operation_id, sort=SORT,
                        filters=_bound(filters), scope=principal.scope_key)


def _bound(filters: dict[str, Any]) -> dict[str, str | None]:
    return {k: None if v is None else str(v) for k, v in filters.items()}


def _list(request: Request, principal: Principal, operation_id: str, page: PageRequest, *,
          filters: dict[str, Any], limits_of: UUID) -> JSONResponse:
    """One page of leases matching ``filters`` (column -> value or None), with the
    ``limits`` of ``limits_of``."""
    secret = request.app.state.settings.jwt_secret
    after = None if page.after is None else (datetime.fromisoformat(page.after[0]),
                                             UUID(page.after[1]))

    def compute(cur: Any) -> dict[str, Any]:
        rows = list_allocations(cur, SCHEMA, **filters, after=after, limit=page.page_size + 1)
        next_cursor = None
        if len(rows) > page.page_size:
            rows = rows[:page.page_size]
            next_cursor = encode_cursor(
                secret, operation_id=operation_id, sort=SORT, filters=_bound(filters),
                scope=principal.scope_key,
                last_key=[rows[-1].created_at.isoformat(), str(rows[-1].id)])
        return {"items": [row.body for row in rows], "limits": allocation_limits(cur, limits_of),
                "pagination": pagination_block(next_cursor, page.page_size)}

    return cached_query(request, principal, operation_id=operation_id, projection=READ_MODELS,
                        query={**_bound(filters), "limits_of": str(limits_of),
                               "after": page.after, "page_size": page.page_size},
                        compute=compute)


@router.get("/api/v1/allocations", operation_id="listAllocations")
def list_my_allocations(request: Request, principal: Principal = Depends(authenticate),
                        cursor: str | None = None, page_size: int | None = Query(default=None),
                        status: Status | None = None) -> JSONResponse:
    project = project_scope(request, principal)
    filters = {"project_id": project, "user_id": principal.user_id, "status": status}
    page = _page(request, principal, "listAllocations", cursor=cursor, page_size=page_size,
                 filters=filters)
    return _list(request, principal, "listAllocations", page, filters=filters,
                 limits_of=principal.user_id)


@router.get("/api/v1/projects/{project_id}/allocations", operation_id="listProjectAllocations")
def list_project_allocations(project_id: UUID, request: Request,
                             principal: Principal = Depends(authenticate),
                             cursor: str | None = None,
                             page_size: int | None = Query(default=None),
                             status: Status | None = None) -> JSONResponse:
    filters = {"project_id": project_id, "status": status}
    page = _page(request, principal, "listProjectAllocations", cursor=cursor,
                 page_size=page_size, filters=filters)
    require_member(principal, project_id)
    return _list(request, principal, "listProjectAllocations", page, filters=filters,
                 limits_of=principal.user_id)


@router.get("/api/v1/orgs/{org_id}/allocations", operation_id="listOrgAllocations")
def list_org_allocations(org_id: UUID, request: Request,
                         principal: Principal = Depends(authenticate),
                         cursor: str | None = None, page_size: int | None = Query(default=None),
                         status: Status | None = None) -> JSONResponse:
    filters = {"org_id": org_id, "status": status}
    page = _page(request, principal, "listOrgAllocations", cursor=cursor, page_size=page_size,
                 filters=filters)
    _tenant(principal, org_id)
    return _list(request, principal, "listOrgAllocations", page, filters=filters,
                 limits_of=principal.user_id)


@router.get("/api/v1/admin/allocations", operation_id="adminListAllocations")
def admin_list_allocations(request: Request, principal: Principal = Depends(admin),
                           cursor: str | None = None,
                           page_size: int | None = Query(default=None),
                           user_id: UUID | None = None, node_id: UUID | None = None,
                           status: Status | None = None) -> JSONResponse:
    filters = {"user_id": user_id, "node_id": node_id, "status": status}
    page = _page(request, principal, "adminListAllocations", cursor=cursor,
                 page_size=page_size, filters=filters)
    return _list(request, principal, "adminListAllocations", page, filters=filters,
                 limits_of=user_id or principal.user_id)


# ---- one lease --------------------------------------------------------------------------------
def _detail(request: Request, principal: Principal, operation_id: str, allocation_id: UUID,
            *, project_id: UUID | None = None, org_id: UUID | None = None) -> JSONResponse:

    def compute(cur: Any) -> dict[str, Any]:
        found = get_allocation(cur, SCHEMA, allocation_id)
        if found is None or (project_id is not None and found.project_id != project_id) \
                or (org_id is not None and found.org_id != org_id):
            raise _not_found(allocation_id)
        return found.body

    return cached_query(request, principal, operation_id=operation_id, projection=READ_MODELS,
                        query=_bound({"allocation_id": allocation_id, "project_id": project_id,
                                      "org_id": org_id}),
                        compute=compute)


@router.get("/api/v1/allocations/{allocation_id}", operation_id="getAllocationById")
def get_allocation_by_id(allocation_id: UUID, request: Request,
                         principal: Principal = Depends(authenticate)) -> JSONResponse:
    project = project_scope(request, principal)
    return _detail(request, principal, "getAllocationById", allocation_id, project_id=project)


@router.get("/api/v1/projects/{project_id}/allocations/{allocation_id}",
            operation_id="getProjectAllocationById")
def get_project_allocation_by_id(project_id: UUID, allocation_id: UUID, request: Request,
                                 principal: Principal = Depends(authenticate)) -> JSONResponse:
    require_member(principal, project_id)
    return _detail(request, principal, "getProjectAllocationById", allocation_id,
                   project_id=project_id)


@router.get("/api/v1/orgs/{org_id}/allocations/{allocation_id}",
            operation_id="getOrgAllocationById")
def get_org_allocation_by_id(org_id: UUID, allocation_id: UUID, request: Request,
                             principal: Principal = Depends(authenticate)) -> JSONResponse:
    _tenant(principal, org_id)
    return _detail(request, principal, "getOrgAllocationById", allocation_id, org_id=org_id)


# ---- timeline ---------------------------------------------------------------------------------
def _timeline(request: Request, principal: Principal, operation_id: str, allocation_id: UUID,
              *, project_id: UUID | None, limit: int, cursor: str | None) -> JSONResponse:
    secret = request.app.state.settings.jwt_secret
    binding = {"operation_id": operation_id, "sort": "seq_desc",
               "filters": {"allocation_id": str(allocation_id)}, "scope": principal.scope_key}
    page = page_request(secret, cursor=cursor, page_size=limit, **binding)
    before = None if page.after is None else int(page.after[0])

    def compute(cur: Any) -> dict[str, Any]:
        head = allocation_head(cur, SCHEMA, allocation_id)
        if head is None or (project_id is not None and head[1] != project_id):
            raise _not_found(allocation_id)
        rows = timeline_page(cur, SCHEMA, allocation_id, before=before, limit=limit + 1)
        next_cursor = None
        if len(rows) > limit:
            rows = rows[:limit]
            next_cursor = encode_cursor(secret, last_key=[rows[-1][0]], **binding)
        return {"allocation_id": str(allocation_id), "status": head[0],
                "generated_at": iso(datetime.now(timezone.utc)), "next_cursor": next_cursor,
                "items": [item for _, item in reversed(rows)]}

    return cached_query(request, principal, operation_id=operation_id, projection="allocations",
                        query={"allocation_id": str(allocation_id), "project_id": str(project_id),
                               "before": before, "limit": limit},
                        compute=compute)


@router.get("/api/v1/allocations/{allocation_id}/timeline", operation_id="getAllocationTimeline")
def get_allocation_timeline(allocation_id: UUID, request: Request,
                            principal: Principal = Depends(authenticate),
                            limit: int = Query(default=50, ge=1, le=200),
                            cursor: str | None = None) -> JSONResponse:
    project = project_scope(request, principal)
    return _timeline(request, principal, "getAllocationTimeline", allocation_id,
                     project_id=project, limit=limit, cursor=cursor)


@router.get("/api/v1/admin/allocations/{allocation_id}/timeline",
            operation_id="adminGetAllocationTimeline")
def admin_get_allocation_timeline(allocation_id: UUID, request: Request,
                                  principal: Principal = Depends(admin),
                                  limit: int = Query(default=50, ge=1, le=200),
                                  cursor: str | None = None) -> JSONResponse:
    return _timeline(request, principal, "adminGetAllocationTimeline", allocation_id,
                     project_id=None, limit=limit, cursor=cursor)
