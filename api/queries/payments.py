"""Payment queries: ``adminListPaymentSessions``, ``adminGetPaymentSession`` and their V3
finance twins ``listV3PlatformFinancePaymentSessionsRaw`` (which adds ``sort``,
``time_range``/``from``/``to``, ``correlation_id`` and ``format=json|csv``) and
``getV3PlatformFinancePaymentSessionRaw`` (each also under ``/api/v1/v3``, ``…Compat``)."""

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
from api.queries.finance import TimeRange, csv_response, csv_text, cursor_value, time_window
from projections.finance import list_payment_sessions
from projections.payments import get_session, list_sessions
from projections.store import SCHEMA
from domain.payments import session_json

router = APIRouter()
OPS_READ = requires("platform.ops.read")
Status = Literal["initiated", "checkout_completed", "credited", "failed_reconcile", "expired"]
Sort = Literal["id_asc", "id_desc", "created_at_desc", "created_at_asc", "initiated_at_desc",
               "initiated_at_asc", "status_asc", "status_desc", "requested_amount_desc",
               "requested_amount_asc", "credited_amount_desc", "credited_amount_asc"]
#: the V3 CSV: ``PaymentSession`` flattened (each Money as ``*_minor`` and ``*_currency``)
CSV_COLUMNS = ("id", "org_id", "initiated_by_user_id", "stripe_checkout_session_id",
               "stripe_payment_intent_id", "requested_amount_minor", "requested_currency",
               "credited_amount_minor", "credited_currency", "status", "initiated_at",
               "checkout_completed_at", "credited_at", "failed_at", "failure_reason",
               "ledger_entry_id", "correlation_id", "created_at")


@router.get("/api/v1/admin/payments/sessions", operation_id="adminListPaymentSessions")
def admin_list_payment_sessions(
        request: Request, principal: Principal = Depends(OPS_READ),
        cursor: str | None = None, page_size: int | None = Query(default=None),
        user_id: UUID | None = None, status: Status | None = None,
        from_: Instant | None = Query(default=None, alias="from"),
        to: Instant | None = None) -> JSONResponse:
    if from_ and to and from_ > to:
        raise ApiError(400, "invalid_request", "from must not be after to", reason="range_inverted")
    filters = {"user_id": user_id, "status": status, "from": from_, "to": to}
    secret = request.app.state.settings.jwt_secret
    page = page_request(secret, cursor=cursor, page_size=page_size,
                        operation_id="adminListPaymentSessions", sort="created_at_desc",
                        filters={k: str(v) for k, v in filters.items()},
                        scope=principal.scope_key)
    after = None
    if page.after is not None:
        after = (datetime.fromisoformat(page.after[0]), UUID(page.after[1]))

    def compute(cur: Any) -> dict[str, Any]:
        rows = list_sessions(cur, SCHEMA, user_id=user_id, status=status, since=from_,
                             until=to, after=after, limit=page.page_size + 1)
        next_cursor = None
        if len(rows) > page.page_size:
            rows = rows[:page.page_size]
            last = rows[-1]
            next_cursor = encode_cursor(
                secret, operation_id="adminListPaymentSessions", sort="created_at_desc",
                filters={k: str(v) for k, v in filters.items()}, scope=principal.scope_key,
                last_key=[last["created_at"].isoformat(), str(last["id"])])
        return {"items": [session_json(r) for r in rows],
                "pagination": pagination_block(next_cursor, page.page_size)}

    return cached_query(request, principal, operation_id="adminListPaymentSessions",
                        projection="payments",
                        query={**{k: str(v) for k, v in filters.items()}, "cursor": cursor,
                               "page_size": page.page_size},
                        compute=compute)


@router.get("/api/v1/platform/finance/payment-sessions",
            operation_id="listV3PlatformFinancePaymentSessionsRaw")
@router.get("/api/v1/v3/platform/finance/payment-sessions",
            operation_id="listV3PlatformFinancePaymentSessionsRawCompat")
def list_v3_payment_sessions(
        request: Request, principal: Principal = Depends(OPS_READ),
        cursor: str | None = None, page_size: int | None = Query(default=None),
        user_id: UUID | None = None, status: Status | None = None,
        correlation_id: str | None = None, time_range: TimeRange | None = None,
        from_: Instant | None = Query(default=None, alias="from"), to: Instant | None = None,
        sort: Sort = "id_asc", format: Literal["json", "csv"] = "json") -> Response:
    """``adminListPaymentSessions`` with every ``sort`` (keyset, ``id`` tie-break; a
    session never credited sorts as ``credited_amount`` -1), a ``time_range`` on
    ``created_at`` (the cursor keeps the resolved window), an exact ``correlation_id`` and
    the same page as CSV."""
    since, until = time_window(time_range, from_, to)
    operation_id = "listV3PlatformFinancePaymentSessionsRaw"
    filters = {"user_id": str(user_id), "status": str(status),
               "correlation_id": str(correlation_id), "time_range": str(time_range),
               "from": str(from_), "to": str(to)}
    secret = request.app.state.settings.jwt_secret
    page = page_request(secret, cursor=cursor, page_size=page_size, operation_id=operation_id,
                        sort=sort, filters=filters, scope=principal.scope_key)
    after, since = resume_sorted(page.after, sort, ("created_at", "initiated_at"), since)

    def compute(cur: Any) -> dict[str, Any]:
        rows = list_payment_sessions(cur, SCHEMA, user_id=user_id, status=status,
                                     correlation_id=correlation_id, since=since, until=until,
                                     sort=sort, after=after, limit=page.page_size + 1)
        next_cursor = None
        if len(rows) > page.page_size:
            rows = rows[:page.page_size]
            next_cursor = encode_cursor(
                secret, operation_id=operation_id, sort=sort, filters=filters,
                scope=principal.scope_key,
                last_key=[cursor_value(rows[-1]["sort_value"]), str(rows[-1]["id"]),
                          since.isoformat() if since else None])
        if format == "csv":
            return {"csv": csv_text(CSV_COLUMNS, rows), "next_cursor": next_cursor}
        return {"items": [session_json(r) for r in rows],
                "pagination": pagination_block(next_cursor, page.page_size)}

    answer = cached_query(request, principal, operation_id=operation_id, projection="payments",
                          query={**filters, "sort": sort, "since": str(since), "format": format,
                                 "cursor": cursor, "page_size": page.page_size},
                          compute=compute)
    return csv_response(answer, "payment-sessions.csv") if format == "csv" else answer


@router.get("/api/v1/admin/payments/sessions/{payment_session_id}",
            operation_id="adminGetPaymentSession")
@router.get("/api/v1/platform/finance/payment-sessions/{payment_session_id}",
            operation_id="getV3PlatformFinancePaymentSessionRaw")
@router.get("/api/v1/v3/platform/finance/payment-sessions/{payment_session_id}",
            operation_id="getV3PlatformFinancePaymentSessionRawCompat")
def admin_get_payment_session(payment_session_id: UUID, request: Request,
                              principal: Principal = Depends(OPS_READ)) -> JSONResponse:

    def compute(cur: Any) -> dict[str, Any]:
        found = get_session(cur, SCHEMA, payment_session_id)
        if found is None:
            raise ApiError(404, "invalid_request", "payment session not found",
                           reason="payment_session_not_found")
        return found

    return cached_query(request, principal, operation_id="adminGetPaymentSession",
                        projection="payments", query={"id": str(payment_session_id)},
                        compute=compute)
