"""Billing commands: ``adminAdjustBalance``."""

from __future__ import annotations

from typing import Literal
from uuid import UUID

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from api import idempotency
from api.auth import Principal, admin
from api.commands import context, renderer, run
from api.errors import ApiError
from domain.billing import adjust_balance
from domain.money import INT64_MAX, Money, is_known_currency

router = APIRouter()


class AdminAdjustBalanceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    direction: Literal["credit", "debit"]
    amount_minor: int = Field(ge=1, le=INT64_MAX)
    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$")
    reason: str


@router.post("/api/v1/admin/users/{user_id}/balance", operation_id="adminAdjustBalance")
async def admin_adjust_balance(user_id: UUID, body: AdminAdjustBalanceRequest, request: Request,
                               principal: Principal = Depends(admin)) -> JSONResponse:
    if not is_known_currency(body.currency):
        raise ApiError(400, "invalid_request", f"unknown currency {body.currency}",
                       field="currency", reason="unsupported_currency")
    claim = idempotency.claim(request, principal, "adminAdjustBalance", body)
    command = adjust_balance(
        context(request, principal, "admin", claim), user_id=user_id,
        direction=body.direction, amount=Money(body.amount_minor, body.currency),
        reason=body.reason, render=renderer(request, 200, lambda result: {"ok": True}))
    return await run(request, command)
