"""The V3 workbench JSON of app-backed workloads and their tasks (app-instances §4.3),
built from an app instance's *state* (``domain.inventory.state_of`` of the
``AppInstance`` aggregate, as the ``workloads`` read model keeps it) and its *steps*:
the statuses it entered, in order, one per ``AppInstanceRequested``/``AppInstanceMoved``
event (``app_step_of``).

Everything here is pure, as in ``domain.workload_views`` (whose money, readiness and
timeline helpers it reuses): the read model, the queries and the tests call the same
functions with the same data. Guards come from the aggregate's own code
(``domain.app_instances.command_allowed``/``restart_safe`` on the restored state), so a
row's ``lifecycle_actions[x].enabled`` is exactly whether the command would pass its
state guard now. What lives elsewhere is passed in: the app's open ``app_runtime``
meters (``open_rate``), its accrued usage cost, the owner's account, the compute row
of its primary allocation, and its V3 catalog kind (``domain.app_catalog_views``).

May import: ``domain`` only.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from domain.app_instances import (GONE, TEARDOWN, AppInstance, command_allowed,
                                  restart_safe)
from domain.inventory import restore
from domain.skus import iso
from domain.usage import UsageRecord
from domain.workload_views import (RECOVERY_WINDOW, OwnerFunds, _item, _readiness,
                                   cost_projection, operator_state, parse)

#: the V3 catalog kinds (``domain.app_catalog_views.app_kind``) that are workload kinds
#: of their own; the rest are ``app`` (§4.3)
WORKLOAD_KINDS = ("jupyter", "vllm", "training", "scheduler", "kubernetes")
OPEN_ACTION = {"jupyter": "open_notebook", "vllm": "try_endpoint",
               "training": "open_training_ui"}
ACTION_STATUSES = ("failed", "restart_failed", "release_failed")
#: a failure while doing one of these is a ``restart_failed`` row
RESTART_PHASES = ("restart", "start", "upgrade", "rollback")
#: the lifecycle actions of an app row: (action, label, domain command, URL verb)
ROW_ACTIONS = (("stop", "Stop", "stop"), ("start", "Start", "start"),
               ("restart", "Restart", "restart"), ("release", "Decommission", "decommission"))
STATUS_SUMMARIES = {
    "requested": "Requested; waiting for the app's adapter to deploy it.",
    "deploying": "The app is being deployed.",
    "running": "The app is running.",
    "stopping": "The app is stopping.",
    "stopped": "The app is stopped.",
    "starting": "The app is starting.",
    "restarting": "The app is restarting.",
    "upgrading": "The app is being upgraded.",
    "rolling_back": "The app is being rolled back.",
    "failed": "The app failed.",
    "decommissioning": "The app is being decommissioned.",
    "deleting": "The app's resources are being deleted.",
    "decommissioned": "The app was decommissioned.",
    "deleted": "The app was deleted.",
}
#: task kind -> (what the app reaching each status makes an open task); a move to any
#: other status cancels it (a decommission supersedes an upgrade)
LAUNCH_MOVES = {"deploying": "running", "running": "succeeded", "failed": "failed"}
OPERATION_MOVES = {
    "stop": {"stopped": "succeeded", "failed": "failed"},
    "start": {"running": "succeeded", "failed": "failed"},
    "restart": {"running": "succeeded", "failed": "failed"},
    "upgrade": {"running": "succeeded", "failed": "failed"},
    "rollback": {"running": "succeeded", "failed": "failed"},
    "decommission": {"deleting": "running", "decommissioned": "succeeded",
                     "deleted": "succeeded", "failed": "failed"},
}
OP_TASK_STATUS = {"accepted": "queued", "in_progress": "running", "succeeded": "succeeded",
                  "failed": "failed", "cancelled": "canceled"}
TASK_FINAL = ("succeeded", "failed", "canceled")


# ---- steps ----------------------------------------------------------------------------
def app_step_of(event: Any) -> dict[str, Any] | None:
    """The step an app-instance event records (None for every other event): the status
    entered, from where, by what (``create``, ``report`` or the command), the task it
    opened, when, why, and who asked."""
    if isinstance(event, AppInstance.Created):
        step = {"to": "requested", "from": None, "trigger": "create",
                "task_id": event.spec.get("launch_task_id"), "reason": None,
                "failed_during": None}
    elif isinstance(event, AppInstance.Moved):
        step = {"to": event.to, "from": event.from_status, "trigger": event.trigger,
                "task_id": event.task_id, "reason": event.details.get("failure_reason"),
                "failed_during": event.details.get("failed_during")}
    else:
        return None
    provenance = event.provenance
    return {**step, "at": iso(event.timestamp), "actor_type": provenance.get("actor_type"),
            "correlation_id": provenance.get("correlation_id")}


def instance_of(state: dict[str, Any]) -> AppInstance:
    """The aggregate back from its state, for the domain's own guards."""
    return restore(AppInstance, state)


