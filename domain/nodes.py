"""Node commands: register, observe liveness, cordon / drain / resume, retire,
reactivate, remove / detach / force-detach, and resource-slot upserts.

None of them changes a claim: cordon and drain stop new placement only, and every way
off the inventory (retire, remove, detach, force-detach) is refused while the node
holds a live claim. A drain completes when the node's last live claim ends (the
placement code appends that); without live claims it completes at once.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid4, uuid5

from domain.commands import Command, Render, Session
from domain.inventory import (DIRECTORY_ID, MAX_SLOTS, OPERATOR_SLOT_STATUSES, RETIRABLE,
                              HostRegistry, NodeDirectory, NodeInventory, host_id_for,
                              node_slot_id, slot_is_approved)
from domain.provenance import CommandContext
from domain.skus import NAMESPACE, get_sku, iso, refusal

#: slot fields an operator writes (besides slot_index, status and capacity_shape)
SLOT_FACTS = ("parent_slot_id", "sharing_model", "profile_name", "accelerator_vendor",
              "accelerator_model", "gpu_index", "gpu_uuid", "pci_address", "numa_node",
              "nvme_device", "nvme_wwn", "fabric_kind", "fabric_device", "vcpu_count", "memory_mib",
              "gpu_memory_mib", "compute_milli", "max_claims", "mac_address", "private_ip",
              "health_state", "health_detail", "capacity_metadata")


def get_node(session: Session, node_id: UUID | str) -> NodeInventory:
    node = session.get(UUID(str(node_id)))
    if not isinstance(node, NodeInventory) or not node.listed:
        raise refusal("node_not_found", "not_found", "node not found", node_id=str(node_id))
    return node


def directory(session: Session) -> NodeDirectory:
    found = session.get(DIRECTORY_ID)
    if found is None:
        found = NodeDirectory._create(NodeDirectory.Created, id=DIRECTORY_ID)
    return found


def list_in_directory(directory_: NodeDirectory, node: NodeInventory) -> bool:
    """Bring the directory's entry for ``node`` up to date; True if it changed."""
    entry = {"sku": node.identity["sku"], "region_code": node.identity["region_code"],
             "slice_skus": node.slice_skus()}
    if directory_.nodes.get(node.node_id) == entry:
        return False
    directory_.trigger_event(NodeDirectory.Listed, node_id=node.node_id, **entry)
    return True


def register_node(ctx: CommandContext, *, identity: dict[str, Any], online: bool,
                  render: Render, node_id: UUID | None = None) -> Command:
    """``adminCreateNode``. Agent enrollment is outside this service, so a ``manual``
    node is registered ready to schedule (``active``) and a ``maas`` one stays
    ``registered``. ``online`` is what the create-time probe saw."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        get_sku(session, identity["sku"], kind="invalid")
        host_id = host_id_for(identity["host"])
        host = session.get(host_id)
        if host is not None and host.node_id is not None:
            raise refusal("node_already_exists", "conflict",
                          "a node is already registered on this host; remove it first",
                          node_id=host.node_id)
        if host is None:
            host = HostRegistry._create(HostRegistry.Created, id=host_id,
                                        host=identity["host"], timestamp=ctx.now)
        new_id = node_id or uuid5(NAMESPACE, f"node:{ctx.causation_id or uuid4()}")
        admin_state = "active" if identity["onboarding_mode"] == "manual" else "registered"
        node = NodeInventory._create(NodeInventory.Created, id=new_id, identity=identity,
                                     admin_state=admin_state, online=online,
                                     provenance=ctx.provenance(), timestamp=ctx.now)
        host.trigger_event(HostRegistry.Bound, node_id=node.node_id, timestamp=ctx.now)
        listing = directory(session)
        list_in_directory(listing, node)
        return [node, host, listing], {"node": node}

    return Command(ctx, decide, render)


def observe_liveness(ctx: CommandContext, *, node_id: UUID, online: bool, source: str,
                     render: Render) -> Command:
    """``adminProbeNode``: record what a probe saw (only a change appends)."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        node = get_node(session, node_id)
        if node.online != online:
            node.trigger_event(NodeInventory.LivenessObserved, online=online, source=source,
                               timestamp=ctx.now)
        return [node], {"node": node}

    return Command(ctx, decide, render)


