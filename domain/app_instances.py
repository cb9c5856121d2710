"""App instances: the ``AppInstance`` aggregate, its members and member and repair
operations, and every command of app-instances §1.1/§1.2 that writes.

An ``AppInstance`` keeps its members, member operations and repair operations inside
it (§6.1), so the count, single-flight and terminal rules share one consistency
boundary. Its status follows §3.1; commands move it into a requested state and the
app's adapter reports progress (``report_app_instance``). Reports are idempotent by
content: a report is applied as absolute values (the keys it carries replace, the
keys it omits are kept), so applying it a second time finds nothing to change and
appends nothing; a report that is not an edge of §3.1 from the current status (a late
``deploying`` after ``running``, anything after Gone that would change something) is
409 ``app_instance_state_invalid`` and changes nothing.

Everything that follows the instance's state is moved in the same save by one function,
``settle``, derived from the state alone:

- **Capacity.** A member of a manifest ``components`` entry, or of an ``add`` whose
  ``allocation_intent`` names a ``sku``, claims capacity through ``domain.placement``
  (the member id is the claim's ``allocation_id``; after a stop, a new placement uses
  ``uuid5(member, n)``, because a claim id names its node and a released claim keeps
  it). Claims are ``reserved`` until the runtime first runs (``provisioning`` while
  ``deploying``), ``active`` while it is up, ``releasing`` in teardown (or when the
  member is ``deleting``), and released when the instance stops or is Gone, or the
  member is ``deleted``. ``start`` places them again (or is refused).
- **Bindings.** Members of the ``placement_intent`` are bound to existing active
  allocations of the project (``AllocationAppUse``, one live app per allocation);
  they claim nothing (their allocation holds the node and bills itself).
- **Metering.** While the runtime is up (from the first entry into ``running`` after
  create or start until ``stopped`` or Gone) an ``app_runtime`` meter runs for each
  capacity member (the SKU's price) and, for a ``platform_managed`` instance, for each
  manifest ``pricing`` component (its price). Meter ids are
  ``usage_id_for_app(instance, component, cycle)`` with ``cycle`` counting placements
  (create is 0, each start adds one), component ``member:{id}`` for members.
- **Quota and bindings end at Gone**: ``ProjectAppQuota`` retires the instance and
  every binding is released; every member is ``deleted``.

Admission (create, start, upgrade, and ``add`` operations) passes the same financial
gate as allocations (``domain.admission.financial_gate``, on the payer: the user who
created the instance). Commands answer JSON the API returns as is (``instance_json``,
``member_json``, ``member_operation_json``, ``repair_operation_json``, built in
``domain.app_instance_views`` and importable from here).
"""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate

from domain.admission import financial_gate, personal_org_id
from domain.allocations import Allocation, get_allocation
from domain.app_instance_views import (instance_json, member_json, member_operation_json,
                                       placement_json, repair_operation_json,
                                       v3_operation_json)
from domain.apps import (entitlement_of, get_app, newest_entitled_version, require_entitled)
from domain.billing import account_id_for
from domain.commands import Command, Render, Session
from domain.errors import DomainError
from domain.inventory import LIVE as LIVE_CLAIMS
from domain.inventory import NodeInventory
from domain.money import Money
from domain.placement import advance, release, reserve
from domain.provenance import CommandContext
from domain.restrictions import restriction_id_for
from domain.skus import NAMESPACE, get_sku, iso, refusal
from domain.usage import Meter, Price, open_meter, stop_meter, units_for, usage_id_for_app

# ---- the state machines (§3) ---------------------------------------------------------------
STATUSES = ("requested", "deploying", "running", "stopping", "stopped", "starting",
            "restarting", "upgrading", "rolling_back", "failed", "decommissioning",
            "decommissioned", "deleting", "deleted")
TRANSITIONAL = ("stopping", "starting", "restarting", "upgrading", "rolling_back")
TEARDOWN = ("decommissioning", "deleting")
GONE = ("decommissioned", "deleted")
LIVE = tuple(s for s in STATUSES if s not in GONE)
#: what a command moves the instance to, and from where (§3.1); ``complete_stop`` is
#: the internal stop completion (adapters cannot report ``stopped``, §8 Q1)
COMMAND_EDGES: dict[str, tuple[tuple[str, ...], str]] = {
    "stop": (("running", "failed"), "stopping"),
    "complete_stop": (("stopping",), "stopped"),
    "start": (("stopped",), "starting"),
    "restart": (("running", "failed"), "restarting"),
    "upgrade": (("running", "failed"), "upgrading"),
    "rollback": (("running", "failed"), "rolling_back"),
    "decommission": (tuple(s for s in LIVE if s not in TEARDOWN), "decommissioning"),
}
#: commands a ``failed`` instance refuses after a failed decommission (only a retry of
#: the decommission moves it on)
AFTER_FAILED_TEARDOWN = ("decommission",)
REPORTABLE = ("deploying", "running", "failed", "decommissioning", "decommissioned",
              "deleting", "deleted")
#: a reported status -> the statuses it moves the instance from (§3.1)
REPORT_FROM: dict[str, tuple[str, ...]] = {
    "deploying": ("requested",),
    "running": ("requested", "deploying", "starting", "restarting", "upgrading",
                "rolling_back", "failed"),
    "failed": ("requested", "deploying", "running", "stopping", "starting", "restarting",
               "upgrading", "rolling_back", "decommissioning", "deleting"),
    "decommissioning": (),
    "deleting": ("decommissioning",),
    "decommissioned": ("decommissioning", "deleting", "failed"),
    "deleted": ("decommissioning", "deleting", "failed", "decommissioned"),
}
#: a reported status -> the statuses where it is progress: status kept, fields observed
REPORT_PROGRESS: dict[str, tuple[str, ...]] = {
    "deploying": ("deploying",) + TRANSITIONAL, "running": ("running",),
    "failed": ("failed",), "decommissioning": ("decommissioning",), "deleting": ("deleting",),
    "decommissioned": ("decommissioned",), "deleted": ("deleted",)}
#: the phase a failure interrupted (``failed_during``)
FAILED_DURING = {"requested": "deploy", "deploying": "deploy", "running": "runtime",
                 "stopping": "stop", "starting": "start", "restarting": "restart",
                 "upgrading": "upgrade", "rolling_back": "rollback",
                 "decommissioning": "decommission", "deleting": "decommission"}
RUNTIME_FIELDS = ("phase", "progress", "health_status", "health_detail", "runtime_state")
OBJECT_FIELDS = ("progress", "health_detail", "runtime_state")

MEMBER_STATUSES = ("requested", "reconciling", "ready", "draining", "deleting", "failed",
                   "deleted")
#: §3.2
MEMBER_EDGES: dict[str, tuple[str, ...]] = {
    "requested": ("reconciling", "ready", "failed"),
    "reconciling": ("ready", "failed"),
    "ready": ("reconciling", "draining", "deleting", "failed"),
    "draining": ("ready", "deleting", "failed"),
    "failed": ("reconciling", "deleting", "deleted"),
    "deleting": ("deleted", "failed"),
    "deleted": ()}
#: statuses a member reported into existence may start in
MEMBER_INITIAL = ("requested", "reconciling", "ready", "failed")
MEMBER_FIELDS = ("bound_node_id", "bound_allocation_id", "member_role", "runtime_state",
                 "health_status", "health_detail", "endpoint", "adapter_detail")

OP_STATUSES = ("accepted", "in_progress", "succeeded", "failed", "cancelled")
OP_TERMINAL = ("succeeded", "failed", "cancelled")
OP_OPEN = ("accepted", "in_progress")
#: §3.3: where an operation report may move an operation
OP_EDGES = {"accepted": ("in_progress",) + OP_TERMINAL, "in_progress": ("in_progress",) + OP_TERMINAL}
MEMBER_ACTIONS = ("add", "drain", "remove", "replace")
#: instance statuses that take member and repair operations (never a failed teardown)
MEMBER_OP_FROM = ("requested", "deploying", "running", "failed")
REPAIR_FROM = ("running", "failed")
REPAIR_ACTIONS = ("reconcile", "repair")
REPAIR_SCOPES = ("whole_runtime", "control_plane", "member")
STEP_STATUSES = ("pending", "running", "succeeded", "failed", "skipped")
STEP_RANK = {"pending": 0, "running": 1, "succeeded": 2, "failed": 2, "skipped": 2}
PLANNED_STEPS = {"reconcile": ("diagnose", "reconcile"), "repair": ("diagnose", "repair", "verify")}
MAX_COUNT = 16
#: placement-intent references -> (component_key and member_role)
PLACEMENT_ROLES = (("target_allocation_id", "workload"), ("controller_allocation_id", "controller"),
                   ("server_allocation_id", "server"))
#: backends whose multi-member runtimes cannot be restarted safely (use repair)
RESTART_UNSAFE_BACKENDS = ("k8s", "rke2")
#: claim statuses in the order a capacity member's claims go through them
CLAIM_ORDER = ("reserved", "provisioning", "active", "releasing", "released")


def quota_id_for(project_id: UUID | str) -> UUID:
    return uuid5(NAMESPACE, f"appq:{project_id}")


def app_use_id_for(allocation_id: UUID | str) -> UUID:
    return uuid5(NAMESPACE, f"alloc-app:{allocation_id}")


def instance_id_for(causation_id: str | None) -> UUID:
    return uuid5(NAMESPACE, f"app-instance:{causation_id}")


def claim_holder_for(member_id: str, placement: int) -> str:
    """The ``allocation_id`` a capacity member's claims are held under: the member id
    for its first placement, then one id per placement (a claim id names its node and a
    released claim keeps it, so a member placed again needs a new holder)."""
    return member_id if placement == 0 else str(uuid5(NAMESPACE, f"app-member-claim:{member_id}:{placement}"))


