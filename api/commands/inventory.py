"""Inventory commands: nodes (create, probe, slots, retire, reactivate, remove, detach,
force-detach, cordon, drain, resume-scheduling), SKUs, the concurrency policy and the
placement-claim backfill.

Every operation with a V3 twin is one handler under both paths. All need
``platform.admin``. The node lifecycle mutations demand an ``Idempotency-Key``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from api import idempotency
from api.auth import Principal, admin
from api.commands import context, renderer, run
from api.errors import ApiError, correlation_id
from api.fields import JsonObject
from domain import nodes, placement, skus
from domain.admission import backfill_placement_claims
from domain.allocations import Allocation
from domain.inventory_views import lifecycle_mutation_json, node_admin_json, slot_json
from domain.money import INT64_MAX

router = APIRouter()
ADMIN_NODE = "/api/v1/admin/nodes/{node_id}"
LIFECYCLE = "/api/v1/platform/lifecycle/nodes/{node_id}"
LIFECYCLE_V3 = "/api/v1/v3/platform/lifecycle/nodes/{node_id}"
PROBE_TIMEOUT_SECONDS = 2.0
Strict = ConfigDict(extra="forbid", strict=True)
ALLOCATION_REQUESTED = Allocation.Created.TOPIC


async def probe_host(host: str, port: int) -> bool:
    """Whether the node's SSH port accepts a TCP connection (the liveness probe)."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                           PROBE_TIMEOUT_SECONDS)
    except (OSError, asyncio.TimeoutError, ValueError):  # ValueError: a name idna refuses
        return False
    writer.close()
    return True


# ---- nodes ------------------------------------------------------------------------------
def _host(value: str) -> str:
    """An IP address or a DNS name (dot-separated labels of letters, digits, ``-``, ``_``):
    anything else cannot be probed or reached over SSH (and idna refuses some of it)."""
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    labels = value.rstrip(".").split(".")
    if len(value) > 253 or not all(HOST_LABEL.fullmatch(label) for label in labels):
        raise ValueError("must be an IP address or a DNS host name")
    return value


HOST_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


class AdminCreateNodeRequest(BaseModel):
    model_config = Strict
    host: Annotated[str, AfterValidator(_host)] = Field(min_length=3)
    hostname: str | None = Field(default=None, min_length=3)
    port: int = Field(default=22, ge=1, le=65535)
    sku: str = Field(min_length=1)
    gpus_total: int = Field(ge=0)
    region_code: str = "region-maas-1"
    onboarding_mode: Literal["manual", "maas"] = "manual"
    probe: bool = True


@router.post("/api/v1/admin/nodes", operation_id="adminCreateNode")
async def admin_create_node(body: AdminCreateNodeRequest, request: Request,
                            principal: Principal = Depends(admin)) -> JSONResponse:
    claim = idempotency.claim(request, principal, "adminCreateNode", body.model_dump())
    online = await probe_host(body.host, body.port) if body.probe else True
    identity = {"host": body.host, "hostname": body.hostname, "port": body.port,
                "ssh_username": "ubuntu", "sku": body.sku, "gpus_total": body.gpus_total,
                "region_code": body.region_code, "onboarding_mode": body.onboarding_mode}
    command = nodes.register_node(
        context(request, principal, "admin", claim), identity=identity, online=online,
        render=renderer(request, 201, lambda result: node_admin_json(result["node"])))
    return await run(request, command)


@router.post(ADMIN_NODE + "/probe", operation_id="adminProbeNode")
@router.post(LIFECYCLE + "/probe", operation_id="probeV3PlatformNode")
@router.post(LIFECYCLE_V3 + "/probe", operation_id="probeV3PlatformNodeCompat")
async def probe_node(node_id: UUID, request: Request,
                     principal: Principal = Depends(admin)) -> JSONResponse:
    claim = idempotency.claim(request, principal, "adminProbeNode", None)
    node = request.app.state.stores.app.get_or_none(node_id)
    if node is None or not getattr(node, "listed", False):
        raise ApiError(404, "node_not_found", "node not found", node_id=str(node_id))
    online = await probe_host(node.identity["host"], node.identity["port"])
    command = nodes.observe_liveness(
        context(request, principal, "admin", claim), node_id=node_id, online=online,
        source="probe", render=renderer(request, 200, lambda result: {
            "ok": True, "status": "active" if result["node"].online else "offline"}))
    return await run(request, command)