def cordon(ctx: CommandContext, *, node_id: UUID, render: Render) -> Command:
    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        node = get_node(session, node_id)
        previous = node.status
        if node.admin_state != "cordoned":
            node.guard_state(("active",), "cordon")
            node.trigger_event(NodeInventory.Cordoned, previous_status=previous,
                               provenance=ctx.provenance(), timestamp=ctx.now)
        return [node], {"node": node, "operation": "cordon", "previous_status": previous}

    return Command(ctx, decide, render)


def resume_scheduling(ctx: CommandContext, *, node_id: UUID, render: Render) -> Command:
    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        node = get_node(session, node_id)
        previous = node.status
        if node.admin_state != "active":
            node.guard_state(("cordoned",), "resume scheduling on")
            node.trigger_event(NodeInventory.SchedulingResumed, previous_status=previous,
                               provenance=ctx.provenance(), timestamp=ctx.now)
        return [node], {"node": node, "operation": "resume_scheduling", "previous_status": previous}

    return Command(ctx, decide, render)


def drain(ctx: CommandContext, *, node_id: UUID, render: Render) -> Command:
    """Cordon and wait for the live claims to end; a repeat answers the open task."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        node = get_node(session, node_id)
        previous = node.status
        if node.admin_state == "draining":
            return [node], {"node": node, "operation": "drain", "previous_status": previous,
                            "task_id": node.drain_task_id, "recovery_action": "task_in_progress"}
        node.guard_state(("active", "cordoned"), "drain")
        task_id = str(uuid5(NAMESPACE, f"drain:{node.node_id}:{node.version}"))
        node.trigger_event(NodeInventory.DrainStarted, task_id=task_id, previous_status=previous,
                           provenance=ctx.provenance(), timestamp=ctx.now)
        if not node.live_claims():
            node.trigger_event(NodeInventory.DrainCompleted, task_id=task_id, timestamp=ctx.now)
        return [node], {"node": node, "operation": "drain", "previous_status": previous,
                        "task_id": task_id, "recovery_action": None}

    return Command(ctx, decide, render)


def retire(ctx: CommandContext, *, node_id: UUID, render: Render) -> Command:
    """``adminDeleteNode`` / ``retireV3PlatformNode``: reversible."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        node = get_node(session, node_id)
        node.guard_no_live_claims("retire")
        if node.admin_state not in RETIRABLE:
            node.guard_state(("active", "cordoned", "draining", "offline"), "retire")
        node.trigger_event(NodeInventory.Retired, previous_status=node.status,
                           provenance=ctx.provenance(), timestamp=ctx.now)
        return [node], {"node": node}

    return Command(ctx, decide, render)


def reactivate(ctx: CommandContext, *, node_id: UUID, render: Render) -> Command:
    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        node = get_node(session, node_id)
        node.guard_state(("retired",), "reactivate")
        node.trigger_event(NodeInventory.Reactivated, provenance=ctx.provenance(),
                           timestamp=ctx.now)
        return [node], {"node": node}

    return Command(ctx, decide, render)


#: how -> (the action's name, the statuses it starts from)
TOMBSTONE_FROM = {"removed": ("remove", ("retired",)), "detached": ("detach", ("retired",)),
                  "force_detached": ("force-detach", ("draining", "removing", "retired"))}


