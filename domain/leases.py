"""The lease lifecycle (allocations §3.1): release, restart, force-release,
force-cleanup, and the node task channel a node agent drives the lease with.

Every step moves what must move with it in the same save (``move_lease``): the claims
follow the lease, the meter opens when the lease becomes ``active`` and is rated and
closed when it ends (a lease never active is never billed), an ended lease leaves the
concurrency quota. Node work is a task the lease issues (``Allocation.issue_task``);
the agent long-polls for it (``dispatch_node_tasks``) and reports on it
(``report_node_task``); the first report of a task wins, a repeat changes nothing.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any
from uuid import UUID

from domain.allocation_views import mutation_result
from domain.allocations import (Allocation, UserAllocationQuota, get_allocation,
                                quota_id_for)
from domain.app_instances import app_use_id_for, on_allocation_released
from domain.commands import Command, Render, Session
from domain.errors import DomainError
from domain.inventory import NodeInventory
from domain.nodes import get_node
from domain.placement import advance, record_slot_cleanup, release
from domain.provenance import CommandContext
from domain.skus import get_sku, refusal
from domain.usage import meter_for_allocation, open_meter, stop_meter, usage_id_for_allocation

#: each step and the statuses it may start from
STEP_FROM = {"provisioning": ("requested",),
             "active": ("provisioning", "restarting"),
             "failed": ("requested", "provisioning"),
             "restarting": ("active", "restart_failed"),
             "restart_failed": ("restarting",),
             "releasing": ("requested", "provisioning", "active", "restarting",
                           "restart_failed", "release_failed"),
             "release_failed": ("releasing",),
             # from release_failed and failed only by an operator's force-cleanup
             "released": ("releasing", "release_failed", "failed")}
#: the status an allocation's claims are moved to by each step
CLAIMS_TO = {"provisioning": "provisioning", "active": "active", "failed": "failed",
             "releasing": "releasing"}
#: what a node task's success and failure move the lease to, by phase
TASK_OUTCOMES = {"provision": ("active", "failed"), "restart": ("active", "restart_failed"),
                 "release": ("released", "release_failed")}
POSIX_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
SUMMARY_LIMIT = 300


def move_lease(session: Session, ctx: CommandContext, allocation: Allocation, to: str, *,
               reason: str | None = None, details: dict[str, Any] | None = None) -> list[Any]:
    """One lifecycle step and everything that must change with it. A lease reaches
    ``released`` only when its runtime is gone (the release task succeeded, it never
    had one, or an operator verified it absent), so its slots are returned clean, and
    every app member bound to it is marked ``failed`` (``health_status=
    allocation_released``) in the same save."""
    if allocation.status not in STEP_FROM[to]:
        raise refusal("invalid_request", "conflict",
                      f"an allocation cannot go from {allocation.status} to {to}",
                      reason="invalid_allocation_transition", status=allocation.status)
    lease, changed = allocation.lease, [allocation]
    allocation_id = allocation.id
    if to in CLAIMS_TO:
        changed.append(advance(session, ctx, node_id=lease["node_id"], allocation_id=allocation_id,
                               to=CLAIMS_TO[to], reason=reason))
    if to == "released":
        node = release(session, ctx, node_id=lease["node_id"], allocation_id=allocation_id)
        changed += _return_slots(session, ctx, node, allocation_id)
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
    allocation.trigger_event(Allocation.Moved, to=to, reason=reason, details=details or {},
                             provenance=ctx.provenance(), timestamp=ctx.now)
    if to == "released":  # app-instances §4.1: the members it served fail with it
        changed += on_allocation_released(session, ctx, allocation_id)
    return changed


def _return_slots(session: Session, ctx: CommandContext, node: NodeInventory,
                  allocation_id: UUID) -> list[Any]:
    """The slots of a released lease leave ``cleanup`` for ``available``."""
    for claim in node.claims_of(str(allocation_id)):
        slot = node.slots.get(claim["slot_id"] or "")
        if slot is not None and slot["status"] == "cleanup":
            record_slot_cleanup(session, ctx, node_id=node.node_id, slot_id=slot["id"],
                                succeeded=True)
    return [node]


def _supersede_open_task(allocation: Allocation, ctx: CommandContext) -> None:
    if allocation.open_task is not None:
        allocation.trigger_event(Allocation.TaskCompleted, task_id=allocation.open_task,
                                 result="superseded", summary="replaced by a later request",
                                 reported_completed_at=None, timestamp=ctx.now)


def _answer(session: Session, allocation: Allocation, operation: str,
            previous: str) -> dict[str, Any]:
    node = get_node(session, allocation.lease["node_id"])
    return mutation_result(allocation, node, operation, previous)


def _unique(changed: list[Any]) -> list[Any]:
    return list({aggregate.id: aggregate for aggregate in changed}.values())


# ---- user and operator commands ------------------------------------------------------------
def request_release(ctx: CommandContext, *, allocation_id: UUID, project_id: UUID | None,
                    mode: str, reason: str | None, render: Render) -> Command:
    """``releaseAllocation`` (mode ``user``) and ``adminForceReleaseAllocation``
    (``admin_force``, any owner). A lease whose provision task no agent has picked up
    has no runtime: it is released at once, without node work. Otherwise any open task
    is superseded and a release task issued."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        allocation = get_allocation(session, allocation_id, project_id)
        previous = allocation.status
        if previous == "releasing":
            raise refusal("allocation_already_releasing", "conflict", "the allocation is releasing",
                          allocation_id=str(allocation_id))
        if previous in ("released", "failed"):
            raise refusal("allocation_not_active", "conflict", f"the allocation is {previous}",
                          allocation_id=str(allocation_id), status=previous)
        open_task = allocation.tasks.get(allocation.open_task or "")
        no_runtime = previous == "requested" and (open_task is None
                                                  or open_task["dispatched_at"] is None)
        _supersede_open_task(allocation, ctx)
        changed = move_lease(session, ctx, allocation, "releasing", reason=reason,
                             details={"mode": mode, "previous_status": previous})
        if no_runtime:
            changed += move_lease(session, ctx, allocation, "released",
                                  reason="released before any node work",
                                  details={"without_node_work": True})
        else:
            allocation.issue_task("release", ctx.now, ctx.correlation_id)
        return _unique(changed), _answer(session, allocation, "release", previous)

    return Command(ctx, decide, render, reads=(app_use_id_for(allocation_id),))