def task_id_for(kind: str, app_instance_id: UUID | str, version: int) -> UUID:
    """§4.3: ``uuid5("{kind}:{id}:{aggregate_version}")``."""
    return uuid5(NAMESPACE, f"{kind}:{app_instance_id}:{version}")


def member_meter_component(member_id: str) -> str:
    return f"member:{member_id}"


# ---- aggregates ------------------------------------------------------------------------------
class ProjectAppQuota(Aggregate):
    """The project's live (not Gone) app instances: what ``max_instances`` counts."""

    TOPIC = "ledgercore.ProjectAppQuota"

    class Created(Aggregate.Created):
        TOPIC = "ledgercore.ProjectAppQuotaOpened"
        project_id: str

    class Admitted(Aggregate.Event):
        TOPIC = "ledgercore.AppInstanceAdmitted"
        app_instance_id: str
        app_slug: str
        provenance: dict[str, Any]

        def apply(self, q: ProjectAppQuota) -> None:
            q.live[self.app_instance_id] = self.app_slug

    class Retired(Aggregate.Event):
        TOPIC = "ledgercore.AppInstanceRetired"
        app_instance_id: str
        provenance: dict[str, Any]

        def apply(self, q: ProjectAppQuota) -> None:
            q.live.pop(self.app_instance_id, None)

    def __init__(self, project_id: str):
        self.project_id = project_id
        self.live: dict[str, str] = {}

    def count(self, slug: str) -> int:
        return sum(1 for s in self.live.values() if s == slug)


class AllocationAppUse(Aggregate):
    """Which app members use an allocation (an allocation serves at most one live app)."""

    TOPIC = "ledgercore.AllocationAppUse"

    class Created(Aggregate.Created):
        TOPIC = "ledgercore.AllocationAppUseOpened"
        allocation_id: str

    class Bound(Aggregate.Event):
        TOPIC = "ledgercore.AllocationAppBound"
        app_instance_id: str
        member_id: str
        component_key: str
        member_role: str | None
        shared: bool
        provenance: dict[str, Any]

        def apply(self, u: AllocationAppUse) -> None:
            u.bindings[self.member_id] = {"app_instance_id": self.app_instance_id,
                                          "component_key": self.component_key,
                                          "member_role": self.member_role, "shared": self.shared}

    class Unbound(Aggregate.Event):
        TOPIC = "ledgercore.AllocationAppUnbound"
        app_instance_id: str
        member_id: str
        reason: str
        provenance: dict[str, Any]

        def apply(self, u: AllocationAppUse) -> None:
            u.bindings.pop(self.member_id, None)

    def __init__(self, allocation_id: str):
        self.allocation_id = allocation_id
        self.bindings: dict[str, dict[str, Any]] = {}

    def instances(self) -> set[str]:
        return {b["app_instance_id"] for b in self.bindings.values()}


class AppInstance(Aggregate):
    TOPIC = "ledgercore.AppInstance"

    class Created(Aggregate.Created):
        """``AppInstanceRequested``: the identity, modes and request, frozen."""

        TOPIC = "ledgercore.AppInstanceRequested"
        spec: dict[str, Any]
        app_version: str
        provenance: dict[str, Any]

    class Moved(Aggregate.Event):
        """One §3.1 edge. ``trigger`` is the command (or ``report``); ``details`` carry
        ``failed_during``/``failure_reason``, ``from_version``/``to_version``,
        ``legacy_delete``, ``via``; ``runtime`` the runtime fields a report set."""

        TOPIC = "ledgercore.AppInstanceMoved"
        from_status: str
        to: str
        trigger: str
        task_id: str | None
        details: dict[str, Any]
        runtime: dict[str, Any]
        provenance: dict[str, Any]

        def apply(self, i: AppInstance) -> None:
            i.status = self.to
            i.runtime.update(self.runtime)
            details = self.details
            if self.to == "failed":
                i.failure_reason = details.get("failure_reason")
                i.failed_during = details["failed_during"]
            else:
                i.failure_reason = i.failed_during = None
            if details.get("to_version"):
                i.app_version = details["to_version"]
            if self.to == "running":
                if i.app_version not in i.deployed_versions:
                    i.deployed_versions.append(i.app_version)
                i.active_at = i.active_at or iso(self.timestamp)
                i.runtime_up = True
            if self.to == "stopped" or self.to in GONE:
                i.runtime_up = False
            if self.to == "starting":
                i.placement_cycle += 1
            if self.task_id:
                i.tasks.append({"task_id": self.task_id, "operation": self.trigger,
                                "at": iso(self.timestamp)})

    class RuntimeObserved(Aggregate.Event):
        """A report that changed runtime fields (or ``failure_reason``) but not the
        status. ``source``: ``instance_report`` or ``repair_report``."""

        TOPIC = "ledgercore.AppInstanceRuntimeObserved"
        fields: dict[str, Any]
        source: str
        provenance: dict[str, Any]

        def apply(self, i: AppInstance) -> None:
            for key, value in self.fields.items():
                if key == "failure_reason":
                    i.failure_reason = value
                else:
                    i.runtime[key] = value

    class MemberMaterialized(Aggregate.Event):
        TOPIC = "ledgercore.AppInstanceMemberMaterialized"
        member: dict[str, Any]
        provenance: dict[str, Any]

        def apply(self, i: AppInstance) -> None:
            at = iso(self.timestamp)
            member = {"id": self.member["id"], "app_instance_id": str(i.id),
                      "component_key": self.member["component_key"],
                      "member_role": self.member.get("member_role"),
                      "status": self.member["status"],
                      "bound_node_id": self.member.get("bound_node_id"),
                      "bound_node_resource_name": self.member.get("bound_node_resource_name"),
                      "bound_allocation_id": self.member.get("bound_allocation_id"),
                      "runtime_state": None, "health_status": None, "health_detail": None,
                      "endpoint": None, "adapter_detail": None,
                      "last_operation_id": self.member.get("source_operation_id"),
                      "last_correlation_id": self.member.get("correlation_id"),
                      "created_at": at, "updated_at": at,
                      "source": self.member["source"],
                      "source_operation_id": self.member.get("source_operation_id"),
                      "capacity": self.member.get("capacity"),
                      "holder_id": None, "claim_node_id": None, "claim_ids": [],
                      "gpus_total": None, "placements": 0}
            member.update(self.member.get("fields") or {})
            i.members[member["id"]] = member
            operation = i.member_ops.get(self.member.get("source_operation_id") or "")
            if operation is not None:
                operation["materialized"].append(member["id"])

    class MemberChanged(Aggregate.Event):
        """A member's status and/or fields changed; ``reason`` names a platform-driven
        change (``instance_decommissioning``, ``instance_gone``, ``allocation_released``)."""

        TOPIC = "ledgercore.AppInstanceMemberChanged"
        member_id: str
        from_status: str
        status: str
        changes: dict[str, Any]
        operation_id: str | None
        correlation_id: str | None
        reason: str | None
        provenance: dict[str, Any]

        def apply(self, i: AppInstance) -> None:
            member = i.members[self.member_id]
            member.update(self.changes)
            member["status"] = self.status
            member["updated_at"] = iso(self.timestamp)
            if self.operation_id:
                member["last_operation_id"] = self.operation_id
                member["last_correlation_id"] = self.correlation_id

    class MemberPlaced(Aggregate.Event):
        """A capacity member's claims were reserved on a node (``cycle`` = the
        instance's placement cycle)."""

        TOPIC = "ledgercore.AppInstanceMemberPlaced"
        member_id: str
        holder_id: str
        node_id: str
        node_resource_name: str | None
        claim_ids: list[str]
        gpus_total: int
        units: int
        cycle: int
        provenance: dict[str, Any]

        def apply(self, i: AppInstance) -> None:
            member = i.members[self.member_id]
            member.update(holder_id=self.holder_id, claim_node_id=self.node_id,
                          claim_ids=list(self.claim_ids), gpus_total=self.gpus_total,
                          units=self.units,
                          bound_node_id=self.node_id,
                          bound_node_resource_name=self.node_resource_name,
                          placements=member["placements"] + 1,
                          placement_cycle=self.cycle, updated_at=iso(self.timestamp))

    class MemberOperationRequested(Aggregate.Event):
        TOPIC = "ledgercore.AppMemberOperationRequested"
        operation: dict[str, Any]
        provenance: dict[str, Any]

        def apply(self, i: AppInstance) -> None:
            at = iso(self.timestamp)
            i.member_ops[self.operation["id"]] = {
                **self.operation, "app_instance_id": str(i.id), "status": "accepted",
                "last_error_code": None, "last_error_message": None, "created_at": at,
                "updated_at": at, "started_at": None, "completed_at": None,
                "materialized": []}

    class MemberOperationProgressed(Aggregate.Event):
        TOPIC = "ledgercore.AppMemberOperationProgressed"
        operation_id: str
        from_status: str
        status: str
        changes: dict[str, Any]
        provenance: dict[str, Any]

        def apply(self, i: AppInstance) -> None:
            _progress(i.member_ops[self.operation_id], self.status, self.changes,
                      iso(self.timestamp))

    class RepairOperationRequested(Aggregate.Event):
        TOPIC = "ledgercore.AppRepairOperationRequested"
        operation: dict[str, Any]
        provenance: dict[str, Any]

        def apply(self, i: AppInstance) -> None:
            at = iso(self.timestamp)
            done = self.operation["dry_run"]
            i.repair_ops[self.operation["id"]] = {
                **self.operation, "app_instance_id": str(i.id),
                "status": "succeeded" if done else "accepted", "phase": None,
                "progress": None, "last_error_code": None, "last_error_message": None,
                "created_at": at, "updated_at": at, "started_at": at if done else None,
                "completed_at": at if done else None}

    class RepairOperationProgressed(Aggregate.Event):
        TOPIC = "ledgercore.AppRepairOperationProgressed"
        operation_id: str
        from_status: str
        status: str
        changes: dict[str, Any]
        provenance: dict[str, Any]

        def apply(self, i: AppInstance) -> None:
            _progress(i.repair_ops[self.operation_id], self.status, self.changes,
                      iso(self.timestamp))

    def __init__(self, spec: dict[str, Any], app_version: str, provenance: dict[str, Any]):
        self.spec = dict(spec)
        self.status = "requested"
        self.app_version = app_version
        self.failure_reason: str | None = None
        self.failed_during: str | None = None
        self.runtime: dict[str, Any] = {"phase": None, "progress": {}, "health_status": None,
                                        "health_detail": {}, "runtime_state": {}}
        self.deployed_versions: list[str] = []
        self.active_at: str | None = None
        #: the runtime has run since the last placement and not stopped since (metered)
        self.runtime_up = False
        #: placements of capacity: create is 0, each start adds one
        self.placement_cycle = 0
        self.members: dict[str, dict[str, Any]] = {}
        self.member_ops: dict[str, dict[str, Any]] = {}
        self.repair_ops: dict[str, dict[str, Any]] = {}
        self.tasks: list[dict[str, Any]] = []

    # ---- derived ---------------------------------------------------------------------
    @property
    def gone(self) -> bool:
        return self.status in GONE

    @property
    def failed_teardown(self) -> bool:
        return self.status == "failed" and self.failed_during == "decommission"

    def live_members(self) -> list[dict[str, Any]]:
        return [m for m in self.members.values() if m["status"] != "deleted"]

    def open_member_ops(self) -> list[dict[str, Any]]:
        return [op for op in self.member_ops.values() if op["status"] in OP_OPEN]

    def open_repairs(self) -> list[dict[str, Any]]:
        return [op for op in self.repair_ops.values() if op["status"] in OP_OPEN]

    def payer(self) -> UUID:
        return UUID(self.spec["requested_by_user_id"])

    def tenant(self) -> UUID | None:
        tenant = self.spec.get("tenant_id")
        return UUID(tenant) if tenant else None

    def project(self) -> UUID:
        return UUID(self.spec["project_id"])

    def metered_platform(self) -> bool:
        """§4.2: an ``app_runtime`` price is metered only for capacity the platform runs."""
        return (self.spec["operating_mode"] == "platform_managed"
                or self.spec["control_plane_scope"] == "platform")


