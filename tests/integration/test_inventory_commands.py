"""Inventory commands through HTTP on real Postgres, checked against the contract:
SKUs, nodes, slots, schedulability, removal safety, and clients racing for the last
units of a SKU (on one server and across two servers sharing the event store)."""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from psycopg.sql import SQL, Identifier

from api.app import create_app
from api.auth import mint_token
from infra.db import Stores
from tests.contract.test_contract import check
from tests.harness import ServerThread, bearer, client

NODES = "/api/v1/admin/nodes"
NODE = "/api/v1/admin/nodes/{node_id}"
SLOTS = "/api/v1/admin/nodes/{node_id}/resource-slots"
LIFECYCLE = "/api/v1/platform/lifecycle/nodes/{node_id}/{action}"
SKUS = "/api/v1/admin/skus"
LAUNCH = "/api/v1/launch/compute"
APPROVED = {"storage_ownership": "slice", "destructive_wipe_policy": "blkdiscard",
            "fabric_claim_mode": "per_slot_vf", "fabric_vf_pci_address": "0000:01:00.1"}


@pytest.fixture(scope="module")
def env(shared_database: Any, services: Any) -> Iterator[tuple[str, Stores]]:
    from tests.conftest import make_settings

    settings = make_settings(services, shared_database.dsn)
    stores = Stores.open(settings)
    try:
        with ServerThread(create_app(settings, stores)) as server:
            yield server.url, stores
    finally:
        stores.close()


def appended(stores: Stores) -> int:
    """Domain events in the store. A refusal under an Idempotency-Key stores only its
    idempotency record (so a retry answers the same), never a domain event."""
    recorder = stores.app.recorder
    with stores.query_pool.connection() as conn:
        row = conn.execute(SQL("SELECT count(*) AS n FROM {0}.{1} WHERE topic NOT LIKE %s").format(
            Identifier(recorder.datastore.schema), Identifier(recorder.events_table_name)),
            ("ledgercore.Idempotency%",)).fetchone()
    return row["n"] if isinstance(row, dict) else row[0]


def call(http: httpx.Client, token: str, method: str, template: str, *, key: bool = True,
         json: Any = None, headers: dict[str, str] | None = None, **params: Any) -> httpx.Response:
    extra = {"Idempotency-Key": uuid.uuid4().hex} if key else {}
    response = http.request(method, template.format(**params), json=json,
                            headers={**bearer(token), **extra, **(headers or {})})
    check(method, template.replace("{action}", params.get("action", "{action}")), response)
    return response


def baremetal_sku(name: str) -> dict[str, Any]:
    return {"sku": name, "vendor": "nvidia", "display_name": f"{name} node",
            "resource_class": "gpu_baremetal", "billing_unit": "node_hour", "scheduling_unit": "node",
            "resources": {"accelerator_count": 8, "allowed_accelerator_counts": [8]},
            "unit_price": {"amount_minor": 2500, "currency": "USD"}}


def make_sku(http: httpx.Client, admin: str, body: dict[str, Any]) -> None:
    assert call(http, admin, "POST", SKUS, json=body).status_code == 201
    assert call(http, admin, "POST", SKUS + "/{sku}/activate", sku=body["sku"]).json()["active"]


def make_node(http: httpx.Client, admin: str, sku: str, **extra: Any) -> dict[str, Any]:
    body = {"host": f"10.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}",
            "sku": sku, "gpus_total": 8, "region_code": "eu-1", "probe": False, **extra}
    response = call(http, admin, "POST", NODES, json=body)
    assert response.status_code == 201, response.text
    return response.json()


