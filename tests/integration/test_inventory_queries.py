"""Inventory queries through HTTP on real Postgres, checked against the contract: node
lists and slots, SKU lists, limits and policy, the V3 compute catalog and quota
posture, and a rebuild of the inventory read model. Data is seeded with the domain
commands on the server's own stores; reads wait for it with ``X-Ledger-Position``."""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from api.auth import mint_token
from consumers.direct import catch_up
from consumers.rebuild import rebuild
from domain import admission, nodes, placement, skus
from domain.billing import adjust_balance
from domain.money import Money
from domain.commands import Command, Session
from domain.errors import DomainError
from domain.inventory import NodeInventory, node_slot_id
from domain.provenance import CommandContext, IdempotencyClaim
from infra.db import Stores
from projections import BY_NAME
from tests.contract.schemas import error_schema, errors_in
from tests.contract.test_contract import check
from tests.harness import bearer, client

NODES, ADMIN_NODES = "/api/v1/nodes", "/api/v1/admin/nodes"
SLOTS = "/api/v1/admin/nodes/{node_id}/resource-slots"
SKUS, ADMIN_SKUS = "/api/v1/skus", "/api/v1/admin/skus"
LIMITS, POLICY = "/api/v1/allocations/limits", "/api/v1/admin/allocations/limits/policy"
POLICY_V3 = "/api/v1/v3/platform/config/quotas/allocation-concurrency"
COMPUTE, COMPUTE_V3 = "/api/v1/compute", "/api/v1/v3/compute"
QUOTAS, QUOTAS_V3 = "/api/v1/access/quotas", "/api/v1/v3/access/quotas"
APPROVED = {"storage_ownership": "slice", "destructive_wipe_policy": "blkdiscard",
            "fabric_claim_mode": "per_slot_vf", "fabric_vf_pci_address": "0000:01:00.1"}


def render(result: Any) -> dict[str, Any]:
    if isinstance(result, DomainError):
        return {"status": 409,
                "body": {"code": getattr(result, "code", None), "message": str(result)}}
    node = result.get("node")
    return {"status": 200, "body": {"node_id": node.node_id}
            if isinstance(node, NodeInventory) else result}


@dataclass
class Env:
    url: str
    stores: Stores
    position: int = 0

    def run(self, command: Command) -> dict[str, Any]:
        outcome = self.stores.app.execute(command)
        assert outcome.response["status"] == 200, outcome.response
        self.position = max(self.position, outcome.position or 0)
        return outcome.response["body"]

    def do(self, factory: Callable[..., Command], **kwargs: Any) -> dict[str, Any]:
        """Run a domain command (``create_sku``, ``register_node``, …)."""
        return self.run(factory(admin_ctx(), render=render, **kwargs))

    def place(self, act: Callable[..., NodeInventory], **kwargs: Any) -> str:
        """Run a placement step (``reserve``, ``release``, …) as its own command."""
        def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
            node = act(session, ctx, **kwargs)
            return [node], {"node": node}
        return self.run(Command(admin_ctx(), decide, render))["node_id"]

    def get(self, http: httpx.Client, token: str, template: str, *, project: Any = None,
            **params: Any) -> httpx.Response:
        path = {k: v for k, v in params.items() if "{" + k + "}" in template}
        query = {k: v for k, v in params.items() if k not in path}
        headers = {**bearer(token), "X-Ledger-Position": str(self.position)}
        if project is not None:
            headers["X-Project-ID"] = str(project)
        response = http.get(template.format(**path), params=query, headers=headers)
        check("GET", template, response)
        return response


def admin_ctx() -> CommandContext:
    return CommandContext(actor_id=str(uuid.uuid4()), source="admin", actor_role="admin")


@pytest.fixture(scope="module")
def env(services: Any) -> Iterator[Env]:
    """A database of its own, so lists and counts see only what these tests wrote."""
    from tests.conftest import serve_own_database

    with serve_own_database(services) as served:
        yield Env(served.url, served.stores)


