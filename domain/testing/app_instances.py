"""Reference model of app instances, and its invariants (app-instances §3 state
machines, §4.1 placement and bindings, §4.2 metering and gates, §5 invariants 1-15, 20).

``ReferenceAppInstances`` is meant to be obviously correct: plain dataclasses changed by
the same commands as the domain, each decision written straight from the spec's tables
and the choices docs/decisions.md records, never from ``domain.app_instances`` (whose
tables are what the model checks). Where the spec leaves a choice open the model takes
the domain's documented one:

- a report applies the keys it carries and keeps the rest; a report of the current
  status (or ``deploying`` during a command-owned transition) only observes; anything
  that is not a §3.1 edge is 409; a ``failed`` instance that failed while being
  decommissioned only finishes its teardown (reports ``decommissioned``/``deleted``,
  or the decommission command again); a ``stopped`` instance takes no report;
- the state guard comes before the body's lookups (a Gone instance answers 409 to
  everything, except decommission: a no-op);
- capacity members claim a node each (one claim holder per placement), claims move
  forward only: ``reserved`` → ``provisioning`` (deploying) → ``active`` (the runtime
  has run since the last placement) → ``releasing`` (teardown, or the member
  ``deleting``) → ``released`` (stopped, Gone, or the member ``deleted``); start
  places them again;
- meters (``app_runtime``) run while the runtime is up: from the entry into
  ``running`` after a placement until ``stopped`` or Gone, one per capacity member
  (not deleted) and, for a ``platform_managed`` instance, one per priced component;
  accrued(t) = round_half_even(price × units × ms(start, t) / 3,600,000);
- the financial gate (balance above zero) guards create, start, upgrade and ``add``.

``observe(app, model, mirror)`` reads the real aggregates and streams into plain data
that ``check_invariants(model, live)`` compares with the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from fractions import Fraction
from typing import Any
from uuid import UUID

from domain.app_instances import (AppInstance, app_use_id_for, command_allowed, instance_json,
                                  quota_id_for)
from domain.billing import BillingAccount, account_id_for
from domain.inventory import NodeInventory
from domain.usage import usage_id_for_app

STATUSES = ("requested", "deploying", "running", "stopping", "stopped", "starting",
            "restarting", "upgrading", "rolling_back", "failed", "decommissioning",
            "decommissioned", "deleting", "deleted")
TRANSITIONAL = ("stopping", "starting", "restarting", "upgrading", "rolling_back")
TEARDOWN = ("decommissioning", "deleting")
GONE = ("decommissioned", "deleted")
LIVE = tuple(s for s in STATUSES if s not in GONE)
#: §3.1 commands: from -> to
COMMANDS = {"stop": (("running", "failed"), "stopping"),
            "complete_stop": (("stopping",), "stopped"),
            "start": (("stopped",), "starting"),
            "restart": (("running", "failed"), "restarting"),
            "upgrade": (("running", "failed"), "upgrading"),
            "rollback": (("running", "failed"), "rolling_back"),
            "decommission": (tuple(s for s in LIVE if s not in TEARDOWN), "decommissioning")}
#: §3.1 reports: (from, reported) pairs that move
REPORT_MOVES = ({("requested", "deploying")}
                | {(s, "running") for s in ("requested", "deploying", "starting", "restarting",
                                            "upgrading", "rolling_back", "failed")}
                | {(s, "failed") for s in LIVE if s not in ("stopped", "failed")}
                | {("decommissioning", "deleting")}
                | {(s, "decommissioned") for s in ("decommissioning", "deleting", "failed")}
                | {(s, "deleted") for s in ("decommissioning", "deleting", "failed",
                                            "decommissioned")})
#: every edge an instance may take (§5.1 closure)
EDGES = {(f, to) for sources, to in COMMANDS.values() for f in sources} | REPORT_MOVES
FAILED_DURING = {"requested": "deploy", "deploying": "deploy", "running": "runtime",
                 "stopping": "stop", "starting": "start", "restarting": "restart",
                 "upgrading": "upgrade", "rolling_back": "rollback",
                 "decommissioning": "decommission", "deleting": "decommission"}
RUNTIME = ("phase", "progress", "health_status", "health_detail", "runtime_state")
#: §3.2
MEMBER_EDGES = {"requested": ("reconciling", "ready", "failed"),
                "reconciling": ("ready", "failed"),
                "ready": ("reconciling", "draining", "deleting", "failed"),
                "draining": ("ready", "deleting", "failed"),
                "failed": ("reconciling", "deleting", "deleted"),
                "deleting": ("deleted", "failed"), "deleted": ()}
TERMINAL_OPS = ("succeeded", "failed", "cancelled")
OPEN_OPS = ("accepted", "in_progress")
STEP_RANK = {"pending": 0, "running": 1, "succeeded": 2, "failed": 2, "skipped": 2}
CLAIM_ORDER = ("reserved", "provisioning", "active", "releasing", "released")
LIVE_CLAIMS = ("reserved", "provisioning", "active", "releasing")
CLAIM_EDGES = {"reserved": ("provisioning", "releasing", "failed"),
               "provisioning": ("active", "releasing", "failed"),
               "active": ("releasing",), "releasing": ("released",),
               "released": (), "failed": ()}
MS_PER_HOUR = 3_600_000


def ms(delta: timedelta) -> int:
    return delta // timedelta(milliseconds=1)


@dataclass
class MVersion:
    backend: str
    status: str = "disabled"
    published_seq: int | None = None


@dataclass
class MApp:
    """An app of the catalog as the model sees it."""

    slug: str
    modes: tuple[str, ...]
    capacity: int  # capacity members a create claims (manifest components)
    priced: bool  # a manifest price for platform-run components
    placement_key: str  # the placement_intent key the machine fills for this app
    versions: dict[str, MVersion] = field(default_factory=dict)


@dataclass
class MMeter:
    payer: str
    price: int
    units: int
    start: datetime
    billed_to: datetime
    end: datetime | None = None

    def cost(self) -> int:
        return round(Fraction(self.price * self.units * ms(self.billed_to - self.start),
                              MS_PER_HOUR))


@dataclass
class MMember:
    id: str
    component: str
    status: str = "requested"
    capacity: bool = False
    #: claim holders in placement order (the last is current) and the current node
    holders: list[str] = field(default_factory=list)
    node: str | None = None
    claim: str | None = None
    allocation: str | None = None
    health_status: str | None = None
    source_op: str | None = None


@dataclass
class MOp:
    id: str
    action: str
    component: str | None
    target: str | None
    count: int | None
    status: str = "accepted"
    materialized: list[str] = field(default_factory=list)
    last_error_code: str | None = None

    @property
    def limit(self) -> int:
        return (self.count or 1) if self.action == "add" else 1 if self.action == "replace" else 0


@dataclass
class MRepair:
    id: str
    status: str
    steps: list[str]  # step statuses in plan order
    names: list[str] = field(default_factory=list)
    summaries: list[str | None] = field(default_factory=list)


@dataclass
class MInstance:
    id: str
    project: str
    payer: str
    slug: str
    backend: str
    mode: str
    scope: str
    version: str
    status: str = "requested"
    failed_during: str | None = None
    failure_reason: str | None = None
    runtime: dict[str, Any] = field(default_factory=lambda: {
        "phase": None, "progress": {}, "health_status": None, "health_detail": {},
        "runtime_state": {}})
    deployed: list[str] = field(default_factory=list)
    up: bool = False
    cycle: int = 0
    members: dict[str, MMember] = field(default_factory=dict)
    initial_members: int = 0
    ops: dict[str, MOp] = field(default_factory=dict)
    repairs: dict[str, MRepair] = field(default_factory=dict)
    moves: list[tuple[str, str]] = field(default_factory=list)
    #: "{component}@{cycle}" -> meter
    meters: dict[str, MMeter] = field(default_factory=dict)
    priced: bool = False

    @property
    def gone(self) -> bool:
        return self.status in GONE

    @property
    def failed_teardown(self) -> bool:
        return self.status == "failed" and self.failed_during == "decommission"

    def live_members(self) -> list[MMember]:
        return [m for m in self.members.values() if m.status != "deleted"]

    def busy(self, member_id: str) -> bool:
        return any(op.status in OPEN_OPS and (op.target == member_id or member_id in op.materialized)
                   for op in self.ops.values())


def meter_key(component: str, cycle: int) -> str:
    return f"{component}@{cycle}"


@dataclass
class ReferenceAppInstances:
    apps: dict[str, MApp] = field(default_factory=dict)
    #: (project, slug) -> (enabled, policy overrides)
    entitlements: dict[tuple[str, str], tuple[bool, dict[str, Any]]] = field(default_factory=dict)
    instances: dict[str, MInstance] = field(default_factory=dict)
    funds: dict[str, int] = field(default_factory=dict)
    #: the nodes app capacity may claim, and the allocation of each project (bindable)
    app_nodes: tuple[str, ...] = ()
    allocations: dict[str, str] = field(default_factory=dict)  # project -> allocation
    sku_price: int = 0
    platform_price: int = 0
    published: int = 0

    # ---- derived -------------------------------------------------------------------------
    def charged(self, payer: str) -> int:
        return sum(m.cost() for i in self.instances.values() for m in i.meters.values()
                   if m.payer == payer)

    def balance(self, payer: str) -> int:
        return self.funds.get(payer, 0) - self.charged(payer)

    def holder_of(self, node: str) -> str | None:
        held = [h for i in self.instances.values() for m in i.members.values()
                if m.node == node and m.claim in LIVE_CLAIMS for h in m.holders[-1:]]
        assert len(held) <= 1, f"model: node {node} held twice"
        return held[0] if held else None

    def free_nodes(self) -> list[str]:
        return [n for n in self.app_nodes if self.holder_of(n) is None]

    def live_in(self, project: str, slug: str | None = None) -> set[str]:
        return {i.id for i in self.instances.values() if i.project == project and not i.gone
                and (slug is None or i.slug == slug)}

    def bindings(self, allocation: str) -> set[tuple[str, str]]:
        return {(i.id, m.id) for i in self.instances.values() for m in i.members.values()
                if m.allocation == allocation and m.status != "deleted" and not i.gone}

    def entitled(self, project: str, slug: str, version: str) -> str:
        enabled, overrides = self.entitlements.get((project, slug), (None, {}))
        if not enabled:
            return "app_not_entitled/" + ("entitlement_missing" if enabled is None
                                          else "entitlement_disabled")
        allowed = overrides.get("allowed_versions")
        if allowed is not None and version not in allowed:
            return "app_not_entitled/version_not_allowed"
        return "ok"

    def allowed(self, inst: MInstance, command: str) -> bool:
        """The V3 ``lifecycle_actions[x].enabled`` predicate (§5.3)."""
        if command == "decommission" and inst.status in TEARDOWN + GONE:
            return True
        if inst.status not in COMMANDS[command][0]:
            return False
        if inst.failed_teardown and command != "decommission":
            return False
        return command != "restart" or not self._restart_unsafe(inst)

    def _restart_unsafe(self, inst: MInstance) -> bool:
        return inst.backend in ("k8s", "rke2") and len(inst.live_members()) > 1

    # ---- setup -----------------------------------------------------------------------------
    def add_app(self, app: MApp) -> None:
        self.apps[app.slug] = app

    def register(self, slug: str, version: str, backend: str) -> None:
        self.apps[slug].versions[version] = MVersion(backend)

    def publish(self, slug: str, version: str) -> bool:
        found = self.apps[slug].versions[version]
        if found.status == "active":
            return False
        self.published += 1
        found.status, found.published_seq = "active", self.published
        return True

    def deprecate(self, slug: str, version: str) -> str:
        found = self.apps[slug].versions[version]
        if found.status == "deprecated":
            return "noop"
        if found.status != "active":
            return "invalid_request/app_version_not_published"
        found.status = "deprecated"
        return "ok"

    def entitle(self, project: str, slug: str, enabled: bool, overrides: dict[str, Any]) -> str:
        if self.entitlements.get((project, slug)) == (enabled, overrides):
            return "noop"
        self.entitlements[(project, slug)] = (enabled, dict(overrides))
        return "ok"

    def fund(self, payer: str, amount: int) -> None:
        self.funds[payer] = self.funds.get(payer, 0) + amount

    # ---- create ---------------------------------------------------------------------------
    def create_outcome(self, project: str, payer: str, slug: str, version: str | None,
                       hint: str | None, refs: list[tuple[str, str]], shared: bool
                       ) -> tuple[str, dict[str, Any]]:
        """The outcome of a create, and (when ok) what it makes: version, mode, scope and
        the members expected ([(component, capacity, allocation)])."""
        app = self.apps[slug]
        if version is None:
            state = self.entitled(project, slug, "")
            if state in ("app_not_entitled/entitlement_missing", "app_not_entitled/entitlement_disabled"):
                return state, {}
            allowed = self.entitlements[(project, slug)][1].get("allowed_versions")
            active = [(v.published_seq, name) for name, v in app.versions.items()
                      if v.status == "active" and (allowed is None or name in allowed)]
            if not active:
                return "app_version_not_found/no_entitled_active_version", {}
            version = max(active)[1]
        if version not in app.versions:
            return "app_version_not_found", {}
        state = self.entitled(project, slug, version)
        if state != "ok":
            return state, {}
        if app.versions[version].status != "active":
            return "invalid_request/app_version_not_active", {}
        mode = hint if hint in app.modes else app.modes[0]
        scope = "platform" if mode == "platform_managed" else "project"
        ids = [a for _, a in refs]
        if len(set(ids)) != len(ids) and not shared:
            return "invalid_request/duplicate_allocation", {}
        backend = app.versions[version].backend
        if mode == "tenant_dedicated" and not app.capacity:
            need = {"rke2": "server", "bare_metal": "workload"}.get(backend, "controller")
            if need not in [c for c, _ in refs]:
                return "invalid_request/placement_shape_invalid", {}
        for _, allocation in refs:
            if allocation != self.allocations[project]:
                return "allocation_not_found", {}
            if self.bindings(allocation):
                return "invalid_request/allocation_in_use_by_app", {}
        limit = self.entitlements[(project, slug)][1].get("max_instances")
        if limit is not None and len(self.live_in(project, slug)) >= limit:
            return "app_instance_quota_exceeded", {}
        if self.balance(payer) <= 0:
            return "insufficient_balance/balance_not_positive", {}
        if app.capacity > len(self.free_nodes()):
            return "sku_unavailable", {}
        members = [(c, False, a) for c, a in refs] + [("runtime", True, None)] * app.capacity
        return "ok", {"version": version, "mode": mode, "scope": scope, "backend": backend,
                      "members": members}

    def admit(self, instance_id: str, project: str, payer: str, slug: str,
              plan: dict[str, Any], members: list[dict[str, Any]], at: datetime) -> None:
        """A create the model expected, with the ids, holders and nodes it got."""
        assert instance_id not in self.instances, "model: an instance admitted twice"
        inst = MInstance(id=instance_id, project=project, payer=payer, slug=slug,
                         backend=plan["backend"], mode=plan["mode"], scope=plan["scope"],
                         version=plan["version"],
                         priced=self.apps[slug].priced and plan["mode"] == "platform_managed")
        want = sorted((c, cap, a) for c, cap, a in plan["members"])
        got = sorted((m["component_key"], m["holder"] is not None, m["bound_allocation_id"])
                     for m in members)
        assert got == want, f"members {got} != model {want}"
        self.instances[instance_id] = inst
        for m in members:
            self._materialize(inst, m, capacity=m["holder"] is not None)
        inst.initial_members = len(members)
        self.sync(inst, at)

    def _materialize(self, inst: MInstance, m: dict[str, Any], *, capacity: bool,
                     status: str = "requested", source_op: str | None = None) -> MMember:
        member = MMember(id=m["id"], component=m["component_key"], status=status,
                         capacity=capacity, allocation=m.get("bound_allocation_id"),
                         source_op=source_op)
        if capacity:
            assert m["node"] in self.free_nodes(), "model: placed on a node that is not free"
            member.holders.append(m["holder"])
            member.node, member.claim = m["node"], "reserved"
        inst.members[member.id] = member
        return member

    # ---- what follows the state ------------------------------------------------------------
    def claim_target(self, inst: MInstance, member: MMember) -> str:
        if inst.gone or inst.status == "stopped" or member.status == "deleted":
            return "released"
        if inst.status in TEARDOWN or inst.failed_teardown or member.status == "deleting":
            return "releasing"
        if inst.up:
            return "active"
        return "provisioning" if inst.status == "deploying" else "reserved"

    def sync(self, inst: MInstance, at: datetime) -> None:
        for member in inst.members.values():
            if member.claim in LIVE_CLAIMS:
                target = self.claim_target(inst, member)
                if CLAIM_ORDER.index(target) > CLAIM_ORDER.index(member.claim):
                    member.claim = target
        wanted: dict[str, tuple[int, int]] = {}
        if inst.up:
            if inst.priced:
                wanted[meter_key("control_plane", inst.cycle)] = (self.platform_price, 1)
            for member in inst.members.values():
                if member.capacity and member.status != "deleted":
                    wanted[meter_key(f"member:{member.id}", inst.cycle)] = (self.sku_price, 1)
        for key, (price, units) in wanted.items():
            if key not in inst.meters:
                inst.meters[key] = MMeter(inst.payer, price, units, start=at, billed_to=at)
        for key, meter in inst.meters.items():
            if meter.end is None and key not in wanted:
                meter.end = at
                meter.billed_to = max(meter.billed_to, at)

    def tick(self, until: datetime) -> int:
        due = 0
        for inst in self.instances.values():
            for meter in inst.meters.values():
                if meter.end is None and meter.billed_to < until:
                    meter.billed_to = until
                    due += 1
        return due

    # ---- lifecycle ------------------------------------------------------------------------
    def _move(self, inst: MInstance, to: str, at: datetime, *, failure_reason: str | None = None,
              runtime: dict[str, Any] | None = None) -> None:
        assert (inst.status, to) in EDGES, f"model: {inst.status} -> {to}"
        inst.moves.append((inst.status, to))
        if to == "failed":
            inst.failed_during = FAILED_DURING[inst.status]
            inst.failure_reason = failure_reason
        else:
            inst.failed_during = inst.failure_reason = None
        inst.status = to
        inst.runtime.update(runtime or {})
        if to == "running":
            if inst.version not in inst.deployed:
                inst.deployed.append(inst.version)
            inst.up = True
        if to == "stopped" or to in GONE:
            inst.up = False
        if to == "starting":
            inst.cycle += 1
        if to == "decommissioning":
            for op in inst.ops.values():
                if op.status in OPEN_OPS:
                    op.status, op.last_error_code = "cancelled", "superseded_by_decommission"
            for repair in inst.repairs.values():
                if repair.status in OPEN_OPS:
                    repair.status = "cancelled"
            for member in inst.members.values():
                if member.status != "deleted":
                    member.status = "deleting"
        if to in GONE:
            for member in inst.members.values():
                member.status = "deleted"

    def command_outcome(self, inst: MInstance, command: str, version: str | None = None) -> str:
        """The answer of a lifecycle command (``noop`` for decommission in teardown)."""
        if command == "decommission" and inst.status in TEARDOWN + GONE:
            return "noop"
        if inst.status not in COMMANDS[command][0]:
            return "app_instance_state_invalid"
        if inst.failed_teardown and command != "decommission":
            return "app_instance_state_invalid/decommission_failed"
        if command in ("upgrade", "rollback"):
            app = self.apps[inst.slug]
            if version not in app.versions:
                return "app_version_not_found"
            state = self.entitled(inst.project, inst.slug, version)
            if state != "ok":
                return state
            target = app.versions[version]
            if command == "upgrade":
                if version == inst.version:
                    return "invalid_request/app_version_unchanged"
                if target.status != "active":
                    return "invalid_request/app_version_not_active"
                if target.backend != inst.backend:
                    return "invalid_request/runtime_backend_change_unsupported"
            else:
                if version == inst.version or version not in inst.deployed:
                    return "invalid_request/version_not_previously_deployed"
                if target.status == "disabled":
                    return "invalid_request/app_version_not_active"
        if command == "restart" and self._restart_unsafe(inst):
            return "app_instance_state_invalid/restart_unsupported_use_repair"
        if command in ("start", "upgrade") and self.balance(inst.payer) <= 0:
            return "insufficient_balance/balance_not_positive"
        if command == "start":
            needed = [m for m in inst.members.values() if m.capacity and m.status != "deleted"]
            if len(needed) > len(self.free_nodes()):
                return "sku_unavailable"
        return "ok"

    def command(self, inst: MInstance, command: str, at: datetime, version: str | None = None,
                placed: dict[str, tuple[str, str]] | None = None) -> None:
        """Apply an accepted command; ``placed`` = member -> (holder, node) of a start."""
        self._move(inst, COMMANDS[command][1], at)
        if version is not None and command in ("upgrade", "rollback"):
            inst.version = version
        if command == "start":
            placed = placed or {}
            needed = {m.id for m in inst.members.values() if m.capacity and m.status != "deleted"}
            assert set(placed) == needed, "model: start placed other members than needed"
            for member_id, (holder, node) in placed.items():
                member = inst.members[member_id]
                assert holder not in member.holders, "model: a claim holder reused"
                assert node in self.free_nodes(), "model: start placed on a held node"
                member.holders.append(holder)
                member.node, member.claim = node, "reserved"
        self.sync(inst, at)

    # ---- reports ---------------------------------------------------------------------------
    def report_outcome(self, inst: MInstance, status: str, fields: dict[str, Any]) -> str:
        """``move``, ``observe`` (something changes), ``noop`` or the refusal."""
        current = inst.status
        if status == current or (status == "deploying" and current in TRANSITIONAL):
            effect = "observe"
        elif (current, status) in REPORT_MOVES and not (
                current == "failed" and (status in GONE) != inst.failed_teardown):
            effect = "move"
        else:
            return "app_instance_state_invalid"
        if effect == "move":
            return "move"
        changes = self._runtime_changes(inst, fields)
        if status == "failed" and "failure_reason" in fields \
                and fields["failure_reason"] != inst.failure_reason:
            changes["failure_reason"] = fields["failure_reason"]
        if not changes:
            return "noop"
        return "app_instance_state_invalid" if inst.gone else "observe"

    @staticmethod
    def _runtime_changes(inst: MInstance, fields: dict[str, Any],
                         keys: tuple[str, ...] = RUNTIME) -> dict[str, Any]:
        return {k: fields[k] for k in keys if k in fields and fields[k] != inst.runtime[k]}

    def report(self, inst: MInstance, status: str, fields: dict[str, Any], at: datetime) -> str:
        outcome = self.report_outcome(inst, status, fields)
        if outcome == "move":
            self._move(inst, status, at, failure_reason=fields.get("failure_reason"),
                       runtime=self._runtime_changes(inst, fields))
        elif outcome == "observe":
            changes = self._runtime_changes(inst, fields)
            inst.runtime.update(changes)
            if status == "failed" and "failure_reason" in fields:
                inst.failure_reason = fields["failure_reason"]
        if outcome in ("move", "observe"):
            self.sync(inst, at)
        return outcome

    # ---- members ---------------------------------------------------------------------------
    def member_report(self, inst: MInstance, member_id: str, status: str,
                      fields: dict[str, Any], at: datetime) -> str:
        member = inst.members.get(member_id)
        if member is None:
            return "app_instance_not_found"
        changed = "health_status" in fields and fields["health_status"] != member.health_status
        if status != member.status and status not in MEMBER_EDGES[member.status]:
            return "invalid_request/member_transition_invalid"
        if member.status == "deleted" and changed:
            return "invalid_request/member_deleted"
        if status == member.status and not changed:
            return "noop"
        member.status = status
        if changed:
            member.health_status = fields["health_status"]
        self.sync(inst, at)
        return "ok"

    def allocation_released(self, allocation: str, at: datetime) -> set[str]:
        touched = set()
        for inst in self.instances.values():
            for member in inst.members.values():
                if member.allocation == allocation and not inst.gone \
                        and member.status not in ("failed", "deleted"):
                    member.status, member.health_status = "failed", "allocation_released"
                    touched.add(inst.id)
                    self.sync(inst, at)
        return touched

    def op_outcome(self, inst: MInstance, action: str, component: str | None,
                   target: str | None, count: int | None, capacity: bool) -> str:
        if action != "add" and not target:
            return "invalid_request/target_member_id_required"
        if count is not None and action != "add":
            return "invalid_request/requested_count_invalid"
        if capacity and action in ("drain", "remove"):
            return "invalid_request/allocation_intent_invalid"
        if inst.status not in ("requested", "deploying", "running", "failed") \
                or inst.failed_teardown:
            return "app_instance_state_invalid"
        if target:
            member = inst.members.get(target)
            if member is None:
                return "app_instance_not_found"
            if member.status == "deleted":
                return "app_instance_state_invalid/member_deleted"
            if inst.busy(target):
                return "app_instance_state_invalid/member_operation_in_progress"
        if action == "add" and self.balance(inst.payer) <= 0:
            return "insufficient_balance/balance_not_positive"
        if action == "add" and capacity and (count or 1) > len(self.free_nodes()):
            return "sku_unavailable"
        return "ok"

    def op_created(self, inst: MInstance, op_id: str, action: str, component: str | None,
                   target: str | None, count: int | None,
                   placed: list[dict[str, Any]], at: datetime) -> None:
        op = MOp(op_id, action, component, target, count)
        inst.ops[op_id] = op
        for m in placed:
            self._materialize(inst, m, capacity=True, source_op=op_id)
            op.materialized.append(m["id"])
        if placed:
            assert len(placed) == (count or 1), "model: a capacity add placed another count"
            op.target = op.target or placed[0]["id"]
        self.sync(inst, at)

    def op_report_outcome(self, inst: MInstance, op_id: str, status: str, named: str | None,
                          member_status: str | None, error: str | None) -> tuple[str, str | None]:
        """(outcome, the member the report is about); ``new`` members are named ids the
        instance does not know yet."""
        op = inst.ops[op_id]
        terminal = op.status in TERMINAL_OPS
        if terminal and status != op.status:
            return "app_instance_state_invalid", None
        new = False
        if op.action in ("drain", "remove"):
            if named and named != op.target:
                return "invalid_request/target_mismatch", None
            about = op.target
        elif named is None:
            about = op.target
        elif named in inst.members:
            if named != op.target and named not in op.materialized:
                return "invalid_request/target_mismatch", None
            about = named
        else:
            if len(op.materialized) >= op.limit:
                return ("app_instance_state_invalid" if terminal
                        else "invalid_request/member_count_exceeded"), None
            about, new = named, True
        if member_status and about is None:
            return "invalid_request/target_member_required", None
        op_changes = (error is not None and error != op.last_error_code) or (
            op.target is None and about is not None)
        member_changes = False
        if new:
            if terminal:
                return "app_instance_state_invalid", None
            if (member_status or "requested") not in ("requested", "reconciling", "ready", "failed"):
                return "invalid_request/member_transition_invalid", None
            member_changes = True
        elif about is not None and member_status:
            member = inst.members[about]
            if member_status != member.status:
                if member_status not in MEMBER_EDGES[member.status]:
                    return "invalid_request/member_transition_invalid", None
                if terminal:
                    return "app_instance_state_invalid", None
                member_changes = True
        if status != op.status or op_changes:
            if terminal:
                return "app_instance_state_invalid", None
        elif not member_changes:
            return "noop", about
        return "ok", about

    def op_report(self, inst: MInstance, op_id: str, status: str, named: str | None,
                  member_status: str | None, error: str | None, at: datetime,
                  new_member: dict[str, Any] | None = None) -> str:
        outcome, about = self.op_report_outcome(inst, op_id, status, named, member_status, error)
        if outcome != "ok":
            return outcome
        op = inst.ops[op_id]
        if about is not None and about not in inst.members:
            assert new_member is not None and new_member["id"] == about
            component = op.component or inst.members[op.target].component
            self._materialize(inst, {"id": about, "component_key": component}, capacity=False,
                              status=member_status or "requested", source_op=op_id)
            op.materialized.append(about)
        elif about is not None and member_status:
            inst.members[about].status = member_status
        if op.target is None and about is not None:
            op.target = about
        if error is not None:
            op.last_error_code = error
        op.status = status
        self.sync(inst, at)
        return "ok"

    # ---- repairs ---------------------------------------------------------------------------
    def repair_outcome(self, inst: MInstance, scope: str, target: str | None) -> str:
        if scope == "member" and not target:
            return "invalid_request/target_member_id_required"
        if inst.status not in ("running", "failed") or inst.failed_teardown:
            return "app_instance_state_invalid"
        if target:
            member = inst.members.get(target)
            if member is None:
                return "app_instance_not_found"
            if member.status == "deleted":
                return "app_instance_state_invalid/member_deleted"
        if any(r.status in OPEN_OPS for r in inst.repairs.values()):
            return "app_instance_state_invalid/repair_operation_in_progress"
        return "ok"

    def repair_created(self, inst: MInstance, repair_id: str, action: str, dry_run: bool) -> None:
        plan = ["diagnose", "reconcile"] if action == "reconcile" else ["diagnose", "repair", "verify"]
        inst.repairs[repair_id] = MRepair(
            repair_id, "succeeded" if dry_run else "accepted",
            ["skipped" if dry_run else "pending"] * len(plan), names=plan,
            summaries=["dry run: planned, not executed" if dry_run else None] * len(plan))

    def repair_report(self, inst: MInstance, repair_id: str, status: str,
                      steps: list[str] | None, health: str | None, at: datetime) -> str:
        repair = inst.repairs[repair_id]
        if steps is not None:
            for old, new in zip(repair.steps, steps):
                if STEP_RANK[new] < STEP_RANK[old] or (STEP_RANK[old] == 2 and new != old):
                    return "invalid_request/repair_step_regressed"
        changes = (steps is not None and steps != repair.steps)
        observed = health is not None and health != inst.runtime["health_status"]
        moved = status != repair.status
        if not moved and not changes and not observed:
            return "noop"
        if repair.status in TERMINAL_OPS or status == "accepted":
            return "app_instance_state_invalid"
        repair.status = status
        if steps is not None:
            repair.steps = list(steps)
        if observed:
            inst.runtime["health_status"] = health
        self.sync(inst, at)
        return "ok"


# ---- the real side ---------------------------------------------------------------------------
def observe(app: Any, model: ReferenceAppInstances, mirror: Any) -> dict[str, Any]:
    """The real aggregates the model speaks of, as plain data (``mirror``: an
    ``EventMirror`` the caller keeps between calls)."""
    mirror.refresh()
    instances: dict[str, dict[str, Any]] = {}
    for inst_id, want in model.instances.items():
        instance: AppInstance = mirror.state(inst_id)
        events = mirror.events(inst_id)
        meters = {}
        components = ["control_plane"] + [f"member:{m}" for m in instance.members]
        for cycle in range(instance.placement_cycle + 1):
            for component in components:
                record = mirror.state(usage_id_for_app(UUID(inst_id), component, cycle))
                if record is not None:
                    meters[meter_key(component, cycle)] = {
                        "start": record.start_time, "end": record.end_time,
                        "cost": record.cost_minor, "payer": record.meter["requested_by_user_id"],
                        "usage_source": record.meter["usage_source"],
                        "app_instance_id": record.meter["app_instance_id"]}
        instances[inst_id] = {
            "state": instance, "json": instance_json(instance),
            "moves": [(e.from_status, e.to) for e in events if isinstance(e, AppInstance.Moved)],
            "after_gone": _events_after_gone(events), "meters": meters,
            "allowed": {c: command_allowed(instance, c)
                        for c in ("stop", "start", "restart", "decommission")}}
    node_claims: dict[str, dict[str, dict[str, Any]]] = {}
    for node_id in model.app_nodes:
        history: dict[str, list[str]] = {}
        for event in mirror.events(node_id):
            if isinstance(event, NodeInventory.ClaimsReserved):
                for claim in event.claims:
                    history[claim["id"]] = [claim["status"]]
            elif isinstance(event, NodeInventory.ClaimsMoved):
                for claim_id in event.claim_ids:
                    history[claim_id].append(event.to)
        node = mirror.state(node_id)
        node_claims[node_id] = {cid: {**c, "history": history[cid]} for cid, c in node.claims.items()}
    accounts = {}
    for payer in model.funds:
        account: BillingAccount | None = mirror.state(account_id_for(UUID(payer)))
        accounts[payer] = account.balance("USD") if account is not None else 0
    quota = {}
    for project in {i.project for i in model.instances.values()}:
        q = mirror.state(quota_id_for(project))
        quota[project] = set(q.live) if q is not None else set()
    bindings = {}
    for allocation in model.allocations.values():
        use = mirror.state(app_use_id_for(allocation))
        bindings[allocation] = ({(b["app_instance_id"], m) for m, b in use.bindings.items()}
                                if use is not None else set())
    return {"instances": instances, "node_claims": node_claims, "accounts": accounts,
            "quota": quota, "bindings": bindings}


def _events_after_gone(events: list[Any]) -> list[Any]:
    """Events after the first move into Gone, the decommissioned → deleted move aside."""
    for index, event in enumerate(events):
        if isinstance(event, AppInstance.Moved) and event.to in GONE:
            return [e for e in events[index + 1:] if not (
                isinstance(e, AppInstance.Moved) and (e.from_status, e.to) == ("decommissioned", "deleted"))]
    return []


def check_invariants(model: ReferenceAppInstances, live: dict[str, Any]) -> None:
    """Raises AssertionError naming the first broken invariant."""
    for inst_id, want in model.instances.items():
        got = live["instances"][inst_id]
        state: AppInstance = got["state"]
        body = got["json"]
        name = f"app instance {inst_id[:8]} ({want.status})"
        # §5.1 closure: every status change is an edge, and the history is the model's
        status = "requested"
        for frm, to in got["moves"]:
            assert frm == status and (frm, to) in EDGES, f"{name}: illegal edge {frm} -> {to}"
            status = to
        assert got["moves"] == want.moves, f"{name}: moves {got['moves']} != model {want.moves}"
        assert state.status == body["status"] == want.status, \
            f"{name}: status {state.status} != model {want.status}"
        # §5.2 Gone absorbs
        assert not got["after_gone"], f"{name}: changed after Gone: {got['after_gone']}"
        # §5.4/5.5 versions; §5.6 immutables; §5.7 mode consistency
        assert body["app_version"] == want.version, f"{name}: app_version"
        assert state.deployed_versions == want.deployed, \
            f"{name}: deployed {state.deployed_versions} != model {want.deployed}"
        assert (body["runtime_backend"], body["operating_mode"], body["control_plane_scope"],
                body["app_slug"], body["project_id"]) == (
                    want.backend, want.mode, want.scope, want.slug, want.project), f"{name}: identity"
        assert (body["control_plane_scope"] == "platform") == (body["operating_mode"] == "platform_managed")
        assert (state.failed_during, body["failure_reason"]) == (want.failed_during, want.failure_reason), \
            f"{name}: failure {state.failed_during, body['failure_reason']} != model"
        for key in RUNTIME:
            assert body[key] == want.runtime[key], f"{name}: {key} {body[key]} != {want.runtime[key]}"
        assert (state.runtime_up, state.placement_cycle) == (want.up, want.cycle), \
            f"{name}: runtime up/cycle"
        # §5.3 V3 lifecycle_actions: enabled ⇔ the command would be accepted
        for command, enabled in got["allowed"].items():
            assert enabled == model.allowed(want, command), f"{name}: {command} enabled={enabled}"
        # members: §5.10 count, §3.2 statuses
        members = {m: (v["status"], v["component_key"], v["health_status"], v["bound_allocation_id"])
                   for m, v in state.members.items()}
        assert members == {m: (v.status, v.component, v.health_status, v.allocation)
                           for m, v in want.members.items()}, \
            f"{name}: members {members} != model"
        assert len(state.members) == want.initial_members + sum(
            len(op.materialized) for op in want.ops.values()), f"{name}: members from nowhere"
        for op in state.member_ops.values():
            limit = (op["requested_count"] or 1) if op["action"] == "add" else \
                1 if op["action"] == "replace" else 0
            assert len(op["materialized"]) <= limit, f"{name}: op {op['id'][:8]} over its count"
        # member and repair operations: §5.8 terminal, §5.9 monotone, §5.12 single flight
        assert {o: (v["status"], v["target_member_id"], v["materialized"], v["last_error_code"])
                for o, v in state.member_ops.items()} == {
            o: (v.status, v.target, v.materialized, v.last_error_code) for o, v in want.ops.items()}, \
            f"{name}: member operations differ from the model's"
        for op in list(state.member_ops.values()) + list(state.repair_ops.values()):
            assert (op["completed_at"] is not None) == (op["status"] in TERMINAL_OPS), \
                f"{name}: completed_at ⇔ terminal"
            if op["completed_at"]:
                assert op["started_at"] is not None and op["started_at"] <= op["completed_at"]
        busy = [t for op in state.member_ops.values() if op["status"] in OPEN_OPS
                for t in {op["target_member_id"], *op["materialized"]} - {None}]
        assert len(busy) == len(set(busy)), f"{name}: two open operations on one member"
        assert {r: (v["status"], [s["status"] for s in v["steps"]])
                for r, v in state.repair_ops.items()} == {
            r: (v.status, v.steps) for r, v in want.repairs.items()}, f"{name}: repairs differ"
        assert len([r for r in state.repair_ops.values() if r["status"] in OPEN_OPS]) <= 1
        # §4.1 claims follow the state, on the member's node, each holder once
        for member_id, member in want.members.items():
            real = state.members[member_id]
            if not member.capacity:
                assert real["holder_id"] is None, f"{name}: member {member_id[:8]} claimed capacity"
                continue
            assert real["holder_id"] == member.holders[-1] and real["claim_node_id"] == member.node
            for holder in member.holders:
                claims = [c for n in live["node_claims"].values() for c in n.values()
                          if c["allocation_id"] == holder]
                expected = member.claim if holder == member.holders[-1] else "released"
                assert claims and {c["status"] for c in claims} == {expected}, \
                    f"{name}: member {member_id[:8]} claims {[c['status'] for c in claims]} != {expected}"
                for claim in claims:
                    history = claim["history"]
                    assert all(b in CLAIM_EDGES[a] for a, b in zip(history, history[1:])), \
                        f"{name}: claim history {history}"
        # §5.20 metering follows the state: exactly the model's meters, at its cost
        assert set(got["meters"]) == set(want.meters), \
            f"{name}: meters {sorted(got['meters'])} != model {sorted(want.meters)}"
        for key, meter in want.meters.items():
            real = got["meters"][key]
            assert (real["start"], real["end"]) == (meter.start, meter.end), \
                f"{name}: meter {key} {real['start'], real['end']} != model {meter.start, meter.end}"
            assert real["cost"] == meter.cost(), f"{name}: meter {key} cost {real['cost']} != {meter.cost()}"
            assert (real["usage_source"], real["app_instance_id"], real["payer"]) == (
                "app_runtime", inst_id, want.payer)
        if not want.deployed:
            assert all(m["cost"] == 0 for m in got["meters"].values()), f"{name}: never ran, yet billed"
    # no double booking of app capacity
    for node_id, claims in live["node_claims"].items():
        holders = {c["allocation_id"] for c in claims.values() if c["status"] in LIVE_CLAIMS}
        held = model.holder_of(node_id)
        assert holders == ({held} if held else set()), f"node {node_id[:8]}: held by {holders}"
    # balances: funds − Σ the model's accrued costs
    for payer, balance in live["accounts"].items():
        assert balance == model.balance(payer), \
            f"payer {payer[:8]}: balance {balance} != model {model.balance(payer)}"
    # §5.15 quota: the live (not Gone) instances
    for project, ids in live["quota"].items():
        assert ids == model.live_in(project), f"project {project[:8]}: quota {ids}"
    # §5.14 exclusivity: an allocation serves at most one live app; Gone ⇒ no binding
    for allocation, bound in live["bindings"].items():
        assert bound == model.bindings(allocation), \
            f"allocation {allocation[:8]}: bindings {bound} != model {model.bindings(allocation)}"
        assert len({i for i, _ in bound}) <= 1, f"allocation {allocation[:8]}: two apps"