def request_restart(ctx: CommandContext, *, allocation_id: UUID, project_id: UUID | None,
                    render: Render) -> Command:
    """``restartAllocation``: only from ``active`` or ``restart_failed``."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        allocation = get_allocation(session, allocation_id, project_id)
        previous = allocation.status
        if previous not in STEP_FROM["restarting"]:
            details = {"reason": "restart_in_progress"} if previous == "restarting" else {}
            raise refusal("allocation_not_active", "conflict",
                          f"a {previous} allocation cannot be restarted",
                          allocation_id=str(allocation_id), status=previous, **details)
        changed = move_lease(session, ctx, allocation, "restarting",
                             details={"previous_status": previous})
        allocation.issue_task("restart", ctx.now, ctx.correlation_id)
        return _unique(changed), _answer(session, allocation, "restart", previous)

    return Command(ctx, decide, render)


def force_cleanup(ctx: CommandContext, *, allocation_id: UUID, reason: str,
                  runtime_verified_absent: bool, render: Render) -> Command:
    """``adminForceCleanupAllocation``: an operator ends a stuck lease.

    ``requested``/``provisioning`` → ``failed`` (its slots return to ``available`` only
    when the runtime is verified absent, else ``cleanup_blocked``); ``releasing``,
    ``release_failed`` and ``failed`` → ``released``, only with the runtime verified
    absent. Anything else is 409 ``state_not_cleanable`` (use force-release)."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        allocation = get_allocation(session, allocation_id)
        previous = allocation.status
        details = {"force_cleanup": True, "runtime_verified_absent": runtime_verified_absent,
                   "previous_status": previous}
        if previous in ("requested", "provisioning"):
            _supersede_open_task(allocation, ctx)
            changed = move_lease(session, ctx, allocation, "failed", reason=reason, details=details)
            node = get_node(session, allocation.lease["node_id"])
            for claim in node.claims_of(str(allocation_id)):
                if claim["slot_id"] and node.slots[claim["slot_id"]]["status"] == "cleanup":
                    record_slot_cleanup(session, ctx, node_id=node.node_id,
                                        slot_id=claim["slot_id"], succeeded=runtime_verified_absent)
        elif previous in ("releasing", "release_failed", "failed"):
            if not runtime_verified_absent:
                raise refusal("invalid_request", "conflict",
                              "releasing this lease needs the runtime verified absent",
                              reason="provider_deletion_unconfirmed", status=previous)
            _supersede_open_task(allocation, ctx)
            changed = move_lease(session, ctx, allocation, "released", reason=reason,
                                 details=details)
        else:
            raise refusal("invalid_request", "conflict",
                          f"a {previous} allocation is not cleaned up by force "
                          "(force-release it instead)", reason="state_not_cleanable",
                          status=previous)
        return _unique(changed), _answer(session, allocation, "release", previous)

    return Command(ctx, decide, render, reads=(app_use_id_for(allocation_id),))


# ---- the node task channel ------------------------------------------------------------------
def _allocations_on(session: Session, node: NodeInventory, live_only: bool) -> list[Allocation]:
    """The allocations with claims on ``node`` (live claims first, newest ended next)."""
    ids: list[str] = []
    for claim in sorted(node.claims.values(), key=lambda c: c["created_at"], reverse=True):
        if claim["allocation_id"] not in ids and (not live_only or claim["status"] in
                                                  ("reserved", "provisioning", "active",
                                                   "releasing")):
            ids.append(claim["allocation_id"])
    found = [session.get(UUID(i)) for i in ids]
    return [a for a in found if isinstance(a, Allocation)]


