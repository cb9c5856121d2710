"""The contract JSON of allocations, built from the aggregates (commands answer with
it) and from their state in the read models (queries answer with the same function,
so a command's answer and the later read never disagree in shape)."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from domain.allocations import Allocation, v3_task_id_for
from domain.inventory_views import claim_json


#: the lease fields every view of an allocation reads (admission writes them all); a
#: lease without them (imported, or planted by a test) is kept by read models but
#: never served
LEASE_KEYS = ("requested_by_user_id", "project_id", "org_id", "node_id", "sku",
              "capacity_shape", "gpus_total", "created_at", "hourly_rate")


UUID_KEYS = ("requested_by_user_id", "project_id", "org_id", "node_id")


def complete(lease: dict[str, Any]) -> bool:
    """Whether ``lease`` has every ``LEASE_KEYS`` field, well-formed."""
    try:
        for key in UUID_KEYS:
            UUID(str(lease[key]))
        datetime.fromisoformat(lease["created_at"])
    except (KeyError, TypeError, ValueError):
        return False
    return all(lease.get(key) is not None for key in LEASE_KEYS)


def resource_name(allocation_id: str) -> str:
    return f"core42:aicloud:compute:allocation/{allocation_id}"


def allocation_json(state: dict[str, Any], claims: list[dict[str, Any]]) -> dict[str, Any]:
    """``Allocation`` from an allocation's state (``domain.inventory.state_of`` of the
    aggregate, as a read model keeps it) and its placement claims."""
    lease, stamps, reasons = state["lease"], state["timestamps"], state["reasons"]
    allocation_id = str(state["_id"])
    return {
        "id": allocation_id, "resource_name": resource_name(allocation_id),
        "requested_by_user_id": lease["requested_by_user_id"], "requested_by_username": None,
        "requested_by_display_name": None, "org_id": lease["org_id"],
        "project_id": lease["project_id"], "project_name": None,
        "node_id": lease["node_id"], "node_hostname": lease.get("node_hostname"),
        "scheduler_type": lease.get("scheduler_type") or "bare_metal",
        "capacity_shape": lease["capacity_shape"], "placement_status": state["placement_status"],
        "placement_metadata": {"region_code": lease.get("node_region_code"),
                               "host": lease.get("host")},
        "placement_claims": [claim_json(c) for c in claims],
        "sku": lease["sku"], "gpus_total": lease["gpus_total"], "status": state["status"],
        "failure_reason": reasons.get("failed"),
        "provisioning_started_at": stamps.get("provisioning_at"),
        "active_at": stamps.get("active_at"),
        "restart_failed_at": stamps.get("restart_failed_at"),
        "restart_failed_reason": reasons.get("restart_failed"),
        "released_at": stamps.get("released_at"),
        "release_failed_at": stamps.get("release_failed_at"),
        "release_failed_reason": reasons.get("release_failed"),
        "connection": state["connection"], "ssh_keys": [],
        "created_at": lease["created_at"],
    }


def state_json(allocation: Allocation) -> dict[str, Any]:
    """The parts of an ``Allocation`` aggregate ``allocation_json`` reads."""
    return {"_id": str(allocation.id), "lease": allocation.lease, "status": allocation.status,
            "placement_status": allocation.placement_status,
            "timestamps": allocation.timestamps, "reasons": allocation.reasons,
            "connection": allocation.connection}


def allocation_of(allocation: Allocation, node: Any) -> dict[str, Any]:
    """``Allocation`` from the aggregate and its node's ``NodeInventory``."""
    return allocation_json(state_json(allocation), node.claims_of(str(allocation.id)))


def mutation_result(allocation: Allocation, node: Any, operation: str,
                    previous_status: str) -> dict[str, Any]:
    """What a release or restart command answers (rendered by ``mutation_json``)."""
    cycle = allocation.cycles.get(operation, 0)
    return {"allocation": allocation_of(allocation, node), "operation": operation,
            "previous_status": previous_status,
            "task_id": str(v3_task_id_for(operation, allocation.id, cycle))}


def mutation_json(result: dict[str, Any], correlation_id: str) -> dict[str, Any]:
    """``ReleaseAllocationResponse`` / ``RestartAllocationResponse``."""
    allocation = result["allocation"]
    return {"allocation": allocation,
            "operation": {"ok": True, "operation": result["operation"],
                          "workload_id": allocation["id"], "allocation_id": allocation["id"],
                          "previous_status": result["previous_status"],
                          "status": allocation["status"], "correlation_id": correlation_id,
                          "task_href": f"/api/v1/tasks/{result['task_id']}",
                          "evidence_href": f"/api/v1/allocations/{allocation['id']}/timeline"}}
