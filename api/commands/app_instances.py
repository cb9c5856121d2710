"""App-instance commands: the project path (create, lifecycle, member and repair
operations, and the adapter's reports) and the V3 family with its compat twins.

Every answer is built from the post-command ``AppInstance`` (``domain.app_instances``);
nothing here reads a read model. A compat twin shares its canonical operation's
idempotency scope, so a key replays across the two paths.

Who may call (docs/decisions.md): user commands need membership of the project (the
path's ``project_id``, or ``X-Project-ID`` on V3) in a role above ``viewer``
(``api.auth.project_access``); a create checks the caller's project role against the
entitlement's ``launch_roles``; the adapter's reports need a service account of the
project or the platform (``platform.admin`` or ``platform.ops.write``): a plain project
member is 403. ``stop`` completes in the same save
(``stop_app_instance``): the instance answers ``stopped``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from api import idempotency
from api.auth import Principal, authenticate, project_access, project_scope
from api.commands import context, renderer, run
from api.errors import ApiError
from api.fields import Instant, JsonObject
from domain.app_instances import (create_app_instance, create_member_operation,
                                  create_repair_operation, lifecycle, report_app_instance,
                                  report_member, report_member_operation,
                                  report_repair_operation, stop_app_instance, v3_operation_json)
from domain.commands import Command

router = APIRouter()
Strict = ConfigDict(extra="forbid", strict=True)
PROJECT = "/api/v1/projects/{project_id}/app-instances"
V3 = "/api/v1/apps/instances"
COMPAT = "/api/v1/v3/apps/instances"
Id = Annotated[UUID, Field(strict=False)]
MemberStatus = Literal["requested", "reconciling", "ready", "draining", "deleting", "failed",
                       "deleted"]


# ---- request bodies (the contract's schemas) -------------------------------------------------
class PlacementIntent(BaseModel):
    model_config = Strict
    target_allocation_id: Id | None = None
    controller_allocation_id: Id | None = None
    worker_allocation_ids: list[Id] = Field(default_factory=list)
    server_allocation_id: Id | None = None
    agent_allocation_ids: list[Id] = Field(default_factory=list)
    allow_shared_allocation: bool = False


class CreateAppInstanceRequest(BaseModel):
    model_config = Strict
    app_slug: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{1,62}$")
    app_version: str = Field(min_length=1)
    display_name: str = Field(min_length=1)
    app_artifact_id: Id | None = None
    operating_mode: Literal["tenant_dedicated", "platform_managed"] | None = None
    control_plane_scope: Literal["project", "tenant", "platform"] | None = None
    operator_service_account_id: Id | None = None
    placement_intent: PlacementIntent = Field(default_factory=PlacementIntent)
    config: JsonObject = Field(default_factory=dict)
    resource_overrides: JsonObject = Field(default_factory=dict)


class VersionRequest(BaseModel):
    """``UpgradeAppInstanceRequest`` = ``RollbackAppInstanceRequest``."""
    model_config = Strict
    app_version: str = Field(min_length=1)


class ReportAppInstanceRequest(BaseModel):
    model_config = Strict
    status: Literal["deploying", "running", "failed", "decommissioning", "decommissioned",
                    "deleting", "deleted"]
    failure_reason: str | None = None
    runtime_state: JsonObject = Field(default_factory=dict)
    phase: str | None = None
    progress: JsonObject = Field(default_factory=dict)
    health_status: str | None = None
    health_detail: JsonObject = Field(default_factory=dict)


class MemberFields(BaseModel):
    model_config = Strict
    bound_node_id: Id | None = None
    bound_allocation_id: Id | None = None
    member_role: str | None = None
    runtime_state: JsonObject | None = None
    health_status: str | None = None
    health_detail: JsonObject | None = None
    endpoint: JsonObject | None = None
    adapter_detail: JsonObject | None = None


class ReportAppInstanceMemberRequest(MemberFields):
    status: MemberStatus


class CreateMemberOperationRequest(BaseModel):
    model_config = Strict
    action: Literal["add", "drain", "remove", "replace"]
    component_key: str | None = Field(default=None, min_length=1)
    target_member_id: Id | None = None
    requested_count: int | None = Field(default=None, ge=1)
    allocation_intent: JsonObject | None = None


class ReportMemberOperationRequest(MemberFields):
    status: Literal["in_progress", "succeeded", "failed", "cancelled"]
    target_member_id: Id | None = None
    member_status: MemberStatus | None = None
    last_error_code: str | None = None
    last_error_message: str | None = None


class CreateRepairRequest(BaseModel):
    model_config = Strict
    action: Literal["reconcile", "repair"]
    scope: Literal["whole_runtime", "control_plane", "member"]
    target_member_id: Id | None = None
    component_key: str | None = None
    reason: str | None = Field(default=None, max_length=500)
    dry_run: bool = False


class RepairStep(BaseModel):
    model_config = Strict
    name: str = Field(min_length=1)
    status: Literal["pending", "running", "succeeded", "failed", "skipped"]
    started_at: Annotated[Instant, Field(strict=False)] | None
    completed_at: Annotated[Instant, Field(strict=False)] | None
    summary: str | None


class ReportRepairOperationRequest(BaseModel):
    model_config = Strict
    status: Literal["accepted", "in_progress", "succeeded", "failed", "cancelled"]
    phase: str | None = None
    progress: JsonObject | None = None
    steps: list[RepairStep] = Field(default_factory=list)
    runtime_state: JsonObject | None = None
    health_status: str | None = None
    health_detail: JsonObject | None = None
    last_error_code: str | None = None
    last_error_message: str | None = None


def _carried(body: BaseModel) -> dict[str, Any]:
    """A report's keys as sent: a report replaces what it carries and keeps the rest."""
    return body.model_dump(mode="json", exclude_unset=True)