def spec(resource_class: str = "gpu_baremetal", display: str = "GPU node") -> dict[str, Any]:
    slice_ = resource_class == "gpu_slice"
    return {"vendor": "nvidia", "display_name": display, "resource_class": resource_class,
            "billing_unit": "gpu_hour" if slice_ else "node_hour",
            "scheduling_unit": "slice" if slice_ else "node",
            "resources": {"accelerator_count": 1 if slice_ else 8, "accelerator_model": "H100",
                          "vcpu_count": 32, "memory_mib": 65536,
                          "allowed_accelerator_counts": [1, 2] if slice_ else [8]},
            "unit_price": {"amount_minor": 300, "currency": "USD"}}


def make_sku(env: Env, name: str, *, active: bool = True, **kwargs: Any) -> str:
    env.do(skus.create_sku, sku=name, spec=spec(**kwargs))
    if active:
        env.do(skus.set_sku_active, sku=name, active=True)
    return name


def make_node(env: Env, sku: str, region: str, online: bool = True) -> str:
    host = f"10.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}"
    identity = {"host": host, "hostname": None, "port": 22, "ssh_username": "ubuntu", "sku": sku,
                "gpus_total": 8, "region_code": region, "onboarding_mode": "manual"}
    return env.do(nodes.register_node, identity=identity, online=online)["node_id"]


def slot(index: int, sku: str, status: str = "available", approved: bool = True) -> dict[str, Any]:
    meta = {**(APPROVED if approved else {}), "sku": sku}
    return {"slot_index": index, "status": status, "capacity_shape": "gpu_slice",
            "gpu_index": index, "numa_node": 0, "capacity_metadata": meta}


def ids(response: httpx.Response) -> list[str]:
    return [item["id"] for item in response.json()["items"]]


def tag() -> str:
    return uuid.uuid4().hex[:8]


def test_node_lists_filter_paginate_and_need_the_right_capability(env: Env, tokens: Any) -> None:
    region, sku = f"r-{tag()}", make_sku(env, f"bm-{tag()}")
    up, down, cordoned, drained, retired, removed = (
        make_node(env, sku, region, online=n != 1) for n in range(6))
    env.do(nodes.cordon, node_id=uuid.UUID(cordoned))
    env.do(nodes.drain, node_id=uuid.UUID(drained))  # no claims: the drain completes (cordoned)
    env.do(nodes.retire, node_id=uuid.UUID(retired))
    env.do(nodes.retire, node_id=uuid.UUID(removed))
    env.do(nodes.tombstone, node_id=uuid.UUID(removed), how="removed")
    user, admin = tokens.user(uuid.uuid4()), tokens.admin()
    listed = sorted([up, down, cordoned, drained, retired])
    with client(env.url) as http:
        every = env.get(http, user, NODES, region_code=region)
        assert every.status_code == 200 and ids(every) == listed  # removed nodes never list
        assert every.headers["X-Read-Model-Cache"] in ("miss", "bypass")
        by_id = {item["id"]: item for item in every.json()["items"]}
        assert by_id[up]["status"] == "active" and by_id[up]["readiness"]["state"] == "ready"
        assert by_id[down]["status"] == "offline" and by_id[retired]["status"] == "retired"
        assert "host" not in by_id[up]
        for status, expected in (("online", [up]), ("offline", [down]),
                                 ("maintenance", sorted([cordoned, drained]))):
            assert ids(env.get(http, user, NODES, region_code=region, status=status)) == expected
        assert ids(env.get(http, user, NODES, region_code=f"r-{tag()}")) == []

        for status, expected in (("active", sorted([up, down])), ("retired", [retired]),
                                 ("maintenance", sorted([cordoned, drained])), ("removing", [])):
            found = env.get(http, admin, ADMIN_NODES, region_code=region, status=status)
            assert ids(found) == expected
        admin_view = env.get(http, admin, ADMIN_NODES, region_code=region)
        assert ids(admin_view) == listed and all("host" in i for i in admin_view.json()["items"])

        first = env.get(http, user, NODES, region_code=region, page_size=2)
        cursor = first.json()["pagination"]["next_cursor"]
        assert first.json()["pagination"] == {"next_cursor": cursor, "page_size": 2} and cursor
        second = env.get(http, user, NODES, region_code=region, page_size=2, cursor=cursor)
        third = env.get(http, user, NODES, region_code=region, page_size=2,
                        cursor=second.json()["pagination"]["next_cursor"])
        assert ids(first) + ids(second) + ids(third) == listed
        assert third.json()["pagination"]["next_cursor"] is None
        elsewhere = env.get(http, user, NODES, region_code=region, status="online", cursor=cursor)
        assert elsewhere.status_code == 400
        assert elsewhere.json()["details"]["reason"] == "cursor_mismatch"
        for bad in ({"page_size": 0}, {"page_size": 201}, {"status": "active"}):
            refused = env.get(http, user, NODES, **bad)
            assert refused.status_code == 400 and refused.json()["code"] == "validation_error"
        assert env.get(http, admin, ADMIN_NODES, status="offline").status_code == 400

        ops = mint_token(tokens.secret, user_id=uuid.uuid4(), platform_roles=["platform_ops"])
        for token in (user, ops):
            denied = env.get(http, token, ADMIN_NODES)
            assert denied.status_code == 403 and denied.json()["code"] == "admin_required"
        assert http.get(NODES).status_code == 401


