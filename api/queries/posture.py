"""``getBillingFinancialPosture``: the caller's effective financial posture.

The most severe restriction over the caller's user, project and tenant scopes; and,
automatically, ``restricted`` while the caller's balance (primary currency) is not
above zero (billing-ledger §3: "a balance ≤0 → restricted") — the rule admission
applies from the aggregates (``domain.admission``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from api.auth import Principal, authenticate
from api.queries import cached_query
from domain.restrictions import effects_of, severity
from projections.billing_ledger import account_balances
from projections.restrictions import caller_restrictions
from projections.store import SCHEMA

router = APIRouter()
#: the posture's reason while the balance is not above zero
DEPLETED = "prepaid_balance_depleted"


@router.get("/api/v1/billing/financial-posture", operation_id="getBillingFinancialPosture")
def get_billing_financial_posture(request: Request,
                                  principal: Principal = Depends(authenticate)) -> JSONResponse:
    scopes = [("user", principal.user_id)] + [("project", p) for p in sorted(principal.project_ids)]
    if principal.tenant_id is not None:
        scopes.append(("tenant", principal.tenant_id))

    default_currency = request.app.state.settings.default_currency

    def compute(cur: Any) -> dict[str, Any]:
        worst = caller_restrictions(cur, SCHEMA, scopes)
        state = worst["state"] if worst else "healthy"
        primary, rows = account_balances(cur, SCHEMA, principal.user_id)
        balance = dict(rows).get(primary or default_currency, 0)
        if balance <= 0 and severity(state) < severity("restricted"):
            return {"state": "restricted", "reason": DEPLETED, "effects": effects_of("restricted"),
                    "restriction": worst, "affected_allocation_ids": [],
                    "affected_app_instance_ids": [], "selected_action": "restrict",
                    "balance_minor": balance, "correlation_id": None, "updated_at": None}
        return {"state": state, "reason": worst["reason"] if worst else "",
                "effects": worst["effects"] if worst else effects_of("healthy"),
                "restriction": worst, "affected_allocation_ids": [],
                "affected_app_instance_ids": [], "selected_action": "", "balance_minor": balance,
                "correlation_id": worst["correlation_id"] if worst else None,
                "updated_at": worst["updated_at"] if worst else None}

    return cached_query(request, principal, operation_id="getBillingFinancialPosture",
                        projection=("restrictions", "billing_ledger"),
                        query={"scopes": [f"{t}:{i}" for t, i in scopes]}, compute=compute)
