"""App-instance reads, from the ``app_instances`` read model: instances, members, member
and repair operations, on the project path and the V3 family (and its compat twins).

Scope: the project path needs membership of ``project_id`` (403), the V3 family the
``X-Project-ID`` header (api-conventions). An instance of another project, a member or
operation of another instance, and a random id answer the same 404
``app_instance_not_found`` (``details.resource`` names what was missing), as the
commands do. Lists check ``page_size`` and ``cursor`` first (400), then the scope, then
that the instance exists (404).

Order: instances newest first (``created_at desc, id desc``); members and operations
oldest first (``created_at, id``), so the member-operation list filtered by ``status``
is the adapter's work queue in the order it was asked. Cursors are signed keysets bound
to the operation, filters and caller.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from api.auth import Principal, authenticate, project_scope, require_member
from api.errors import ApiError
from api.pagination import PageRequest, encode_cursor, page_request, pagination_block
from api.queries import cached_query
from domain.app_instances import MEMBER_STATUSES, OP_STATUSES, STATUSES
from projections.app_instances import (MEMBER_OPERATIONS, MEMBERS, REPAIR_OPERATIONS, Row,
                                       get_child, get_instance, list_children,
                                       list_instances)
from projections.store import SCHEMA

router = APIRouter()
READ_MODEL = "app_instances"
PROJECT = "/api/v1/projects/{project_id}/app-instances"
V3 = "/api/v1/apps/instances"
COMPAT = "/api/v1/v3/apps/instances"
InstanceStatus = Literal[STATUSES]  # type: ignore[valid-type]
MemberStatus = Literal[MEMBER_STATUSES]  # type: ignore[valid-type]
OperationStatus = Literal[OP_STATUSES]  # type: ignore[valid-type]
#: child table -> (its ``details.resource`` when missing, the path parameter naming it)
RESOURCES = {MEMBERS: ("member", "member_id"),
             MEMBER_OPERATIONS: ("member_operation", "operation_id"),
             REPAIR_OPERATIONS: ("repair_operation", "repair_operation_id")}


def not_found(resource: str, **details: Any) -> ApiError:
    """The commands' 404 (``domain.app_instances._not_found``), word for word."""
    return ApiError(404, "app_instance_not_found", f"{resource.replace('_', ' ')} not found",
                    resource=resource, **details)


def _instance_missing(app_instance_id: UUID) -> ApiError:
    return not_found("app_instance", app_instance_id=str(app_instance_id))


def _free_status(value: str | None, allowed: tuple[str, ...]) -> str | None:
    """The V3 lists' ``status`` is a free string in the contract: checked here (400)."""
    if value is not None and value not in allowed:
        raise ApiError(400, "validation_error", f"status must be one of {', '.join(allowed)}",
                       fields=[{"location": "query", "field": "status", "reason": "enum"}])
    return value


def _bound(filters: dict[str, Any]) -> dict[str, str | None]:
    return {k: None if v is None else str(v) for k, v in filters.items()}


def _page(request: Request, principal: Principal, operation_id: str, sort: str, *,
          cursor: str | None, page_size: int | None, filters: dict[str, Any]) -> PageRequest:
    return page_request(request.app.state.settings.jwt_secret, cursor=cursor,
                        page_size=page_size, operation_id=operation_id, sort=sort,
                        filters=_bound(filters), scope=principal.scope_key)


def _after(page: PageRequest) -> tuple[datetime, UUID] | None:
    if page.after is None:
        return None
    try:
        return datetime.fromisoformat(page.after[0]), UUID(page.after[1])
    except (ValueError, TypeError, IndexError):
        raise ApiError(400, "invalid_request", "the cursor is not valid",
                       reason="cursor_invalid") from None


def _paged(request: Request, principal: Principal, operation_id: str, sort: str,
           page: PageRequest, filters: dict[str, Any], rows: list[Row]) -> dict[str, Any]:
    next_cursor = None
    if len(rows) > page.page_size:
        rows = rows[:page.page_size]
        next_cursor = encode_cursor(
            request.app.state.settings.jwt_secret, operation_id=operation_id, sort=sort,
            filters=_bound(filters), scope=principal.scope_key,
            last_key=[rows[-1].created_at.isoformat(), str(rows[-1].id)])
    return {"items": [row.body for row in rows],
            "pagination": pagination_block(next_cursor, page.page_size)}


