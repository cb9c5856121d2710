"""App instances in the V3 workbench, on real Postgres, read through HTTP and checked
against the contract: an app's row equals what ``domain.app_workload_views`` builds
from the aggregate, its status follows the §4.3 map, its actions are enabled exactly
when the domain's guard accepts the command, its money is its ``app_runtime`` meters;
a compute row hosting a live app says so (``blocking_app_use``); app launches and
operations are V3 tasks; a released allocation fails the member it served; a rebuild
reproduces it all.

Apps are driven through the write side (``stores.app``), as the app's adapter and its
commands would; everything is read back through the V3 queries."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import pytest

from consumers.rebuild import rebuild
from domain.app_instances import (AppInstance, complete_stop, create_app_instance,
                                  create_member_operation, lifecycle, report_app_instance,
                                  report_member_operation)
from domain.app_workload_views import app_step_of, app_workload_json
from domain.app_catalog_views import app_kind
from domain.apps import (app_id_for, publish_version, register_app, register_version,
                         upsert_entitlement)
from domain.billing import account_id_for
from domain.commands import Session, run_decision
from domain.errors import DomainError
from domain.inventory import state_of
from domain.provenance import CommandContext
from domain.usage import usage_id_for_app
from projections import BY_NAME
from tests.conftest import Tokens, serve_own_database
from tests.harness import bearer, client
from tests.integration.test_inventory_commands import baremetal_sku, make_node, make_sku
from tests.integration.test_workload_queries import (TASK, TASKS, WORKLOAD, WORKLOADS, Lab,
                                                     member)

PRICE = 3_600_000  # minor units per node-hour (and per instance-hour of the platform app)


def render(result: Any) -> dict[str, Any]:
    if isinstance(result, DomainError):
        return {"error": result.code, **result.details}
    return {"ok": result}


class AppLab(Lab):
    """``Lab`` plus the app catalog and the app side of the write model:

    - ``jupyter`` (kind jupyter; bare_metal, tenant_dedicated): placed on a project
      allocation;
    - ``vllm-serve`` (kind vllm; k8s, platform_managed): priced per instance-hour;
    - ``kube`` (kind vector_db, an ``app`` row; k8s, tenant_dedicated): a controller and
      workers on project allocations.
    """

    def execute(self, command: Any) -> dict[str, Any]:
        response = self.served.stores.app.execute(command).response
        self.position = max(self.position, self.served.stores.app.recorder.max_notification_id())
        return response

    def ok_(self, command: Any) -> Any:
        response = self.execute(command)
        assert "ok" in response, response
        return response["ok"]

    def ctx(self, user: UUID | None = None, **fields: Any) -> CommandContext:
        return CommandContext(actor_id=str(user or uuid.uuid4()), source="api",
                              actor_role="member", **fields)

    def seed(self) -> None:
        for slug, backend, manifest in (
                ("jupyter", "bare_metal", {"presentation": {"kind": "jupyter"}}),
                ("vllm-serve", "k8s", {"operating_modes": ["platform_managed"], "pricing": [
                    {"component": "control_plane", "usage_unit": "instance_hour",
                     "unit_price": {"amount_minor": PRICE, "currency": "USD"}}],
                    "presentation": {"kind": "vllm"}}),
                ("kube", "k8s", {"presentation": {"kind": "vector_db"}})):
            self.ok_(register_app(self.ctx(), slug=slug, display_name=slug.capitalize(),
                                  category="other", publisher="core42", render=render))
            for version in ("1", "2"):
                self.ok_(register_version(self.ctx(), slug=slug, version=version,
                                          runtime_backend=backend, manifest=manifest,
                                          render=render))
                self.ok_(publish_version(self.ctx(), slug=slug, version=version, render=render))

    def entitle(self, project: UUID) -> None:
        for slug in ("jupyter", "vllm-serve", "kube"):
            self.ok_(upsert_entitlement(self.ctx(), project_id=project, slug=slug, enabled=True,
                                        policy_overrides={}, render=render))

    def active(self, token: str, project: UUID) -> str:
        """A compute allocation of the project, active."""
        launched = self.launch(token, project)
        node = self.ok(token, project, WORKLOAD, workload_id=launched["workload_id"])
        self.agent(node["workload"]["node_id"], "success")
        assert self.status(launched["workload_id"]) == "active"
        return launched["workload_id"]

    def create(self, user: UUID, project: UUID, slug: str, **placement: Any) -> dict[str, Any]:
        return self.ok_(create_app_instance(
            self.ctx(user), project_id=project, user_id=user, tenant_id=None, render=render,
            request={"app_slug": slug, "app_version": "1", "display_name": f"my-{slug}",
                     "placement_intent": placement}))

    def report(self, app_id: str, status: str, **fields: Any) -> dict[str, Any]:
        return self.ok_(report_app_instance(self.ctx(), app_instance_id=UUID(app_id),
                                            project_id=None, render=render,
                                            report={"status": status, **fields}))

    def command(self, app_id: str, operation: str, **kwargs: Any) -> dict[str, Any]:
        return self.execute(lifecycle(self.ctx(), app_instance_id=UUID(app_id), project_id=None,
                                      operation=operation, render=render, **kwargs))

    def instance(self, app_id: str) -> AppInstance:
        return self.served.stores.app.repository.get(UUID(app_id))


@pytest.fixture(scope="module")
def lab(services: Any, tokens: Tokens) -> Iterator[AppLab]:
    with serve_own_database(services) as served, client(served.url) as http:
        admin, sku = tokens.admin(), f"aw-{uuid.uuid4().hex[:6]}"
        make_sku(http, admin, {**baremetal_sku(sku),
                               "unit_price": {"amount_minor": PRICE, "currency": "USD"}})
        for _ in range(8):
            make_node(http, admin, sku)
        lab = AppLab(http, served, tokens, sku)
        lab.seed()
        yield lab


def team(lab: AppLab) -> tuple[UUID, UUID, str, str]:
    """A project with the apps enabled: (project, owner, owner's token, a colleague's)."""
    project = uuid.uuid4()
    owner, token = member(lab, project)
    _, colleague = member(lab, project, funded=False)
    lab.entitle(project)
    return project, owner, token, colleague


def built(lab: AppLab, app_id: str, now: datetime) -> dict[str, Any]:
    """The row ``app_workload_json`` builds from the aggregates themselves (as a
    colleague sees it: no balance)."""
    app = lab.served.stores.app
    instance = lab.instance(app_id)
    events = app.repository.event_store.get(instance.id)
    steps = [s for s in map(app_step_of, events) if s is not None]
    components = [p["component"] for p in instance.spec["pricing"]] + [
        f"member:{m}" for m, v in instance.members.items() if v.get("capacity")]
    records = [r for r in (app.get_or_none(usage_id_for_app(instance.id, c, cycle))
                           for c in components for cycle in range(instance.placement_cycle + 1))
               if r is not None]
    running = [r for r in records if r.end_time is None]
    open_rate = {"amount_minor": sum(r.terms.accrued(r.start_time + timedelta(hours=1))
                                     for r in running),
                 "currency": running[0].currency} if running else None
    cost = {"amount_minor": sum(r.cost_minor for r in records),
            "currency": records[0].currency} if records else None
    intent = instance.spec["placement_intent"]
    primary = intent.get("target_allocation_id") or intent.get("server_allocation_id") or \
        intent.get("controller_allocation_id")
    allocation = state_of(app.repository.get(UUID(primary))) if primary else None
    account = app.get_or_none(account_id_for(instance.payer()))
    catalog = app.repository.get(app_id_for(instance.spec["app_slug"]))
    return app_workload_json(state_of(instance), steps, now=now, open_rate=open_rate,
                             usage_cost=cost, allocation=allocation, funds=None,
                             owner_currency=account.primary_currency if account else None,
                             catalog_kind=app_kind(catalog),
                             catalog_name=catalog.details["display_name"])


def row(lab: AppLab, token: str, project: UUID, app_id: str) -> dict[str, Any]:
    """The app's row through HTTP, checked to equal the pure builder's."""
    detail = lab.ok(token, project, WORKLOAD, workload_id=app_id)
    now = datetime.fromisoformat(detail["meta"]["generated_at"])
    assert detail["workload"] == built(lab, app_id, now)
    return detail["workload"]


def enabled(workload: dict[str, Any]) -> set[str]:
    return {a["action"] for a in workload["lifecycle_actions"] if a["enabled"]}


def accepted(lab: AppLab, workload: dict[str, Any]) -> set[str]:
    """The actions whose command the domain accepts now, decided in a session that is
    never saved (so nothing changes)."""
    found = {"open"}
    for action, operation in (("stop", "stop"), ("start", "start"), ("restart", "restart"),
                              ("release", "decommission")):
        command = lifecycle(lab.ctx(), app_instance_id=UUID(workload["id"]), project_id=None,
                            operation=operation, render=render)
        response, _, _ = run_decision(command, command.ctx, Session(lab.served.stores.app))
        if "ok" in response:
            found.add(action)
    return found


def test_an_app_row_follows_the_status_map_with_actions_its_guards_accept(lab: AppLab) -> None:
    project, owner, token, colleague = team(lab)
    allocation = lab.active(token, project)
    created = lab.create(owner, project, "jupyter", target_allocation_id=allocation)
    app_id = created["app_instance"]["id"]
    assert created["workload_id"] == app_id

    first = row(lab, colleague, project, app_id)
    assert (first["kind"], first["status"], first["app_instance_id"]) == ("jupyter", "requested",
                                                                           app_id)
    assert first["allocation_id"] == allocation and first["owner_user_id"] == str(owner)
    assert (first["app_slug"], first["app_name"]) == ("jupyter", "Jupyter")
    compute = lab.ok(token, project, WORKLOAD, workload_id=allocation)["workload"]
    assert (first["sku"], first["node_id"]) == (compute["sku"], compute["node_id"])
    assert first["active_at"] is None and first["primary_action"] == "none"
    assert enabled(first) == accepted(lab, first) == {"release", "open"}
    assert compute["blocking_app_use"] == {
        "kind": "app_instance", "app_instance_id": app_id, "display_name": "my-jupyter",
        "app_slug": "jupyter", "status": "requested", "component_key": "workload"}

    walk = [("deploying", {}, "provisioning"), ("running", {}, "active"),
            ("running", {"health_status": "idle"}, "idle"),
            ("running", {"health_status": "healthy"}, "active")]
    for status, fields, expected in walk:
        lab.report(app_id, status, **fields)
        seen = row(lab, colleague, project, app_id)
        assert seen["status"] == expected, (status, fields)
        assert enabled(seen) == accepted(lab, seen)
    assert seen["primary_action"] == "open_notebook" and seen["active_at"]
    assert seen["runtime_readiness"]["ready"]
    assert enabled(seen) == {"stop", "restart", "release", "open"}

    for operation, report, expected in (("restart", "failed", "restart_failed"),
                                        ("restart", "running", "active"),
                                        ("upgrade", "failed", "restart_failed")):
        extra = {"app_version": "2"} if operation == "upgrade" else {}
        assert "ok" in lab.command(app_id, operation, **extra)
        assert row(lab, colleague, project, app_id)["status"] == "restarting"
        lab.report(app_id, report, **({"failure_reason": "boom"} if report == "failed" else {}))
        seen = row(lab, colleague, project, app_id)
        assert seen["status"] == expected and enabled(seen) == accepted(lab, seen)
    assert seen["needs_action"] and seen["primary_action"] == "review"
    assert seen["action_reason"] == "boom"
    listed = lab.ok(token, project, WORKLOADS)
    assert [b["workload_id"] for b in listed["action_band"]] == [app_id]
    assert listed["counts"]["needs_action"] == 1

    assert "ok" in lab.command(app_id, "stop")
    assert row(lab, colleague, project, app_id)["status"] == "stopped"
    lab.ok_(complete_stop(lab.ctx(), app_instance_id=UUID(app_id), render=render))
    stopped = row(lab, colleague, project, app_id)
    assert stopped["status"] == "stopped" and enabled(stopped) == {"start", "release", "open"}
    assert enabled(stopped) == accepted(lab, stopped)

    assert "ok" in lab.command(app_id, "decommission")
    assert row(lab, colleague, project, app_id)["status"] == "releasing"
    lab.report(app_id, "failed", failure_reason="stuck")
    broken = row(lab, colleague, project, app_id)
    assert broken["status"] == "release_failed" and broken["primary_action"] == "retry_release"
    assert enabled(broken) == accepted(lab, broken) == {"release", "open"}
    assert "ok" in lab.command(app_id, "decommission")
    lab.report(app_id, "decommissioned")
    gone = row(lab, colleague, project, app_id)
    assert gone["status"] == "released" and gone["archived_at"]
    assert lab.ok(token, project, WORKLOAD, workload_id=allocation)["workload"][
        "blocking_app_use"] is None
    assert app_id not in [r["id"] for r in lab.ok(token, project, WORKLOADS)["items"]]
    assert [r["id"] for r in lab.ok(token, project, WORKLOADS, {"kind": "compute"})[
        "items"]] == [allocation]
    assert app_id in [r["id"] for r in lab.ok(token, project, WORKLOADS,
                                               {"include_history": "true"})["items"]]
    assert [r["id"] for r in lab.ok(token, project, WORKLOADS, {"kind": "jupyter",
                                                                 "status": "released"})[
        "items"]] == [app_id]


def test_a_platform_app_row_costs_its_meters_and_a_dedicated_one_adds_nothing(
        lab: AppLab) -> None:
    project, owner, token, colleague = team(lab)
    serve = lab.create(owner, project, "vllm-serve")["app_instance"]["id"]
    lab.report(serve, "running")
    live = row(lab, colleague, project, serve)
    assert live["kind"] == "vllm" and live["primary_action"] == "try_endpoint"
    assert live["hourly_rate"] == {"amount_minor": PRICE, "currency": "USD"}
    mine = lab.ok(token, project, WORKLOAD, workload_id=serve)["workload"]
    balance = lab.http.get("/api/v1/billing/balance", headers={
        **bearer(token), "X-Ledger-Position": str(lab.position)}).json()["balance"]
    assert mine["cost_projection"]["basis"] == "active_rate"
    assert mine["cost_projection"]["runway_seconds"] == balance["amount_minor"] * 3600 // PRICE

    allocation = lab.active(token, project)
    kube = lab.create(owner, project, "kube", controller_allocation_id=allocation)
    kube_id = kube["app_instance"]["id"]
    lab.report(kube_id, "running")
    dedicated = row(lab, colleague, project, kube_id)
    assert dedicated["kind"] == "app" and dedicated["primary_action"] == "open"
    assert [r["id"] for r in lab.ok(token, project, WORKLOADS, {"kind": "app"})["items"]] == \
        [kube_id]
    assert dedicated["hourly_rate"] == {"amount_minor": 0, "currency": "USD"}
    assert dedicated["accrued_cost"] == {"amount_minor": 0, "currency": "USD"}
    burn = lab.ok(token, project, WORKLOAD, workload_id=allocation)["workload"]["cost_projection"]
    # the owner burns the lease and the platform app; the dedicated app adds nothing
    assert burn["runway_seconds"] == burn["balance"]["amount_minor"] * 3600 // (2 * PRICE)

    assert "ok" in lab.command(serve, "decommission")
    lab.report(serve, "decommissioned")
    ended = row(lab, colleague, project, serve)
    usage = lab.http.get("/api/v1/billing/usage", headers={
        **bearer(token), "X-Ledger-Position": str(lab.position)}).json()["items"]
    charged = [u for u in usage if u["app_instance_id"] == serve]
    assert len(charged) == 1 and charged[0]["usage_source"] == "app_runtime"
    assert ended["hourly_rate"]["amount_minor"] == 0
    assert ended["accrued_cost"] == {"amount_minor": charged[0]["cost"]["amount_minor"],
                                     "currency": "USD"}
    assert ended["accrued_cost"]["amount_minor"] > 0
    assert not [u for u in usage if u["app_instance_id"] == kube_id]


def test_app_launches_and_operations_are_tasks(lab: AppLab) -> None:
    project, owner, token, colleague = team(lab)
    first, second = lab.active(token, project), lab.active(token, project)
    created = lab.create(owner, project, "kube", controller_allocation_id=first,
                         worker_allocation_ids=[second])
    app_id, launch_id = created["app_instance"]["id"], created["task_id"]

    def task(task_id: str) -> dict[str, Any]:
        return lab.ok(colleague, project, TASK, task_id=task_id)

    launch = task(launch_id)
    assert launch["task"]["kind"] == "launch" and launch["task"]["status"] == "queued"
    assert launch["task"]["resource_kind"] == "app_instance"
    assert launch["task"]["resource_id"] == app_id
    assert launch["context"] == {"project": str(project),
                                 "resource_href": f"{WORKLOADS}/{app_id}",
                                 "timeline_source": "synthetic"}
    lab.report(app_id, "deploying")
    assert task(launch_id)["task"]["status"] == "running"
    lab.report(app_id, "running")
    done = task(launch_id)
    assert done["task"]["status"] == "succeeded" and done["task"]["completed_at"]
    assert [i["kind"] for i in done["timeline"]] == ["accepted", "workflow", "workflow",
                                                     "completion"]
    restart = next(a for a in row(lab, colleague, project, app_id)["lifecycle_actions"]
                   if a["action"] == "restart")
    assert not restart["enabled"] and "repair" in restart["disabled_reason"]  # two members

    added = lab.ok_(create_member_operation(lab.ctx(owner), app_instance_id=UUID(app_id),
                                            project_id=None, render=render,
                                            request={"action": "add", "component_key": "worker",
                                                     "requested_count": 1}))
    operation = lab.instance(app_id).member_ops[added["id"]]["task_id"]
    assert task(operation)["task"]["status"] == "queued"
    assert task(operation)["task"]["kind"] == "app_operation"
    for status, expected in (("in_progress", "running"), ("succeeded", "succeeded")):
        lab.ok_(report_member_operation(lab.ctx(), app_instance_id=UUID(app_id),
                                        project_id=None, operation_id=UUID(added["id"]),
                                        render=render, report={"status": status}))
        assert task(operation)["task"]["status"] == expected
    upgraded = lab.command(app_id, "upgrade", app_version="2")["ok"]
    upgrade = upgraded["task_id"]
    assert task(upgrade)["task"]["status"] == "running"
    hint = next(a for a in row(lab, colleague, project, app_id)["lifecycle_actions"]
                if a["action"] == "stop")
    assert hint["result"]["task_href"] is None  # no stop yet
    assert "ok" in lab.command(app_id, "decommission")  # supersedes the upgrade
    assert task(upgrade)["task"]["status"] == "canceled"
    release = next(a for a in row(lab, colleague, project, app_id)["lifecycle_actions"]
                   if a["action"] == "release")
    decommission = release["result"]["task_href"].rsplit("/", 1)[1]
    assert release["result"]["correlation_id"] and release["result"]["evidence_href"]
    assert task(decommission)["task"]["status"] == "running"
    lab.report(app_id, "deleting")
    assert task(decommission)["task"]["status"] == "running"
    lab.report(app_id, "decommissioned")
    assert task(decommission)["task"]["status"] == "succeeded"
    listed = lab.ok(colleague, project, TASKS)
    mine = [t for t in listed["items"] if t["resource_id"] == app_id]
    assert sorted(t["kind"] for t in mine) == ["app_operation"] * 3 + ["launch"]
    assert {t["id"] for t in mine} == {launch_id, operation, upgrade, decommission}
    failed = lab.ok(colleague, project, TASKS, {"status": "canceled"})["items"]
    assert [t["id"] for t in failed] == [upgrade]


def test_a_released_allocation_fails_the_member_it_served(lab: AppLab) -> None:
    project, owner, token, colleague = team(lab)
    controller, worker = lab.active(token, project), lab.active(token, project)
    app_id = lab.create(owner, project, "kube", controller_allocation_id=controller,
                        worker_allocation_ids=[worker])["app_instance"]["id"]
    lab.report(app_id, "running")
    hosting = lab.ok(token, project, WORKLOAD, workload_id=worker)["workload"]
    assert hosting["blocking_app_use"]["kind"] == "app_instance_member"
    assert hosting["blocking_app_use"]["component_key"] == "worker"
    assert row(lab, colleague, project, app_id)["runtime_readiness"]["ready"]

    assert lab.act(token, project, worker, "release").status_code == 202
    lab.agent(hosting["node_id"], "success")
    assert lab.status(worker) == "released"
    member = next(m for m in lab.instance(app_id).members.values()
                  if m["bound_allocation_id"] == worker)
    assert (member["status"], member["health_status"]) == ("failed", "allocation_released")
    seen = row(lab, colleague, project, app_id)
    assert seen["status"] == "active"
    assert seen["runtime_readiness"]["reason_code"] == "allocation_not_active"

    assert lab.act(token, project, controller, "release").status_code == 202
    node = lab.ok(token, project, WORKLOAD, workload_id=controller)["workload"]["node_id"]
    lab.agent(node, "success")
    seen = row(lab, colleague, project, app_id)
    assert seen["runtime_readiness"] == {
        "ready": False, "severity": "error", "reason_code": "allocation_not_active",
        "reason_codes": ["allocation_not_active"],
        "summary": "The allocation the app runs on is released."}


def snapshot(lab: AppLab) -> dict[str, list[Any]]:
    with lab.served.stores.query_pool.connection() as conn:
        return {table: conn.execute(f"SELECT * FROM readmodels.{table} ORDER BY 1").fetchall()
                for table in BY_NAME["workloads"].tables}


def test_a_rebuild_reproduces_app_rows_meters_and_tasks(lab: AppLab) -> None:
    project, owner, token, colleague = team(lab)
    serve = lab.create(owner, project, "vllm-serve")["app_instance"]["id"]
    lab.report(serve, "running")
    row(lab, colleague, project, serve)  # the projector has applied everything
    stores = lab.served.stores
    before = snapshot(lab)
    assert any(r["app_slug"] == "vllm-serve" for r in before["v3_workload_rows"])
    assert before["v3_app_meters"] and before["v3_app_kinds"]
    with stores.query_pool.connection() as conn:  # damage the read model
        conn.execute("DELETE FROM readmodels.v3_app_meters")
        conn.execute("DELETE FROM readmodels.v3_app_kinds")
        conn.execute("UPDATE readmodels.v3_workload_rows SET status = 'failed'")
    count = rebuild(stores.app, stores.read_models, BY_NAME["workloads"], batch_size=7)
    assert count == stores.app.recorder.max_notification_id()
    assert snapshot(lab) == before
    assert row(lab, colleague, project, serve)["hourly_rate"]["amount_minor"] == PRICE
