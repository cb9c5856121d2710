"""Refund commands: ``adminCreateRefund`` and its V3 finance twins
(``createV3PlatformFinanceUserRefund`` and ``…Compat``), one handler for all three.

Provider refund outcomes arrive through ``stripeWebhook`` (``api.commands.payments``).
"""

from __future__ import annotations

from typing import Literal
from uuid import UUID, uuid4, uuid5

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from api import idempotency
from api.auth import Principal, admin
from api.commands import context, renderer, run
from api.errors import ApiError
from domain.money import INT64_MAX, Money, is_known_currency
from domain.refunds import NAMESPACE, create_refund

router = APIRouter()
#: the idempotency scope of all three routes, so a key replays across the aliases
OPERATION = "adminCreateRefund"


class AdminCreateRefundRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    amount_minor: int = Field(ge=1, le=INT64_MAX)
    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$")
    reason: str = Field(min_length=3)
    payment_reference: str | None = None
    mode: Literal["auto_policy", "force_internal_credit"] = "auto_policy"


@router.post("/api/v1/admin/users/{user_id}/refunds", operation_id="adminCreateRefund",
             status_code=201)
@router.post("/api/v1/platform/finance/users/{user_id}/refunds",
             operation_id="createV3PlatformFinanceUserRefund", status_code=201)
@router.post("/api/v1/v3/platform/finance/users/{user_id}/refunds",
             operation_id="createV3PlatformFinanceUserRefundCompat", status_code=201)
async def admin_create_refund(user_id: UUID, body: AdminCreateRefundRequest, request: Request,
                              principal: Principal = Depends(admin)) -> JSONResponse:
    if not is_known_currency(body.currency):
        raise ApiError(400, "invalid_request", f"unknown currency {body.currency}",
                       field="currency", reason="unsupported_currency")
    claim = idempotency.claim(request, principal, OPERATION, body.model_dump())
    refund_id = uuid5(NAMESPACE, claim.scope) if claim else uuid4()
    command = create_refund(
        context(request, principal, "admin", claim), refund_id=refund_id, user_id=user_id,
        requested_by_user_id=principal.user_id,
        amount=Money(body.amount_minor, body.currency), reason=body.reason,
        payment_reference=body.payment_reference, mode=body.mode,
        render=renderer(request, 201, lambda result: result))
    return await run(request, command)
