"""Allocations under contention, through HTTP on real Postgres: clients released at
once by a barrier race for scarce nodes and against a tight per-user concurrency cap,
on one server and on two servers sharing one event store (each with its own batch
writer, so the races are decided by the event store's version check). After each
race the event store (the aggregates) and the read models must agree that no node is
double-booked, no user is over the cap, and the quota counts exactly the live leases.
Also: many concurrent releases of one lease move it, free its claim and leave the quota
exactly once."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

import httpx
import pytest

from api.app import create_app
from api.auth import mint_token
from domain.allocations import Allocation, UserAllocationQuota, quota_id_for
from domain.inventory import NodeInventory
from domain.usage import UsageRecord, usage_id_for_allocation
from infra.db import Stores
from tests.contract.test_contract import check
from tests.harness import ServerThread, bearer, client
from tests.integration.test_inventory_commands import (LAUNCH, NODES, baremetal_sku, call,
                                                       fund, make_node, make_sku)

ALLOCATIONS = "/api/v1/allocations"
RELEASE = "/api/v1/allocations/{allocation_id}/release"
LIMITS = "/api/v1/allocations/limits"
POLICY = "/api/v1/admin/allocations/limits/policy"
WAIT = "/internal/v1/nodes/{node_id}/tasks/wait"
RESULT = "/internal/v1/nodes/{node_id}/tasks/{task_id}/result"


@pytest.fixture(scope="module")
def served(services: Any) -> Iterator[Any]:
    """A database of this module's own: the concurrency policy is global."""
    from tests.conftest import serve_own_database

    with serve_own_database(services) as found:
        yield found


@contextmanager
def servers(served: Any, services: Any, count: int) -> Iterator[list[str]]:
    """``count`` API servers over the same event store (the second without a projector)."""
    from tests.conftest import make_settings

    if count == 1:
        yield [served.url]
        return
    settings = make_settings(services, served.dsn, run_projector=False)
    other = Stores.open(settings)
    try:
        with ServerThread(create_app(settings, other)) as second:
            yield [served.url, second.url]
    finally:
        other.close()


class Caller:
    def __init__(self, tokens: Any):
        self.user, self.project = uuid.uuid4(), uuid.uuid4()
        self.token = mint_token(tokens.secret, user_id=self.user, project_ids=[str(self.project)])

    def headers(self, key: bool = True) -> dict[str, str]:
        return {**bearer(self.token), "X-Project-ID": str(self.project),
                **({"Idempotency-Key": uuid.uuid4().hex} if key else {})}

    def create(self, sku: str, count: int,
               node_id: str | None = None) -> Callable[[httpx.Client], httpx.Response]:
        body: dict[str, Any] = {"scheduler_type": "bare_metal", "requested_count": count,
                                "scheduler_request": {"sku": sku}}
        if node_id is not None:
            body["node_id"] = node_id
        return lambda http: http.post(ALLOCATIONS, json=body, headers=self.headers())

    def launch(self, sku: str, units: int = 1) -> Callable[[httpx.Client], httpx.Response]:
        return lambda http: http.post(LAUNCH, json={"sku": sku, "unit_count": units},
                                      headers=self.headers())


def race(urls: list[str], jobs: list[Callable[[httpx.Client], httpx.Response]]) -> list[httpx.Response]:
    """Every job on its own client (warmed up), all released at once; job i goes to
    server i mod len(urls)."""
    barrier = threading.Barrier(len(jobs))
    results: list[httpx.Response | None] = [None] * len(jobs)

    def one(i: int) -> None:
        with client(urls[i % len(urls)]) as http:
            http.get("/api/v1/healthz")  # the connection is open before the start
            barrier.wait()
            results[i] = jobs[i](http)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(r is not None for r in results), "a racing client got no answer"
    return [r for r in results if r is not None]


def set_policy(http: httpx.Client, admin: str, value: int) -> str:
    response = call(http, admin, "PUT", POLICY, json={"value": value, "reason": "race test"})
    assert response.status_code == 200 and response.json()["value"] == value, response.text
    return response.headers["X-Ledger-Position"]


def position_of(responses: list[httpx.Response], *more: str) -> str:
    return str(max([int(r.headers.get("X-Ledger-Position", 0)) for r in responses]
                   + [int(p) for p in more]))


