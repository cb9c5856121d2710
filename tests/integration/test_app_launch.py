"""V3 app launch through HTTP: ``submitV3AppLaunch`` (and its compat twin) creates one
app instance per Idempotency-Key, with the catalog's defaults, behind the same gates
as ``createAppInstance``; ``precheckV3AppLaunch`` says ahead of it what the submit
would decide, and appends nothing at all. Every answer is checked against the
contract."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any
from uuid import UUID

import pytest

from domain.app_instances import AppInstance
from tests.conftest import Served, serve_own_database
from tests.harness import client
from tests.integration.test_app_catalog import ENTITLEMENT, V3_APP, Api
from tests.integration.test_inventory_commands import appended, fund

SUBMIT, SUBMIT_COMPAT = "/api/v1/launch/apps/{app_slug}", "/api/v1/v3/launch/apps/{app_slug}"
PRECHECK = "/api/v1/launch/apps/{app_slug}/precheck"
PRECHECK_COMPAT = "/api/v1/v3/launch/apps/{app_slug}/precheck"
#: runs on the platform: no placement needed; priced per hour
MANAGED = {"operating_modes": ["platform_managed"], "dependencies": ["storage"],
           "pricing": [{"component": "gateway", "usage_unit": "hour",
                        "unit_price": {"amount_minor": 120, "currency": "USD"}},
                       {"component": "index", "usage_unit": "hour",
                        "unit_price": {"amount_minor": 30, "currency": "USD"}}],
           "presentation": {"kind": "vllm"}}


@pytest.fixture(scope="module")
def served(services: Any) -> Iterator[Served]:
    with serve_own_database(services) as found:
        yield found


@pytest.fixture
def api(served: Served, tokens: Any) -> Iterator[Api]:
    with client(served.url) as http:
        yield Api(served, http, tokens)


class Launcher:
    """A member of a project of their own, funded unless told otherwise."""

    def __init__(self, api: Api, funded: bool = True):
        self.api = api
        self.user = uuid.uuid4()
        self.project = uuid.uuid4()
        self.token = api.tokens.user(self.user, project_ids=[str(self.project)])
        if funded:
            fund(api.http, api.tokens.admin(), self.user)

    def entitle(self, slug: str, enabled: bool = True, **overrides: Any) -> None:
        granted = self.api.request("PUT", ENTITLEMENT, self.api.tokens.admin(),
                                   project_id=self.project, app_slug=slug,
                                   json={"enabled": enabled, "policy_overrides": overrides})
        assert granted.status_code == 200, granted.text

    def submit(self, slug: str, body: dict[str, Any] | None = None, key: str | None = "new",
               template: str = SUBMIT) -> Any:
        key = uuid.uuid4().hex if key == "new" else key
        return self.api.request("POST", template, self.token, project=self.project, key=key,
                                json=body if body is not None else {}, app_slug=slug)

    def precheck(self, slug: str, body: dict[str, Any] | None = None, **extra: Any) -> Any:
        return self.api.request("POST", extra.pop("template", PRECHECK), self.token,
                                project=self.project, json=body if body is not None else {},
                                app_slug=slug, **extra)


def managed_app(api: Api, *versions: str) -> str:
    slug = api.catalog.app(name="Serving")
    for version in versions or ("1.0",):
        api.catalog.version(slug, version, backend="k8s", manifest=MANAGED)
    return slug


def instance(api: Api, workload_id: str) -> AppInstance:
    found = api.served.stores.app.get_or_none(UUID(workload_id))
    assert isinstance(found, AppInstance)
    return found


# ---- submit -------------------------------------------------------------------------------------
def test_one_key_launches_one_instance_whatever_the_retries(api: Api) -> None:
    slug = managed_app(api, "1.0", "1.1")
    api.catalog.version(slug, "2.0", manifest=MANAGED, publish=False)
    launcher = Launcher(api)
    launcher.entitle(slug, allowed_versions=["1.0", "1.1"])
    stores = api.served.stores
    before = appended(stores)

    missing = launcher.submit(slug, key=None)
    assert (missing.status_code, missing.json()["code"]) == (400, "validation_error")
    body = {"dependencies": {"storage": {"bucket": "models"}}, "config": {"replicas": 2}}
    first = launcher.submit(slug, body, key="launch-1")
    assert first.status_code == 202, first.text
    answer = first.json()
    workload = answer["workload_id"]
    assert answer["resource_kind"] == "app_instance" and answer["status"] == "queued"
    assert answer["workload_href"] == f"/api/v1/workloads/{workload}"
    assert answer["task_href"] == f"/api/v1/tasks/{answer['task_id']}"
    grown = appended(stores)
    assert grown > before
    for _ in range(3):
        again = launcher.submit(slug, body, key="launch-1")
        assert again.status_code == 202 and again.json() == answer
        assert again.headers["Idempotent-Replayed"] == "true"
    assert appended(stores) == grown  # the retries appended nothing
    reused = launcher.submit(slug, {**body, "display_name": "other"}, key="launch-1")
    assert (reused.status_code, reused.json()["details"]["reason"]) == (409, "idempotency_key_reused")

    created = instance(api, workload)  # workload_id is the app instance's id
    assert created.spec["source"] == "v3_launch" and created.spec["app_slug"] == slug
    assert created.app_version == "1.1"  # the newest entitled active version
    assert created.spec["display_name"] == f"Serving-{workload[:8]}"
    assert created.spec["dependencies"] == {"storage": {"bucket": "models"}}
    assert (created.spec["operating_mode"], created.spec["control_plane_scope"]) == (
        "platform_managed", "platform")

    twin = launcher.submit(slug, {"app_version": "1.0", "display_name": "mine"},
                           template=SUBMIT_COMPAT)
    assert twin.status_code == 202, twin.text
    second = instance(api, twin.json()["workload_id"])
    assert (second.app_version, second.spec["display_name"]) == ("1.0", "mine")

    detail = api.request("GET", V3_APP, launcher.token, project=launcher.project,
                         app_slug=slug).json()
    running = {row["id"]: row for row in detail["running_workloads"]}
    assert set(running) == {workload, twin.json()["workload_id"]}
    row = running[workload]
    assert (row["app_instance_id"], row["status"], row["kind"]) == (workload, "requested", "vllm")
    assert row["app_slug"] == slug and row["owner_user_id"] == str(launcher.user)
    assert {a["action"]: a["enabled"] for a in row["lifecycle_actions"]} == {
        "stop": False, "start": False, "restart": False, "release": True, "open": True}
    assert "replicas" not in str(detail)  # an instance's config is never shown


def test_launch_gates_refuse_and_write_nothing(api: Api) -> None:
    slug = managed_app(api, "1.0", "2.0")
    api.catalog.version(slug, "3.0", manifest=MANAGED, publish=False)
    launcher, broke = Launcher(api), Launcher(api, funded=False)
    stores = api.served.stores
    not_entitled = launcher.submit(slug)
    assert (not_entitled.status_code, not_entitled.json()["code"]) == (403, "app_not_entitled")
    launcher.entitle(slug, max_instances=1, allowed_versions=["1.0", "3.0"])
    broke.entitle(slug)
    assert launcher.submit(slug).status_code == 202
    outsider = api.tokens.user(uuid.uuid4(), project_ids=[str(uuid.uuid4())])

    before = appended(stores)
    refusals = [
        (launcher.submit(slug), 409, "app_instance_quota_exceeded"),
        (launcher.submit(slug, {"app_version": "2.0"}), 403, "app_not_entitled"),
        (launcher.submit(slug, {"app_version": "3.0"}), 409, "invalid_request"),
        (launcher.submit(slug, {"app_version": "9.9"}), 404, "app_version_not_found"),
        (launcher.submit("no-such-app"), 404, "app_not_found"),
        (launcher.submit(slug, {"dependencies": {"ssh": {}}}), 400, "invalid_request"),
        (launcher.submit(slug, {"colour": "red"}), 400, "validation_error"),
        (launcher.submit(slug, {"display_name": ""}), 400, "validation_error"),
        (launcher.submit(slug, {"config": {"ratio": 0.5}}), 400, "validation_error"),
        (broke.submit(slug), 409, "insufficient_balance"),
        (api.request("POST", SUBMIT, outsider, project=launcher.project, key="k",
                     json={}, app_slug=slug), 403, "insufficient_permissions"),
    ]
    for response, status, code in refusals:
        assert (response.status_code, response.json()["code"]) == (status, code), response.text
    assert appended(stores) == before
    launcher.entitle(slug, enabled=False)
    disabled = launcher.submit(slug)
    assert disabled.status_code == 403 and disabled.json()["details"]["reason"] == "entitlement_disabled"


# ---- precheck -----------------------------------------------------------------------------------
def checks_of(response: Any) -> dict[str, str]:
    return {c["id"]: c["status"] for c in response.json()["checks"]}


def test_precheck_says_what_submit_would_decide_and_appends_nothing(api: Api) -> None:
    slug = managed_app(api, "1.0")
    pinned = api.catalog.app(name="Pinned")
    api.catalog.version(pinned, "1", backend="bare_metal",
                        manifest={"presentation": {"runtime_presentation": {
                            "target_requirements": {"min_root_disk_mib": 1024}}}})
    launcher, broke, stranger = Launcher(api), Launcher(api, funded=False), Launcher(api)
    launcher.entitle(slug, max_instances=1)
    launcher.entitle(pinned)
    broke.entitle(slug)
    recorder = api.served.stores.app.recorder
    position = recorder.max_notification_id()

    ready = launcher.precheck(slug, {"dependencies": {"storage": {}}}, key="pre-1")
    assert ready.status_code == 200, ready.text
    answer = ready.json()
    assert (answer["ready"], answer["severity"]) == (True, "ok")
    assert checks_of(ready) == {"app_status": "ok", "version": "ok", "entitlement": "ok",
                                "dependencies": "ok", "quota": "ok", "balance": "ok",
                                "placement": "ok"}
    assert answer["estimate"] == {"hourly_rate": {"amount_minor": 150, "currency": "USD"},
                                  "monthly_estimate": {"amount_minor": 150 * 730, "currency": "USD"},
                                  "billing_mode": "on_demand"}
    assert answer["meta"]["cache"] == "bypass"
    resolved = answer["resolved"]
    compat = launcher.precheck(slug, {"dependencies": {"storage": {}}}, template=PRECHECK_COMPAT)
    assert {**compat.json(), "meta": None, "resolved": None} == {**answer, "meta": None, "resolved": None}

    blocked = {
        "entitlement": stranger.precheck(slug),
        "balance": broke.precheck(slug),
        "dependencies": launcher.precheck(slug, {"dependencies": {"ssh": {}}}),
        "placement": launcher.precheck(pinned),  # a bare-metal app needs a target allocation
    }
    for check_id, response in blocked.items():
        assert response.status_code == 200 and response.json()["ready"] is False, check_id
        assert checks_of(response)[check_id] == "blocker", (check_id, response.json()["checks"])
    assert checks_of(blocked["placement"])["target_disk"] == "unknown"
    for status, code, response in (
            (404, "app_not_found", launcher.precheck("no-such-app")),
            (404, "app_version_not_found", launcher.precheck(slug, {"app_version": "7"})),
            (400, "validation_error", launcher.precheck(slug, {"placement_intent": {"x": 1}}))):
        assert (response.status_code, response.json()["code"]) == (status, code)
    assert recorder.max_notification_id() == position  # prechecks append nothing at all

    submitted = launcher.submit(slug, {"dependencies": {"storage": {}}})
    assert submitted.status_code == 202
    created = instance(api, submitted.json()["workload_id"])
    assert resolved["app_version"] == created.app_version
    assert resolved["runtime_backend"] == created.spec["runtime_backend"]
    assert resolved["operating_mode"] == created.spec["operating_mode"]
    full = launcher.precheck(slug)
    assert full.json()["ready"] is False and checks_of(full)["quota"] == "blocker"
    assert launcher.submit(slug).json()["code"] == "app_instance_quota_exceeded"
    refused = launcher.submit(pinned)
    assert (refused.status_code, refused.json()["details"]["reason"]) == (400, "placement_shape_invalid")
