"""Allocation queries through HTTP on a database of their own: the caller's, project,
org and admin lists, one lease, and its timeline, every answer checked against the
contract. Leases are driven through the real commands (launch, createAllocation, the
node agent's task channel, release, restart, the operator's force-release and
force-cleanup); every read sends back the ``X-Ledger-Position`` of the last command."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from api.auth import mint_token
from api.consistency import wait_for
from consumers.direct import read_items
from consumers.rebuild import rebuild
from domain.admission import personal_org_id
from domain.allocations import Allocation
from domain.app import Ledgercore
from domain.skus import iso
from infra.db import ensure_schemas, read_model_datastore
from projections import BY_NAME
from projections.allocations import allocation_head, get_allocation, list_allocations, timeline_page
from projections.store import SCHEMA, ReadModelStore
from tests.conftest import Served, serve_own_database
from tests.contract.schemas import error_schema, errors_in
from tests.contract.test_contract import check
from tests.harness import bearer, client
from tests.integration.test_inventory_commands import baremetal_sku, fund, make_node, make_sku

LIST, ONE = "/api/v1/allocations", "/api/v1/allocations/{allocation_id}"
TIMELINE = "/api/v1/allocations/{allocation_id}/timeline"
PROJECT_LIST = "/api/v1/projects/{project_id}/allocations"
PROJECT_ONE = "/api/v1/projects/{project_id}/allocations/{allocation_id}"
ORG_LIST = "/api/v1/orgs/{org_id}/allocations"
ORG_ONE = "/api/v1/orgs/{org_id}/allocations/{allocation_id}"
ADMIN_LIST = "/api/v1/admin/allocations"
ADMIN_TIMELINE = "/api/v1/admin/allocations/{allocation_id}/timeline"
LAUNCH, CREATE = "/api/v1/launch/compute", "/api/v1/allocations"
RELEASE = "/api/v1/allocations/{allocation_id}/release"
RESTART = "/api/v1/allocations/{allocation_id}/restart"
FORCE_RELEASE = "/api/v1/admin/allocations/{allocation_id}/force-release"
FORCE_CLEANUP = "/api/v1/admin/allocations/{allocation_id}/force-cleanup"
WAIT = "/internal/v1/nodes/{node_id}/tasks/wait"
RESULT = "/internal/v1/nodes/{node_id}/tasks/{task_id}/result"
RANK = {"pending": 0, "running": 1}


@dataclass
class Member:
    user: uuid.UUID
    project: uuid.UUID
    tenant: uuid.UUID | None
    token: str


class Api:
    """The server, the callers' requests, and the highest ``X-Ledger-Position`` any
    command answered (every read waits for it)."""

    def __init__(self, served: Served, http: httpx.Client, tokens: Any):
        self.served, self.http, self.tokens = served, http, tokens
        self.admin = tokens.admin()
        self.position = 0

    def member(self, project: uuid.UUID, tenant: uuid.UUID | None) -> Member:
        user = uuid.uuid4()
        token = mint_token(self.tokens.secret, user_id=user, tenant_id=tenant,
                           project_ids=[str(project)])
        self.note(fund(self.http, self.admin, user))
        return Member(user, project, tenant, token)

    def note(self, response: httpx.Response) -> httpx.Response:
        self.position = max(self.position, int(response.headers.get("X-Ledger-Position", 0)))
        return response

    def post(self, token: str, template: str, body: Any = None, project: uuid.UUID | None = None,
             **params: Any) -> httpx.Response:
        headers = {**bearer(token), "Idempotency-Key": uuid.uuid4().hex}
        if project is not None:
            headers["X-Project-ID"] = str(project)
        response = self.http.post(template.format(**params), json=body, headers=headers)
        check("POST", template, response)
        return self.note(response)

    def get(self, token: str, template: str, project: uuid.UUID | None = None,
            **params: Any) -> httpx.Response:
        path = {k: v for k, v in params.items() if "{" + k + "}" in template}
        query = {k: v for k, v in params.items() if k not in path and v is not None}
        headers = {**bearer(token), "X-Ledger-Position": str(self.position)}
        if project is not None:
            headers["X-Project-ID"] = str(project)
        response = self.http.get(template.format(**path), params=query, headers=headers)
        check("GET", template, response)
        if response.status_code == 200:
            assert response.headers["X-Read-Model-Cache"] != "stale"
        return response

    def walk(self, token: str, template: str, page_size: int,
             **params: Any) -> list[dict[str, Any]]:
        """Every item of a list, page by page."""
        items, cursor = [], None
        while True:
            response = self.get(token, template, page_size=page_size, cursor=cursor, **params)
            assert response.status_code == 200, response.text
            body = response.json()
            assert len(body["items"]) <= page_size and body["pagination"]["page_size"] == page_size
            items += body["items"]
            cursor = body["pagination"]["next_cursor"]
            if cursor is None:
                return items

    # ---- leases ---------------------------------------------------------------------------
    def launch(self, member: Member, sku: str) -> dict[str, Any]:
        response = self.post(member.token, LAUNCH, {"sku": sku}, project=member.project)
        assert response.status_code == 202, response.text
        found = self.get(member.token, ONE, project=member.project,
                         allocation_id=response.json()["workload_id"])
        assert found.status_code == 200, found.text  # read-after-write
        return found.json()

    def create(self, member: Member, body: dict[str, Any]) -> list[dict[str, Any]]:
        response = self.post(member.token, CREATE, {"scheduler_type": "bare_metal", **body},
                             project=member.project)
        assert response.status_code == 201, response.text
        return response.json()["allocations"]

    def timeline(self, allocation_id: str, limit: int = 200) -> dict[str, Any]:
        response = self.get(self.admin, ADMIN_TIMELINE, allocation_id=allocation_id, limit=limit)
        assert response.status_code == 200, response.text
        return response.json()


class Agent:
    """A node agent on the task channel."""

    def __init__(self, api: Api, node_id: str):
        self.api, self.node_id = api, node_id
        self.headers = bearer(mint_token(api.tokens.secret, user_id=node_id, actor_type="node"))

    def take(self) -> dict[str, Any]:
        response = self.api.http.get(WAIT.format(node_id=self.node_id), headers=self.headers)
        check("GET", WAIT, response)
        assert response.status_code == 200, response.text
        return self.api.note(response).json()

    def report(self, task: dict[str, Any], status: str) -> None:
        body = {"status": status, "completed_at": datetime.now(timezone.utc).isoformat(),
                "output": {"host": "10.9.9.9", "secret_material": "never shown"},
                **({"error": "gpu xid 79"} if status != "success" else {})}
        response = self.api.http.post(RESULT.format(node_id=self.node_id, task_id=task["task_id"]),
                                      json=body, headers=self.headers)
        check("POST", RESULT, response)
        assert response.status_code == 200, response.text
        self.api.note(response)


@pytest.fixture(scope="module")
def served(services: Any) -> Iterator[Served]:
    with serve_own_database(services) as found:
        yield found


@pytest.fixture
def api(served: Served, tokens: Any) -> Iterator[Api]:
    with client(served.url) as http:
        yield Api(served, http, tokens)


def new_sku(api: Api, nodes: int) -> tuple[str, list[str]]:
    sku = f"aq-{uuid.uuid4().hex[:6]}"
    make_sku(api.http, api.admin, baremetal_sku(sku))
    return sku, [make_node(api.http, api.admin, sku)["id"] for _ in range(nodes)]


def newest_first(items: list[dict[str, Any]]) -> bool:
    keys = [(item["created_at"], item["id"]) for item in items]
    return keys == sorted(keys, reverse=True) and len(set(keys)) == len(keys)


def ids(items: list[dict[str, Any]]) -> set[str]:
    return {item["id"] for item in items}


def test_lists_scope_page_and_filter_and_details_answer_what_commands_did(api: Api) -> None:
    sku, nodes = new_sku(api, 7)
    tenant, project, other_project = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    a, b = api.member(project, tenant), api.member(project, tenant)
    c = api.member(other_project, tenant)
    mine = api.create(a, {"requested_count": 3, "scheduler_request": {"sku": sku}})
    mine.append(api.launch(a, sku))
    used = {allocation["node_id"] for allocation in mine}
    (teammates,) = api.create(b, {"node_id": next(n for n in nodes if n not in used)})
    elsewhere = api.launch(c, sku)

    # listAllocations: the caller's own leases in the project, newest first, with their limits
    listed = api.walk(a.token, LIST, 3, project=a.project)
    assert ids(listed) == ids(mine) and len(listed) == 4 and newest_first(listed)
    first = api.get(a.token, LIST, project=a.project).json()
    assert first["limits"] == {"max_concurrent_allocations": 5, "current_concurrent_allocations": 4,
                               "available_allocation_slots": 1}
    assert first["pagination"] == {"next_cursor": None, "page_size": 50}
    assert first["items"] == listed
    # every lease of the project; the org's; the admin's, by user, node and status
    in_project = api.walk(a.token, PROJECT_LIST, 2, project_id=project)
    assert ids(in_project) == ids(mine) | {teammates["id"]} and newest_first(in_project)
    in_org = api.walk(c.token, ORG_LIST, 4, org_id=tenant)
    assert ids(in_org) == ids(mine) | {teammates["id"], elsewhere["id"]} and newest_first(in_org)
    assert ids(api.walk(api.admin, ADMIN_LIST, 1, user_id=a.user)) == ids(mine)
    by_node = api.walk(api.admin, ADMIN_LIST, 5, node_id=teammates["node_id"])
    assert ids(by_node) == {teammates["id"]}
    assert ids(api.walk(api.admin, ADMIN_LIST, 5, user_id=a.user, status="requested")) == ids(mine)
    assert api.walk(api.admin, ADMIN_LIST, 5, user_id=a.user, status="active") == []
    assert api.walk(a.token, LIST, 5, project=a.project, status="released") == []
    limits = api.get(api.admin, ADMIN_LIST, user_id=b.user).json()["limits"]
    assert limits["current_concurrent_allocations"] == 1  # the filtered user's limits

    # one lease: the same JSON as the command answered, in every scope that holds it
    assert api.get(b.token, ONE, project=project, allocation_id=teammates["id"]).json() == teammates
    assert api.get(a.token, ONE, project=project, allocation_id=teammates["id"]).json() == teammates
    assert api.get(a.token, PROJECT_ONE, project_id=project,
                   allocation_id=teammates["id"]).json() == teammates
    assert api.get(c.token, ORG_ONE, org_id=tenant,
                   allocation_id=teammates["id"]).json() == teammates
    assert {item["id"]: item for item in in_org}[teammates["id"]] == teammates

    # scoping: another project's lease is 404 exactly like a random id; no membership 403
    def refusal(response: httpx.Response, status: int) -> dict[str, Any]:
        assert response.status_code == status, response.text
        return {k: v for k, v in response.json().items() if k != "correlation_id"}

    random_id = str(uuid.uuid4())
    for template, scope in ((ONE, {"project": project}), (TIMELINE, {"project": project}),
                            (PROJECT_ONE, {"project_id": project})):
        hidden = refusal(api.get(a.token, template, allocation_id=elsewhere["id"], **scope), 404)
        unknown = refusal(api.get(a.token, template, allocation_id=random_id, **scope), 404)
        assert hidden["code"] == "allocation_not_found"
        assert hidden == {**unknown, "details": {"allocation_id": elsewhere["id"]}}
    other_org = uuid.uuid4()
    assert refusal(api.get(a.token, ORG_ONE, org_id=other_org, allocation_id=mine[0]["id"]), 403)
    assert refusal(api.get(a.token, ORG_LIST, org_id=other_org), 403)
    assert refusal(api.get(a.token, PROJECT_LIST, project_id=other_project), 403)
    assert refusal(api.get(a.token, PROJECT_ONE, project_id=other_project,
                           allocation_id=elsewhere["id"]), 403)
    # listAllocations declares no 403, but a project the caller is not in is refused all
    # the same (allocations §7: undeclared statuses are returned anyway)
    outsider = api.http.get(LIST, headers={**bearer(a.token), "X-Project-ID": str(other_project)})
    assert outsider.status_code == 403 and not errors_in(outsider.json(), error_schema())
    for template, params in ((ADMIN_LIST, {}), (ADMIN_TIMELINE, {"allocation_id": mine[0]["id"]})):
        assert refusal(api.get(a.token, template, **params), 403)["code"] == "admin_required"
    # a caller without a tenant reads the personal org its leases are filed under
    loner = api.member(uuid.uuid4(), None)
    own = api.launch(loner, sku)
    assert own["org_id"] == str(personal_org_id(loner.user))
    assert ids(api.walk(loner.token, ORG_LIST, 5, org_id=own["org_id"])) == {own["id"]}


def assert_grew_from(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> None:
    """``after`` extends ``before``: items appended, each only moved forward in place."""
    assert len(after) >= len(before)
    for old, new in zip(before, after):
        assert {k: new[k] for k in ("kind", "name", "task_id", "node_id")} == \
               {k: old[k] for k in ("kind", "name", "task_id", "node_id")}
        if old["status"] not in RANK:
            assert new == old  # a final item never changes
        else:
            assert RANK.get(new["status"], 2) >= RANK[old["status"]]
            assert old["started_at"] in (None, new["started_at"])


def test_the_timeline_grows_through_a_lifecycle_and_pages_each_item_once(api: Api) -> None:
    sku, (node,) = new_sku(api, 1)
    member = api.member(uuid.uuid4(), uuid.uuid4())
    agent = Agent(api, node)
    lease = api.launch(member, sku)
    allocation_id, scope = lease["id"], {"project": member.project}
    seen = api.timeline(allocation_id)["items"]
    assert [(i["kind"], i["name"], i["status"]) for i in seen] == [
        ("allocation_state", "requested", "running"),
        ("placement_claim", "node_exclusive", "pending"),
        ("node_task", "allocation.provision", "pending")]

    def step(action: Any, status: str) -> None:
        nonlocal seen
        action()
        body = api.timeline(allocation_id)
        assert body["status"] == status and body["allocation_id"] == allocation_id
        assert_grew_from(seen, body["items"])
        seen = body["items"]
        user_view = api.get(member.token, TIMELINE, allocation_id=allocation_id, limit=200, **scope)
        assert user_view.json()["items"] == seen
        now = api.get(member.token, ONE, allocation_id=allocation_id, **scope).json()
        assert now["status"] == status

    def run_task(result: str) -> Any:
        return lambda: agent.report(agent.take(), result)

    def request(template: str) -> Any:
        return lambda: api.post(member.token, template, project=member.project,
                                allocation_id=allocation_id)

    step(lambda: agent.take(), "provisioning")
    step(lambda: agent.report(agent.take(), "success"), "active")
    step(request(RESTART), "restarting")
    step(run_task("failed"), "restart_failed")
    step(request(RESTART), "restarting")
    step(run_task("success"), "active")
    step(request(RELEASE), "releasing")
    step(run_task("success"), "released")

    states = [(i["name"], i["status"]) for i in seen if i["kind"] == "allocation_state"]
    assert states == [("requested", "succeeded"), ("provisioning", "succeeded"),
                      ("active", "succeeded"), ("restarting", "failed"),
                      ("restart_failed", "failed"), ("restarting", "succeeded"),
                      ("active", "succeeded"), ("releasing", "succeeded"),
                      ("released", "succeeded")]
    tasks = [(i["name"], i["status"]) for i in seen if i["kind"] == "node_task"]
    assert tasks == [("allocation.provision", "succeeded"), ("allocation.restart", "failed"),
                     ("allocation.restart", "succeeded"), ("allocation.release", "succeeded")]
    assert [(i["name"], i["status"], i["node_id"]) for i in seen
            if i["kind"] == "placement_claim"] == [("node_exclusive", "succeeded", node)]
    assert all(i["duration_seconds"] is None or i["duration_seconds"] >= 0 for i in seen)
    assert all(i["completed_at"] for i in seen)  # nothing left open once released
    assert "gpu xid 79" in next(i["summary"] for i in seen if i["name"] == "restart_failed")
    assert "never shown" not in str(seen)  # no raw task output

    # newest items first; each page in ascending order; every item exactly once
    pages, cursor = [], None
    while True:
        page = api.get(member.token, TIMELINE, allocation_id=allocation_id, limit=4,
                       cursor=cursor, **scope).json()
        pages.append(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [len(p) for p in pages] == [4, 4, 4, 2]
    assert [item for page in reversed(pages) for item in page] == seen
    default = api.get(member.token, TIMELINE, allocation_id=allocation_id, **scope).json()
    assert default["items"] == seen and default["next_cursor"] is None  # default limit 50

    # the status filter sees the lease where it is now
    assert ids(api.walk(member.token, LIST, 5, project=member.project, status="released")) \
        == {allocation_id}
    assert api.walk(member.token, LIST, 5, project=member.project, status="active") == []


def test_operator_force_release_and_cleanup_show_on_the_timeline(api: Api) -> None:
    sku, nodes = new_sku(api, 2)
    member = api.member(uuid.uuid4(), uuid.uuid4())
    stuck, unstarted = api.launch(member, sku), api.launch(member, sku)
    agent = Agent(api, stuck["node_id"])
    assert agent.take()["task_type"] == "allocation.provision"
    cleanup = {"reason": "node wiped by hand"}
    api.post(api.admin, FORCE_CLEANUP, cleanup, allocation_id=stuck["id"])
    failed = api.timeline(stuck["id"])
    assert failed["status"] == "failed"
    assert [(i["kind"], i["name"], i["status"]) for i in failed["items"]] == [
        ("allocation_state", "requested", "succeeded"),
        ("placement_claim", "node_exclusive", "failed"),
        ("node_task", "allocation.provision", "skipped"),
        ("allocation_state", "provisioning", "failed"),
        ("allocation_state", "failed", "failed")]
    assert failed["items"][-1]["summary"] == "node wiped by hand"
    api.post(api.admin, FORCE_CLEANUP, {**cleanup, "runtime_verified_absent": True},
             allocation_id=stuck["id"])
    cleaned = api.timeline(stuck["id"])
    assert_grew_from(failed["items"], cleaned["items"])
    assert cleaned["items"][-1] | {"started_at": None, "completed_at": None} == {
        "kind": "allocation_state", "name": "released", "status": "succeeded", "task_id": None,
        "node_id": None, "started_at": None, "completed_at": None, "duration_seconds": 0,
        "summary": "cleaned up by an operator"}

    api.post(api.admin, FORCE_RELEASE, {"reason": "unpaid"}, allocation_id=unstarted["id"])
    released = api.timeline(unstarted["id"])["items"]
    assert [(i["kind"], i["name"], i["status"], i["summary"]) for i in released] == [
        ("allocation_state", "requested", "succeeded", None),
        ("placement_claim", "node_exclusive", "succeeded", None),
        ("node_task", "allocation.provision", "skipped", "replaced by a later request"),
        ("allocation_state", "releasing", "succeeded", "force-released by an operator"),
        ("allocation_state", "released", "succeeded", "released before any node work")]
    done = api.walk(api.admin, ADMIN_LIST, 5, user_id=member.user, status="released")
    assert ids(done) == {stuck["id"], unstarted["id"]}
    claims = {a["id"]: [c["status"] for c in a["placement_claims"]] for a in done}
    assert claims == {stuck["id"]: ["failed"], unstarted["id"]: ["released"]}
    assert api.get(member.token, LIST, project=member.project).json()["limits"][
        "current_concurrent_allocations"] == 0


def test_bad_cursors_page_sizes_limits_and_filters_are_refused(api: Api) -> None:
    sku, _ = new_sku(api, 2)
    member = api.member(uuid.uuid4(), uuid.uuid4())
    other = api.member(member.project, member.tenant)
    lease, _ = api.launch(member, sku), api.launch(member, sku)
    scope = {"project": member.project}
    cursor = api.get(member.token, LIST, page_size=1, **scope).json()["pagination"]["next_cursor"]
    assert cursor

    def code(response: httpx.Response) -> str:
        assert response.status_code == 400, response.text
        return response.json()["code"]

    for bad in ("garbage", cursor[:-2] + "xy"):
        assert code(api.get(member.token, LIST, cursor=bad, **scope)) == "invalid_request"
    # a cursor is good for its own operation, filters and caller only
    assert code(api.get(member.token, LIST, cursor=cursor, status="requested", **scope)) \
        == "invalid_request"
    assert code(api.get(member.token, PROJECT_LIST, project_id=member.project,
                        cursor=cursor)) == "invalid_request"
    assert code(api.get(other.token, LIST, cursor=cursor, **scope)) == "invalid_request"
    timeline_cursor = api.get(member.token, TIMELINE, allocation_id=lease["id"], limit=1,
                              **scope).json()["next_cursor"]
    assert code(api.get(member.token, TIMELINE, allocation_id=lease["id"], cursor="nope",
                        **scope)) == "invalid_request"
    assert code(api.get(api.admin, ADMIN_TIMELINE, allocation_id=lease["id"],
                        cursor=timeline_cursor)) == "invalid_request"
    for size in (0, 201):
        assert code(api.get(member.token, LIST, page_size=size, **scope)) == "validation_error"
        assert code(api.get(api.admin, ADMIN_LIST, page_size=size)) == "validation_error"
        assert code(api.get(member.token, TIMELINE, allocation_id=lease["id"], limit=size,
                            **scope)) == "validation_error"
    assert code(api.get(member.token, LIST, status="running", **scope)) == "validation_error"
    assert code(api.get(api.admin, ADMIN_LIST, user_id="not-a-uuid")) == "validation_error"
    assert code(api.get(member.token, ONE, allocation_id="not-a-uuid", **scope)) \
        == "validation_error"
    assert code(api.get(member.token, LIST)) == "validation_error"  # no X-Project-ID


def test_reads_follow_each_command_they_are_sent_the_position_of(api: Api) -> None:
    sku, _ = new_sku(api, 3)
    member = api.member(uuid.uuid4(), uuid.uuid4())
    scope = {"project": member.project}
    for _ in range(3):
        lease = api.launch(member, sku)  # reads it back at the launch's position
        answer = api.post(member.token, RELEASE, project=member.project,
                          allocation_id=lease["id"]).json()["allocation"]
        now = api.get(member.token, ONE, allocation_id=lease["id"], **scope)
        assert now.json() == answer and now.json()["status"] == "released"
        assert int(now.headers["X-Ledger-Read-Position"]) >= api.position


def test_a_lease_recorded_without_its_scope_is_kept_but_never_served(
        new_database: Any, settings_for: Any) -> None:
    """Leases imported without an org (or planted by tests with a bare lease) must not
    stop the read model (a batch that fails stalls every read model): they keep a row
    and a timeline, and no query answers them. (The workloads read model, applied in the
    same batch, keeps no row for them.)"""
    settings = settings_for(new_database().dsn)
    ensure_schemas(settings.pg_dsn)
    store = ReadModelStore(read_model_datastore(settings), [
        BY_NAME["inventory"], BY_NAME["allocations"], BY_NAME["workloads"]])
    store.create_table()
    app = Ledgercore(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    now = datetime.now(timezone.utc)
    whole = {"requested_by_user_id": str(uuid.uuid4()), "project_id": str(uuid.uuid4()),
             "org_id": str(uuid.uuid4()), "node_id": str(uuid.uuid4()), "sku": "s",
             "capacity_shape": "baremetal", "gpus_total": 8, "created_at": iso(now),
             "hourly_rate": {"amount_minor": 100, "currency": "USD"}}
    leases = ({}, {**whole, "org_id": None}, {**whole, "project_id": "not-a-uuid"},
              {**whole, "created_at": "yesterday"}, whole)
    planted = [Allocation._create(Allocation.Created, id=uuid.uuid4(), lease=lease,
                                  provenance={}, timestamp=now) for lease in leases]
    for allocation in planted:
        allocation.trigger_event(Allocation.Moved, to="provisioning", reason=None, details={},
                                 provenance={}, timestamp=now)
    app.save(*planted)
    items = read_items(app, 0, 100)
    store.apply_batch("log", items, watermark=items[-1].notification_id)
    *odd, served = planted
    with psycopg.connect(settings.pg_dsn, row_factory=dict_row) as conn, conn.cursor() as cur:
        assert [found.id for found in list_allocations(cur, SCHEMA, limit=10)] == [served.id]
        assert get_allocation(cur, SCHEMA, served.id).body["status"] == "provisioning"
        for allocation in odd:
            assert get_allocation(cur, SCHEMA, allocation.id) is None
            assert allocation_head(cur, SCHEMA, allocation.id) is None
            assert [item["name"] for _, item in timeline_page(
                cur, SCHEMA, allocation.id, before=None, limit=5)] == ["provisioning", "requested"]
    store.datastore.close()


def settle(served: Served) -> None:
    """Wait for the server's projector to apply the whole log (applying it here as
    well would race it)."""
    last = served.stores.app.recorder.max_notification_id()
    assert wait_for(served.stores, "allocations", last, 10)[0]


def snapshot(served: Served) -> dict[str, list[Any]]:
    with served.stores.query_pool.connection() as conn:
        return {table: conn.execute(f"SELECT * FROM readmodels.{table} ORDER BY 1, 2").fetchall()
                for table in BY_NAME["allocations"].tables}


def test_a_rebuild_reproduces_the_allocations_read_model(api: Api) -> None:
    sku, (node,) = new_sku(api, 1)
    member = api.member(uuid.uuid4(), uuid.uuid4())
    lease = api.launch(member, sku)
    agent = Agent(api, node)
    agent.report(agent.take(), "success")
    stores = api.served.stores
    settle(api.served)
    before = snapshot(api.served)
    assert before["allocations"] and before["allocation_timeline"]
    with stores.query_pool.connection() as conn:  # damage the read model
        conn.execute("DELETE FROM readmodels.allocation_timeline WHERE seq > 1")
        conn.execute("UPDATE readmodels.allocations SET status = 'failed'")
    # small batches split the saves (a lease's claims, itself and its first task)
    count = rebuild(stores.app, stores.read_models, BY_NAME["allocations"], batch_size=3)
    assert count == stores.app.recorder.max_notification_id()
    assert snapshot(api.served) == before
    settle(api.served)  # the live projector has nothing left to add
    assert snapshot(api.served) == before
    assert api.get(member.token, ONE, project=member.project,
                   allocation_id=lease["id"]).json()["status"] == "active"
