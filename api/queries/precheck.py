"""``precheckV3ComputeLaunch`` (and its V3 twin): is a launch likely to be admitted?

Read-only, from read models: the SKU and its free units (``inventory``), the caller's
allocation headroom (``inventory``), financial posture (``restrictions``) and balance
(``billing_ledger``). It creates
nothing; admission decides again from aggregates. An ``Idempotency-Key`` is accepted
and has nothing to protect. The estimate is the SKU's unit price times the units
launched, per hour, and 730 hours for a month.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from api import idempotency
from api.auth import Principal, authenticate, project_scope
from api.launch_request import V3ComputeLaunchPrecheckRequest
from api.queries import cached_query
from api.queries.inventory import allocation_limits, v3_meta, with_meta_cache
from projections.billing_ledger import account_balances
from projections.inventory import sku_capacity
from projections.restrictions import caller_restrictions
from projections.store import SCHEMA

router = APIRouter()
HOURS_PER_MONTH = 730
SEVERITY = {"ok": 0, "warn": 1, "blocker": 2}


def check(id_: str, label: str, status: str, message: str, action: str = "none",
          action_label: str | None = None, action_href: str | None = None) -> dict[str, Any]:
    severity = "ok" if status == "ok" else "blocker" if status == "blocker" else "warn"
    return {"id": id_, "label": label, "status": status, "severity": severity,
            "message": message, "action_label": action_label, "action_href": action_href,
            "inline_action_kind": action}


def precheck(cur: Any, body: V3ComputeLaunchPrecheckRequest, principal: Principal,
             project: UUID, default_currency: str) -> dict[str, Any]:
    units = body.unit_count or 1
    checks = [check("project", "Project", "ok", "You can launch in this project.")]
    found = sku_capacity(cur, SCHEMA, body.sku, body.region_code)
    estimate: dict[str, Any] = {"hourly_rate": None, "monthly_estimate": None, "billing_mode": None}
    placement_state = "blocked_capacity"
    if found is None or not found[1]:
        checks.append(check("sku", "Compute SKU", "blocker", f"SKU {body.sku!r} is not offered.",
                            "select_sku", "Choose a SKU", "/compute"))
    else:
        sku, _, free, best = found
        resource_class = sku["resource_class"]
        checks.append(check("sku", "Compute SKU", "ok", f"{sku['display_name']} is offered."))
        if body.resource_class is not None and body.resource_class != resource_class:
            checks.append(check("resource-class", "Resource class", "blocker",
                                f"{body.sku} is {resource_class}, not {body.resource_class}.",
                                "select_sku", "Choose a SKU", "/compute"))
        slice_ = resource_class == "gpu_slice"
        enough = best >= units if slice_ else free >= units
        if enough:
            placement_state = "ready_now"
            checks.append(check("capacity", "Capacity", "ok",
                                f"{free} unit(s) free now; {units} requested."))
        else:
            checks.append(check("capacity", "Capacity", "blocker",
                                f"{free} unit(s) free now; {units} requested"
                                + (" on one node." if slice_ else "."), "select_sku",
                                "Choose another SKU", "/compute"))
        price = sku["unit_price"]
        hourly = price["amount_minor"] * units
        estimate = {"hourly_rate": {"amount_minor": hourly, "currency": price["currency"]},
                    "monthly_estimate": {"amount_minor": hourly * HOURS_PER_MONTH,
                                         "currency": price["currency"]},
                    "billing_mode": "on_demand"}
    leases = 1 if found is not None and found[0]["resource_class"] == "gpu_slice" else units
    headroom = allocation_limits(cur, principal.user_id)["available_allocation_slots"]
    checks.append(check("quota", "Allocation limit", "ok" if headroom >= leases else "blocker",
                        f"{headroom} concurrent allocation(s) left; {leases} needed.",
                        "none" if headroom >= leases else "request_quota"))
    scopes = [("user", principal.user_id), ("project", project)]
    if principal.tenant_id is not None:
        scopes.append(("tenant", principal.tenant_id))
    posture = caller_restrictions(cur, SCHEMA, scopes)
    if posture is not None and posture["effects"]["launch_blocked"]:
        checks.append(check("billing", "Billing", "blocker",
                            f"Launches are blocked ({posture['state']}): {posture['reason']}",
                            "add_funds", "Add funds", "/billing"))
    else:
        primary, rows = account_balances(cur, SCHEMA, principal.user_id)
        primary = primary or default_currency
        balance = dict(rows).get(primary, 0)
        if balance <= 0:  # the admission rule (domain.admission.financial_gate)
            checks.append(check("billing", "Billing", "blocker",
                                f"Your {primary} balance is {balance} minor units; launches need"
                                " a positive balance.", "add_funds", "Add funds", "/billing"))
        else:
            checks.append(check("billing", "Billing", "ok",
                                "No financial restriction blocks launches."))
    if body.os_image_slug is not None:
        checks.append(check("image", "OS image", "unknown",
                            "Images are not checked here; the image is verified at provisioning."))
    worst = max((c["severity"] for c in checks), key=SEVERITY.__getitem__)
    return {"ready": worst != "blocker", "severity": worst, "checks": checks, "estimate": estimate,
            "resolved": {"sku": body.sku, "unit_count": units, "region_code": body.region_code,
                         "placement": {"availability_state": placement_state}},
            "meta": v3_meta()}


@router.post("/api/v1/launch/compute/precheck", operation_id="precheckV3ComputeLaunch")
@router.post("/api/v1/v3/launch/compute/precheck", operation_id="precheckV3ComputeLaunchCompat")
def precheck_v3_compute_launch(body: V3ComputeLaunchPrecheckRequest, request: Request,
                               principal: Principal = Depends(authenticate)) -> JSONResponse:
    project = project_scope(request, principal)
    idempotency.checked_key(request)  # declared by the contract; a read replays nothing
    return with_meta_cache(cached_query(
        request, principal, operation_id="precheckV3ComputeLaunch", projection=("inventory", "restrictions", "billing_ledger"),
        query={"project": str(project), **body.model_dump(mode="json")},
        compute=lambda cur: precheck(cur, body, principal, project,
                                     request.app.state.settings.default_currency)))
