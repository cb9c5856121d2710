"""The V3 workbench (workloads and tasks) through HTTP on real Postgres, checked against
the contract: leases launched, driven by a node agent over the task channel, restarted
and released, while their rows, actions, tasks, counts and money are read back; project
scope, the read-model cache, input limits, and a rebuild of the read model."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from uuid import UUID

import httpx
import pytest

from api.auth import mint_token
from consumers.rebuild import rebuild
from projections import BY_NAME
from tests.conftest import Served, Tokens, serve_own_database
from tests.contract.test_contract import check
from tests.harness import bearer, client
from tests.integration.test_inventory_commands import baremetal_sku, fund, make_node, make_sku

WORKLOADS, WORKLOAD = "/api/v1/workloads", "/api/v1/workloads/{workload_id}"
TASKS, TASK = "/api/v1/tasks", "/api/v1/tasks/{task_id}"
COMPAT = {WORKLOADS: "/api/v1/v3/workloads", WORKLOAD: "/api/v1/v3/workloads/{workload_id}",
          TASKS: "/api/v1/v3/tasks", TASK: "/api/v1/v3/tasks/{task_id}"}
LAUNCH = "/api/v1/launch/compute"
ACTION = "/api/v1/allocations/{allocation_id}/{action}"  # release or restart
WAIT = "/internal/v1/nodes/{node_id}/tasks/wait"
RESULT = "/internal/v1/nodes/{node_id}/tasks/{task_id}/result"
PRICE = 3_600_000  # minor units per node-hour: one per millisecond, so a short lease costs


@dataclass
class Lab:
    """A server over its own database with a SKU on four nodes; every read waits for
    the last command's position."""

    http: httpx.Client
    served: Served
    tokens: Tokens
    sku: str
    position: int = 0

    def track(self, response: httpx.Response) -> httpx.Response:
        if "X-Ledger-Position" in response.headers:
            self.position = max(self.position, int(response.headers["X-Ledger-Position"]))
        return response

    def read(self, token: str, project: UUID, template: str, params: dict[str, Any] | None = None,
             **path: str) -> httpx.Response:
        response = self.http.get(template.format(**path), params=params, headers={
            **bearer(token), "X-Project-ID": str(project), "X-Ledger-Position": str(self.position)})
        check("GET", template, response)
        return response

    def ok(self, token: str, project: UUID, template: str, params: dict[str, Any] | None = None,
           **path: str) -> dict[str, Any]:
        response = self.read(token, project, template, params, **path)
        assert response.status_code == 200, response.text
        assert response.json()["meta"]["cache"] == response.headers["X-Read-Model-Cache"]
        return response.json()

    def post(self, token: str, project: UUID, template: str, body: Any = None,
             **path: str) -> httpx.Response:
        response = self.http.post(template.format(**path), json=body, headers={
            **bearer(token), "X-Project-ID": str(project), "Idempotency-Key": uuid.uuid4().hex})
        check("POST", template, response)
        return self.track(response)

    def launch(self, token: str, project: UUID) -> dict[str, Any]:
        response = self.post(token, project, LAUNCH, {"sku": self.sku})
        assert response.status_code == 202, response.text
        return response.json()

    def act(self, token: str, project: UUID, allocation_id: str, action: str) -> httpx.Response:
        return self.post(token, project, ACTION.replace("{action}", action),
                         allocation_id=allocation_id)

    def agent(self, node_id: str, status: str) -> dict[str, Any]:
        """The node agent takes its next task and reports ``status`` on it."""
        token = bearer(mint_token(self.tokens.secret, user_id=node_id, actor_type="node"))
        task = self.track(self.http.get(WAIT.format(node_id=node_id), headers=token))
        assert task.status_code == 200, task.text
        task_id = task.json()["task_id"]
        reported = self.http.post(RESULT.format(node_id=node_id, task_id=task_id), headers=token,
                                  json={"status": status, "output": {},
                                        "completed_at": datetime.now(timezone.utc).isoformat()})
        assert self.track(reported).status_code == 200, reported.text
        return task.json()

    def take(self, node_id: str) -> None:
        """The agent picks up its next task without reporting on it yet."""
        token = bearer(mint_token(self.tokens.secret, user_id=node_id, actor_type="node"))
        taken = self.track(self.http.get(WAIT.format(node_id=node_id), headers=token))
        assert taken.status_code == 200, taken.text

    def status(self, allocation_id: str) -> str:
        return self.served.stores.app.repository.get(UUID(allocation_id)).status