def test_resource_slots_list_by_index_and_unknown_or_removed_nodes_are_404(
        env: Env, tokens: Any) -> None:
    region, sku = f"r-{tag()}", make_sku(env, f"host-{tag()}")
    node, gone = make_node(env, sku, region), make_node(env, sku, region)
    env.do(nodes.upsert_slots, node_id=uuid.UUID(node),
           slots=[slot(2, "sl"), slot(0, "sl"), slot(1, "sl", "disabled", approved=False)])
    env.do(nodes.retire, node_id=uuid.UUID(gone))
    env.do(nodes.tombstone, node_id=uuid.UUID(gone), how="detached")
    admin = tokens.admin()
    with client(env.url) as http:
        listed = env.get(http, admin, SLOTS, node_id=node)
        assert listed.status_code == 200
        items = listed.json()["items"]
        assert [s["slot_index"] for s in items] == [0, 1, 2]
        assert [s["id"] for s in items] == [node_slot_id(node, i) for i in range(3)]
        assert [s["status"] for s in items] == ["available", "disabled", "available"]
        assert items[0]["capacity_metadata"] == {**APPROVED, "sku": "sl"}
        empty = env.get(http, admin, SLOTS, node_id=make_node(env, sku, region))
        assert empty.status_code == 200 and empty.json() == {"items": []}
        for missing in (gone, str(uuid.uuid4())):
            answer = env.get(http, admin, SLOTS, node_id=missing)
            assert answer.status_code == 404 and answer.json()["code"] == "node_not_found"
        assert env.get(http, admin, SLOTS, node_id="not-a-uuid").status_code == 400
        denied = env.get(http, tokens.user(uuid.uuid4()), SLOTS, node_id=node)
        assert denied.status_code == 403 and denied.json()["code"] == "admin_required"


def all_pages(env: Env, http: httpx.Client, token: str, template: str, **params: Any
              ) -> list[dict[str, Any]]:
    items, cursor = [], None
    while True:
        page = env.get(http, token, template, page_size=1, **params,
                       **({"cursor": cursor} if cursor else {}))
        assert page.status_code == 200
        items += page.json()["items"]
        cursor = page.json()["pagination"]["next_cursor"]
        if cursor is None:
            return items


def test_sku_lists_public_shows_active_only_admin_shows_all(env: Env, tokens: Any) -> None:
    prefix = f"s{tag()}"
    active = make_sku(env, f"{prefix}-a", display="A node")
    slice_ = make_sku(env, f"{prefix}-b", resource_class="gpu_slice")
    never = make_sku(env, f"{prefix}-c", active=False)
    paused = make_sku(env, f"{prefix}-d")
    env.do(skus.set_sku_active, sku=paused, active=False)
    admin, user = tokens.admin(), tokens.user(uuid.uuid4())
    with client(env.url) as http:
        public = [s for s in all_pages(env, http, user, SKUS) if s["sku"].startswith(prefix)]
        assert [s["sku"] for s in public] == [active, slice_]
        assert public[0] == {"sku": active, "vendor": "nvidia", "name": "A node",
                             **{k: v for k, v in spec().items()
                                if k not in ("vendor", "display_name")}}
        every = [s for s in all_pages(env, http, admin, ADMIN_SKUS) if s["sku"].startswith(prefix)]
        assert [(s["sku"], s["active"]) for s in every] == [
            (active, True), (slice_, True), (never, False), (paused, False)]
        assert every[0]["family_id"] == active and every[0]["family_version"] == "1"
        denied = env.get(http, user, ADMIN_SKUS)
        assert denied.status_code == 403 and denied.json()["code"] == "admin_required"
        assert env.get(http, user, SKUS, cursor="garbage").status_code == 400


