"""Audit logs: caller, project, org and admin lists, exports and V3 evidence, from the
``audit_logs`` read model (one row per command, projected from its events).

Scopes (docs/decisions.md):
- the caller's lists (``listMyAuditLogs``, V3 account evidence) hold the rows of
  commands the caller made and of commands about them (their balance, leases,
  payments);
- project lists (``listProjectAuditLogs``, V3 project evidence) need membership of the
  project (path ``project_id`` or ``X-Project-ID``), else 403, then project role
  ``owner`` or ``admin`` (a tenant ``owner``/``admin`` is that in its projects) or
  ``platform.audit.read``, else 403 ``insufficient_permissions``; org and tenant lists
  need the token's tenant (a caller without one: their personal org, which they own),
  else 403, then tenant role ``owner`` or ``admin`` or ``platform.audit.read``, else 403;
- the admin and V3 platform lists and exports need ``platform.audit.read``.
Actor filters apply inside the resolved scope. An ``actor_role`` filter outside the
contract's four roles, or an ``action`` filter that is not a dotted lower-case name, is
400 ``validation_error`` (it could never match). Lists check ``page_size``, ``sort`` and
``cursor`` before the scope (400 before 403: it reveals nothing).

Sorts are the contract's ``AuditLogSort``, ties by ``occurred_at desc`` then ``id``;
cursors are signed and bound to operation, sort, filters and caller, so a cursor used
under another sort is 400 ``invalid_request``. Exports take the list's filters and
sort, no cursor, and stream every matching row (CSV columns: ``CSV_COLUMNS``).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from api.auth import (Principal, authenticate, project_scope, require_member,
                      require_project_role, require_tenant_role, requires)
from api.consistency import current_position, requested_position, wait_for
from api.errors import ApiError
from api.fields import Instant
from api.pagination import encode_cursor, page_request, pagination_block
from api.queries import CACHE_HEADER, cached_query, read_model_errors
from domain.admission import personal_org_id
from domain.audit_actions import ROLES
from projections.audit_logs import (CSV_COLUMNS, SORTS, AuditFilter, audit_log_json,
                                    list_audit_logs, sort_key, stream_audit_logs)
from projections.store import SCHEMA

router = APIRouter()
READ_MODEL = "audit_logs"
Sort = Literal["occurred_at_desc", "occurred_at_asc", "action_asc", "action_desc",
               "result_asc", "result_desc", "target_asc", "target_desc"]
Role = Literal["user", "admin", "service_account", "system"]
Format = Literal["csv", "json"]
auditor = requires("platform.audit.read")
#: what an action filter may hold: the dotted lower-case names audit rows carry
ACTION = re.compile(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)*")


# ---- scope --------------------------------------------------------------------------------
def _own_tenant(principal: Principal) -> UUID:
    return principal.tenant_id or personal_org_id(principal.user_id)


def _require_tenant(principal: Principal, org_id: UUID) -> None:
    if org_id != _own_tenant(principal):
        raise ApiError(403, "insufficient_permissions", "no access to this organization")


def _project_administrator(principal: Principal, project: UUID) -> None:
    """"Visible to project administrators": a member of ``project`` (checked before)
    whose role there is owner or admin, or a platform auditor."""
    require_project_role(principal, project, "owner", "admin", capability="platform.audit.read")


def _tenant_administrator(principal: Principal) -> None:
    """"Visible to tenant administrators": tenant owner or admin, or a platform auditor.
    A caller without a tenant is the one person, so the owner, of their personal org."""
    if principal.tenant_id is not None:
        require_tenant_role(principal, "owner", "admin", capability="platform.audit.read")


def _tenant_header(request: Request) -> UUID | None:
    """The optional ``X-Tenant-ID`` (400 when it is not a uuid)."""
    raw = request.headers.get("x-tenant-id")
    if raw is None:
        return None
    try:
        return UUID(raw)
    except ValueError:
        raise ApiError(400, "validation_error", "X-Tenant-ID must be a uuid",
                       header="X-Tenant-ID") from None


def _filters(*, from_: datetime | None, to: datetime | None, **given: Any) -> AuditFilter:
    if from_ is not None and to is not None and from_ > to:
        raise ApiError(400, "invalid_request", "from must not be after to",
                       reason="range_inverted")
    for name, field, valid in (("actions", "action", ACTION.fullmatch),
                               ("actor_roles", "actor_role", ROLES.__contains__)):
        value = given.get(name)
        values = (value,) if isinstance(value, str) else tuple(value or ())
        bad = [v for v in values if not valid(v)]
        if bad:
            raise ApiError(400, "validation_error", f"{field} is not a known {field} value",
                           fields=[{"location": "query", "field": field,
                                    "reason": "invalid_value"}])
        given[name] = values
    return AuditFilter(since=from_, until=to, **given)


def _binding(filters: AuditFilter) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else None if v is None else str(v))
            for k, v in vars(filters).items()}


# ---- lists --------------------------------------------------------------------------------
def _decode(sort: str, values: list[Any]) -> list[Any]:
    """A cursor's key back to column values (times and ids typed)."""
    out = []
    for (column, _), value in zip(SORTS[sort], values, strict=True):
        out.append(datetime.fromisoformat(value) if column == "occurred_at"
                   else UUID(value) if column == "id" else value)
    return out


