"""A lease's lifecycle moves its claims, its meter and the concurrency quota with it,
in one save: run on the library's in-memory store."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import UUID, uuid4

import pytest

from domain.allocations import lease_step, quota_id_for, submit_launch
from domain.app import Ledgercore
from domain.billing import account_id_for
from domain.errors import DomainError
from domain.nodes import register_node
from domain.provenance import CommandContext, IdempotencyClaim
from domain.skus import create_sku, set_sku_active
from domain.usage import usage_id_for_allocation

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=timezone.utc)
PRICE = 2_500  # minor units per node-hour


def render(result: Any) -> dict[str, Any]:
    if isinstance(result, DomainError):
        return {"status": 409, "body": {"code": result.code, **result.details}}
    return {"status": 200, "body": result}


def ctx(at: datetime, key: bool = False) -> CommandContext:
    claim = IdempotencyClaim(scope=uuid4().hex, fingerprint="f") if key else None
    return CommandContext(actor_id=str(uuid4()), source="admin", actor_role="admin", now=at,
                          idempotency=claim)


@pytest.fixture
def world() -> tuple[Ledgercore, UUID, UUID]:
    app = Ledgercore(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    spec = {"vendor": "nv", "display_name": "n", "resource_class": "gpu_baremetal",
            "billing_unit": "node_hour", "scheduling_unit": "node",
            "resources": {"allowed_accelerator_counts": [8], "accelerator_count": 8},
            "unit_price": {"amount_minor": PRICE, "currency": "USD"}}
    app.execute(create_sku(ctx(T0), sku="bm", spec=spec, render=render))
    app.execute(set_sku_active(ctx(T0), sku="bm", active=True, render=render))
    node = app.execute(register_node(ctx(T0), online=True, render=lambda r: {
        "status": 201, "body": {"id": r["node"].node_id}}, identity={
        "host": "h1", "hostname": None, "port": 22, "ssh_username": "u", "sku": "bm",
        "gpus_total": 8, "region_code": "r", "onboarding_mode": "manual"})).response["body"]["id"]
    user = uuid4()
    launched = app.execute(submit_launch(
        ctx(T0, key=True), user_id=user, tenant_id=None, project_id=uuid4(), sku="bm",
        unit_count=1, region_code=None, scheduler_type="bare_metal", name=None,
        resource_class=None, render=render)).response
    assert launched["status"] == 200, launched
    return app, UUID(node), UUID(launched["body"]["allocation_ids"][0])


def step(app: Ledgercore, allocation: UUID, to: str, at: datetime) -> dict[str, Any]:
    return app.execute(lease_step(ctx(at), allocation_id=allocation, to=to, reason=None,
                                  render=render)).response


def test_a_lease_that_ran_an_hour_is_billed_an_hour_and_frees_everything(world: Any) -> None:
    app, node_id, allocation = world
    user = UUID(app.repository.get(allocation).lease["requested_by_user_id"])
    for to, at in (("provisioning", T0), ("active", T0 + timedelta(minutes=5)),
                   ("releasing", T0 + timedelta(minutes=65)),
                   ("released", T0 + timedelta(minutes=65))):
        assert step(app, allocation, to, at)["body"]["status"] == to
    node = app.repository.get(node_id)
    assert node.live_claims() == [] and node.baremetal_free()
    assert [c["status"] for c in node.claims_of(str(allocation))] == ["released"]
    record = app.repository.get(usage_id_for_allocation(allocation))
    assert record.end_time is not None and record.cost_minor == PRICE  # active for one hour
    assert app.repository.get(account_id_for(user)).balance("USD") == -PRICE
    assert app.repository.get(quota_id_for(user)).live == []
    assert app.repository.get(allocation).status == "released"


def test_a_lease_that_never_became_active_is_never_billed(world: Any) -> None:
    app, node_id, allocation = world
    assert step(app, allocation, "provisioning", T0)["status"] == 200
    assert step(app, allocation, "failed", T0 + timedelta(hours=3))["body"]["status"] == "failed"
    assert app.get_or_none(usage_id_for_allocation(allocation)) is None
    node = app.repository.get(node_id)
    assert [c["status"] for c in node.claims_of(str(allocation))] == ["failed"]
    assert app.repository.get(quota_id_for(
        app.repository.get(allocation).lease["requested_by_user_id"])).live == []


def test_guards_release_twice_released_is_final_and_reports_repeat_harmlessly(world: Any) -> None:
    app, _, allocation = world
    assert step(app, allocation, "provisioning", T0)["status"] == 200
    version = app.repository.get(allocation).version
    assert step(app, allocation, "provisioning", T0)["status"] == 200  # a repeated report
    assert app.repository.get(allocation).version == version
    early = step(app, allocation, "released", T0)  # not releasing yet
    assert early["body"]["reason"] == "invalid_allocation_transition"
    assert step(app, allocation, "releasing", T0)["status"] == 200
    again = step(app, allocation, "releasing", T0)
    assert again["body"]["code"] == "allocation_already_releasing"
    assert step(app, allocation, "released", T0)["status"] == 200
    final = step(app, allocation, "releasing", T0)
    assert final["body"]["code"] == "allocation_not_active"