def limits(env: Env, http: httpx.Client, token: str, project: uuid.UUID) -> dict[str, Any]:
    answer = env.get(http, token, LIMITS, project=project)
    assert answer.status_code == 200
    body = answer.json()
    assert body["available_allocation_slots"] == max(
        0, body["max_concurrent_allocations"] - body["current_concurrent_allocations"])
    quota = env.get(http, token, QUOTAS, project=project)
    twin = env.get(http, token, QUOTAS_V3, project=project)
    assert quota.status_code == twin.status_code == 200
    assert quota.json()["meta"]["cache"] == quota.headers["X-Read-Model-Cache"]
    assert {**quota.json(), "meta": None} == {**twin.json(), "meta": None}
    assert quota.json()["limits"] == body and quota.json()["project_id"] == str(project)
    headroom, cap = body["available_allocation_slots"], body["max_concurrent_allocations"]
    expected = ("blocked" if headroom == 0 else
                "near_limit" if headroom <= max(1, math.ceil(cap / 5)) else "ok")
    assert quota.json()["posture"] == expected
    assert bool(quota.json()["signals"]) == (expected != "ok")
    return body


def test_limits_count_live_allocations_against_the_policy(env: Env, tokens: Any) -> None:
    region = f"r-{tag()}"
    bm, sl = make_sku(env, f"bm-{tag()}"), make_sku(env, f"sl-{tag()}", resource_class="gpu_slice")
    for _ in range(2):
        make_node(env, bm, region)
    host = make_node(env, make_sku(env, f"host-{tag()}", active=False), region)
    env.do(nodes.upsert_slots, node_id=uuid.UUID(host), slots=[slot(i, sl) for i in range(4)])
    user, project = uuid.uuid4(), uuid.uuid4()
    token = tokens.user(user, project_ids=[str(project)])
    admin = tokens.admin()
    with client(env.url) as http:
        policy = env.get(http, admin, POLICY)
        assert policy.status_code == 200 and policy.json()["value"] == 5
        assert policy.json()["effective_at"] == "1970-01-01T00:00:00Z"  # never set: the default
        assert limits(env, http, token, project) == {
            "max_concurrent_allocations": 5, "current_concurrent_allocations": 0,
            "available_allocation_slots": 5}

        def launch(who: uuid.UUID, sku: str, units: int) -> None:
            env.run(adjust_balance(CommandContext(actor_id=str(who)), user_id=who,
                                   direction="credit", amount=Money(10_000, "USD"),
                                   reason="funds", render=render))
            env.run(admission.submit_launch(
                CommandContext(actor_id=str(who), idempotency=IdempotencyClaim(
                    scope=uuid.uuid4().hex, fingerprint="f")),
                user_id=who, tenant_id=None, project_id=project, sku=sku, unit_count=units,
                request={"region_code": region}, render=render))

        launch(user, bm, 1)
        launch(user, sl, 2)  # one lease of two slice GPUs
        launch(uuid.uuid4(), bm, 1)  # someone else's
        assert limits(env, http, token, project)["current_concurrent_allocations"] == 2

        env.do(skus.set_concurrency_policy, value=2, reason="tight")
        assert limits(env, http, token, project)["available_allocation_slots"] == 0  # blocked
        env.do(skus.set_concurrency_policy, value=3, reason=None)
        assert limits(env, http, token, project) == {  # near_limit
            "max_concurrent_allocations": 3, "current_concurrent_allocations": 2,
            "available_allocation_slots": 1}
        env.do(skus.set_concurrency_policy, value=10, reason=None)
        assert limits(env, http, token, project)["available_allocation_slots"] == 8  # ok

        current = env.get(http, admin, POLICY).json()
        assert current["value"] == 10 and current["reason"] is None
        assert current["created_by_user_id"] is not None
        assert env.get(http, admin, POLICY_V3).json() == current
        for template in (POLICY, POLICY_V3):
            denied = env.get(http, token, template)
            assert denied.status_code == 403 and denied.json()["code"] == "admin_required"
        for template in (LIMITS, QUOTAS):
            assert env.get(http, token, template).status_code == 400  # no X-Project-ID
            assert env.get(http, token, template, project="nope").status_code == 400
        outsider = http.get(LIMITS, headers={**bearer(token), "X-Project-ID": str(uuid.uuid4())})
        # getAllocationLimits declares no 403, but a project the caller is not in is refused
        assert outsider.status_code == 403 and not errors_in(outsider.json(), error_schema())
        assert env.get(http, token, QUOTAS, project=uuid.uuid4()).status_code == 403


