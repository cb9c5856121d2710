"""Placement claims: the domain API allocation and app-instance commands call.

``reserve`` / ``advance`` / ``release`` / ``fail`` / ``move`` / ``record_slot_cleanup``
change ``NodeInventory`` aggregates inside the caller's ``Session``, so a claim is
saved in the same transaction as the lease event that needs it. Every decision is
made on loaded aggregates; the save's version check makes a decision taken from a
state another writer has since changed fail as a whole (and be decided again), so no
slot or node is ever held by two live claims.

Candidates come from the ``NodeDirectory`` aggregate: for slices the fullest node first
(whole nodes stay free for baremetal), for baremetal nodes without slice history first,
in random order among equals (see ``_candidates``).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from itertools import groupby
from typing import Any
from uuid import UUID

from domain.commands import Session
from domain.inventory import (CLAIM_EDGES, LIVE, TERMINAL, NodeInventory, claim_id_for,
                              slot_is_approved, slot_sku)
from domain.nodes import directory, get_node
from domain.provenance import CommandContext
from domain.skus import Sku, get_sku, refusal


def _shape_and_count(sku: Sku, count: int) -> tuple[str, int]:
    shape = sku.shape
    if shape is None:
        raise refusal("invalid_request", "invalid",
                      f"SKU {sku.sku!r} ({sku.spec['resource_class']}) is not placed on nodes",
                      reason="sku_not_placeable")
    if shape == "baremetal":
        return shape, 1
    allowed = sku.spec["resources"].get("allowed_accelerator_counts") or []
    if count not in allowed:
        raise refusal("invalid_request", "invalid",
                      f"gpu_count must be one of {allowed} for SKU {sku.sku!r}",
                      reason="gpu_count_not_allowed", allowed=allowed)
    return shape, count


def _slice_pick(node: NodeInventory, sku: Sku, k: int,
                allocation_id: str) -> list[dict[str, Any]] | None:
    """k free slots of ``sku`` on ``node`` inside one topology group, or None. A slot the
    allocation held before is not free for it: the ended claim keeps the claim id."""
    free = [s for s in node.free_slice_slots(sku.sku)
            if claim_id_for(allocation_id, node.node_id, s["id"]) not in node.claims]
    key = (sku.spec.get("resource_profile") or {}).get("topology_group_key")
    if key is None:
        return free[:k] if len(free) >= k else None
    ordered = sorted(free, key=lambda s: (str(s.get(key)), s["slot_index"]))
    for _, group in groupby(ordered, key=lambda s: str(s.get(key))):
        members = list(group)
        if len(members) >= k:
            return members[:k]
    return None


def _claims_for(node: NodeInventory, sku: Sku, shape: str, k: int, *, allocation_id: str,
                user_id: str, project_id: str) -> list[dict[str, Any]] | None:
    """The claims ``node`` can take now, or None (every guard on loaded state)."""
    if not node.listed or not node.schedulable_status or not sku.active:
        return None
    base = {"allocation_id": allocation_id, "node_id": node.node_id, "sku": sku.sku,
            "user_id": user_id, "project_id": project_id, "status": "reserved"}
    if shape == "baremetal":
        # a node the allocation held before: its ended claim keeps the claim id (§5.1)
        if (node.identity["sku"] != sku.sku or not node.baremetal_free()
                or claim_id_for(allocation_id, node.node_id, None) in node.claims):
            return None
        snapshot = {"sku": sku.sku, "gpus_total": node.identity["gpus_total"],
                    "region_code": node.identity["region_code"], "host": node.identity["host"]}
        return [{**base, "id": claim_id_for(allocation_id, node.node_id, None),
                 "claim_kind": "node_exclusive", "slot_id": None, "resource_snapshot": snapshot}]
    picked = _slice_pick(node, sku, k, allocation_id)
    if picked is None:
        return None
    return [{**base, "id": claim_id_for(allocation_id, node.node_id, slot["id"]),
             "claim_kind": "slot", "slot_id": slot["id"],
             "resource_snapshot": {"sku": sku.sku, "slot_index": slot["slot_index"],
                                   "gpu_index": slot.get("gpu_index"),
                                   "gpu_uuid": slot.get("gpu_uuid"),
                                   "numa_node": slot.get("numa_node"),
                                   "region_code": node.identity["region_code"]}}
            for slot in picked]


def _candidates(session: Session, sku: Sku, shape: str, region_code: str | None,
                exclude: str | None) -> Iterator[NodeInventory]:
    """Schedulable nodes that may serve ``sku``, best first, loaded as they are tried.

    Slices: the fullest node first (whole nodes stay free for baremetal). Baremetal:
    nodes without slice history first; among equals a random order, so that writers
    racing for the same SKU mostly pick different nodes instead of all colliding on
    the first free one (correctness never depends on the order: the guard does)."""
    ids = [i for i in directory(session).serving(sku.sku, shape, region_code) if i != exclude]
    if shape == "gpu_slice":
        nodes = [n for n in (session.get(UUID(i)) for i in ids)
                 if isinstance(n, NodeInventory) and n.schedulable_status]
        yield from sorted(nodes, key=lambda n: (-len(n.live_claims()), n.node_id))
        return
    random.shuffle(ids)
    deferred = []
    for node_id in ids:
        node = session.get(UUID(node_id))
        if not isinstance(node, NodeInventory) or not node.schedulable_status:
            continue
        if node.has_slice_history:
            deferred.append(node)
        else:
            yield node
    yield from deferred


def reserve(session: Session, ctx: CommandContext, *, allocation_id: UUID, user_id: UUID,
            project_id: UUID, sku: str, count: int = 1, region_code: str | None = None,
            node_id: UUID | None = None, exclude_node: str | None = None) -> NodeInventory:
    """Claim capacity for one allocation: one ``node_exclusive`` claim for a baremetal
    SKU, ``count`` slot claims on one node for a slice SKU. Returns the node claimed on.

    Refusals: 400 for an unknown SKU or a count the SKU does not allow; 409
    ``sku_unavailable`` when nothing is free (``node_offline`` / ``node_in_use`` for a
    pinned node)."""
    wanted = get_sku(session, sku, kind="invalid")
    shape, k = _shape_and_count(wanted, count)
    if not wanted.active:
        raise refusal("sku_unavailable", "conflict", f"SKU {sku!r} is not active", sku=sku)
    ids = {"allocation_id": str(allocation_id), "user_id": str(user_id),
           "project_id": str(project_id)}
    if node_id is not None:
        node = get_node(session, node_id)
        claims = _claims_for(node, wanted, shape, k, **ids)
        if claims is None:
            if not node.schedulable_status:
                raise refusal("node_offline", "conflict", f"node is {node.status}",
                              node_id=node.node_id, status=node.status)
            raise refusal("node_in_use", "conflict", "the node has no free capacity for this SKU",
                          node_id=node.node_id, sku=sku)
    else:
        for node in _candidates(session, wanted, shape, region_code, exclude_node):
            claims = _claims_for(node, wanted, shape, k, **ids)
            if claims is not None:
                break
        else:
            raise refusal("sku_unavailable", "conflict", f"no free capacity for SKU {sku!r}",
                          sku=sku, region_code=region_code, requested_units=k)
    node.trigger_event(NodeInventory.ClaimsReserved, allocation_id=str(allocation_id),
                       claims=claims, backfill=False, provenance=ctx.provenance(),
                       timestamp=ctx.now)
    return node


def advance(session: Session, ctx: CommandContext, *, node_id: UUID | str, allocation_id: UUID,
            to: str, reason: str | None = None) -> NodeInventory:
    """Move an allocation's claims on a node to ``to`` along the claim state machine.
    Claims already there are left alone (a repeat is a no-op); terminal claims never
    move again, nor keep the live ones from moving (an allocation placed on the node
    again beside its ended claims). When a draining node's last live claim ends, its
    drain completes."""
    node = get_node(session, node_id)
    mine = node.claims_of(str(allocation_id))
    live = [c for c in mine if c["status"] not in TERMINAL]
    claims = [c for c in (live or mine) if c["status"] != to]
    stuck = [c for c in claims if to not in CLAIM_EDGES.get(c["status"], ())]
    if stuck:
        raise refusal("invalid_request", "conflict",
                      f"claims cannot move from {stuck[0]['status']} to {to}",
                      reason="invalid_claim_transition", allocation_id=str(allocation_id))
    if claims:
        node.trigger_event(NodeInventory.ClaimsMoved, allocation_id=str(allocation_id),
                           claim_ids=[c["id"] for c in claims], to=to, reason=reason,
                           provenance=ctx.provenance(), timestamp=ctx.now)
    if (to in TERMINAL and node.admin_state == "draining" and node.drain_task_id
            and not node.live_claims()):
        node.trigger_event(NodeInventory.DrainCompleted, task_id=node.drain_task_id,
                           timestamp=ctx.now)
    return node


def release(session: Session, ctx: CommandContext, *, node_id: UUID | str,
            allocation_id: UUID) -> NodeInventory:
    """End an allocation's live claims: through ``releasing`` to ``released``. The
    slots go to ``cleanup`` until their wipe is recorded."""
    node = get_node(session, node_id)
    if any(c["status"] in ("reserved", "provisioning", "active")
           for c in node.claims_of(str(allocation_id))):
        advance(session, ctx, node_id=node_id, allocation_id=allocation_id, to="releasing")
    live = [c for c in node.claims_of(str(allocation_id)) if c["status"] in LIVE]
    if live:
        advance(session, ctx, node_id=node_id, allocation_id=allocation_id, to="released")
    return node


def fail(session: Session, ctx: CommandContext, *, node_id: UUID | str, allocation_id: UUID,
         reason: str) -> NodeInventory:
    """Provisioning failed: ``reserved|provisioning`` claims become ``failed``."""
    return advance(session, ctx, node_id=node_id, allocation_id=allocation_id, to="failed",
                   reason=reason)


def move(session: Session, ctx: CommandContext, *, allocation_id: UUID, from_node: UUID | str,
         user_id: UUID, project_id: UUID, sku: str, count: int = 1,
         to_node: UUID | None = None) -> NodeInventory:
    """Re-place an allocation: claim on another node (``to_node`` or the best other
    candidate), then release the old claims, in one save."""
    target = reserve(session, ctx, allocation_id=allocation_id, user_id=user_id,
                     project_id=project_id, sku=sku, count=count, node_id=to_node,
                     exclude_node=str(from_node))
    if target.node_id == str(from_node):
        raise refusal("invalid_request", "invalid", "an allocation cannot move onto its own node",
                      reason="same_node")
    release(session, ctx, node_id=from_node, allocation_id=allocation_id)
    return target


def record_slot_cleanup(session: Session, ctx: CommandContext, *, node_id: UUID | str,
                        slot_id: str, succeeded: bool) -> NodeInventory:
    """A slot wipe finished: ``cleanup`` → ``available`` (``disabled`` for a slice slot
    without approved metadata), or ``cleanup_blocked`` when the wipe failed."""
    node = get_node(session, node_id)
    slot = node.slots.get(slot_id)
    if slot is None or slot["status"] != "cleanup":
        raise refusal("invalid_request", "conflict", "the slot is not in cleanup",
                      reason="slot_not_in_cleanup", slot_id=slot_id)
    # only an approved slice slot may become available (§3.4 [C]); an unapproved one
    # that an operator put into cleanup comes out disabled
    approved = slot["capacity_shape"] != "gpu_slice" or slot_is_approved(slot)
    outcome = ("available" if approved else "disabled") if succeeded else "cleanup_blocked"
    node.trigger_event(NodeInventory.SlotCleanupRecorded, slot_id=slot_id, outcome=outcome,
                       provenance=ctx.provenance(), timestamp=ctx.now)
    return node


def live_claims_for_sku(session: Session, sku: str) -> bool:
    """Whether any listed node holds a live claim for ``sku`` (decided on aggregates)."""
    for node_id in directory(session).nodes:
        node = session.get(UUID(node_id))
        if node is not None and any(c["sku"] == sku for c in node.live_claims()):
            return True
    return False


__all__ = ["reserve", "advance", "release", "fail", "move", "record_slot_cleanup",
           "live_claims_for_sku", "slot_sku"]
