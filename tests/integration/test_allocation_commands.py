"""Allocation commands through HTTP: createAllocation, release, restart, the operator's
force-release and force-cleanup, and the node agent's task channel. Every response is
checked against the contract; refusals append no domain event."""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import httpx
import pytest

from api.app import create_app
from api.auth import mint_token
from domain.canonical import canonical_json
from infra.db import Stores
from tests.contract.test_contract import check
from tests.harness import ServerThread, bearer, client
from tests.integration.test_inventory_commands import (LIFECYCLE, appended, baremetal_sku, call,
                                                       fund, make_node, make_sku)

CREATE = "/api/v1/allocations"
RELEASE = "/api/v1/allocations/{allocation_id}/release"
RESTART = "/api/v1/allocations/{allocation_id}/restart"
FORCE_RELEASE = "/api/v1/admin/allocations/{allocation_id}/force-release"
FORCE_CLEANUP = "/api/v1/admin/allocations/{allocation_id}/force-cleanup"
WAIT = "/internal/v1/nodes/{node_id}/tasks/wait"
RESULT = "/internal/v1/nodes/{node_id}/tasks/{task_id}/result"


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


class Caller:
    """A funded user in a project of their own."""

    def __init__(self, http: httpx.Client, tokens: Any, funded: bool = True):
        self.http, self.user, self.project = http, uuid.uuid4(), uuid.uuid4()
        self.token = mint_token(tokens.secret, user_id=self.user, project_ids=[str(self.project)])
        if funded:
            fund(http, tokens.admin(), self.user)

    def post(self, template: str, json: Any = None, key: str | None = None,
             **params: Any) -> httpx.Response:
        headers = {**bearer(self.token), "X-Project-ID": str(self.project)}
        if key:
            headers["Idempotency-Key"] = key
        response = self.http.post(template.format(**params), json=json, headers=headers)
        check("POST", template, response)
        return response


class Agent:
    """A node agent: long-polls its node's tasks and reports on them."""

    def __init__(self, http: httpx.Client, tokens: Any, node_id: str):
        self.http, self.node_id, self.secret = http, node_id, tokens.secret
        self.headers = bearer(mint_token(tokens.secret, user_id=node_id, actor_type="node"))

    def wait(self) -> dict[str, Any] | None:
        response = self.http.get(WAIT.format(node_id=self.node_id), headers=self.headers)
        check("GET", WAIT, response)
        return response.json() if response.status_code == 200 else None

    def report(self, task_id: str, status: str, **extra: Any) -> httpx.Response:
        body = {"status": status, "completed_at": datetime.now(timezone.utc).isoformat(),
                "output": {}, **extra}
        response = self.http.post(RESULT.format(node_id=self.node_id, task_id=task_id), json=body,
                                  headers=self.headers)
        check("POST", RESULT, response)
        return response


def setup(http: httpx.Client, tokens: Any, nodes: int) -> tuple[str, list[str]]:
    sku = f"al-{uuid.uuid4().hex[:6]}"
    make_sku(http, tokens.admin(), baremetal_sku(sku))
    return sku, [make_node(http, tokens.admin(), sku)["id"] for _ in range(nodes)]