@pytest.fixture(scope="module")
def lab(services: Any, tokens: Tokens) -> Iterator[Lab]:
    with serve_own_database(services) as served, client(served.url) as http:
        admin, sku = tokens.admin(), f"wl-{uuid.uuid4().hex[:6]}"
        make_sku(http, admin, {**baremetal_sku(sku),
                               "unit_price": {"amount_minor": PRICE, "currency": "USD"}})
        for _ in range(4):
            make_node(http, admin, sku)
        yield Lab(http, served, tokens, sku)


def member(lab: Lab, project: UUID, funded: bool = True) -> tuple[UUID, str]:
    user = uuid.uuid4()
    if funded:
        lab.track(fund(lab.http, lab.tokens.admin(), user))
    return user, lab.tokens.user(user, project_ids=[str(project)])


def enabled(lab: Lab, token: str, project: UUID, workload_id: str) -> set[str]:
    """The row's enabled lifecycle actions, after checking that each disabled one is
    refused (409, nothing changes); the caller posts an enabled one and expects 202."""
    row = lab.ok(token, project, WORKLOAD, workload_id=workload_id)["workload"]
    actions = {a["action"]: a for a in row["lifecycle_actions"]}
    assert set(actions) == {"release", "restart", "open"}
    for name in ("release", "restart"):
        assert actions[name]["href"] == f"/api/v1/allocations/{workload_id}/{name}"
        if not actions[name]["enabled"]:
            before = lab.status(workload_id)
            assert lab.act(token, project, workload_id, name).status_code == 409
            assert lab.status(workload_id) == before
    return {name for name, action in actions.items() if action["enabled"]}


def task_at(lab: Lab, token: str, project: UUID, href: str) -> dict[str, Any]:
    """The task a handoff ``task_href`` names, with its timeline."""
    assert href.startswith(TASKS + "/")
    return lab.ok(token, project, TASK, task_id=href.rsplit("/", 1)[1])


def walk(lab: Lab, token: str, project: UUID, template: str,
         params: dict[str, Any]) -> list[str]:
    """The ids of every item of a list, page by page along its cursor."""
    seen: list[str] = []
    cursor = None
    while True:
        page = lab.ok(token, project, template,
                      {**params, **({"cursor": cursor} if cursor else {})})
        seen += [item["id"] for item in page["items"]]
        cursor = page["pagination"]["next_cursor"]
        if cursor is None:
            return seen


def row_of(lab: Lab, token: str, project: UUID, workload_id: str) -> dict[str, Any]:
    row = lab.ok(token, project, WORKLOAD, workload_id=workload_id)["workload"]
    assert row["status"] == lab.status(workload_id)  # the row is the allocation's status
    return row