class SlotModel(BaseModel):
    model_config = Strict
    parent_slot_id: UUID | None = Field(default=None, strict=False)
    slot_index: int = Field(ge=0)
    status: Literal["available", "reserved", "active", "cleanup", "cleanup_blocked", "disabled"]
    capacity_shape: Literal["baremetal", "gpu_slice"]
    sharing_model: Literal["exclusive_device"] | None = None
    profile_name: str | None = None
    accelerator_vendor: str | None = None
    accelerator_model: str | None = None
    gpu_index: int | None = None
    gpu_uuid: str | None = None
    pci_address: str | None = None
    numa_node: int | None = None
    nvme_device: str | None = None
    nvme_wwn: str | None = None
    fabric_kind: Literal["ib", "roce", "ethernet"] | None = None
    fabric_device: str | None = None
    vcpu_count: int | None = Field(default=None, ge=1)
    memory_mib: int | None = Field(default=None, ge=1)
    gpu_memory_mib: int | None = Field(default=None, ge=1)
    compute_milli: int | None = Field(default=None, ge=1)
    max_claims: int | None = Field(default=None, ge=1)
    mac_address: str | None = None
    private_ip: str | None = None
    health_state: str | None = None
    health_detail: JsonObject = Field(default_factory=dict)
    capacity_metadata: JsonObject = Field(default_factory=dict)


class AdminUpsertNodeResourceSlotsRequest(BaseModel):
    model_config = Strict
    slots: list[SlotModel] = Field(min_length=1, max_length=64)


def slot_list(result: dict[str, Any]) -> dict[str, Any]:
    node = result["node"]
    return {"items": [slot_json(s) for s in sorted(node.slots.values(),
                                                    key=lambda s: s["slot_index"])]}


@router.put(ADMIN_NODE + "/resource-slots", operation_id="adminUpsertNodeResourceSlots")
@router.put(LIFECYCLE + "/resource-slots", operation_id="upsertV3PlatformNodeResourceSlots")
@router.put(LIFECYCLE_V3 + "/resource-slots", operation_id="upsertV3PlatformNodeResourceSlotsCompat")
async def upsert_node_resource_slots(node_id: UUID, body: AdminUpsertNodeResourceSlotsRequest,
                                     request: Request,
                                     principal: Principal = Depends(admin)) -> JSONResponse:
    given = body.model_dump(mode="json")
    claim = idempotency.claim(request, principal, "adminUpsertNodeResourceSlots", given)
    command = nodes.upsert_slots(context(request, principal, "admin", claim), node_id=node_id,
                                 slots=given["slots"], render=renderer(request, 200, slot_list))
    return await run(request, command)


def _no_content(response: JSONResponse) -> Response:
    """A 204 has no body; errors pass through."""
    if response.status_code != 204:
        return response
    plain = Response(status_code=204)
    for name in ("X-Ledger-Position", "Idempotent-Replayed"):
        if name in response.headers:
            plain.headers[name] = response.headers[name]
    return plain


@router.delete(ADMIN_NODE, operation_id="adminDeleteNode", status_code=204)
@router.delete(LIFECYCLE, operation_id="retireV3PlatformNode", status_code=204)
@router.delete(LIFECYCLE_V3, operation_id="retireV3PlatformNodeCompat", status_code=204)
async def retire_node(node_id: UUID, request: Request,
                      principal: Principal = Depends(admin)) -> Response:
    claim = idempotency.claim(request, principal, "adminDeleteNode", None)
    command = nodes.retire(context(request, principal, "admin", claim), node_id=node_id,
                           render=renderer(request, 204, lambda result: None))
    return _no_content(await run(request, command))


@router.post(ADMIN_NODE + "/reactivate", operation_id="adminReactivateNode")
@router.post(LIFECYCLE + "/reactivate", operation_id="reactivateV3PlatformNode")
@router.post(LIFECYCLE_V3 + "/reactivate", operation_id="reactivateV3PlatformNodeCompat")
async def reactivate_node(node_id: UUID, request: Request,
                          principal: Principal = Depends(admin)) -> JSONResponse:
    claim = idempotency.claim(request, principal, "adminReactivateNode", None)
    command = nodes.reactivate(context(request, principal, "admin", claim), node_id=node_id,
                               render=renderer(request, 200, lambda result: {
                                   "ok": True, "status": result["node"].status}))
    return await run(request, command)