# ---- helpers ---------------------------------------------------------------------------------
def _reporter(principal: Principal, project_id: UUID) -> None:
    """Reports come from the app's adapter: a service account of the project, or the
    platform. A person (even a project member) is 403."""
    if principal.can("platform.admin") or principal.can("platform.ops.write"):
        return
    if principal.actor_type == "service_account" and principal.token_project_id == project_id:
        return
    if principal.actor_type == "service_account":
        raise ApiError(403, "token_scope_invalid", "the token is not valid for this project")
    raise ApiError(403, "insufficient_permissions",
                   "reports come from the app's adapter (a service account of the project)")


def _path_project(request: Request) -> UUID | None:
    try:
        return UUID(request.path_params.get("project_id", ""))
    except ValueError:
        return None  # the path's validation answers 400


async def project_member(request: Request) -> Principal:
    """The caller, a member of the path's project in a role that may send the request
    (403), checked before the body is (auth → scope → role → schema)."""
    principal = await authenticate(request)
    project = _path_project(request)
    if project is not None:
        project_access(request, principal, project)
    return principal


async def project_reporter(request: Request) -> Principal:
    """The caller, the project's adapter or the platform (403), before the body."""
    principal = await authenticate(request)
    project = _path_project(request)
    if project is not None:
        _reporter(principal, project)
    return principal


async def header_member(request: Request) -> Principal:
    """The caller, a member of the ``X-Project-ID`` project in a role that may send the
    request (400/403), before the body."""
    principal = await authenticate(request)
    project_scope(request, principal)
    return principal


def _requester(principal: Principal) -> dict[str, UUID | None]:
    service_account = principal.actor_type == "service_account"
    return {"user_id": None if service_account else principal.user_id,
            "service_account_id": principal.user_id if service_account else None}


def _instance(result: dict[str, Any]) -> dict[str, Any]:
    return result["app_instance"]


def _same(result: dict[str, Any]) -> dict[str, Any]:
    return result


async def _lifecycle(request: Request, principal: Principal, operation_id: str, *,
                     project_id: UUID, app_instance_id: UUID, operation: str, via: str,
                     shape: Any, body: VersionRequest | None = None,
                     legacy_delete: bool = False) -> JSONResponse:
    fields = body.model_dump(mode="json") if body is not None else None
    claim = idempotency.claim(request, principal, operation_id, fields)
    ctx = context(request, principal, "api", claim)
    render = renderer(request, 202, shape)
    command: Command
    if operation == "stop":
        command = stop_app_instance(ctx, app_instance_id=app_instance_id, project_id=project_id,
                                    render=render, via=via)
    else:
        command = lifecycle(ctx, app_instance_id=app_instance_id, project_id=project_id,
                            operation=operation, render=render, via=via,
                            app_version=body.app_version if body is not None else None,
                            legacy_delete=legacy_delete)
    return await run(request, command)


# ---- the project path: create and lifecycle --------------------------------------------------
@router.post(PROJECT, operation_id="createAppInstance", status_code=202)
async def create_instance(project_id: UUID, body: CreateAppInstanceRequest, request: Request,
                          principal: Principal = Depends(project_member)) -> JSONResponse:
    fields = body.model_dump(mode="json")
    claim = idempotency.claim(request, principal, "createAppInstance", fields)
    requester = _requester(principal)
    command = create_app_instance(
        context(request, principal, "api", claim), project_id=project_id,
        user_id=principal.user_id, tenant_id=principal.tenant_id, request=fields,
        service_account_id=requester["service_account_id"],
        project_role=principal.project_role(project_id),
        render=renderer(request, 202, _instance))
    return await run(request, command)