def _progress(operation: dict[str, Any], status: str, changes: dict[str, Any], at: str) -> None:
    operation.update(changes)
    operation["status"] = status
    operation["updated_at"] = at
    if status != "accepted" and operation["started_at"] is None:
        operation["started_at"] = at
    if status in OP_TERMINAL:
        operation["completed_at"] = at


# ---- guards other layers read (V3 ``lifecycle_actions``: enabled ⇔ the POST is accepted) ----
def restart_safe(instance: AppInstance) -> bool:
    """Multi-member K8s/RKE2 runtimes are restart-unsafe: 409, use repair."""
    return not (instance.spec["runtime_backend"] in RESTART_UNSAFE_BACKENDS
                and len(instance.live_members()) > 1)


def command_allowed(instance: AppInstance, command: str) -> bool:
    """Whether ``command`` would pass the state guard now (decommission in Teardown or
    Gone is an accepted no-op and answers True)."""
    if command == "decommission" and instance.status in TEARDOWN + GONE:
        return True
    sources, _ = COMMAND_EDGES[command]
    if instance.status not in sources:
        return False
    if instance.failed_teardown and command not in AFTER_FAILED_TEARDOWN:
        return False
    return command != "restart" or restart_safe(instance)


def report_effect(instance: AppInstance, reported: str) -> str | None:
    """``move`` (a §3.1 edge), ``observe`` (progress: status kept) or None (409)."""
    current = instance.status
    if reported == current or current in REPORT_PROGRESS.get(reported, ()):
        return "observe"
    if current not in REPORT_FROM.get(reported, ()):
        return None
    if current == "failed":
        # a failed teardown only finishes; any other failure does not tear down by report
        teardown_end = reported in GONE
        return "move" if teardown_end == instance.failed_teardown else None
    return "move"


# ---- refusals ---------------------------------------------------------------------------------
def _state_invalid(instance: AppInstance, message: str, **details: Any) -> DomainError:
    return refusal("app_instance_state_invalid", "conflict", message,
                   app_instance_id=str(instance.id), current_status=instance.status, **details)


def _not_found(resource: str, **details: Any) -> DomainError:
    return refusal("app_instance_not_found", "not_found", f"{resource.replace('_', ' ')} not found",
                   resource=resource, **details)


def _invalid(message: str, reason: str, **details: Any) -> DomainError:
    return refusal("invalid_request", "invalid", message, reason=reason, **details)


def get_app_instance(session: Session, app_instance_id: UUID,
                     project_id: UUID | None = None) -> AppInstance:
    """The instance, or 404; one of another project is 404 exactly like a random id."""
    instance = session.get(app_instance_id)
    if not isinstance(instance, AppInstance) or (
            project_id is not None and instance.spec["project_id"] != str(project_id)):
        raise _not_found("app_instance", app_instance_id=str(app_instance_id))
    return instance


def _member(instance: AppInstance, member_id: str | UUID) -> dict[str, Any]:
    member = instance.members.get(str(member_id))
    if member is None:
        raise _not_found("member", app_instance_id=str(instance.id), member_id=str(member_id))
    return member


def _guard(instance: AppInstance, command: str) -> None:
    sources, _ = COMMAND_EDGES[command]
    if instance.status not in sources:
        raise _state_invalid(instance, f"cannot {command.replace('_', ' ')} a {instance.status} "
                             "app instance", allowed_from=list(sources))
    if instance.failed_teardown and command not in AFTER_FAILED_TEARDOWN:
        raise _state_invalid(instance, "the instance failed while being decommissioned: only "
                             "decommission may be retried", allowed_from=list(sources),
                             reason="decommission_failed")


# ---- what follows the state (one function, one save) -----------------------------------
def _unique(changed: list[Any]) -> list[Any]:
    return list({aggregate.id: aggregate for aggregate in changed}.values())


def claim_target(instance: AppInstance, member: dict[str, Any]) -> str:
    """Where a capacity member's claims belong now (claims only ever move forward)."""
    if instance.gone or instance.status == "stopped" or member["status"] == "deleted":
        return "released"
    if instance.status in TEARDOWN or instance.failed_teardown or member["status"] == "deleting":
        return "releasing"
    if instance.runtime_up:
        return "active"
    return "provisioning" if instance.status == "deploying" else "reserved"


def _sync_claims(session: Session, ctx: CommandContext, instance: AppInstance,
                 member: dict[str, Any]) -> list[Any]:
    if not member.get("holder_id"):
        return []
    node = session.get(UUID(member["claim_node_id"]))
    if not isinstance(node, NodeInventory):
        return []
    holder = UUID(member["holder_id"])
    live = [c for c in node.claims_of(str(holder)) if c["status"] in LIVE_CLAIMS]
    if not live:
        return []
    target = claim_target(instance, member)
    if target == "released":
        release(session, ctx, node_id=node.node_id, allocation_id=holder)
        return [node]
    current = CLAIM_ORDER.index(live[0]["status"])
    wanted = CLAIM_ORDER.index(target)
    if wanted <= current:
        return []
    steps = ["releasing"] if target == "releasing" else list(CLAIM_ORDER[current + 1:wanted + 1])
    for step in steps:
        advance(session, ctx, node_id=node.node_id, allocation_id=holder, to=step)
    return [node]


def meter_plan(instance: AppInstance) -> tuple[dict[UUID, tuple[Meter, Price | None]], list[UUID]]:
    """(the meters that must be open now, with what they bill; every meter id of the
    current placement cycle that may exist)."""
    cycle, spec = instance.placement_cycle, instance.spec
    base = {"usage_source": "app_runtime", "requested_by_user_id": instance.payer(),
            "app_instance_id": instance.id, "org_id": UUID(spec["org_id"]),
            "project_id": instance.project(), "operating_mode": spec["operating_mode"],
            "control_plane_scope": spec["control_plane_scope"],
            "runtime_backend": spec["runtime_backend"]}
    wanted: dict[UUID, tuple[Meter, Price | None]] = {}
    candidates: list[UUID] = []
    if instance.metered_platform():
        for price in spec.get("pricing") or []:
            record_id = usage_id_for_app(instance.id, price["component"], cycle)
            candidates.append(record_id)
            if instance.runtime_up:
                unit = price["unit_price"]
                wanted[record_id] = (
                    Meter(units=1, usage_unit=price["usage_unit"], control_plane_component=True,
                          **base),
                    Price(unit_price=Money(unit["amount_minor"], unit["currency"]),
                          usage_unit=price["usage_unit"], pricing_source="app_manifest"))
    for member in instance.members.values():
        if member.get("capacity") is None:
            continue
        record_id = usage_id_for_app(instance.id, member_meter_component(member["id"]), cycle)
        candidates.append(record_id)
        if instance.runtime_up and member["status"] != "deleted" and member.get("holder_id") \
                and member.get("placement_cycle") == cycle:
            wanted[record_id] = (Meter(units=member["units"], sku=member["capacity"]["sku"],
                                       **base), None)
    return wanted, candidates


def _sync_meters(session: Session, ctx: CommandContext, instance: AppInstance) -> list[Any]:
    changed: list[Any] = []
    wanted, candidates = meter_plan(instance)
    for record_id in candidates:
        if record_id in wanted:
            meter, price = wanted[record_id]
            changed += open_meter(session, ctx, record_id=record_id, meter=meter,
                                  start_time=ctx.now, price=price)
        else:
            changed += stop_meter(session, ctx, record_id=record_id, end_time=ctx.now)[0]
    return changed


