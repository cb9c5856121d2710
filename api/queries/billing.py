"""Billing queries: ``getBillingBalance``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from api.auth import Principal, authenticate
from api.queries import cached_query
from projections.billing_ledger import account_balances
from projections.store import SCHEMA

router = APIRouter()


@router.get("/api/v1/billing/balance", operation_id="getBillingBalance")
def get_billing_balance(request: Request,
                        principal: Principal = Depends(authenticate)) -> JSONResponse:
    default_currency = request.app.state.settings.default_currency

    def compute(cur: Any) -> dict[str, Any]:
        primary, rows = account_balances(cur, SCHEMA, principal.user_id)
        primary = primary or default_currency
        amounts = dict(rows)
        amounts.setdefault(primary, 0)
        balances = [{"amount_minor": amounts[c], "currency": c} for c in sorted(amounts)]
        return {"balance": {"amount_minor": amounts[primary], "currency": primary},
                "balances": balances}

    return cached_query(request, principal, operation_id="getBillingBalance",
                        projection="billing_ledger", query={}, compute=compute)