def dispatch_node_tasks(ctx: CommandContext, *, node_id: UUID, render: Render) -> Command:
    """``internalNodeWaitTask``: the oldest open task for the node, or none. The first
    hand-out of a task records it as picked up (a provision task moves its lease to
    ``provisioning``); a task handed out before and not yet reported is handed out
    again (the agent may have crashed), without a new event."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        node = get_node(session, node_id)
        open_tasks = [(a.tasks[a.open_task], a) for a in _allocations_on(session, node, True)
                      if a.open_task is not None]
        if not open_tasks:
            return [], {"task": None}
        task, allocation = min(open_tasks, key=lambda pair: (pair[0]["issued_at"],
                                                             pair[0]["task_id"]))
        changed: list[Any] = []
        if task["dispatched_at"] is None:
            allocation.trigger_event(Allocation.TaskDispatched, task_id=task["task_id"],
                                     timestamp=ctx.now)
            changed.append(allocation)
            if task["phase"] == "provision" and allocation.status == "requested":
                changed += move_lease(session, ctx, allocation, "provisioning")
        return _unique(changed), {"task": _task_json(allocation, task["task_id"])}

    return Command(ctx, decide, render)


def _task_json(allocation: Allocation, task_id: str) -> dict[str, Any]:
    """``InternalNodeTask`` without its ``signature`` (the API signs it): ``params``
    say what to do, never a secret."""
    task, lease = allocation.tasks[task_id], allocation.lease
    node = {"allocation_id": str(allocation.id), "phase": task["phase"], "cycle": task["cycle"],
            "sku": lease["sku"], "capacity_shape": lease["capacity_shape"],
            "gpus_total": lease["gpus_total"], "claim_ids": lease["claim_ids"],
            "scheduler_type": lease.get("scheduler_type"),
            "username_on_node": _connection(allocation, {})["username_on_node"]}
    return {"task_id": task_id, "task_type": task["task_type"], "node_id": task["node_id"],
            "correlation_id": task["correlation_id"], "issued_at": task["issued_at"],
            "expires_at": task["expires_at"], "params": node}


def _connection(allocation: Allocation, output: dict[str, Any]) -> dict[str, Any]:
    """Where the user connects: what the agent reported if well-formed, else the node's
    address and a stable POSIX name derived from the user."""
    lease = allocation.lease
    host, port, name = output.get("host"), output.get("port"), output.get("username_on_node")
    return {"host": host if isinstance(host, str) and 0 < len(host) <= 253 else lease["host"],
            "hostname": lease.get("node_hostname"),
            "port": port if type(port) is int and 1 <= port <= 65535 else 22,
            "username_on_node": name if isinstance(name, str) and POSIX_NAME.match(name)
            else "u" + lease["requested_by_user_id"].replace("-", "")[:12]}


def report_node_task(ctx: CommandContext, *, node_id: UUID, task_id: UUID, status: str,
                     error: str | None, completed_at: datetime, output: dict[str, Any],
                     render: Render) -> Command:
    """``internalNodeTaskResult``: the agent's report on a task. The first report wins:
    a task already ended (reported, or superseded by a release) changes nothing. A
    success moves the lease on (provision → ``active``, restart → ``active``, release →
    ``released``); ``failed``/``rejected`` to the phase's failure status."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        node = get_node(session, node_id)
        for allocation in _allocations_on(session, node, False):
            task = allocation.tasks.get(str(task_id))
            if task is not None and task["node_id"] == node.node_id:
                break
        else:
            raise refusal("allocation_not_found", "not_found", "no such task on this node",
                          task_id=str(task_id), node_id=str(node_id))
        if task["result"] is not None:
            return [], {"applied": False}
        summary = f"{task['phase']} {status}" + (f": {error}" if error else "")
        allocation.trigger_event(Allocation.TaskCompleted, task_id=str(task_id), result=status,
                                 summary=summary[:SUMMARY_LIMIT],
                                 reported_completed_at=completed_at.isoformat(),
                                 timestamp=ctx.now)
        changed: list[Any] = [allocation]
        succeeded, failed = TASK_OUTCOMES[task["phase"]]
        if status == "success":
            if allocation.status == "requested":  # reported before it was picked up
                changed += move_lease(session, ctx, allocation, "provisioning")
            details = {"connection": _connection(allocation, output)} \
                if task["phase"] == "provision" else {}
            changed += move_lease(session, ctx, allocation, succeeded, details=details)
        else:
            reason = (error or f"the {task['phase']} task was {status}")[:SUMMARY_LIMIT]
            changed += move_lease(session, ctx, allocation, failed, reason=reason,
                                  details={"task_result": status})
        return _unique(changed), {"applied": True}

    return Command(ctx, decide, render)


__all__ = ["move_lease", "request_release", "request_restart", "force_cleanup",
           "dispatch_node_tasks", "report_node_task", "DomainError"]