def _encode(row: dict[str, Any], sort: str) -> list[Any]:
    return [v.isoformat() if isinstance(v, datetime) else str(v) for v in sort_key(row, sort)]


class Listing:
    """One list call: its page (checked first), then the scope, then the answer."""

    def __init__(self, request: Request, principal: Principal, operation_id: str, *,
                 cursor: str | None, page_size: int | None, sort: str, filters: AuditFilter):
        self.request, self.principal, self.operation_id = request, principal, operation_id
        self.sort, self.filters = sort, filters
        self.secret = request.app.state.settings.jwt_secret
        self.page = page_request(self.secret, cursor=cursor, page_size=page_size,
                                 **self._cursor_binding())
        try:
            self.after = None if self.page.after is None else _decode(sort, self.page.after)
        except (TypeError, ValueError):
            raise ApiError(400, "invalid_request", "the cursor is not valid",
                           reason="cursor_invalid") from None

    def _cursor_binding(self) -> dict[str, Any]:
        return {"operation_id": self.operation_id, "sort": self.sort,
                "filters": _binding(self.filters), "scope": self.principal.scope_key}

    def answer(self) -> JSONResponse:
        size = self.page.page_size

        def compute(cur: Any) -> dict[str, Any]:
            rows = list_audit_logs(cur, SCHEMA, self.filters, sort=self.sort, after=self.after,
                                   limit=size + 1)
            next_cursor = None
            if len(rows) > size:
                rows = rows[:size]
                next_cursor = encode_cursor(self.secret, **self._cursor_binding(),
                                            last_key=_encode(rows[-1], self.sort))
            return {"items": [audit_log_json(row) for row in rows],
                    "pagination": pagination_block(next_cursor, size)}

        return cached_query(self.request, self.principal, operation_id=self.operation_id,
                            projection=READ_MODEL,
                            query={**_binding(self.filters), "sort": self.sort,
                                   "after": self.page.after, "page_size": size},
                            compute=compute)


@router.get("/api/v1/audit-logs", operation_id="listMyAuditLogs")
def list_my_audit_logs(
        request: Request, principal: Principal = Depends(authenticate),
        cursor: str | None = None, page_size: int | None = Query(default=None),
        sort: Sort = "occurred_at_desc", action: str | None = None,
        target_type: str | None = None, correlation_id: str | None = None,
        from_: Instant | None = Query(default=None, alias="from"),
        to: Instant | None = None) -> JSONResponse:
    filters = _filters(visible_to=principal.user_id, actions=action, target_type=target_type,
                       correlation_id=correlation_id, from_=from_, to=to)
    return Listing(request, principal, "listMyAuditLogs", cursor=cursor, page_size=page_size,
                   sort=sort, filters=filters).answer()


