"""App catalog publishing, project entitlements and V3 app launch (submit, precheck)
(app-instances §1.2, §1.3, §4.3 "Launch mapping").

- ``adminPublishAppCatalogVersion`` / ``adminDeprecateAppCatalogVersion``: operators.
- ``upsertProjectAppEntitlement`` / ``upsertV3AccessAppEntitlementCompat``: operators
  (``platform.admin``): the entitlement is the platform's gate, and a project member or
  admin who could grant their own project an app would make it meaningless.
- ``submitV3AppLaunch`` (+ compat): ``createAppInstance``'s command with
  ``source="v3_launch"``; the ``Idempotency-Key`` is mandatory, and the instance id is
  derived from the key's record, so a replay answers the same instance.
- ``precheckV3AppLaunch`` (+ compat): the submit's decision run on aggregates loaded
  for the purpose and thrown away: it appends nothing, not even an idempotency record.
  Both check the caller's project role (``Principal.project_role``) against the
  entitlement's ``launch_roles``; a project ``viewer`` is refused both before
  (``api.auth.project_access``).
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import datetime, timezone
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from api import idempotency
from api.auth import Principal, admin, authenticate, project_scope, require
from api.commands import context, renderer, run
from api.errors import ApiError
from api.fields import JsonObject
from domain.admission import financial_gate
from domain.app_instances import create_app_instance, quota_id_for
from domain.apps import (AppCatalogEntry, deprecate_version, entitlement_of, get_app,
                         newest_entitled_version, publish_version, require_entitled,
                         upsert_entitlement)
from domain.billing import account_id_for
from domain.commands import Session
from domain.errors import DomainError
from domain.skus import get_sku, iso
from domain.usage import units_for

router = APIRouter()
Strict = ConfigDict(extra="forbid", strict=True)
SLUG = r"^[a-z0-9][a-z0-9-]{1,62}$"
HOURS_PER_MONTH = 730
SEVERITY = {"ok": 0, "warn": 1, "blocker": 2}
LaxUUID = Annotated[UUID, Field(strict=False)]


def _same(result: dict[str, Any]) -> dict[str, Any]:
    return result


# ---- the catalog (operators) --------------------------------------------------------------
@router.post("/api/v1/admin/apps/catalog/{app_slug}/versions/{version}/publish",
             operation_id="adminPublishAppCatalogVersion")
async def admin_publish_app_catalog_version(
        request: Request, app_slug: str = Path(pattern=SLUG),
        version: str = Path(min_length=1, max_length=64),
        principal: Principal = Depends(admin)) -> JSONResponse:
    claim = idempotency.claim(request, principal, "adminPublishAppCatalogVersion", None)
    return await run(request, publish_version(context(request, principal, "admin", claim),
                                              slug=app_slug, version=version,
                                              render=renderer(request, 200, _same)))


@router.post("/api/v1/admin/apps/catalog/{app_slug}/versions/{version}/deprecate",
             operation_id="adminDeprecateAppCatalogVersion")
async def admin_deprecate_app_catalog_version(
        request: Request, app_slug: str = Path(pattern=SLUG),
        version: str = Path(min_length=1, max_length=64),
        principal: Principal = Depends(admin)) -> JSONResponse:
    claim = idempotency.claim(request, principal, "adminDeprecateAppCatalogVersion", None)
    return await run(request, deprecate_version(context(request, principal, "admin", claim),
                                                slug=app_slug, version=version,
                                                render=renderer(request, 200, _same)))


# ---- entitlements ------------------------------------------------------------------------------
class UpsertAppEntitlementRequest(BaseModel):
    model_config = Strict
    enabled: bool
    policy_overrides: JsonObject = Field(default_factory=dict)


async def _upsert(request: Request, principal: Principal, operation_id: str, project: UUID,
                  slug: str, body: UpsertAppEntitlementRequest) -> JSONResponse:
    require(principal, "platform.admin")
    fields = body.model_dump(mode="json")
    claim = idempotency.claim(request, principal, operation_id, fields)
    return await run(request, upsert_entitlement(
        context(request, principal, "admin", claim), project_id=project, slug=slug,
        enabled=body.enabled, policy_overrides=body.policy_overrides,
        render=renderer(request, 200, _same)))


@router.put("/api/v1/projects/{project_id}/apps/entitlements/{app_slug}",
            operation_id="upsertProjectAppEntitlement")
async def upsert_project_app_entitlement(
        project_id: UUID, body: UpsertAppEntitlementRequest, request: Request,
        app_slug: str = Path(pattern=SLUG),
        principal: Principal = Depends(authenticate)) -> JSONResponse:
    return await _upsert(request, principal, "upsertProjectAppEntitlement", project_id,
                         app_slug, body)


@router.put("/api/v1/v3/access/entitlements/{app_slug}",
            operation_id="upsertV3AccessAppEntitlementCompat")
async def upsert_v3_access_app_entitlement(
        body: UpsertAppEntitlementRequest, request: Request,
        app_slug: str = Path(pattern=SLUG),
        principal: Principal = Depends(authenticate)) -> JSONResponse:
    try:
        project = UUID(request.headers.get("x-project-id") or "")
    except ValueError:
        raise ApiError(400, "validation_error", "X-Project-ID must be a uuid",
                       header="X-Project-ID") from None
    return await _upsert(request, principal, "upsertV3AccessAppEntitlementCompat", project,
                         app_slug, body)


# ---- V3 launch ---------------------------------------------------------------------------------
class PlacementIntent(BaseModel):
    """``AppInstancePlacementIntent``."""

    model_config = Strict
    target_allocation_id: LaxUUID | None = None
    controller_allocation_id: LaxUUID | None = None
    worker_allocation_ids: list[LaxUUID] = Field(default_factory=list, max_length=64)
    server_allocation_id: LaxUUID | None = None
    agent_allocation_ids: list[LaxUUID] = Field(default_factory=list, max_length=64)
    allow_shared_allocation: bool = False


class V3AppLaunchPrecheckRequest(BaseModel):
    model_config = Strict
    app_version: str | None = None
    display_name: str | None = None
    placement_intent: PlacementIntent | None = None
    operator_service_account_id: LaxUUID | None = None
    dependencies: JsonObject = Field(default_factory=dict)
    config: JsonObject = Field(default_factory=dict)


class V3AppLaunchSubmitRequest(V3AppLaunchPrecheckRequest):
    display_name: str | None = Field(default=None, min_length=1)
    resource_overrides: JsonObject = Field(default_factory=dict)


def _launch_request(slug: str, body: V3AppLaunchPrecheckRequest) -> dict[str, Any]:
    fields = body.model_dump(mode="json")
    if not fields["dependencies"]:
        fields["dependencies"] = None  # nothing asked for: nothing to check
    return {**fields, "app_slug": slug}


def launched(result: dict[str, Any]) -> dict[str, Any]:
    """``V3LaunchSubmitResponse``: the workload is the app instance (§4.3)."""
    workload, task = result["workload_id"], result["task_id"]
    return {"task_id": task, "task_href": f"/api/v1/tasks/{task}", "workload_id": workload,
            "workload_href": f"/api/v1/workloads/{workload}", "resource_kind": "app_instance",
            "status": "queued",
            "message": f"app instance {result['app_instance']['display_name']!r} requested"}


@router.post("/api/v1/launch/apps/{app_slug}", operation_id="submitV3AppLaunch",
             status_code=202)
@router.post("/api/v1/v3/launch/apps/{app_slug}", operation_id="submitV3AppLaunchCompat",
             status_code=202)
async def submit_v3_app_launch(body: V3AppLaunchSubmitRequest, request: Request,
                               app_slug: str = Path(pattern=SLUG),
                               principal: Principal = Depends(authenticate)) -> JSONResponse:
    project = project_scope(request, principal)
    launch = _launch_request(app_slug, body)
    claim = idempotency.required_claim(request, principal, "submitV3AppLaunch", launch)
    service_account = principal.user_id if principal.actor_type == "service_account" else None
    return await run(request, create_app_instance(
        context(request, principal, "api", claim), project_id=project,
        user_id=principal.user_id, tenant_id=principal.tenant_id, request=launch,
        service_account_id=service_account, project_role=principal.project_role(project),
        source="v3_launch",
        render=renderer(request, 202, launched)))


# ---- V3 launch precheck ---------------------------------------------------------------------
def check(id_: str, label: str, status: str, message: str, action: str = "none",
          action_label: str | None = None, action_href: str | None = None) -> dict[str, Any]:
    severity = "ok" if status == "ok" else "blocker" if status == "blocker" else "warn"
    return {"id": id_, "label": label, "status": status, "severity": severity,
            "message": message, "action_label": action_label, "action_href": action_href,
            "inline_action_kind": action}


#: where a refusal of the submit's decision shows in the precheck
PLACEMENT_CODES = ("allocation_not_found", "allocation_not_active", "sku_unavailable",
                   "sku_not_found")
CHECK_OF_REASON = {"pricing_currency_unsupported": "balance",
                   "dependency_not_declared": "dependencies",
                   "operating_mode_not_allowed": "entitlement"}
CHECK_OF_CODE = {"app_instance_quota_exceeded": "quota", "insufficient_balance": "balance",
                 "app_not_entitled": "entitlement", "insufficient_permissions": "entitlement",
                 **{code: "placement" for code in PLACEMENT_CODES}}


def _check_of(error: DomainError) -> str:
    reason = error.details.get("reason")
    if reason in CHECK_OF_REASON:
        return CHECK_OF_REASON[reason]
    if error.code in CHECK_OF_CODE:
        return CHECK_OF_CODE[error.code]
    return "placement" if error.code == "invalid_request" else "admission"


def _modes(manifest: dict[str, Any], overrides: dict[str, Any]) -> tuple[str | None, str | None]:
    modes = list(manifest.get("operating_modes") or ["tenant_dedicated"])
    allowed = overrides.get("allowed_operating_modes")
    modes = [m for m in modes if allowed is None or m in allowed]
    if not modes:
        return None, None
    return modes[0], "platform" if modes[0] == "platform_managed" else "project"


def _estimate(session: Session, manifest: dict[str, Any], mode: str | None,
              currency: str) -> dict[str, Any]:
    """The app's own hourly rate (§4.2): its priced components when the platform runs
    it, plus the capacity its manifest claims; allocations it is placed on bill
    themselves."""
    totals: dict[str, int] = {}
    if mode == "platform_managed":
        for price in manifest.get("pricing") or []:
            unit = price["unit_price"]
            totals[unit["currency"]] = totals.get(unit["currency"], 0) + unit["amount_minor"]
    for component in manifest.get("components") or []:
        try:
            sku = get_sku(session, component["sku"], kind="invalid")
        except DomainError:
            continue
        price = sku.unit_price
        units = units_for(sku, component.get("gpu_count", 1)) * component.get("count", 1)
        totals[price.currency] = totals.get(price.currency, 0) + price.amount_minor * units
    currency = next(iter(totals), currency)
    hourly = totals.get(currency, 0)
    return {"hourly_rate": {"amount_minor": hourly, "currency": currency},
            "monthly_estimate": {"amount_minor": hourly * HOURS_PER_MONTH, "currency": currency},
            "billing_mode": "on_demand"}


def _min_disk(manifest: dict[str, Any]) -> int:
    presentation = manifest.get("presentation")
    runtime = presentation.get("runtime_presentation") if isinstance(presentation, dict) else None
    needs = runtime.get("target_requirements") if isinstance(runtime, dict) else None
    value = needs.get("min_root_disk_mib") if isinstance(needs, dict) else None
    return value if type(value) is int and value > 0 else 0


def precheck(request: Request, principal: Principal, project: UUID, slug: str,
             body: V3AppLaunchPrecheckRequest) -> dict[str, Any]:
    """The checks of §4.3 from aggregates; 404 for an unknown app or version."""
    session = Session(request.app.state.stores.app)
    app: AppCatalogEntry = get_app(session, slug)
    enabled, overrides = entitlement_of(session, project, slug)
    wanted = body.app_version
    if wanted is not None:
        app.version_of(wanted)
    else:  # without an entitlement: what the project would get once entitled
        wanted = newest_entitled_version(app, overrides if enabled else {})
    checks = [check("app_status", "App", "ok" if app.status == "active" else "blocker",
                    f"{app.details['display_name']} is {app.status}.")]
    version = app.versions.get(wanted or "")
    if version is None:
        checks.append(check("version", "Version", "blocker",
                            "No active version of the app is available to the project."))
    elif version["status"] != "active":
        checks.append(check("version", "Version", "blocker",
                            f"Version {wanted} is {version['status']}."))
    else:
        checks.append(check("version", "Version", "ok", f"Version {wanted} is active."))
    probe = wanted if wanted is not None else (overrides.get("allowed_versions") or [""])[0]
    try:
        require_entitled(session, project, slug, probe,
                         project_role=principal.project_role(project))
        checks.append(check("entitlement", "Entitlement", "ok",
                            "The project is entitled to the app."))
    except DomainError as error:
        checks.append(check("entitlement", "Entitlement", "blocker", error.message))
    manifest = dict((version or {}).get("manifest") or {})
    declared = set(manifest.get("dependencies") or [])
    undeclared = sorted(set(body.dependencies) - declared)
    checks.append(check("dependencies", "Dependencies", "blocker" if undeclared else "ok",
                        f"Not declared by the app: {', '.join(undeclared)}." if undeclared
                        else "Every dependency is one the app declares."))
    limit = overrides.get("max_instances")
    quota = session.get(quota_id_for(project))
    count = quota.count(slug) if quota is not None else 0
    full = limit is not None and count >= limit
    checks.append(check("quota", "Instance limit", "blocker" if full else "ok",
                        f"{count} live instance(s) of {limit} allowed." if limit is not None
                        else f"{count} live instance(s); no limit.",
                        "request_quota" if full else "none"))
    try:
        financial_gate(session, user_id=principal.user_id, tenant_id=principal.tenant_id,
                       project_id=project)
        checks.append(check("balance", "Billing", "ok", "No financial restriction blocks launches."))
    except DomainError as error:
        checks.append(check("balance", "Billing", "blocker", error.message, "add_funds",
                            "Add funds", "/billing"))
    resolved_instance = None
    if all(c["status"] == "ok" for c in checks):
        resolved_instance, failure = _decide(request, principal, project, slug, body)
        placement = "blocker" if failure is not None and _check_of(failure) == "placement" else "ok"
        if failure is not None and _check_of(failure) not in (c["id"] for c in checks) \
                and _check_of(failure) != "placement":
            checks.append(check(_check_of(failure), "Admission", "blocker", failure.message))
        checks.append(check("placement", "Placement", placement,
                            failure.message if placement == "blocker"
                            else "The placement fits the app's runtime."))
    else:
        checks.append(check("placement", "Placement", "unknown",
                            "The placement is checked once the blockers above are resolved."))
    disk = _min_disk(manifest)
    if disk:
        checks.append(check("target_disk", "Target disk", "unknown",
                            f"The app needs a root disk of at least {disk} MiB on its target; "
                            "it is verified when the app deploys."))
    if body.operator_service_account_id is not None:
        checks.append(check("operator_service_account", "Operator service account", "unknown",
                            "The service account is verified by the app's adapter."))
    mode, scope = _modes(manifest, overrides)
    account = session.get(account_id_for(principal.user_id))
    currency = account.primary_currency if account is not None else session.default_currency
    resolved = {"app_version": wanted, "display_name": body.display_name or None,
                "runtime_backend": (version or {}).get("runtime_backend"),
                "operating_mode": mode, "control_plane_scope": scope,
                "tenant_boundary_mode": None if mode is None else
                "shared_service" if mode == "platform_managed" else "tenant_isolated"}
    if resolved_instance is not None:
        resolved.update({k: resolved_instance[k] for k in resolved})
    worst = max((c["severity"] for c in checks), key=SEVERITY.__getitem__)
    return {"ready": worst != "blocker", "severity": worst, "checks": checks,
            "estimate": _estimate(session, manifest, mode, currency), "resolved": resolved,
            "meta": {"generated_at": iso(datetime.now(timezone.utc)), "cache": "bypass"}}


def _decide(request: Request, principal: Principal, project: UUID, slug: str,
            body: V3AppLaunchPrecheckRequest) -> tuple[dict[str, Any] | None, DomainError | None]:
    """Run the submit's decision on a throwaway session: (the instance it would create,
    or the refusal). Nothing is saved."""
    ctx = replace(context(request, principal, "api", None), causation_id=str(uuid.uuid4()))
    command = create_app_instance(
        ctx, project_id=project, user_id=principal.user_id, tenant_id=principal.tenant_id,
        request=_launch_request(slug, body), render=_same,
        project_role=principal.project_role(project),
        source="v3_launch")
    try:
        _, result = command.decide(ctx, Session(request.app.state.stores.app))
    except DomainError as error:
        return None, error
    return result["app_instance"], None


@router.post("/api/v1/launch/apps/{app_slug}/precheck", operation_id="precheckV3AppLaunch")
@router.post("/api/v1/v3/launch/apps/{app_slug}/precheck",
             operation_id="precheckV3AppLaunchCompat")
def precheck_v3_app_launch(body: V3AppLaunchPrecheckRequest, request: Request,
                           app_slug: str = Path(pattern=SLUG),
                           principal: Principal = Depends(authenticate)) -> JSONResponse:
    project = project_scope(request, principal)
    idempotency.checked_key(request)  # declared by the contract; a precheck replays nothing
    return JSONResponse(precheck(request, principal, project, app_slug, body))
