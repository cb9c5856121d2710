"""App-instance commands through HTTP on real Postgres, every response checked against
the contract: create (gates, idempotency), the lifecycle driven by the adapter's
reports, member and repair operations, the V3 family and its compat twins. Refusals
append no domain event; a report repeated appends nothing; Gone absorbs.

The catalog and entitlements are seeded with the domain commands through the server's
own application (their HTTP routes are not part of this module)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from api.app import create_app
from api.auth import mint_token
from domain.app_instances import AppInstance
from domain.apps import publish_version, register_app, register_version, upsert_entitlement
from domain.errors import DomainError
from domain.provenance import CommandContext
from infra.db import Stores
from tests.contract.test_contract import check
from tests.harness import ServerThread, bearer, client
from tests.integration.test_inventory_commands import appended, fund

B = "/api/v1/projects/{project_id}/app-instances"
ONE = B + "/{app_instance_id}"
REPORT = ONE + "/report"
MEMBERS = ONE + "/members"
MEMBER = MEMBERS + "/{member_id}"
MEMBER_REPORT = MEMBER + "/report"
OPS = ONE + "/member-operations"
OP = OPS + "/{operation_id}"
OP_REPORT = OP + "/report"
REPAIR = ONE + "/repair"
REPAIRS = ONE + "/repair-operations"
REPAIR_ONE = REPAIRS + "/{repair_operation_id}"
REPAIR_REPORT = REPAIR_ONE + "/report"
V3 = "/api/v1/apps/instances/{app_instance_id}"
COMPAT = "/api/v1/v3/apps/instances/{app_instance_id}"
#: the platform-managed k8s app every test launches: versions 1 and 2 published, 3 not
VERSIONS = ("1", "2")
MANIFEST = {"operating_modes": ["platform_managed"], "pricing": [
    {"component": "control_plane", "usage_unit": "instance_hour",
     "unit_price": {"amount_minor": 360, "currency": "USD"}}]}


def _render(result: Any) -> dict[str, Any]:
    if isinstance(result, DomainError):
        raise result
    return {"status": 200, "body": result}


def seed(stores: Stores, command: Any, **kwargs: Any) -> None:
    """Run a domain command through the server's batch writer (as an operator would)."""
    ctx = CommandContext(actor_id=str(uuid.uuid4()), actor_type="user", actor_role="admin",
                         source="admin")
    stores.app.submit(command(ctx, render=_render, **kwargs)).result(timeout=30)


def seed_catalog(stores: Stores) -> str:
    """A fresh app (a random slug: the database is shared) and its versions."""
    slug = f"serve-{uuid.uuid4().hex[:8]}"
    seed(stores, register_app, slug=slug, display_name="Serve", category="inference",
         publisher="core42")
    for version in VERSIONS + ("3",):
        seed(stores, register_version, slug=slug, version=version, runtime_backend="k8s",
             manifest=MANIFEST)
    for version in VERSIONS:
        seed(stores, publish_version, slug=slug, version=version)
    return slug


@dataclass
class Member:
    """A funded user of a project entitled to the app, and the project's adapter."""

    user: uuid.UUID
    project: uuid.UUID
    token: str
    adapter: str


