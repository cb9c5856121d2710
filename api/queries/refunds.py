"""Refund queries: ``adminListUserRefunds``, ``listBillingRefunds`` (the caller's own)
and ``listV3PlatformFinanceUserRefunds`` (+``Compat``), which adds ``sort``,
``time_range``/``from``/``to``, ``correlation_id`` and ``format=json|csv``.

Every list reads the ``refunds`` read model through the cache, one keyset page at a
time; the cursor is bound to the operation, sort, filters and caller, and carries the
resolved time window, so walking the pages of ``time_range=24h`` sees one window.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta, timezone
from typing import Any, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from api.auth import Principal, authenticate, requires
from api.errors import ApiError
from api.fields import Instant
from api.pagination import encode_cursor, page_request, pagination_block, resume_sorted
from api.queries import CACHE_HEADER, cached_query
from domain.refunds import refund_json
from projections.refunds import list_refunds
from projections.store import SCHEMA

router = APIRouter()
OPS_READ = requires("platform.ops.read")
Status = Literal["accepted", "completed", "failed"]
Sort = Literal["id_asc", "id_desc", "created_at_desc", "created_at_asc", "updated_at_desc",
               "updated_at_asc", "status_asc", "status_desc", "amount_desc", "amount_asc"]
TimeRange = Literal["6h", "12h", "24h", "7d", "custom"]
RANGES = {"6h": timedelta(hours=6), "12h": timedelta(hours=12), "24h": timedelta(hours=24),
          "7d": timedelta(days=7)}
CSV_COLUMNS = ("id", "org_id", "user_id", "requested_by_user_id", "amount_minor", "currency",
               "reason", "payment_reference", "mode", "outcome", "status", "provider_refund_id",
               "internal_ledger_entry_id", "correlation_id", "created_at", "updated_at")


@router.get("/api/v1/admin/users/{user_id}/refunds", operation_id="adminListUserRefunds")
def admin_list_user_refunds(user_id: UUID, request: Request,
                            principal: Principal = Depends(OPS_READ),
                            cursor: str | None = None, page_size: int | None = Query(default=None),
                            status: Status | None = None) -> JSONResponse:
    return _page(request, principal, "adminListUserRefunds", user_id=user_id, status=status,
                 cursor=cursor, page_size=page_size)


@router.get("/api/v1/billing/refunds", operation_id="listBillingRefunds")
def list_billing_refunds(request: Request, principal: Principal = Depends(authenticate),
                         cursor: str | None = None, page_size: int | None = Query(default=None),
                         status: Status | None = None) -> JSONResponse:
    return _page(request, principal, "listBillingRefunds", user_id=principal.user_id,
                 status=status, cursor=cursor, page_size=page_size)


@router.get("/api/v1/platform/finance/users/{user_id}/refunds",
            operation_id="listV3PlatformFinanceUserRefunds")
@router.get("/api/v1/v3/platform/finance/users/{user_id}/refunds",
            operation_id="listV3PlatformFinanceUserRefundsCompat")
def list_v3_user_refunds(user_id: UUID, request: Request,
                         principal: Principal = Depends(OPS_READ),
                         cursor: str | None = None, page_size: int | None = Query(default=None),
                         status: Status | None = None, correlation_id: str | None = None,
                         time_range: TimeRange | None = None,
                         from_: Instant | None = Query(default=None, alias="from"),
                         to: Instant | None = None, sort: Sort = "id_asc",
                         format: Literal["json", "csv"] = "json") -> Response:
    if time_range in RANGES and (from_ or to):
        raise ApiError(400, "invalid_request", "from and to go with time_range=custom only",
                       reason="time_range_conflict")
    if from_ and to and from_ > to:
        raise ApiError(400, "invalid_request", "from must not be after to",
                       reason="range_inverted")
    since = from_
    if time_range in RANGES:
        since = datetime.now(timezone.utc).replace(microsecond=0) - RANGES[time_range]
    answer = _page(request, principal, "listV3PlatformFinanceUserRefunds", user_id=user_id,
                   status=status, cursor=cursor, page_size=page_size,
                   correlation_id=correlation_id, time_range=time_range, since=since, until=to,
                   raw_window=(from_, to), sort=sort)
    return answer if format == "json" else _as_csv(answer)


def _page(request: Request, principal: Principal, operation_id: str, *, user_id: UUID,
          status: str | None, cursor: str | None, page_size: int | None,
          correlation_id: str | None = None, time_range: str | None = None,
          since: datetime | None = None, until: datetime | None = None,
          raw_window: tuple[datetime | None, datetime | None] = (None, None),
          sort: str = "created_at_desc") -> JSONResponse:
    filters = {"user_id": str(user_id), "status": str(status),
               "correlation_id": str(correlation_id), "time_range": str(time_range),
               "from": str(raw_window[0]), "to": str(raw_window[1])}
    secret = request.app.state.settings.jwt_secret
    page = page_request(secret, cursor=cursor, page_size=page_size, operation_id=operation_id,
                        sort=sort, filters=filters, scope=principal.scope_key)
    field = sort.rpartition("_")[0]
    after, since = resume_sorted(page.after, sort, ("created_at", "updated_at"), since)

    def compute(cur: Any) -> dict[str, Any]:
        rows = list_refunds(cur, SCHEMA, user_id=user_id, status=status,
                            correlation_id=correlation_id, since=since, until=until, sort=sort,
                            after=after, limit=page.page_size + 1)
        next_cursor = None
        if len(rows) > page.page_size:
            rows = rows[:page.page_size]
            last = rows[-1]
            value = last["amount_minor" if field == "amount" else field]
            next_cursor = encode_cursor(
                secret, operation_id=operation_id, sort=sort, filters=filters,
                scope=principal.scope_key,
                last_key=[value.isoformat() if isinstance(value, datetime) else
                          value if isinstance(value, int) else str(value), str(last["id"]),
                          since.isoformat() if since else None])
        return {"items": [refund_json(r) for r in rows],
                "pagination": pagination_block(next_cursor, page.page_size)}

    return cached_query(request, principal, operation_id=operation_id, projection="refunds",
                        query={**filters, "sort": sort, "since": str(since), "cursor": cursor,
                               "page_size": page.page_size},
                        compute=compute)


def _as_csv(answer: JSONResponse) -> Response:
    """The same page as CSV: a header row, one row per refund; the next page's cursor
    goes in ``X-Next-Cursor``."""
    body = json.loads(answer.body)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for item in body["items"]:
        flat = {**item, "amount_minor": item["amount"]["amount_minor"],
                "currency": item["amount"]["currency"]}
        writer.writerow(["" if flat[c] is None else flat[c] for c in CSV_COLUMNS])
    headers = {name: answer.headers[name] for name in (CACHE_HEADER, "X-Ledger-Read-Position")
               if name in answer.headers}
    headers["Content-Disposition"] = 'attachment; filename="refunds.csv"'
    if body["pagination"]["next_cursor"]:
        headers["X-Next-Cursor"] = body["pagination"]["next_cursor"]
    return Response(out.getvalue(), media_type="text/csv", headers=headers)
