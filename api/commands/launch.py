"""``submitV3ComputeLaunch`` (and its V3 twin): admit compute leases for a SKU."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from api import idempotency
from api.auth import Principal, authenticate, project_scope
from api.commands import context, renderer, run
from api.launch_request import V3ComputeLaunchSubmitRequest
from domain.allocations import submit_launch

router = APIRouter()


def accepted(result: dict[str, Any]) -> dict[str, Any]:
    """The contract's ``V3LaunchSubmitResponse``."""
    workload_id = result["allocation_ids"][0]
    count = len(result["allocation_ids"])
    return {"task_id": result["task_id"], "task_href": f"/api/v1/tasks/{result['task_id']}",
            "workload_id": workload_id, "workload_href": f"/api/v1/workloads/{workload_id}",
            "resource_kind": "allocation", "status": "queued",
            "message": f"{count} allocation{'s' if count != 1 else ''} admitted and placed"}


@router.post("/api/v1/launch/compute", operation_id="submitV3ComputeLaunch", status_code=202)
@router.post("/api/v1/v3/launch/compute", operation_id="submitV3ComputeLaunchCompat",
             status_code=202)
async def submit_v3_compute_launch(body: V3ComputeLaunchSubmitRequest, request: Request,
                                   principal: Principal = Depends(authenticate)) -> JSONResponse:
    project_id = project_scope(request, principal)
    claim = idempotency.required_claim(request, principal, "submitV3ComputeLaunch",
                                       body.model_dump(mode="json"))
    command = submit_launch(
        context(request, principal, "api", claim), user_id=principal.user_id,
        tenant_id=principal.tenant_id, project_id=project_id, sku=body.sku,
        unit_count=body.unit_count or 1, region_code=body.region_code,
        scheduler_type=body.scheduler_type or "bare_metal", name=body.name,
        resource_class=body.resource_class, render=renderer(request, 202, accepted))
    return await run(request, command)