class Apps:
    """The server, its stores, and requests checked against the contract. Every read
    sends back the highest ``X-Ledger-Position`` a command answered."""

    def __init__(self, url: str, stores: Stores, http: httpx.Client, tokens: Any, slug: str):
        self.url, self.stores, self.http, self.tokens, self.slug = url, stores, http, tokens, slug
        self.admin = tokens.admin()
        self.position = 0

    def member(self, *, entitled: bool = True, projects: int = 1) -> Member:
        user = uuid.uuid4()
        ids = [uuid.uuid4() for _ in range(projects)]
        token = mint_token(self.tokens.secret, user_id=user, project_ids=[str(p) for p in ids])
        fund(self.http, self.admin, user)
        if entitled:
            seed(self.stores, upsert_entitlement, project_id=ids[0], slug=self.slug, enabled=True,
                 policy_overrides=None)
        return Member(user, ids[0], token, self.adapter(ids[0]))

    def adapter(self, project: uuid.UUID) -> str:
        return mint_token(self.tokens.secret, user_id=uuid.uuid4(), actor_type="service_account",
                          project_id=str(project))

    def note(self, response: httpx.Response) -> httpx.Response:
        self.position = max(self.position, int(response.headers.get("X-Ledger-Position", 0)))
        return response

    def send(self, method: str, token: str, template: str, body: Any = None, *,
             key: str | None = None, project: uuid.UUID | None = None,
             **params: Any) -> httpx.Response:
        path = {k: v for k, v in params.items() if "{" + k + "}" in template}
        query = {k: v for k, v in params.items() if k not in path and v is not None}
        headers = {**bearer(token), "X-Ledger-Position": str(self.position)}
        if key is not None:
            headers["Idempotency-Key"] = key
        if project is not None:
            headers["X-Project-ID"] = str(project)
        response = self.http.request(method, template.format(**path), json=body, params=query,
                                     headers=headers)
        check(method, template, response)
        return self.note(response)

    def post(self, token: str, template: str, body: Any = None, **kw: Any) -> httpx.Response:
        return self.send("POST", token, template, body, **kw)

    def get(self, token: str, template: str, **kw: Any) -> httpx.Response:
        response = self.send("GET", token, template, **kw)
        if response.status_code == 200:
            assert response.headers["X-Read-Model-Cache"] != "stale"
        return response

    # ---- shortcuts --------------------------------------------------------------------------
    def create(self, m: Member, **extra: Any) -> dict[str, Any]:
        body = {"app_slug": self.slug, "app_version": "1", "display_name": "serve", **extra}
        response = self.post(m.token, B, body, key=uuid.uuid4().hex, project_id=m.project)
        assert response.status_code == 202, response.text
        return response.json()

    def report(self, m: Member, instance: dict[str, Any], status: str,
               **fields: Any) -> httpx.Response:
        return self.post(m.adapter, REPORT, {"status": status, **fields},
                         project_id=m.project, app_instance_id=instance["id"])

    def running(self, m: Member) -> dict[str, Any]:
        instance = self.create(m)
        assert self.report(m, instance, "running").status_code == 200
        return instance

    def act(self, m: Member, instance: dict[str, Any], action: str, body: Any = None,
            key: str | None = None) -> httpx.Response:
        return self.post(m.token, ONE + "/" + action, body, key=key or uuid.uuid4().hex,
                         project_id=m.project, app_instance_id=instance["id"])

    def events(self) -> int:
        return appended(self.stores)


@pytest.fixture(scope="module")
def served(shared_database: Any, services: Any) -> Iterator[tuple[str, Stores, str]]:
    from tests.conftest import make_settings

    settings = make_settings(services, shared_database.dsn)
    stores = Stores.open(settings)
    try:
        with ServerThread(create_app(settings, stores)) as server:
            yield server.url, stores, seed_catalog(stores)
    finally:
        stores.close()


@pytest.fixture
def apps(served: tuple[str, Stores, str], tokens: Any) -> Iterator[Apps]:
    url, stores, slug = served
    with client(url) as http:
        yield Apps(url, stores, http, tokens, slug)


def without_correlation(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "correlation_id"}


# ---- create ---------------------------------------------------------------------------------------
def test_create_answers_the_instance_and_a_replay_answers_it_again(apps: Apps) -> None:
    m = apps.member()
    body = {"app_slug": apps.slug, "app_version": "1", "display_name": "my serve",
            "config": {"replicas": 2}}
    created = apps.post(m.token, B, body, key="create-1", project_id=m.project)
    assert created.status_code == 202, created.text
    instance = created.json()
    assert instance["status"] == "requested" and instance["project_id"] == str(m.project)
    assert (instance["app_slug"], instance["app_version"], instance["display_name"]) == \
        (apps.slug, "1", "my serve")
    assert (instance["operating_mode"], instance["control_plane_scope"],
            instance["runtime_backend"]) == ("platform_managed", "platform", "k8s")
    assert instance["requested_by_user_id"] == str(m.user)
    before = apps.events()
    replay = apps.post(m.token, B, body, key="create-1", project_id=m.project)
    assert replay.status_code == 202 and replay.json() == instance
    assert replay.headers["Idempotent-Replayed"] == "true"
    reused = apps.post(m.token, B, {**body, "display_name": "other"}, key="create-1",
                       project_id=m.project)
    assert reused.status_code == 409 and reused.json()["details"]["reason"] == "idempotency_key_reused"
    assert apps.events() == before


