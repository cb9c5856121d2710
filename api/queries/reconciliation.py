"""Reconciliation run reads: ``adminListBillingReconciliation``,
``adminGetBillingReconciliation`` and their V3 twins ``listV3PlatformFinanceReconciliation``
/ ``getV3PlatformFinanceReconciliation`` (+``Compat``).

``current`` is the summary of the latest completed run (by ``checked_at``); before any
run it reports nothing checked (``checked_at`` 1970-01-01, severity ``warn``). The admin
list is newest first; the V3 list adds ``status`` (repeatable), ``time_range``/``from``/
``to`` on ``created_at``, ``sort``, ``search``, ``correlation_id`` and ``format=csv``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from api.auth import Principal, requires
from api.errors import ApiError
from api.fields import Instant
from api.pagination import encode_cursor, page_request, pagination_block, resume_sorted
from api.queries import cached_query
from api.queries.finance import (BASE, COMPAT, TimeRange, csv_response, csv_text, cursor_value,
                                 time_window)
from domain.reconciliation import never_checked, run_json
from projections.reconciliation import get_run, latest_completed, list_runs
from projections.store import SCHEMA

router = APIRouter()
OPS_READ = requires("platform.ops.read")
ADMIN_PATH = "/api/v1/admin/billing/reconciliation"
RunStatus = Literal["running", "completed", "failed"]
Sort = Literal["created_at_desc", "created_at_asc", "checked_at_desc", "checked_at_asc",
               "status_asc", "status_desc"]
SUMMARY_COLUMNS = ("checked_at", "severity", "missing_open_usage_count",
                   "orphan_open_usage_count", "unbilled_closed_usage_count",
                   "sample_allocation_id", "sample_usage_id")
CSV_COLUMNS = ("id", "status", *SUMMARY_COLUMNS, "ledger_problem_count", "failure_reason",
               "requested_by_user_id", "correlation_id", "created_at", "completed_at")


@router.get(ADMIN_PATH, operation_id="adminListBillingReconciliation")
def admin_list_billing_reconciliation(
        request: Request, principal: Principal = Depends(OPS_READ), cursor: str | None = None,
        page_size: int | None = Query(default=None)) -> Response:
    return _page(request, principal, "adminListBillingReconciliation", cursor=cursor,
                 page_size=page_size)


@router.get(f"{BASE}/reconciliation", operation_id="listV3PlatformFinanceReconciliation")
@router.get(f"{COMPAT}/reconciliation", operation_id="listV3PlatformFinanceReconciliationCompat")
def list_v3_platform_finance_reconciliation(
        request: Request, principal: Principal = Depends(OPS_READ), cursor: str | None = None,
        page_size: int | None = Query(default=None),
        format: Literal["json", "csv"] = "json",
        status: list[RunStatus] | None = Query(default=None),
        time_range: TimeRange | None = None,
        from_: Instant | None = Query(default=None, alias="from"), to: Instant | None = None,
        sort: Sort = "created_at_desc", search: str | None = Query(default=None, max_length=120),
        correlation_id: str | None = None) -> Response:
    since, until = time_window(time_range, from_, to)
    return _page(request, principal, "listV3PlatformFinanceReconciliation", cursor=cursor,
                 page_size=page_size, statuses=sorted(set(status or [])), since=since,
                 until=until, raw_window=(from_, to), time_range=time_range, sort=sort,
                 search=search, correlation_id=correlation_id, as_csv=format == "csv")


def _page(request: Request, principal: Principal, operation_id: str, *, cursor: str | None,
          page_size: int | None, statuses: list[str] | None = None,
          since: datetime | None = None, until: datetime | None = None,
          raw_window: tuple[datetime | None, datetime | None] = (None, None),
          time_range: str | None = None, sort: str = "created_at_desc",
          search: str | None = None, correlation_id: str | None = None,
          as_csv: bool = False) -> Response:
    filters = {"status": ",".join(statuses or []), "time_range": str(time_range),
               "from": str(raw_window[0]), "to": str(raw_window[1]), "search": str(search),
               "correlation_id": str(correlation_id)}
    secret = request.app.state.settings.jwt_secret
    page = page_request(secret, cursor=cursor, page_size=page_size, operation_id=operation_id,
                        sort=sort, filters=filters, scope=principal.scope_key)
    field = sort.rpartition("_")[0]
    after, since = resume_sorted(page.after, sort, ("created_at", "checked_at"), since)

    def compute(cur: Any) -> dict[str, Any]:
        rows = list_runs(cur, SCHEMA, statuses=statuses, since=since, until=until,
                         correlation_id=correlation_id, search=search, sort=sort, after=after,
                         limit=page.page_size + 1)
        next_cursor = None
        if len(rows) > page.page_size:
            rows = rows[:page.page_size]
            next_cursor = encode_cursor(
                secret, operation_id=operation_id, sort=sort, filters=filters,
                scope=principal.scope_key,
                last_key=[cursor_value(rows[-1][field]), str(rows[-1]["id"]),
                          since.isoformat() if since else None])
        if as_csv:
            flat = [{**r, **r["summary"]} for r in rows]
            return {"csv": csv_text(CSV_COLUMNS, flat), "next_cursor": next_cursor}
        current = latest_completed(cur, SCHEMA)
        return {"current": dict(current["summary"]) if current else never_checked(),
                "runs": [run_json(r) for r in rows],
                "pagination": pagination_block(next_cursor, page.page_size)}

    answer = cached_query(request, principal, operation_id=operation_id,
                          projection="reconciliation",
                          query={**filters, "sort": sort, "since": str(since), "csv": as_csv,
                                 "cursor": cursor, "page_size": page.page_size},
                          compute=compute)
    return csv_response(answer, "reconciliation-runs.csv") if as_csv else answer


@router.get(ADMIN_PATH + "/{job_id}", operation_id="adminGetBillingReconciliation")
@router.get(f"{BASE}/reconciliation/{{job_id}}", operation_id="getV3PlatformFinanceReconciliation")
@router.get(f"{COMPAT}/reconciliation/{{job_id}}",
            operation_id="getV3PlatformFinanceReconciliationCompat")
def get_billing_reconciliation(job_id: UUID, request: Request,
                               principal: Principal = Depends(OPS_READ)) -> JSONResponse:

    def compute(cur: Any) -> dict[str, Any]:
        row = get_run(cur, SCHEMA, job_id)
        if row is None:
            raise ApiError(404, "invalid_request", "reconciliation run not found",
                           reason="reconciliation_run_not_found")
        return run_json(row)

    return cached_query(request, principal, operation_id="adminGetBillingReconciliation",
                        projection="reconciliation", query={"id": str(job_id)}, compute=compute)