def test_a_lease_row_and_its_tasks_follow_the_lifecycle(lab: Lab) -> None:
    project = uuid.uuid4()
    _, token = member(lab, project)
    launched = lab.launch(token, project)
    wid = launched["workload_id"]
    row = row_of(lab, token, project, wid)
    assert row["status"] == "requested" and row["kind"] == "compute" and row["allocation_id"] == wid
    launch = task_at(lab, token, project, launched["task_href"])
    assert launch["task"]["kind"] == "launch" and launch["task"]["status"] == "queued"
    assert launch["task"]["resource_id"] == wid
    assert launch["context"]["resource_href"] == f"{WORKLOADS}/{wid}"
    assert enabled(lab, token, project, wid) == {"release", "open"}

    node = row["node_id"]
    lab.take(node)
    assert row_of(lab, token, project, wid)["status"] == "provisioning"
    assert task_at(lab, token, project, launched["task_href"])["task"]["status"] == "running"
    assert enabled(lab, token, project, wid) == {"release", "open"}
    lab.agent(node, "success")
    active = row_of(lab, token, project, wid)
    assert active["status"] == "active" and active["primary_action"] == "connect"
    assert active["connection_facts"]["ssh_command"].startswith("ssh -p 22 ")
    assert active["runtime_readiness"]["ready"] and active["hourly_rate"]["amount_minor"] == PRICE
    balance = lab.http.get("/api/v1/billing/balance", headers={
        **bearer(token), "X-Ledger-Position": str(lab.position)}).json()["balance"]
    projection = active["cost_projection"]
    assert projection["basis"] == "active_rate" and projection["balance"] == balance
    assert projection["runway_seconds"] == balance["amount_minor"] * 3600 // PRICE
    launch = task_at(lab, token, project, launched["task_href"])
    assert launch["task"]["status"] == "succeeded" and launch["task"]["completed_at"]
    assert [i["kind"] for i in launch["timeline"]] == [
        "accepted", "placement", "workflow", "workflow", "node_task", "completion"]
    assert enabled(lab, token, project, wid) == {"release", "restart", "open"}

    restarted = lab.act(token, project, wid, "restart")
    assert restarted.status_code == 202
    first_restart = restarted.json()["operation"]["task_href"]
    assert task_at(lab, token, project, first_restart)["task"]["status"] == "running"
    assert row_of(lab, token, project, wid)["status"] == "restarting"
    assert enabled(lab, token, project, wid) == {"release", "open"}
    lab.agent(node, "failed")
    failed = row_of(lab, token, project, wid)
    assert failed["status"] == "restart_failed"
    assert failed["needs_action"] and failed["is_actionable"]
    assert failed["primary_action"] == "review" and failed["actionable_until"]
    listed = lab.ok(token, project, WORKLOADS)
    assert listed["counts"] == {"active": 1, "provisioning": 0, "needs_action": 1, "released": 0}
    assert [b["workload_id"] for b in listed["action_band"]] == [wid]
    assert task_at(lab, token, project, first_restart)["task"]["status"] == "failed"
    assert enabled(lab, token, project, wid) == {"release", "restart", "open"}
    again = lab.act(token, project, wid, "restart")
    assert again.status_code == 202 and again.json()["operation"]["task_href"] != first_restart
    lab.agent(node, "success")
    second_restart = task_at(lab, token, project, again.json()["operation"]["task_href"])
    assert second_restart["task"]["status"] == "succeeded"
    assert row_of(lab, token, project, wid)["status"] == "active"

    released = lab.act(token, project, wid, "release")
    assert released.status_code == 202
    release_href = released.json()["operation"]["task_href"]
    assert task_at(lab, token, project, release_href)["task"]["status"] == "running"
    assert row_of(lab, token, project, wid)["status"] == "releasing"
    assert enabled(lab, token, project, wid) == {"open"}
    lab.agent(node, "success")
    gone = row_of(lab, token, project, wid)
    assert gone["status"] == "released" and gone["archived_at"]
    assert gone["hourly_rate"]["amount_minor"] == 0
    assert gone["cost_projection"]["basis"] == "zero_rate"
    release = task_at(lab, token, project, release_href)
    assert release["task"]["status"] == "succeeded"
    assert release["timeline"][-1]["kind"] == "completion"
    assert enabled(lab, token, project, wid) == {"open"}
    tasks = lab.ok(token, project, TASKS)
    assert sorted(t["kind"] for t in tasks["items"]) == ["launch", "release", "restart", "restart"]
    assert tasks["counts"] == {"queued": 0, "running": 0, "succeeded": 3, "failed": 1}
    failures = lab.ok(token, project, TASKS, {"status": "failed"})["items"]
    assert [t["id"] for t in failures] == [first_restart.rsplit("/", 1)[1]]

    usage = lab.http.get("/api/v1/billing/usage", params={"allocation_id": wid}, headers={
        **bearer(token), "X-Ledger-Position": str(lab.position)}).json()["items"]
    cost = sum(record["cost"]["amount_minor"] for record in usage)
    assert cost > 0 and gone["accrued_cost"] == {"amount_minor": cost, "currency": "USD"}
    assert gone["cost_projection"]["accrued_cost"] == gone["accrued_cost"]


