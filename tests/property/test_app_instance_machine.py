"""App instances under random creates (V3 defaults, placements, mode hints), lifecycle
commands, adapter reports (repeated at once, and old ones sent again out of order),
member reports, member and repair operations and their reports, entitlement and catalog
changes, allocation releases, funding, billing ticks and idempotent replays, checked
after every step against the kit's reference model (``domain.testing.app_instances``)
on the library's in-memory persistence.

The model decides each outcome on its own (accepted, a no-op, or refused with which
code); a refused or no-op command must append nothing (a keyed one only its
idempotency record). After every step the real aggregates must match the model: §3.1
edges only and the model's history, nothing after Gone, rollback only to a deployed
version, reports applied twice change nothing, members never beyond what was asked
for, claims and meters exactly as the instance's state says, balance = funds − the
model's accrued cost, quota and allocation bindings = the live instances'.

``test_planted_bugs_are_caught`` runs the same machine against deliberately broken
variants of ``domain.app_instances`` and asserts Hypothesis finds each."""

from __future__ import annotations

import copy
import uuid
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule, run_state_machine_as_test)

from domain import app_instances
from domain.admission import create_allocations
from domain.app import Ledgercore
from domain.app_instances import (complete_stop, create_app_instance, create_member_operation,
                                  create_repair_operation, lifecycle, mark_allocation_released,
                                  report_app_instance, report_member, report_member_operation,
                                  report_repair_operation)
from domain.apps import (deprecate_version, publish_version, register_app, register_version,
                         upsert_entitlement)
from domain.billing import adjust_balance
from domain.errors import DomainError, IdempotencyKeyReused
from domain.idempotency import record_id_for
from domain.leases import dispatch_node_tasks, report_node_task
from domain.money import Money
from domain.nodes import register_node
from domain.provenance import CommandContext, IdempotencyClaim
from domain.skus import create_sku, set_sku_active
from domain.testing.allocations import EventMirror
from domain.testing.app_instances import (GONE, MEMBER_EDGES, MApp, ReferenceAppInstances,
                                          check_invariants, observe)
from domain.usage import rate_open_usage

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=timezone.utc)
NS = uuid.UUID("6a1d3c2e-0000-4000-8000-0000000000a9")
SKU_PRICE, PLATFORM_PRICE = 999, 361
#: the catalog: slug -> (backend per version, manifest, placement key, versions published)
NB_MANIFEST = {"components": [{"component_key": "runtime", "member_role": "runtime",
                               "sku": "bm"}]}
SVC_MANIFEST = {"operating_modes": ["platform_managed", "tenant_dedicated"],
                "pricing": [{"component": "control_plane", "usage_unit": "instance_hour",
                             "unit_price": {"amount_minor": PLATFORM_PRICE, "currency": "USD"}}]}
CATALOG = {
    "nb": ([("1", "bare_metal"), ("2", "bare_metal"), ("3", "bare_metal"), ("k9", "k8s")],
           NB_MANIFEST, "target_allocation_id", ("1", "2", "k9")),
    "svc": ([("1", "k8s"), ("2", "k8s")], SVC_MANIFEST, "controller_allocation_id", ("1", "2")),
    "rk": ([("1", "rke2")], {}, "server_allocation_id", ("1",)),
}
COMPONENT_OF = {"target_allocation_id": "workload", "controller_allocation_id": "controller",
                "server_allocation_id": "server"}
STEPS = st.sampled_from([0, 1, 59, 600, 1800, 3600]) | st.integers(0, 2 * 3600)
FUNDS = st.sampled_from([50_000, 50_000, 300, 0])
INST = st.integers(0, 7)
REPORTS = st.sampled_from(["running", "running", "deploying", "failed", "decommissioning",
                           "deleting", "decommissioned", "deleted"])
FIELDS = st.fixed_dictionaries({}, optional={
    "phase": st.sampled_from([None, "pull", "up"]),
    "health_status": st.sampled_from([None, "ok", "bad"]),
    "failure_reason": st.sampled_from([None, "oom"]),
    "progress": st.sampled_from([{}, {"pct": 50}])})
MEMBER_STATUS = st.sampled_from(list(MEMBER_EDGES))
OP_REPORT = st.sampled_from(["in_progress", "in_progress", "succeeded", "failed", "cancelled"])


def render(result: Any) -> dict[str, Any]:
    if isinstance(result, DomainError):
        return {"error": result.code, "reason": result.details.get("reason")}
    return {"ok": result}


def refusal(response: dict[str, Any]) -> str:
    if "ok" in response:
        return "ok"
    reason = response.get("reason")
    return f"{response['error']}/{reason}" if reason else response["error"]


def sku_spec() -> dict[str, Any]:
    return {"vendor": "nv", "display_name": "n", "resource_class": "gpu_baremetal",
            "billing_unit": "node_hour", "scheduling_unit": "node",
            "resources": {"allowed_accelerator_counts": [8], "accelerator_count": 8},
            "unit_price": {"amount_minor": SKU_PRICE, "currency": "USD"}}