def test_create_refusals_append_nothing(apps: Apps, tokens: Any) -> None:
    m = apps.member()
    unentitled = apps.member(entitled=False)
    body = {"app_slug": apps.slug, "app_version": "1", "display_name": "x"}
    before = apps.events()
    cases = [
        (m, {**body, "app_slug": "no-such-app"}, 404, "app_not_found"),
        (m, {**body, "app_version": "9"}, 404, "app_version_not_found"),
        (m, {**body, "app_version": "3"}, 409, "invalid_request"),  # registered, unpublished
        (unentitled, body, 403, "app_not_entitled"),
        (m, {**body, "app_slug": "Bad Slug"}, 400, "validation_error"),
        (m, {**body, "surprise": 1}, 400, "validation_error"),
        (m, {**body, "display_name": ""}, 400, "validation_error"),
        (m, {**body, "placement_intent": {"target_allocation_id": "nope"}}, 400,
         "validation_error"),
    ]
    for caller, sent, status, code in cases:
        response = apps.post(caller.token, B, sent, key=uuid.uuid4().hex,
                             project_id=caller.project)
        assert (response.status_code, response.json()["code"]) == (status, code), (sent, response.text)
    stranger = mint_token(tokens.secret, user_id=uuid.uuid4(), project_ids=[str(uuid.uuid4())])
    refused = apps.post(stranger, B, body, key=uuid.uuid4().hex, project_id=m.project)
    assert refused.status_code == 403
    assert apps.events() == before


# ---- scope ----------------------------------------------------------------------------------------
def test_an_instance_of_another_project_is_not_found_like_a_random_id(apps: Apps) -> None:
    both = apps.member(projects=2)
    other = apps.member()
    theirs = apps.create(other)
    # a caller who belongs to two projects addresses project B's instance under project A
    token, adapter = both.token, apps.adapter(both.project)
    before = apps.events()
    bodies = []
    for target in (theirs["id"], str(uuid.uuid4())):
        params = {"project_id": both.project, "app_instance_id": target}
        answers = [
            apps.post(token, ONE + "/stop", key=uuid.uuid4().hex, **params),
            apps.post(token, ONE + "/upgrade", {"app_version": "2"}, key=uuid.uuid4().hex,
                      **params),
            apps.send("DELETE", token, REPORT, key=uuid.uuid4().hex, **params),
            apps.post(adapter, REPORT, {"status": "running"}, **params),
            apps.post(token, OPS, {"action": "add", "component_key": "w"},
                      key=uuid.uuid4().hex, **params),
            apps.post(token, REPAIR, {"action": "reconcile", "scope": "whole_runtime"},
                      key=uuid.uuid4().hex, **params),
            apps.get(token, ONE, **params),
            apps.get(token, MEMBERS, **params),
            apps.post(token, V3 + "/stop", key=uuid.uuid4().hex, project=both.project,
                      app_instance_id=target),
            apps.get(token, V3, project=both.project, app_instance_id=target),
        ]
        for answer in answers:
            assert answer.status_code == 404, answer.text
            assert answer.json()["code"] == "app_instance_not_found"
        bodies.append([without_correlation(a.json()) for a in answers])
    # identical but for the id asked about
    mine = [{**b, "details": {**b["details"], "app_instance_id": "X"}} for b in bodies[0]]
    random = [{**b, "details": {**b["details"], "app_instance_id": "X"}} for b in bodies[1]]
    assert mine == random
    assert apps.events() == before


