"""Allocations: admission of GPU leases (the create path).

Admission decides, in one save: the caller's financial posture allows a launch, the
per-user concurrency cap has headroom (``UserAllocationQuota`` serialises one user's
admissions), and placement claims are reserved on a node (``domain.placement``). The
new ``Allocation`` starts ``requested`` with ``placement_status=reserved``. Each later
step (``move_lease``) moves its claims, its meter and the quota with it, in one save.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate

from domain.commands import Command, Render, Session
from domain.inventory import NodeInventory, claim_id_for
from domain.errors import DomainError
from domain.placement import advance, release, reserve
from domain.provenance import CommandContext
from domain.restrictions import effective_restriction, restriction_id_for
from domain.skus import NAMESPACE, current_policy, get_sku, iso, refusal
from domain.usage import meter_for_allocation, open_meter, stop_meter, usage_id_for_allocation


def quota_id_for(user_id: UUID | str) -> UUID:
    return uuid5(NAMESPACE, f"alloc-quota:{user_id}")


class UserAllocationQuota(Aggregate):
    """The live allocations of one user: what the concurrency cap counts."""

    TOPIC = "ledgercore.UserAllocationQuota"

    class Created(Aggregate.Created):
        TOPIC = "ledgercore.UserAllocationQuotaOpened"
        user_id: str

    class Admitted(Aggregate.Event):
        TOPIC = "ledgercore.AllocationAdmitted"
        allocation_id: str
        project_id: str

        def apply(self, q: UserAllocationQuota) -> None:
            q.live.append(self.allocation_id)

    class Retired(Aggregate.Event):
        TOPIC = "ledgercore.AllocationRetired"
        allocation_id: str

        def apply(self, q: UserAllocationQuota) -> None:
            q.live.remove(self.allocation_id)

    def __init__(self, user_id: str):
        self.user_id = user_id
        self.live: list[str] = []


#: statuses whose lease still holds placement and counts against the cap
LIVE_STATUSES = ("requested", "provisioning", "active", "restarting", "restart_failed",
                 "releasing", "release_failed")
#: the ``placement_status`` of each allocation status (allocations §3.2)
PLACEMENT_OF = {"requested": "reserved", "restarting": "active", "restart_failed": "active",
                "release_failed": "releasing"}


class Allocation(Aggregate):
    TOPIC = "ledgercore.Allocation"

    class Created(Aggregate.Created):
        """The lease was requested and admitted with its placement claims."""

        TOPIC = "ledgercore.AllocationRequested"
        lease: dict[str, Any]
        provenance: dict[str, Any]

    class Moved(Aggregate.Event):
        """One step of the lifecycle (allocations §3.1): ``to`` is the new status."""

        TOPIC = "ledgercore.AllocationMoved"
        to: str
        reason: str | None
        provenance: dict[str, Any]

        def apply(self, a: Allocation) -> None:
            a.status = self.to
            a.placement_status = PLACEMENT_OF.get(self.to, self.to)
            a.timestamps.setdefault(f"{self.to}_at", iso(self.timestamp))
            if self.reason:
                a.reasons[self.to] = self.reason

    def __init__(self, lease: dict[str, Any], provenance: dict[str, Any]):
        self.lease = dict(lease)
        self.status, self.placement_status = "requested", "reserved"
        self.timestamps: dict[str, str] = {}
        self.reasons: dict[str, str] = {}

    @property
    def live(self) -> bool:
        return self.status in LIVE_STATUSES


def submit_launch(ctx: CommandContext, *, user_id: UUID, tenant_id: UUID | None, project_id: UUID,
                  sku: str, unit_count: int, region_code: str | None, scheduler_type: str,
                  name: str | None, resource_class: str | None, render: Render) -> Command:
    """``submitV3ComputeLaunch``: a baremetal SKU admits ``unit_count`` single-node leases
    (all or none); a slice SKU admits one lease of ``unit_count`` GPUs."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        wanted = get_sku(session, sku, kind="invalid")
        if resource_class is not None and resource_class != wanted.spec["resource_class"]:
            raise refusal("invalid_request", "invalid",
                          f"SKU {sku!r} is {wanted.spec['resource_class']}, not {resource_class}",
                          reason="resource_class_mismatch")
        restriction = effective_restriction(session, user_id=user_id, tenant_id=tenant_id,
                                            project_ids=[project_id])
        if restriction is not None and restriction.effects.get("launch_blocked"):
            raise refusal("insufficient_balance", "conflict",
                          "new launches are blocked by a financial restriction",
                          reason=f"financial_{restriction.state}", scope_type=restriction.scope_type)
        leases = unit_count if wanted.shape == "baremetal" else 1
        gpus = unit_count if wanted.shape == "gpu_slice" else 1
        quota = session.get(quota_id_for(user_id))
        if quota is None:
            quota = UserAllocationQuota._create(UserAllocationQuota.Created, id=quota_id_for(user_id),
                                                user_id=str(user_id), timestamp=ctx.now)
        limit = current_policy(session)
        if len(quota.live) + leases > limit:
            raise refusal("allocation_concurrency_limit", "conflict",
                          f"at most {limit} concurrent allocations per user",
                          max_concurrent_allocations=limit,
                          current_concurrent_allocations=len(quota.live))
        changed: list[Any] = [quota]
        allocation_ids = []
        for index in range(leases):
            allocation_id = uuid5(NAMESPACE, f"allocation:{ctx.causation_id}:{index}")
            node = reserve(session, ctx, allocation_id=allocation_id, user_id=user_id,
                           project_id=project_id, sku=sku, count=gpus, region_code=region_code)
            claims = node.claims_of(str(allocation_id))
            lease = {"requested_by_user_id": str(user_id), "project_id": str(project_id),
                     "org_id": str(tenant_id) if tenant_id else None, "sku": sku,
                     "node_id": node.node_id, "capacity_shape": wanted.shape,
                     "gpus_total": node.identity["gpus_total"] if wanted.shape == "baremetal" else gpus,
                     "scheduler_type": scheduler_type, "name": name,
                     "claim_ids": [c["id"] for c in claims], "created_at": iso(ctx.now)}
            allocation = Allocation._create(Allocation.Created, id=allocation_id, lease=lease,
                                            provenance=ctx.provenance(), timestamp=ctx.now)
            quota.trigger_event(UserAllocationQuota.Admitted, allocation_id=str(allocation_id),
                                project_id=str(project_id), timestamp=ctx.now)
            changed += [node, allocation]
            allocation_ids.append(str(allocation_id))
        task_id = uuid5(NAMESPACE, f"launch-task:{allocation_ids[0]}")
        changed = list({aggregate.id: aggregate for aggregate in changed}.values())
        return changed, {"task_id": str(task_id), "allocation_ids": allocation_ids}

    scopes = [("user", user_id), ("project", project_id)] + ([("tenant", tenant_id)] if tenant_id else [])
    reads = (quota_id_for(user_id), *(restriction_id_for(t, i) for t, i in scopes))
    return Command(ctx, decide, render, reads=reads)