def admitted_ids(response: httpx.Response) -> list[str]:
    body = response.json()
    if response.status_code == 201:
        return [a["id"] for a in body["allocations"]]
    if response.status_code == 202:
        return [body["workload_id"]]  # unit_count > 1: the others are found in the store
    return []


# ---- what the event store says --------------------------------------------------------------
def store_facts(stores: Stores, users: set[str], nodes: list[str], limit: int) -> dict[str, set[str]]:
    """Folds the aggregates and checks what must hold after a race; returns each
    user's live allocation ids."""
    allocations = [stores.app.get_or_none(i) for i in stores.originators(Allocation.Created.TOPIC)]
    mine = [a for a in allocations if a.lease["requested_by_user_id"] in users]
    live: dict[str, set[str]] = {user: set() for user in users}
    for allocation in mine:
        if allocation.live:
            live[allocation.lease["requested_by_user_id"]].add(str(allocation.id))
            assert allocation.lease["node_id"] in nodes
    every_live = set().union(*live.values())
    holders: list[str] = []
    for node_id in nodes:
        claims = stores.app.get_or_none(uuid.UUID(node_id)).live_claims()
        assert len(claims) <= 1, f"node {node_id} holds {len(claims)} live claims"
        holders += [c["allocation_id"] for c in claims]
    assert sorted(holders) == sorted(every_live), "the claim holders are not the live leases"
    assert len(every_live) <= len(nodes)
    for user in users:
        assert len(live[user]) <= limit, f"user {user}: {len(live[user])} live, cap {limit}"
        quota = stores.app.get_or_none(quota_id_for(user))
        assert set(quota.live if quota else []) == live[user], f"user {user}: quota != live leases"
    return live


# ---- what the read models say ---------------------------------------------------------------
def read_limits(http: httpx.Client, caller: Caller, position: str) -> dict[str, Any]:
    response = http.get(LIMITS, headers={**caller.headers(key=False), "X-Ledger-Position": position})
    check("GET", LIMITS, response)
    assert response.status_code == 200 and response.headers["X-Read-Model-Cache"] != "stale"
    return response.json()


def assert_read_models(http: httpx.Client, admin: str, callers: list[Caller], position: str,
                       live: dict[str, set[str]], limit: int, nodes: list[str]) -> None:
    for caller in callers:
        current = len(live[str(caller.user)])
        assert read_limits(http, caller, position) == {
            "max_concurrent_allocations": limit, "current_concurrent_allocations": current,
            "available_allocation_slots": max(0, limit - current)}
    listed: dict[str, Any] = {}
    cursor = None
    while True:
        page = http.get(NODES, params={"page_size": 200, **({"cursor": cursor} if cursor else {})},
                        headers={**bearer(admin), "X-Ledger-Position": position}).json()
        listed |= {n["id"]: n for n in page["items"]}
        cursor = page["pagination"]["next_cursor"]
        if cursor is None:
            break
    every_live = set().union(*live.values())
    held = {listed[n]["current_allocation"]["allocation_id"] for n in nodes if listed[n]["in_use"]}
    assert held == every_live


