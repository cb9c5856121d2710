"""``getBillingAccount`` and ``getBillingCurrencySettings``: the caller's billing
account and currency settings, from the token's tenant and the caller's ledger account
(``billing_ledger`` read model; the ledger is kept per user, docs/decisions.md Q1).

Both need a tenant in the token (``403`` otherwise, as the contract declares). There is
no reseller or pricing-plan model: every account is a ``tenant`` account, billed and
carrying its own credit risk through the platform. There is no tenant directory, so
the account has no ``name`` (and never the contract's undeclared ``display_name``).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from api.auth import Principal, authenticate
from api.errors import ApiError
from api.queries import cached_query
from domain.billing import account_id_for
from projections.billing_ledger import account_balances
from projections.store import SCHEMA

router = APIRouter()


def _tenant(principal: Principal) -> Any:
    if principal.tenant_id is None:
        raise ApiError(403, "insufficient_permissions", "billing settings need the caller's tenant",
                       reason="tenant_required")
    return principal.tenant_id


@router.get("/api/v1/billing/account", operation_id="getBillingAccount")
def get_billing_account(request: Request,
                        principal: Principal = Depends(authenticate)) -> JSONResponse:
    tenant = _tenant(principal)
    default_currency = request.app.state.settings.default_currency

    def compute(cur: Any) -> dict[str, Any]:
        primary, _ = account_balances(cur, SCHEMA, principal.user_id)
        return {"billing_account_id": None if primary is None
                else str(account_id_for(principal.user_id)),
                "tenant_id": str(tenant), "account_type": "tenant",
                "parent_billing_account_id": None, "reseller_tenant_id": None,
                "invoice_recipient_tenant_id": str(tenant),
                "default_currency": primary or default_currency,
                "wholesale_pricing_plan_id": None, "customer_pricing_plan_id": None,
                "tax_responsibility": "platform", "credit_risk_owner": "platform",
                "status": "active"}

    return cached_query(request, principal, operation_id="getBillingAccount",
                        projection="billing_ledger", query={}, compute=compute)


@router.get("/api/v1/billing/currency-settings", operation_id="getBillingCurrencySettings")
def get_billing_currency_settings(request: Request,
                                  principal: Principal = Depends(authenticate)) -> JSONResponse:
    tenant = _tenant(principal)
    default_currency = request.app.state.settings.default_currency

    def compute(cur: Any) -> dict[str, Any]:
        primary, balances = account_balances(cur, SCHEMA, principal.user_id)
        default = primary or default_currency
        held = {currency for currency, _ in balances}
        return {"tenant_id": str(tenant), "default_currency": default,
                "supported_currencies": sorted(held | {default}), "fx_snapshot": None}

    return cached_query(request, principal, operation_id="getBillingCurrencySettings",
                        projection="billing_ledger", query={}, compute=compute)