@router.get("/api/v1/projects/{project_id}/audit-logs", operation_id="listProjectAuditLogs")
def list_project_audit_logs(
        project_id: UUID, request: Request, principal: Principal = Depends(authenticate),
        cursor: str | None = None, page_size: int | None = Query(default=None),
        sort: Sort = "occurred_at_desc", action: str | None = None,
        target_type: str | None = None, correlation_id: str | None = None,
        from_: Instant | None = Query(default=None, alias="from"),
        to: Instant | None = None) -> JSONResponse:
    filters = _filters(project_id=project_id, actions=action, target_type=target_type,
                       correlation_id=correlation_id, from_=from_, to=to)
    listing = Listing(request, principal, "listProjectAuditLogs", cursor=cursor,
                      page_size=page_size, sort=sort, filters=filters)
    require_member(principal, project_id)
    _project_administrator(principal, project_id)
    return listing.answer()


@router.get("/api/v1/orgs/{org_id}/audit-logs", operation_id="listOrgAuditLogs")
def list_org_audit_logs(
        org_id: UUID, request: Request, principal: Principal = Depends(authenticate),
        cursor: str | None = None, page_size: int | None = Query(default=None),
        sort: Sort = "occurred_at_desc", action: str | None = None,
        target_type: str | None = None, correlation_id: str | None = None,
        from_: Instant | None = Query(default=None, alias="from"),
        to: Instant | None = None) -> JSONResponse:
    filters = _filters(org_id=org_id, actions=action, target_type=target_type,
                       correlation_id=correlation_id, from_=from_, to=to)
    listing = Listing(request, principal, "listOrgAuditLogs", cursor=cursor,
                      page_size=page_size, sort=sort, filters=filters)
    _require_tenant(principal, org_id)
    _tenant_administrator(principal)
    return listing.answer()


@router.get("/api/v1/admin/audit-logs", operation_id="adminListAuditLogs")
def admin_list_audit_logs(
        request: Request, principal: Principal = Depends(auditor),
        cursor: str | None = None, page_size: int | None = Query(default=None),
        sort: Sort = "occurred_at_desc", actor_user_id: UUID | None = None,
        actor_role: Role | None = None, action: str | None = None,
        target_type: str | None = None, correlation_id: str | None = None,
        from_: Instant | None = Query(default=None, alias="from"),
        to: Instant | None = None) -> JSONResponse:
    filters = _filters(actor_user_id=actor_user_id, actor_roles=actor_role, actions=action,
                       target_type=target_type, correlation_id=correlation_id,
                       from_=from_, to=to)
    return Listing(request, principal, "adminListAuditLogs", cursor=cursor,
                   page_size=page_size, sort=sort, filters=filters).answer()


# ---- V3 evidence ----------------------------------------------------------------------------
@router.get("/api/v1/account/evidence/audit", operation_id="listV3AccountEvidenceAuditLogs")
@router.get("/api/v1/v3/account/evidence/audit",
            operation_id="listV3AccountEvidenceAuditLogsCompat")
def list_account_evidence(
        request: Request, principal: Principal = Depends(authenticate),
        cursor: str | None = None, page_size: int | None = Query(default=None),
        sort: Sort = "occurred_at_desc", action: list[str] | None = Query(default=None),
        target_type: str | None = None, correlation_id: str | None = None,
        from_: Instant | None = Query(default=None, alias="from"),
        to: Instant | None = None) -> JSONResponse:
    filters = _filters(visible_to=principal.user_id, actions=action, target_type=target_type,
                       correlation_id=correlation_id, from_=from_, to=to)
    return Listing(request, principal, _operation(request, "listV3AccountEvidenceAuditLogs"),
                   cursor=cursor, page_size=page_size, sort=sort, filters=filters).answer()