def test_create_admits_what_capacity_allows_and_refuses_cleanly(env: tuple[str, Stores],
                                                                tokens: Any) -> None:
    url, stores = env
    with client(url) as http:
        sku, nodes = setup(http, tokens, 2)
        caller = Caller(http, tokens)
        body = {"scheduler_type": "bare_metal", "requested_count": 3,
                "scheduler_request": {"sku": sku}}
        created = caller.post(CREATE, body, key="batch-1")
        assert created.status_code == 201, created.text
        answer = created.json()
        assert (answer["requested_count"], answer["created_count"], answer["failed_count"]) == (3, 2, 1)
        assert answer["allocation"] == answer["allocations"][0]
        assert sorted(a["node_id"] for a in answer["allocations"]) == sorted(nodes)
        for allocation in answer["allocations"]:
            assert allocation["status"] == "requested" and allocation["placement_status"] == "reserved"
            assert [c["status"] for c in allocation["placement_claims"]] == ["reserved"]
            assert allocation["org_id"] and allocation["sku"] == sku and allocation["gpus_total"] == 8
        replay = caller.post(CREATE, body, key="batch-1")
        assert replay.json() == answer and replay.headers["Idempotent-Replayed"] == "true"
        before = appended(stores)
        reused = caller.post(CREATE, {**body, "requested_count": 1}, key="batch-1")
        assert reused.status_code == 409 and reused.json()["details"]["reason"] == "idempotency_key_reused"
        refusals = {
            "sku_unavailable": (409, {"scheduler_type": "bare_metal", "scheduler_request": {"sku": sku}}),
            "node_in_use": (409, {"scheduler_type": "bare_metal", "node_id": nodes[0]}),
            "node_not_found": (400, {"scheduler_type": "bare_metal", "node_id": str(uuid.uuid4())}),
            "sku_not_found": (400, {"scheduler_type": "bare_metal", "scheduler_request": {"sku": "nope"}}),
            "invalid_request": (400, {"scheduler_type": "bare_metal"}),
            "validation_error": (400, {"scheduler_request": {"sku": sku}}),
        }
        for code, (status, bad) in refusals.items():
            refused = caller.post(CREATE, bad)
            assert (refused.status_code, refused.json()["code"]) == (status, code), (code, refused.text)
        for bad in ({"scheduler_type": "bare_metal", "requested_count": 21},
                    {"scheduler_type": "bare_metal", "requested_count": 0},
                    {"scheduler_type": "bare_metal", "ssh_key_ids": [str(uuid.uuid4())] * 2},
                    {"scheduler_type": "bare_metal", "gpu_count": 0}, {"scheduler_type": "slurm", "x": 1}):
            assert caller.post(CREATE, bad).status_code == 400, bad
        broke = Caller(http, tokens, funded=False)
        unfunded = broke.post(CREATE, {"scheduler_type": "bare_metal", "scheduler_request": {"sku": sku}})
        assert unfunded.status_code == 409 and unfunded.json()["code"] == "insufficient_balance"
        assert appended(stores) == before


def test_a_lease_runs_through_the_node_channel(env: tuple[str, Stores], tokens: Any) -> None:
    url, stores = env
    with client(url) as http:
        sku, (node,) = setup(http, tokens, 1)
        caller, agent = Caller(http, tokens), Agent(http, tokens, node)
        launched = caller.post(CREATE, {"scheduler_type": "bare_metal", "node_id": node}).json()
        allocation = launched["allocation"]["id"]
        task = agent.wait()
        assert task is not None and task["task_type"] == "allocation.provision"
        assert task["params"]["allocation_id"] == allocation and "output" not in task
        unsigned = {k: v for k, v in task.items() if k != "signature"}
        assert task["signature"] == hmac.new(tokens.secret.encode(), canonical_json(unsigned),
                                             hashlib.sha256).hexdigest()
        refused = caller.post(RESTART, allocation_id=allocation)  # provisioning: not yet
        assert refused.status_code == 409 and refused.json()["code"] == "allocation_not_active"
        assert agent.report(task["task_id"], "success",
                            output={"port": 2222, "username_on_node": "alice"}).json() == {"ok": True}
        assert agent.report(task["task_id"], "failed").status_code == 200  # the first report won
        started = time.monotonic()
        assert agent.wait() is None and time.monotonic() - started >= 0.9  # long-polled, then 204
        restart = caller.post(RESTART, allocation_id=allocation, key="r1")
        assert restart.status_code == 202
        operation = restart.json()["operation"]
        assert (operation["previous_status"], operation["status"]) == ("active", "restarting")
        assert restart.json()["allocation"]["connection"]["port"] == 2222
        again = caller.post(RESTART, allocation_id=allocation)
        assert again.json()["details"]["reason"] == "restart_in_progress"
        assert agent.report(agent.wait()["task_id"], "success").status_code == 200
        other = Caller(http, tokens)
        hidden = other.post(RELEASE, allocation_id=allocation)
        assert hidden.status_code == 404 and hidden.json()["code"] == "allocation_not_found"
        released = caller.post(RELEASE, allocation_id=allocation, key="rel-1")
        assert released.status_code == 202 and released.json()["allocation"]["status"] == "releasing"
        assert caller.post(RELEASE, allocation_id=allocation, key="rel-1").json() == released.json()
        twice = caller.post(RELEASE, allocation_id=allocation)
        assert twice.status_code == 409 and twice.json()["code"] == "allocation_already_releasing"
        release_task = agent.wait()
        assert release_task["task_type"] == "allocation.release"
        agent.report(release_task["task_id"], "success")
        after = caller.post(RELEASE, allocation_id=allocation)
        assert after.status_code == 409 and after.json()["code"] == "allocation_not_active"
        state = stores.app.get_or_none(uuid.UUID(allocation))
        assert state.status == "released" and state.connection["username_on_node"] == "alice"
        assert stores.app.get_or_none(uuid.UUID(node)).live_claims() == []
        missing = agent.report(str(uuid.uuid4()), "success")
        assert missing.status_code == 404
        bad = http.post(RESULT.format(node_id=node, task_id=task["task_id"]), headers=agent.headers,
                        json={"status": "done", "completed_at": "now", "output": {}})
        check("POST", RESULT, bad)
        assert bad.status_code == 400


