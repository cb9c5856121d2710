"""The contract's JSON of app instances (``AppInstance``, ``AppInstanceMember``,
``AppInstanceMemberOperation``, ``AppInstanceRepairOperation``,
``V3AppInstanceOperationResponse``), built from an ``AppInstance`` or its member and
operation dicts. Pure: the commands answer with it and the read model stores it.

May import: ``domain.skus`` (``iso``) only; the aggregate is typed, never imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from domain.skus import iso

if TYPE_CHECKING:
    from domain.app_instances import AppInstance


# ---- JSON (the contract's schemas) --------------------------------------------------------
def placement_json(intent: dict[str, Any] | None) -> dict[str, Any]:
    """``AppInstancePlacementIntent`` with every key (nulls and empty lists)."""
    intent = intent or {}
    return {"target_allocation_id": intent.get("target_allocation_id"),
            "controller_allocation_id": intent.get("controller_allocation_id"),
            "worker_allocation_ids": list(intent.get("worker_allocation_ids") or []),
            "server_allocation_id": intent.get("server_allocation_id"),
            "agent_allocation_ids": list(intent.get("agent_allocation_ids") or []),
            "allow_shared_allocation": bool(intent.get("allow_shared_allocation", False))}


def instance_json(instance: AppInstance) -> dict[str, Any]:
    """``AppInstance`` (every key emitted; ``proxy_routes`` are out of scope: ``[]``)."""
    spec, runtime = instance.spec, instance.runtime
    return {"id": str(instance.id), "resource_name": spec["resource_name"],
            "project_id": spec["project_id"], "app_slug": spec["app_slug"],
            "app_version": instance.app_version, "display_name": spec["display_name"],
            "app_artifact_id": spec.get("app_artifact_id"),
            "operating_mode": spec["operating_mode"],
            "control_plane_scope": spec["control_plane_scope"],
            "runtime_backend": spec["runtime_backend"],
            "tenant_boundary_mode": spec["tenant_boundary_mode"], "status": instance.status,
            "failure_reason": instance.failure_reason,
            "requested_by_user_id": spec.get("requested_by_user_id"),
            "requested_by_service_account_id": spec.get("requested_by_service_account_id"),
            "operator_service_account_id": spec.get("operator_service_account_id"),
            "placement_intent": placement_json(spec.get("placement_intent")),
            "runtime_state": dict(runtime["runtime_state"] or {}), "phase": runtime["phase"],
            "progress": dict(runtime["progress"] or {}), "health_status": runtime["health_status"],
            "health_detail": dict(runtime["health_detail"] or {}), "proxy_routes": [],
            "created_at": iso(instance.created_on), "updated_at": iso(instance.modified_on)}


def member_json(member: dict[str, Any]) -> dict[str, Any]:
    """``AppInstanceMember``."""
    keys = ("id", "app_instance_id", "component_key", "member_role", "status", "bound_node_id",
            "bound_node_resource_name", "bound_allocation_id", "runtime_state", "health_status",
            "health_detail", "endpoint", "last_operation_id", "last_correlation_id",
            "adapter_detail", "created_at", "updated_at")
    return {k: member.get(k) for k in keys}


def member_operation_json(operation: dict[str, Any]) -> dict[str, Any]:
    """``AppInstanceMemberOperation``."""
    keys = ("id", "app_instance_id", "action", "component_key", "target_member_id",
            "requested_count", "allocation_intent", "status", "correlation_id",
            "requested_by_user_id", "requested_by_service_account_id", "last_error_code",
            "last_error_message", "created_at", "updated_at", "started_at", "completed_at")
    return {k: operation.get(k) for k in keys}


def repair_operation_json(operation: dict[str, Any]) -> dict[str, Any]:
    """``AppInstanceRepairOperation`` (it echoes neither ``dry_run`` nor ``reason``)."""
    keys = ("id", "app_instance_id", "action", "scope", "target_member_id", "component_key",
            "status", "phase", "progress", "correlation_id", "requested_by_user_id",
            "requested_by_service_account_id", "last_error_code", "last_error_message",
            "created_at", "updated_at", "started_at", "completed_at")
    body = {k: operation.get(k) for k in keys}
    body["steps"] = [dict(step) for step in operation["steps"]]
    return body


def v3_operation_json(result: dict[str, Any]) -> dict[str, Any]:
    """``V3AppInstanceOperationResponse`` from a stop/start/restart/decommission result."""
    cid, task = result["correlation_id"], result["task_id"]
    return {"app_instance": result["app_instance"], "operation": result["operation"],
            "correlation_id": cid,
            "evidence_href": f"/api/v1/project/evidence/audit?correlation_id={cid}",
            "task_href": f"/api/v1/tasks/{task}" if task else None,
            "audit_action": f"app.instance.{result['operation']}"}