def _project_lifecycle(operation: str, operation_id: str, suffix: str, *,
                       with_version: bool = False, method: str = "post",
                       legacy_delete: bool = False) -> None:
    path = PROJECT + "/{app_instance_id}" + suffix

    if with_version:
        async def endpoint(project_id: UUID, app_instance_id: UUID, body: VersionRequest,
                           request: Request,
                           principal: Principal = Depends(project_member)) -> JSONResponse:
                    return await _lifecycle(request, principal, operation_id, project_id=project_id,
                                    app_instance_id=app_instance_id, operation=operation,
                                    via="project_path", shape=_instance, body=body)
    else:
        async def endpoint(project_id: UUID, app_instance_id: UUID,  # type: ignore[misc]
                           request: Request,
                           principal: Principal = Depends(project_member)) -> JSONResponse:
                    return await _lifecycle(request, principal, operation_id, project_id=project_id,
                                    app_instance_id=app_instance_id, operation=operation,
                                    via="project_path", shape=_instance,
                                    legacy_delete=legacy_delete)

    endpoint.__name__ = operation_id
    getattr(router, method)(path, operation_id=operation_id, status_code=202)(endpoint)


_project_lifecycle("upgrade", "upgradeAppInstance", "/upgrade", with_version=True)
_project_lifecycle("rollback", "rollbackAppInstance", "/rollback", with_version=True)
_project_lifecycle("stop", "stopAppInstance", "/stop")
_project_lifecycle("start", "startAppInstance", "/start")
_project_lifecycle("restart", "restartAppInstance", "/restart")
_project_lifecycle("decommission", "decommissionAppInstance", "/decommission")
_project_lifecycle("decommission", "deleteAppInstance", "/report", method="delete",
                   legacy_delete=True)


# ---- the project path: member and repair operations ------------------------------------------
@router.post(PROJECT + "/{app_instance_id}/member-operations",
             operation_id="createAppInstanceMemberOperation", status_code=202)
async def create_instance_member_operation(project_id: UUID, app_instance_id: UUID,
                                           body: CreateMemberOperationRequest, request: Request,
                                           principal: Principal = Depends(project_member)
                                           ) -> JSONResponse:
    return await _member_operation(request, principal, "createAppInstanceMemberOperation",
                                   project_id, app_instance_id, body)


async def _member_operation(request: Request, principal: Principal, operation_id: str,
                            project_id: UUID, app_instance_id: UUID,
                            body: CreateMemberOperationRequest) -> JSONResponse:
    fields = body.model_dump(mode="json")
    claim = idempotency.claim(request, principal, operation_id, fields)
    command = create_member_operation(
        context(request, principal, "api", claim), app_instance_id=app_instance_id,
        project_id=project_id, request=fields, render=renderer(request, 202, _same),
        **_requester(principal))
    return await run(request, command)


@router.post(PROJECT + "/{app_instance_id}/repair",
             operation_id="createAppInstanceRepairOperation", status_code=202)
async def create_instance_repair(project_id: UUID, app_instance_id: UUID,
                                 body: CreateRepairRequest, request: Request,
                                 principal: Principal = Depends(project_member)) -> JSONResponse:
    return await _repair(request, principal, "createAppInstanceRepairOperation", project_id,
                         app_instance_id, body)


async def _repair(request: Request, principal: Principal, operation_id: str, project_id: UUID,
                  app_instance_id: UUID, body: CreateRepairRequest) -> JSONResponse:
    fields = body.model_dump(mode="json")
    claim = idempotency.claim(request, principal, operation_id, fields)
    command = create_repair_operation(
        context(request, principal, "api", claim), app_instance_id=app_instance_id,
        project_id=project_id, request=fields, render=renderer(request, 202, _same),
        **_requester(principal))
    return await run(request, command)


# ---- the adapter's reports -------------------------------------------------------------------
@router.post(PROJECT + "/{app_instance_id}/report", operation_id="reportAppInstance")
async def report_instance(project_id: UUID, app_instance_id: UUID,
                          body: ReportAppInstanceRequest, request: Request,
                          principal: Principal = Depends(project_reporter)) -> JSONResponse:
    command = report_app_instance(context(request, principal, "api", None),
                                  app_instance_id=app_instance_id, project_id=project_id,
                                  report=_carried(body), render=renderer(request, 200, _same))
    return await run(request, command)


@router.post(PROJECT + "/{app_instance_id}/members/{member_id}/report",
             operation_id="reportAppInstanceMember")