def test_history_counts_filters_and_pages(lab: Lab) -> None:
    project = uuid.uuid4()
    _, token = member(lab, project)
    early = lab.launch(token, project)  # released before any node work: the launch is canceled
    assert lab.act(token, project, early["workload_id"], "release").status_code == 202
    assert lab.status(early["workload_id"]) == "released"
    launch = task_at(lab, token, project, early["task_href"])["task"]
    assert launch["status"] == "canceled"
    broken = lab.launch(token, project)  # provisioning fails
    node = row_of(lab, token, project, broken["workload_id"])["node_id"]
    lab.agent(node, "rejected")
    waiting = lab.launch(token, project)
    failed = row_of(lab, token, project, broken["workload_id"])
    assert failed["status"] == "failed" and failed["action_required"] and failed["needs_action"]
    assert failed["archived_at"] is None and failed["primary_action"] == "review"
    assert enabled(lab, token, project, broken["workload_id"]) == {"open"}
    assert task_at(lab, token, project, broken["task_href"])["task"]["status"] == "failed"

    listed = lab.ok(token, project, WORKLOADS)
    assert [r["id"] for r in listed["items"]] == [waiting["workload_id"], broken["workload_id"]]
    assert listed["counts"] == {"active": 0, "provisioning": 1, "needs_action": 1, "released": 1}
    assert [(b["workload_id"], b["severity"]) for b in listed["action_band"]] == [
        (broken["workload_id"], "error")]
    history = lab.ok(token, project, WORKLOADS, {"include_history": "true"})
    assert [r["id"] for r in history["items"]] == [
        waiting["workload_id"], broken["workload_id"], early["workload_id"]]
    assert history["counts"] == listed["counts"]  # counts cover the whole project
    by_status = lab.ok(token, project, WORKLOADS, {"status": "released"})  # a history query
    assert [r["id"] for r in by_status["items"]] == [early["workload_id"]]
    assert lab.ok(token, project, WORKLOADS, {"kind": "jupyter"})["items"] == []
    assert [r["id"] for r in lab.ok(token, project, WORKLOADS, {
        "search": broken["workload_id"][:13].upper()})["items"]] == [broken["workload_id"]]

    seen = walk(lab, token, project, COMPAT[WORKLOADS], {"include_history": "true", "page_size": 1})
    assert seen == [r["id"] for r in history["items"]]
    tasks = walk(lab, token, project, TASKS, {"page_size": 2})
    everything = lab.ok(token, project, TASKS)
    assert tasks == [t["id"] for t in everything["items"]] and len(tasks) == 4
    assert everything["counts"] == {"queued": 1, "running": 0, "succeeded": 1, "failed": 1}


