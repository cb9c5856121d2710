"""App instances end to end, through HTTP only (except seeding the catalog, which has no
contract operation): a platform-managed app is launched, reported running by its
adapter, scaled, upgraded, rolled back and decommissioned; a tenant-dedicated app runs
on the user's own allocations. Afterwards the V3 apps catalog, the V3 workloads and
tasks read models and the ledger agree with that history, and the platform app was
billed ``app_runtime`` usage for exactly its running time while the dedicated app
added no ``app_runtime`` charge."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any
from uuid import UUID

import httpx
import pytest

from domain.apps import register_app, register_version
from domain.provenance import CommandContext
from tests.conftest import Tokens, serve_own_database
from tests.contract.test_contract import check
from tests.harness import bearer, client
from tests.integration.test_inventory_commands import baremetal_sku, fund, make_node, make_sku
from tests.integration.test_workload_queries import TASK, TASKS, WORKLOAD, WORKLOADS, Lab

PRICE = 3_600_000  # minor units per hour: one per millisecond
FUNDS = 100_000  # what ``fund`` credits
INSTANCES = "/api/v1/projects/{project_id}/app-instances"
INSTANCE = INSTANCES + "/{app_instance_id}"
REPORT = INSTANCE + "/report"
MEMBER_OPS = INSTANCE + "/member-operations"
MEMBER_OP_REPORT = MEMBER_OPS + "/{operation_id}/report"
V3_INSTANCE = "/api/v1/apps/instances/{app_instance_id}"
V3_DECOMMISSION = V3_INSTANCE + "/decommission"
LAUNCH_APP = "/api/v1/launch/apps/{app_slug}"
APPS, APP = "/api/v1/apps", "/api/v1/apps/{app_slug}"
PUBLISH = "/api/v1/admin/apps/catalog/{app_slug}/versions/{version}/publish"
ENTITLE = "/api/v1/projects/{project_id}/apps/entitlements/{app_slug}"
USAGE, BALANCE = "/api/v1/billing/usage", "/api/v1/billing/balance"


def ms(start: str, end: str) -> int:
    delta = datetime.fromisoformat(end) - datetime.fromisoformat(start)
    return delta.days * 86_400_000 + delta.seconds * 1000 + delta.microseconds // 1000


def to_ms(moment: str) -> datetime:
    """The moment at the millisecond precision usage is metered at."""
    value = datetime.fromisoformat(moment)
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


class Http(Lab):
    """``Lab`` with the calls of this test: every answer checked against the contract,
    every read waiting for the last write's position."""

    def call(self, method: str, template: str, token: str, body: Any = None, *,
             project: UUID | None = None, key: str | None = "auto",
             params: dict[str, Any] | None = None, **path: str) -> httpx.Response:
        headers = {**bearer(token), "X-Ledger-Position": str(self.position)}
        if project is not None:
            headers["X-Project-ID"] = str(project)
        if key is not None:
            headers["Idempotency-Key"] = uuid.uuid4().hex if key == "auto" else key
        response = self.http.request(method, template.format(**path), json=body,
                                     params=params, headers=headers)
        check(method, template, response)
        return self.track(response)

    def expect(self, status: int, method: str, template: str, token: str, body: Any = None,
               **kwargs: Any) -> dict[str, Any]:
        response = self.call(method, template, token, body, **kwargs)
        assert response.status_code == status, (template, response.text)
        return response.json()


@pytest.fixture(scope="module")
def lab(services: Any, tokens: Tokens) -> Iterator[Http]:
    with serve_own_database(services) as served, client(served.url) as http:
        admin, sku = tokens.admin(), f"e2e-{uuid.uuid4().hex[:6]}"
        make_sku(http, admin, {**baremetal_sku(sku),
                               "unit_price": {"amount_minor": PRICE, "currency": "USD"}})
        for _ in range(3):
            make_node(http, admin, sku)
        lab = Http(http, served, tokens, sku)
        seed = CommandContext(actor_id=str(tokens.admin_id), actor_type="user", source="admin",
                              actor_role="admin")
        app = served.stores.app
        for slug, backend, manifest in (
                ("vllm-serve", "k8s", {"operating_modes": ["platform_managed"],
                                       "presentation": {"kind": "vllm"}, "pricing": [
                                           {"component": "control_plane",
                                            "usage_unit": "instance_hour",
                                            "unit_price": {"amount_minor": PRICE,
                                                           "currency": "USD"}}]}),
                ("kube", "k8s", {"presentation": {"kind": "kubernetes"}})):
            app.execute(register_app(seed, slug=slug, display_name=slug.capitalize(),
                                     category="inference", publisher="core42",
                                     render=lambda r: r))
            for version in ("1", "2"):
                app.execute(register_version(seed, slug=slug, version=version,
                                             runtime_backend=backend, manifest=manifest,
                                             render=lambda r: r))
                lab.expect(200, "POST", PUBLISH, admin, app_slug=slug, version=version)
        yield lab


