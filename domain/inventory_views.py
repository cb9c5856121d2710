"""The contract's JSON for a node, its slots and its claims, derived from a
``NodeInventory``'s state. Command responses and read models both use these, so a
node looks the same whether it was just written or read back.
"""

from __future__ import annotations

from typing import Any

from domain.inventory import LIVE, SLOT_STATUSES, NodeInventory, slot_is_approved, slot_sku


def slot_json(slot: dict[str, Any]) -> dict[str, Any]:
    """The contract's ``NodeResourceSlot``."""
    return dict(slot)


def _counters(slots: list[dict[str, Any]]) -> dict[str, int]:
    counts = {status: 0 for status in SLOT_STATUSES}
    for slot in slots:
        counts[slot["status"]] += 1
    return {"total": len(slots), **counts}


def free_units(node: NodeInventory) -> int:
    """Units a new claim could take now: the whole node (baremetal) counts 1 when it is
    free; otherwise every approved available slice slot."""
    if not node.schedulable_status:
        return 0
    if node.baremetal_free() and not node.has_slice_history:
        return 1
    return len([s for s in node.slots.values() if s["status"] == "available"
                and s["capacity_shape"] == "gpu_slice" and slot_is_approved(s)
                and not node.has_exclusive_claim])


def slot_summary(node: NodeInventory) -> dict[str, Any] | None:
    """The contract's ``NodeSlotSummary`` (None for a node without slots)."""
    slots = list(node.slots.values())
    if not slots:
        return None
    summary = _counters(slots)
    schedulable = 0 if node.has_exclusive_claim or not node.schedulable_status else len(
        [s for s in slots if s["status"] == "available" and (
            s["capacity_shape"] != "gpu_slice" or slot_is_approved(s))])
    summary["schedulable_available"] = min(schedulable, summary["available"])
    by_sku: dict[str, list[dict[str, Any]]] = {}
    for slot in slots:
        by_sku.setdefault(slot_sku(slot) or node.identity["sku"], []).append(slot)
    summary["by_sku"] = [{"sku": sku, **_counters(group)} for sku, group in sorted(by_sku.items())]
    return summary


def readiness(node: NodeInventory) -> dict[str, Any]:
    """The contract's ``NodeInventoryReadiness`` (inventory-and-placement §3.2)."""
    status = node.status

    def ready(state: str, reason: str, severity: str, summary: str,
              schedulable: bool = False) -> dict[str, Any]:
        return {"state": state, "schedulable": schedulable, "severity": severity,
                "reason_code": reason, "summary": summary}

    if status in ("retired", "removing", "removed"):
        return ready("decommissioned", "decommissioned_node", "info", "The node is retired.")
    if status in ("registered", "bootstrap_issued", "enrolling"):
        return ready(status, "node_not_schedulable", "info", "The node is not enrolled yet.")
    if status in ("cordoned", "draining"):
        return ready(status, "node_not_schedulable", "warn", f"The node is {status}.")
    if status == "offline":
        return ready("agent_unreachable", "node_agent_unreachable", "error",
                     "The node did not answer its last probe.")
    if status == "quarantined":
        return ready("unavailable", "node_unavailable", "blocker", "The node is quarantined.")
    if status == "active":
        if free_units(node) == 0:
            return ready("capacity_exhausted", "no_schedulable_gpu_capacity", "info",
                         "Every unit of the node is claimed or unavailable.")
        return ready("ready", "ready", "ok", "The node can take new work.", schedulable=True)
    return ready("unknown", "runtime_readiness_unknown", "warn", "Readiness is unknown.")


def schedulability(node: NodeInventory) -> dict[str, Any]:
    """The contract's ``V3PlatformNodeSchedulability``."""
    status = node.status
    state = {"active": "schedulable", "cordoned": "cordoned", "draining": "draining",
             "offline": "offline", "retired": "retired", "removing": "retired"}.get(status, "blocked")
    can_cordon, can_drain = status == "active", status in ("active", "cordoned")
    can_resume = status == "cordoned"
    next_action = ("cordon" if can_cordon else "resume_scheduling" if can_resume
                   else "none")
    return {"state": state, "can_cordon": can_cordon, "can_drain": can_drain,
            "can_resume_scheduling": can_resume, "next_safe_action": next_action,
            "disabled_reason": None if (can_cordon or can_drain) else f"node is {status}"}