@router.get("/api/v1/project/evidence/audit", operation_id="listV3ProjectEvidenceAuditLogs")
@router.get("/api/v1/v3/project/evidence/audit",
            operation_id="listV3ProjectEvidenceAuditLogsCompat")
def list_project_evidence(
        request: Request, principal: Principal = Depends(authenticate),
        cursor: str | None = None, page_size: int | None = Query(default=None),
        sort: Sort = "occurred_at_desc", actor_user_id: UUID | None = None,
        actor_role: list[str] | None = Query(default=None),
        action: list[str] | None = Query(default=None),
        target_type: str | None = None, correlation_id: str | None = None,
        from_: Instant | None = Query(default=None, alias="from"),
        to: Instant | None = None) -> JSONResponse:
    project = project_scope(request, principal)
    _project_administrator(principal, project)
    filters = _filters(project_id=project, actor_user_id=actor_user_id, actor_roles=actor_role,
                       actions=action, target_type=target_type, correlation_id=correlation_id,
                       from_=from_, to=to)
    return Listing(request, principal, _operation(request, "listV3ProjectEvidenceAuditLogs"),
                   cursor=cursor, page_size=page_size, sort=sort, filters=filters).answer()


@router.get("/api/v1/access/evidence/audit", operation_id="listV3TenantEvidenceAuditLogs")
@router.get("/api/v1/v3/access/evidence/audit",
            operation_id="listV3TenantEvidenceAuditLogsCompat")
def list_tenant_evidence(
        request: Request, principal: Principal = Depends(authenticate),
        cursor: str | None = None, page_size: int | None = Query(default=None),
        sort: Sort = "occurred_at_desc", actor_user_id: UUID | None = None,
        actor_role: list[str] | None = Query(default=None),
        action: list[str] | None = Query(default=None),
        target_type: str | None = None, correlation_id: str | None = None,
        from_: Instant | None = Query(default=None, alias="from"),
        to: Instant | None = None) -> JSONResponse:
    tenant = _tenant_header(request)
    filters = _filters(org_id=tenant or _own_tenant(principal), actor_user_id=actor_user_id,
                       actor_roles=actor_role, actions=action, target_type=target_type,
                       correlation_id=correlation_id, from_=from_, to=to)
    listing = Listing(request, principal, _operation(request, "listV3TenantEvidenceAuditLogs"),
                      cursor=cursor, page_size=page_size, sort=sort, filters=filters)
    if tenant is not None:
        _require_tenant(principal, tenant)
    _tenant_administrator(principal)
    return listing.answer()


@router.get("/api/v1/platform/evidence/audit", operation_id="listV3PlatformEvidenceAuditLogs")
@router.get("/api/v1/v3/platform/evidence/audit",
            operation_id="listV3PlatformEvidenceAuditLogsCompat")
def list_platform_evidence(
        request: Request, principal: Principal = Depends(auditor),
        cursor: str | None = None, page_size: int | None = Query(default=None),
        sort: Sort = "occurred_at_desc", actor_user_id: UUID | None = None,
        actor_role: list[str] | None = Query(default=None),
        action: list[str] | None = Query(default=None),
        target_type: str | None = None, correlation_id: str | None = None,
        from_: Instant | None = Query(default=None, alias="from"),
        to: Instant | None = None) -> JSONResponse:
    filters = _filters(actor_user_id=actor_user_id, actor_roles=actor_role, actions=action,
                       target_type=target_type, correlation_id=correlation_id,
                       from_=from_, to=to)
    return Listing(request, principal, _operation(request, "listV3PlatformEvidenceAuditLogs"),
                   cursor=cursor, page_size=page_size, sort=sort, filters=filters).answer()