#: an allocation's status -> the status its backfilled claim starts at (allocations §3.2)
CLAIM_STATUS_OF = {"requested": "reserved", "provisioning": "provisioning", "active": "active",
                   "restarting": "active", "restart_failed": "active", "releasing": "releasing",
                   "release_failed": "releasing"}


def backfill_placement_claims(ctx: CommandContext, *, allocation_ids: list[UUID],
                              render: Render) -> Command:
    """``adminBackfillAllocationPlacementClaims``: a live baremetal lease on a node with
    no claim gets its ``node_exclusive`` claim, unless the node is gone or another live
    claim holds it (then it is skipped). A rerun finds no candidate."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        changed: dict[UUID, Any] = {}
        candidates = inserted = 0
        for allocation_id in allocation_ids:
            allocation = session.get(allocation_id)
            lease = allocation.lease
            status = CLAIM_STATUS_OF.get(allocation.status)
            if lease["capacity_shape"] != "baremetal" or not lease["node_id"] or status is None:
                continue
            node = session.get(UUID(lease["node_id"]))
            if node is not None and node.claims_of(str(allocation_id)):
                continue
            candidates += 1
            if node is None or not node.listed or node.live_claims():
                continue
            claim = {"id": claim_id_for(allocation_id, node.node_id, None),
                     "allocation_id": str(allocation_id), "node_id": node.node_id,
                     "sku": lease["sku"], "user_id": lease["requested_by_user_id"],
                     "project_id": lease["project_id"], "status": status,
                     "claim_kind": "node_exclusive", "slot_id": None,
                     "resource_snapshot": {"sku": lease["sku"], "gpus_total": lease["gpus_total"],
                                           "region_code": node.identity["region_code"],
                                           "host": node.identity["host"], "backfilled": True}}
            node.trigger_event(NodeInventory.ClaimsReserved, allocation_id=str(allocation_id),
                               claims=[claim], backfill=True, provenance=ctx.provenance(),
                               timestamp=ctx.now)
            changed[node.id] = node
            inserted += 1
        return list(changed.values()), {"candidate_count": candidates, "inserted_count": inserted,
                                        "skipped_count": candidates - inserted}

    return Command(ctx, decide, render)



# ---- the lease lifecycle (allocations §3.1) -------------------------------------------------
#: each step and the statuses it may start from
STEP_FROM = {"provisioning": ("requested",), "active": ("provisioning",),
             "failed": ("requested", "provisioning"),
             "releasing": ("requested", "provisioning", "active", "restarting",
                           "restart_failed", "release_failed"),
             "released": ("releasing",), "release_failed": ("releasing",)}
#: the status an allocation's claims are moved to by each step (release_failed keeps
#: them ``releasing``)
CLAIMS_TO = {"provisioning": "provisioning", "active": "active", "failed": "failed",
             "releasing": "releasing"}


def get_allocation(session: Session, allocation_id: UUID,
                   project_id: UUID | None = None) -> Allocation:
    """The allocation, or 404; with ``project_id``, one of another project is 404 too
    (nothing is revealed about it)."""
    allocation = session.get(allocation_id)
    if not isinstance(allocation, Allocation) or (
            project_id is not None and allocation.lease["project_id"] != str(project_id)):
        raise refusal("allocation_not_found", "not_found", "allocation not found",
                      allocation_id=str(allocation_id))
    return allocation


def _refuse_step(allocation: Allocation, to: str) -> DomainError:
    if to == "releasing" and allocation.status == "releasing":
        return refusal("allocation_already_releasing", "conflict", "the allocation is releasing")
    if to == "releasing":
        return refusal("allocation_not_active", "conflict",
                       f"the allocation is {allocation.status}", status=allocation.status)
    return refusal("invalid_request", "conflict",
                   f"an allocation cannot go from {allocation.status} to {to}",
                   reason="invalid_allocation_transition", status=allocation.status)


def move_lease(session: Session, ctx: CommandContext, *, allocation_id: UUID, to: str,
               reason: str | None = None, project_id: UUID | None = None) -> list[Any]:
    """One lifecycle step, with everything that must change with it in the same save:
    the claims follow the lease; the meter opens when the lease becomes ``active`` and
    is rated and closed when it ends (a lease never active is never billed); an ended
    lease frees its claims and leaves the concurrency quota. Repeating the step the
    lease is already at changes nothing, except a release request: a lease already
    releasing answers 409 ``allocation_already_releasing`` (allocations §3.1 guards; an
    ``Idempotency-Key`` replays the first answer instead)."""
    allocation = get_allocation(session, allocation_id, project_id)
    if allocation.status == to and to != "releasing":
        return []
    if allocation.status not in STEP_FROM[to]:
        raise _refuse_step(allocation, to)
    lease, changed = allocation.lease, [allocation]
    if to in CLAIMS_TO:
        changed.append(advance(session, ctx, node_id=lease["node_id"], allocation_id=allocation_id,
                               to=CLAIMS_TO[to], reason=reason))
    if to == "released":
        changed.append(release(session, ctx, node_id=lease["node_id"], allocation_id=allocation_id))
    record_id = usage_id_for_allocation(allocation_id)
    if to == "active":
        sku = get_sku(session, lease["sku"], kind="invalid")
        changed += open_meter(session, ctx, record_id=record_id, start_time=ctx.now,
                              meter=meter_for_allocation(allocation_id, lease, sku))
    if to in ("released", "failed"):
        changed += stop_meter(session, ctx, record_id=record_id, end_time=ctx.now)[0]
        quota = session.get(quota_id_for(lease["requested_by_user_id"]))
        if quota is not None and str(allocation_id) in quota.live:
            quota.trigger_event(UserAllocationQuota.Retired, allocation_id=str(allocation_id),
                                timestamp=ctx.now)
            changed.append(quota)
    allocation.trigger_event(Allocation.Moved, to=to, reason=reason, provenance=ctx.provenance(),
                             timestamp=ctx.now)
    return list({aggregate.id: aggregate for aggregate in changed}.values())


def lease_step(ctx: CommandContext, *, allocation_id: UUID, to: str, reason: str | None,
               render: Render, project_id: UUID | None = None) -> Command:
    """``move_lease`` as a command (release requests, node task reports)."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        changed = move_lease(session, ctx, allocation_id=allocation_id, to=to, reason=reason,
                             project_id=project_id)
        allocation = get_allocation(session, allocation_id)
        return changed, {"allocation_id": str(allocation_id), "status": allocation.status}

    return Command(ctx, decide, render)