def catalog(env: Env, http: httpx.Client, token: str, project: uuid.UUID, **params: Any
            ) -> dict[str, Any]:
    answer = env.get(http, token, COMPUTE, project=project, **params)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["meta"]["cache"] == answer.headers["X-Read-Model-Cache"]
    assert body["images"] == []
    for item in body["items"]:
        assert item["available_units"] == item["ready_units"] and item["on_demand_units"] == 0
        assert (item["availability_state"] == "unavailable") == (item["available_units"] == 0)
        basis = "none" if item["available_units"] == 0 else "ready_worker"
        assert item["capacity_basis"] == basis
    counts = body["counts"]
    assert counts["total"] == sum(v for k, v in counts.items() if k not in ("total", "available"))
    return body


def units(body: dict[str, Any]) -> dict[str, tuple[int, str]]:
    return {i["sku"]: (i["available_units"], i["availability_state"]) for i in body["items"]}


def test_compute_catalog_counts_free_units_as_claims_come_and_go(env: Env, tokens: Any) -> None:
    region, word = f"r-{tag()}", tag()
    bm = make_sku(env, f"{word}-bm", display=f"{word} baremetal")
    sl = make_sku(env, f"{word}-sl", resource_class="gpu_slice")
    host_sku = make_sku(env, f"{word}-host", active=False)  # inactive: never in the catalog
    bm_nodes = [make_node(env, bm, region) for _ in range(4)]
    make_node(env, bm, region, online=False)  # offline: no units
    host = make_node(env, host_sku, region)
    env.do(nodes.upsert_slots, node_id=uuid.UUID(host), slots=[
        slot(0, sl), slot(1, sl), slot(2, sl), slot(3, sl, "disabled", approved=False),
        slot(4, "another-sku")])
    user, project = uuid.uuid4(), uuid.uuid4()
    token = tokens.user(user, project_ids=[str(project)])

    def reserve(sku: str, count: int = 1) -> tuple[uuid.UUID, str]:
        allocation = uuid.uuid4()
        return allocation, env.place(placement.reserve, allocation_id=allocation, user_id=user,
                                     project_id=project, sku=sku, count=count, region_code=region)

    with client(env.url) as http:
        body = catalog(env, http, token, project, search=word, region_code=region)
        assert units(body) == {bm: (4, "available"), sl: (3, "available")}
        assert body["counts"] == {"total": 2, "gpu_baremetal": 1, "gpu_slice": 1, "cpu_vm": 0,
                                  "cpu_baremetal": 0, "control_plane": 0, "available": 2}
        item = body["items"][0]
        assert item["display_name"] == f"{word} baremetal" and item["family_id"] == bm
        assert item["resources"]["accelerator"] == {"vendor": "nvidia", "model": "H100", "count": 8,
                                                    "memory_mib": None, "partition_profile": None}
        assert item["resources"]["cpu"] == {"vcpu_count": 32, "architecture": None}

        env.do(nodes.cordon, node_id=uuid.UUID(bm_nodes[0]))  # cordoned: no units
        first, on = reserve(bm)
        reserve(sl, count=2)
        body = catalog(env, http, token, project, search=word, region_code=region)
        assert units(body) == {bm: (2, "limited"), sl: (1, "limited")}
        reserve(bm)
        slices, slice_node = reserve(sl)
        body = catalog(env, http, token, project, search=word, region_code=region)
        assert units(body) == {bm: (1, "limited"), sl: (0, "unavailable")}
        assert body["counts"]["available"] == 1

        env.place(placement.release, node_id=on, allocation_id=first)  # a whole node is free again
        env.place(placement.release, node_id=slice_node, allocation_id=slices)
        assert units(catalog(env, http, token, project, search=word, region_code=region)) == {
            bm: (2, "limited"), sl: (0, "unavailable")}  # the released slot is in cleanup
        env.place(placement.record_slot_cleanup, node_id=slice_node,
                  slot_id=node_slot_id(slice_node, 2), succeeded=True)
        env.do(nodes.resume_scheduling, node_id=uuid.UUID(bm_nodes[0]))
        assert units(catalog(env, http, token, project, search=word, region_code=region)) == {
            bm: (3, "available"), sl: (1, "limited")}

        only_slices = catalog(env, http, token, project, search=word, resource_class="gpu_slice")
        assert [i["sku"] for i in only_slices["items"]] == [sl]
        assert only_slices["counts"]["total"] == only_slices["counts"]["gpu_slice"] == 1
        far = catalog(env, http, token, project, search=word, region_code=f"r-{tag()}")
        assert units(far) == {bm: (0, "unavailable"), sl: (0, "unavailable")}
        assert far["counts"]["available"] == 0 and far["items"][0]["capacity_basis"] == "none"

        page = catalog(env, http, token, project, search=word, region_code=region, page_size=1)
        assert [i["sku"] for i in page["items"]] == [bm] and page["counts"]["total"] == 2
        rest = catalog(env, http, token, project, search=word, region_code=region, page_size=1,
                       cursor=page["pagination"]["next_cursor"])
        assert [i["sku"] for i in rest["items"]] == [sl]
        assert rest["pagination"]["next_cursor"] is None

        again = env.get(http, token, COMPUTE, project=project, search=word, region_code=region)
        assert again.headers["X-Read-Model-Cache"] == "hit" == again.json()["meta"]["cache"]
        twin = env.get(http, token, COMPUTE_V3, project=project, search=word, region_code=region)
        assert twin.status_code == 200 and twin.json()["items"] == again.json()["items"]
        for bad in ({"search": "x" * 121}, {"resource_class": "quantum"}, {"page_size": 0}):
            refused = env.get(http, token, COMPUTE, project=project, **bad)
            assert refused.status_code == 400 and refused.json()["code"] == "validation_error"
        assert env.get(http, token, COMPUTE).status_code == 400
        assert env.get(http, token, COMPUTE, project=uuid.uuid4()).status_code == 403