def occupancy(node: NodeInventory) -> tuple[str, dict[str, Any] | None]:
    """``occupancy_status`` and the baremetal holder (``NodeOccupancy``), if any."""
    live = node.live_claims()
    exclusive = [c for c in live if c["claim_kind"] == "node_exclusive"]
    if exclusive:
        claim = exclusive[0]
        status = {"reserved": "reserved", "provisioning": "assigned", "active": "assigned",
                  "releasing": "releasing"}[claim["status"]]
        holder = {"allocation_id": claim["allocation_id"], "user_id": claim["user_id"],
                  "username_on_node": "gpuaas-" + claim["allocation_id"][:8],
                  "status": "releasing" if claim["status"] == "releasing" else "active"}
        return status, holder
    if live:
        return "assigned", None
    if any(s["status"] in ("cleanup", "cleanup_blocked") for s in node.slots.values()):
        return "cleanup", None
    return ("available" if node.status in ("active", "cordoned") else "unavailable"), None


def node_admin_json(node: NodeInventory) -> dict[str, Any]:
    """The contract's ``NodeAdmin``."""
    identity = node.identity
    occupancy_status, holder = occupancy(node)
    return {"id": node.node_id, "resource_name": f"node/{node.node_id}", "sku": identity["sku"],
            "gpus_total": identity["gpus_total"], "status": node.status,
            "occupancy_status": occupancy_status, "in_use": bool(node.live_claims()),
            "slot_summary": slot_summary(node), "region_code": identity["region_code"],
            "onboarding_mode": identity["onboarding_mode"], "host": identity["host"],
            "hostname": identity.get("hostname"), "port": identity["port"],
            "ssh_username": identity["ssh_username"], "agent_version": None,
            "agent_commit": None, "agent_built_at": None, "agent_reported_at": None,
            "agent_lifecycle": None, "current_allocation": holder}


def node_summary_json(node: NodeInventory) -> dict[str, Any]:
    """The contract's ``NodeSummary`` (what a user sees: no host, no holder)."""
    occupancy_status, _ = occupancy(node)
    identity = node.identity
    return {"id": node.node_id, "resource_name": f"node/{node.node_id}", "sku": identity["sku"],
            "gpus_total": identity["gpus_total"], "status": node.status,
            "occupancy_status": occupancy_status, "in_use": bool(node.live_claims()),
            "slot_summary": slot_summary(node), "readiness": readiness(node),
            "region_code": identity["region_code"], "onboarding_mode": identity["onboarding_mode"]}


def claim_json(claim: dict[str, Any]) -> dict[str, Any]:
    """The contract's ``AllocationPlacementClaim``."""
    return {"id": claim["id"], "allocation_id": claim["allocation_id"],
            "node_id": claim["node_id"], "slot_id": claim["slot_id"],
            "claim_kind": claim["claim_kind"], "status": claim["status"],
            "resource_snapshot": claim["resource_snapshot"], "created_at": claim["created_at"],
            "released_at": claim["released_at"]}


def lifecycle_mutation_json(result: dict[str, Any], correlation: str) -> dict[str, Any]:
    """The contract's ``V3PlatformNodeLifecycleMutationResponse``."""
    node: NodeInventory = result["node"]
    task_id = result.get("task_id")
    return {"ok": True, "operation": result["operation"], "node_id": node.node_id,
            "previous_status": result.get("previous_status"), "status": node.status,
            "task_id": task_id, "task_type": "node.drain" if task_id else None,
            "recovery_action": result.get("recovery_action"), "correlation_id": correlation,
            "evidence_href": f"/api/v1/platform/lifecycle/nodes/{node.node_id}",
            "task_href": f"/api/v1/platform/lifecycle/nodes/{node.node_id}" if task_id else None}


__all__ = ["LIVE", "slot_json", "slot_summary", "readiness", "schedulability", "occupancy",
           "node_admin_json", "node_summary_json", "claim_json", "lifecycle_mutation_json",
           "free_units"]