def tombstone(ctx: CommandContext, *, node_id: UUID, how: str, render: Render) -> Command:
    """``adminRemoveNode`` / ``adminDetachNode`` / ``adminForceDetachNode``: the node
    leaves the inventory for good and its host is free for a new registration."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        node = get_node(session, node_id)
        action, allowed = TOMBSTONE_FROM[how]
        node.guard_no_live_claims(action)
        node.guard_state(allowed, action)
        previous = node.status
        node.trigger_event(NodeInventory.Tombstoned, how=how, previous_status=previous,
                           provenance=ctx.provenance(), timestamp=ctx.now)
        host = session.get(host_id_for(node.identity["host"]))
        changed: list[Any] = [node]
        if host is not None and host.node_id == node.node_id:
            host.trigger_event(HostRegistry.Unbound, node_id=node.node_id, timestamp=ctx.now)
            changed.append(host)
        listing = directory(session)
        if node.node_id in listing.nodes:
            listing.trigger_event(NodeDirectory.Unlisted, node_id=node.node_id, timestamp=ctx.now)
            changed.append(listing)
        return changed, {"node": node}

    return Command(ctx, decide, render)


def _facts(slot: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in slot.items() if k not in ("created_at", "updated_at")}


def _invalid_slots(message: str, reason: str, **details: Any) -> Exception:
    return refusal("invalid_request", "invalid", message, reason=reason, **details)


def upsert_slots(ctx: CommandContext, *, node_id: UUID, slots: list[dict[str, Any]],
                 render: Render) -> Command:
    """``adminUpsertNodeResourceSlots``: keyed by ``slot_index``; omitted slots stay."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        node = get_node(session, node_id)
        indexes = [s["slot_index"] for s in slots]
        duplicated = sorted({i for i in indexes if indexes.count(i) > 1})
        if duplicated:
            raise _invalid_slots("slot_index appears more than once", "duplicate_slot_index",
                                 slot_indexes=duplicated)
        claimed = {c["slot_id"] for c in node.live_claims() if c["slot_id"]}
        at = iso(ctx.now)
        written = []
        for given in slots:
            slot_id = node_slot_id(node.node_id, given["slot_index"])
            before = node.slots.get(slot_id)
            if slot_id in claimed:
                raise _invalid_slots("the slot has a live placement claim", "slot_has_live_claim",
                                     slot_index=given["slot_index"])
            if given["status"] not in OPERATOR_SLOT_STATUSES:
                raise _invalid_slots(f"status {given['status']!r} is set by placement, not by hand",
                                     "slot_status_system_owned", slot_index=given["slot_index"])
            if (given.get("max_claims") or 1) > 1:
                raise _invalid_slots("slots are single-claim (max_claims 1)", "slot_sharing_refused",
                                     slot_index=given["slot_index"])
            parent = given.get("parent_slot_id")
            if parent is not None and str(parent) not in node.slots and parent not in (
                    node_slot_id(node.node_id, s["slot_index"]) for s in slots):
                raise _invalid_slots("parent_slot_id is not a slot of this node",
                                     "unknown_parent_slot", slot_index=given["slot_index"])
            slot = {"id": slot_id, "node_id": node.node_id, "slot_index": given["slot_index"],
                    "status": given["status"], "capacity_shape": given["capacity_shape"],
                    **{k: given.get(k) for k in SLOT_FACTS},
                    "created_at": before["created_at"] if before else at, "updated_at": at}
            slot["parent_slot_id"] = str(parent) if parent is not None else None
            slot["health_detail"] = slot["health_detail"] or {}
            slot["capacity_metadata"] = slot["capacity_metadata"] or {}
            if (slot["status"] == "available" and slot["capacity_shape"] == "gpu_slice"
                    and not slot_is_approved(slot)):
                raise _invalid_slots(
                    "a slice slot may be available only with approved capacity_metadata"
                    " (storage_ownership=slice, destructive_wipe_policy,"
                    " fabric_claim_mode=per_slot_vf, fabric_vf_pci_address)",
                    "slot_not_approved", slot_index=given["slot_index"])
            if before is None or _facts(before) != _facts(slot):
                written.append(slot)
        if len(set(node.slots) | {s["id"] for s in written}) > MAX_SLOTS:
            raise _invalid_slots(f"a node holds at most {MAX_SLOTS} slots", "too_many_slots")
        changed: list[Any] = [node]
        if written:
            node.trigger_event(NodeInventory.SlotsUpserted, slots=written,
                               provenance=ctx.provenance(), timestamp=ctx.now)
            listing = directory(session)
            if list_in_directory(listing, node):
                changed.append(listing)
        return changed, {"node": node}

    return Command(ctx, decide, render)
