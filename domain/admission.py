"""Admission of GPU leases: ``createAllocation`` and ``submitV3ComputeLaunch``.

Everything is decided in one save (allocations §6.3 step 1): the caller's financial
posture and balance allow a launch, the per-user concurrency cap has headroom
(``UserAllocationQuota`` serialises one user's admissions), and placement claims are
reserved on a node (``domain.placement``). Each new ``Allocation`` starts ``requested``
with its claims ``reserved`` and its provision node task issued.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid5

from domain.allocation_views import allocation_of
from domain.allocations import (Allocation, UserAllocationQuota, quota_id_for,
                                v3_task_id_for)
from domain.billing import account_id_for
from domain.commands import Command, Render, Session
from domain.errors import DomainError
from domain.inventory import NodeInventory, claim_id_for
from domain.nodes import get_node
from domain.placement import reserve
from domain.provenance import CommandContext
from domain.restrictions import effective_restriction, restriction_id_for
from domain.skus import NAMESPACE, Sku, current_policy, get_sku, iso, refusal
from domain.usage import units_for

#: the request fields a lease keeps as it was asked for (shown in V3 ``effective_config``)
REQUEST_FIELDS = ("name", "resource_class", "scheduler_type", "scheduler_request", "region_code",
                  "os_image_slug", "storage_bucket_ids", "network_policy_id", "ssh_key_ids",
                  "runtime_bundle_id", "runtime_bundle_slug")


def personal_org_id(user_id: UUID | str) -> UUID:
    """The org of a caller whose token names no tenant (``Allocation.org_id`` is required)."""
    return uuid5(NAMESPACE, f"personal-org:{user_id}")


def hourly_rate(sku: Sku, gpus_total: int) -> dict[str, Any]:
    """allocations §4: the SKU's unit price times the billed quantity, per hour."""
    price = sku.unit_price
    return {"amount_minor": price.amount_minor * units_for(sku, gpus_total),
            "currency": price.currency}


def financial_gate(session: Session, *, user_id: UUID, tenant_id: UUID | None,
                    project_id: UUID) -> None:
    """409 ``insufficient_balance`` when a restriction blocks launches or the caller's
    balance (in the account's primary currency) is not above zero (allocations §4)."""
    restriction = effective_restriction(session, user_id=user_id, tenant_id=tenant_id,
                                        project_ids=[project_id])
    if restriction is not None and restriction.effects.get("launch_blocked"):
        raise refusal("insufficient_balance", "conflict",
                      "new launches are blocked by a financial restriction",
                      reason=f"financial_{restriction.state}", scope_type=restriction.scope_type)
    account = session.get(account_id_for(user_id))
    currency = account.primary_currency if account is not None else session.default_currency
    balance = account.balance(currency) if account is not None else 0
    if balance <= 0:
        raise refusal("insufficient_balance", "conflict",
                      "the balance must be above zero to launch", reason="balance_not_positive",
                      balance={"amount_minor": balance, "currency": currency})


def _quota(session: Session, ctx: CommandContext, user_id: UUID) -> UserAllocationQuota:
    quota = session.get(quota_id_for(user_id))
    if quota is None:
        quota = UserAllocationQuota._create(UserAllocationQuota.Created, id=quota_id_for(user_id),
                                            user_id=str(user_id), timestamp=ctx.now)
        session.loaded[quota.id] = quota
    return quota


def _admit_one(session: Session, ctx: CommandContext, quota: UserAllocationQuota, *,
               allocation_id: UUID, sku: Sku, gpus: int, node_id: UUID | None,
               base: dict[str, Any]) -> list[Any]:
    user_id, project_id = UUID(base["requested_by_user_id"]), UUID(base["project_id"])
    node = reserve(session, ctx, allocation_id=allocation_id, user_id=user_id,
                   project_id=project_id, sku=sku.sku, count=gpus, node_id=node_id,
                   region_code=base.get("region_code"))
    claims = node.claims_of(str(allocation_id))
    gpus_total = node.identity["gpus_total"] if sku.shape == "baremetal" else len(claims)
    identity = node.identity
    lease = {**base, "sku": sku.sku, "capacity_shape": sku.shape, "gpus_total": gpus_total,
             "node_id": node.node_id, "node_hostname": identity.get("hostname"),
             "host": identity["host"], "node_region_code": identity["region_code"],
             "claim_ids": [c["id"] for c in claims], "hourly_rate": hourly_rate(sku, gpus_total),
             "launch_task_id": str(v3_task_id_for("launch", allocation_id, 0)),
             "created_at": iso(ctx.now)}
    allocation = Allocation._create(Allocation.Created, id=allocation_id, lease=lease,
                                    provenance=ctx.provenance(), timestamp=ctx.now)
    allocation.issue_task("provision", ctx.now, ctx.correlation_id)
    quota.trigger_event(UserAllocationQuota.Admitted, allocation_id=str(allocation_id),
                        project_id=str(project_id), timestamp=ctx.now)
    return [node, allocation]