# ---- identity -------------------------------------------------------------------------
def workload_kind(catalog_kind: str | None) -> str:
    """§4.3: the app's V3 catalog kind when it is a workload kind (jupyter, vllm,
    training, scheduler, kubernetes), else ``app`` (also when the catalog is unknown)."""
    return catalog_kind if catalog_kind in WORKLOAD_KINDS else "app"


def primary_allocation_id(state: dict[str, Any]) -> str | None:
    """The allocation a row is placed on: the placement's target, else its server,
    else its controller."""
    intent = state["spec"].get("placement_intent") or {}
    return (intent.get("target_allocation_id") or intent.get("server_allocation_id")
            or intent.get("controller_allocation_id"))


def primary_member(state: dict[str, Any]) -> dict[str, Any] | None:
    """The member on the primary allocation, else the first platform-placed one."""
    members = list(state["members"].values())
    allocation = primary_allocation_id(state)
    if allocation:
        return next((m for m in members if m.get("bound_allocation_id") == allocation), None)
    return next((m for m in members if m.get("capacity")), None)


def bound_allocations(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """allocation id -> the member it serves, for every live binding: a member not
    ``deleted`` of an instance not Gone (exactly the ``AllocationAppUse`` bindings)."""
    if state["status"] in GONE:
        return {}
    return {m["bound_allocation_id"]: m for m in state["members"].values()
            if m.get("bound_allocation_id") and m["status"] != "deleted"}


def blocking_app_use(state: dict[str, Any], allocation_id: str) -> dict[str, Any] | None:
    """``V3WorkloadBlockingAppUse`` of a compute row whose allocation this app uses: as
    the app itself when it is the app's primary allocation, else as one member."""
    member = bound_allocations(state).get(allocation_id)
    if member is None:
        return None
    spec = state["spec"]
    kind = "app_instance" if allocation_id == primary_allocation_id(state) else \
        "app_instance_member"
    return {"kind": kind, "app_instance_id": state["_id"], "display_name": spec["display_name"],
            "app_slug": spec["app_slug"], "status": state["status"],
            "component_key": member["component_key"]}


def v3_status(state: dict[str, Any]) -> str:
    """§4.3's status map."""
    status = state["status"]
    if status == "running":
        return "idle" if state["runtime"].get("health_status") == "idle" else "active"
    if status == "failed":
        during = state.get("failed_during")
        if during == "decommission":
            return "release_failed"
        return "restart_failed" if during in RESTART_PHASES else "failed"
    if status in TEARDOWN:
        return "releasing"
    if status in GONE:
        return "released"
    return {"requested": "requested", "deploying": "provisioning", "starting": "provisioning",
            "stopping": "stopped", "stopped": "stopped", "restarting": "restarting",
            "upgrading": "restarting", "rolling_back": "restarting"}[status]


def search_text(state: dict[str, Any]) -> str:
    spec = state["spec"]
    return " ".join((spec["display_name"], state["_id"], spec["app_slug"])).lower()


# ---- when -------------------------------------------------------------------------------
def entered_at(steps: list[dict[str, Any]]) -> datetime:
    return parse(steps[-1]["at"])


def archive_after(state: dict[str, Any], steps: list[dict[str, Any]]) -> datetime | None:
    """A row becomes history when the app is Gone (a live app, even failed, holds
    capacity and stays in the runtime list)."""
    gone = next((s for s in steps if s["to"] in GONE), None)
    return parse(gone["at"]) if gone else None


def actionable_until(state: dict[str, Any], steps: list[dict[str, Any]]) -> datetime | None:
    return entered_at(steps) + RECOVERY_WINDOW if v3_status(state) in ACTION_STATUSES else None


# ---- money ------------------------------------------------------------------------------
def meter_rate(event: UsageRecord.Created) -> dict[str, Any]:
    """The hourly amount an opened meter charges, in the currency it charges in: its
    frozen terms rated over one hour (the one rounding rule of ``domain.rating``)."""
    record = event.mutate(None)
    start = record.start_time
    return {"amount_minor": record.terms.accrued(start + timedelta(hours=1)),
            "currency": record.currency}


def app_money(state: dict[str, Any], *, open_rate: dict[str, Any] | None,
              usage_cost: dict[str, Any] | None, owner_currency: str | None
              ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(``hourly_rate``, ``accrued_cost``) of an app row (§4.2 "V3 money"): Σ of its
    open ``app_runtime`` meters' rates and Σ of their costs. The currency is the
    meters', else the owner's; with neither known both are None."""
    currency = ((open_rate or {}).get("currency") or (usage_cost or {}).get("currency")
                or owner_currency)
    if currency is None:
        return None, None
    rate = open_rate if open_rate and open_rate["currency"] == currency else None
    return (rate or {"amount_minor": 0, "currency": currency},
            usage_cost or {"amount_minor": 0, "currency": currency})


# ---- the workload row ---------------------------------------------------------------------
def runtime_readiness(state: dict[str, Any], allocation: dict[str, Any] | None) -> dict[str, Any]:
    """``V3RuntimeReadiness`` of an app row: a failed app, then its primary allocation
    (``allocation``: that compute row's state, None when it has none or is unknown), a
    member whose allocation was released, then the runtime's health."""
    status = state["status"]
    if status == "failed":
        return _readiness(False, "error", "app_runtime_failed",
                          state.get("failure_reason") or "The app failed.")
    if status in GONE + TEARDOWN:
        return _readiness(False, "info", "runtime_readiness_unknown", STATUS_SUMMARIES[status])
    if allocation is not None and allocation["status"] != "active":
        return _readiness(False, "error", "allocation_not_active",
                          f"The allocation the app runs on is "
                          f"{allocation['status'].replace('_', ' ')}.")
    if any(m.get("health_status") == "allocation_released" and m["status"] == "failed"
           for m in state["members"].values()):
        return _readiness(False, "error", "allocation_not_active",
                          "An allocation a member ran on was released.")
    if status != "running":
        return _readiness(False, "info", "runtime_readiness_unknown", STATUS_SUMMARIES[status])
    health = state["runtime"].get("health_status")
    if health not in (None, "ok", "healthy", "ready", "idle"):
        return _readiness(False, "warn", "app_runtime_unhealthy",
                          f"The app reports its health as {health}.")
    return _readiness(True, "ok", "ready", "The app is running.")


def _task_correlation(steps: list[dict[str, Any]], task_id: str) -> str | None:
    return next((s["correlation_id"] for s in steps if s["task_id"] == task_id), None)


def lifecycle_actions(state: dict[str, Any], steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stop, start, restart, release (decommission) and open. ``enabled`` is the
    domain's own guard (``command_allowed``) on this state; the result hint names the
    last task the same command opened."""
    instance = instance_of(state)
    app_id, status = state["_id"], state["status"]
    actions = []
    for action, label, command in ROW_ACTIONS:
        allowed = command_allowed(instance, command)
        refused = None
        if not allowed:
            refused = f"A {status.replace('_', ' ')} app cannot be {label.lower()}ed."
            if instance.failed_teardown:
                refused = "The decommission failed: only decommission may be retried."
            elif command == "restart" and status in ("running", "failed") \
                    and not restart_safe(instance):
                refused = (f"A multi-member {state['spec']['runtime_backend']} runtime cannot "
                           "be restarted safely; use repair.")
        last = next((t for t in reversed(state["tasks"]) if t["operation"] == command), None)
        correlation = _task_correlation(steps, last["task_id"]) if last else None
        actions.append({
            "action": action, "label": label, "enabled": allowed, "disabled_reason": refused,
            "method": "POST", "href": f"/api/v1/apps/instances/{app_id}/{command}",
            "idempotency_required": True,
            "result": {"task_href": f"/api/v1/tasks/{last['task_id']}" if last else None,
                       "evidence_href": f"/api/v1/project/evidence/audit?correlation_id="
                                        f"{correlation}" if correlation else None,
                       "correlation_id": correlation}})
    actions.append({"action": "open", "label": "Open", "enabled": True, "disabled_reason": None,
                    "method": "GET", "href": f"/api/v1/workloads/{app_id}",
                    "idempotency_required": False,
                    "result": {"task_href": None, "evidence_href": None, "correlation_id": None}})
    return actions


def primary_action(state: dict[str, Any], kind: str) -> str:
    status = v3_status(state)
    if status in ("active", "idle"):
        return OPEN_ACTION.get(kind, "open")
    return {"failed": "review", "restart_failed": "review",
            "release_failed": "retry_release"}.get(status, "none")


def action_reason(state: dict[str, Any]) -> str | None:
    if v3_status(state) not in ACTION_STATUSES:
        return None
    return state.get("failure_reason") or f"The app failed during {state['failed_during']}."


def _placement(state: dict[str, Any], allocation: dict[str, Any] | None) -> dict[str, Any]:
    """Region, SKU and node of the row: from its primary allocation's compute row, else
    from its first platform-placed member."""
    member = primary_member(state) or {}
    if allocation is not None:
        lease = allocation["lease"]
        return {"region_code": lease.get("node_region_code") or lease.get("region_code"),
                "sku": lease["sku"], "node_id": lease["node_id"],
                "node_name": lease.get("node_hostname") or lease.get("host")}
    return {"region_code": None, "sku": (member.get("capacity") or {}).get("sku"),
            "node_id": member.get("bound_node_id"),
            "node_name": member.get("bound_node_resource_name")}


def app_workload_json(state: dict[str, Any], steps: list[dict[str, Any]], *, now: datetime,
                      open_rate: dict[str, Any] | None, usage_cost: dict[str, Any] | None,
                      owner_currency: str | None, allocation: dict[str, Any] | None,
                      funds: OwnerFunds | None, catalog_kind: str | None,
                      catalog_name: str | None = None) -> dict[str, Any]:
    """``V3WorkloadSummary`` of an app instance (§4.3). ``open_rate`` is Σ of its open
    ``app_runtime`` meters' hourly rates (None when none is open), ``usage_cost`` Σ of
    its ``app_runtime`` usage costs (None before any), ``owner_currency`` the payer's
    primary currency, ``allocation`` the compute row state of its primary allocation,
    ``funds`` the owner's account as the caller may see it, ``catalog_kind`` the app's
    V3 catalog kind (``domain.app_catalog_views.app_kind``; None when unknown) and
    ``catalog_name`` its catalog display name (``app_name``; the slug when unknown)."""
    spec, app_id = state["spec"], state["_id"]
    kind = workload_kind(catalog_kind)
    status = v3_status(state)
    rate, accrued = app_money(state, open_rate=open_rate, usage_cost=usage_cost,
                              owner_currency=owner_currency)
    projection = cost_projection(rate, accrued, funds, now)
    until = actionable_until(state, steps)
    required = status in ACTION_STATUSES
    actionable = required and until is not None and now < until
    archive = archive_after(state, steps)
    reason = action_reason(state)
    return {
        "id": app_id, "allocation_id": primary_allocation_id(state), "app_instance_id": app_id,
        "name": spec["display_name"], "kind": kind, "status": status,
        "project_id": spec["project_id"], "project_name": spec["project_id"],
        **_placement(state, allocation),
        "owner_user_id": spec["requested_by_user_id"],
        "owner_username": spec["requested_by_user_id"], "app_slug": spec["app_slug"],
        "app_name": catalog_name or spec["app_slug"], "created_at": steps[0]["at"],
        "active_at": state.get("active_at"), "hourly_rate": rate, "accrued_cost": accrued,
        "cost_projection": projection,
        "needs_action": actionable, "action_required": required, "is_actionable": actionable,
        "actionable_until": iso(until) if until else None,
        "archived_at": iso(archive) if archive is not None and archive <= now else None,
        "action_reason": reason, "runtime_readiness": runtime_readiness(state, allocation),
        "blocking_app_use": None, "primary_action": primary_action(state, kind),
        "connection_facts": {"hostname": None, "ip_address": None, "ssh_command": None,
                             "terminal_href": None, "app_url": None},
        "lifecycle_actions": lifecycle_actions(state, steps),
        "operator_state": operator_state("app_instance", app_id, status, family="app_recovery",
                                         actionable=actionable, required=required,
                                         reason=reason),
    }


def action_band_item(state: dict[str, Any]) -> dict[str, Any]:
    """The ``V3WorkloadActionBandItem`` of an app row inside its recovery window."""
    status, app_id = v3_status(state), state["_id"]
    title = {"failed": "App failed", "restart_failed": "App operation failed",
             "release_failed": "Decommission failed"}[status]
    retry = status == "release_failed"
    return {"severity": "warn" if status == "restart_failed" else "error",
            "code": f"app_{status}", "title": title,
            "summary": action_reason(state) or STATUS_SUMMARIES["failed"],
            "workload_id": app_id, "action_label": "Retry decommission" if retry else "Review",
            "action_href": f"/api/v1/workloads/{app_id}"}


# ---- the workload detail ----------------------------------------------------------------
def _events(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    items = [{"occurred_at": s["at"], "actor": s["actor_type"],
              "action": f"app.instance.{s['trigger']}", "status": s["to"],
              "source": "app_instance", "summary": s["reason"] or STATUS_SUMMARIES[s["to"]]}
             for s in steps]
    return sorted(items, key=lambda item: item["occurred_at"], reverse=True)


def _lifecycle(state: dict[str, Any], steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    last = len(steps) - 1
    items = []
    for index, step in enumerate(steps):
        to = step["to"]
        mark = ("failed" if to == "failed" else
                "current" if index == last and to not in GONE else "completed")
        items.append({"label": to.replace("_", " ").capitalize(), "status": mark,
                      "occurred_at": step["at"], "summary": step["reason"] or STATUS_SUMMARIES[to]})
    ahead = {"requested": ("deploying", "running"), "deploying": ("running",),
             "starting": ("running",), "restarting": ("running",), "upgrading": ("running",),
             "rolling_back": ("running",), "stopping": ("stopped",),
             "decommissioning": ("decommissioned",), "deleting": ("deleted",)}.get(
        state["status"], ())
    items += [{"label": to.replace("_", " ").capitalize(), "status": "pending",
               "occurred_at": None, "summary": STATUS_SUMMARIES[to]} for to in ahead]
    return items


def app_workload_detail(state: dict[str, Any], steps: list[dict[str, Any]],
                        workload: dict[str, Any], now: datetime,
                        allocation: dict[str, Any] | None) -> dict[str, Any]:
    """``V3WorkloadDetailResponse`` without ``meta``, around the row ``workload``."""
    spec, app_id = state["spec"], state["_id"]
    events = _events(steps)
    age = max(0, int((now - parse(steps[0]["at"])).total_seconds()))
    lease = allocation["lease"] if allocation is not None else {}
    member = primary_member(state) or {}
    running = state["status"] == "running"
    return {
        "workload": workload,
        "context": {"project": workload["project_name"], "region": workload["region_code"],
                    "node": workload["node_name"], "owner": workload["owner_username"],
                    "age_seconds": age},
        "tabs": {
            "overview": {"lifecycle": _lifecycle(state, steps), "recent_activity": events[:5],
                         "summary": STATUS_SUMMARIES[state["status"]]},
            "connect": {"primary_action": workload["primary_action"], "terminal_href": None,
                        "ssh_command": None, "ssh_keys": [], "app_url": None,
                        "proxy_status": "proxy_disabled",
                        "notes": [] if running else ["The app's endpoints appear while it runs."]},
            "metrics": {"source": "unavailable", "snapshot_href": None, "timeseries_href": None,
                        "sampled_at": None, "capabilities": []},
            "events": {"items": events, "timeline_href": f"/api/v1/apps/instances/{app_id}"},
            "storage": {"mounts": [], "storage_href": None},
            "config": {"scheduler_type": spec["runtime_backend"],
                       "capacity_shape": lease.get("capacity_shape") or "app_runtime",
                       "placement_status": "placed" if state["members"] else "unplaced",
                       "sku": workload["sku"] or "",
                       "gpus_total": int(lease.get("gpus_total") or member.get("gpus_total") or 0),
                       "effective_config": {"app_slug": spec["app_slug"],
                                            "app_version": state["app_version"],
                                            "operating_mode": spec["operating_mode"],
                                            "control_plane_scope": spec["control_plane_scope"],
                                            "runtime_backend": spec["runtime_backend"]},
                       "credential_posture": []},
        },
        "runtime_presentation": None,
    }


# ---- tasks ---------------------------------------------------------------------------------
def _walk(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The launch and lifecycle tasks the steps opened, in order: kind, operation,
    status and the indexes of the steps that opened, last changed and closed each. A
    step first moves the open tasks, then opens its own."""
    tasks: list[dict[str, Any]] = []
    for index, step in enumerate(steps):
        for task in tasks:
            if task["status"] in TASK_FINAL:
                continue
            moves = LAUNCH_MOVES if task["kind"] == "launch" else OPERATION_MOVES[task["operation"]]
            moved = moves.get(step["to"], "canceled")
            if moved != task["status"]:
                task.update(status=moved, changed=index,
                            closed=index if moved in TASK_FINAL else None)
        if step["task_id"]:
            launch = step["trigger"] == "create"
            tasks.append({"id": step["task_id"], "kind": "launch" if launch else "app_operation",
                          "operation": "launch" if launch else step["trigger"],
                          "status": "queued" if launch else "running", "opened": index,
                          "changed": index, "closed": None})
    return tasks


def _task(state: dict[str, Any], *, task_id: str, kind: str, title: str, status: str,
          summary: str, correlation: str | None, created: str, updated: str,
          completed: str | None) -> dict[str, Any]:
    app_id, spec = state["_id"], state["spec"]
    failed = status == "failed"
    return {"id": task_id, "kind": kind, "status": status, "title": title, "summary": summary,
            "resource_kind": "app_instance", "resource_id": app_id,
            "resource_name": spec["display_name"], "project_id": spec["project_id"],
            "project_name": spec["project_id"], "correlation_id": correlation,
            "created_at": created, "updated_at": updated, "completed_at": completed,
            "primary_action": {
                "label": "View evidence" if failed and correlation else "Open workload",
                "href": f"/api/v1/project/evidence/audit?correlation_id={correlation}"
                if failed and correlation else f"/api/v1/workloads/{app_id}",
                "kind": "view_logs" if failed and correlation else "open_resource"}}


def _lifecycle_task(state: dict[str, Any], steps: list[dict[str, Any]],
                    task: dict[str, Any]) -> dict[str, Any]:
    name = state["spec"]["display_name"]
    opened, changed = steps[task["opened"]], steps[task["changed"]]
    closed = steps[task["closed"]] if task["closed"] is not None else None
    status = task["status"]
    operation = task["operation"].replace("_", " ")
    summary = (closed["reason"] if status == "failed" and closed and closed["reason"] else
               f"{operation.capitalize()} {status}." if status in TASK_FINAL else
               STATUS_SUMMARIES[changed["to"]])
    items = [_item("accepted", "accepted", "succeeded", opened["at"], opened["at"],
                   "The request was accepted.", "synthetic")]
    end = task["closed"] if task["closed"] is not None else len(steps)
    for index in range(task["opened"], end):
        step = steps[index]
        following = steps[index + 1] if index + 1 < len(steps) else None
        current = following is None
        items.append(_item("workflow", step["to"], "running" if current else "succeeded",
                           step["at"], None if current else following["at"],
                           STATUS_SUMMARIES[step["to"]], "app_instance"))
    if closed is not None:
        items.append(_item("failure" if status == "failed" else "completion", closed["to"],
                           status, closed["at"], closed["at"], summary, "app_instance"))
    return {"task": _task(state, task_id=task["id"], kind=task["kind"],
                          title=f"{operation.capitalize()} {name}", status=status,
                          summary=summary, correlation=opened["correlation_id"],
                          created=opened["at"], updated=changed["at"],
                          completed=closed["at"] if closed else None),
            "timeline": items}


def _operation_task(state: dict[str, Any], op: dict[str, Any], title: str) -> dict[str, Any]:
    """A member or repair operation's task: its status is the operation's."""
    status = OP_TASK_STATUS[op["status"]]
    summary = op.get("last_error_message") or f"{title} {status}."
    items = [_item("accepted", "accepted", "succeeded", op["created_at"], op["created_at"],
                   "The request was accepted.", "synthetic")]
    if op["started_at"]:
        finished = op["completed_at"]
        items.append(_item("workflow", "in_progress", "succeeded" if finished else "running",
                           op["started_at"], finished, "The adapter is working on it.",
                           "app_instance"))
    if op["completed_at"]:
        items.append(_item("failure" if status == "failed" else "completion", op["status"],
                           status, op["completed_at"], op["completed_at"], summary,
                           "app_instance"))
    return {"task": _task(state, task_id=op["task_id"], kind="app_operation", title=title,
                          status=status, summary=summary, correlation=op["correlation_id"],
                          created=op["created_at"], updated=op["updated_at"],
                          completed=op["completed_at"]),
            "timeline": items}


def app_tasks(state: dict[str, Any], steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every V3 task of an app instance (§4.3): ``{"task": V3TaskSummary, "timeline":
    [V3TaskTimelineItem]}`` — the launch (``kind=launch``), each accepted lifecycle
    command, member operation and (not dry-run) repair (``kind=app_operation``). Ids are
    the ones the commands handed back."""
    name = state["spec"]["display_name"]
    found = [_lifecycle_task(state, steps, task) for task in _walk(steps)]
    for op in state["member_ops"].values():
        if op.get("task_id"):
            found.append(_operation_task(
                state, op, f"{op['action'].capitalize()} "
                           f"{op.get('component_key') or 'member'} on {name}"))
    for op in state["repair_ops"].values():
        if op.get("task_id"):
            found.append(_operation_task(state, op, f"{op['action'].capitalize()} {name}"))
    return found


__all__ = ["app_step_of", "app_workload_json", "app_workload_detail", "app_tasks",
           "action_band_item", "blocking_app_use", "bound_allocations", "meter_rate",
           "v3_status", "workload_kind"]