# ---- instances -------------------------------------------------------------------------------
@router.get(PROJECT, operation_id="listAppInstances")
def list_app_instances(project_id: UUID, request: Request,
                       principal: Principal = Depends(authenticate),
                       cursor: str | None = None, page_size: int | None = Query(default=None),
                       status: InstanceStatus | None = None) -> JSONResponse:
    sort, filters = "created_at_desc", {"project_id": project_id, "status": status}
    page = _page(request, principal, "listAppInstances", sort, cursor=cursor,
                 page_size=page_size, filters=filters)
    after = _after(page)
    require_member(principal, project_id)

    def compute(cur: Any) -> dict[str, Any]:
        rows = list_instances(cur, SCHEMA, project_id, status=status, after=after,
                              limit=page.page_size + 1)
        return _paged(request, principal, "listAppInstances", sort, page, filters, rows)

    return cached_query(request, principal, operation_id="listAppInstances",
                        projection=READ_MODEL,
                        query={**_bound(filters), "after": page.after,
                               "page_size": page.page_size},
                        compute=compute)


def _instance(request: Request, principal: Principal, operation_id: str, project_id: UUID,
              app_instance_id: UUID) -> JSONResponse:
    def compute(cur: Any) -> dict[str, Any]:
        found = get_instance(cur, SCHEMA, project_id, app_instance_id)
        if found is None:
            raise _instance_missing(app_instance_id)
        return found

    # the project path and V3 answer the same body: one cache entry serves both
    return cached_query(request, principal, operation_id="getAppInstance", projection=READ_MODEL,
                        query={"project_id": str(project_id),
                               "app_instance_id": str(app_instance_id)},
                        compute=compute)


@router.get(PROJECT + "/{app_instance_id}", operation_id="getAppInstance")
def get_app_instance(project_id: UUID, app_instance_id: UUID, request: Request,
                     principal: Principal = Depends(authenticate)) -> JSONResponse:
    require_member(principal, project_id)
    return _instance(request, principal, "getAppInstance", project_id, app_instance_id)


@router.get(V3 + "/{app_instance_id}", operation_id="getV3AppInstance")
@router.get(COMPAT + "/{app_instance_id}", operation_id="getV3AppInstanceCompat")
def get_v3_app_instance(app_instance_id: UUID, request: Request,
                        principal: Principal = Depends(authenticate)) -> JSONResponse:
    project_id = project_scope(request, principal)
    return _instance(request, principal, "getV3AppInstance", project_id, app_instance_id)


# ---- members and operations ------------------------------------------------------------------
def _children(request: Request, principal: Principal, operation_id: str, table: str,
              project_id: UUID | None, app_instance_id: UUID, *, cursor: str | None,
              page_size: int | None, status: str | None,
              component_key: str | None = None) -> JSONResponse:
    """One page of an instance's members or operations. ``project_id`` None: the
    ``X-Project-ID`` header's (V3), resolved after the page parameters."""
    sort = "created_at_asc"
    filters = {"app_instance_id": app_instance_id, "status": status,
               "component_key": component_key}
    page = _page(request, principal, operation_id, sort, cursor=cursor, page_size=page_size,
                 filters=filters)
    after = _after(page)
    if project_id is None:
        project_id = project_scope(request, principal)
    else:
        require_member(principal, project_id)
    project = project_id

    def compute(cur: Any) -> dict[str, Any]:
        if get_instance(cur, SCHEMA, project, app_instance_id) is None:
            raise _instance_missing(app_instance_id)
        rows = list_children(cur, SCHEMA, table, project, app_instance_id, status=status,
                             component_key=component_key, after=after,
                             limit=page.page_size + 1)
        return _paged(request, principal, operation_id, sort, page, filters, rows)

    return cached_query(request, principal, operation_id=operation_id, projection=READ_MODEL,
                        query={**_bound(filters), "project_id": str(project),
                               "after": page.after, "page_size": page.page_size},
                        compute=compute)


def _child(request: Request, principal: Principal, operation_id: str, table: str,
           project_id: UUID, app_instance_id: UUID, item_id: UUID) -> JSONResponse:
    require_member(principal, project_id)
    resource, parameter = RESOURCES[table]

    def compute(cur: Any) -> dict[str, Any]:
        if get_instance(cur, SCHEMA, project_id, app_instance_id) is None:
            raise _instance_missing(app_instance_id)
        found = get_child(cur, SCHEMA, table, project_id, app_instance_id, item_id)
        if found is None:
            raise not_found(resource, app_instance_id=str(app_instance_id),
                            **{parameter: str(item_id)})
        return found

    return cached_query(request, principal, operation_id=operation_id, projection=READ_MODEL,
                        query={"project_id": str(project_id),
                               "app_instance_id": str(app_instance_id), "id": str(item_id)},
                        compute=compute)


