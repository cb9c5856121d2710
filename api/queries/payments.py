"""Payment queries: ``adminListPaymentSessions``, ``adminGetPaymentSession``."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from api.auth import Principal, requires
from api.errors import ApiError
from api.pagination import encode_cursor, page_request, pagination_block
from api.queries import cached_query
from projections.payments import get_session, list_sessions
from projections.store import SCHEMA
from domain.payments import session_json

router = APIRouter()
OPS_READ = requires("platform.ops.read")
Status = Literal["initiated", "checkout_completed", "credited", "failed_reconcile", "expired"]


@router.get("/api/v1/admin/payments/sessions", operation_id="adminListPaymentSessions")
def admin_list_payment_sessions(
        request: Request, principal: Principal = Depends(OPS_READ),
        cursor: str | None = None, page_size: int | None = Query(default=None),
        user_id: UUID | None = None, status: Status | None = None,
        from_: datetime | None = Query(default=None, alias="from"),
        to: datetime | None = None) -> JSONResponse:
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


@router.get("/api/v1/admin/payments/sessions/{payment_session_id}",
            operation_id="adminGetPaymentSession")
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