def test_sku_lifecycle_and_bad_input_append_nothing(env: tuple[str, Stores], tokens: Any) -> None:
    url, stores = env
    admin, name = tokens.admin(), f"h100-{uuid.uuid4().hex[:6]}"
    with client(url) as http:
        created = call(http, admin, "POST", SKUS, json=baremetal_sku(name))
        assert created.status_code == 201 and created.json()["active"] is False  # new SKUs start inactive
        before = appended(stores)
        again = call(http, admin, "POST", SKUS, json=baremetal_sku(name))
        assert again.status_code == 409 and again.json()["details"]["reason"] == "sku_already_exists"
        for bad in ({**baremetal_sku("x"), "unit_price": {"amount_minor": 1.5, "currency": "USD"}},
                    {**baremetal_sku("y"), "unit_price": {"amount_minor": 10, "currency": "ZZZ"}},
                    {**baremetal_sku("z"), "scheduling_unit": "slice"},
                    {**baremetal_sku("w"), "resources": {"allowed_accelerator_counts": [0]}}):
            assert call(http, admin, "POST", SKUS, json=bad).status_code == 400
        missing = call(http, admin, "POST", SKUS + "/{sku}/activate", sku="no-such-sku")
        assert missing.status_code == 404 and missing.json()["code"] == "sku_not_found"
        assert appended(stores) == before
        twin = call(http, admin, "POST", "/api/v1/v3/platform/config/skus/{sku}/activate", sku=name)
        assert twin.status_code == 200 and twin.json()["active"] is True
        update = {k: v for k, v in baremetal_sku(name).items() if k != "sku"}
        patched = call(http, admin, "PATCH", SKUS + "/{sku}", sku=name,
                       json={**update, "display_name": "renamed"})
        assert patched.status_code == 200 and patched.json()["display_name"] == "renamed"
        user = mint_token(tokens.secret, user_id=uuid.uuid4())
        forbidden = call(http, user, "POST", SKUS + "/{sku}/deactivate", sku=name)
        assert forbidden.status_code == 403 and forbidden.json()["code"] == "admin_required"


