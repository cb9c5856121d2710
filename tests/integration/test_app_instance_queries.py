"""App-instance reads through HTTP, from the ``app_instances`` read model: the rows equal
what the commands answered once the projector caught up; lists page, filter and order
as documented; the project path, V3 and compat reads agree; scope hides other
projects' instances exactly as a random id; a rebuild reproduces the read model."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from api.consistency import wait_for
from consumers.rebuild import rebuild
from projections import BY_NAME
from tests.conftest import serve_own_database
from tests.harness import client
from tests.integration.test_app_instance_commands import (B, COMPAT, MEMBER, MEMBER_REPORT,
                                                          MEMBERS, ONE, OP,
                                                          OP_REPORT, OPS, REPAIR, REPAIR_ONE,
                                                          REPAIR_REPORT, REPAIRS, V3, Apps,
                                                          seed_catalog, without_correlation)


@pytest.fixture(scope="module")
def served(services: Any) -> Iterator[Any]:
    with serve_own_database(services) as found:
        yield found, seed_catalog(found.stores)


@pytest.fixture
def apps(served: Any, tokens: Any) -> Iterator[Apps]:
    found, slug = served
    with client(found.url) as http:
        yield Apps(found.url, found.stores, http, tokens, slug)


def walk(apps: Apps, token: str, template: str, page_size: int, **params: Any) -> list[Any]:
    items, cursor = [], None
    while True:
        response = apps.get(token, template, page_size=page_size, cursor=cursor, **params)
        assert response.status_code == 200, response.text
        body = response.json()
        assert len(body["items"]) <= page_size and body["pagination"]["page_size"] == page_size
        items += body["items"]
        cursor = body["pagination"]["next_cursor"]
        if cursor is None:
            return items


def add_member(apps: Apps, m: Any, instance: dict[str, Any], component: str,
               status: str = "ready") -> tuple[dict[str, Any], str]:
    """An ``add`` operation and the member the adapter reports into existence."""
    params = {"project_id": m.project, "app_instance_id": instance["id"]}
    op = apps.post(m.token, OPS, {"action": "add", "component_key": component},
                   key=uuid.uuid4().hex, **params).json()
    member_id = str(uuid.uuid4())
    done = apps.post(m.adapter, OP_REPORT, {"status": "succeeded", "target_member_id": member_id,
                                            "member_status": status},
                     operation_id=op["id"], **params)
    assert done.status_code == 200, done.text
    return done.json(), member_id


def test_reads_equal_what_the_commands_answered(apps: Apps) -> None:
    m = apps.member()
    instance = apps.create(m)
    params = {"project_id": m.project, "app_instance_id": instance["id"]}
    assert apps.get(m.token, ONE, **params).json() == instance  # read-after-write
    running = apps.report(m, instance, "running", health_status="ok",
                          runtime_state={"pods": 1}).json()
    op, member_id = add_member(apps, m, instance, "worker")
    member = apps.post(m.adapter, MEMBER_REPORT,
                       {"status": "ready", "endpoint": {"url": "http://w"}},
                       member_id=member_id, **params).json()
    repair = apps.post(m.token, REPAIR, {"action": "reconcile", "scope": "whole_runtime"},
                       key=uuid.uuid4().hex, **params).json()
    repair = apps.post(m.adapter, REPAIR_REPORT, {"status": "in_progress", "phase": "p"},
                       repair_operation_id=repair["id"], **params).json()
    stopped = apps.act(m, instance, "stop").json()

    assert apps.get(m.token, ONE, **params).json() == stopped
    assert apps.get(m.token, MEMBER, member_id=member_id, **params).json() == member
    assert apps.get(m.token, OP, operation_id=op["id"], **params).json() == op
    assert apps.get(m.token, REPAIR_ONE, repair_operation_id=repair["id"], **params).json() == repair
    assert apps.get(m.token, MEMBERS, **params).json()["items"] == [member]
    assert apps.get(m.token, OPS, **params).json()["items"] == [op]
    assert apps.get(m.token, REPAIRS, **params).json()["items"] == [repair]
    listed = apps.get(m.token, B, project_id=m.project).json()["items"]
    assert listed == [stopped] and running["status"] == "running"


def test_project_v3_and_compat_reads_agree(apps: Apps) -> None:
    m = apps.member()
    instance = apps.running(m)
    add_member(apps, m, instance, "worker")
    add_member(apps, m, instance, "controller")
    params = {"project_id": m.project, "app_instance_id": instance["id"]}
    v3 = {"project": m.project, "app_instance_id": instance["id"]}
    project_get = apps.get(m.token, ONE, **params)
    for template in (V3, COMPAT):
        assert apps.get(m.token, template, **v3).json() == project_get.json()
    project_members = apps.get(m.token, MEMBERS, **params).json()
    project_ops = apps.get(m.token, OPS, **params).json()
    assert len(project_members["items"]) == 2 and len(project_ops["items"]) == 2
    for template in (V3, COMPAT):
        assert apps.get(m.token, template + "/members", **v3).json() == project_members
        assert apps.get(m.token, template + "/member-operations", **v3).json() == project_ops
        filtered = apps.get(m.token, template + "/members", component_key="worker",
                            status="ready", **v3).json()["items"]
        assert [i["component_key"] for i in filtered] == ["worker"]
        bad = apps.get(m.token, template + "/members", status="bogus", **v3)
        assert bad.status_code == 400 and bad.json()["code"] == "validation_error"
        bad = apps.get(m.token, template + "/member-operations", status="bogus", **v3)
        assert bad.status_code == 400


def test_lists_page_filter_and_order(apps: Apps) -> None:
    m = apps.member()
    made = [apps.create(m) for _ in range(5)]
    apps.report(m, made[1], "running")
    apps.report(m, made[3], "running")
    listed = walk(apps, m.token, B, 2, project_id=m.project)
    assert [i["id"] for i in listed] == [i["id"] for i in reversed(made)]  # newest first
    running = walk(apps, m.token, B, 1, project_id=m.project, status="running")
    assert [i["id"] for i in running] == [made[3]["id"], made[1]["id"]]
    # the work queue: open operations, oldest first
    instance = made[1]
    params = {"project_id": m.project, "app_instance_id": instance["id"]}
    ops = [apps.post(m.token, OPS, {"action": "add", "component_key": f"c{i}"},
                     key=uuid.uuid4().hex, **params).json() for i in range(4)]
    apps.post(m.adapter, OP_REPORT, {"status": "cancelled"}, operation_id=ops[1]["id"], **params)
    queue = walk(apps, m.token, OPS, 2, status="accepted", **params)
    assert [o["id"] for o in queue] == [ops[0]["id"], ops[2]["id"], ops[3]["id"]]
    by_key = apps.get(m.token, OPS, component_key="c2", **params).json()["items"]
    assert [o["id"] for o in by_key] == [ops[2]["id"]]
    first = apps.get(m.token, B, project_id=m.project, page_size=1).json()
    cursor = first["pagination"]["next_cursor"]
    crossed = apps.get(m.token, B, project_id=m.project, page_size=1, status="running",
                       cursor=cursor)
    assert crossed.status_code == 400 and crossed.json()["code"] == "invalid_request"
    assert apps.get(m.token, B, project_id=m.project, page_size=0).status_code == 400


def test_scope_and_not_found(apps: Apps, tokens: Any) -> None:
    both = apps.member(projects=2)
    other = apps.member()
    theirs = apps.running(other)
    _, their_member = add_member(apps, other, theirs, "worker")
    mine = apps.running(both)
    bodies = []
    for target in (theirs["id"], str(uuid.uuid4())):
        params = {"project_id": both.project, "app_instance_id": target}
        answers = [apps.get(both.token, ONE, **params), apps.get(both.token, MEMBERS, **params),
                   apps.get(both.token, OPS, **params), apps.get(both.token, REPAIRS, **params),
                   apps.get(both.token, MEMBER, member_id=their_member, **params),
                   apps.get(both.token, V3, project=both.project, app_instance_id=target),
                   apps.get(both.token, COMPAT + "/members", project=both.project,
                            app_instance_id=target)]
        for answer in answers:
            assert answer.status_code == 404 and answer.json()["code"] == "app_instance_not_found"
            assert answer.json()["details"]["resource"] == "app_instance"
        bodies.append([{**without_correlation(a.json()),
                        "details": {**a.json()["details"], "app_instance_id": "X"}}
                       for a in answers])
    assert bodies[0] == bodies[1]
    # a member of another instance is a missing member of this one
    params = {"project_id": both.project, "app_instance_id": mine["id"]}
    for template, name, resource in ((MEMBER, "member_id", "member"),
                                     (OP, "operation_id", "member_operation"),
                                     (REPAIR_ONE, "repair_operation_id", "repair_operation")):
        missing = apps.get(both.token, template, **params, **{name: their_member})
        assert missing.status_code == 404
        assert missing.json()["details"]["resource"] == resource
    stranger = apps.adapter(uuid.uuid4())
    assert apps.get(stranger, B, project_id=other.project).status_code == 403
    assert apps.get(stranger, V3, project=other.project,
                    app_instance_id=theirs["id"]).status_code == 403


def test_a_rebuild_reproduces_the_read_model(apps: Apps) -> None:
    m = apps.member()
    instance = apps.running(m)
    add_member(apps, m, instance, "worker")
    params = {"project_id": m.project, "app_instance_id": instance["id"]}
    apps.post(m.token, REPAIR, {"action": "repair", "scope": "whole_runtime", "dry_run": True},
              key=uuid.uuid4().hex, **params)
    apps.act(m, instance, "decommission")
    stores = apps.stores
    last = stores.app.recorder.max_notification_id()
    assert wait_for(stores, "app_instances", last, 10)[0]
    projection = BY_NAME["app_instances"]

    def snapshot() -> dict[str, list[Any]]:
        with stores.query_pool.connection() as conn:
            return {t: conn.execute(f"SELECT * FROM readmodels.{t} ORDER BY id").fetchall()
                    for t in projection.tables}

    before = snapshot()
    assert all(before.values())
    with stores.query_pool.connection() as conn:  # damage it
        conn.execute("DELETE FROM readmodels.app_member_view")
        conn.execute("UPDATE readmodels.app_instance_view SET status = 'running'")
    rebuild(stores.app, stores.read_models, projection, batch_size=3)
    assert snapshot() == before
    got = apps.get(m.token, ONE, **params).json()
    assert got["status"] == "decommissioning"