def _tombstone_route(suffix: str, how: str, operation_ids: tuple[str, str, str]) -> None:
    async def handler(node_id: UUID, request: Request,
                      principal: Principal = Depends(admin)) -> Response:
        claim = idempotency.claim(request, principal, operation_ids[0], None)
        command = nodes.tombstone(context(request, principal, "admin", claim), node_id=node_id,
                                  how=how, render=renderer(request, 204, lambda result: None))
        return _no_content(await run(request, command))

    for prefix, operation_id in zip((ADMIN_NODE, LIFECYCLE, LIFECYCLE_V3), operation_ids):
        router.delete(prefix + suffix, operation_id=operation_id, status_code=204)(handler)


_tombstone_route("/remove", "removed",
                 ("adminRemoveNode", "removeV3PlatformNode", "removeV3PlatformNodeCompat"))
_tombstone_route("/detach", "detached",
                 ("adminDetachNode", "detachV3PlatformNode", "detachV3PlatformNodeCompat"))
_tombstone_route("/force-detach", "force_detached",
                 ("adminForceDetachNode", "forceDetachV3PlatformNode",
                  "forceDetachV3PlatformNodeCompat"))


def _lifecycle_route(suffix: str, decide: Any, status: int, operation: str) -> None:
    async def handler(node_id: UUID, request: Request,
                      principal: Principal = Depends(admin)) -> JSONResponse:
        claim = idempotency.required_claim(request, principal, f"{operation}V3PlatformNode", None)
        command = decide(context(request, principal, "admin", claim), node_id=node_id,
                         render=renderer(request, status, lambda result: lifecycle_mutation_json(
                             result, correlation_id(request))))
        return await run(request, command)

    name = {"cordon": "cordon", "drain": "drain", "resume-scheduling": "resumeScheduling"}[suffix]
    router.post(LIFECYCLE + "/" + suffix, operation_id=f"{name}V3PlatformNode",
                status_code=status)(handler)
    router.post(LIFECYCLE_V3 + "/" + suffix, operation_id=f"{name}V3PlatformNodeCompat",
                status_code=status)(handler)


_lifecycle_route("cordon", nodes.cordon, 200, "cordon")
_lifecycle_route("drain", nodes.drain, 202, "drain")
_lifecycle_route("resume-scheduling", nodes.resume_scheduling, 200, "resumeScheduling")


# ---- SKUs ------------------------------------------------------------------------------
class MoneyModel(BaseModel):
    model_config = Strict
    amount_minor: int = Field(ge=-INT64_MAX, le=INT64_MAX)
    currency: str = Field(pattern=r"^[A-Z]{3}$")


class SkuResourcesModel(BaseModel):
    model_config = Strict
    vcpu_count: int | None = Field(default=None, ge=0)
    memory_mib: int | None = Field(default=None, ge=0)
    accelerator_vendor: str | None = None
    accelerator_model: str | None = None
    accelerator_count: int | None = Field(default=None, ge=0)
    accelerator_memory_mib: int | None = Field(default=None, ge=0)
    allowed_accelerator_counts: list[int]


class AdminUpdateSkuRequest(BaseModel):
    model_config = Strict
    vendor: str = Field(min_length=1)
    display_name: str = Field(min_length=1)
    family_id: str | None = Field(default=None, min_length=1)
    family_version: str | None = Field(default=None, min_length=1)
    resource_class: Literal["gpu_baremetal", "gpu_slice", "cpu_vm", "cpu_baremetal", "control_plane"]
    billing_unit: Literal["gpu_hour", "node_hour", "vcpu_hour"]
    scheduling_unit: Literal["node", "slice", "vm"]
    resources: SkuResourcesModel
    resource_profile: JsonObject | None = None
    unit_price: MoneyModel

    def spec(self) -> dict[str, Any]:
        spec = self.model_dump(exclude={"sku"})
        counts = spec["resources"]["allowed_accelerator_counts"]
        if any(c < 1 for c in counts):
            raise ApiError(400, "validation_error", "allowed_accelerator_counts items must be >= 1",
                           fields=[{"location": "body", "field": "resources.allowed_accelerator_counts",
                                    "reason": "greater_than_equal", "message": "must be >= 1"}])
        spec["resources"] = {k: v for k, v in spec["resources"].items() if v is not None}
        return spec


class AdminCreateSkuRequest(AdminUpdateSkuRequest):
    sku: str = Field(min_length=1)


def _sku_admin(result: dict[str, Any]) -> dict[str, Any]:
    return result


