"""App instances on the library's in-memory store: the catalog and entitlements, create
(gates, placement, capacity), the lifecycle with its reports, members and member and
repair operations, and what follows the state in the same save (claims, meters,
bindings, quota)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import UUID, uuid4

import pytest

from domain.admission import submit_launch
from domain.app import Ledgercore
from domain.app_instances import (AppInstance, app_use_id_for, complete_stop,
                                  create_app_instance, create_member_operation,
                                  create_repair_operation, lifecycle, mark_allocation_released,
                                  quota_id_for, report_app_instance, report_member,
                                  report_member_operation, report_repair_operation,
                                  v3_operation_json)
from domain.apps import (deprecate_version, publish_version, register_app, register_version,
                         upsert_entitlement)
from domain.billing import account_id_for, adjust_balance
from domain.errors import DomainError
from domain.leases import dispatch_node_tasks, report_node_task
from domain.money import Money
from domain.nodes import register_node
from domain.provenance import CommandContext, IdempotencyClaim
from domain.skus import create_sku, set_sku_active
from domain.usage import UsageRecord, rate_open_usage, usage_id_for_app

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=timezone.utc)
PRICE = 3_600  # minor units per node-hour: one per second
PLATFORM_PRICE = 360  # minor units per instance-hour
FUNDS = 1_000_000


def render(result: Any) -> dict[str, Any]:
    if isinstance(result, DomainError):
        return {"error": result.code, "kind": result.kind, **result.details}
    return {"ok": result}


def ctx(at: datetime, key: str | None = None) -> CommandContext:
    claim = IdempotencyClaim(scope=key, fingerprint="f") if key else None
    return CommandContext(actor_id=str(uuid4()), source="api", actor_role="member", now=at,
                          idempotency=claim)


def code(response: dict[str, Any]) -> str:
    if "ok" in response:
        return "ok"
    reason = response.get("reason")
    return f"{response['error']}/{reason}" if reason else response["error"]


class World:
    """Two baremetal nodes of SKU ``bm`` (a third for allocations), the catalog:

    - ``notebook`` (bare_metal): 1.0 and 1.1 published, 2.0 registered only; each
      version claims one ``bm`` node for its ``runtime`` component;
    - ``serve`` (k8s, platform_managed): priced per instance-hour, no capacity;
    - ``cluster`` (rke2, tenant_dedicated): placed on an existing allocation.
    """

    def __init__(self) -> None:
        self.app = Ledgercore(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
        self.clock = T0
        spec = {"vendor": "nv", "display_name": "n", "resource_class": "gpu_baremetal",
                "billing_unit": "node_hour", "scheduling_unit": "node",
                "resources": {"allowed_accelerator_counts": [8], "accelerator_count": 8},
                "unit_price": {"amount_minor": PRICE, "currency": "USD"}}
        self.ok(create_sku(self.ctx(), sku="bm", spec=spec, render=render))
        self.ok(set_sku_active(self.ctx(), sku="bm", active=True, render=render))
        self.nodes = []
        for index in range(3):
            node = uuid4()
            self.ok(register_node(self.ctx(), node_id=node, online=True, render=lambda r: {
                "ok": True}, identity={"host": f"h{index}", "hostname": f"node-{index}",
                                      "port": 22, "ssh_username": "u", "sku": "bm",
                                      "gpus_total": 8, "region_code": "r",
                                      "onboarding_mode": "manual"}))
            self.nodes.append(node)
        self.user, self.project = uuid4(), uuid4()
        self.ok(adjust_balance(self.ctx(), user_id=self.user, direction="credit",
                               amount=Money(FUNDS, "USD"), reason="test", render=render))
        runtime = {"components": [{"component_key": "runtime", "member_role": "runtime",
                                   "sku": "bm"}]}
        self.ok(register_app(self.ctx(), slug="notebook", display_name="Notebook",
                             category="other", publisher="core42", render=render))
        for version in ("1.0", "1.1", "2.0"):
            self.ok(register_version(self.ctx(), slug="notebook", version=version,
                                     runtime_backend="bare_metal", manifest=runtime,
                                     render=render))
        for version in ("1.0", "1.1"):
            self.ok(publish_version(self.ctx(), slug="notebook", version=version, render=render))
        self.ok(register_app(self.ctx(), slug="serve", display_name="Serve",
                             category="inference", publisher="core42", render=render))
        self.ok(register_version(self.ctx(), slug="serve", version="1", runtime_backend="k8s",
                                 manifest={"operating_modes": ["platform_managed"], "pricing": [
                                     {"component": "control_plane", "usage_unit": "instance_hour",
                                      "unit_price": {"amount_minor": PLATFORM_PRICE,
                                                     "currency": "USD"}}]}, render=render))
        self.ok(publish_version(self.ctx(), slug="serve", version="1", render=render))
        self.ok(register_app(self.ctx(), slug="cluster", display_name="Cluster",
                             category="orchestration", publisher="core42", render=render))
        self.ok(register_version(self.ctx(), slug="cluster", version="1", runtime_backend="rke2",
                                 manifest={}, render=render))
        self.ok(publish_version(self.ctx(), slug="cluster", version="1", render=render))
        for slug in ("notebook", "serve", "cluster"):
            self.entitle(slug)

    # ---- plumbing -----------------------------------------------------------------------
    def ctx(self, key: str | None = None) -> CommandContext:
        return ctx(self.clock, key)

    def run(self, command: Any) -> dict[str, Any]:
        return self.app.execute(command).response

    def ok(self, command: Any) -> Any:
        response = self.run(command)
        assert "ok" in response, response
        return response["ok"]

    def later(self, seconds: int) -> None:
        self.clock += timedelta(seconds=seconds)

    def position(self) -> int:
        return self.app.recorder.max_notification_id() or 0

    def entitle(self, slug: str, enabled: bool = True, **overrides: Any) -> dict[str, Any]:
        return self.run(upsert_entitlement(self.ctx(), project_id=self.project, slug=slug,
                                           enabled=enabled, policy_overrides=overrides,
                                           render=render))

    def create(self, slug: str = "notebook", key: str | None = None, **request: Any) -> dict[str, Any]:
        body = {"app_slug": slug, "app_version": "1.0" if slug == "notebook" else "1",
                "display_name": "mine", **request}
        return self.run(create_app_instance(self.ctx(key), project_id=self.project,
                                            user_id=self.user, tenant_id=None, request=body,
                                            render=render))

    def command(self, instance: str, operation: str, **kwargs: Any) -> dict[str, Any]:
        return self.run(lifecycle(self.ctx(), app_instance_id=UUID(instance),
                                  project_id=self.project, operation=operation, render=render,
                                  **kwargs))

    def report(self, instance: str, status: str, **fields: Any) -> dict[str, Any]:
        return self.run(report_app_instance(self.ctx(), app_instance_id=UUID(instance),
                                            project_id=self.project,
                                            report={"status": status, **fields}, render=render))

    def instance(self, instance: str) -> AppInstance:
        return self.app.repository.get(UUID(instance))

    def claims(self, holder: str) -> list[str]:
        return [c["status"] for n in self.nodes
                for c in self.app.repository.get(n).claims_of(holder)]

    def record(self, instance: str, component: str, cycle: int = 0) -> UsageRecord | None:
        return self.app.get_or_none(usage_id_for_app(UUID(instance), component, cycle))

    def balance(self) -> int:
        return self.app.repository.get(account_id_for(self.user)).balance("USD")


@pytest.fixture
def world() -> World:
    return World()


def test_a_notebook_runs_an_hour_is_billed_an_hour_and_frees_its_node(world: World) -> None:
    created = world.create()
    assert code(created) == "ok"
    body = created["ok"]
    instance = body["app_instance"]["id"]
    assert body["app_instance"]["status"] == "requested"
    assert body["workload_id"] == instance and body["task_id"]
    [member] = body["members"]
    assert member["component_key"] == "runtime" and member["status"] == "requested"
    assert member["bound_node_id"] in {str(n) for n in world.nodes}
    assert member["bound_node_resource_name"].startswith("node-")
    assert world.claims(member["id"]) == ["reserved"]
    assert world.app.repository.get(quota_id_for(world.project)).live == {instance: "notebook"}

    assert code(world.report(instance, "deploying", phase="pulling")) == "ok"
    assert world.claims(member["id"]) == ["provisioning"]
    assert world.record(instance, f"member:{member['id']}") is None  # not running: not billed
    assert world.report(instance, "running")["ok"]["status"] == "running"
    assert world.claims(member["id"]) == ["active"]
    world.later(3600)
    world.ok(rate_open_usage(world.ctx(), until=world.clock, render=render))
    assert world.balance() == FUNDS - PRICE
    moved = world.command(instance, "decommission")["ok"]
    assert moved["app_instance"]["status"] == "decommissioning" and moved["task_id"]
    assert world.claims(member["id"]) == ["releasing"]
    world.later(60)
    assert world.report(instance, "decommissioned")["ok"]["status"] == "decommissioned"
    assert world.claims(member["id"]) == ["released"]
    record = world.record(instance, f"member:{member['id']}")
    assert record.end_time == world.clock and record.cost_minor == PRICE + 60
    assert world.balance() == FUNDS - PRICE - 60
    assert world.app.repository.get(quota_id_for(world.project)).live == {}
    assert world.instance(instance).members[member["id"]]["status"] == "deleted"


def test_a_report_applied_twice_changes_nothing(world: World) -> None:
    instance = world.create()["ok"]["app_instance"]["id"]
    for status, fields in (("deploying", {"phase": "pull", "progress": {"pct": 10}}),
                           ("deploying", {"phase": "pull", "progress": {"pct": 50}}),
                           ("running", {"health_status": "healthy"}),
                           ("failed", {"failure_reason": "oom"})):
        first = world.report(instance, status, **fields)
        before = world.position()
        again = world.report(instance, status, **fields)
        assert again == first and world.position() == before
    # a late deploying after running is out of order: refused, nothing changes
    world.report(instance, "running")
    before = world.position()
    late = world.report(instance, "deploying")
    assert code(late) == "app_instance_state_invalid" and late["current_status"] == "running"
    assert late["reported_status"] == "deploying" and world.position() == before


def test_stop_and_start_release_and_claim_capacity_again_with_new_meters(world: World) -> None:
    instance = world.create()["ok"]["app_instance"]["id"]
    member = next(iter(world.instance(instance).members))
    world.report(instance, "running")
    stopped = world.command(instance, "stop")["ok"]
    assert stopped["app_instance"]["status"] == "stopping"
    assert code(world.report(instance, "running")) == "app_instance_state_invalid"
    world.later(600)
    world.ok(complete_stop(world.ctx(), app_instance_id=UUID(instance), render=render))
    assert world.instance(instance).status == "stopped"
    assert world.claims(member) == ["released"]
    assert world.record(instance, f"member:{member}").cost_minor == 600
    started = world.command(instance, "start")["ok"]
    assert started["app_instance"]["status"] == "starting"
    placed = world.instance(instance).members[member]
    assert placed["holder_id"] != member and world.claims(placed["holder_id"]) == ["reserved"]
    world.later(10)
    world.report(instance, "running")
    assert world.record(instance, f"member:{member}", 1).end_time is None
    assert world.claims(placed["holder_id"]) == ["active"]


def test_start_is_refused_when_the_capacity_is_gone(world: World) -> None:
    first = world.create()["ok"]["app_instance"]["id"]
    world.report(first, "running")
    world.command(first, "stop")
    world.ok(complete_stop(world.ctx(), app_instance_id=UUID(first), render=render))
    others = [world.create()["ok"]["app_instance"]["id"] for _ in range(3)]
    assert [code(world.create())] == ["sku_unavailable"]
    assert len(others) == 3
    before = world.position()
    assert code(world.command(first, "start")) == "sku_unavailable"
    assert world.position() == before and world.instance(first).status == "stopped"


def test_upgrade_and_rollback_only_to_a_deployed_version(world: World) -> None:
    instance = world.create()["ok"]["app_instance"]["id"]
    assert code(world.command(instance, "upgrade", app_version="1.1")) == \
        "app_instance_state_invalid"  # requested: not running
    world.report(instance, "running")
    assert code(world.command(instance, "rollback", app_version="1.1")) == \
        "invalid_request/version_not_previously_deployed"
    assert code(world.command(instance, "upgrade", app_version="9")) == "app_version_not_found"
    assert code(world.command(instance, "upgrade", app_version="2.0")) == \
        "invalid_request/app_version_not_active"
    assert code(world.command(instance, "upgrade", app_version="1.0")) == \
        "invalid_request/app_version_unchanged"
    upgraded = world.command(instance, "upgrade", app_version="1.1")["ok"]["app_instance"]
    assert (upgraded["status"], upgraded["app_version"]) == ("upgrading", "1.1")
    world.report(instance, "failed", failure_reason="crash")
    assert world.instance(instance).failed_during == "upgrade"
    rolled = world.command(instance, "rollback", app_version="1.0")["ok"]["app_instance"]
    assert (rolled["status"], rolled["app_version"]) == ("rolling_back", "1.0")
    assert rolled["failure_reason"] is None
    world.report(instance, "running")
    assert world.instance(instance).deployed_versions == ["1.0"]
    world.command(instance, "upgrade", app_version="1.1")
    world.report(instance, "running")
    assert world.instance(instance).deployed_versions == ["1.0", "1.1"]
    world.ok(deprecate_version(world.ctx(), slug="notebook", version="1.0", render=render))
    assert world.command(instance, "rollback", app_version="1.0")["ok"]["app_instance"][
        "app_version"] == "1.0"  # a deprecated version that ran may be rolled back to


def test_entitlement_gates_create_upgrade_and_rollback_but_not_running_instances(world: World) -> None:
    instance = world.create()["ok"]["app_instance"]["id"]
    world.report(instance, "running")
    world.entitle("notebook", enabled=False)
    before = world.position()
    refused = world.create()
    assert (code(refused), refused["kind"]) == ("app_not_entitled/entitlement_disabled", "forbidden")
    assert code(world.command(instance, "upgrade", app_version="1.1")) == \
        "app_not_entitled/entitlement_disabled"
    assert world.position() == before and world.instance(instance).status == "running"
    assert code(world.command(instance, "restart")) == "ok"  # not an entitlement-gated command
    world.entitle("notebook", allowed_versions=["1.0"], max_instances=1)
    assert code(world.command(instance, "upgrade", app_version="1.1")) == "app_instance_state_invalid"
    world.report(instance, "running")
    assert code(world.command(instance, "upgrade", app_version="1.1")) == \
        "app_not_entitled/version_not_allowed"
    assert code(world.create()) == "app_instance_quota_exceeded"
    other = uuid4()
    missing = world.run(create_app_instance(world.ctx(), project_id=other, user_id=world.user,
                                            tenant_id=None, render=render, request={
                                                "app_slug": "notebook", "app_version": "1.0",
                                                "display_name": "x"}))
    assert code(missing) == "app_not_entitled/entitlement_missing"


def test_the_financial_gate_applies_to_create_start_upgrade_and_add(world: World) -> None:
    instance = world.create()["ok"]["app_instance"]["id"]
    world.report(instance, "running")
    world.ok(adjust_balance(world.ctx(), user_id=world.user, direction="debit",
                            amount=Money(FUNDS, "USD"), reason="drain", render=render))
    assert code(world.create()) == "insufficient_balance/balance_not_positive"
    assert code(world.command(instance, "upgrade", app_version="1.1")) == \
        "insufficient_balance/balance_not_positive"
    assert code(world.run(create_member_operation(
        world.ctx(), app_instance_id=UUID(instance), project_id=world.project,
        request={"action": "add", "component_key": "worker"}, render=render))) == \
        "insufficient_balance/balance_not_positive"
    assert code(world.command(instance, "stop")) == "ok"  # never blocked
    world.ok(complete_stop(world.ctx(), app_instance_id=UUID(instance), render=render))
    assert code(world.command(instance, "start")) == "insufficient_balance/balance_not_positive"
    assert code(world.command(instance, "decommission")) == "ok"


def test_gone_absorbs_and_decommission_again_is_a_no_op(world: World) -> None:
    instance = world.create()["ok"]["app_instance"]["id"]
    first = world.command(instance, "decommission")["ok"]
    before = world.position()
    again = world.command(instance, "decommission")["ok"]
    assert again["task_id"] is None and world.position() == before
    assert v3_operation_json(again)["task_href"] is None
    assert v3_operation_json(first)["task_href"] == f"/api/v1/tasks/{first['task_id']}"
    world.report(instance, "deleting")
    world.report(instance, "decommissioned")
    before = world.position()
    for operation in ("stop", "start", "restart"):
        assert code(world.command(instance, operation)) == "app_instance_state_invalid"
    assert code(world.command(instance, "upgrade", app_version="1.1")) == "app_instance_state_invalid"
    assert code(world.report(instance, "running")) == "app_instance_state_invalid"
    assert code(world.report(instance, "decommissioned", phase="x")) == "app_instance_state_invalid"
    assert code(world.report(instance, "decommissioned")) == "ok"
    assert code(world.command(instance, "decommission")) == "ok"
    assert world.position() == before
    assert world.report(instance, "deleted")["ok"]["status"] == "deleted"


def test_a_failed_decommission_is_retried_and_nothing_else(world: World) -> None:
    instance = world.create()["ok"]["app_instance"]["id"]
    world.report(instance, "running")
    member = next(iter(world.instance(instance).members))
    world.command(instance, "decommission")
    world.report(instance, "failed", failure_reason="stuck")
    assert world.instance(instance).failed_during == "decommission"
    assert world.claims(member) == ["releasing"]
    refused = world.command(instance, "stop")
    assert code(refused) == "app_instance_state_invalid/decommission_failed"
    assert code(world.report(instance, "running")) == "app_instance_state_invalid"
    assert world.command(instance, "decommission")["ok"]["app_instance"]["status"] == "decommissioning"
    world.report(instance, "failed")
    assert world.report(instance, "deleted")["ok"]["status"] == "deleted"
    assert world.claims(member) == ["released"]


def test_platform_managed_instances_are_metered_at_the_manifest_price(world: World) -> None:
    created = world.create("serve", operating_mode="tenant_dedicated")["ok"]
    instance = created["app_instance"]
    assert (instance["operating_mode"], instance["control_plane_scope"],
            instance["tenant_boundary_mode"]) == ("platform_managed", "platform", "shared_service")
    assert created["members"] == []
    world.report(instance["id"], "running")
    world.later(1800)
    world.command(instance["id"], "stop")
    world.ok(complete_stop(world.ctx(), app_instance_id=UUID(instance["id"]), render=render))
    record = world.record(instance["id"], "control_plane")
    assert record.meter["control_plane_component"] and record.meter["usage_source"] == "app_runtime"
    assert record.cost_minor == PLATFORM_PRICE // 2 and record.end_time == world.clock


def test_member_operations_and_their_reports(world: World) -> None:
    instance = world.create("serve")["ok"]["app_instance"]["id"]

    def op(**request: Any) -> dict[str, Any]:
        return world.run(create_member_operation(world.ctx(), app_instance_id=UUID(instance),
                                                 project_id=world.project, request=request,
                                                 render=render))

    def op_report(operation: str, **report: Any) -> dict[str, Any]:
        return world.run(report_member_operation(world.ctx(), app_instance_id=UUID(instance),
                                                 project_id=world.project,
                                                 operation_id=UUID(operation), report=report,
                                                 render=render))

    assert code(op(action="add")) == "invalid_request/component_key_required"
    assert code(op(action="drain")) == "invalid_request/target_member_id_required"
    assert code(op(action="drain", target_member_id=str(uuid4()), requested_count=2)) == \
        "invalid_request/requested_count_invalid"
    assert code(op(action="drain", target_member_id=str(uuid4()))) == "app_instance_not_found"
    add = op(action="add", component_key="worker", requested_count=2)["ok"]
    assert add["status"] == "accepted" and add["target_member_id"] is None
    a, b, c = (str(uuid4()) for _ in range(3))
    assert op_report(add["id"], status="in_progress", target_member_id=a,
                     member_status="reconciling")["ok"]["target_member_id"] == a
    before = world.position()
    assert code(op_report(add["id"], status="in_progress", target_member_id=a,
                          member_status="reconciling")) == "ok"
    assert world.position() == before  # the same report again: nothing
    op_report(add["id"], status="in_progress", target_member_id=b)
    assert code(op_report(add["id"], status="in_progress", target_member_id=c)) == \
        "invalid_request/member_count_exceeded"
    done = op_report(add["id"], status="succeeded", target_member_id=a, member_status="ready")["ok"]
    assert done["completed_at"] and done["started_at"] <= done["completed_at"]
    assert code(op_report(add["id"], status="failed")) == "app_instance_state_invalid"
    assert code(op_report(add["id"], status="succeeded")) == "ok"
    members = world.instance(instance).members
    assert {m: members[m]["status"] for m in members} == {a: "ready", b: "requested"}
    drain = op(action="drain", target_member_id=a)["ok"]
    assert code(op(action="remove", target_member_id=a)) == \
        "app_instance_state_invalid/member_operation_in_progress"
    assert code(op_report(drain["id"], status="in_progress", target_member_id=b)) == \
        "invalid_request/target_mismatch"
    assert code(op_report(drain["id"], status="succeeded", member_status="deleted")) == \
        "invalid_request/member_transition_invalid"
    op_report(drain["id"], status="succeeded", member_status="draining")
    assert world.instance(instance).members[a]["status"] == "draining"
    # a member report cannot create a member and has no 409
    unknown = world.run(report_member(world.ctx(), app_instance_id=UUID(instance),
                                      project_id=world.project, member_id=uuid4(),
                                      report={"status": "ready"}, render=render))
    assert code(unknown) == "app_instance_not_found" and unknown["resource"] == "member"
    illegal = world.run(report_member(world.ctx(), app_instance_id=UUID(instance),
                                      project_id=world.project, member_id=UUID(b),
                                      report={"status": "deleted"}, render=render))
    assert (code(illegal), illegal["kind"]) == ("invalid_request/member_transition_invalid", "invalid")
    # decommission cancels what is open
    replace = op(action="replace", target_member_id=b)["ok"]
    world.command(instance, "decommission")
    cancelled = world.instance(instance).member_ops[replace["id"]]
    assert cancelled["status"] == "cancelled"
    assert cancelled["last_error_code"] == "superseded_by_decommission"
    assert code(op(action="add", component_key="worker")) == "app_instance_state_invalid"


def test_an_add_with_a_sku_claims_capacity_and_is_metered_while_running(world: World) -> None:
    instance = world.create("serve")["ok"]["app_instance"]["id"]
    world.report(instance, "running")
    added = world.ok(create_member_operation(
        world.ctx(), app_instance_id=UUID(instance), project_id=world.project,
        request={"action": "add", "component_key": "gpu", "requested_count": 2,
                 "allocation_intent": {"sku": "bm"}}, render=render))
    members = [m for m in world.instance(instance).members.values() if m["component_key"] == "gpu"]
    assert len(members) == 2 and added["target_member_id"] == members[0]["id"]
    assert [world.claims(m["id"]) for m in members] == [["active"], ["active"]]
    too_many = world.run(create_member_operation(
        world.ctx(), app_instance_id=UUID(instance), project_id=world.project,
        request={"action": "add", "component_key": "gpu", "requested_count": 2,
                 "allocation_intent": {"sku": "bm"}}, render=render))
    assert code(too_many) == "sku_unavailable"
    world.later(100)
    world.run(report_member(world.ctx(), app_instance_id=UUID(instance), project_id=world.project,
                            member_id=UUID(members[0]["id"]), report={"status": "failed"},
                            render=render))
    world.run(report_member(world.ctx(), app_instance_id=UUID(instance), project_id=world.project,
                            member_id=UUID(members[0]["id"]), report={"status": "deleted"},
                            render=render))
    assert world.claims(members[0]["id"]) == ["released"]
    assert world.record(instance, f"member:{members[0]['id']}").cost_minor == 100
    assert world.record(instance, f"member:{members[1]['id']}").end_time is None


def test_repairs_single_flight_dry_runs_and_steps(world: World) -> None:
    instance = world.create()["ok"]["app_instance"]["id"]

    def repair(**request: Any) -> dict[str, Any]:
        return world.run(create_repair_operation(world.ctx(), app_instance_id=UUID(instance),
                                                 project_id=world.project, request=request,
                                                 render=render))

    def repair_report(operation: str, **report: Any) -> dict[str, Any]:
        return world.run(report_repair_operation(world.ctx(), app_instance_id=UUID(instance),
                                                 project_id=world.project,
                                                 repair_operation_id=UUID(operation),
                                                 report=report, render=render))

    assert code(repair(action="repair", scope="whole_runtime")) == "app_instance_state_invalid"
    world.report(instance, "running")
    assert code(repair(action="repair", scope="member")) == "invalid_request/target_member_id_required"
    dry = repair(action="repair", scope="whole_runtime", dry_run=True)["ok"]
    assert dry["status"] == "succeeded" and {s["status"] for s in dry["steps"]} == {"skipped"}
    real = repair(action="reconcile", scope="whole_runtime")["ok"]
    assert [s["name"] for s in real["steps"]] == ["diagnose", "reconcile"]
    assert code(repair(action="repair", scope="whole_runtime")) == \
        "app_instance_state_invalid/repair_operation_in_progress"
    steps = [{"name": "diagnose", "status": "succeeded", "started_at": None,
              "completed_at": None, "summary": "ok"},
             {"name": "reconcile", "status": "running", "started_at": None,
              "completed_at": None, "summary": None}]
    assert repair_report(real["id"], status="in_progress", steps=steps,
                         health_status="degraded")["ok"]["steps"] == steps
    assert world.instance(instance).runtime["health_status"] == "degraded"
    regressed = [dict(steps[0], status="running"), steps[1]]
    assert code(repair_report(real["id"], status="in_progress", steps=regressed)) == \
        "invalid_request/repair_step_regressed"
    assert code(repair_report(real["id"], status="in_progress", steps=steps[1:])) == \
        "invalid_request/repair_step_missing"
    repair_report(real["id"], status="succeeded")
    before = world.position()
    assert code(repair_report(real["id"], status="succeeded")) == "ok"
    assert world.position() == before
    assert code(repair_report(real["id"], status="failed")) == "app_instance_state_invalid"


def test_restart_is_refused_on_a_multi_member_k8s_runtime(world: World) -> None:
    instance = world.create("serve")["ok"]["app_instance"]["id"]
    world.report(instance, "running")
    for _ in range(2):
        operation = world.ok(create_member_operation(
            world.ctx(), app_instance_id=UUID(instance), project_id=world.project,
            request={"action": "add", "component_key": "w"}, render=render))
        world.ok(report_member_operation(world.ctx(), app_instance_id=UUID(instance),
                                         project_id=world.project,
                                         operation_id=UUID(operation["id"]),
                                         report={"status": "succeeded",
                                                 "target_member_id": str(uuid4())},
                                         render=render))
    assert code(world.command(instance, "restart")) == \
        "app_instance_state_invalid/restart_unsupported_use_repair"


def active_allocation(world: World, project: UUID) -> str:
    launched = world.ok(submit_launch(world.ctx(f"launch-{uuid4()}"), user_id=world.user,
                                      tenant_id=None, project_id=project, sku="bm", unit_count=1,
                                      request={}, render=render))
    allocation = launched["allocations"][0]
    node = UUID(allocation["node_id"])
    task = world.ok(dispatch_node_tasks(world.ctx(), node_id=node, render=render))["task"]
    world.ok(report_node_task(world.ctx(), node_id=node, task_id=UUID(task["task_id"]),
                              status="success", error=None, completed_at=world.clock, output={},
                              render=render))
    return allocation["id"]


def test_a_placement_binds_existing_allocations_exclusively(world: World) -> None:
    assert code(world.create("cluster")) == "invalid_request/placement_shape_invalid"
    assert code(world.create("cluster", placement_intent={
        "server_allocation_id": str(uuid4())})) == "allocation_not_found"
    allocation = active_allocation(world, world.project)
    created = world.create("cluster", placement_intent={"server_allocation_id": allocation})["ok"]
    [member] = created["members"]
    assert (member["component_key"], member["bound_allocation_id"]) == ("server", allocation)
    assert member["bound_node_id"] is not None
    use = world.app.repository.get(app_use_id_for(allocation))
    assert set(use.bindings) == {member["id"]}
    assert code(world.create("cluster", placement_intent={"server_allocation_id": allocation})) \
        == "invalid_request/allocation_in_use_by_app"
    instance = created["app_instance"]["id"]
    world.report(instance, "running")
    assert world.record(instance, f"member:{member['id']}") is None  # the allocation bills itself
    world.ok(mark_allocation_released(world.ctx(), allocation_id=UUID(allocation), render=render))
    changed = world.instance(instance).members[member["id"]]
    assert (changed["status"], changed["health_status"]) == ("failed", "allocation_released")
    world.command(instance, "decommission")
    world.report(instance, "decommissioned")
    assert world.app.repository.get(app_use_id_for(allocation)).bindings == {}


def test_a_replayed_create_names_the_same_instance_and_other_projects_see_nothing(
        world: World) -> None:
    first = world.create(key="create-1")
    before = world.position()
    again = world.create(key="create-1")
    assert again == first and world.position() == before
    instance = UUID(first["ok"]["app_instance"]["id"])
    foreign = world.run(lifecycle(world.ctx(), app_instance_id=instance, project_id=uuid4(),
                                  operation="stop", render=render))
    unknown = world.run(lifecycle(world.ctx(), app_instance_id=uuid4(), project_id=world.project,
                                  operation="stop", render=render))
    assert foreign["error"] == unknown["error"] == "app_instance_not_found"
    assert foreign["resource"] == unknown["resource"] == "app_instance"


def test_catalog_versions_publish_and_deprecate(world: World) -> None:
    assert code(world.run(deprecate_version(world.ctx(), slug="notebook", version="2.0",
                                            render=render))) == "invalid_request/app_version_not_published"
    before = world.position()
    assert world.ok(publish_version(world.ctx(), slug="notebook", version="1.0",
                                    render=render))["status"] == "active"
    assert world.position() == before  # again: a no-op
    assert code(world.run(publish_version(world.ctx(), slug="nope", version="1",
                                          render=render))) == "app_not_found"
    assert code(world.run(register_version(world.ctx(), slug="notebook", version="1.0",
                                           runtime_backend="k8s", manifest={},
                                           render=render))) == "invalid_request/app_version_exists"
    assert code(world.entitle("notebook", max_instances=-1)) == \
        "invalid_request/policy_override_invalid"


def test_a_v3_launch_defaults_its_version_and_name_and_checks_dependencies(world: World) -> None:
    launched = world.ok(create_app_instance(
        world.ctx(), project_id=world.project, user_id=world.user, tenant_id=None,
        request={"app_slug": "serve"}, source="v3_launch", render=render))
    instance = launched["app_instance"]
    assert instance["app_version"] == "1"
    assert instance["display_name"] == f"Serve-{instance['id'][:8]}"
    assert world.instance(instance["id"]).spec["source"] == "v3_launch"
    refused = world.run(create_app_instance(
        world.ctx(), project_id=world.project, user_id=world.user, tenant_id=None,
        request={"app_slug": "serve", "dependencies": {"ssh": {"key": "k"}}},
        source="v3_launch", render=render))
    assert code(refused) == "invalid_request/dependency_not_declared"
    world.entitle("serve", allowed_versions=["9"])
    assert code(world.run(create_app_instance(
        world.ctx(), project_id=world.project, user_id=world.user, tenant_id=None,
        request={"app_slug": "serve"}, source="v3_launch", render=render))) == \
        "app_version_not_found/no_entitled_active_version"