# ---- the races -------------------------------------------------------------------------------
@pytest.mark.parametrize("server_count", [1, 2])
def test_many_users_racing_for_few_nodes_never_overbook(served: Any, services: Any, tokens: Any,
                                                        server_count: int) -> None:
    """16 users, half asking createAllocation for 2–4 leases (as many as fit), half
    launching 1–2 (all or none), race for 7 nodes under a cap of 3 per user. The
    partial requests alone want more than 7 leases, so the nodes end up all taken,
    each exactly once."""
    admin, sku, limit, node_count = tokens.admin(), f"ra-{uuid.uuid4().hex[:6]}", 3, 7
    callers = [Caller(tokens) for _ in range(16)]
    with client(served.url) as http:
        policy_at = set_policy(http, admin, limit)
        make_sku(http, admin, baremetal_sku(sku))
        nodes = [make_node(http, admin, sku)["id"] for _ in range(node_count)]
        for caller in callers:
            fund(http, admin, caller.user)
    wants = [(c, "create", 2 + i % 3) if i % 2 == 0 else (c, "launch", 1 + i // 2 % 2)
             for i, c in enumerate(callers)]
    jobs = [c.create(sku, n) if kind == "create" else c.launch(sku, n) for c, kind, n in wants]
    with servers(served, services, server_count) as urls:
        responses = race(urls, jobs)

    admitted: dict[str, set[str]] = {}
    for (caller, kind, wanted), response in zip(wants, responses):
        path = ALLOCATIONS if kind == "create" else LAUNCH
        check("POST", path, response)
        if response.status_code == 409:
            assert response.json()["code"] == "sku_unavailable", response.text
            continue
        body = response.json()
        if kind == "create":
            assert response.status_code == 201, response.text
            assert body["requested_count"] == wanted
            assert body["created_count"] + body["failed_count"] == wanted
            assert len(body["allocations"]) == body["created_count"] >= 1
            assert body["allocation"] == body["allocations"][0]
            assert body["created_count"] <= limit
            assert all(a["node_id"] in nodes and a["status"] == "requested" for a in body["allocations"])
            assert len({a["node_id"] for a in body["allocations"]}) == body["created_count"]
        else:
            assert response.status_code == 202, response.text
        admitted[str(caller.user)] = set(admitted_ids(response))

    live = store_facts(served.stores, {str(c.user) for c in callers}, nodes, limit)
    assert sum(len(ids) for ids in live.values()) == node_count  # every node taken, once
    for (caller, kind, wanted), response in zip(wants, responses):
        mine = live[str(caller.user)]
        assert admitted.get(str(caller.user), set()) <= mine  # nothing acknowledged was lost
        if kind == "create" and response.status_code == 201:
            assert mine == admitted[str(caller.user)]
        if kind == "launch" and response.status_code == 202:
            assert len(mine) == wanted  # all or none
        if response.status_code == 409:
            assert not mine  # a refusal appended nothing
    with client(served.url) as http:
        assert_read_models(http, admin, callers, position_of(responses, policy_at), live, limit, nodes)


@pytest.mark.parametrize("server_count", [1, 2])
def test_one_user_firing_many_launches_gets_exactly_the_cap(served: Any, services: Any,
                                                           tokens: Any, server_count: int) -> None:
    """Policy 2, ample capacity (10 nodes): 16 concurrent launches of one user admit
    exactly 2; the other 14 are 409 allocation_concurrency_limit."""
    admin, sku, limit = tokens.admin(), f"rb-{uuid.uuid4().hex[:6]}", 2
    caller = Caller(tokens)
    with client(served.url) as http:
        policy_at = set_policy(http, admin, limit)
        make_sku(http, admin, baremetal_sku(sku))
        nodes = [make_node(http, admin, sku)["id"] for _ in range(10)]
        fund(http, admin, caller.user)
    with servers(served, services, server_count) as urls:
        responses = race(urls, [caller.launch(sku) for _ in range(16)])
    for response in responses:
        check("POST", LAUNCH, response)
    won = [r for r in responses if r.status_code == 202]
    lost = [r for r in responses if r.status_code != 202]
    assert len(won) == limit, [r.text for r in lost if r.status_code != 409]
    assert {r.status_code for r in lost} == {409}
    assert {r.json()["code"] for r in lost} == {"allocation_concurrency_limit"}
    assert {r.json()["details"]["max_concurrent_allocations"] for r in lost} == {limit}

    live = store_facts(served.stores, {str(caller.user)}, nodes, limit)
    assert live[str(caller.user)] == {r.json()["workload_id"] for r in won}
    with client(served.url) as http:
        position = position_of(responses, policy_at)
        assert_read_models(http, admin, [caller], position, live, limit, nodes)
        again = caller.launch(sku)(http)  # the cap still holds after the race
        assert again.status_code == 409 and again.json()["code"] == "allocation_concurrency_limit"
        # raising the cap admits more; lowering it evicts nothing
        set_policy(http, admin, limit + 1)
        assert caller.launch(sku)(http).status_code == 202
        position = set_policy(http, admin, 1)
        assert read_limits(http, caller, position) == {
            "max_concurrent_allocations": 1, "current_concurrent_allocations": limit + 1,
            "available_allocation_slots": 0}
    live = store_facts(served.stores, {str(caller.user)}, nodes, limit + 1)
    assert len(live[str(caller.user)]) == limit + 1


# ---- a release race --------------------------------------------------------------------------
def agent_step(http: httpx.Client, node_token: str, node_id: str, phase: str) -> httpx.Response:
    """The node agent: pick up the next task (it must be ``phase``'s) and report success."""
    headers = bearer(node_token)
    task = http.get(WAIT.format(node_id=node_id), headers=headers)
    check("GET", WAIT, task)
    assert task.status_code == 200, task.text
    assert task.json()["params"]["phase"] == phase
    result = http.post(RESULT.format(node_id=node_id, task_id=task.json()["task_id"]), headers=headers,
                       json={"status": "success", "completed_at": datetime.now(timezone.utc).isoformat(),
                             "output": {}})
    check("POST", RESULT, result)
    assert result.status_code == 200, result.text
    return result


def events_of(stores: Stores, aggregate_id: uuid.UUID, kind: type, **match: Any) -> list[Any]:
    return [e for e in stores.app.events.get(aggregate_id) if isinstance(e, kind)
            and all(getattr(e, k) == v for k, v in match.items())]


@pytest.mark.parametrize("server_count", [1, 2])
def test_concurrent_releases_of_one_lease_release_it_once(served: Any, services: Any, tokens: Any,
                                                          server_count: int) -> None:
    admin, sku = tokens.admin(), f"rr-{uuid.uuid4().hex[:6]}"
    caller = Caller(tokens)
    with client(served.url) as http:
        set_policy(http, admin, 5)
        make_sku(http, admin, baremetal_sku(sku))
        node_id = make_node(http, admin, sku)["id"]
        fund(http, admin, caller.user)
        created = caller.create(sku, 1, node_id=node_id)(http)
        check("POST", ALLOCATIONS, created)
        assert created.status_code == 201, created.text
        allocation_id = created.json()["allocation"]["id"]
        node_token = mint_token(tokens.secret, user_id=node_id, actor_type="node")
        agent_step(http, node_token, node_id, "provision")  # the lease is active: it has a runtime

    def release(i: int) -> Callable[[httpx.Client], httpx.Response]:
        # half without an Idempotency-Key, half each with a key of its own
        return lambda http: http.post(RELEASE.format(allocation_id=allocation_id),
                                      headers=caller.headers(key=i % 2 == 0))

    with servers(served, services, server_count) as urls:
        responses = race(urls, [release(i) for i in range(12)])
    for response in responses:
        check("POST", RELEASE, response)
    won = [r for r in responses if r.status_code == 202]
    lost = [r for r in responses if r.status_code != 202]
    assert len(won) == 1, [r.text for r in responses]
    assert won[0].json()["allocation"]["status"] == "releasing"
    assert won[0].json()["operation"]["previous_status"] == "active"
    assert {(r.status_code, r.json()["code"]) for r in lost} == {(409, "allocation_already_releasing")}

    with client(served.url) as http:
        last = agent_step(http, node_token, node_id, "release")
        after = http.post(RELEASE.format(allocation_id=allocation_id), headers=caller.headers())
        check("POST", RELEASE, after)
        assert after.status_code == 409 and after.json()["code"] == "allocation_not_active"
        assert read_limits(http, caller, last.headers["X-Ledger-Position"])[
            "current_concurrent_allocations"] == 0

    stores, lease = served.stores, uuid.UUID(allocation_id)
    moves = [e.to for e in events_of(stores, lease, Allocation.Moved)]
    assert moves == ["provisioning", "active", "releasing", "released"]
    node = uuid.UUID(node_id)
    assert [e.to for e in events_of(stores, node, NodeInventory.ClaimsMoved,
                                    allocation_id=allocation_id)] == [
        "provisioning", "active", "releasing", "released"]
    assert stores.app.get_or_none(node).live_claims() == []
    assert len(events_of(stores, quota_id_for(caller.user), UserAllocationQuota.Retired)) == 1
    assert len(events_of(stores, usage_id_for_allocation(lease), UsageRecord.Stopped)) == 1
    store_facts(stores, {str(caller.user)}, [node_id], 5)