def _unbind(session: Session, ctx: CommandContext, instance: AppInstance, member_id: str,
            allocation_id: str, reason: str) -> list[Any]:
    use = session.get(app_use_id_for(allocation_id))
    if use is None or member_id not in use.bindings:
        return []
    use.trigger_event(AllocationAppUse.Unbound, app_instance_id=str(instance.id),
                      member_id=member_id, reason=reason, provenance=ctx.provenance(),
                      timestamp=ctx.now)
    return [use]


def settle(session: Session, ctx: CommandContext, instance: AppInstance) -> list[Any]:
    """Bring everything that follows the instance's state in line with it: claims,
    meters, bindings and the quota. Answers the aggregates it changed."""
    changed: list[Any] = [instance]
    for member in instance.members.values():
        changed += _sync_claims(session, ctx, instance, member)
        allocation = member.get("bound_allocation_id")
        if allocation and (instance.gone or member["status"] == "deleted"):
            changed += _unbind(session, ctx, instance, member["id"], allocation,
                               "instance_gone" if instance.gone else "member_deleted")
    changed += _sync_meters(session, ctx, instance)
    if instance.gone:
        quota = session.get(quota_id_for(instance.spec["project_id"]))
        if quota is not None and str(instance.id) in quota.live:
            quota.trigger_event(ProjectAppQuota.Retired, app_instance_id=str(instance.id),
                                provenance=ctx.provenance(), timestamp=ctx.now)
            changed.append(quota)
    return _unique(changed)


# ---- placement of capacity and bindings ----------------------------------------------------
def _node_name(session: Session, node_id: str | None) -> str | None:
    node = session.get(UUID(node_id)) if node_id else None
    if not isinstance(node, NodeInventory):
        return None
    return node.identity.get("hostname") or node.identity.get("host")


def _place(session: Session, ctx: CommandContext, instance: AppInstance,
           member: dict[str, Any]) -> list[Any]:
    """Reserve a capacity member's claims for the current placement cycle (409
    ``sku_unavailable`` when nothing is free: the caller's command is refused)."""
    capacity = member["capacity"]
    holder = claim_holder_for(member["id"], member["placements"])
    node = reserve(session, ctx, allocation_id=UUID(holder), user_id=instance.payer(),
                   project_id=instance.project(), sku=capacity["sku"],
                   count=capacity.get("gpu_count") or 1)
    claims = node.claims_of(holder)
    sku = get_sku(session, capacity["sku"], kind="invalid")
    gpus_total = node.identity["gpus_total"] if sku.shape == "baremetal" else len(claims)
    instance.trigger_event(AppInstance.MemberPlaced, member_id=member["id"], holder_id=holder,
                           node_id=node.node_id, node_resource_name=_node_name(session, node.node_id),
                           claim_ids=[c["id"] for c in claims], gpus_total=gpus_total,
                           units=units_for(sku, gpus_total), cycle=instance.placement_cycle,
                           provenance=ctx.provenance(), timestamp=ctx.now)
    return [node]


def _check_bindable(session: Session, instance_id: str, allocation_id: str,
                    project_id: UUID, *, shared: bool, kind: str = "conflict",
                    require_active: bool = True) -> Allocation:
    """An allocation a member may bind: of the project (404), ``active`` (409), not used
    by another live app (409 ``allocation_in_use_by_app``), nor by another member of
    this one unless the placement allows sharing."""
    allocation = get_allocation(session, UUID(allocation_id), project_id)
    if require_active and allocation.status != "active":
        raise refusal("allocation_not_active", kind, "the allocation is not active",
                      allocation_id=allocation_id, status=allocation.status)
    use = session.get(app_use_id_for(allocation_id))
    if use is not None and use.bindings:
        others = use.instances() - {instance_id}
        if others or not shared:
            raise refusal("invalid_request", kind, "the allocation is used by an app instance",
                          reason="allocation_in_use_by_app", allocation_id=allocation_id,
                          app_instance_id=sorted(others or {instance_id})[0])
    return allocation


def _bind(session: Session, ctx: CommandContext, instance: AppInstance, member: dict[str, Any],
          allocation_id: str) -> list[Any]:
    use_id = app_use_id_for(allocation_id)
    use = session.get(use_id)
    if use is None:
        use = AllocationAppUse._create(AllocationAppUse.Created, id=use_id,
                                       allocation_id=allocation_id, timestamp=ctx.now)
        session.loaded[use.id] = use
    use.trigger_event(AllocationAppUse.Bound, app_instance_id=str(instance.id),
                      member_id=member["id"], component_key=member["component_key"],
                      member_role=member.get("member_role"),
                      shared=bool(placement_json(instance.spec.get("placement_intent"))
                                  ["allow_shared_allocation"]),
                      provenance=ctx.provenance(), timestamp=ctx.now)
    return [use]


def _materialize(session: Session, ctx: CommandContext, instance: AppInstance, *, member_id: str,
                 component_key: str, member_role: str | None, status: str, source: str,
                 operation_id: str | None = None, capacity: dict[str, Any] | None = None,
                 bound_allocation_id: str | None = None, bound_node_id: str | None = None,
                 fields: dict[str, Any] | None = None) -> list[Any]:
    """A new member (capacity placed, allocation bound, in this save)."""
    instance.trigger_event(AppInstance.MemberMaterialized, member={
        "id": member_id, "component_key": component_key, "member_role": member_role,
        "status": status, "bound_allocation_id": bound_allocation_id,
        "bound_node_id": bound_node_id,
        "bound_node_resource_name": _node_name(session, bound_node_id),
        "source": source, "source_operation_id": operation_id,
        "correlation_id": ctx.correlation_id if operation_id else None,
        "capacity": capacity, "fields": fields or {}}, provenance=ctx.provenance(),
        timestamp=ctx.now)
    member = instance.members[member_id]
    changed: list[Any] = []
    if capacity is not None:
        changed += _place(session, ctx, instance, member)
    if bound_allocation_id:
        changed += _bind(session, ctx, instance, member, bound_allocation_id)
    return changed


# ---- create -----------------------------------------------------------------------------------
def _resolve_modes(manifest: dict[str, Any], overrides: dict[str, Any], request: dict[str, Any],
                   slug: str) -> tuple[str, str]:
    """The server decides (§2, §8 Q17): a hint the version and the entitlement allow is
    granted, any other is overridden silently (the hint is kept on the event)."""
    modes = list(manifest.get("operating_modes") or ["tenant_dedicated"])
    allowed = overrides.get("allowed_operating_modes")
    if allowed is not None:
        modes = [m for m in modes if m in allowed]
    if not modes:
        raise refusal("app_not_entitled", "forbidden",
                      f"no operating mode of {slug!r} is allowed for the project",
                      app_slug=slug, reason="operating_mode_not_allowed")
    mode = request.get("operating_mode") if request.get("operating_mode") in modes else modes[0]
    if mode == "platform_managed":
        return mode, "platform"
    hint = request.get("control_plane_scope")
    return mode, hint if hint in ("project", "tenant") else "project"


def _placement_members(intent: dict[str, Any], backend: str,
                       needs_shape: bool) -> list[tuple[str, str]]:
    """(component_key, allocation id) of each placement reference, after the §4.1
    shape rules (400 ``invalid_request``)."""
    if intent["agent_allocation_ids"]:
        raise _invalid("agent allocations are not supported yet", "agent_allocations_not_supported",
                       field="placement_intent.agent_allocation_ids")
    refs = [(role, intent[key]) for key, role in PLACEMENT_ROLES if intent[key]]
    refs += [("worker", a) for a in intent["worker_allocation_ids"]]
    ids = [a for _, a in refs]
    if len(set(ids)) != len(ids) and not intent["allow_shared_allocation"]:
        raise _invalid("an allocation is referenced twice (allow_shared_allocation is off)",
                       "duplicate_allocation", field="placement_intent")
    if needs_shape:
        need = {"rke2": "server_allocation_id", "bare_metal": "target_allocation_id"}.get(
            backend, "controller_allocation_id")
        if not intent[need]:
            raise _invalid(f"a {backend} app needs placement_intent.{need}",
                           "placement_shape_invalid", field=f"placement_intent.{need}")
    return refs


def _reads(project_id: UUID, user_id: UUID, tenant_id: UUID | None) -> tuple[UUID, ...]:
    scopes = [("user", user_id), ("project", project_id)] + ([("tenant", tenant_id)] if tenant_id else [])
    return (quota_id_for(project_id), account_id_for(user_id),
            *(restriction_id_for(t, i) for t, i in scopes))


