"""An allocation bound to a live app is the allocations domain's to release; when it
reaches ``released`` (the release task succeeded, or an operator cleaned it up) the
app member it served is marked ``failed`` with ``health_status=allocation_released``
in the same save (app-instances §4.1 "Binding"). Run on the library's in-memory
store."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import UUID, uuid4

import pytest

from domain.admission import submit_launch
from domain.allocations import Allocation
from domain.app import Ledgercore
from domain.app_instances import (AppInstance, app_use_id_for, create_app_instance, lifecycle,
                                  report_app_instance)
from domain.apps import publish_version, register_app, register_version, upsert_entitlement
from domain.billing import adjust_balance
from domain.errors import DomainError
from domain.leases import (dispatch_node_tasks, force_cleanup, report_node_task,
                           request_release)
from domain.money import Money
from domain.nodes import register_node
from domain.provenance import CommandContext, IdempotencyClaim
from domain.skus import create_sku, set_sku_active

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=timezone.utc)


def render(result: Any) -> dict[str, Any]:
    if isinstance(result, DomainError):
        return {"error": result.code, **result.details}
    return {"ok": result}


class World:
    """Four baremetal nodes of SKU ``bm``; the app ``kube`` (k8s, tenant_dedicated: a
    controller and workers on the project's own allocations)."""

    def __init__(self) -> None:
        self.app = Ledgercore(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
        self.clock = T0
        spec = {"vendor": "nv", "display_name": "n", "resource_class": "gpu_baremetal",
                "billing_unit": "node_hour", "scheduling_unit": "node",
                "resources": {"allowed_accelerator_counts": [8], "accelerator_count": 8},
                "unit_price": {"amount_minor": 3_600, "currency": "USD"}}
        self.ok(create_sku(self.ctx(), sku="bm", spec=spec, render=render))
        self.ok(set_sku_active(self.ctx(), sku="bm", active=True, render=render))
        for index in range(4):
            self.ok(register_node(self.ctx(), node_id=uuid4(), online=True,
                                  render=lambda r: {"ok": True},
                                  identity={"host": f"h{index}", "hostname": f"node-{index}",
                                            "port": 22, "ssh_username": "u", "sku": "bm",
                                            "gpus_total": 8, "region_code": "r",
                                            "onboarding_mode": "manual"}))
        self.user, self.project = uuid4(), uuid4()
        self.ok(adjust_balance(self.ctx(), user_id=self.user, direction="credit",
                               amount=Money(1_000_000, "USD"), reason="test", render=render))
        self.ok(register_app(self.ctx(), slug="kube", display_name="Kube",
                             category="orchestration", publisher="core42", render=render))
        self.ok(register_version(self.ctx(), slug="kube", version="1", runtime_backend="k8s",
                                 manifest={}, render=render))
        self.ok(publish_version(self.ctx(), slug="kube", version="1", render=render))
        self.ok(upsert_entitlement(self.ctx(), project_id=self.project, slug="kube",
                                   enabled=True, policy_overrides={}, render=render))

    def ctx(self, key: str | None = None) -> CommandContext:
        self.clock += timedelta(seconds=1)  # every command at its own moment
        claim = IdempotencyClaim(scope=key, fingerprint="f") if key else None
        return CommandContext(actor_id=str(uuid4()), source="api", actor_role="member",
                              now=self.clock, idempotency=claim)

    def run(self, command: Any) -> dict[str, Any]:
        return self.app.execute(command).response

    def ok(self, command: Any) -> Any:
        response = self.run(command)
        assert "ok" in response, response
        return response["ok"]

    # ---- allocations ----------------------------------------------------------------------
    def active_allocation(self) -> str:
        launched = self.ok(submit_launch(self.ctx(f"launch-{uuid4()}"), user_id=self.user,
                                         tenant_id=None, project_id=self.project, sku="bm",
                                         unit_count=1, request={}, render=render))
        allocation = launched["allocations"][0]["id"]
        self.agent(allocation, "success")
        assert self.allocation(allocation).status == "active"
        return allocation

    def allocation(self, allocation: str) -> Allocation:
        return self.app.repository.get(UUID(allocation))

    def agent(self, allocation: str, status: str) -> None:
        """The node agent takes the allocation's open task and reports ``status``."""
        node = UUID(self.allocation(allocation).lease["node_id"])
        task = self.ok(dispatch_node_tasks(self.ctx(), node_id=node, render=render))["task"]
        assert task is not None and task["params"]["allocation_id"] == allocation
        self.ok(report_node_task(self.ctx(), node_id=node, task_id=UUID(task["task_id"]),
                                 status=status, error=None, completed_at=self.clock, output={},
                                 render=render))

    def release(self, allocation: str) -> None:
        self.ok(request_release(self.ctx(), allocation_id=UUID(allocation),
                                project_id=self.project, mode="user", reason=None,
                                render=render))

    # ---- apps -----------------------------------------------------------------------------
    def kube(self, controller: str, *workers: str) -> str:
        created = self.ok(create_app_instance(
            self.ctx(f"create-{uuid4()}"), project_id=self.project, user_id=self.user,
            tenant_id=None, render=render, request={
                "app_slug": "kube", "app_version": "1", "display_name": "k",
                "placement_intent": {"controller_allocation_id": controller,
                                     "worker_allocation_ids": list(workers)}}))
        return created["app_instance"]["id"]

    def report(self, instance: str, status: str) -> None:
        self.ok(report_app_instance(self.ctx(), app_instance_id=UUID(instance),
                                    project_id=self.project, report={"status": status},
                                    render=render))

    def instance(self, instance: str) -> AppInstance:
        return self.app.repository.get(UUID(instance))

    def member_on(self, instance: str, allocation: str) -> dict[str, Any]:
        return next(m for m in self.instance(instance).members.values()
                    if m["bound_allocation_id"] == allocation)

    def events(self, aggregate: str) -> list[Any]:
        return list(self.app.repository.event_store.get(UUID(aggregate)))


@pytest.fixture
def world() -> World:
    return World()


def test_a_released_worker_allocation_fails_its_member_in_the_same_save(world: World) -> None:
    controller, worker = world.active_allocation(), world.active_allocation()
    instance = world.kube(controller, worker)
    world.report(instance, "running")
    before = world.instance(instance).version

    world.release(worker)  # a release task is issued: the allocation is only releasing
    assert world.allocation(worker).status == "releasing"
    assert world.member_on(instance, worker)["status"] == "requested"
    assert world.instance(instance).version == before

    world.agent(worker, "success")  # the runtime is gone: released
    assert world.allocation(worker).status == "released"
    member = world.member_on(instance, worker)
    assert (member["status"], member["health_status"]) == ("failed", "allocation_released")
    assert world.member_on(instance, controller)["status"] == "requested"  # untouched
    assert world.instance(instance).status == "running"  # the app decides what follows
    released = world.events(worker)[-1]
    changed = world.events(instance)[-1]
    assert isinstance(released, Allocation.Moved) and released.to == "released"
    assert isinstance(changed, AppInstance.MemberChanged)
    assert changed.reason == "allocation_released"
    assert changed.provenance["causation_id"] == released.provenance["causation_id"]  # one save
    assert changed.timestamp == released.timestamp
    # the binding stays until the member is deleted or the app is Gone
    assert set(world.app.repository.get(app_use_id_for(worker)).bindings) == {member["id"]}


def test_an_operator_cleanup_that_releases_a_bound_allocation_fails_its_member(
        world: World) -> None:
    controller = world.active_allocation()
    instance = world.kube(controller)
    world.release(controller)
    world.agent(controller, "failed")
    assert world.allocation(controller).status == "release_failed"
    assert world.member_on(instance, controller)["status"] == "requested"
    world.ok(force_cleanup(world.ctx(), allocation_id=UUID(controller), reason="gone",
                           runtime_verified_absent=True, render=render))
    assert world.allocation(controller).status == "released"
    member = world.member_on(instance, controller)
    assert (member["status"], member["health_status"]) == ("failed", "allocation_released")


def test_allocations_no_live_app_uses_release_without_touching_any_app(world: World) -> None:
    free, used, kept = (world.active_allocation() for _ in range(3))
    world.release(free)
    world.agent(free, "success")
    assert world.allocation(free).status == "released"

    gone = world.kube(used)  # an app that is Gone has let go of its allocation
    world.ok(lifecycle(world.ctx(), app_instance_id=UUID(gone), project_id=world.project,
                       operation="decommission", render=render))
    world.report(gone, "decommissioned")
    assert world.app.repository.get(app_use_id_for(used)).bindings == {}
    version = world.instance(gone).version
    world.release(used)
    world.agent(used, "success")
    assert world.allocation(used).status == "released"
    assert world.instance(gone).version == version

    live = world.kube(kept)  # a member already failed is not failed again
    world.release(kept)
    world.agent(kept, "success")
    version = world.instance(live).version
    assert world.member_on(live, kept)["status"] == "failed"
    with pytest.raises(AssertionError):  # released twice: refused, nothing changes
        world.release(kept)
    assert world.instance(live).version == version