class World:
    """The world every example starts from, built once: the SKU, four nodes, one
    active allocation per project on nodes 2 and 3 (nodes 0 and 1 are for app
    capacity), the catalog. Each example gets a copy of its event store (the
    in-memory recorder's two tables; stored events are immutable) and of the model."""

    built: World | None = None

    def __init__(self) -> None:
        self.app = Ledgercore(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
        self.model = ReferenceAppInstances(sku_price=SKU_PRICE, platform_price=PLATFORM_PRICE)
        self.clock = T0
        self.users = [str(uuid.uuid5(NS, f"user-{i}")) for i in range(2)]
        self.projects = [str(uuid.uuid5(NS, f"project-{i}")) for i in range(2)]
        self.build()

    @classmethod
    def copy(cls) -> tuple[Ledgercore, ReferenceAppInstances]:
        if cls.built is None:
            cls.built = cls()
        source = cls.built.app.recorder
        # the library's aggregate cache (fast-forwarded from the store, deep-copied on
        # every get) spares replaying whole streams for every command
        app = Ledgercore(env={"PERSISTENCE_MODULE": "eventsourcing.popo",
                              "AGGREGATE_CACHE_MAXSIZE": "1000"})
        app.recorder._stored_events = list(source._stored_events)
        app.recorder._stored_events_index = defaultdict(
            dict, {k: dict(v) for k, v in source._stored_events_index.items()})
        return app, copy.deepcopy(cls.built.model)

    def run(self, factory: Any, **kwargs: Any) -> dict[str, Any]:
        response = self.app.execute(factory(CommandContext(
            actor_id="setup", actor_role="admin", source="admin", now=self.clock),
            render=render, **kwargs)).response
        assert "ok" in response, response
        return response

    def build(self) -> None:
        self.run(create_sku, sku="bm", spec=sku_spec())
        self.run(set_sku_active, sku="bm", active=True)
        nodes = []
        for index in range(4):
            node_id = uuid.uuid5(NS, f"node-{index}")
            self.run(register_node, online=True, node_id=node_id, identity={
                "host": f"h{index}", "hostname": f"node-{index}", "port": 22,
                "ssh_username": "u", "sku": "bm", "gpus_total": 8, "region_code": "r",
                "onboarding_mode": "manual"})
            nodes.append(str(node_id))
        # one active allocation per project (owned by a third user) on nodes 2 and 3
        owner = uuid.uuid5(NS, "allocation-owner")
        self.run(adjust_balance, user_id=owner, direction="credit",
                 amount=Money(10**9, "USD"), reason="owner")
        allocations = {}
        for project, node in zip(self.projects, nodes[2:]):
            made = self.run(create_allocations, user_id=owner, tenant_id=None,
                            project_id=uuid.UUID(project), requested_count=1,
                            node_id=uuid.UUID(node), capacity_shape=None, gpu_count=None,
                            request={})["ok"]
            task = self.run(dispatch_node_tasks, node_id=uuid.UUID(node))["ok"]["task"]
            self.run(report_node_task, node_id=uuid.UUID(node), task_id=uuid.UUID(task["task_id"]),
                     status="success", error=None, completed_at=self.clock, output={})
            allocations[project] = made["allocations"][0]["id"]
        self.model.app_nodes = tuple(nodes[:2])
        self.model.allocations = allocations
        for slug, (versions, manifest, key, published) in CATALOG.items():
            self.run(register_app, slug=slug, display_name=slug.upper(), category="other",
                     publisher="core42")
            self.model.add_app(MApp(
                slug=slug, modes=tuple(manifest.get("operating_modes", ["tenant_dedicated"])),
                capacity=len(manifest.get("components", [])), priced=bool(manifest.get("pricing")),
                placement_key=key))
            for version, backend in versions:
                self.run(register_version, slug=slug, version=version, runtime_backend=backend,
                         manifest=manifest)
                self.model.register(slug, version, backend)
            for version in published:
                self.run(publish_version, slug=slug, version=version)
                self.model.publish(slug, version)


class AppInstanceMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.app, self.model = World.copy()
        self.mirror = EventMirror(self.app)
        self.clock = T0
        self.made = 0
        self.keyed: list[tuple[Any, dict[str, Any], IdempotencyClaim, dict[str, Any]]] = []
        self.sent: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        self.updated: dict[str, str] = {}
        self.costs: dict[str, int] = {}
        self.users = [str(uuid.uuid5(NS, f"user-{i}")) for i in range(2)]
        self.projects = [str(uuid.uuid5(NS, f"project-{i}")) for i in range(2)]

    # ---- plumbing -------------------------------------------------------------------------
    def ctx(self, claim: IdempotencyClaim | None = None) -> CommandContext:
        return CommandContext(actor_id="property", actor_role="member", source="api",
                              now=self.clock, idempotency=claim)

    def position(self) -> int:
        return self.app.recorder.max_notification_id() or 0

    def run(self, factory: Any, **kwargs: Any) -> dict[str, Any]:
        return self.app.execute(factory(self.ctx(), render=render, **kwargs)).response

    def send(self, factory: Any, keyed: bool = False, **kwargs: Any) -> tuple[dict[str, Any], bool]:
        """Run a command (under a fresh Idempotency-Key when ``keyed``); answers the
        response and whether it appended anything besides its idempotency record."""
        claim = None
        if keyed:
            self.made += 1
            claim = IdempotencyClaim(scope=f"property:{self.made}", fingerprint=repr(kwargs))
        before = self.position()
        response = self.app.execute(factory(self.ctx(claim), render=render, **kwargs)).response
        appended = self.app.recorder.select_notifications(start=before + 1, limit=10_000)
        if claim is not None:
            self.keyed.append((factory, kwargs, claim, response))
            record = record_id_for(claim.scope)
            assert [n for n in appended if n.originator_id == record], "no idempotency record"
            appended = [n for n in appended if n.originator_id != record]
        return response, bool(appended)

    def expect(self, expected: str, response: dict[str, Any], appended: bool, what: str) -> None:
        """``noop``: accepted, nothing appended; ``ok`` (or ``move``/``observe``):
        accepted and appended; a refusal: that code and nothing appended."""
        event(f"{what}: {expected}")
        got = refusal(response)
        want = "ok" if expected in ("ok", "noop", "move", "observe") else expected
        assert got == want, f"{what}: got {got}, model {expected}"
        assert appended == (expected in ("ok", "move", "observe")), \
            f"{what}: {expected} but appended={appended}"

    def pick(self, n: int) -> Any:
        """An instance: mostly a live one (``n`` < 6), else any (in creation order)."""
        instances = list(self.model.instances.values())
        live = [i for i in instances if not i.gone]
        if n < 6 and live:
            return live[n % len(live)]
        return instances[n % len(instances)]

    def project_for(self, inst: Any, foreign: bool) -> uuid.UUID:
        project = inst.project
        if foreign:
            project = self.projects[1 - self.projects.index(project)]
        return uuid.UUID(project)

    def version(self, slug: str, v: int) -> str:
        """A version of the app by index, or (one index more) one it does not have."""
        known = list(self.model.apps[slug].versions) + ["zz"]
        return known[v % len(known)]

    def plausible_version(self, inst: Any, command: str, v: int) -> str:
        """What a user would pick: for an upgrade an active version of the same backend
        other than the current one, for a rollback one the instance ran before."""
        app = self.model.apps[inst.slug]
        candidates = [name for name, found in app.versions.items() if found.status == "active"
                      and name != inst.version and found.backend == inst.backend] \
            if command == "upgrade" else [d for d in inst.deployed if d != inst.version]
        return candidates[v % len(candidates)] if candidates else self.version(inst.slug, v)

    def fresh(self) -> str:
        self.made += 1
        return str(uuid.uuid5(NS, f"fresh-{self.made}"))

    def real(self, inst_id: str) -> Any:
        return self.app.repository.get(uuid.UUID(inst_id))

    def placed(self, inst_id: str, member_ids: list[str]) -> list[dict[str, Any]]:
        """The members as materialized, with where their claims went."""
        members = self.real(inst_id).members
        return [{"id": m, "component_key": members[m]["component_key"],
                 "bound_allocation_id": members[m]["bound_allocation_id"],
                 "holder": members[m]["holder_id"], "node": members[m]["claim_node_id"]}
                for m in member_ids]

    # ---- setup ----------------------------------------------------------------------------
    @initialize(funds=st.tuples(FUNDS, FUNDS), limited=st.booleans())
    def setup(self, funds: tuple[int, int], limited: bool) -> None:
        for user, amount in zip(self.users, funds):
            if amount:
                self.fund(self.users.index(user), amount)
        for project in self.projects:
            for slug in CATALOG:
                enabled = not (limited and project == self.projects[1] and slug == "rk")
                self.entitle(self.projects.index(project), slug, enabled, "none")

    # ---- money, catalog, entitlements, clock --------------------------------------------------
    @rule(user=st.integers(0, 1), amount=st.sampled_from([1, 500, 50_000]))
    def fund(self, user: int, amount: int) -> None:
        assert "ok" in self.run(adjust_balance, user_id=uuid.UUID(self.users[user]),
                                direction="credit", amount=Money(amount, "USD"), reason="top-up")
        self.model.fund(self.users[user], amount)

    @rule(project=st.integers(0, 1), slug=st.sampled_from(sorted(CATALOG)), enabled=st.booleans(),
          variant=st.sampled_from(["none", "none", "v1only", "max1"]))
    def entitle(self, project: int, slug: str, enabled: bool, variant: str) -> None:
        overrides = {"none": {}, "v1only": {"allowed_versions": ["1"]},
                     "max1": {"max_instances": 1}}[variant]
        expected = self.model.entitle(self.projects[project], slug, enabled, overrides)
        response, appended = self.send(upsert_entitlement, project_id=uuid.UUID(self.projects[project]),
                                       slug=slug, enabled=enabled, policy_overrides=overrides)
        self.expect(expected, response, appended, "entitle")

    @rule(slug=st.sampled_from(sorted(CATALOG)), v=st.integers(0, 4), publish=st.booleans())
    def catalog(self, slug: str, v: int, publish: bool) -> None:
        version = self.version(slug, v)
        if version not in self.model.apps[slug].versions:
            response, appended = self.send(publish_version if publish else deprecate_version,
                                           slug=slug, version=version)
            return self.expect("app_version_not_found", response, appended, "catalog")
        if publish:
            expected = "ok" if self.model.publish(slug, version) else "noop"
            response, appended = self.send(publish_version, slug=slug, version=version)
        else:
            expected = self.model.deprecate(slug, version)
            response, appended = self.send(deprecate_version, slug=slug, version=version)
        self.expect(expected, response, appended, "publish" if publish else "deprecate")

    @rule(seconds=STEPS)
    def advance(self, seconds: int) -> None:
        self.clock += timedelta(seconds=seconds)

    @rule()
    def tick(self) -> None:
        answer = self.run(rate_open_usage, until=self.clock)["ok"]
        assert not answer["failed"] and not answer["more"]
        self.model.tick(self.clock)  # the allocations' meters are rated too: not counted here

    # ---- create ---------------------------------------------------------------------------
    def placement(self, slug: str, choice: str, project: str) -> tuple[dict[str, Any], list]:
        key = self.model.apps[slug].placement_key
        own = self.model.allocations[project]
        other = self.model.allocations[self.projects[1 - self.projects.index(project)]]
        component = COMPONENT_OF[key]
        if choice == "own":
            return {key: own}, [(component, own)]
        if choice == "foreign":
            return {key: other}, [(component, other)]
        if choice == "dup":
            return {key: own, "worker_allocation_ids": [own]}, [(component, own), ("worker", own)]
        return {}, []

    @rule(user=st.integers(0, 1), slug=st.sampled_from(sorted(CATALOG)),
          v=st.none() | st.integers(0, 4), hint=st.sampled_from([None, "tenant_dedicated",
                                                                 "platform_managed"]),
          placement=st.sampled_from(["none", "none", "own", "own", "foreign", "dup"]),
          keyed=st.booleans())
    def create(self, user: int, slug: str, v: int | None, hint: str | None,
               placement: str, keyed: bool) -> None:
        """``createAppInstance`` (a version named) or ``submitV3AppLaunch`` (none)."""
        version = None if v is None else self.version(slug, v)
        project, payer = self.projects[user], self.users[user]
        intent, refs = self.placement(slug, placement, project)
        expected, plan = self.model.create_outcome(project, payer, slug, version, hint, refs,
                                                   shared=False)
        request = {"app_slug": slug, "app_version": version, "display_name": "p",
                   "operating_mode": hint, "placement_intent": intent}
        response, appended = self.send(create_app_instance, keyed, project_id=uuid.UUID(project),
                                       user_id=uuid.UUID(payer), tenant_id=None, request=request,
                                       source="api" if version else "v3_launch")
        self.expect(expected, response, appended, f"create {slug}")
        if expected == "ok":
            body = response["ok"]
            inst_id = body["app_instance"]["id"]
            assert body["workload_id"] == inst_id and body["app_instance"]["status"] == "requested"
            self.model.admit(inst_id, project, payer, slug, plan,
                             self.placed(inst_id, [m["id"] for m in body["members"]]), self.clock)

    # ---- lifecycle ------------------------------------------------------------------------
    @precondition(lambda self: self.model.instances)
    @rule(n=INST, command=st.sampled_from(["stop", "start", "restart", "upgrade", "rollback",
                                           "decommission"]),
          v=st.integers(0, 4), foreign=st.sampled_from([False] * 7 + [True]),
          legacy=st.booleans())
    def command(self, n: int, command: str, v: int, foreign: bool, legacy: bool) -> None:
        inst = self.pick(n)
        self.send_command(inst, command, self.version(inst.slug, v), foreign, legacy)

    @precondition(lambda self: self.model.instances)
    @rule(n=INST, choice=st.integers(0, 3), v=st.integers(0, 4))
    def drive(self, n: int, choice: int, v: int) -> None:
        """The adapter and the user taking a plausible next step (so that instances get
        deep into their lifecycle): the same commands and reports as the other rules. The
        adapter's reports are delivered twice (the second must change nothing); a Gone
        instance is sent the commands it must refuse."""
        inst = self.pick(n)
        status, version = inst.status, self.plausible_version(inst, ("stop", "upgrade", "restart",
                                                                     "rollback")[choice], v)
        fields = {"phase": ("pull", "up", "ready", "up")[choice]}
        if status in ("requested", "deploying", "starting", "restarting", "upgrading",
                      "rolling_back"):
            for again in ("", " again"):
                self.send_report(inst, "running" if choice else "deploying", fields,
                                 "drive" + again)
        elif status == "running":
            self.send_command(inst, ("stop", "upgrade", "restart", "rollback")[choice], version)
        elif status == "stopping":
            self.complete_stop(n)
        elif status == "stopped":
            self.send_command(inst, "start" if choice < 3 else "decommission", version)
        elif status == "failed":
            if choice == 3:
                self.send_report(inst, "running", {}, "drive")
            else:
                self.send_command(inst, ("rollback", "restart", "decommission")[choice], version)
        elif status in ("decommissioning", "deleting"):
            self.send_report(inst, ("decommissioned", "deleting", "deleted", "failed")[choice],
                             {}, "drive")
        elif choice == 0:
            self.send_report(inst, "deleted", {}, "drive")
        else:
            self.send_command(inst, ("stop", "start", "restart")[choice - 1], version)

    @precondition(lambda self: self.model.instances)
    @rule(n=INST, end=st.sampled_from(["decommissioned", "deleted"]),
          then=st.sampled_from(["stop", "start", "restart", "upgrade", "rollback",
                                "decommission"]), v=st.integers(0, 4))
    def retire(self, n: int, end: str, then: str, v: int) -> None:
        """Decommission, the adapter's teardown report (twice), then a command and a
        report the Gone instance must absorb."""
        inst = self.pick(n)
        self.send_command(inst, "decommission", "1", legacy=bool(v % 2))
        for again in ("", " again"):
            self.send_report(inst, end, {}, "retire" + again)
        self.send_command(inst, then, self.version(inst.slug, v))
        self.send_report(inst, "running", {}, "retire")

    # ``drive`` three times more often than any other rule (Hypothesis picks rules evenly)
    @precondition(lambda self: self.model.instances)
    @rule(n=INST, choice=st.integers(0, 3), v=st.integers(0, 4))
    def drive_on(self, n: int, choice: int, v: int) -> None:
        self.drive(n, choice, v)

    @precondition(lambda self: self.model.instances)
    @rule(n=INST, choice=st.integers(0, 3), v=st.integers(0, 4))
    def drive_further(self, n: int, choice: int, v: int) -> None:
        self.drive(n, choice, v)

    @precondition(lambda self: self.model.instances)
    @rule(n=INST, choice=st.integers(0, 3), v=st.integers(0, 4))
    def drive_deeper(self, n: int, choice: int, v: int) -> None:
        self.drive(n, choice, v)

    def send_command(self, inst: Any, command: str, version: str, foreign: bool = False,
                     legacy: bool = False) -> None:
        was = inst.status
        expected = "app_instance_not_found" if foreign else \
            self.model.command_outcome(inst, command, version)
        response, appended = self.send(
            lifecycle, app_instance_id=uuid.UUID(inst.id),
            project_id=self.project_for(inst, foreign), operation=command,
            app_version=version if command in ("upgrade", "rollback") else None,
            legacy_delete=legacy)
        self.expect(expected, response, appended, f"{command} from {was}")
        if expected == "noop":
            assert response["ok"]["task_id"] is None
        if expected == "ok":
            assert response["ok"]["task_id"] is not None
            placed = None
            if command == "start":
                members = self.real(inst.id).members
                placed = {m.id: (members[m.id]["holder_id"], members[m.id]["claim_node_id"])
                          for m in inst.members.values() if m.capacity and m.status != "deleted"}
            self.model.command(inst, command, self.clock, version, placed)
            assert response["ok"]["app_instance"]["status"] == inst.status

    @precondition(lambda self: self.model.instances)
    @rule(n=INST)
    def complete_stop(self, n: int) -> None:
        inst = self.pick(n)
        expected = "ok" if inst.status == "stopping" else "app_instance_state_invalid"
        response, appended = self.send(complete_stop, app_instance_id=uuid.UUID(inst.id))
        self.expect(expected, response, appended, f"complete stop from {inst.status}")
        if expected == "ok":
            self.model.command(inst, "complete_stop", self.clock)

    # ---- reports --------------------------------------------------------------------------
    def send_report(self, inst: Any, status: str, fields: dict[str, Any], what: str) -> None:
        was = inst.status
        expected = self.model.report(inst, status, fields, self.clock)
        response, appended = self.send(report_app_instance, app_instance_id=uuid.UUID(inst.id),
                                       project_id=uuid.UUID(inst.project),
                                       report={"status": status, **fields})
        self.expect(expected, response, appended, f"{what} {status} in {was}")
        self.sent.setdefault(inst.id, []).append((status, fields))

    @precondition(lambda self: self.model.instances)
    @rule(n=INST, status=REPORTS, fields=FIELDS, twice=st.booleans())
    def report(self, n: int, status: str, fields: dict[str, Any], twice: bool) -> None:
        """The adapter's report; ``twice``: delivered again at once (a no-op)."""
        inst = self.pick(n)
        self.send_report(inst, status, fields, "report")
        if twice:
            before = self.position()
            self.send_report(inst, status, fields, "report again")
            assert self.position() == before, "a report applied twice appended"

    @precondition(lambda self: self.sent)
    @rule(n=INST, k=st.integers(0, 30))
    def stale_report(self, n: int, k: int) -> None:
        """An old report delivered again, out of order."""
        inst = self.pick(n)
        old = self.sent.get(inst.id)
        if old:
            status, fields = old[k % len(old)]
            self.send_report(inst, status, fields, "stale report")

    @precondition(lambda self: self.model.instances)
    @rule(n=INST, k=st.integers(0, 7), status=MEMBER_STATUS,
          health=st.sampled_from([None, "ok", "bad"]))
    def member_report(self, n: int, k: int, status: str, health: str | None) -> None:
        inst = self.pick(n)
        members = list(inst.members)
        member = members[k % len(members)] if members and k < 7 else self.fresh()
        fields = {} if health is None else {"health_status": health}
        expected = self.model.member_report(inst, member, status, fields, self.clock)
        response, appended = self.send(report_member, app_instance_id=uuid.UUID(inst.id),
                                       project_id=uuid.UUID(inst.project),
                                       member_id=uuid.UUID(member),
                                       report={"status": status, **fields})
        self.expect(expected, response, appended, "member report")

    @precondition(lambda self: self.model.instances)
    @rule(project=st.integers(0, 1))
    def allocation_released(self, project: int) -> None:
        """A bound allocation's release reaches the app (the allocation itself stays)."""
        allocation = self.model.allocations[self.projects[project]]
        touched = self.model.allocation_released(allocation, self.clock)
        response, appended = self.send(mark_allocation_released,
                                       allocation_id=uuid.UUID(allocation))
        assert set(response["ok"]["app_instance_ids"]) == touched
        assert appended == bool(touched)

    # ---- member operations ----------------------------------------------------------------
    @precondition(lambda self: self.model.instances)
    @rule(n=INST, action=st.sampled_from(["add", "add", "drain", "remove", "replace"]),
          k=st.none() | st.integers(0, 7), count=st.sampled_from([None, None, 1, 2]),
          capacity=st.sampled_from([False, False, True]), keyed=st.booleans())
    def member_operation(self, n: int, action: str, k: int | None, count: int | None,
                         capacity: bool, keyed: bool) -> None:
        inst = self.pick(n)
        members = list(inst.members)
        target = None
        if action != "add" and k is not None:
            target = members[k % len(members)] if members and k < 7 else self.fresh()
        self.send_member_operation(inst, action, target, count, capacity, keyed)

    def send_member_operation(self, inst: Any, action: str, target: str | None,
                              count: int | None, capacity: bool, keyed: bool = False) -> str | None:
        """Answers the new operation's id (None when refused)."""
        expected = self.model.op_outcome(inst, action, "worker" if action == "add" else None,
                                         target, count, capacity)
        request = {"action": action, "component_key": "worker" if action == "add" else None,
                   "target_member_id": target, "requested_count": count,
                   "allocation_intent": {"sku": "bm"} if capacity else None}
        response, appended = self.send(create_member_operation, keyed,
                                       app_instance_id=uuid.UUID(inst.id),
                                       project_id=uuid.UUID(inst.project), request=request)
        self.expect(expected, response, appended, f"member {action} in {inst.status}")
        if expected == "ok":
            op = response["ok"]
            materialized = self.real(inst.id).member_ops[op["id"]]["materialized"]
            placed = self.placed(inst.id, materialized) if capacity and action == "add" else []
            self.model.op_created(inst, op["id"], action, request["component_key"], target,
                                  count, placed, self.clock)
            return op["id"]
        return None

    @precondition(lambda self: self.model.instances)
    @rule(n=INST, count=st.sampled_from([None, 1, 2]), capacity=st.booleans(),
          news=st.integers(1, 3), last=OP_REPORT, member_status=st.none() | MEMBER_STATUS)
    def scale(self, n: int, count: int | None, capacity: bool, news: int, last: str,
              member_status: str | None) -> None:
        """An ``add`` and the adapter's reports on it: ``news`` reports each naming a
        new member (often more of them than the operation asked for), then a last one."""
        inst = self.pick(n)
        op_id = self.send_member_operation(inst, "add", None, count, capacity)
        if op_id is not None:
            for _ in range(news):
                self.send_operation_report(inst, inst.ops[op_id], "in_progress", "new",
                                           member_status, None, False)
            self.send_operation_report(inst, inst.ops[op_id], last, "mat0", member_status,
                                       None, True)

    @precondition(lambda self: any(i.ops for i in self.model.instances.values()))
    @rule(n=INST, j=st.integers(0, 7), status=OP_REPORT,
          named=st.sampled_from(["none", "target", "mat0", "mat1", "new", "new", "new", "other"]),
          member_status=st.none() | MEMBER_STATUS, error=st.sampled_from([None, None, "E1"]),
          twice=st.booleans())
    def member_operation_report(self, n: int, j: int, status: str, named: str,
                                member_status: str | None, error: str | None,
                                twice: bool) -> None:
        with_ops = [i for i in self.model.instances.values() if i.ops]
        inst = with_ops[n % len(with_ops)]
        ops = list(inst.ops.values())
        open_ops = [o for o in ops if o.status in ("accepted", "in_progress")]
        pool = open_ops if open_ops and j < 6 else ops  # mostly an open one
        self.send_operation_report(inst, pool[j % len(pool)], status, named, member_status,
                                   error, twice)

    def send_operation_report(self, inst: Any, op: Any, status: str, named: str,
                              member_status: str | None, error: str | None,
                              twice: bool) -> None:
        member = {"none": None, "target": op.target,
                  "mat0": op.materialized[0] if op.materialized else None,
                  "mat1": op.materialized[1] if len(op.materialized) > 1 else None,
                  "new": self.fresh(),
                  "other": next((m for m in inst.members if m != op.target
                                 and m not in op.materialized), None)}[named]
        report = {"status": status}
        if member:
            report["target_member_id"] = member
        if member_status:
            report["member_status"] = member_status
        if error:
            report["last_error_code"] = error
        for attempt in range(2 if twice else 1):
            was = op.status
            new = member is not None and member not in inst.members
            expected = self.model.op_report(inst, op.id, status, member, member_status, error,
                                            self.clock, {"id": member} if new else None)
            response, appended = self.send(report_member_operation,
                                           app_instance_id=uuid.UUID(inst.id),
                                           project_id=uuid.UUID(inst.project),
                                           operation_id=uuid.UUID(op.id), report=report)
            self.expect(expected, response, appended,
                        f"{op.action} report {status} on {was}" + (" again" if attempt else ""))
            if attempt:
                assert not appended, "an operation report applied twice appended"

    # ---- repairs --------------------------------------------------------------------------
    @precondition(lambda self: self.model.instances)
    @rule(n=INST, action=st.sampled_from(["reconcile", "repair"]),
          scope=st.sampled_from(["whole_runtime", "control_plane", "member"]),
          k=st.none() | st.integers(0, 7), dry_run=st.booleans())
    def repair(self, n: int, action: str, scope: str, k: int | None, dry_run: bool) -> None:
        inst = self.pick(n)
        members = list(inst.members)
        target = None if k is None else members[k % len(members)] if members and k < 7 \
            else self.fresh()
        expected = self.model.repair_outcome(inst, scope, target)
        response, appended = self.send(
            create_repair_operation, app_instance_id=uuid.UUID(inst.id),
            project_id=uuid.UUID(inst.project),
            request={"action": action, "scope": scope, "target_member_id": target,
                     "dry_run": dry_run})
        self.expect(expected, response, appended, f"repair in {inst.status}")
        if expected == "ok":
            self.model.repair_created(inst, response["ok"]["id"], action, dry_run)

    @precondition(lambda self: any(i.repairs for i in self.model.instances.values()))
    @rule(n=INST, j=st.integers(0, 7),
          status=st.sampled_from(["in_progress", "in_progress", "succeeded", "failed",
                                  "cancelled", "accepted"]),
          steps=st.none() | st.lists(st.sampled_from(["pending", "running", "succeeded",
                                                      "failed", "skipped"]),
                                     min_size=3, max_size=3),
          health=st.sampled_from([None, None, "ok", "bad"]))
    def repair_report(self, n: int, j: int, status: str, steps: list[str] | None,
                      health: str | None) -> None:
        with_repairs = [i for i in self.model.instances.values() if i.repairs]
        inst = with_repairs[n % len(with_repairs)]
        repair = list(inst.repairs.values())[j % len(inst.repairs)]
        report: dict[str, Any] = {"status": status}
        if steps is not None:
            steps = steps[:len(repair.names)]
            report["steps"] = [{"name": name, "status": s, "started_at": None,
                                "completed_at": None, "summary": summary}
                               for name, s, summary in zip(repair.names, steps, repair.summaries)]
        if health:
            report["health_status"] = health
        was = repair.status
        expected = self.model.repair_report(inst, repair.id, status, steps, health, self.clock)
        response, appended = self.send(report_repair_operation,
                                       app_instance_id=uuid.UUID(inst.id),
                                       project_id=uuid.UUID(inst.project),
                                       repair_operation_id=uuid.UUID(repair.id), report=report)
        self.expect(expected, response, appended, f"repair report {status} on {was}")

    # ---- idempotency ----------------------------------------------------------------------
    @precondition(lambda self: self.keyed)
    @rule(k=st.integers(0, 15), tamper=st.sampled_from([False] * 3 + [True]))
    def replay(self, k: int, tamper: bool) -> None:
        """The same key and body: the stored answer (same ids), nothing appended. The
        same key with another body: refused, nothing appended."""
        factory, kwargs, claim, response = self.keyed[k % len(self.keyed)]
        if tamper:
            claim = IdempotencyClaim(scope=claim.scope, fingerprint=claim.fingerprint + "!")
        before = self.position()
        try:
            outcome = self.app.execute(factory(self.ctx(claim), render=render, **kwargs))
        except IdempotencyKeyReused:
            assert tamper, "a same-body replay was refused"
        else:
            assert not tamper, "a key reused with another body was executed"
            assert outcome.replayed and outcome.response == response
        assert self.position() == before, "a replay appended"

    # ---- invariants -----------------------------------------------------------------------
    @invariant()
    def matches_the_model(self) -> None:
        live = observe(self.app, self.model, self.mirror)
        check_invariants(self.model, live)
        for inst_id, got in live["instances"].items():
            updated = got["json"]["updated_at"]
            assert updated >= self.updated.get(inst_id, updated), f"{inst_id}: updated_at went back"
            self.updated[inst_id] = updated
            for key, meter in got["meters"].items():
                name = f"{inst_id}:{key}"
                assert meter["cost"] >= self.costs.get(name, 0), f"{name}: accrued cost decreased"
                self.costs[name] = meter["cost"]
            if got["json"]["status"] in GONE:
                assert not [m for m in got["state"].members.values() if m["status"] != "deleted"]


TestAppInstanceMachine = AppInstanceMachine.TestCase
TestAppInstanceMachine.settings = settings(max_examples=500, stateful_step_count=40,
                                           deadline=None)


# ---- planted bugs: the machine must catch each -------------------------------------------
def _start_from_running(monkeypatch: pytest.MonkeyPatch) -> None:
    """``start`` accepted from ``running`` too (not a §3.1 edge)."""
    monkeypatch.setitem(app_instances.COMMAND_EDGES, "start", (("stopped", "running"), "starting"))


def _gone_takes_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decommissioned instance may be stopped again."""
    monkeypatch.setitem(app_instances.COMMAND_EDGES, "stop",
                        (("running", "failed", "decommissioned"), "stopping"))


def _rollback_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rollback to any active version, deployed or not."""
    original = app_instances._version_change

    def version_change(session: Any, instance: Any, operation: str, target: str,
                       project_role: Any) -> dict[str, Any]:
        return original(session, instance, "upgrade" if operation == "rollback" else operation,
                        target, project_role)

    monkeypatch.setattr(app_instances, "_version_change", version_change)


def _reports_not_deduplicated(monkeypatch: pytest.MonkeyPatch) -> None:
    """A report of the current status always records an observation."""
    original = app_instances._runtime_changes

    def changes(current: dict[str, Any], report: dict[str, Any], fields: Any = None) -> dict[str, Any]:
        found = original(current, report, fields or app_instances.RUNTIME_FIELDS)
        return found or {k: report[k] for k in app_instances.RUNTIME_FIELDS if k in report}

    monkeypatch.setattr(app_instances, "_runtime_changes", changes)


def _members_beyond_the_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """An add materializes one member more than it asked for."""
    original = app_instances.member_limit
    monkeypatch.setattr(app_instances, "member_limit", lambda op: original(op) + 1)


def _claims_left_active(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stopped or Gone instance keeps its capacity (claims ``releasing`` forever)."""
    original = app_instances.claim_target

    def target(instance: Any, member: Any) -> str:
        wanted = original(instance, member)
        held = instance.status == "stopped" or instance.status in app_instances.GONE
        return "releasing" if wanted == "released" and held else wanted

    monkeypatch.setattr(app_instances, "claim_target", target)


def _meter_never_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stopped or Gone instance's meters keep running."""
    monkeypatch.setattr(app_instances, "stop_meter", lambda session, ctx, **kwargs: ([], None))


def _no_balance_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Creates admitted without a positive balance."""
    monkeypatch.setattr(app_instances, "financial_gate", lambda session, **kwargs: None)


@pytest.mark.parametrize("plant", [_start_from_running, _gone_takes_commands, _rollback_anywhere,
                                   _reports_not_deduplicated, _members_beyond_the_count,
                                   _claims_left_active, _meter_never_stops, _no_balance_gate])
def test_planted_bugs_are_caught(monkeypatch: pytest.MonkeyPatch, plant: Any) -> None:
    plant(monkeypatch)
    with pytest.raises(AssertionError):
        run_state_machine_as_test(AppInstanceMachine, settings=settings(
            max_examples=500, stateful_step_count=40, deadline=None, database=None,
            phases=(Phase.generate,), suppress_health_check=list(HealthCheck),
            report_multiple_bugs=False))