def create_app_instance(ctx: CommandContext, *, project_id: UUID, user_id: UUID,
                        tenant_id: UUID | None, request: dict[str, Any], render: Render,
                        service_account_id: UUID | None = None, project_role: str | None = None,
                        source: str = "api") -> Command:
    """``createAppInstance`` (``source="api"``) and ``submitV3AppLaunch``
    (``source="v3_launch"``: ``app_version`` defaults to the newest entitled active
    version, ``display_name`` to ``"{app name}-{id[:8]}"``). ``user_id`` pays.

    Order: app and version lookups (404) → entitlement (403) → version ``active``
    (409) → placement (400/404/409) → ``max_instances`` (409
    ``app_instance_quota_exceeded``) → the financial gate (409 ``insufficient_balance``)
    → capacity (409 ``sku_unavailable``). Everything or nothing is saved."""
    slug = request["app_slug"]

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        app = get_app(session, slug)
        wanted = request.get("app_version")
        if wanted is None:
            enabled, overrides = entitlement_of(session, project_id, slug)
            if not enabled:
                require_entitled(session, project_id, slug, "", project_role=project_role)
            wanted = newest_entitled_version(app, overrides)
            if wanted is None:
                raise refusal("app_version_not_found", "not_found",
                              f"{slug!r} has no active version the project may run",
                              app_slug=slug, reason="no_entitled_active_version")
        version = app.version_of(wanted)
        overrides = require_entitled(session, project_id, slug, wanted, project_role=project_role)
        if version["status"] != "active":
            raise refusal("invalid_request", "conflict", f"version {wanted!r} is {version['status']}",
                          reason="app_version_not_active", app_slug=slug, app_version=wanted)
        manifest = version["manifest"]
        dependencies = request.get("dependencies")
        if dependencies is not None:
            undeclared = sorted(set(dependencies) - set(manifest.get("dependencies") or []))
            if not isinstance(dependencies, dict) or undeclared:
                raise _invalid("dependencies must be ones the app version declares",
                               "dependency_not_declared", field="dependencies",
                               undeclared=undeclared)
        mode, scope = _resolve_modes(manifest, overrides, request, slug)
        backend = version["runtime_backend"]
        intent = placement_json(request.get("placement_intent"))
        components = manifest.get("components") or []
        refs = _placement_members(intent, backend,
                                  needs_shape=mode == "tenant_dedicated" and not components)
        instance_id = instance_id_for(ctx.causation_id)
        allocations = {a: _check_bindable(session, str(instance_id), a, project_id,
                                          shared=intent["allow_shared_allocation"])
                       for _, a in refs}
        quota = session.get(quota_id_for(project_id))
        limit = overrides.get("max_instances")
        if limit is not None and (quota.count(slug) if quota else 0) >= limit:
            raise refusal("app_instance_quota_exceeded", "conflict",
                          f"at most {limit} live {slug!r} instances in the project",
                          app_slug=slug, max_instances=limit,
                          current_instances=quota.count(slug) if quota else 0)
        financial_gate(session, user_id=user_id, tenant_id=tenant_id, project_id=project_id)
        pricing = list(manifest.get("pricing") or [])
        if pricing and mode == "platform_managed":
            account = session.get(account_id_for(user_id))
            currency = account.primary_currency if account is not None else session.default_currency
            foreign = [p["component"] for p in pricing if p["unit_price"]["currency"] != currency]
            if foreign:
                raise _invalid(f"the app is priced in another currency than the payer's {currency}",
                               "pricing_currency_unsupported", components=foreign)
        name = request.get("display_name") or f"{app.details['display_name']}-{str(instance_id)[:8]}"
        spec = {"resource_name": f"app-{slug}-{str(instance_id)[:8]}",
                "project_id": str(project_id), "app_slug": slug, "display_name": name,
                "app_artifact_id": request.get("app_artifact_id"),
                "operating_mode": mode, "control_plane_scope": scope,
                "tenant_boundary_mode": "shared_service" if mode == "platform_managed"
                else "tenant_isolated",
                "runtime_backend": backend,
                "requested_operating_mode": request.get("operating_mode"),
                "requested_control_plane_scope": request.get("control_plane_scope"),
                "requested_by_user_id": str(user_id),
                "requested_by_service_account_id": str(service_account_id) if service_account_id else None,
                "operator_service_account_id": request.get("operator_service_account_id"),
                "tenant_id": str(tenant_id) if tenant_id else None,
                "org_id": str(tenant_id or personal_org_id(user_id)),
                "placement_intent": intent, "config": dict(request.get("config") or {}),
                "resource_overrides": dict(request.get("resource_overrides") or {}),
                "dependencies": request.get("dependencies"), "pricing": pricing,
                "source": source, "launch_task_id": str(task_id_for("launch", instance_id, 1))}
        if session.get(instance_id) is not None:  # (also: a refusal below forgets it)
            raise refusal("invalid_request", "conflict", "the app instance exists",
                          reason="app_instance_exists", app_instance_id=str(instance_id))
        instance = AppInstance._create(AppInstance.Created, id=instance_id, spec=spec,
                                       app_version=wanted, provenance=ctx.provenance(),
                                       timestamp=ctx.now)
        session.loaded[instance.id] = instance
        changed: list[Any] = [instance]
        counts: dict[str, int] = {}
        for component, allocation_id in refs:
            index = counts[component] = counts.get(component, -1) + 1
            lease = allocations[allocation_id].lease
            changed += _materialize(
                session, ctx, instance,
                member_id=str(uuid5(NAMESPACE, f"app-member:{instance_id}:{component}:{index}")),
                component_key=component, member_role=component, status="requested",
                source="placement", bound_allocation_id=allocation_id,
                bound_node_id=lease.get("node_id"))
        for component in components:
            for index in range(component.get("count", 1)):
                changed += _materialize(
                    session, ctx, instance,
                    member_id=str(uuid5(NAMESPACE, f"app-member:{instance_id}:"
                                                   f"{component['component_key']}:{index}")),
                    component_key=component["component_key"],
                    member_role=component.get("member_role"), status="requested",
                    source="manifest", capacity={"sku": component["sku"],
                                                 "gpu_count": component.get("gpu_count", 1)})
        if quota is None:
            quota = ProjectAppQuota._create(ProjectAppQuota.Created, id=quota_id_for(project_id),
                                            project_id=str(project_id), timestamp=ctx.now)
            session.loaded[quota.id] = quota
        quota.trigger_event(ProjectAppQuota.Admitted, app_instance_id=str(instance_id),
                            app_slug=slug, provenance=ctx.provenance(), timestamp=ctx.now)
        changed += [quota] + settle(session, ctx, instance)
        return _unique(changed), {
            "app_instance": instance_json(instance), "workload_id": str(instance_id),
            "task_id": spec["launch_task_id"], "correlation_id": ctx.correlation_id,
            "members": [member_json(m) for m in instance.members.values()]}

    return Command(ctx, decide, render, reads=_reads(project_id, user_id, tenant_id))


# ---- lifecycle commands -----------------------------------------------------------------------
def _move(session: Session, ctx: CommandContext, instance: AppInstance, to: str, *, trigger: str,
          details: dict[str, Any] | None = None, runtime: dict[str, Any] | None = None,
          task: bool = False) -> str | None:
    """One §3.1 edge, with what the platform drives along with it: decommission cancels
    open operations and sends members to ``deleting``; Gone deletes every member."""
    if to in GONE:  # members end with the instance (before it is Gone: nothing follows Gone)
        _force_members(ctx, instance, "deleted", "instance_gone")
    task_id = str(task_id_for("app_operation", instance.id, instance.version + 1)) if task else None
    instance.trigger_event(AppInstance.Moved, from_status=instance.status, to=to, trigger=trigger,
                           task_id=task_id, details=details or {}, runtime=runtime or {},
                           provenance=ctx.provenance(), timestamp=ctx.now)
    if to == "decommissioning":
        cancel = {"last_error_code": "superseded_by_decommission",
                  "last_error_message": "the app instance is being decommissioned"}
        for op in instance.open_member_ops():
            instance.trigger_event(AppInstance.MemberOperationProgressed, operation_id=op["id"],
                                   from_status=op["status"], status="cancelled", changes=cancel,
                                   provenance=ctx.provenance(), timestamp=ctx.now)
        for op in instance.open_repairs():
            instance.trigger_event(AppInstance.RepairOperationProgressed, operation_id=op["id"],
                                   from_status=op["status"], status="cancelled", changes=cancel,
                                   provenance=ctx.provenance(), timestamp=ctx.now)
        _force_members(ctx, instance, "deleting", "instance_decommissioning")
    return task_id


def _force_members(ctx: CommandContext, instance: AppInstance, status: str, reason: str) -> None:
    for member in list(instance.members.values()):
        if member["status"] not in (status, "deleted"):
            instance.trigger_event(AppInstance.MemberChanged, member_id=member["id"],
                                   from_status=member["status"], status=status, changes={},
                                   operation_id=None, correlation_id=None, reason=reason,
                                   provenance=ctx.provenance(), timestamp=ctx.now)


def _lifecycle_result(instance: AppInstance, operation: str, task_id: str | None,
                      ctx: CommandContext, previous: str) -> dict[str, Any]:
    return {"app_instance": instance_json(instance), "operation": operation, "task_id": task_id,
            "correlation_id": ctx.correlation_id, "previous_status": previous}


def _version_change(session: Session, instance: AppInstance, operation: str, target: str,
                    project_role: str | None) -> dict[str, Any]:
    """Lookups and guards of upgrade (§5.5) and rollback (§5.4) after the state guard."""
    slug = instance.spec["app_slug"]
    version = get_app(session, slug).version_of(target)
    require_entitled(session, instance.spec["project_id"], slug, target, project_role=project_role)

    def conflict(message: str, reason: str) -> DomainError:
        return refusal("invalid_request", "conflict", message, reason=reason,
                       app_instance_id=str(instance.id), app_version=target,
                       current_version=instance.app_version)

    if operation == "upgrade":
        if target == instance.app_version:
            raise conflict("the instance already runs that version", "app_version_unchanged")
        if version["status"] != "active":
            raise conflict(f"version {target!r} is {version['status']}", "app_version_not_active")
        if version["runtime_backend"] != instance.spec["runtime_backend"]:
            raise conflict("an upgrade cannot change the runtime backend",
                           "runtime_backend_change_unsupported")
    else:
        if target == instance.app_version or target not in instance.deployed_versions:
            raise conflict("rollback goes only to another version this instance ran",
                           "version_not_previously_deployed")
        if version["status"] == "disabled":
            raise conflict(f"version {target!r} is disabled", "app_version_not_active")
    return {"from_version": instance.app_version, "to_version": target}


