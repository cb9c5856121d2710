"""Allocation commands: ``createAllocation``, ``releaseAllocation``,
``restartAllocation``, ``adminForceReleaseAllocation``, ``adminForceCleanupAllocation``
and ``submitV3ComputeLaunch`` (+ its V3 twin)."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from api import idempotency
from api.auth import Principal, admin, authenticate, project_scope
from api.commands import context, renderer, run
from api.errors import ApiError, correlation_id
from api.fields import JsonObject
from api.launch_request import V3ComputeLaunchSubmitRequest
from domain.admission import create_allocations, submit_launch
from domain.allocation_views import mutation_json
from domain.leases import force_cleanup, request_release, request_restart

router = APIRouter()
Strict = ConfigDict(extra="forbid", strict=True)


class CreateAllocationRequest(BaseModel):
    model_config = Strict
    node_id: UUID | None = Field(default=None, strict=False)
    requested_count: int = Field(default=1, ge=1, le=20)
    # the items lax too: a model-wide strict=True reaches into the list, where a uuid
    # arrives as a JSON string (the field's own strict=False covers only the list)
    ssh_key_ids: list[Annotated[UUID, Field(strict=False)]] | None = Field(
        default=None, min_length=1, max_length=20)
    runtime_bundle_id: UUID | None = Field(default=None, strict=False)
    runtime_bundle_slug: str | None = None
    scheduler_type: Literal["bare_metal", "slurm", "k8s", "ray"]
    capacity_shape: Literal["baremetal", "gpu_slice"] | None = None
    gpu_count: int | None = Field(default=None, ge=1)
    scheduler_request: JsonObject = Field(default_factory=dict)


def created(result: dict[str, Any]) -> dict[str, Any]:
    """The contract's ``CreateAllocationResponse``."""
    allocations = result["allocations"]
    return {"allocation": allocations[0], "allocations": allocations,
            "requested_count": result["requested_count"], "created_count": len(allocations),
            "failed_count": result["requested_count"] - len(allocations)}


@router.post("/api/v1/allocations", operation_id="createAllocation", status_code=201)
async def create_allocation(body: CreateAllocationRequest, request: Request,
                            principal: Principal = Depends(authenticate)) -> JSONResponse:
    project_id = project_scope(request, principal)
    if body.ssh_key_ids is not None and len(set(body.ssh_key_ids)) != len(body.ssh_key_ids):
        raise ApiError(400, "validation_error", "ssh_key_ids must be unique", field="ssh_key_ids")
    fields = body.model_dump(mode="json")
    claim = idempotency.claim(request, principal, "createAllocation", fields)
    command = create_allocations(
        context(request, principal, "api", claim), user_id=principal.user_id,
        tenant_id=principal.tenant_id, project_id=project_id,
        requested_count=body.requested_count, node_id=body.node_id,
        capacity_shape=body.capacity_shape, gpu_count=body.gpu_count, request=fields,
        render=renderer(request, 201, created))
    return await run(request, command)


def launched(result: dict[str, Any]) -> dict[str, Any]:
    """The contract's ``V3LaunchSubmitResponse``: the first lease is the workload."""
    first = result["allocations"][0]
    count = len(result["allocations"])
    task_id = result["task_id"]
    return {"task_id": task_id, "task_href": f"/api/v1/tasks/{task_id}",
            "workload_id": first["id"], "workload_href": f"/api/v1/workloads/{first['id']}",
            "resource_kind": "allocation", "status": "queued",
            "message": f"{count} allocation{'s' if count != 1 else ''} admitted and placed"}


@router.post("/api/v1/launch/compute", operation_id="submitV3ComputeLaunch", status_code=202)
@router.post("/api/v1/v3/launch/compute", operation_id="submitV3ComputeLaunchCompat",
             status_code=202)
async def submit_v3_compute_launch(body: V3ComputeLaunchSubmitRequest, request: Request,
                                   principal: Principal = Depends(authenticate)) -> JSONResponse:
    project_id = project_scope(request, principal)
    fields = body.model_dump(mode="json")
    claim = idempotency.required_claim(request, principal, "submitV3ComputeLaunch", fields)
    command = submit_launch(
        context(request, principal, "api", claim), user_id=principal.user_id,
        tenant_id=principal.tenant_id, project_id=project_id, sku=body.sku,
        unit_count=body.unit_count or 1, request=fields, render=renderer(request, 202, launched))
    return await run(request, command)


def _mutation(request: Request, status: int):
    return renderer(request, status, lambda result: mutation_json(result, correlation_id(request)))


@router.post("/api/v1/allocations/{allocation_id}/release", operation_id="releaseAllocation",
             status_code=202)
async def release_allocation(allocation_id: UUID, request: Request,
                             principal: Principal = Depends(authenticate)) -> JSONResponse:
    project_id = project_scope(request, principal)
    claim = idempotency.claim(request, principal, "releaseAllocation", None)
    command = request_release(context(request, principal, "api", claim),
                              allocation_id=allocation_id, project_id=project_id, mode="user",
                              reason=None, render=_mutation(request, 202))
    return await run(request, command)


@router.post("/api/v1/allocations/{allocation_id}/restart", operation_id="restartAllocation",
             status_code=202)
async def restart_allocation(allocation_id: UUID, request: Request,
                             principal: Principal = Depends(authenticate)) -> JSONResponse:
    project_id = project_scope(request, principal)
    claim = idempotency.claim(request, principal, "restartAllocation", None)
    command = request_restart(context(request, principal, "api", claim),
                              allocation_id=allocation_id, project_id=project_id,
                              render=_mutation(request, 202))
    return await run(request, command)


class ForceReleaseRequest(BaseModel):
    model_config = Strict
    reason: str = Field(min_length=3)


class ForceCleanupRequest(ForceReleaseRequest):
    runtime_verified_absent: bool = False


@router.post("/api/v1/admin/allocations/{allocation_id}/force-release",
             operation_id="adminForceReleaseAllocation", status_code=202)
async def admin_force_release_allocation(
        allocation_id: UUID, body: ForceReleaseRequest, request: Request,
        principal: Principal = Depends(admin)) -> JSONResponse:
    claim = idempotency.claim(request, principal, "adminForceReleaseAllocation", body.model_dump())
    command = request_release(context(request, principal, "admin", claim),
                              allocation_id=allocation_id, project_id=None, mode="admin_force",
                              reason=body.reason, render=_mutation(request, 202))
    return await run(request, command)


@router.post("/api/v1/admin/allocations/{allocation_id}/force-cleanup",
             operation_id="adminForceCleanupAllocation")
async def admin_force_cleanup_allocation(
        allocation_id: UUID, body: ForceCleanupRequest, request: Request,
        principal: Principal = Depends(admin)) -> JSONResponse:
    claim = idempotency.claim(request, principal, "adminForceCleanupAllocation", body.model_dump())
    command = force_cleanup(context(request, principal, "admin", claim),
                            allocation_id=allocation_id, reason=body.reason,
                            runtime_verified_absent=body.runtime_verified_absent,
                            render=_mutation(request, 200))
    return await run(request, command)