def test_scope_cache_twins_and_input_limits(lab: Lab) -> None:
    project, other = uuid.uuid4(), uuid.uuid4()
    owner, token = member(lab, project)
    _, colleague = member(lab, project, funded=False)
    _, outsider = member(lab, other)
    launched = lab.launch(token, project)
    wid, task_id = launched["workload_id"], launched["task_id"]
    for template, path in ((WORKLOAD, {"workload_id": wid}), (TASK, {"task_id": task_id}),
                           (WORKLOAD, {"workload_id": str(uuid.uuid4())}),
                           (TASK, {"task_id": str(uuid.uuid4())})):
        hidden = lab.read(outsider, other, template, **path)  # another project's, or none
        assert hidden.status_code == 404 and hidden.json()["code"] == "allocation_not_found"
    for template, path in ((WORKLOADS, {}), (WORKLOAD, {"workload_id": wid}), (TASKS, {}),
                           (TASK, {"task_id": task_id})):
        assert lab.read(outsider, project, template, **path).status_code == 403  # not a member
        assert lab.read(token, project, template, **path).status_code == 200
    assert lab.ok(outsider, other, WORKLOADS)["items"] == []
    seen = lab.ok(colleague, project, WORKLOAD, workload_id=wid)["workload"]
    assert seen["cost_projection"]["basis"] == "owner_unavailable"  # not the owner's balance
    assert seen["cost_projection"]["balance"] is None
    assert seen["owner_user_id"] == str(owner)

    for template, path, params in ((WORKLOADS, {}, {"status": "requested"}),
                                   (WORKLOAD, {"workload_id": wid}, None), (TASKS, {}, None),
                                   (TASK, {"task_id": task_id}, None)):
        first = lab.read(token, project, template, params, **path)
        second = lab.read(token, project, template, params, **path)
        twin = lab.read(token, project, COMPAT[template], params, **path)
        assert second.headers["X-Read-Model-Cache"] == "hit"
        assert second.json()["meta"]["cache"] == "hit"
        assert first.headers["X-Read-Model-Cache"] in ("miss", "hit")
        assert {k: v for k, v in twin.json().items() if k != "meta"} == \
               {k: v for k, v in second.json().items() if k != "meta"}
    lab.read(token, project, WORKLOADS)
    assert lab.read(token, project, WORKLOADS).headers["X-Read-Model-Cache"] == "hit"
    assert lab.act(token, project, wid, "release").status_code == 202
    fresh = lab.read(token, project, WORKLOADS)  # a new event: a new cache key
    assert fresh.headers["X-Read-Model-Cache"] == "miss"

    for template, params, path in ((WORKLOADS, {"search": "x" * 121}, {}),
                                   (WORKLOADS, {"status": "bogus"}, {}),
                                   (WORKLOADS, {"page_size": 0}, {}),
                                   (WORKLOADS, {"cursor": "tampered"}, {}),
                                   (TASKS, {"status": "done"}, {}),
                                   (TASK, None, {"task_id": "not-a-uuid"}),
                                   (WORKLOAD, None, {"workload_id": "w" * 129})):
        refused = lab.read(token, project, template, params, **path)
        assert refused.status_code == 400, (template, params, refused.text)
    missing = lab.http.get(WORKLOADS, headers=bearer(token))
    assert missing.status_code == 400 and missing.json()["code"] == "validation_error"


def snapshot(lab: Lab) -> dict[str, list[Any]]:
    with lab.served.stores.query_pool.connection() as conn:
        return {table: conn.execute(f"SELECT * FROM readmodels.{table} ORDER BY 1").fetchall()
                for table in BY_NAME["workloads"].tables}


def test_a_rebuild_reproduces_the_workloads_read_model(lab: Lab) -> None:
    project = uuid.uuid4()
    _, token = member(lab, project)
    launched = lab.launch(token, project)
    node = row_of(lab, token, project, launched["workload_id"])["node_id"]
    lab.agent(node, "success")
    assert lab.act(token, project, launched["workload_id"], "restart").status_code == 202
    lab.ok(token, project, TASKS)  # the server's projector has applied everything
    stores = lab.served.stores
    before = snapshot(lab)
    assert before["v3_workload_rows"] and before["v3_tasks"]
    with stores.query_pool.connection() as conn:  # damage the read model
        conn.execute("DELETE FROM readmodels.v3_tasks WHERE kind = 'launch'")
        conn.execute("UPDATE readmodels.v3_workload_rows SET status = 'failed'")
    count = rebuild(stores.app, stores.read_models, BY_NAME["workloads"], batch_size=5)
    assert count == stores.app.recorder.max_notification_id()
    assert snapshot(lab) == before
    detail = lab.ok(token, project, WORKLOAD, workload_id=launched["workload_id"])
    assert detail["workload"]["status"] == "restarting"
    assert lab.act(token, project, launched["workload_id"], "release").status_code == 202
    lab.agent(node, "success")
    assert row_of(lab, token, project, launched["workload_id"])["status"] == "released"