def lifecycle(ctx: CommandContext, *, app_instance_id: UUID, project_id: UUID | None,
              operation: str, render: Render, app_version: str | None = None,
              via: str = "project_path", legacy_delete: bool = False,
              project_role: str | None = None) -> Command:
    """``stop``/``start``/``restart``/``upgrade``/``rollback``/``decommission`` (project
    path, V3 and compat; ``deleteAppInstance`` is decommission with ``legacy_delete``),
    and the internal ``complete_stop``. The state guard comes first (a Gone instance
    answers 409 whatever the body), then upgrade/rollback lookups (404), entitlement
    (403) and version guards (409), then the financial gate (start, upgrade). Start
    places capacity again (409 ``sku_unavailable`` when it cannot). Decommission in
    Teardown or Gone is a 202 no-op (``task_id`` None)."""
    if operation not in COMMAND_EDGES:
        raise ValueError(f"unknown operation {operation!r}")

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        instance = get_app_instance(session, app_instance_id, project_id)
        previous = instance.status
        if operation == "decommission" and previous in TEARDOWN + GONE:
            return [], _lifecycle_result(instance, operation, None, ctx, previous)
        _guard(instance, operation)
        details: dict[str, Any] = {"via": via}
        if operation in ("upgrade", "rollback"):
            if not app_version:
                raise _invalid("app_version is required", "app_version_required",
                               field="app_version")
            details.update(_version_change(session, instance, operation, app_version,
                                           project_role))
        if operation == "restart" and not restart_safe(instance):
            raise _state_invalid(instance, "this runtime cannot be restarted safely; repair it",
                                 allowed_from=list(COMMAND_EDGES["restart"][0]),
                                 reason="restart_unsupported_use_repair")
        if operation in ("start", "upgrade"):
            financial_gate(session, user_id=instance.payer(), tenant_id=instance.tenant(),
                           project_id=instance.project())
        if operation == "decommission":
            details["legacy_delete"] = legacy_delete
        task_id = _move(session, ctx, instance, COMMAND_EDGES[operation][1], trigger=operation,
                        details=details, task=operation != "complete_stop")
        changed: list[Any] = []
        if operation == "start":
            for member in instance.members.values():
                if member.get("capacity") is not None and member["status"] != "deleted":
                    changed += _place(session, ctx, instance, member)
        changed += settle(session, ctx, instance)
        return _unique(changed), _lifecycle_result(instance, operation, task_id, ctx, previous)

    return Command(ctx, decide, render)


def complete_stop(ctx: CommandContext, *, app_instance_id: UUID, render: Render) -> Command:
    """Internal (no contract operation, §8 Q1): the runtime workflow saw the stop done:
    ``stopping`` → ``stopped``; capacity is released and the meters close."""
    return lifecycle(ctx, app_instance_id=app_instance_id, project_id=None,
                     operation="complete_stop", render=render, via="internal")


def stop_app_instance(ctx: CommandContext, *, app_instance_id: UUID, project_id: UUID | None,
                      render: Render, via: str = "project_path") -> Command:
    """``stopAppInstance`` / ``stopV3AppInstance`` as served: the stop and its completion
    (``complete_stop``) in one save. Nothing the platform does for a stop is
    asynchronous (claims are released and meters closed in the save), and adapters
    cannot report ``stopped`` (§8 Q1), so the instance passes ``stopping`` and answers
    ``stopped``; the adapter, polling, tears its runtime down on either status. The
    result is the stop's (its task), with the instance as completed."""
    request = lifecycle(ctx, app_instance_id=app_instance_id, project_id=project_id,
                        operation="stop", render=render, via=via)
    completion = complete_stop(ctx, app_instance_id=app_instance_id, render=render)

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        changed, result = request.decide(ctx, session)
        more, completed = completion.decide(ctx, session)
        return _unique([*changed, *more]), {**result, "app_instance": completed["app_instance"]}

    return Command(ctx, decide, render)


# ---- reports ------------------------------------------------------------------------------------
def _runtime_changes(current: dict[str, Any], report: dict[str, Any],
                     fields: tuple[str, ...] = RUNTIME_FIELDS) -> dict[str, Any]:
    changes = {}
    for key in fields:
        if key in report:
            value = report[key]
            if key in OBJECT_FIELDS and value is not None and not isinstance(value, dict):
                raise _invalid(f"{key} must be an object", "validation_failed", field=key)
            if key in OBJECT_FIELDS and value is None:
                value = {}
            if value != current.get(key):
                changes[key] = value
    return changes


def report_app_instance(ctx: CommandContext, *, app_instance_id: UUID, project_id: UUID | None,
                        report: dict[str, Any], render: Render) -> Command:
    """``reportAppInstance``: the adapter's observation. The keys ``report`` carries
    replace, the others are kept (``failure_reason`` counts only in a ``failed``
    report). A §3.1 edge moves the instance; the current status (or ``deploying`` in a
    transitional state) only observes the fields; identical → no event; anything else
    → 409 ``app_instance_state_invalid`` {current_status, reported_status}."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        instance = get_app_instance(session, app_instance_id, project_id)
        reported = report.get("status")
        if reported not in REPORTABLE:
            raise _invalid(f"status must be one of {REPORTABLE}", "validation_failed",
                           field="status")
        effect = report_effect(instance, reported)
        if effect is None:
            raise _state_invalid(instance, f"a {instance.status} instance cannot become {reported}",
                                 reported_status=reported)
        changes = _runtime_changes(instance.runtime, report)
        if effect == "move":
            details: dict[str, Any] = {}
            if reported == "failed":
                details = {"failed_during": FAILED_DURING[instance.status],
                           "failure_reason": report.get("failure_reason")}
            _move(session, ctx, instance, reported, trigger="report", details=details,
                  runtime=changes)
        else:
            if reported == "failed" and "failure_reason" in report \
                    and report["failure_reason"] != instance.failure_reason:
                changes["failure_reason"] = report["failure_reason"]
            if not changes:
                return [], instance_json(instance)
            if instance.gone:
                raise _state_invalid(instance, "a gone instance does not change",
                                     reported_status=reported)
            instance.trigger_event(AppInstance.RuntimeObserved, fields=changes,
                                   source="instance_report", provenance=ctx.provenance(),
                                   timestamp=ctx.now)
        return settle(session, ctx, instance), instance_json(instance)

    return Command(ctx, decide, render)


def _member_changes(session: Session, instance: AppInstance, member: dict[str, Any],
                    report: dict[str, Any], status_key: str, kind: str) -> tuple[str, dict[str, Any]]:
    """(new status, changed fields) of a member report, validated: a §3.2 edge (else
    400 ``member_transition_invalid``), a platform-placed member's node is not the
    adapter's to change, a bound allocation is of the project and free."""
    status = report.get(status_key) or member["status"]
    if status not in MEMBER_STATUSES:
        raise _invalid(f"member status must be one of {MEMBER_STATUSES}", "validation_failed",
                       field=status_key)
    changes = {k: report[k] for k in MEMBER_FIELDS if k in report and report[k] != member.get(k)}
    if status != member["status"] and status not in MEMBER_EDGES[member["status"]]:
        raise _invalid(f"a {member['status']} member cannot become {status}",
                       "member_transition_invalid", member_id=member["id"],
                       current_status=member["status"], reported_status=status)
    if member["status"] == "deleted" and changes:
        raise _invalid("a deleted member does not change", "member_deleted", member_id=member["id"])
    if "bound_node_id" in changes:
        if member.get("holder_id"):
            raise _invalid("the platform placed this member; its node is not reported",
                           "bound_node_managed_by_platform", member_id=member["id"])
        changes["bound_node_resource_name"] = _node_name(session, changes["bound_node_id"])
    if changes.get("bound_allocation_id"):
        _check_bindable(session, str(instance.id), changes["bound_allocation_id"],
                        instance.project(), kind=kind, require_active=False,
                        shared=placement_json(instance.spec.get("placement_intent"))
                        ["allow_shared_allocation"])
    return status, changes


def _apply_member(session: Session, ctx: CommandContext, instance: AppInstance,
                  member: dict[str, Any], status: str, changes: dict[str, Any],
                  operation_id: str | None) -> list[Any]:
    if status == member["status"] and not changes:
        return []
    old_allocation = member.get("bound_allocation_id")
    changed: list[Any] = []
    if "bound_allocation_id" in changes and old_allocation:
        changed += _unbind(session, ctx, instance, member["id"], old_allocation, "rebound")
    instance.trigger_event(AppInstance.MemberChanged, member_id=member["id"],
                           from_status=member["status"], status=status, changes=changes,
                           operation_id=operation_id,
                           correlation_id=ctx.correlation_id if operation_id else None,
                           reason=None, provenance=ctx.provenance(), timestamp=ctx.now)
    member = instance.members[member["id"]]
    if changes.get("bound_allocation_id") and member["status"] != "deleted":
        changed += _bind(session, ctx, instance, member, changes["bound_allocation_id"])
    return changed + [instance]


def report_member(ctx: CommandContext, *, app_instance_id: UUID, project_id: UUID | None,
                  member_id: UUID, report: dict[str, Any], render: Render) -> Command:
    """``reportAppInstanceMember``: a member's status (a §3.2 edge) and fields. It cannot
    create a member (404). It declares no 409: an illegal edge, or an allocation in use,
    is 400 ``invalid_request``. Identical → no event."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        instance = get_app_instance(session, app_instance_id, project_id)
        member = _member(instance, member_id)
        status, changes = _member_changes(session, instance, member, report, "status", "invalid")
        changed = _apply_member(session, ctx, instance, member, status, changes, None)
        if not changed:
            return [], member_json(member)
        return _unique(changed + settle(session, ctx, instance)), \
            member_json(instance.members[str(member_id)])

    return Command(ctx, decide, render)


# ---- member operations ----------------------------------------------------------------------
def _capacity_of(intent: dict[str, Any] | None) -> dict[str, Any] | None:
    """An ``allocation_intent`` naming a ``sku`` asks the platform for capacity (§8 Q14);
    any other intent is the adapter's, opaque."""
    if not intent or "sku" not in intent:
        return None
    sku, gpus = intent["sku"], intent.get("gpu_count", 1)
    if not isinstance(sku, str) or not sku or type(gpus) is not int or not 1 <= gpus <= 64:
        raise _invalid("allocation_intent needs a sku and an optional gpu_count (1..64)",
                       "allocation_intent_invalid", field="allocation_intent")
    return {"sku": sku, "gpu_count": gpus}


