"""The V3 workbench JSON of compute workloads and their tasks (allocations §2.4, §2.5,
§3.4, §3.5), built from an allocation's *state* (``domain.inventory.state_of`` of the
aggregate, as the ``workloads`` read model keeps it) and its *steps*: the statuses it
entered, in order, one per ``AllocationRequested``/``AllocationMoved`` event
(``step_of``).

Everything here is pure: the read model, the queries and a property test call the same
functions with the same data. What depends on the clock (actionability, archiving,
runway) takes ``now``; what lives in other read models (usage cost, the owner's
balance and burn, the node's liveness) is passed in.

A workload row is keyed by its workload id; a compute row's is its allocation id. App
rows (``domain.app_workload_views``) sit beside them, keyed by the app instance id.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from domain.allocation_views import resource_name
from domain.allocations import METERED, Allocation, v3_task_id_for
from domain.leases import STEP_FROM
from domain.skus import iso

#: how long a recovery condition stays in live attention surfaces (§3.4)
RECOVERY_WINDOW = timedelta(days=7)
ACTION_STATUSES = ("failed", "restart_failed", "release_failed")
PRIMARY_ACTION = {"active": "connect", "restart_failed": "review", "failed": "review",
                  "release_failed": "retry_release"}
#: statuses whose runtime exists on the node, so its connection facts are shown
CONNECTABLE = ("active", "restarting", "restart_failed")
#: the ``counts`` buckets of the workload list (§3.4)
COUNT_BUCKETS = {"active": ("active", "idle", "restarting", "restart_failed"),
                 "provisioning": ("requested", "provisioning"), "released": ("released",)}
#: task kind -> (the step that opens one, what each later step makes it) (§3.5)
TASK_KINDS = {
    "launch": ("requested", {"provisioning": "running", "active": "succeeded",
                             "failed": "failed", "releasing": "canceled"}),
    "release": ("releasing", {"released": "succeeded", "release_failed": "failed"}),
    "restart": ("restarting", {"active": "succeeded", "restart_failed": "failed",
                               "releasing": "canceled"}),
}
TASK_OPEN_STATUS = {"launch": "queued", "release": "running", "restart": "running"}
TASK_FINAL = ("succeeded", "failed", "canceled")
#: the node task phase behind each task kind
PHASE_OF_KIND = {"launch": "provision", "release": "release", "restart": "restart"}
NODE_TASK_STATUS = {"success": "succeeded", "failed": "failed", "rejected": "failed",
                    "expired": "failed", "superseded": "canceled"}
TASK_SUMMARIES = {
    ("launch", "queued"): "Waiting for the node agent to start provisioning.",
    ("launch", "running"): "Provisioning the runtime on the node.",
    ("launch", "succeeded"): "The allocation became active.",
    ("launch", "failed"): "Provisioning failed.",
    ("launch", "canceled"): "Released before it became active.",
    ("release", "running"): "Releasing the allocation.",
    ("release", "succeeded"): "The allocation was released.",
    ("release", "failed"): "The release failed.",
    ("restart", "running"): "Restarting the runtime.",
    ("restart", "succeeded"): "The runtime restarted and is active.",
    ("restart", "failed"): "The restart failed.",
    ("restart", "canceled"): "Superseded by a release.",
}
STATUS_SUMMARIES = {
    "requested": "Placed on a node; waiting for the node agent to start provisioning.",
    "provisioning": "The node agent is provisioning the runtime.",
    "active": "The runtime is active.",
    "restarting": "The runtime is restarting.",
    "restart_failed": "The last restart failed; the allocation still holds its node.",
    "releasing": "The allocation is being released.",
    "released": "The allocation was released.",
    "release_failed": "The release failed; the allocation still holds its node.",
    "failed": "The allocation failed before it became active.",
}
EVENT_ACTIONS = {"requested": "launch_requested", "provisioning": "provisioning_started",
                 "active": "activated", "restarting": "restart_requested",
                 "restart_failed": "restart_failed", "releasing": "release_requested",
                 "released": "released", "release_failed": "release_failed",
                 "failed": "failed"}
RECENT_ACTIVITY = 5


def parse(moment: str) -> datetime:
    return datetime.fromisoformat(moment)


# ---- steps ----------------------------------------------------------------------------
def step_of(event: Any) -> dict[str, Any] | None:
    """The step an allocation event records (None for node-task events): the status
    entered, when, why, and who asked (from the event's provenance)."""
    if isinstance(event, Allocation.Created):
        to, reason = "requested", None
    elif isinstance(event, Allocation.Moved):
        to, reason = event.to, event.reason
    else:
        return None
    provenance = event.provenance
    return {"to": to, "at": iso(event.timestamp), "reason": reason,
            "actor_type": provenance.get("actor_type"),
            "correlation_id": provenance.get("correlation_id")}


def entered_at(steps: list[dict[str, Any]]) -> datetime:
    """When the current status was entered."""
    return parse(steps[-1]["at"])


def archive_after(state: dict[str, Any], steps: list[dict[str, Any]]) -> datetime | None:
    """When the row becomes history: on ``released``, and for ``failed`` once its
    recovery window has passed; never for a live lease."""
    if state["status"] == "released":
        return parse(state["timestamps"]["released_at"])
    if state["status"] == "failed":
        return entered_at(steps) + RECOVERY_WINDOW
    return None


def actionable_until(state: dict[str, Any], steps: list[dict[str, Any]]) -> datetime | None:
    """Entry into a recovery status plus the recovery window; None otherwise."""
    return entered_at(steps) + RECOVERY_WINDOW if state["status"] in ACTION_STATUSES else None


def metered(state: dict[str, Any]) -> bool:
    """A meter is open ⇔ the status is metered and the lease was ever active (§5.11)."""
    return state["status"] in METERED and "active_at" in state["timestamps"]


def hourly_rate(state: dict[str, Any]) -> dict[str, Any]:
    """The open meter's rate; zero (in the lease's currency) while nothing is metered."""
    rate = state["lease"]["hourly_rate"]
    return dict(rate) if metered(state) else {"amount_minor": 0, "currency": rate["currency"]}


def workload_name(state: dict[str, Any]) -> str:
    return state["lease"].get("name") or resource_name(state["_id"])


def node_name(state: dict[str, Any]) -> str | None:
    lease = state["lease"]
    return lease.get("node_hostname") or lease.get("host")


def region_code(state: dict[str, Any]) -> str | None:
    lease = state["lease"]
    return lease.get("node_region_code") or lease.get("region_code")


def search_text(state: dict[str, Any]) -> str:
    """What ``search`` matches (case-insensitively): name, id, SKU, node and region."""
    parts = (workload_name(state), state["_id"], state["lease"]["sku"], node_name(state),
             region_code(state))
    return " ".join(p for p in parts if p).lower()


# ---- money ----------------------------------------------------------------------------
@dataclass(frozen=True)
class OwnerFunds:
    """The owner's billing account: ``primary`` currency (None without an account),
    balances and open-meter burn per hour (Σ of the owner's metered rates), both by
    currency."""

    primary: str | None
    balances: dict[str, int]
    burn: dict[str, int]


def cost_projection(rate: dict[str, Any] | None, accrued: dict[str, Any] | None,
                    funds: OwnerFunds | None, now: datetime) -> dict[str, Any]:
    """``V3WorkloadCostProjection`` (§4): the owner's balance in the rate's currency and
    how long it lasts at the owner's total burn. ``funds`` is None when the caller may
    not see the owner's balance (another member's workload); ``rate`` is None when no
    rate is known (an app nothing has priced yet)."""
    projection: dict[str, Any] = {"balance": None, "hourly_rate": rate, "accrued_cost": accrued,
                                  "runway_seconds": None, "projected_depletion_at": None}
    if funds is None:
        return {**projection, "basis": "owner_unavailable"}
    if funds.primary is None:
        return {**projection, "basis": "balance_unavailable"}
    if rate is None:
        balance = {"amount_minor": funds.balances.get(funds.primary, 0), "currency": funds.primary}
        return {**projection, "balance": balance, "basis": "rate_unavailable"}
    currency = rate["currency"]
    if currency not in funds.balances and currency != funds.primary:
        balance = {"amount_minor": funds.balances.get(funds.primary, 0),
                   "currency": funds.primary}
        return {**projection, "balance": balance, "basis": "currency_mismatch"}
    projection["balance"] = {"amount_minor": funds.balances.get(currency, 0), "currency": currency}
    if rate["amount_minor"] <= 0:
        return {**projection, "basis": "zero_rate"}
    burn = max(funds.burn.get(currency, 0), rate["amount_minor"])
    runway = max(0, projection["balance"]["amount_minor"] * 3600 // burn)
    return {**projection, "runway_seconds": runway,
            "projected_depletion_at": iso(now + timedelta(seconds=runway)),
            "basis": "active_rate"}


# ---- the workload row -------------------------------------------------------------------
def runtime_readiness(status: str, node: dict[str, Any] | None) -> dict[str, Any]:
    """``V3RuntimeReadiness`` of a compute row from its status and its node's row in the
    inventory read model (``status``, ``listed``; None when unknown)."""
    if status != "active":
        severity = "error" if status in ACTION_STATUSES else "info"
        return _readiness(False, severity, "allocation_not_active",
                          f"The allocation is {status.replace('_', ' ')}.")
    if node is None:
        return _readiness(False, "warn", "runtime_readiness_unknown",
                          "The node's state is not known yet.")
    if not node["listed"] or node["status"] in ("retired", "removing"):
        return _readiness(False, "blocker", "decommissioned_node",
                          "The node this allocation runs on was decommissioned.")
    if node["status"] == "offline":
        return _readiness(False, "error", "node_agent_unreachable",
                          "The node agent is unreachable.")
    return _readiness(True, "ok", "ready", "The allocation is active.")


def _readiness(ready: bool, severity: str, code: str, summary: str) -> dict[str, Any]:
    return {"ready": ready, "severity": severity, "reason_code": code, "reason_codes": [code],
            "summary": summary}


def _task_href(state: dict[str, Any], kind: str) -> str | None:
    cycle = state["cycles"].get(kind, 0)
    return f"/api/v1/tasks/{v3_task_id_for(kind, state['_id'], cycle)}" if cycle else None


def _last_correlation(steps: list[dict[str, Any]], opener: str) -> str | None:
    return next((s["correlation_id"] for s in reversed(steps) if s["to"] == opener), None)


def lifecycle_actions(state: dict[str, Any], steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Release, restart and open, enabled exactly when the command's guard would accept
    the request now (``domain.leases.STEP_FROM``); never stop or start."""
    status, allocation_id = state["status"], state["_id"]
    release_refused = {"releasing": "The allocation is already releasing.",
                       "released": "The allocation is released.",
                       "failed": "The allocation has failed."}

    def post(action: str, label: str, allowed: bool, refused: str) -> dict[str, Any]:
        href = _task_href(state, action)
        return {"action": action, "label": label, "enabled": allowed,
                "disabled_reason": None if allowed else refused, "method": "POST",
                "href": f"/api/v1/allocations/{allocation_id}/{action}",
                "idempotency_required": True,
                "result": {"task_href": href,
                           "evidence_href": f"/api/v1/allocations/{allocation_id}/timeline"
                           if href else None,
                           "correlation_id": _last_correlation(steps, TASK_KINDS[action][0])
                           if href else None}}

    return [
        post("release", "Release", status in STEP_FROM["releasing"],
             release_refused.get(status, "")),
        post("restart", "Restart", status in STEP_FROM["restarting"],
             f"A {status.replace('_', ' ')} allocation cannot be restarted."),
        {"action": "open", "label": "Open", "enabled": True, "disabled_reason": None,
         "method": "GET", "href": f"/api/v1/workloads/{allocation_id}",
         "idempotency_required": False,
         "result": {"task_href": None, "evidence_href": None, "correlation_id": None}},
    ]


def connection_facts(state: dict[str, Any]) -> dict[str, Any]:
    connection = state["connection"] if state["status"] in CONNECTABLE else None
    if connection is None:
        return {"hostname": None, "ip_address": None, "ssh_command": None,
                "terminal_href": None, "app_url": None}
    return {"hostname": connection.get("hostname"), "ip_address": connection["host"],
            "ssh_command": f"ssh -p {connection['port']} "
                           f"{connection['username_on_node']}@{connection['host']}",
            "terminal_href": None, "app_url": None}


def action_reason(state: dict[str, Any]) -> str | None:
    return state["reasons"].get(state["status"]) if state["status"] in ACTION_STATUSES else None


def compute_workload_json(state: dict[str, Any], steps: list[dict[str, Any]], *,
                          now: datetime, usage_cost: dict[str, Any] | None,
                          node: dict[str, Any] | None,
                          funds: OwnerFunds | None,
                          blocking: dict[str, Any] | None = None) -> dict[str, Any]:
    """``V3WorkloadSummary`` of a compute allocation (§3.4). ``usage_cost`` is Σ of its
    usage records' cost (None before any: zero), ``node`` its node's liveness (see
    ``runtime_readiness``), ``funds`` the owner's account as the caller may see it,
    ``blocking`` the live app using the allocation
    (``domain.app_workload_views.blocking_app_use``)."""
    lease, status, allocation_id = state["lease"], state["status"], state["_id"]
    rate = hourly_rate(state)
    accrued = usage_cost or {"amount_minor": 0, "currency": rate["currency"]}
    projection = cost_projection(rate, accrued, funds, now)
    until = actionable_until(state, steps)
    required = status in ACTION_STATUSES
    actionable = required and until is not None and now < until
    archive = archive_after(state, steps)
    reason = action_reason(state)
    return {
        "id": allocation_id, "allocation_id": allocation_id, "app_instance_id": None,
        "name": workload_name(state), "kind": "compute", "status": status,
        "project_id": lease["project_id"], "project_name": lease["project_id"],
        "region_code": region_code(state), "sku": lease["sku"], "node_id": lease["node_id"],
        "node_name": node_name(state), "owner_user_id": lease["requested_by_user_id"],
        "owner_username": lease["requested_by_user_id"], "app_slug": None, "app_name": None,
        "created_at": lease["created_at"], "active_at": state["timestamps"].get("active_at"),
        "hourly_rate": rate, "accrued_cost": accrued,
        "cost_projection": projection,
        "needs_action": actionable, "action_required": required, "is_actionable": actionable,
        "actionable_until": iso(until) if until else None,
        "archived_at": iso(archive) if archive is not None and archive <= now else None,
        "action_reason": reason, "runtime_readiness": runtime_readiness(status, node),
        "blocking_app_use": blocking,
        "primary_action": PRIMARY_ACTION.get(status, "none"),
        "connection_facts": connection_facts(state),
        "lifecycle_actions": lifecycle_actions(state, steps),
        "operator_state": operator_state("allocation", allocation_id, status,
                                         family="compute_recovery", actionable=actionable,
                                         required=required, reason=reason),
    }


def operator_state(target_type: str, target_id: str, status: str, *, family: str,
                   actionable: bool, required: bool, reason: str | None) -> dict[str, Any]:
    """A row's ``operator_state``: attention while it is actionable, never acknowledged."""
    return {
        "active": actionable,
        "attention_key": f"{target_type}.{status}:{target_id}" if actionable else None,
        "signal_key": None, "target_type": target_type, "target_id": target_id,
        "action_family": family if required else None, "attention_reason": reason,
        "review_required": required, "review_state": "open", "ack_fingerprint": None,
        "ack_state": "none", "ack_reason": None, "ack_expires_at": None, "ack_actor": None,
        "ack_updated_at": None}


def action_band_item(state: dict[str, Any]) -> dict[str, Any]:
    """The ``V3WorkloadActionBandItem`` of a row inside its recovery window."""
    status, workload_id = state["status"], state["_id"]
    title = {"failed": "Allocation failed", "restart_failed": "Restart failed",
             "release_failed": "Release failed"}[status]
    retry = status == "release_failed"
    return {"severity": "warn" if status == "restart_failed" else "error",
            "code": f"allocation_{status}" if status == "failed" else status, "title": title,
            "summary": action_reason(state) or STATUS_SUMMARIES[status],
            "workload_id": workload_id, "action_label": "Retry release" if retry else "Review",
            "action_href": f"/api/v1/workloads/{workload_id}"}


# ---- the workload detail ----------------------------------------------------------------
def _events(state: dict[str, Any], steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``V3WorkloadEventItem``s, newest first: the statuses entered and the node tasks
    that ended (their safe summaries only)."""
    items = [{"occurred_at": s["at"], "actor": s["actor_type"], "action": EVENT_ACTIONS[s["to"]],
              "status": s["to"], "source": "allocation",
              "summary": s["reason"] or STATUS_SUMMARIES[s["to"]]} for s in steps]
    items += [{"occurred_at": t["completed_at"], "actor": "node", "action": t["task_type"],
               "status": t["result"], "source": "node_task",
               "summary": t["summary"] or f"{t['phase']} {t['result']}"}
              for t in state["tasks"].values() if t["completed_at"]]
    return sorted(items, key=lambda item: item["occurred_at"], reverse=True)


def _lifecycle(state: dict[str, Any], steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The overview's ``V3WorkloadLifecycleItem``s: every status entered, then what the
    lease is expected to reach next."""
    last = len(steps) - 1
    items = []
    for index, step in enumerate(steps):
        to = step["to"]
        mark = ("failed" if to in ACTION_STATUSES else
                "current" if index == last and to != "released" else "completed")
        items.append({"label": to.replace("_", " ").capitalize(), "status": mark,
                      "occurred_at": step["at"], "summary": step["reason"] or STATUS_SUMMARIES[to]})
    ahead = {"requested": ("provisioning", "active"), "provisioning": ("active",),
             "releasing": ("released",)}.get(state["status"], ())
    items += [{"label": to.capitalize(), "status": "pending", "occurred_at": None,
               "summary": STATUS_SUMMARIES[to]} for to in ahead]
    return items


def compute_workload_detail(state: dict[str, Any], steps: list[dict[str, Any]],
                            workload: dict[str, Any], now: datetime) -> dict[str, Any]:
    """``V3WorkloadDetailResponse`` without ``meta``, around the row ``workload``."""
    lease, allocation_id = state["lease"], state["_id"]
    events = _events(state, steps)
    age = max(0, int((now - parse(lease["created_at"])).total_seconds()))
    effective = {key: lease.get(key) for key in (
        "resource_class", "scheduler_request", "region_code", "os_image_slug",
        "network_policy_id", "storage_bucket_ids", "runtime_bundle_id", "runtime_bundle_slug")}
    return {
        "workload": workload,
        "context": {"project": workload["project_name"], "region": workload["region_code"],
                    "node": workload["node_name"], "owner": workload["owner_username"],
                    "age_seconds": age},
        "tabs": {
            "overview": {"lifecycle": _lifecycle(state, steps),
                         "recent_activity": events[:RECENT_ACTIVITY],
                         "summary": STATUS_SUMMARIES[state["status"]]},
            "connect": {"primary_action": workload["primary_action"], "terminal_href": None,
                        "ssh_command": workload["connection_facts"]["ssh_command"],
                        "ssh_keys": [], "app_url": None, "proxy_status": "proxy_disabled",
                        "notes": [] if workload["connection_facts"]["ssh_command"] else
                        ["Connection details appear while the allocation is active."]},
            "metrics": {"source": "allocation_metrics" if state["status"] == "active"
                        else "unavailable", "snapshot_href": None, "timeseries_href": None,
                        "sampled_at": None, "capabilities": []},
            "events": {"items": events,
                       "timeline_href": f"/api/v1/allocations/{allocation_id}/timeline"},
            "storage": {"mounts": [], "storage_href": None},
            "config": {"scheduler_type": lease.get("scheduler_type") or "bare_metal",
                       "capacity_shape": lease["capacity_shape"],
                       "placement_status": state["placement_status"], "sku": lease["sku"],
                       "gpus_total": lease["gpus_total"], "effective_config": effective,
                       "credential_posture": []},
        },
        "runtime_presentation": None,
    }


# ---- tasks -------------------------------------------------------------------------------
def _walk(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every task the steps opened, in order: kind, cycle, status, and the indexes of
    the steps that opened, last changed and closed it. A step first moves the open
    tasks, then opens its own (a release cancels a restart, then starts)."""
    tasks: list[dict[str, Any]] = []
    cycles: dict[str, int] = {}
    for index, step in enumerate(steps):
        for task in tasks:
            moved = TASK_KINDS[task["kind"]][1].get(step["to"])
            if task["status"] not in TASK_FINAL and moved:
                task.update(status=moved, changed=index,
                            closed=index if moved in TASK_FINAL else None)
        for kind, (opener, _) in TASK_KINDS.items():
            if step["to"] == opener:
                cycle = 0 if kind == "launch" else cycles.get(kind, 0) + 1
                cycles[kind] = cycle
                tasks.append({"kind": kind, "cycle": cycle, "status": TASK_OPEN_STATUS[kind],
                              "opened": index, "changed": index, "closed": None})
    return tasks


def _node_task(state: dict[str, Any], kind: str, cycle: int) -> dict[str, Any] | None:
    phase = PHASE_OF_KIND[kind]
    return next((t for t in state["tasks"].values()
                 if t["phase"] == phase and t["cycle"] == cycle), None)


def _duration(started: str | None, completed: str | None) -> int | None:
    if not started or not completed:
        return None
    return max(0, int((parse(completed) - parse(started)).total_seconds()))


def _item(kind: str, name: str, status: str, started: str | None, completed: str | None,
          summary: str | None, source: str) -> dict[str, Any]:
    return {"kind": kind, "name": name, "status": status, "started_at": started,
            "completed_at": completed, "duration_seconds": _duration(started, completed),
            "summary": summary, "source": source}


def _node_task_item(node_task: dict[str, Any]) -> dict[str, Any]:
    result = node_task["result"]
    status = (NODE_TASK_STATUS.get(result, "unknown") if result else
              "running" if node_task["dispatched_at"] else "queued")
    return _item("node_task", node_task["task_type"], status, node_task["dispatched_at"],
                 node_task["completed_at"], node_task["summary"] or "Issued to the node agent.",
                 "node_task")


def _task_timeline(state: dict[str, Any], steps: list[dict[str, Any]], task: dict[str, Any],
                   node_task: dict[str, Any] | None, summary: str) -> list[dict[str, Any]]:
    """accepted (synthetic), placement (launch), the statuses the task went through
    (workflow), its node task, then its completion or failure."""
    opened = steps[task["opened"]]
    items = [_item("accepted", "accepted", "succeeded", opened["at"], opened["at"],
                   "The request was accepted.", "synthetic")]
    if task["kind"] == "launch":
        claim = "node_exclusive" if state["lease"]["capacity_shape"] == "baremetal" else "slot"
        items.append(_item("placement", claim, "succeeded", opened["at"], opened["at"],
                           f"Placed on {node_name(state) or 'a node'}.", "allocation"))
    end = task["closed"] if task["closed"] is not None else len(steps)
    for index in range(task["opened"], end):
        step, following = steps[index], steps[index + 1] if index + 1 < len(steps) else None
        current = following is None
        items.append(_item("workflow", step["to"], "running" if current else "succeeded",
                           step["at"], None if current else following["at"],
                           STATUS_SUMMARIES[step["to"]], "allocation"))
    if node_task is not None:
        items.append(_node_task_item(node_task))
    if task["closed"] is not None:
        closing = steps[task["closed"]]
        items.append(_item("failure" if task["status"] == "failed" else "completion",
                           closing["to"], task["status"], closing["at"], closing["at"], summary,
                           "allocation"))
    return items


def compute_tasks(state: dict[str, Any], steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every V3 task of an allocation (§3.5): ``{"task": V3TaskSummary, "timeline":
    [V3TaskTimelineItem]}``. A task's status is a function of the lease's steps;
    its id is ``v3_task_id_for(kind, allocation, cycle)``, what the launch, release and
    restart commands hand back."""
    allocation_id, lease = state["_id"], state["lease"]
    name = workload_name(state)
    found = []
    for task in _walk(steps):
        kind, status = task["kind"], task["status"]
        opened, changed = steps[task["opened"]], steps[task["changed"]]
        closed = steps[task["closed"]] if task["closed"] is not None else None
        summary = TASK_SUMMARIES[(kind, status)]
        if status == "failed" and closed and closed["reason"]:
            summary = closed["reason"]
        node_task = _node_task(state, kind, task["cycle"])
        moments = [changed["at"]] + ([node_task[k] for k in ("dispatched_at", "completed_at")
                                      if node_task[k]] if node_task else [])
        failed = status == "failed"
        found.append({"task": {
            "id": str(v3_task_id_for(kind, allocation_id, task["cycle"])), "kind": kind,
            "status": status, "title": f"{kind.capitalize()} {name}", "summary": summary,
            "resource_kind": "allocation", "resource_id": allocation_id, "resource_name": name,
            "project_id": lease["project_id"], "project_name": lease["project_id"],
            "correlation_id": opened["correlation_id"], "created_at": opened["at"],
            "updated_at": max(moments, key=parse), "completed_at": closed["at"] if closed else None,
            "primary_action": {
                "label": "View timeline" if failed else "Open workload",
                "href": f"/api/v1/allocations/{allocation_id}/timeline" if failed
                else f"/api/v1/workloads/{allocation_id}",
                "kind": "view_logs" if failed else "open_resource"}},
            "timeline": _task_timeline(state, steps, task, node_task, summary)})
    return found
