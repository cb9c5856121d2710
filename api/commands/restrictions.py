"""``adminSetFinancialRestriction``."""

from __future__ import annotations

from typing import Literal
from uuid import UUID

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from api import idempotency
from api.auth import Principal, admin
from api.commands import context, renderer, run
from api.fields import JsonObject
from domain.restrictions import set_financial_restriction

router = APIRouter()


class SetFinancialRestrictionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    state: Literal["healthy", "at_risk", "restricted", "suspended", "collections_hold"]
    reason: str = Field(min_length=1)
    metadata: JsonObject = Field(default_factory=dict)


@router.post("/api/v1/admin/billing/financial-restrictions/{scope_type}/{scope_id}",
             operation_id="adminSetFinancialRestriction")
async def admin_set_financial_restriction(
        scope_type: Literal["tenant", "project", "user"], scope_id: UUID,
        body: SetFinancialRestrictionRequest, request: Request,
        principal: Principal = Depends(admin)) -> JSONResponse:
    claim = idempotency.claim(request, principal, "adminSetFinancialRestriction",
                              body.model_dump())
    command = set_financial_restriction(
        context(request, principal, "admin", claim), scope_type=scope_type, scope_id=scope_id,
        state=body.state, reason=body.reason, metadata=body.metadata,
        render=renderer(request, 200, lambda result: result))
    return await run(request, command)