def test_node_lifecycle_slots_and_removal_safety(env: tuple[str, Stores], tokens: Any) -> None:
    url, stores = env
    admin, sku = tokens.admin(), f"bm-{uuid.uuid4().hex[:6]}"
    listener = socket.create_server(("127.0.0.1", 0))
    closed = socket.create_server(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    with client(url) as http:
        make_sku(http, admin, baremetal_sku(sku))
        unknown = call(http, admin, "POST", NODES, json={"host": "10.9.9.9", "sku": "nope", "gpus_total": 8})
        assert unknown.status_code == 400 and unknown.json()["code"] == "sku_not_found"
        # the create-time probe is a real TCP check of the SSH port
        reachable = make_node(http, admin, sku, host="127.0.0.1", port=listener.getsockname()[1],
                              probe=True)
        assert reachable["status"] == "active" and reachable["in_use"] is False
        unreachable = make_node(http, admin, sku, host="localhost", port=closed_port, probe=True)
        assert unreachable["status"] == "offline"
        taken = call(http, admin, "POST", NODES, json={"host": "127.0.0.1", "sku": sku, "gpus_total": 8,
                                                       "probe": False})
        assert taken.status_code == 409 and taken.json()["code"] == "node_already_exists"

        node_id = reachable["id"]
        slots = [{"slot_index": i, "status": "available", "capacity_shape": "gpu_slice", "gpu_index": i,
                  "capacity_metadata": {**APPROVED, "sku": "slice-x"}} for i in range(2)]
        written = call(http, admin, "PUT", SLOTS, node_id=node_id, json={"slots": slots})
        assert written.status_code == 200
        assert [s["slot_index"] for s in written.json()["items"]] == [0, 1]
        before = appended(stores)
        for bad, reason in (
                ([slots[0], slots[0]], "duplicate_slot_index"),
                ([{**slots[0], "capacity_metadata": {"sku": "slice-x"}}], "slot_not_approved"),
                ([{**slots[0], "status": "active"}], "slot_status_system_owned"),
                ([{**slots[0], "max_claims": 2}], "slot_sharing_refused")):
            refused = call(http, admin, "PUT", SLOTS, node_id=node_id, json={"slots": bad})
            assert refused.status_code == 400 and refused.json()["details"]["reason"] == reason
        too_many = [{"slot_index": i, "status": "disabled", "capacity_shape": "gpu_slice"} for i in range(65)]
        assert call(http, admin, "PUT", SLOTS, node_id=node_id, json={"slots": too_many}).status_code == 400
        ghost = call(http, admin, "PUT", SLOTS, node_id=uuid.uuid4(), json={"slots": slots})
        assert ghost.status_code == 404 and ghost.json()["code"] == "node_not_found"
        assert appended(stores) == before

        no_key = call(http, admin, "POST", LIFECYCLE, node_id=node_id, action="cordon", key=False)
        assert no_key.status_code == 400
        cordoned = call(http, admin, "POST", LIFECYCLE, node_id=node_id, action="cordon").json()
        assert (cordoned["previous_status"], cordoned["status"]) == ("active", "cordoned")
        again = call(http, admin, "POST", LIFECYCLE, node_id=node_id, action="cordon").json()
        assert again["previous_status"] == "cordoned"  # a repeat is a no-op
        resumed = call(http, admin, "POST", LIFECYCLE, node_id=node_id, action="resume-scheduling")
        assert resumed.json()["status"] == "active"
        drained = call(http, admin, "POST", LIFECYCLE, node_id=node_id, action="drain")
        assert drained.status_code == 202 and drained.json()["task_type"] == "node.drain"
        assert drained.json()["status"] == "cordoned"  # nothing to wait for: the drain is done
        bad_state = call(http, admin, "POST", NODE + "/reactivate", node_id=node_id)
        assert bad_state.status_code == 409 and bad_state.json()["details"]["reason"] == "invalid_node_state"

        assert call(http, admin, "DELETE", NODE, node_id=node_id).status_code == 204
        back = call(http, admin, "POST", NODE + "/reactivate", node_id=node_id).json()
        assert back == {"ok": True, "status": "offline"}
        probed = call(http, admin, "POST", NODE + "/probe", node_id=node_id).json()
        assert probed == {"ok": True, "status": "active"}
        assert call(http, admin, "DELETE", NODE, node_id=node_id).status_code == 204
        assert call(http, admin, "DELETE", NODE + "/remove", node_id=node_id).status_code == 204
        gone = call(http, admin, "DELETE", NODE + "/detach", node_id=node_id)
        assert gone.status_code == 404
        # the host is free again once its node is removed
        assert make_node(http, admin, sku, host="127.0.0.1")["status"] == "active"
    listener.close()


def fund(http: httpx.Client, admin: str, user: uuid.UUID) -> httpx.Response:
    """Launches need a positive balance."""
    response = http.post(f"/api/v1/admin/users/{user}/balance", headers=bearer(admin), json={
        "direction": "credit", "amount_minor": 100_000, "currency": "USD", "reason": "funds"})
    assert response.status_code == 200, response.text
    return response


def launch(http: httpx.Client, token: str, project: uuid.UUID, body: dict[str, Any]) -> httpx.Response:
    response = http.post(LAUNCH, json=body, headers={**bearer(token), "X-Project-ID": str(project),
                                                     "Idempotency-Key": uuid.uuid4().hex})
    check("POST", LAUNCH, response)
    return response


def test_a_node_with_a_live_claim_cannot_leave_and_a_cordoned_node_gets_no_claim(
        env: tuple[str, Stores], tokens: Any) -> None:
    url, stores = env
    admin, sku = tokens.admin(), f"bm-{uuid.uuid4().hex[:6]}"
    user, project = uuid.uuid4(), uuid.uuid4()
    caller = mint_token(tokens.secret, user_id=user, project_ids=[str(project)])
    with client(url) as http:
        fund(http, admin, user)
        make_sku(http, admin, baremetal_sku(sku))
        held, spare = make_node(http, admin, sku), make_node(http, admin, sku)
        call(http, admin, "POST", LIFECYCLE, node_id=spare["id"], action="cordon")
        won = launch(http, caller, project, {"sku": sku})
        assert won.status_code == 202
        lost = launch(http, caller, project, {"sku": sku})  # the only other node is cordoned
        assert lost.status_code == 409 and lost.json()["code"] == "sku_unavailable"
        before = appended(stores)
        for action in ("", "/remove", "/detach", "/force-detach"):
            refused = call(http, admin, "DELETE", NODE + action, node_id=held["id"])
            assert refused.status_code == 409, (action, refused.text)
        assert call(http, admin, "DELETE", NODE, node_id=held["id"]).json()["code"] == "node_in_use"
        drain = call(http, admin, "POST", LIFECYCLE, node_id=held["id"], action="drain").json()
        assert drain["status"] == "draining"  # waits for the live claim
        repeat = call(http, admin, "POST", LIFECYCLE, node_id=held["id"], action="drain").json()
        assert repeat["task_id"] == drain["task_id"] and repeat["recovery_action"] == "task_in_progress"
        assert appended(stores) == before + 1
        node = stores.app.get_or_none(uuid.UUID(held["id"]))
        assert [c["status"] for c in node.live_claims()] == ["reserved"]  # drain kept the claim
        for bad in ({"sku": "no-such-sku"}, {"sku": sku, "unit_count": 0}, {"sku": sku, "unit_count": "2"},
                    {"sku": sku, "resource_class": "gpu_slice"}):
            assert launch(http, caller, project, bad).status_code == 400, bad
        assert appended(stores) == before + 1


def race(urls: list[str], tokens: Any, sku: str, clients: int) -> list[httpx.Response]:
    """``clients`` callers, each its own user and project, released at once."""
    barrier = threading.Barrier(clients)
    results: list[httpx.Response | None] = [None] * clients

    def one(i: int) -> None:
        user, project = uuid.uuid4(), uuid.uuid4()
        token = mint_token(tokens.secret, user_id=user, project_ids=[str(project)])
        with client(urls[i % len(urls)]) as http:
            fund(http, tokens.admin(), user)
            barrier.wait()
            results[i] = http.post(LAUNCH, json={"sku": sku},
                                   headers={**bearer(token), "X-Project-ID": str(project),
                                            "Idempotency-Key": uuid.uuid4().hex})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return [r for r in results if r is not None]


def assert_exactly(stores: Stores, responses: list[httpx.Response], free: int, nodes: list[str],
                   clients: int, held: str) -> None:
    assert len(responses) == clients
    won = [r for r in responses if r.status_code == 202]
    lost = [r for r in responses if r.status_code != 202]
    assert len(won) == free, [r.text for r in lost]
    assert {r.status_code for r in lost} == {409}
    assert {r.json()["code"] for r in lost} == {"sku_unavailable"}
    for response in responses:
        check("POST", LAUNCH, response)
    holders = []
    for node_id in nodes:
        live = stores.app.get_or_none(uuid.UUID(node_id)).live_claims()
        assert len(live) <= 1
        holders += [c["allocation_id"] for c in live]
    assert sorted(holders) == sorted([held] + [r.json()["workload_id"] for r in won])


@pytest.mark.parametrize("servers", [1, 2])
def test_racing_clients_get_exactly_the_free_units(env: tuple[str, Stores], tokens: Any,
                                                   services: Any, shared_database: Any,
                                                   servers: int) -> None:
    """16 clients race for 5 free nodes of a SKU (one more node is already held): exactly
    5 win. With two servers, each with its own writer, the races are decided by the
    event store's version check."""
    from tests.conftest import make_settings

    url, stores = env
    admin, sku, clients = tokens.admin(), f"race-{uuid.uuid4().hex[:6]}", 16
    with client(url) as http:
        make_sku(http, admin, baremetal_sku(sku))
        nodes = [make_node(http, admin, sku)["id"] for _ in range(6)]
        owner, project = uuid.uuid4(), uuid.uuid4()
        fund(http, admin, owner)
        held = launch(http, mint_token(tokens.secret, user_id=owner, project_ids=[str(project)]),
                      project, {"sku": sku})
        assert held.status_code == 202
    urls = [url]
    if servers == 2:
        settings = make_settings(services, shared_database.dsn, run_projector=False)
        other = Stores.open(settings)
        try:
            with ServerThread(create_app(settings, other)) as second:
                responses = race([url, second.url], tokens, sku, clients)
        finally:
            other.close()
    else:
        responses = race(urls, tokens, sku, clients)
    assert_exactly(stores, responses, 5, nodes, clients, held.json()["workload_id"])
    # and the read models agree once they have caught up with the last admission
    position = str(max(int(r.headers.get("X-Ledger-Position", 0)) for r in responses))
    project = uuid.uuid4()
    reader = mint_token(tokens.secret, user_id=uuid.uuid4(), project_ids=[str(project)])
    with client(url) as http:
        catalog = http.get("/api/v1/compute", params={"search": sku}, headers={
            **bearer(reader), "X-Project-ID": str(project), "X-Ledger-Position": position})
        check("GET", "/api/v1/compute", catalog)
        assert catalog.headers["X-Read-Model-Cache"] != "stale"
        [row] = catalog.json()["items"]
        assert (row["available_units"], row["availability_state"]) == (0, "unavailable")
        listed, cursor = {}, None
        while True:
            page = http.get(NODES, params={"page_size": 200, **({"cursor": cursor} if cursor else {})},
                            headers={**bearer(admin), "X-Ledger-Position": position}).json()
            listed |= {n["id"]: n for n in page["items"]}
            cursor = page["pagination"]["next_cursor"]
            if cursor is None:
                break
        assert all(listed[n]["in_use"] for n in nodes)
        holders = {listed[n]["current_allocation"]["allocation_id"] for n in nodes}
        assert holders == {held.json()["workload_id"]} | {r.json()["workload_id"] for r in responses
                                                          if r.status_code == 202}


def legacy_lease(stores: Stores, node_id: str, sku: str) -> uuid.UUID:
    """A baremetal lease recorded without its claim (as leases from before claims were)."""
    from datetime import datetime, timezone

    from domain.allocations import Allocation

    allocation_id = uuid.uuid4()
    lease = {"requested_by_user_id": str(uuid.uuid4()), "project_id": str(uuid.uuid4()),
             "org_id": None, "sku": sku, "node_id": node_id, "capacity_shape": "baremetal",
             "gpus_total": 8, "scheduler_type": "bare_metal", "name": None, "claim_ids": [],
             "created_at": "2026-01-01T00:00:00Z"}
    stores.app.save(Allocation._create(Allocation.Created, id=allocation_id, lease=lease,
                                       provenance={"source": "import"},
                                       timestamp=datetime.now(timezone.utc)))
    return allocation_id


def test_backfill_inserts_missing_claims_once_and_skips_held_nodes(env: tuple[str, Stores],
                                                                   tokens: Any) -> None:
    url, stores = env
    admin, sku = tokens.admin(), f"bf-{uuid.uuid4().hex[:6]}"
    backfill = "/api/v1/admin/allocations/placement-claims/backfill"
    with client(url) as http:
        make_sku(http, admin, baremetal_sku(sku))
        node = make_node(http, admin, sku)["id"]
        first = legacy_lease(stores, node, sku)
        assert call(http, admin, "POST", backfill).json() == {
            "candidate_count": 1, "inserted_count": 1, "skipped_count": 0}
        claims = stores.app.get_or_none(uuid.UUID(node)).live_claims()
        assert [(c["allocation_id"], c["claim_kind"]) for c in claims] == [(str(first), "node_exclusive")]
        assert call(http, admin, "POST", backfill).json() == {
            "candidate_count": 0, "inserted_count": 0, "skipped_count": 0}  # a rerun inserts nothing
        legacy_lease(stores, node, sku)  # a second lease on the same node cannot be claimed
        assert call(http, admin, "POST", backfill).json() == {
            "candidate_count": 1, "inserted_count": 0, "skipped_count": 1}
        project, user = uuid.uuid4(), uuid.uuid4()
        caller = mint_token(tokens.secret, user_id=user, project_ids=[str(project)])
        fund(http, admin, user)
        held = launch(http, caller, project, {"sku": sku})  # the only node is held by the backfill
        assert held.status_code == 409 and held.json()["code"] == "sku_unavailable"


def test_precheck_reads_capacity_quota_and_posture_and_writes_nothing(env: tuple[str, Stores],
                                                                      tokens: Any) -> None:
    url, stores = env
    admin, sku = tokens.admin(), f"pc-{uuid.uuid4().hex[:6]}"
    user, project = uuid.uuid4(), uuid.uuid4()
    caller = mint_token(tokens.secret, user_id=user, project_ids=[str(project)])
    precheck = "/api/v1/launch/compute/precheck"

    def ask(http: httpx.Client, body: dict[str, Any], position: str) -> dict[str, Any]:
        for path in (precheck, "/api/v1/v3/launch/compute/precheck"):
            response = http.post(path, json=body, headers={
                **bearer(caller), "X-Project-ID": str(project), "X-Ledger-Position": position})
            check("POST", path, response)
            assert response.status_code == 200
        return {c["id"]: c for c in response.json()["checks"]} | {"_": response.json()}

    with client(url) as http:
        make_sku(http, admin, baremetal_sku(sku))
        make_node(http, admin, sku)
        fund(http, admin, user)
        last = call(http, admin, "POST", NODES, json={"host": f"pc-{sku}", "sku": sku, "gpus_total": 8,
                                                      "region_code": "eu-1", "probe": False})
        position = last.headers["X-Ledger-Position"]
        before = appended(stores)
        one = ask(http, {"sku": sku, "unit_count": 2}, position)
        assert one["_"]["ready"] is True and one["_"]["severity"] == "ok"
        assert one["_"]["estimate"]["hourly_rate"] == {"amount_minor": 5000, "currency": "USD"}
        assert one["_"]["estimate"]["monthly_estimate"]["amount_minor"] == 5000 * 730
        too_many = ask(http, {"sku": sku, "unit_count": 3}, position)
        assert too_many["capacity"]["status"] == "blocker" and too_many["_"]["ready"] is False
        unknown = ask(http, {"sku": "no-such-sku"}, position)
        assert unknown["sku"]["inline_action_kind"] == "select_sku"
        assert appended(stores) == before
        restricted = http.post(f"/api/v1/admin/billing/financial-restrictions/user/{user}",
                               json={"state": "suspended", "reason": "unpaid"}, headers=bearer(admin))
        blocked = ask(http, {"sku": sku}, restricted.headers["X-Ledger-Position"])
        assert blocked["billing"]["inline_action_kind"] == "add_funds" and not blocked["_"]["ready"]
        refused = launch(http, caller, project, {"sku": sku})  # admission agrees
        assert refused.status_code == 409 and refused.json()["code"] == "insufficient_balance"
