"""``getBillingFinancialPosture``: the caller's effective financial posture."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from api.auth import Principal, authenticate
from api.queries import cached_query
from domain.restrictions import effects_of
from projections.restrictions import caller_restrictions
from projections.store import SCHEMA

router = APIRouter()


@router.get("/api/v1/billing/financial-posture", operation_id="getBillingFinancialPosture")
def get_billing_financial_posture(request: Request,
                                  principal: Principal = Depends(authenticate)) -> JSONResponse:
    scopes = [("user", principal.user_id)] + [("project", p) for p in sorted(principal.project_ids)]
    if principal.tenant_id is not None:
        scopes.append(("tenant", principal.tenant_id))

    def compute(cur: Any) -> dict[str, Any]:
        worst = caller_restrictions(cur, SCHEMA, scopes)
        state = worst["state"] if worst else "healthy"
        return {"state": state, "reason": worst["reason"] if worst else "",
                "effects": worst["effects"] if worst else effects_of("healthy"),
                "restriction": worst, "affected_allocation_ids": [],
                "affected_app_instance_ids": [], "selected_action": "", "balance_minor": None,
                "correlation_id": worst["correlation_id"] if worst else None,
                "updated_at": worst["updated_at"] if worst else None}

    return cached_query(request, principal, operation_id="getBillingFinancialPosture",
                        projection="restrictions",
                        query={"scopes": [f"{t}:{i}" for t, i in scopes]}, compute=compute)