def _operation(request: Request, name: str) -> str:
    """The operation a twin route serves (its cursors are bound to it)."""
    return name + "Compat" if request.url.path.startswith("/api/v1/v3/") else name


# ---- exports --------------------------------------------------------------------------------
def csv_row(item: dict[str, Any]) -> list[str]:
    """One export line from an ``AuditLogEntry``: null is empty, metadata canonical JSON."""
    values = {**item, "metadata": json.dumps(item["metadata"], sort_keys=True,
                                             separators=(",", ":"))}
    return ["" if values.get(c) is None else str(values[c]) for c in CSV_COLUMNS]


def _csv(rows: Iterator[dict[str, Any]], chunk: int = 500) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for count, row in enumerate(rows, 1):
        writer.writerow(csv_row(audit_log_json(row)))
        if count % chunk == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def _export(request: Request, filters: AuditFilter, sort: str, fmt: str) -> Any:
    stores, settings = request.app.state.stores, request.app.state.settings
    wanted = requested_position(request)
    with read_model_errors():
        if wanted is not None:
            reached, position = wait_for(stores, READ_MODEL, wanted, settings.read_wait_seconds)
        else:
            reached, position = True, current_position(stores, READ_MODEL)
        headers = {"X-Ledger-Read-Position": str(position),
                   CACHE_HEADER: "bypass" if reached else "stale"}
        if fmt == "json":
            with stores.query_pool.connection() as conn:
                items = [audit_log_json(row)
                         for row in stream_audit_logs(conn, SCHEMA, filters, sort=sort)]
            return JSONResponse({"items": items, "export": {"format": "json",
                                                           "count": len(items), "sort": sort}},
                                headers=headers)

        def rows() -> Iterator[dict[str, Any]]:
            with stores.query_pool.connection() as conn:
                yield from stream_audit_logs(conn, SCHEMA, filters, sort=sort)

        chunks = _csv(rows())
        # Run the query before answering: an unreadable read model is a 503, not a
        # truncated 200.
        first = next(chunks)

    def body() -> Iterator[str]:
        yield first
        yield from chunks

    response = StreamingResponse(body(), media_type="text/csv; charset=utf-8", headers=headers)
    response.headers["Content-Disposition"] = 'attachment; filename="audit-logs.csv"'
    return response


@router.get("/api/v1/admin/audit-logs/export", operation_id="adminExportAuditLogsCsv")
def admin_export_audit_logs(
        request: Request, principal: Principal = Depends(auditor),
        actor_user_id: UUID | None = None, actor_role: str | None = None,
        action: str | None = None, target_type: str | None = None,
        correlation_id: str | None = None, sort: Sort = "occurred_at_desc",
        format: Format = "csv", from_: Instant | None = Query(default=None, alias="from"),
        to: Instant | None = None) -> Any:
    filters = _filters(actor_user_id=actor_user_id, actor_roles=actor_role, actions=action,
                       target_type=target_type, correlation_id=correlation_id,
                       from_=from_, to=to)
    return _export(request, filters, sort, format)


@router.get("/api/v1/platform/evidence/audit/export",
            operation_id="exportV3PlatformEvidenceAuditLogs")
@router.get("/api/v1/v3/platform/evidence/audit/export",
            operation_id="exportV3PlatformEvidenceAuditLogsCompat")
def export_platform_evidence(
        request: Request, principal: Principal = Depends(auditor),
        sort: Sort = "occurred_at_desc", format: Format = "csv",
        actor_user_id: UUID | None = None, actor_role: list[str] | None = Query(default=None),
        action: list[str] | None = Query(default=None), target_type: str | None = None,
        correlation_id: str | None = None,
        from_: Instant | None = Query(default=None, alias="from"),
        to: Instant | None = None) -> Any:
    filters = _filters(actor_user_id=actor_user_id, actor_roles=actor_role, actions=action,
                       target_type=target_type, correlation_id=correlation_id,
                       from_=from_, to=to)
    return _export(request, filters, sort, format)
