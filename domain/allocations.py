"""Allocations: admission of GPU leases (the create path).

Admission decides, in one save: the caller's financial posture allows a launch, the
per-user concurrency cap has headroom (``UserAllocationQuota`` serialises one user's
admissions), and placement claims are reserved on a node (``domain.placement``). The
new ``Allocation`` starts ``requested`` with ``placement_status=reserved``; the rest of
its lifecycle builds on this.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate

from domain.commands import Command, Render, Session
from domain.inventory import NodeInventory, claim_id_for
from domain.placement import reserve
from domain.provenance import CommandContext
from domain.restrictions import effective_restriction, restriction_id_for
from domain.skus import NAMESPACE, current_policy, get_sku, iso, refusal


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


class Allocation(Aggregate):
    TOPIC = "ledgercore.Allocation"

    class Created(Aggregate.Created):
        """The lease was requested and admitted with its placement claims."""

        TOPIC = "ledgercore.AllocationRequested"
        lease: dict[str, Any]
        provenance: dict[str, Any]

    def __init__(self, lease: dict[str, Any], provenance: dict[str, Any]):
        self.lease = dict(lease)
        self.status, self.placement_status = "requested", "reserved"


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