def admit(session: Session, ctx: CommandContext, *, user_id: UUID, tenant_id: UUID | None,
          project_id: UUID, sku: Sku, leases: int, gpus: int, node_id: UUID | None,
          all_or_none: bool, request: dict[str, Any], source: str
          ) -> tuple[list[Any], list[dict[str, Any]]]:
    """Admit up to ``leases`` leases of ``sku``: all of them, or (``all_or_none=False``)
    as many as the cap and the capacity allow, at least one. Returns what changed and
    the new allocations' ``Allocation`` JSON; refuses (and changes nothing) when none can be admitted."""
    financial_gate(session, user_id=user_id, tenant_id=tenant_id, project_id=project_id)
    quota = _quota(session, ctx, user_id)
    limit = current_policy(session)
    headroom = limit - len(quota.live)
    if headroom < (leases if all_or_none else 1):
        raise refusal("allocation_concurrency_limit", "conflict",
                      f"at most {limit} concurrent allocations per user",
                      max_concurrent_allocations=limit,
                      current_concurrent_allocations=len(quota.live))
    base = {"requested_by_user_id": str(user_id), "project_id": str(project_id),
            "org_id": str(tenant_id or personal_org_id(user_id)), "source": source,
            "batch_id": str(ctx.causation_id), **{k: request.get(k) for k in REQUEST_FIELDS}}
    changed: dict[UUID, Any] = {quota.id: quota}
    admitted: list[dict[str, Any]] = []
    first_error: DomainError | None = None
    for index in range(min(leases, headroom)):
        allocation_id = uuid5(NAMESPACE, f"allocation:{ctx.causation_id}:{index}")
        try:
            node, allocation = _admit_one(session, ctx, quota, allocation_id=allocation_id,
                                          sku=sku, gpus=gpus, node_id=node_id,
                                          base={**base, "batch_index": index})
        except DomainError as error:
            if all_or_none:
                raise
            first_error = first_error or error
            continue
        changed.update({node.id: node, allocation.id: allocation})
        admitted.append(allocation_of(allocation, node))
    if not admitted:
        assert first_error is not None
        raise first_error
    return list(changed.values()), admitted


def submit_launch(ctx: CommandContext, *, user_id: UUID, tenant_id: UUID | None, project_id: UUID,
                  sku: str, unit_count: int, request: dict[str, Any], render: Render) -> Command:
    """``submitV3ComputeLaunch``: a baremetal SKU admits ``unit_count`` single-node leases
    (all or none); a slice SKU admits one lease of ``unit_count`` GPUs."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        wanted = get_sku(session, sku, kind="invalid")
        resource_class = request.get("resource_class")
        if resource_class is not None and resource_class != wanted.spec["resource_class"]:
            raise refusal("invalid_request", "invalid",
                          f"SKU {sku!r} is {wanted.spec['resource_class']}, not {resource_class}",
                          reason="resource_class_mismatch")
        baremetal = wanted.shape == "baremetal"
        changed, admitted = admit(
            session, ctx, user_id=user_id, tenant_id=tenant_id, project_id=project_id,
            sku=wanted, leases=unit_count if baremetal else 1,
            gpus=1 if baremetal else unit_count, node_id=None, all_or_none=True,
            request={**request, "resource_class": wanted.spec["resource_class"]},
            source="v3_launch")
        task_id = v3_task_id_for("launch", admitted[0]["id"], 0)
        return changed, {"allocations": admitted, "task_id": str(task_id)}

    return Command(ctx, decide, render, reads=_reads(user_id, tenant_id, project_id))


def create_allocations(ctx: CommandContext, *, user_id: UUID, tenant_id: UUID | None,
                       project_id: UUID, requested_count: int, node_id: UUID | None,
                       capacity_shape: str | None, gpu_count: int | None,
                       request: dict[str, Any], render: Render) -> Command:
    """``createAllocation``: 1–20 independent single-node leases. The SKU is the pinned
    node's, else ``scheduler_request.sku`` (docs/decisions.md). As many are admitted as
    the cap and capacity allow (``created_count``/``failed_count``); none → the refusal."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        if node_id is not None:
            try:
                node: NodeInventory = get_node(session, node_id)
            except DomainError as error:
                error.kind = "invalid"  # createAllocation declares no 404 (allocations §7)
                raise
            sku_name = node.identity["sku"]
        else:
            sku_name = (request.get("scheduler_request") or {}).get("sku")
            if not isinstance(sku_name, str) or not sku_name:
                raise refusal("invalid_request", "invalid",
                              "name the SKU in scheduler_request.sku, or pin a node_id",
                              reason="sku_required", field="scheduler_request.sku")
        wanted = get_sku(session, sku_name, kind="invalid")
        if capacity_shape is not None and wanted.shape is not None and capacity_shape != wanted.shape:
            raise refusal("invalid_request", "invalid",
                          f"SKU {sku_name!r} is {wanted.shape}, not {capacity_shape}",
                          reason="capacity_shape_mismatch", field="capacity_shape")
        if wanted.shape == "gpu_slice" and gpu_count is None:
            raise refusal("invalid_request", "invalid", "gpu_count is required for a slice SKU",
                          reason="gpu_count_required", field="gpu_count")
        changed, admitted = admit(
            session, ctx, user_id=user_id, tenant_id=tenant_id, project_id=project_id,
            sku=wanted, leases=requested_count, gpus=gpu_count or 1, node_id=node_id,
            all_or_none=False, request={**request, "resource_class": wanted.spec["resource_class"]},
            source="api")
        return changed, {"allocations": admitted, "requested_count": requested_count}

    return Command(ctx, decide, render, reads=_reads(user_id, tenant_id, project_id))


def _reads(user_id: UUID, tenant_id: UUID | None, project_id: UUID) -> tuple[UUID, ...]:
    scopes = [("user", user_id), ("project", project_id)] + ([("tenant", tenant_id)] if tenant_id else [])
    return (quota_id_for(user_id), account_id_for(user_id),
            *(restriction_id_for(t, i) for t, i in scopes))


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