# ---- the lifecycle --------------------------------------------------------------------------------
def test_the_lifecycle_follows_commands_and_reports(apps: Apps) -> None:
    m = apps.member()
    instance = apps.create(m)
    deploying = apps.report(m, instance, "deploying", phase="pulling", progress={"pct": 10})
    assert deploying.status_code == 200 and deploying.json()["status"] == "deploying"
    assert deploying.json()["phase"] == "pulling" and deploying.json()["progress"] == {"pct": 10}
    running = apps.report(m, instance, "running", health_status="healthy")
    assert running.json()["status"] == "running" and running.json()["phase"] == "pulling"
    before = apps.events()
    again = apps.report(m, instance, "running", health_status="healthy")
    assert again.status_code == 200 and again.json() == running.json()
    assert apps.events() == before  # a report twice = once
    late = apps.report(m, instance, "deploying")  # progress while running is not an edge
    assert late.status_code == 409 and late.json()["details"]["current_status"] == "running"

    stopped = apps.act(m, instance, "stop")
    assert stopped.status_code == 202 and stopped.json()["status"] == "stopped"
    # the stop and its completion are one save: both edges are in the log
    edges = [(e.from_status, e.to) for e in apps.stores.app.events.get(uuid.UUID(instance["id"]))
             if isinstance(e, AppInstance.Moved)]
    assert edges[-2:] == [("running", "stopping"), ("stopping", "stopped")]
    refused = apps.act(m, instance, "stop")
    assert refused.status_code == 409
    assert refused.json()["details"]["allowed_from"] == ["running", "failed"]
    assert apps.act(m, instance, "start").json()["status"] == "starting"
    assert apps.report(m, instance, "running").json()["status"] == "running"

    upgraded = apps.act(m, instance, "upgrade", {"app_version": "2"})
    assert upgraded.status_code == 202
    assert (upgraded.json()["status"], upgraded.json()["app_version"]) == ("upgrading", "2")
    assert apps.report(m, instance, "running").json()["app_version"] == "2"
    same = apps.act(m, instance, "upgrade", {"app_version": "2"})
    assert same.status_code == 409 and same.json()["details"]["reason"] == "app_version_unchanged"
    unknown = apps.act(m, instance, "upgrade", {"app_version": "9"})
    assert unknown.status_code == 404 and unknown.json()["code"] == "app_version_not_found"
    rolled = apps.act(m, instance, "rollback", {"app_version": "1"})
    assert (rolled.json()["status"], rolled.json()["app_version"]) == ("rolling_back", "1")
    failed = apps.report(m, instance, "failed", failure_reason="oom")
    assert (failed.json()["status"], failed.json()["failure_reason"]) == ("failed", "oom")
    assert apps.act(m, instance, "restart").json()["status"] == "restarting"
    assert apps.report(m, instance, "running").json()["failure_reason"] is None

    decommissioning = apps.act(m, instance, "decommission")
    assert decommissioning.json()["status"] == "decommissioning"
    before = apps.events()
    noop = apps.act(m, instance, "decommission")
    assert noop.status_code == 202 and noop.json()["status"] == "decommissioning"
    assert apps.events() == before
    gone = apps.report(m, instance, "decommissioned")
    assert gone.json()["status"] == "decommissioned"


def test_gone_absorbs_every_command(apps: Apps) -> None:
    m = apps.member()
    instance = apps.running(m)
    assert apps.act(m, instance, "decommission").status_code == 202
    assert apps.report(m, instance, "decommissioned").status_code == 200
    before = apps.events()
    for action, body in (("stop", None), ("start", None), ("restart", None),
                         ("upgrade", {"app_version": "2"}), ("rollback", {"app_version": "1"})):
        refused = apps.act(m, instance, action, body)
        assert refused.status_code == 409, (action, refused.text)
        assert refused.json()["code"] == "app_instance_state_invalid"
        assert refused.json()["details"]["current_status"] == "decommissioned"
    refused = apps.post(m.token, OPS, {"action": "add", "component_key": "w"},
                        key=uuid.uuid4().hex, project_id=m.project, app_instance_id=instance["id"])
    assert refused.status_code == 409
    refused = apps.post(m.token, REPAIR, {"action": "repair", "scope": "whole_runtime"},
                        key=uuid.uuid4().hex, project_id=m.project, app_instance_id=instance["id"])
    assert refused.status_code == 409
    assert apps.report(m, instance, "running").status_code == 409
    for repeat in (apps.act(m, instance, "decommission"),
                   apps.send("DELETE", m.token, REPORT, key=uuid.uuid4().hex,
                             project_id=m.project, app_instance_id=instance["id"])):
        assert repeat.status_code == 202 and repeat.json()["status"] == "decommissioned"
    v3 = apps.post(m.token, V3 + "/decommission", key=uuid.uuid4().hex, project=m.project,
                   app_instance_id=instance["id"])
    assert v3.status_code == 202 and v3.json()["task_href"] is None
    assert apps.events() == before
    assert apps.report(m, instance, "deleted").json()["status"] == "deleted"