@router.get(PROJECT + "/{app_instance_id}/members", operation_id="listAppInstanceMembers")
def list_app_instance_members(project_id: UUID, app_instance_id: UUID, request: Request,
                              principal: Principal = Depends(authenticate),
                              cursor: str | None = None,
                              page_size: int | None = Query(default=None),
                              component_key: str | None = None,
                              status: MemberStatus | None = None) -> JSONResponse:
    return _children(request, principal, "listAppInstanceMembers", MEMBERS, project_id,
                     app_instance_id, cursor=cursor, page_size=page_size, status=status,
                     component_key=component_key)


@router.get(PROJECT + "/{app_instance_id}/members/{member_id}",
            operation_id="getAppInstanceMember")
def get_app_instance_member(project_id: UUID, app_instance_id: UUID, member_id: UUID,
                            request: Request,
                            principal: Principal = Depends(authenticate)) -> JSONResponse:
    return _child(request, principal, "getAppInstanceMember", MEMBERS, project_id,
                  app_instance_id, member_id)


@router.get(PROJECT + "/{app_instance_id}/member-operations",
            operation_id="listAppInstanceMemberOperations")
def list_app_instance_member_operations(project_id: UUID, app_instance_id: UUID,
                                        request: Request,
                                        principal: Principal = Depends(authenticate),
                                        cursor: str | None = None,
                                        page_size: int | None = Query(default=None),
                                        status: OperationStatus | None = None,
                                        component_key: str | None = None) -> JSONResponse:
    return _children(request, principal, "listAppInstanceMemberOperations", MEMBER_OPERATIONS,
                     project_id, app_instance_id, cursor=cursor, page_size=page_size,
                     status=status, component_key=component_key)


@router.get(PROJECT + "/{app_instance_id}/member-operations/{operation_id}",
            operation_id="getAppInstanceMemberOperation")
def get_app_instance_member_operation(project_id: UUID, app_instance_id: UUID,
                                      operation_id: UUID, request: Request,
                                      principal: Principal = Depends(authenticate)
                                      ) -> JSONResponse:
    return _child(request, principal, "getAppInstanceMemberOperation", MEMBER_OPERATIONS,
                  project_id, app_instance_id, operation_id)


@router.get(PROJECT + "/{app_instance_id}/repair-operations",
            operation_id="listAppInstanceRepairOperations")
def list_app_instance_repair_operations(project_id: UUID, app_instance_id: UUID,
                                        request: Request,
                                        principal: Principal = Depends(authenticate),
                                        cursor: str | None = None,
                                        page_size: int | None = Query(default=None),
                                        status: OperationStatus | None = None) -> JSONResponse:
    return _children(request, principal, "listAppInstanceRepairOperations", REPAIR_OPERATIONS,
                     project_id, app_instance_id, cursor=cursor, page_size=page_size,
                     status=status)


@router.get(PROJECT + "/{app_instance_id}/repair-operations/{repair_operation_id}",
            operation_id="getAppInstanceRepairOperation")
def get_app_instance_repair_operation(project_id: UUID, app_instance_id: UUID,
                                      repair_operation_id: UUID, request: Request,
                                      principal: Principal = Depends(authenticate)
                                      ) -> JSONResponse:
    return _child(request, principal, "getAppInstanceRepairOperation", REPAIR_OPERATIONS,
                  project_id, app_instance_id, repair_operation_id)


@router.get(V3 + "/{app_instance_id}/members", operation_id="listV3AppInstanceMembers")
@router.get(COMPAT + "/{app_instance_id}/members",
            operation_id="listV3AppInstanceMembersCompat")
def list_v3_app_instance_members(app_instance_id: UUID, request: Request,
                                 principal: Principal = Depends(authenticate),
                                 cursor: str | None = None,
                                 page_size: int | None = Query(default=None),
                                 component_key: str | None = None,
                                 status: str | None = None) -> JSONResponse:
    return _children(request, principal, "listV3AppInstanceMembers", MEMBERS, None,
                     app_instance_id, cursor=cursor, page_size=page_size,
                     status=_free_status(status, MEMBER_STATUSES), component_key=component_key)


@router.get(V3 + "/{app_instance_id}/member-operations",
            operation_id="listV3AppInstanceMemberOperations")
@router.get(COMPAT + "/{app_instance_id}/member-operations",
            operation_id="listV3AppInstanceMemberOperationsCompat")
def list_v3_app_instance_member_operations(app_instance_id: UUID, request: Request,
                                           principal: Principal = Depends(authenticate),
                                           cursor: str | None = None,
                                           page_size: int | None = Query(default=None),
                                           component_key: str | None = None,
                                           status: str | None = None) -> JSONResponse:
    return _children(request, principal, "listV3AppInstanceMemberOperations", MEMBER_OPERATIONS,
                     None, app_instance_id, cursor=cursor, page_size=page_size,
                     status=_free_status(status, OP_STATUSES), component_key=component_key)
