"""Dispute queries: ``adminListPaymentDisputes``, ``adminGetPaymentDispute`` (from the
``disputes`` read model, through the cache)."""

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
from domain.disputes import dispute_json
from projections.disputes import get_dispute, list_disputes
from projections.store import SCHEMA

router = APIRouter()
OPS_READ = requires("platform.ops.read")
Status = Literal["opened", "needs_response", "evidence_due", "evidence_submitted", "won", "lost",
                 "closed"]
SORT = "created_at_desc"


@router.get("/api/v1/admin/payments/disputes", operation_id="adminListPaymentDisputes")
def admin_list_payment_disputes(
        request: Request, principal: Principal = Depends(OPS_READ),
        cursor: str | None = None, page_size: int | None = Query(default=None),
        status: Status | None = None, provider_dispute_id: str | None = None) -> JSONResponse:
    filters = {"status": str(status), "provider_dispute_id": str(provider_dispute_id)}
    secret = request.app.state.settings.jwt_secret
    page = page_request(secret, cursor=cursor, page_size=page_size,
                        operation_id="adminListPaymentDisputes", sort=SORT, filters=filters,
                        scope=principal.scope_key)
    after = None
    if page.after is not None:
        after = (datetime.fromisoformat(page.after[0]), UUID(page.after[1]))

    def compute(cur: Any) -> dict[str, Any]:
        rows = list_disputes(cur, SCHEMA, status=status, provider_dispute_id=provider_dispute_id,
                             after=after, limit=page.page_size + 1)
        next_cursor = None
        if len(rows) > page.page_size:
            rows = rows[:page.page_size]
            last = rows[-1]
            next_cursor = encode_cursor(
                secret, operation_id="adminListPaymentDisputes", sort=SORT, filters=filters,
                scope=principal.scope_key,
                last_key=[last["created_at"].isoformat(), str(last["id"])])
        return {"items": [dispute_json(r) for r in rows],
                "pagination": pagination_block(next_cursor, page.page_size)}

    return cached_query(request, principal, operation_id="adminListPaymentDisputes",
                        projection="disputes",
                        query={**filters, "cursor": cursor, "page_size": page.page_size},
                        compute=compute)


@router.get("/api/v1/admin/payments/disputes/{dispute_id}", operation_id="adminGetPaymentDispute")
def admin_get_payment_dispute(dispute_id: UUID, request: Request,
                              principal: Principal = Depends(OPS_READ)) -> JSONResponse:

    def compute(cur: Any) -> dict[str, Any]:
        found = get_dispute(cur, SCHEMA, dispute_id)
        if found is None:
            raise ApiError(404, "invalid_request", "payment dispute not found",
                           reason="dispute_not_found", resource="payment_dispute")
        return found

    return cached_query(request, principal, operation_id="adminGetPaymentDispute",
                        projection="disputes", query={"id": str(dispute_id)}, compute=compute)