def test_legacy_delete_is_decommission(apps: Apps) -> None:
    m = apps.member()
    instance = apps.running(m)
    deleted = apps.send("DELETE", m.token, REPORT, key="legacy-1", project_id=m.project,
                        app_instance_id=instance["id"])
    assert deleted.status_code == 202 and deleted.json()["status"] == "decommissioning"
    replay = apps.send("DELETE", m.token, REPORT, key="legacy-1", project_id=m.project,
                       app_instance_id=instance["id"])
    assert replay.json() == deleted.json() and replay.headers["Idempotent-Replayed"] == "true"


def test_reports_come_from_the_adapter_only(apps: Apps) -> None:
    m = apps.member()
    instance = apps.create(m)
    before = apps.events()
    person = apps.post(m.token, REPORT, {"status": "running"}, project_id=m.project,
                       app_instance_id=instance["id"])
    assert person.status_code == 403 and person.json()["code"] == "insufficient_permissions"
    elsewhere = apps.post(apps.adapter(uuid.uuid4()), REPORT, {"status": "running"},
                          project_id=m.project, app_instance_id=instance["id"])
    assert elsewhere.status_code == 403 and elsewhere.json()["code"] == "token_scope_invalid"
    bad = apps.report(m, instance, "stopped")  # adapters cannot report stopped
    assert bad.status_code == 400
    assert apps.events() == before
    platform = apps.post(apps.admin, REPORT, {"status": "deploying"}, project_id=m.project,
                         app_instance_id=instance["id"])
    assert platform.status_code == 200 and platform.json()["status"] == "deploying"


# ---- member operations ------------------------------------------------------------------------------
def test_member_operations_materialize_members_through_reports(apps: Apps) -> None:
    m = apps.member()
    instance = apps.running(m)
    params = {"project_id": m.project, "app_instance_id": instance["id"]}
    created = apps.post(m.token, OPS, {"action": "add", "component_key": "worker",
                                       "requested_count": 1}, key="add-1", **params)
    assert created.status_code == 202, created.text
    op = created.json()
    assert (op["status"], op["action"], op["component_key"]) == ("accepted", "add", "worker")
    assert op["requested_by_user_id"] == str(m.user) and op["completed_at"] is None
    replay = apps.post(m.token, OPS, {"action": "add", "component_key": "worker",
                                      "requested_count": 1}, key="add-1", **params)
    assert replay.json() == op
    member_id = str(uuid.uuid4())
    report = {"status": "in_progress", "target_member_id": member_id,
              "member_status": "reconciling", "endpoint": {"url": "http://w:8000"}}
    progressed = apps.post(m.adapter, OP_REPORT, report, operation_id=op["id"], **params)
    assert progressed.status_code == 200, progressed.text
    assert progressed.json()["status"] == "in_progress"
    assert progressed.json()["target_member_id"] == member_id
    assert progressed.json()["started_at"] is not None
    before = apps.events()
    again = apps.post(m.adapter, OP_REPORT, report, operation_id=op["id"], **params)
    assert again.json() == progressed.json() and apps.events() == before
    # a second new member is beyond requested_count
    extra = apps.post(m.adapter, OP_REPORT, {**report, "target_member_id": str(uuid.uuid4())},
                      operation_id=op["id"], **params)
    assert extra.status_code == 409 and extra.json()["details"]["reason"] == "member_count_exceeded"
    done = apps.post(m.adapter, OP_REPORT, {"status": "succeeded", "member_status": "ready"},
                     operation_id=op["id"], **params)
    assert done.json()["status"] == "succeeded" and done.json()["completed_at"] is not None
    late = apps.post(m.adapter, OP_REPORT, {"status": "failed"}, operation_id=op["id"], **params)
    assert late.status_code == 409 and late.json()["details"]["resource"] == "member_operation"

    member = apps.post(m.adapter, MEMBER_REPORT, {"status": "ready", "health_status": "ok"},
                       member_id=member_id, **params)
    assert member.status_code == 200, member.text
    assert (member.json()["status"], member.json()["health_status"]) == ("ready", "ok")
    assert member.json()["component_key"] == "worker"
    assert member.json()["endpoint"] == {"url": "http://w:8000"}
    before = apps.events()
    assert apps.post(m.adapter, MEMBER_REPORT, {"status": "ready", "health_status": "ok"},
                     member_id=member_id, **params).json() == member.json()
    assert apps.events() == before
    illegal = apps.post(m.adapter, MEMBER_REPORT, {"status": "requested"}, member_id=member_id,
                        **params)
    assert illegal.status_code == 400  # the operation declares no 409
    missing = apps.post(m.adapter, MEMBER_REPORT, {"status": "ready"},
                        member_id=str(uuid.uuid4()), **params)
    assert missing.status_code == 404 and missing.json()["details"]["resource"] == "member"

    drain = apps.post(m.token, OPS, {"action": "drain", "target_member_id": member_id},
                      key=uuid.uuid4().hex, **params)
    assert drain.status_code == 202 and drain.json()["target_member_id"] == member_id
    busy = apps.post(m.token, OPS, {"action": "remove", "target_member_id": member_id},
                     key=uuid.uuid4().hex, **params)
    assert busy.status_code == 409
    assert apps.events() == before + 1