@router.post("/api/v1/admin/skus", operation_id="adminCreateSku", status_code=201)
@router.post("/api/v1/v3/platform/config/skus", operation_id="createV3PlatformConfigSkuCompat",
             status_code=201)
async def create_sku(body: AdminCreateSkuRequest, request: Request,
                     principal: Principal = Depends(admin)) -> JSONResponse:
    claim = idempotency.claim(request, principal, "adminCreateSku", body.model_dump())
    command = skus.create_sku(context(request, principal, "admin", claim), sku=body.sku,
                              spec=body.spec(), render=renderer(request, 201, _sku_admin))
    return await run(request, command)


@router.patch("/api/v1/admin/skus/{sku}", operation_id="adminUpdateSku")
@router.patch("/api/v1/v3/platform/config/skus/{sku}", operation_id="updateV3PlatformConfigSkuCompat")
async def update_sku(sku: str, body: AdminUpdateSkuRequest, request: Request,
                     principal: Principal = Depends(admin)) -> JSONResponse:
    claim = idempotency.claim(request, principal, "adminUpdateSku", body.model_dump())
    command = skus.update_sku(context(request, principal, "admin", claim), sku=sku,
                              spec=body.spec(), live_claims=placement.live_claims_for_sku,
                              render=renderer(request, 200, _sku_admin))
    return await run(request, command)


def _sku_toggle_route(action: str, active: bool) -> None:
    async def handler(sku: str, request: Request,
                      principal: Principal = Depends(admin)) -> JSONResponse:
        claim = idempotency.claim(request, principal, f"admin{action.title()}Sku", None)
        command = skus.set_sku_active(context(request, principal, "admin", claim), sku=sku,
                                      active=active, render=renderer(request, 200, _sku_admin))
        return await run(request, command)

    router.post(f"/api/v1/admin/skus/{{sku}}/{action}",
                operation_id=f"admin{action.title()}Sku")(handler)
    router.post(f"/api/v1/v3/platform/config/skus/{{sku}}/{action}",
                operation_id=f"{action}V3PlatformConfigSkuCompat")(handler)


_sku_toggle_route("activate", True)
_sku_toggle_route("deactivate", False)


# ---- the concurrency policy --------------------------------------------------------------
class AdminSetAllocationConcurrencyPolicyRequest(BaseModel):
    model_config = Strict
    value: int = Field(ge=1)
    reason: str | None = Field(default=None, max_length=500)


@router.put("/api/v1/admin/allocations/limits/policy",
            operation_id="adminSetAllocationConcurrencyPolicy")
@router.put("/api/v1/v3/platform/config/quotas/allocation-concurrency",
            operation_id="setV3PlatformConfigAllocationConcurrencyPolicyCompat")
async def set_allocation_concurrency_policy(
        body: AdminSetAllocationConcurrencyPolicyRequest, request: Request,
        principal: Principal = Depends(admin)) -> JSONResponse:
    claim = idempotency.claim(request, principal, "adminSetAllocationConcurrencyPolicy",
                              body.model_dump())
    command = skus.set_concurrency_policy(context(request, principal, "admin", claim),
                                          value=body.value, reason=body.reason,
                                          render=renderer(request, 200, lambda result: result))
    return await run(request, command)


# ---- placement-claim backfill ------------------------------------------------------------
#: the advisory lock one backfill run holds (a second concurrent run answers 503)
BACKFILL_LOCK = 0x6C63_6266


@router.post("/api/v1/admin/allocations/placement-claims/backfill",
             operation_id="adminBackfillAllocationPlacementClaims")
async def admin_backfill_allocation_placement_claims(
        request: Request, principal: Principal = Depends(admin)) -> JSONResponse:
    claim = idempotency.claim(request, principal, "adminBackfillAllocationPlacementClaims", None)
    stores = request.app.state.stores
    with stores.query_pool.connection() as lock:
        row = lock.execute("SELECT pg_try_advisory_lock(%s) AS held", (BACKFILL_LOCK,)).fetchone()
        if not row["held"]:
            raise ApiError(503, "service_unavailable", "a placement-claim backfill is already running")
        try:
            allocation_ids = await asyncio.to_thread(stores.originators, ALLOCATION_REQUESTED)
            command = backfill_placement_claims(
                context(request, principal, "admin", claim), allocation_ids=allocation_ids,
                render=renderer(request, 200, lambda result: result))
            return await run(request, command)
        finally:
            lock.execute("SELECT pg_advisory_unlock(%s)", (BACKFILL_LOCK,))