def member_limit(operation: dict[str, Any]) -> int:
    """§5.10: the members an operation may materialize: an ``add`` its
    ``requested_count`` (default 1), a ``replace`` one, a drain or remove none."""
    if operation["action"] == "add":
        return operation["requested_count"] or 1
    return 1 if operation["action"] == "replace" else 0


def _member_busy(instance: AppInstance, member_id: str) -> bool:
    return any(op["target_member_id"] == member_id or member_id in op["materialized"]
               for op in instance.open_member_ops())


def create_member_operation(ctx: CommandContext, *, app_instance_id: UUID,
                            project_id: UUID | None, request: dict[str, Any], render: Render,
                            user_id: UUID | None = None,
                            service_account_id: UUID | None = None) -> Command:
    """``createAppInstanceMemberOperation`` / ``createV3AppInstanceMemberOperation``.

    Shape (400): ``add`` needs ``component_key``, the others ``target_member_id``;
    ``requested_count`` (1..16) only on ``add``; ``allocation_intent`` not on
    drain/remove. Then the state guard (409; requested, deploying, running or failed),
    the target (404; ``deleted`` → 409; one open operation per member → 409). An
    ``add`` passes the financial gate; one whose ``allocation_intent`` names a ``sku``
    materializes its ``requested_count`` members at once, each with its claims (409
    ``sku_unavailable``: nothing is saved)."""
    action = request.get("action")

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        instance = get_app_instance(session, app_instance_id, project_id)
        if action not in MEMBER_ACTIONS:
            raise _invalid(f"action must be one of {MEMBER_ACTIONS}", "validation_failed",
                           field="action")
        target, count = request.get("target_member_id"), request.get("requested_count")
        if action == "add" and not request.get("component_key"):
            raise _invalid("component_key is required for add", "component_key_required",
                           field="component_key")
        if action != "add" and not target:
            raise _invalid(f"target_member_id is required for {action}",
                           "target_member_id_required", field="target_member_id")
        if count is not None and (action != "add" or type(count) is not int
                                  or not 1 <= count <= MAX_COUNT):
            raise _invalid(f"requested_count is an integer in 1..{MAX_COUNT}, for add only",
                           "requested_count_invalid", field="requested_count")
        intent = request.get("allocation_intent")
        if intent is not None and action in ("drain", "remove"):
            raise _invalid(f"allocation_intent does not apply to {action}",
                           "allocation_intent_invalid", field="allocation_intent")
        capacity = _capacity_of(intent) if action == "add" else None
        if instance.status not in MEMBER_OP_FROM or instance.failed_teardown:
            raise _state_invalid(instance, f"a {instance.status} instance takes no member "
                                 "operation", allowed_from=list(MEMBER_OP_FROM),
                                 resource="member_operation")
        if target:
            member = _member(instance, target)
            if member["status"] == "deleted":
                raise _state_invalid(instance, "the member is deleted", member_id=str(target),
                                     reason="member_deleted", resource="member")
            if _member_busy(instance, str(target)):
                raise _state_invalid(instance, "the member has an open operation",
                                     member_id=str(target), reason="member_operation_in_progress",
                                     resource="member_operation")
        if action == "add":
            financial_gate(session, user_id=instance.payer(), tenant_id=instance.tenant(),
                           project_id=instance.project())
        operation_id = str(uuid5(NAMESPACE, f"app-member-op:{ctx.causation_id}"))
        new_members = [str(uuid5(NAMESPACE, f"app-member:{operation_id}:{index}"))
                       for index in range(count or 1)] if capacity is not None else []
        if target:
            target = str(target)
        elif new_members:
            target = new_members[0]  # the operation names the first member it placed
        operation = {"id": operation_id, "action": action,
                     "component_key": request.get("component_key"),
                     "target_member_id": target or None,
                     "requested_count": count, "allocation_intent": intent,
                     "correlation_id": ctx.correlation_id,
                     "requested_by_user_id": str(user_id) if user_id else None,
                     "requested_by_service_account_id":
                         str(service_account_id) if service_account_id else None,
                     "capacity": capacity,
                     "task_id": str(task_id_for("app_operation", instance.id, instance.version + 1))}
        instance.trigger_event(AppInstance.MemberOperationRequested, operation=operation,
                               provenance=ctx.provenance(), timestamp=ctx.now)
        changed: list[Any] = [instance]
        for member_id in new_members:
            changed += _materialize(
                session, ctx, instance, member_id=member_id,
                component_key=request["component_key"], member_role=None, status="requested",
                source="member_operation", operation_id=operation_id, capacity=capacity)
        changed += settle(session, ctx, instance)
        return _unique(changed), member_operation_json(instance.member_ops[operation_id])

    return Command(ctx, decide, render)


def report_member_operation(ctx: CommandContext, *, app_instance_id: UUID,
                            project_id: UUID | None, operation_id: UUID,
                            report: dict[str, Any], render: Render) -> Command:
    """``reportAppInstanceMemberOperation``. Status: ``accepted`` → anything but
    ``accepted``; ``in_progress`` → itself or terminal. A report that changes nothing
    appends nothing; after a terminal status any change is 409. ``target_member_id``
    binds the operation's target when it has none; for ``add``/``replace`` a new id
    materializes a member (at most ``requested_count``, default 1, for an add; one for
    a replace; beyond: 409 ``member_count_exceeded``); drain/remove name only their
    target (400 ``target_mismatch``). The member fields apply to the named member (a
    §3.2 edge, else 400)."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        instance = get_app_instance(session, app_instance_id, project_id)
        op = instance.member_ops.get(str(operation_id))
        if op is None:
            raise _not_found("member_operation", app_instance_id=str(instance.id),
                             operation_id=str(operation_id))
        status = report.get("status")
        if status not in OP_STATUSES[1:]:
            raise _invalid("status must be in_progress, succeeded, failed or cancelled",
                           "validation_failed", field="status")
        terminal = op["status"] in OP_TERMINAL

        def after_terminal() -> DomainError:
            return _state_invalid(instance, f"the operation is {op['status']}",
                                  resource="member_operation", operation_id=op["id"],
                                  operation_status=op["status"], reported_status=status)

        if not terminal and status not in OP_EDGES[op["status"]]:
            raise after_terminal()
        if terminal and status != op["status"]:
            raise after_terminal()
        named = report.get("target_member_id")
        named = str(named) if named else None
        new_member = False
        if op["action"] in ("drain", "remove"):
            if named and named != op["target_member_id"]:
                raise _invalid("a drain or remove reports on its target only", "target_mismatch",
                               target_member_id=op["target_member_id"])
            member_id = op["target_member_id"]
        elif named is None:
            member_id = op["target_member_id"]
        elif named in instance.members:
            if named != op["target_member_id"] and named not in op["materialized"]:
                raise _invalid("the member does not belong to this operation", "target_mismatch",
                               member_id=named)
            member_id = named
        else:
            limit = member_limit(op)
            if len(op["materialized"]) >= limit:
                if terminal:
                    raise after_terminal()
                raise refusal("invalid_request", "conflict",
                              f"the operation may materialize at most {limit} member(s)",
                              reason="member_count_exceeded", operation_id=op["id"],
                              requested_count=limit)
            member_id, new_member = named, True
        member_fields = {k: report[k] for k in MEMBER_FIELDS if k in report}
        if (member_fields or report.get("member_status")) and member_id is None:
            raise _invalid("name the member the report is about", "target_member_required",
                           field="target_member_id")
        op_changes = {k: report[k] for k in ("last_error_code", "last_error_message")
                      if k in report and report[k] != op.get(k)}
        if op["target_member_id"] is None and member_id is not None:
            op_changes["target_member_id"] = member_id
        changed: list[Any] = []
        if new_member:
            if terminal:
                raise after_terminal()
            initial = report.get("member_status") or "requested"
            if initial not in MEMBER_INITIAL:
                raise _invalid(f"a new member starts in one of {MEMBER_INITIAL}",
                               "member_transition_invalid", reported_status=initial)
            replaced = instance.members.get(op["target_member_id"] or "") or {}
            fields = {k: v for k, v in member_fields.items() if k != "bound_allocation_id"}
            if fields.get("bound_node_id"):
                fields["bound_node_resource_name"] = _node_name(session, fields["bound_node_id"])
            allocation = member_fields.get("bound_allocation_id")
            if allocation:
                _check_bindable(session, str(instance.id), allocation, instance.project(),
                                require_active=False, shared=placement_json(
                                    instance.spec.get("placement_intent"))["allow_shared_allocation"])
            changed += _materialize(
                session, ctx, instance, member_id=member_id,
                component_key=op["component_key"] or replaced.get("component_key") or "member",
                member_role=member_fields.get("member_role") or replaced.get("member_role"),
                status=initial, source="member_operation", operation_id=op["id"],
                bound_allocation_id=allocation, fields=fields)
        elif member_id is not None:
            member = _member(instance, member_id)
            reported = dict(member_fields, member_status=report.get("member_status"))
            member_status, member_changes = _member_changes(session, instance, member, reported,
                                                            "member_status", "conflict")
            if terminal and (member_status != member["status"] or member_changes):
                raise after_terminal()
            changed += _apply_member(session, ctx, instance, member, member_status,
                                     member_changes, op["id"])
        if status != op["status"] or op_changes:
            if terminal:
                raise after_terminal()
            instance.trigger_event(AppInstance.MemberOperationProgressed, operation_id=op["id"],
                                   from_status=op["status"], status=status, changes=op_changes,
                                   provenance=ctx.provenance(), timestamp=ctx.now)
            changed.append(instance)
        if not changed:
            return [], member_operation_json(op)
        changed += settle(session, ctx, instance)
        return _unique(changed), member_operation_json(instance.member_ops[op["id"]])

    return Command(ctx, decide, render)


# ---- repair operations ----------------------------------------------------------------------
def create_repair_operation(ctx: CommandContext, *, app_instance_id: UUID,
                            project_id: UUID | None, request: dict[str, Any], render: Render,
                            user_id: UUID | None = None,
                            service_account_id: UUID | None = None) -> Command:
    """``createAppInstanceRepairOperation`` / ``repairV3AppInstanceCompat``. Shape (400:
    ``scope=member`` needs ``target_member_id``; ``reason`` ≤ 500), state guard (409;
    running or failed), target (404; deleted → 409), one open repair per instance (409).
    The plan is ``diagnose, reconcile`` or ``diagnose, repair, verify``. A dry run (§8 Q6)
    is validated the same way and saved ``succeeded`` with every step ``skipped``; it is
    never queued (no task) and changes nothing else. Never financially gated."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        instance = get_app_instance(session, app_instance_id, project_id)
        action, scope = request.get("action"), request.get("scope")
        target, reason = request.get("target_member_id"), request.get("reason")
        dry_run = bool(request.get("dry_run", False))
        if action not in REPAIR_ACTIONS or scope not in REPAIR_SCOPES:
            raise _invalid("unknown action or scope", "validation_failed", field="action")
        if scope == "member" and not target:
            raise _invalid("a member repair needs target_member_id", "target_member_id_required",
                           field="target_member_id")
        if reason is not None and len(reason) > 500:
            raise _invalid("reason is at most 500 characters", "validation_failed", field="reason")
        if instance.status not in REPAIR_FROM or instance.failed_teardown:
            raise _state_invalid(instance, f"a {instance.status} instance cannot be repaired",
                                 allowed_from=list(REPAIR_FROM), resource="repair_operation")
        if target:
            if _member(instance, target)["status"] == "deleted":
                raise _state_invalid(instance, "the member is deleted", member_id=str(target),
                                     reason="member_deleted", resource="member")
        if instance.open_repairs():
            raise _state_invalid(instance, "a repair is already open",
                                 reason="repair_operation_in_progress",
                                 repair_operation_id=instance.open_repairs()[0]["id"],
                                 resource="repair_operation")
        operation_id = str(uuid5(NAMESPACE, f"app-repair-op:{ctx.causation_id}"))
        steps = [{"name": name, "status": "skipped" if dry_run else "pending",
                  "started_at": None, "completed_at": None,
                  "summary": "dry run: planned, not executed" if dry_run else None}
                 for name in PLANNED_STEPS[action]]
        task = None if dry_run else str(task_id_for("app_operation", instance.id,
                                                    instance.version + 1))
        instance.trigger_event(AppInstance.RepairOperationRequested, operation={
            "id": operation_id, "action": action, "scope": scope,
            "target_member_id": str(target) if target else None,
            "component_key": request.get("component_key"), "reason": reason,
            "dry_run": dry_run, "steps": steps, "correlation_id": ctx.correlation_id,
            "requested_by_user_id": str(user_id) if user_id else None,
            "requested_by_service_account_id": str(service_account_id) if service_account_id else None,
            "task_id": task}, provenance=ctx.provenance(), timestamp=ctx.now)
        return [instance], repair_operation_json(instance.repair_ops[operation_id])

    return Command(ctx, decide, render)