def test_member_operation_shape_errors(apps: Apps) -> None:
    m = apps.member()
    instance = apps.running(m)
    params = {"project_id": m.project, "app_instance_id": instance["id"]}
    before = apps.events()
    for body, status in (({"action": "add"}, 400),
                         ({"action": "drain"}, 400),
                         ({"action": "remove", "target_member_id": str(uuid.uuid4()),
                           "requested_count": 2}, 400),
                         ({"action": "replace", "target_member_id": str(uuid.uuid4())}, 404),
                         ({"action": "explode", "component_key": "x"}, 400),
                         ({"action": "add", "component_key": "x", "requested_count": 0}, 400)):
        response = apps.post(m.token, OPS, body, key=uuid.uuid4().hex, **params)
        assert response.status_code == status, (body, response.text)
    assert apps.events() == before


# ---- repairs ----------------------------------------------------------------------------------------
def test_repairs_single_flight_reports_and_dry_runs(apps: Apps) -> None:
    m = apps.member()
    instance = apps.running(m)
    params = {"project_id": m.project, "app_instance_id": instance["id"]}
    dry = apps.post(m.token, REPAIR, {"action": "repair", "scope": "whole_runtime",
                                      "dry_run": True}, key=uuid.uuid4().hex, **params)
    assert dry.status_code == 202 and dry.json()["status"] == "succeeded"
    assert {s["status"] for s in dry.json()["steps"]} == {"skipped"}
    created = apps.post(m.token, REPAIR, {"action": "reconcile", "scope": "whole_runtime",
                                          "reason": "drift"}, key=uuid.uuid4().hex, **params)
    assert created.status_code == 202
    repair = created.json()
    assert repair["status"] == "accepted"
    assert [s["name"] for s in repair["steps"]] == ["diagnose", "reconcile"]
    second = apps.post(m.token, REPAIR, {"action": "repair", "scope": "whole_runtime"},
                       key=uuid.uuid4().hex, **params)
    assert second.status_code == 409
    assert second.json()["details"]["reason"] == "repair_operation_in_progress"
    member_scope = apps.post(m.token, REPAIR, {"action": "repair", "scope": "member"},
                             key=uuid.uuid4().hex, **params)
    assert member_scope.status_code == 400

    steps = [{"name": "diagnose", "status": "running", "started_at": "2026-12-01T10:00:00Z",
              "completed_at": None, "summary": None},
             {"name": "reconcile", "status": "pending", "started_at": None,
              "completed_at": None, "summary": None}]
    report = {"status": "in_progress", "phase": "diagnosing", "steps": steps,
              "health_status": "degraded"}
    progressed = apps.post(m.adapter, REPAIR_REPORT, report, key="repair-report-1",
                           repair_operation_id=repair["id"], **params)
    assert progressed.status_code == 200, progressed.text
    assert (progressed.json()["status"], progressed.json()["phase"]) == ("in_progress", "diagnosing")
    before = apps.events()
    replay = apps.post(m.adapter, REPAIR_REPORT, report, key="repair-report-1",
                       repair_operation_id=repair["id"], **params)
    assert replay.json() == progressed.json() and replay.headers["Idempotent-Replayed"] == "true"
    twice = apps.post(m.adapter, REPAIR_REPORT, report, repair_operation_id=repair["id"], **params)
    assert twice.json() == progressed.json()
    assert apps.events() == before
    regressed = apps.post(m.adapter, REPAIR_REPORT,
                          {"status": "in_progress", "steps": [{**steps[0], "status": "pending"},
                                                               steps[1]]},
                          repair_operation_id=repair["id"], **params)
    assert regressed.status_code == 400
    finished = [{**steps[0], "status": "succeeded", "completed_at": "2026-12-01T10:01:00Z"},
                {**steps[1], "status": "succeeded", "started_at": "2026-12-01T10:01:00Z",
                 "completed_at": "2026-12-01T10:02:00Z"}]
    done = apps.post(m.adapter, REPAIR_REPORT, {"status": "succeeded", "steps": finished},
                     repair_operation_id=repair["id"], **params)
    assert done.json()["status"] == "succeeded" and done.json()["completed_at"] is not None
    got = apps.get(m.token, ONE, **params).json()
    assert got["health_status"] == "degraded"  # the repair report observed the instance