def snapshot(stores: Stores) -> dict[str, list[Any]]:
    with stores.query_pool.connection() as conn:
        return {table: conn.execute(f"SELECT * FROM readmodels.{table} ORDER BY 1, 2, 3").fetchall()
                for table in BY_NAME["inventory"].tables}


def test_a_rebuild_reproduces_the_inventory_read_model(env: Env, tokens: Any) -> None:
    region, sku = f"r-{tag()}", make_sku(env, f"bm-{tag()}")
    node = make_node(env, sku, region)
    env.place(placement.reserve, allocation_id=uuid.uuid4(), user_id=uuid.uuid4(),
              project_id=uuid.uuid4(), sku=sku, region_code=region)
    env.do(nodes.observe_liveness, node_id=uuid.UUID(node), online=False, source="test")
    env.do(skus.set_concurrency_policy, value=10, reason="rebuild")
    stores = env.stores
    catch_up(stores.app, stores.read_models)
    before = snapshot(stores)
    assert before["inventory_nodes"] and before["inventory_claims"] and before["inventory_skus"]
    assert before["inventory_capacity"] and before["allocation_policy"]
    with stores.query_pool.connection() as conn:  # damage the read model
        conn.execute("DELETE FROM readmodels.inventory_claims")
        conn.execute("UPDATE readmodels.inventory_nodes SET status = 'retired'")
        conn.execute("DELETE FROM readmodels.inventory_capacity WHERE units = 1")
    count = rebuild(stores.app, stores.read_models, BY_NAME["inventory"], batch_size=7)
    assert count == stores.app.recorder.max_notification_id()
    assert snapshot(stores) == before
    assert catch_up(stores.app, stores.read_models) == stores.app.recorder.max_notification_id()
    assert snapshot(stores) == before