def test_an_app_lifecycle_through_http_agrees_with_the_catalog_workbench_and_ledger(
        lab: Http) -> None:
    admin = lab.tokens.admin()
    project, user = uuid.uuid4(), uuid.uuid4()
    lab.track(fund(lab.http, admin, user))
    token = lab.tokens.user(user, project_ids=[str(project)])
    for slug in ("vllm-serve", "kube"):
        lab.expect(200, "PUT", ENTITLE, admin, {"enabled": True, "policy_overrides": {}},
                   project_id=str(project), app_slug=slug)

    # ---- launch (V3): idempotent, the workload is the app instance ----------------------------
    key = uuid.uuid4().hex
    launched = lab.expect(202, "POST", LAUNCH_APP, token, {"display_name": "serve-me"},
                          project=project, key=key, app_slug="vllm-serve")
    again = lab.expect(202, "POST", LAUNCH_APP, token, {"display_name": "serve-me"},
                       project=project, key=key, app_slug="vllm-serve")
    assert again == launched and launched["resource_kind"] == "app_instance"
    app_id = launched["workload_id"]
    ids = {"project_id": str(project), "app_instance_id": app_id}
    instance = lab.expect(200, "GET", V3_INSTANCE, token, project=project, key=None,
                          app_instance_id=app_id)
    assert (instance["status"], instance["app_version"]) == ("requested", "2")
    assert instance["operating_mode"] == "platform_managed"
    assert lab.expect(200, "GET", TASK, token, project=project, key=None,
                      task_id=launched["task_id"])["task"]["status"] == "queued"

    # ---- the adapter reports it running; it scales by one member ------------------------------
    running = lab.expect(200, "POST", REPORT, admin, {"status": "running"}, key=None, **ids)
    assert running["status"] == "running"
    row = lab.expect(200, "GET", WORKLOAD, token, project=project, key=None,
                     workload_id=app_id)["workload"]
    assert (row["kind"], row["status"], row["hourly_rate"]) == (
        "vllm", "active", {"amount_minor": PRICE, "currency": "USD"})
    detail = lab.expect(200, "GET", APP, token, project=project, key=None,
                        app_slug="vllm-serve")
    assert [(w["id"], w["status"]) for w in detail["running_workloads"]] == [(app_id, "active")]
    [listed] = detail["running_workloads"]  # the V3 workloads row itself
    assert {k: listed[k] for k in ("kind", "hourly_rate", "sku", "allocation_id", "app_name")} \
        == {k: row[k] for k in ("kind", "hourly_rate", "sku", "allocation_id", "app_name")}
    op = lab.expect(202, "POST", MEMBER_OPS, token, {"action": "add", "component_key": "worker",
                                                     "requested_count": 1}, **ids)
    member = str(uuid.uuid4())
    lab.expect(200, "POST", MEMBER_OP_REPORT, admin, {
        "status": "succeeded", "target_member_id": member, "member_status": "ready"},
        key=None, operation_id=op["id"], **ids)
    members = lab.expect(200, "GET", INSTANCE + "/members", token, key=None, **ids)["items"]
    assert [m["id"] for m in members] == [member]

    # ---- upgrade, roll back, decommission -------------------------------------------------------
    for path, version in (("/upgrade", "1"), ("/rollback", "2")):
        moved = lab.expect(202, "POST", INSTANCE + path, token, {"app_version": version}, **ids)
        assert moved["app_version"] == version
        lab.expect(200, "POST", REPORT, admin, {"status": "running"}, key=None, **ids)
    ended = lab.expect(202, "POST", V3_DECOMMISSION, token, project=project,
                       app_instance_id=app_id)
    assert ended["app_instance"]["status"] == "decommissioning"
    gone = lab.expect(200, "POST", REPORT, admin, {"status": "decommissioned"}, key=None, **ids)
    assert gone["status"] == "decommissioned"

    # ---- the workbench agrees -------------------------------------------------------------------
    final = lab.expect(200, "GET", V3_INSTANCE, token, project=project, key=None,
                       app_instance_id=app_id)
    assert (final["status"], final["app_version"]) == ("decommissioned", "2")
    row = lab.expect(200, "GET", WORKLOAD, token, project=project, key=None,
                     workload_id=app_id)["workload"]
    assert row["status"] == "released" and row["archived_at"]
    assert row["hourly_rate"] == {"amount_minor": 0, "currency": "USD"}
    history = lab.expect(200, "GET", WORKLOADS, token, params={"include_history": "true"},
                         project=project, key=None)
    tasks = [t for t in lab.expect(200, "GET", TASKS, token, project=project, key=None)["items"]
             if t["resource_id"] == app_id]
    assert sorted((t["kind"], t["title"].split()[0], t["status"]) for t in tasks) == sorted([
        ("launch", "Launch", "succeeded"), ("app_operation", "Add", "succeeded"),
        ("app_operation", "Upgrade", "succeeded"), ("app_operation", "Rollback", "succeeded"),
        ("app_operation", "Decommission", "succeeded")])
    assert ended["task_href"].rsplit("/", 1)[1] in {t["id"] for t in tasks}
    assert launched["task_id"] in {t["id"] for t in tasks}
    catalog = lab.expect(200, "GET", APPS, token, project=project, key=None)
    assert {"vllm-serve", "kube"} <= {item["slug"] for item in catalog["items"]}
    detail = lab.expect(200, "GET", APP, token, project=project, key=None,
                        app_slug="vllm-serve")
    assert detail["running_workloads"] == []
    assert app_id in [r["id"] for r in history["items"]]

    # ---- billed exactly its running time --------------------------------------------------------
    usage = lab.expect(200, "GET", USAGE, token, key=None)["items"]
    [record] = [u for u in usage if u["app_instance_id"] == app_id]
    assert record["usage_source"] == "app_runtime" and record["control_plane_component"]
    assert to_ms(record["start_time"]) == to_ms(row["active_at"])  # the first running
    assert to_ms(record["end_time"]) == to_ms(final["updated_at"])  # Gone
    running_ms = ms(record["start_time"], record["end_time"])
    assert record["cost"] == {"amount_minor": running_ms, "currency": "USD"}  # 1 per ms
    assert row["accrued_cost"] == record["cost"] and running_ms > 0

    # ---- a tenant-dedicated app on the user's own allocations adds no app_runtime charge ---
    controller, worker = lab.launch(token, project), lab.launch(token, project)
    for launched_allocation in (controller, worker):
        node = lab.expect(200, "GET", WORKLOAD, token, project=project, key=None,
                          workload_id=launched_allocation["workload_id"])["workload"]["node_id"]
        lab.agent(node, "success")
    kube = lab.expect(202, "POST", INSTANCES, token, {
        "app_slug": "kube", "app_version": "1", "display_name": "cluster",
        "placement_intent": {"controller_allocation_id": controller["workload_id"],
                             "worker_allocation_ids": [worker["workload_id"]]}},
        project_id=str(project))
    kube_ids = {"project_id": str(project), "app_instance_id": kube["id"]}
    lab.expect(200, "POST", REPORT, admin, {"status": "running"}, key=None, **kube_ids)
    hosting = lab.expect(200, "GET", WORKLOAD, token, project=project, key=None,
                         workload_id=controller["workload_id"])["workload"]
    assert hosting["blocking_app_use"]["app_instance_id"] == kube["id"]
    lab.expect(202, "POST", INSTANCE + "/decommission", token, **kube_ids)
    lab.expect(200, "POST", REPORT, admin, {"status": "decommissioned"}, key=None, **kube_ids)
    for launched_allocation in (controller, worker):
        assert lab.act(token, project, launched_allocation["workload_id"],
                       "release").status_code == 202
    for launched_allocation in (controller, worker):
        lab.agent(lab.expect(200, "GET", WORKLOAD, token, project=project, key=None,
                             workload_id=launched_allocation["workload_id"])["workload"][
            "node_id"], "success")
    kube_row = lab.expect(200, "GET", WORKLOAD, token, project=project, key=None,
                          workload_id=kube["id"])["workload"]
    assert kube_row["kind"] == "kubernetes" and kube_row["status"] == "released"
    assert kube_row["accrued_cost"] == {"amount_minor": 0, "currency": "USD"}
    usage = lab.expect(200, "GET", USAGE, token, key=None)["items"]
    assert not [u for u in usage if u["app_instance_id"] == kube["id"]]
    assert sorted(u["usage_source"] for u in usage) == ["allocation", "allocation",
                                                        "app_runtime"]
    balance = lab.expect(200, "GET", BALANCE, token, key=None)["balance"]
    assert balance == {"amount_minor": FUNDS - sum(u["cost"]["amount_minor"] for u in usage),
                       "currency": "USD"}