def test_operators_force_release_and_clean_up(env: tuple[str, Stores], tokens: Any) -> None:
    url, stores = env
    admin = tokens.admin()
    with client(url) as http:
        sku, (first, second) = setup(http, tokens, 2)
        caller = Caller(http, tokens)
        running = caller.post(CREATE, {"scheduler_type": "bare_metal", "node_id": first}).json()
        stuck = caller.post(CREATE, {"scheduler_type": "bare_metal", "node_id": second}).json()
        running_id, stuck_id = running["allocation"]["id"], stuck["allocation"]["id"]
        agent = Agent(http, tokens, first)
        agent.report(agent.wait()["task_id"], "success")
        Agent(http, tokens, second).wait()  # picked up, never reported: provisioning forever
        short = call(http, admin, "POST", FORCE_RELEASE, allocation_id=running_id, json={"reason": "x"})
        assert short.status_code == 400
        not_cleanable = call(http, admin, "POST", FORCE_CLEANUP, allocation_id=running_id,
                             json={"reason": "stuck lease"})
        assert not_cleanable.status_code == 409
        assert not_cleanable.json()["details"]["reason"] == "state_not_cleanable"
        forced = call(http, admin, "POST", FORCE_RELEASE, allocation_id=running_id,
                      json={"reason": "abuse report"})
        assert forced.status_code == 202 and forced.json()["operation"]["previous_status"] == "active"
        agent.report(agent.wait()["task_id"], "failed", error="disk busy")
        failed = stores.app.get_or_none(uuid.UUID(running_id))
        assert failed.status == "release_failed" and failed.reasons["release_failed"] == "disk busy"
        cleaned = call(http, admin, "POST", FORCE_CLEANUP, allocation_id=running_id,
                       json={"reason": "host wiped by hand", "runtime_verified_absent": True})
        assert cleaned.status_code == 200 and cleaned.json()["allocation"]["status"] == "released"
        stuck_cleanup = call(http, admin, "POST", FORCE_CLEANUP, allocation_id=stuck_id,
                             json={"reason": "agent lost"})
        assert stuck_cleanup.json()["allocation"]["status"] == "failed"
        assert stuck_cleanup.json()["allocation"]["failure_reason"] == "agent lost"
        missing = call(http, admin, "POST", FORCE_RELEASE, allocation_id=str(uuid.uuid4()),
                       json={"reason": "whatever"})
        assert missing.status_code == 404
        for node in (first, second):
            assert stores.app.get_or_none(uuid.UUID(node)).live_claims() == []
        cordon = call(http, admin, "POST", LIFECYCLE, node_id=first, action="cordon")
        assert cordon.status_code == 200
        offline = caller.post(CREATE, {"scheduler_type": "bare_metal", "node_id": first})
        assert offline.status_code == 409 and offline.json()["code"] == "node_offline"