def _valid_steps(old: list[dict[str, Any]], new: Any) -> list[dict[str, Any]]:
    """A report replaces the whole ``steps`` array: every step stays, none regresses
    (``pending`` → ``running`` → ``succeeded|failed|skipped``; a finished step is final)."""
    if not isinstance(new, list) or not all(
            isinstance(s, dict) and isinstance(s.get("name"), str) and s["name"]
            and s.get("status") in STEP_STATUSES for s in new):
        raise _invalid("steps must be AppInstanceRepairStep objects", "validation_failed",
                       field="steps")
    steps = [{"name": s["name"], "status": s["status"], "started_at": s.get("started_at"),
              "completed_at": s.get("completed_at"), "summary": s.get("summary")} for s in new]
    names = [s["name"] for s in steps]
    if len(set(names)) != len(names):
        raise _invalid("step names repeat", "repair_steps_invalid", field="steps")
    by_name = {s["name"]: s for s in steps}
    for step in old:
        now = by_name.get(step["name"])
        if now is None:
            raise _invalid(f"step {step['name']!r} is missing", "repair_step_missing",
                           field="steps", step=step["name"])
        if STEP_RANK[now["status"]] < STEP_RANK[step["status"]] or (
                STEP_RANK[step["status"]] == 2 and now["status"] != step["status"]):
            raise _invalid(f"step {step['name']!r} cannot go from {step['status']} to "
                           f"{now['status']}", "repair_step_regressed", field="steps",
                           step=step["name"])
    return steps


def report_repair_operation(ctx: CommandContext, *, app_instance_id: UUID,
                            project_id: UUID | None, repair_operation_id: UUID,
                            report: dict[str, Any], render: Render) -> Command:
    """``reportAppInstanceRepairOperation``: status as member operations; ``steps``
    replaced whole (no step missing or regressing, 400); the instance-level
    ``runtime_state``/``health_status``/``health_detail`` are observed on the instance.
    A report that changes nothing appends nothing; after a terminal status any change is
    409."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        instance = get_app_instance(session, app_instance_id, project_id)
        op = instance.repair_ops.get(str(repair_operation_id))
        if op is None:
            raise _not_found("repair_operation", app_instance_id=str(instance.id),
                             repair_operation_id=str(repair_operation_id))
        status = report.get("status")
        if status not in OP_STATUSES:
            raise _invalid(f"status must be one of {OP_STATUSES}", "validation_failed",
                           field="status")
        changes = {k: report[k] for k in ("phase", "progress", "last_error_code",
                                          "last_error_message")
                   if k in report and report[k] != op.get(k)}
        if "steps" in report:
            steps = _valid_steps(op["steps"], report["steps"])
            if steps != op["steps"]:
                changes["steps"] = steps
        runtime = _runtime_changes(instance.runtime, report,
                                   ("runtime_state", "health_status", "health_detail"))
        moved = status != op["status"]
        if not moved and not changes and not runtime:
            return [], repair_operation_json(op)
        if op["status"] in OP_TERMINAL or (status == "accepted") or (
                moved and status not in OP_EDGES.get(op["status"], ())):
            raise _state_invalid(instance, f"the repair operation is {op['status']}",
                                 resource="repair_operation", repair_operation_id=op["id"],
                                 operation_status=op["status"], reported_status=status)
        if moved or changes:
            instance.trigger_event(AppInstance.RepairOperationProgressed, operation_id=op["id"],
                                   from_status=op["status"], status=status, changes=changes,
                                   provenance=ctx.provenance(), timestamp=ctx.now)
        if runtime:
            instance.trigger_event(AppInstance.RuntimeObserved, fields=runtime,
                                   source="repair_report", provenance=ctx.provenance(),
                                   timestamp=ctx.now)
        return settle(session, ctx, instance), repair_operation_json(instance.repair_ops[op["id"]])

    return Command(ctx, decide, render)


# ---- the allocations side (§4.1 "Binding") --------------------------------------------------
def on_allocation_released(session: Session, ctx: CommandContext,
                           allocation_id: UUID | str) -> list[Any]:
    """A bound allocation was released: each member it served is ``failed`` with
    ``health_status="allocation_released"`` (the binding stays until the member is
    deleted or the instance is Gone). Meant to run in the release's own save."""
    use = session.get(app_use_id_for(allocation_id))
    if use is None or not use.bindings:
        return []
    changed: list[Any] = []
    for member_id, binding in list(use.bindings.items()):
        instance = session.get(UUID(binding["app_instance_id"]))
        member = instance.members.get(member_id) if isinstance(instance, AppInstance) else None
        if member is None or member["status"] in ("failed", "deleted"):
            continue
        instance.trigger_event(AppInstance.MemberChanged, member_id=member_id,
                               from_status=member["status"], status="failed",
                               changes={"health_status": "allocation_released"},
                               operation_id=None, correlation_id=None,
                               reason="allocation_released", provenance=ctx.provenance(),
                               timestamp=ctx.now)
        changed += settle(session, ctx, instance)
    return _unique(changed)


def mark_allocation_released(ctx: CommandContext, *, allocation_id: UUID,
                             render: Render) -> Command:
    """``on_allocation_released`` as a command of its own (for a process manager)."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        changed = on_allocation_released(session, ctx, allocation_id)
        return changed, {"allocation_id": str(allocation_id),
                         "app_instance_ids": sorted({str(a.id) for a in changed
                                                     if isinstance(a, AppInstance)})}

    return Command(ctx, decide, render)


__all__ = ["AppInstance", "ProjectAppQuota", "AllocationAppUse", "create_app_instance",
           "lifecycle", "complete_stop", "stop_app_instance", "report_app_instance", "report_member",
           "create_member_operation", "report_member_operation", "create_repair_operation",
           "report_repair_operation", "on_allocation_released", "mark_allocation_released",
           "instance_json", "member_json", "member_operation_json", "repair_operation_json",
           "v3_operation_json", "command_allowed", "restart_safe", "report_effect",
           "get_app_instance", "settle"]
