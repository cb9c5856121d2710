"""The app catalog through HTTP on a database of its own: the catalog and version lists,
the operator's publish/deprecate, project entitlements (and their V3 twin), and the V3
apps catalog and app detail. Apps and versions are seeded with the domain commands
(the contract has no operation that creates them; operators use ``ledgercore apps``).
Every answer is checked against the contract; every read sends back the position of
the last write."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from api.auth import mint_token
from consumers.rebuild import rebuild
from domain.apps import publish_version, register_app, register_version
from domain.errors import DomainError
from domain.provenance import CommandContext
from projections import BY_NAME
from tests.conftest import Served, serve_own_database
from tests.contract.test_contract import check
from tests.harness import bearer, client
from tests.integration.test_inventory_commands import appended

CATALOG = "/api/v1/apps/catalog"
VERSIONS = "/api/v1/apps/catalog/{app_slug}/versions"
PUBLISH = "/api/v1/admin/apps/catalog/{app_slug}/versions/{version}/publish"
DEPRECATE = "/api/v1/admin/apps/catalog/{app_slug}/versions/{version}/deprecate"
ENTITLEMENTS = "/api/v1/projects/{project_id}/apps/entitlements"
ENTITLEMENT = "/api/v1/projects/{project_id}/apps/entitlements/{app_slug}"
V3_ENTITLEMENT = "/api/v1/v3/access/entitlements/{app_slug}"
V3_APPS, V3_APPS_COMPAT = "/api/v1/apps", "/api/v1/v3/apps"
V3_APP, V3_APP_COMPAT = "/api/v1/apps/{app_slug}", "/api/v1/v3/apps/{app_slug}"


# ---- seeding the catalog with the domain commands (shared with test_app_launch) ---------------
def _render(result: Any) -> Any:
    if isinstance(result, DomainError):
        raise AssertionError(f"{result.code}: {result.message} {result.details}")
    return result


def operator() -> CommandContext:
    return CommandContext(actor_id="test-operator", actor_type="system", actor_role="operator",
                          source="admin")


class Catalog:
    """Seeds apps through ``stores.app`` and remembers the last position written."""

    def __init__(self, served: Served):
        self.served, self.position = served, 0

    def note(self, outcome: Any) -> Any:
        if outcome.position:
            self.position = max(self.position, outcome.position)
        return outcome.response

    def app(self, slug: str | None = None, *, category: str = "other", name: str | None = None,
            description: str = "An app.") -> str:
        slug = slug or f"app-{uuid.uuid4().hex[:8]}"
        self.note(self.served.stores.app.execute(register_app(
            operator(), slug=slug, display_name=name or slug.title(), category=category,
            publisher="Platform", description=description, render=_render)))
        return slug

    def version(self, slug: str, version: str, *, backend: str = "k8s",
                manifest: dict[str, Any] | None = None, publish: bool = True) -> None:
        self.note(self.served.stores.app.execute(register_version(
            operator(), slug=slug, version=version, runtime_backend=backend,
            manifest=manifest or {}, render=_render)))
        if publish:
            self.note(self.served.stores.app.execute(publish_version(
                operator(), slug=slug, version=version, render=_render)))


class Api:
    def __init__(self, served: Served, http: httpx.Client, tokens: Any):
        self.served, self.http, self.tokens = served, http, tokens
        self.catalog = Catalog(served)

    def member(self) -> tuple[str, uuid.UUID]:
        project = uuid.uuid4()
        return mint_token(self.tokens.secret, user_id=uuid.uuid4(),
                          project_ids=[str(project)]), project

    def request(self, method: str, template: str, token: str, *, project: uuid.UUID | None = None,
                key: str | None = None, json: Any = None, params: dict[str, Any] | None = None,
                **path: Any) -> httpx.Response:
        headers = {**bearer(token), "X-Ledger-Position": str(self.catalog.position)}
        if project is not None:
            headers["X-Project-ID"] = str(project)
        if key is not None:
            headers["Idempotency-Key"] = key
        response = self.http.request(method, template.format(**path), json=json, params=params,
                                     headers=headers)
        check(method, template, response)
        position = response.headers.get("X-Ledger-Position")
        if position:
            self.catalog.position = max(self.catalog.position, int(position))
        return response


@pytest.fixture(scope="module")
def served(services: Any) -> Iterator[Served]:
    with serve_own_database(services) as found:
        yield found


@pytest.fixture
def api(served: Served, tokens: Any) -> Iterator[Api]:
    with client(served.url) as http:
        yield Api(served, http, tokens)


def slugs(response: httpx.Response) -> list[str]:
    return [item.get("slug") or item.get("version") for item in response.json()["items"]]


# ---- the catalog ----------------------------------------------------------------------------------
def test_users_see_published_apps_and_versions_operators_see_everything(api: Api) -> None:
    seed = api.catalog
    shown = seed.app("aa-notebooks", category="training", name="Notebooks")
    seed.version(shown, "1.0")
    seed.version(shown, "1.1")
    seed.version(shown, "2.0-rc", publish=False)
    draft = seed.app("ab-draft", category="training")
    seed.version(draft, "0.1", publish=False)
    user, _ = api.member()
    admin = api.tokens.admin()

    listed = api.request("GET", CATALOG, user)
    assert listed.status_code == 200 and slugs(listed) == [shown]
    item = listed.json()["items"][0]
    assert (item["status"], item["latest_version"], item["display_name"]) == ("active", "1.1", "Notebooks")
    assert slugs(api.request("GET", VERSIONS, user, app_slug=shown)) == ["1.1", "1.0"]
    hidden = api.request("GET", VERSIONS, user, app_slug=draft)
    assert (hidden.status_code, hidden.json()["code"]) == (404, "app_not_found")
    assert api.request("GET", VERSIONS, user, app_slug="no-such-app").status_code == 404
    assert slugs(api.request("GET", CATALOG, user, params={"status": "disabled"})) == []

    everything = api.request("GET", CATALOG, admin)
    assert slugs(everything) == [shown, draft]
    assert everything.json()["items"][1]["status"] == "disabled"
    assert slugs(api.request("GET", VERSIONS, admin, app_slug=shown)) == ["1.1", "1.0", "2.0-rc"]
    assert slugs(api.request("GET", CATALOG, admin, params={"status": "disabled"})) == [draft]
    assert slugs(api.request("GET", CATALOG, admin, params={"category": "inference"})) == []

    for bad in ({"status": "gone"}, {"page_size": 0}, {"page_size": 201}, {"cursor": "bogus"}):
        refused = api.request("GET", CATALOG, user, params=bad)
        assert refused.status_code == 400, bad


def test_lists_page_by_slug_with_cursors_bound_to_their_filters(api: Api) -> None:
    seed = api.catalog
    made = [seed.app(f"pg-{i}-{uuid.uuid4().hex[:4]}", category="observability") for i in range(3)]
    for slug in made:
        seed.version(slug, "1")
    seed.version(made[0], "2")
    seed.version(made[0], "3")
    user, _ = api.member()
    seen, cursor = [], None
    while True:
        params = {"category": "observability", "page_size": 2, **({"cursor": cursor} if cursor else {})}
        page = api.request("GET", CATALOG, user, params=params).json()
        seen += [item["slug"] for item in page["items"]]
        cursor = page["pagination"]["next_cursor"]
        assert page["pagination"]["page_size"] == 2
        if cursor is None:
            break
        mismatched = api.request("GET", CATALOG, user, params={"cursor": cursor})
        assert mismatched.status_code == 400 and mismatched.json()["details"]["reason"] == "cursor_mismatch"
    assert seen == sorted(made)
    first = api.request("GET", VERSIONS, user, app_slug=made[0], params={"page_size": 2}).json()
    assert [v["version"] for v in first["items"]] == ["3", "2"]
    rest = api.request("GET", VERSIONS, user, app_slug=made[0],
                       params={"page_size": 2, "cursor": first["pagination"]["next_cursor"]}).json()
    assert [v["version"] for v in rest["items"]] == ["1"] and rest["pagination"]["next_cursor"] is None


def test_operators_publish_and_deprecate_versions(api: Api) -> None:
    seed = api.catalog
    slug = seed.app()
    seed.version(slug, "1.0")
    seed.version(slug, "2.0", publish=False)
    seed.version(slug, "3.0", publish=False)
    admin, (user, _) = api.tokens.admin(), api.member()

    published = api.request("POST", PUBLISH, admin, app_slug=slug, version="2.0", key="pub-1")
    assert published.status_code == 200, published.text
    assert published.json() == {"app_slug": slug, "version": "2.0", "runtime_backend": "k8s",
                                "manifest": {}, "status": "active"}
    replay = api.request("POST", PUBLISH, admin, app_slug=slug, version="2.0", key="pub-1")
    assert replay.json() == published.json() and replay.headers["Idempotent-Replayed"] == "true"
    before = appended(api.served.stores)
    again = api.request("POST", PUBLISH, admin, app_slug=slug, version="2.0")
    assert again.status_code == 200 and again.json()["status"] == "active"
    assert appended(api.served.stores) == before  # a repeat publish is a no-op
    assert api.request("GET", CATALOG, user).json()["items"]  # read-your-writes below
    item = next(i for i in api.request("GET", CATALOG, user).json()["items"] if i["slug"] == slug)
    assert item["latest_version"] == "2.0"

    deprecated = api.request("POST", DEPRECATE, admin, app_slug=slug, version="2.0")
    assert deprecated.status_code == 200 and deprecated.json()["status"] == "deprecated"
    assert api.request("POST", DEPRECATE, admin, app_slug=slug, version="2.0").json()["status"] == "deprecated"
    item = next(i for i in api.request("GET", CATALOG, user).json()["items"] if i["slug"] == slug)
    assert (item["latest_version"], item["status"]) == ("1.0", "active")
    republished = api.request("POST", PUBLISH, admin, app_slug=slug, version="2.0")
    assert republished.json()["status"] == "active"

    before = appended(api.served.stores)
    refusals = [
        (DEPRECATE, slug, "3.0", 409, "invalid_request"),
        (PUBLISH, slug, "9.9", 404, "app_version_not_found"),
        (DEPRECATE, "no-such-app", "1.0", 404, "app_not_found"),
    ]
    for template, app, version, status, code in refusals:
        refused = api.request("POST", template, admin, app_slug=app, version=version)
        assert (refused.status_code, refused.json()["code"]) == (status, code), refused.text
    assert api.request("POST", DEPRECATE, admin, app_slug=slug,
                       version="3.0").json()["details"]["reason"] == "app_version_not_published"
    assert api.request("POST", PUBLISH, user, app_slug=slug, version="3.0").status_code == 403
    assert api.request("POST", PUBLISH, admin, app_slug=slug, version="x" * 65).status_code == 400
    assert appended(api.served.stores) == before


# ---- entitlements -----------------------------------------------------------------------------------
def test_entitlements_are_granted_by_operators_and_listed_to_members(api: Api) -> None:
    slug = api.catalog.app()
    api.catalog.version(slug, "1.0")
    other = api.catalog.app()
    admin, (member, project) = api.tokens.admin(), api.member()
    outsider, _ = api.member()

    assert api.request("GET", ENTITLEMENTS, member, project_id=project).json() == {"items": []}
    body = {"enabled": True, "policy_overrides": {"max_instances": 2, "allowed_versions": ["1.0"]}}
    granted = api.request("PUT", ENTITLEMENT, admin, project_id=project, app_slug=slug, json=body)
    assert granted.status_code == 200, granted.text
    assert granted.json() == {"app_slug": slug, "project_id": str(project), "enabled": True,
                              "policy_overrides": body["policy_overrides"]}
    before = appended(api.served.stores)
    same = api.request("PUT", ENTITLEMENT, admin, project_id=project, app_slug=slug, json=body)
    assert same.json() == granted.json() and appended(api.served.stores) == before

    compat = api.request("PUT", V3_ENTITLEMENT, admin, project=project, app_slug=other,
                         json={"enabled": False})
    assert compat.status_code == 200 and compat.json() == {
        "app_slug": other, "project_id": str(project), "enabled": False, "policy_overrides": {}}
    listed = api.request("GET", ENTITLEMENTS, member, project_id=project).json()["items"]
    assert sorted(listed, key=lambda e: e["app_slug"]) == sorted(
        [granted.json(), compat.json()], key=lambda e: e["app_slug"])
    assert api.request("GET", ENTITLEMENTS, admin, project_id=project).json()["items"] == listed
    assert api.request("GET", ENTITLEMENTS, outsider, project_id=project).status_code == 403

    before = appended(api.served.stores)
    refusals = [
        (api.request("PUT", ENTITLEMENT, member, project_id=project, app_slug=slug,
                     json={"enabled": True}), 403, "admin_required"),
        (api.request("PUT", ENTITLEMENT, admin, project_id=project, app_slug="no-such-app",
                     json={"enabled": True}), 404, "app_not_found"),
        (api.request("PUT", ENTITLEMENT, admin, project_id=project, app_slug=slug,
                     json={"enabled": True, "policy_overrides": {"max_instances": "two"}}),
         400, "invalid_request"),
        (api.request("PUT", ENTITLEMENT, admin, project_id=project, app_slug=slug,
                     json={"enabled": "yes"}), 400, "validation_error"),
        (api.request("PUT", ENTITLEMENT, admin, project_id=project, app_slug="Bad_Slug",
                     json={"enabled": True}), 400, "validation_error"),
        (api.request("PUT", V3_ENTITLEMENT, admin, app_slug=slug, json={"enabled": True}),
         400, "validation_error"),
    ]
    for response, status, code in refusals:
        assert (response.status_code, response.json()["code"]) == (status, code), response.text
    assert appended(api.served.stores) == before


# ---- V3 -----------------------------------------------------------------------------------------------
PRESENTED = {
    "dependencies": ["ssh", "storage"],
    "presentation": {
        "kind": "jupyter", "featured": True, "short_description": "Notebooks on your GPUs",
        "support_tier": {"level": "demo_ready"},
        "runtime_presentation": {
            "config_defaults": {"image": "jupyter/base", "admin_password": "hunter2",
                                "auth": {"api_token": "s3cr3t", "mode": "token"}},
            "endpoints": [{"name": "lab", "label": "JupyterLab", "port": 8888}],
            "target_requirements": {"min_root_disk_mib": 20480}},
        "examples": {"language": "python", "code": "print('hi')"}},
}


def test_v3_catalog_shows_each_project_its_entitlement(api: Api) -> None:
    seed = api.catalog
    lab = seed.app(f"v3-lab-{uuid.uuid4().hex[:4]}", category="model_serving", name="Lab",
                   description="Interactive notebooks.\nWith GPUs.")
    seed.version(lab, "1.0", manifest=PRESENTED)
    seed.version(lab, "1.1", manifest=PRESENTED)
    plain = seed.app(f"v3-plain-{uuid.uuid4().hex[:4]}", category="model_serving")
    seed.version(plain, "1", manifest={"pricing": [{"component": "gateway", "usage_unit": "hour",
                                                    "unit_price": {"amount_minor": 90, "currency": "USD"}}]})
    draft = seed.app(f"v3-draft-{uuid.uuid4().hex[:4]}", category="model_serving")
    admin, (member, project), (stranger, elsewhere) = api.tokens.admin(), api.member(), api.member()
    api.request("PUT", ENTITLEMENT, admin, project_id=project, app_slug=lab,
                json={"enabled": True, "policy_overrides": {"allowed_versions": ["1.0"]}})

    mine = api.request("GET", V3_APPS, member, project=project,
                       params={"category": "model_serving"})
    assert mine.status_code == 200, mine.text
    body = mine.json()
    assert mine.headers["X-Read-Model-Cache"] in ("miss", "bypass")
    assert body["meta"]["cache"] == mine.headers["X-Read-Model-Cache"]
    items = {item["slug"]: item for item in body["items"]}
    assert set(items) == {lab, plain}  # an unpublished app is no card
    card = items[lab]
    assert card["entitlement"] == {"enabled": True, "reason": None}
    assert (card["kind"], card["version"], card["versions_available"]) == ("jupyter", "1.0", ["1.1", "1.0"])
    assert card["short_description"] == "Notebooks on your GPUs"
    assert card["long_description"] == "Interactive notebooks.\nWith GPUs."
    assert card["dependencies"] == ["ssh", "storage"] and card["featured"] is True
    assert card["runtime_presentation"]["config_defaults"] == {"image": "jupyter/base",
                                                              "auth": {"mode": "token"}}
    assert card["runtime_presentation"]["target_requirements"]["min_root_disk_mib"] == 20480
    assert (card["launch_href"], card["detail_href"]) == (f"/api/v1/launch/apps/{lab}", f"/api/v1/apps/{lab}")
    assert items[plain]["entitlement"] == {"enabled": False, "reason": "entitlement_missing"}
    assert items[plain]["kind"] == "app" and "hour" in items[plain]["pricing_hint"]
    assert [f["slug"] for f in body["featured"]] == [lab]
    assert "model_serving" in body["categories"]
    again = api.request("GET", V3_APPS, member, project=project, params={"category": "model_serving"})
    assert again.headers["X-Read-Model-Cache"] == "hit" and again.json()["meta"]["cache"] == "hit"
    assert again.json()["items"] == body["items"]

    theirs = api.request("GET", V3_APPS_COMPAT, stranger, project=elsewhere,
                         params={"category": "model_serving"}).json()
    assert {i["slug"]: i["entitlement"]["enabled"] for i in theirs["items"]} == {lab: False, plain: False}
    found = api.request("GET", V3_APPS, member, project=project, params={"search": "INTERACTIVE"}).json()
    assert [i["slug"] for i in found["items"]] == [lab]
    for bad in ({"category": "x" * 81}, {"search": "x" * 121}, {"page_size": 0}):
        assert api.request("GET", V3_APPS, member, project=project, params=bad).status_code == 400
    assert api.request("GET", V3_APPS, member, project=elsewhere).status_code == 403
    assert api.request("GET", V3_APPS, member).status_code == 400
    assert draft


def test_v3_app_detail_never_shows_secrets_and_reserves_literal_slugs(api: Api) -> None:
    seed = api.catalog
    lab = seed.app(f"v3-det-{uuid.uuid4().hex[:4]}", name="Detail Lab")
    seed.version(lab, "1.0", manifest=PRESENTED)
    seed.version(lab, "1.1", manifest=PRESENTED)
    seed.version(lab, "2.0", manifest=PRESENTED, publish=False)
    admin, (member, project) = api.tokens.admin(), api.member()
    api.request("PUT", ENTITLEMENT, admin, project_id=project, app_slug=lab,
                json={"enabled": True, "policy_overrides": {"allowed_versions": ["1.0"],
                                                            "launch_roles": ["owner", "member"]}})
    detail = api.request("GET", V3_APP, member, project=project, app_slug=lab)
    assert detail.status_code == 200, detail.text
    body = detail.json()
    assert "hunter2" not in detail.text and "s3cr3t" not in detail.text
    assert detail.headers["X-Read-Model-Cache"] == body["meta"]["cache"]
    assert body["app"]["slug"] == lab and body["app"]["name"] == "Detail Lab"
    assert body["versions"] == [
        {"version": "1.1", "runtime_backend": "k8s", "status": "active", "latest": True, "entitled": False},
        {"version": "1.0", "runtime_backend": "k8s", "status": "active", "latest": False, "entitled": True}]
    assert body["permissions"] == {"project_enabled": True, "allowed_versions": ["1.0"],
                                   "launch_roles": ["owner", "member"]}
    assert body["examples"] == {"language": "python", "code": "print('hi')"}
    assert body["running_workloads"] == []
    compat = api.request("GET", V3_APP_COMPAT, member, project=project, app_slug=lab).json()
    assert {**compat, "meta": None} == {**body, "meta": None}

    for reserved in ("instances", "registry", "artifacts"):
        refused = api.request("GET", V3_APP, member, project=project, app_slug=reserved)
        assert (refused.status_code, refused.json()["code"]) == (404, "app_not_found"), reserved
    literal = api.request("GET", "/api/v1/apps/catalog", member)
    assert literal.status_code == 200 and "pagination" in literal.json()  # the catalog route
    for slug, status in (("no-such-app", 404), ("Not_A_Slug", 400)):
        assert api.request("GET", V3_APP, member, project=project, app_slug=slug).status_code == status


def test_a_rebuild_reproduces_the_apps_read_model(api: Api) -> None:
    seed = api.catalog
    slug = seed.app(f"rb-{uuid.uuid4().hex[:4]}")
    seed.version(slug, "1", manifest=PRESENTED)
    admin, (member, project) = api.tokens.admin(), api.member()
    api.request("PUT", ENTITLEMENT, admin, project_id=project, app_slug=slug, json={"enabled": True})

    def snapshot() -> dict[str, list[Any]]:
        with api.served.stores.query_pool.connection() as conn:
            return {table: conn.execute(f"SELECT * FROM readmodels.{table} ORDER BY 1, 2").fetchall()
                    for table in BY_NAME["apps"].tables}

    detail = api.request("GET", V3_APP, member, project=project, app_slug=slug).json()
    before = snapshot()
    assert before["app_catalog"] and before["app_entitlements"]
    stores = api.served.stores
    with stores.query_pool.connection() as conn:  # damage the read model
        conn.execute("DELETE FROM readmodels.app_entitlements")
        conn.execute("UPDATE readmodels.app_catalog SET status = 'disabled'")
    rebuild(stores.app, stores.read_models, BY_NAME["apps"], batch_size=2)
    assert snapshot() == before
    again = api.request("GET", V3_APP, member, project=project, app_slug=slug).json()
    assert {**again, "meta": None} == {**detail, "meta": None}
