"""A lease's lifecycle moves its claims, its meter and the concurrency quota with it,
in one save; node work goes through the task channel. Run on the library's in-memory
store."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import UUID, uuid4

import pytest

from domain.admission import submit_launch
from domain.allocations import quota_id_for
from domain.app import Ledgercore
from domain.billing import account_id_for, adjust_balance
from domain.errors import DomainError
from domain.leases import (dispatch_node_tasks, force_cleanup, report_node_task,
                           request_release, request_restart)
from domain.money import Money
from domain.nodes import register_node
from domain.provenance import CommandContext, IdempotencyClaim
from domain.skus import create_sku, set_sku_active
from domain.usage import usage_id_for_allocation

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=timezone.utc)
PRICE = 2_500  # minor units per node-hour
FUNDS = 100_000


def render(result: Any) -> dict[str, Any]:
    if isinstance(result, DomainError):
        return {"status": 409, "body": {"code": result.code, **result.details}}
    return {"status": 200, "body": result}


def ctx(at: datetime, key: bool = False) -> CommandContext:
    claim = IdempotencyClaim(scope=uuid4().hex, fingerprint="f") if key else None
    return CommandContext(actor_id=str(uuid4()), source="admin", actor_role="admin", now=at,
                          idempotency=claim)


class World:
    def __init__(self) -> None:
        self.app = Ledgercore(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
        spec = {"vendor": "nv", "display_name": "n", "resource_class": "gpu_baremetal",
                "billing_unit": "node_hour", "scheduling_unit": "node",
                "resources": {"allowed_accelerator_counts": [8], "accelerator_count": 8},
                "unit_price": {"amount_minor": PRICE, "currency": "USD"}}
        self.run(create_sku(ctx(T0), sku="bm", spec=spec, render=render))
        self.run(set_sku_active(ctx(T0), sku="bm", active=True, render=render))
        self.node = UUID(self.app.execute(register_node(ctx(T0), online=True, render=lambda r: {
            "status": 201, "body": {"id": r["node"].node_id}}, identity={
            "host": "h1", "hostname": None, "port": 22, "ssh_username": "u", "sku": "bm",
            "gpus_total": 8, "region_code": "r", "onboarding_mode": "manual"})
        ).response["body"]["id"])
        self.user = uuid4()

    def run(self, command: Any) -> dict[str, Any]:
        return self.app.execute(command).response

    def fund(self, amount: int = FUNDS) -> None:
        self.run(adjust_balance(ctx(T0), user_id=self.user, direction="credit",
                                amount=Money(amount, "USD"), reason="test", render=render))

    def launch(self, at: datetime = T0) -> dict[str, Any]:
        return self.run(submit_launch(ctx(at, key=True), user_id=self.user, tenant_id=None,
                                      project_id=uuid4(), sku="bm", unit_count=1, request={},
                                      render=render))

    def wait(self, at: datetime) -> dict[str, Any] | None:
        return self.run(dispatch_node_tasks(ctx(at), node_id=self.node, render=render))["body"]["task"]

    def report(self, task: dict[str, Any], status: str, at: datetime) -> dict[str, Any]:
        return self.run(report_node_task(ctx(at), node_id=self.node, task_id=UUID(task["task_id"]),
                                         status=status, error=None, completed_at=at, output={},
                                         render=render))

    def status(self, allocation: UUID) -> str:
        return self.app.repository.get(allocation).status


@pytest.fixture
def world() -> World:
    found = World()
    found.fund()
    return found


def test_a_lease_that_ran_an_hour_is_billed_an_hour_and_frees_everything(world: World) -> None:
    allocation = UUID(world.launch()["body"]["allocations"][0]["id"])
    task = world.wait(T0)
    assert task["task_type"] == "allocation.provision" and world.status(allocation) == "provisioning"
    assert world.wait(T0)["task_id"] == task["task_id"]  # handed out again until reported
    world.report(task, "success", T0 + timedelta(minutes=5))
    assert world.status(allocation) == "active" and world.wait(T0) is None
    released = world.run(request_release(ctx(T0 + timedelta(minutes=65)), allocation_id=allocation,
                                         project_id=None, mode="user", reason=None, render=render))
    assert released["body"]["allocation"]["status"] == "releasing"
    world.report(world.wait(T0), "success", T0 + timedelta(minutes=65))
    node = world.app.repository.get(world.node)
    assert node.live_claims() == [] and node.baremetal_free()
    assert [c["status"] for c in node.claims_of(str(allocation))] == ["released"]
    record = world.app.repository.get(usage_id_for_allocation(allocation))
    assert record.end_time is not None and record.cost_minor == PRICE  # active for one hour
    assert world.app.repository.get(account_id_for(world.user)).balance("USD") == FUNDS - PRICE
    assert world.app.repository.get(quota_id_for(world.user)).live == []
    assert world.status(allocation) == "released"


def test_no_launch_without_a_positive_balance() -> None:
    world = World()
    refused = world.launch()
    assert refused["status"] == 409 and refused["body"]["code"] == "insufficient_balance"
    assert world.app.repository.get(world.node).live_claims() == []


def test_a_lease_never_picked_up_is_released_without_node_work_or_bill(world: World) -> None:
    allocation = UUID(world.launch()["body"]["allocations"][0]["id"])
    world.run(request_release(ctx(T0), allocation_id=allocation, project_id=None, mode="user",
                              reason=None, render=render))
    assert world.status(allocation) == "released" and world.wait(T0) is None
    assert world.app.repository.get(account_id_for(world.user)).balance("USD") == FUNDS


def test_the_first_report_of_a_task_wins(world: World) -> None:
    allocation = UUID(world.launch()["body"]["allocations"][0]["id"])
    task = world.wait(T0)
    world.report(task, "failed", T0)
    assert world.status(allocation) == "failed"
    assert world.report(task, "success", T0)["status"] == 200
    assert world.status(allocation) == "failed"
    assert world.app.repository.get(world.node).live_claims() == []


def test_restart_and_a_failed_release_then_force_cleanup(world: World) -> None:
    allocation = UUID(world.launch()["body"]["allocations"][0]["id"])
    world.report(world.wait(T0), "success", T0)
    restart = request_restart(ctx(T0), allocation_id=allocation, project_id=None, render=render)
    assert world.run(restart)["body"]["previous_status"] == "active"
    again = world.run(request_restart(ctx(T0), allocation_id=allocation, project_id=None,
                                      render=render))
    assert again["body"]["code"] == "allocation_not_active" and again["body"]["reason"] == "restart_in_progress"
    world.report(world.wait(T0), "failed", T0)
    assert world.status(allocation) == "restart_failed"
    world.run(request_release(ctx(T0), allocation_id=allocation, project_id=None, mode="user",
                              reason=None, render=render))
    world.report(world.wait(T0), "rejected", T0)
    assert world.status(allocation) == "release_failed"
    unverified = world.run(force_cleanup(ctx(T0), allocation_id=allocation, reason="stuck",
                                         runtime_verified_absent=False, render=render))
    assert unverified["body"]["reason"] == "provider_deletion_unconfirmed"
    world.run(force_cleanup(ctx(T0 + timedelta(hours=2)), allocation_id=allocation, reason="stuck",
                            runtime_verified_absent=True, render=render))
    assert world.status(allocation) == "released"
    assert world.app.repository.get(world.node).baremetal_free()
    record = world.app.repository.get(usage_id_for_allocation(allocation))
    assert record.cost_minor == 2 * PRICE  # billed until released, through the failures


def test_a_busy_node_is_snapshotted_and_loads_back_as_its_events_say() -> None:
    world = World()
    world.fund(10**9)
    at = T0
    for _ in range(45):  # five node events per lease: past the snapshot interval
        allocation = UUID(world.launch(at)["body"]["allocations"][0]["id"])
        world.report(world.wait(at), "success", at)
        world.run(request_release(ctx(at), allocation_id=allocation, project_id=None, mode="user",
                                  reason=None, render=render))
        world.report(world.wait(at), "success", at)
        at += timedelta(minutes=1)
    assert list(world.app.snapshots.get(world.node))
    loaded = world.app.repository.get(world.node)
    replayed = None
    for event in world.app.events.get(world.node):
        replayed = event.mutate(replayed)
    assert loaded.version == replayed.version > 200
    assert vars(loaded) == vars(replayed)