async def report_instance_member(project_id: UUID, app_instance_id: UUID, member_id: UUID,
                                 body: ReportAppInstanceMemberRequest, request: Request,
                                 principal: Principal = Depends(project_reporter)) -> JSONResponse:
    command = report_member(context(request, principal, "api", None),
                            app_instance_id=app_instance_id, project_id=project_id,
                            member_id=member_id, report=_carried(body),
                            render=renderer(request, 200, _same))
    return await run(request, command)


@router.post(PROJECT + "/{app_instance_id}/member-operations/{operation_id}/report",
             operation_id="reportAppInstanceMemberOperation")
async def report_instance_member_operation(project_id: UUID, app_instance_id: UUID,
                                           operation_id: UUID,
                                           body: ReportMemberOperationRequest, request: Request,
                                           principal: Principal = Depends(project_reporter)
                                           ) -> JSONResponse:
    command = report_member_operation(context(request, principal, "api", None),
                                      app_instance_id=app_instance_id, project_id=project_id,
                                      operation_id=operation_id, report=_carried(body),
                                      render=renderer(request, 200, _same))
    return await run(request, command)


@router.post(PROJECT + "/{app_instance_id}/repair-operations/{repair_operation_id}/report",
             operation_id="reportAppInstanceRepairOperation")
async def report_instance_repair_operation(project_id: UUID, app_instance_id: UUID,
                                           repair_operation_id: UUID,
                                           body: ReportRepairOperationRequest, request: Request,
                                           principal: Principal = Depends(project_reporter)
                                           ) -> JSONResponse:
    report = _carried(body)
    claim = idempotency.claim(request, principal, "reportAppInstanceRepairOperation", report)
    command = report_repair_operation(context(request, principal, "api", claim),
                                      app_instance_id=app_instance_id, project_id=project_id,
                                      repair_operation_id=repair_operation_id, report=report,
                                      render=renderer(request, 200, _same))
    return await run(request, command)


# ---- V3 and its compat twins -----------------------------------------------------------------
def _v3_lifecycle(operation: str, operation_id: str, *, with_version: bool = False) -> None:
    suffix = "/{app_instance_id}/" + operation
    shape = _instance if with_version else v3_operation_json

    if with_version:
        async def endpoint(app_instance_id: UUID, body: VersionRequest, request: Request,
                           principal: Principal = Depends(header_member)) -> JSONResponse:
            project_id = project_scope(request, principal)
            return await _lifecycle(request, principal, operation_id, project_id=project_id,
                                    app_instance_id=app_instance_id, operation=operation,
                                    via="v3", shape=shape, body=body)
    else:
        async def endpoint(app_instance_id: UUID, request: Request,  # type: ignore[misc]
                           principal: Principal = Depends(header_member)) -> JSONResponse:
            project_id = project_scope(request, principal)
            return await _lifecycle(request, principal, operation_id, project_id=project_id,
                                    app_instance_id=app_instance_id, operation=operation,
                                    via="v3", shape=shape)

    endpoint.__name__ = operation_id
    router.post(V3 + suffix, operation_id=operation_id, status_code=202)(endpoint)
    router.post(COMPAT + suffix, operation_id=operation_id + "Compat", status_code=202)(endpoint)


_v3_lifecycle("upgrade", "upgradeV3AppInstance", with_version=True)
_v3_lifecycle("rollback", "rollbackV3AppInstance", with_version=True)
_v3_lifecycle("stop", "stopV3AppInstance")
_v3_lifecycle("start", "startV3AppInstance")
_v3_lifecycle("restart", "restartV3AppInstance")
_v3_lifecycle("decommission", "decommissionV3AppInstance")


@router.post(V3 + "/{app_instance_id}/member-operations",
             operation_id="createV3AppInstanceMemberOperation", status_code=202)
@router.post(COMPAT + "/{app_instance_id}/member-operations",
             operation_id="createV3AppInstanceMemberOperationCompat", status_code=202)
async def create_v3_member_operation(app_instance_id: UUID, body: CreateMemberOperationRequest,
                                     request: Request,
                                     principal: Principal = Depends(header_member)
                                     ) -> JSONResponse:
    project_id = project_scope(request, principal)
    return await _member_operation(request, principal, "createV3AppInstanceMemberOperation",
                                   project_id, app_instance_id, body)


@router.post(COMPAT + "/{app_instance_id}/repair", operation_id="repairV3AppInstanceCompat",
             status_code=202)
async def repair_v3_instance(app_instance_id: UUID, body: CreateRepairRequest, request: Request,
                             principal: Principal = Depends(header_member)) -> JSONResponse:
    project_id = project_scope(request, principal)
    return await _repair(request, principal, "repairV3AppInstanceCompat", project_id,
                         app_instance_id, body)
