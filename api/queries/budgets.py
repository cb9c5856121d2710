"""Budget queries: ``listBillingBudgetPosture`` and ``evaluateBillingBudgetDecision``
(a POST, but a what-if: it reads the budgets read model and appends nothing).

Scope: the caller's tenant (token ``tenant_id``) and, for project budgets, the projects
the token names (``project_ids``, or a service account's ``project_id``); a
``project_id`` outside them is ``400 project_not_in_scope`` (neither operation declares
a 403). A caller without a tenant has no budgets. Answers are as of the current minute
(part of the cache key), since the period a policy is in force in moves with time.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from api.auth import Principal, authenticate
from api.errors import ApiError
from api.queries import cached_query
from domain.budgets import evaluate, overall, threshold_event, window
from domain.money import INT64_MAX, is_known_currency
from projections.budgets import org_policies, spend_lines, spent
from projections.store import SCHEMA

router = APIRouter()


class MoneyBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    amount_minor: int = Field(ge=0, le=INT64_MAX)
    currency: str = Field(pattern=r"^[A-Z]{3}$")


class BillingBudgetDecisionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    project_id: UUID | None = Field(default=None, strict=False)
    proposed_amount: MoneyBody


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(second=0, microsecond=0)


def caller_projects(principal: Principal) -> frozenset[UUID]:
    if principal.actor_type == "service_account":
        return frozenset({principal.token_project_id} - {None})
    return principal.project_ids


def _check_project(principal: Principal, project_id: UUID | None) -> None:
    if project_id is not None and project_id not in caller_projects(principal):
        raise ApiError(400, "invalid_request", "the caller has no access to this project",
                       reason="project_not_in_scope", field="project_id")


def _visible(principal: Principal, policy: dict[str, Any]) -> bool:
    return policy["scope_type"] == "tenant" or policy["project_id"] in caller_projects(principal)


def _in_force(policy: dict[str, Any], now: datetime) -> tuple[datetime, datetime] | None:
    if not policy["active"]:
        return None
    return window(policy["period"], policy["starts_at"], policy["ends_at"], now)


def posture_json(policy: dict[str, Any], latest_event: dict[str, Any] | None) -> dict[str, Any]:
    """The contract's ``BillingBudgetPosture`` (``name``, never the undeclared
    ``display_name``: see docs/decisions.md)."""
    return {"id": str(policy["id"]), "org_id": str(policy["org_id"]),
            "department_id": str(policy["department_id"]),
            "project_id": None if policy["project_id"] is None else str(policy["project_id"]),
            "scope_type": policy["scope_type"], "name": policy["name"],
            "period": policy["period"],
            "amount": {"amount_minor": policy["amount_minor"], "currency": policy["currency"]},
            "threshold_percent": policy["threshold_percent"],
            "enforcement_mode": policy["enforcement_mode"], "active": policy["active"],
            "starts_at": _iso(policy["starts_at"]), "ends_at": _iso(policy["ends_at"]),
            "latest_event": latest_event, "created_at": _iso(policy["created_at"]),
            "updated_at": _iso(policy["updated_at"])}


@router.get("/api/v1/billing/budget-posture", operation_id="listBillingBudgetPosture")
def list_billing_budget_posture(
        request: Request, principal: Principal = Depends(authenticate),
        scope_type: Literal["tenant", "project"] | None = None,
        project_id: UUID | None = None) -> JSONResponse:
    _check_project(principal, project_id)
    now = _now()

    def compute(cur: Any) -> dict[str, Any]:
        if principal.tenant_id is None:
            return {"items": []}
        items = []
        for policy in org_policies(cur, SCHEMA, org_id=principal.tenant_id):
            if not _visible(principal, policy):
                continue
            if scope_type is not None and policy["scope_type"] != scope_type:
                continue
            if project_id is not None and policy["project_id"] != project_id:
                continue
            period = _in_force(policy, now)
            event = None if period is None else threshold_event(
                policy, period, spend_lines(cur, SCHEMA, policy, period))
            items.append(posture_json(policy, event))
        return {"items": items}

    return cached_query(request, principal, operation_id="listBillingBudgetPosture",
                        projection="budgets",
                        query={"scope_type": scope_type, "project_id": str(project_id),
                               "now": _iso(now)}, compute=compute)


@router.post("/api/v1/billing/budget-decisions", operation_id="evaluateBillingBudgetDecision")
def evaluate_billing_budget_decision(
        body: BillingBudgetDecisionRequest, request: Request,
        principal: Principal = Depends(authenticate)) -> JSONResponse:
    proposed = body.proposed_amount
    if not is_known_currency(proposed.currency):
        raise ApiError(400, "invalid_request", f"unknown currency {proposed.currency}",
                       field="proposed_amount.currency", reason="unsupported_currency")
    _check_project(principal, body.project_id)
    now = _now()

    def compute(cur: Any) -> dict[str, Any]:
        if principal.tenant_id is None:
            return {"decision": "allow", "items": []}
        applicable = []
        for policy in org_policies(cur, SCHEMA, org_id=principal.tenant_id):
            if policy["scope_type"] == "project" and (
                    body.project_id is None or policy["project_id"] != body.project_id):
                continue
            period = _in_force(policy, now)
            if period is not None:
                applicable.append((policy, period))
        others = sorted({p["currency"] for p, _ in applicable} - {proposed.currency})
        if others:
            raise ApiError(400, "invalid_request",
                           f"the budgets are kept in {', '.join(others)}, not {proposed.currency}",
                           field="proposed_amount.currency", reason="currency_mismatch",
                           budget_currencies=others)
        items = [evaluate(policy, spent=spent(cur, SCHEMA, policy, period),
                          proposed=proposed.amount_minor, period=period)
                 for policy, period in applicable]
        return {"decision": overall(items), "items": items}

    return cached_query(request, principal, operation_id="evaluateBillingBudgetDecision",
                        projection="budgets",
                        query={"project_id": str(body.project_id),
                               "proposed": [proposed.amount_minor, proposed.currency],
                               "now": _iso(now)}, compute=compute)