# ---- V3 and the compat twins ----------------------------------------------------------------------
def test_v3_commands_and_their_compat_twins_answer_alike(apps: Apps) -> None:
    m = apps.member()
    first, second = apps.running(m), apps.running(m)

    def v3(prefix: str, instance: dict[str, Any], action: str, body: Any = None,
           key: str | None = None) -> httpx.Response:
        return apps.post(m.token, prefix + "/" + action, body, key=key or uuid.uuid4().hex,
                         project=m.project, app_instance_id=instance["id"])

    answers = {}
    for prefix, instance in ((V3, first), (COMPAT, second)):
        stopped = v3(prefix, instance, "stop")
        assert stopped.status_code == 202, stopped.text
        body = stopped.json()
        assert body["operation"] == "stop" and body["app_instance"]["status"] == "stopped"
        assert body["audit_action"] == "app.instance.stop" and body["task_href"]
        assert body["evidence_href"].endswith(body["correlation_id"])
        started = v3(prefix, instance, "start").json()
        assert started["app_instance"]["status"] == "starting"
        apps.report(m, instance, "running")
        upgraded = v3(prefix, instance, "upgrade", {"app_version": "2"})
        assert upgraded.status_code == 202 and upgraded.json()["status"] == "upgrading"
        apps.report(m, instance, "running")
        assert v3(prefix, instance, "rollback", {"app_version": "1"}).json()["app_version"] == "1"
        apps.report(m, instance, "running")
        assert v3(prefix, instance, "restart").json()["app_instance"]["status"] == "restarting"
        apps.report(m, instance, "running")
        op = v3(prefix, instance, "member-operations", {"action": "add", "component_key": "w"})
        assert op.status_code == 202 and op.json()["status"] == "accepted"
        gone = v3(prefix, instance, "decommission").json()
        assert gone["operation"] == "decommission"
        assert gone["app_instance"]["status"] == "decommissioning"
        assert gone["app_instance"]["updated_at"] >= instance["updated_at"]
        answers[prefix] = (body, gone)
    # the same key on the canonical path and its twin is one request
    third = apps.running(m)
    canonical = v3(V3, third, "stop", key="twin-1")
    twin = v3(COMPAT, third, "stop", key="twin-1")
    assert twin.status_code == 202 and twin.json() == canonical.json()
    assert twin.headers["Idempotent-Replayed"] == "true"
    repair = apps.post(m.token, COMPAT + "/repair", {"action": "reconcile",
                                                     "scope": "control_plane"},
                       key=uuid.uuid4().hex, project=m.project, app_instance_id=first["id"])
    assert repair.status_code == 409  # decommissioning: no repair
    fourth = apps.running(m)
    repair = apps.post(m.token, COMPAT + "/repair", {"action": "reconcile",
                                                     "scope": "control_plane"},
                       key=uuid.uuid4().hex, project=m.project, app_instance_id=fourth["id"])
    assert repair.status_code == 202 and repair.json()["scope"] == "control_plane"
    bad = apps.post(m.token, V3 + "/upgrade", {}, key=uuid.uuid4().hex, project=m.project,
                    app_instance_id=fourth["id"])
    assert bad.status_code == 400 and bad.json()["code"] == "validation_error"
