"""Audit logs through HTTP on a database of their own: commands of several areas (balance
adjustments, node registration, allocation create and release, a checkout and its
signed provider webhook, a refused adjustment) each leave exactly one audit row naming
the right actor, action and target; the caller, project, org, tenant, admin and
platform lists show only their scope; every sort pages without gaps or repeats and a
cursor only works under its own sort; the exports equal the list; and no secret a
command carried (webhook signature and body, bearer token, ssh key, a reason typed by
an operator) reaches any audit row. Every response is checked against the contract."""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import pytest

from api import webhooks
from api.auth import mint_token
from api.contract import contract
from api.queries.audit_logs import csv_row
from projections.audit_logs import CSV_COLUMNS
from tests.conftest import Served, serve_own_database
from tests.contract.test_contract import check
from tests.harness import bearer, client
from tests.integration.test_inventory_commands import baremetal_sku, make_node, make_sku

MINE, PROJECT, ORG = "/api/v1/audit-logs", "/api/v1/projects/{project_id}/audit-logs", \
    "/api/v1/orgs/{org_id}/audit-logs"
ADMIN, EXPORT = "/api/v1/admin/audit-logs", "/api/v1/admin/audit-logs/export"
ACCOUNT, V3_PROJECT, TENANT = "/api/v1/account/evidence/audit", \
    "/api/v1/project/evidence/audit", "/api/v1/access/evidence/audit"
PLATFORM, PLATFORM_EXPORT = "/api/v1/platform/evidence/audit", \
    "/api/v1/platform/evidence/audit/export"
COMPAT = {ACCOUNT: "/api/v1/v3/account/evidence/audit",
          V3_PROJECT: "/api/v1/v3/project/evidence/audit",
          TENANT: "/api/v1/v3/access/evidence/audit",
          PLATFORM: "/api/v1/v3/platform/evidence/audit",
          PLATFORM_EXPORT: "/api/v1/v3/platform/evidence/audit/export"}
ADJUST = "/api/v1/admin/users/{user_id}/balance"
CREATE, RELEASE = "/api/v1/allocations", "/api/v1/allocations/{allocation_id}/release"
CHECKOUT, WEBHOOK = "/api/v1/payments/checkout-session", "/api/v1/payments/webhook"
SORTS = ("occurred_at_desc", "occurred_at_asc", "action_asc", "action_desc", "result_asc",
         "result_desc", "target_asc", "target_desc")
WEBHOOK_SECRET = "whsec_audit_" + uuid.uuid4().hex
PLANTED_SSH = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPLANTED" + uuid.uuid4().hex
PLANTED_TOKEN = "sk_live_PLANTED_" + uuid.uuid4().hex
PLANTED_REASON = "PLANTED-REASON-" + uuid.uuid4().hex


@dataclass
class Caller:
    user: uuid.UUID
    project: uuid.UUID
    tenant: uuid.UUID
    token: str


class Api:
    def __init__(self, served: Served, http: httpx.Client, tokens: Any):
        self.served, self.http, self.tokens = served, http, tokens
        self.admin = tokens.admin()
        self.position = 0

    def caller(self) -> Caller:
        """A tenant's owner, owner of its one project: the project and org lists are
        "visible to project administrators" and "to tenant administrators"."""
        user, project, tenant = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        token = mint_token(self.tokens.secret, user_id=user, tenant_id=tenant,
                           project_ids=[str(project)], tenant_role="owner",
                           project_roles={project: "owner"})
        return Caller(user, project, tenant, token)

    def note(self, response: httpx.Response) -> httpx.Response:
        self.position = max(self.position, int(response.headers.get("X-Ledger-Position", 0)))
        return response

    def command(self, token: str | None, template: str, body: Any, *, request_id: str,
                project: uuid.UUID | None = None, key: str | None = None,
                raw: bytes | None = None, headers: dict[str, str] | None = None,
                **params: Any) -> httpx.Response:
        sent = {**(bearer(token) if token else {}), "X-Request-Id": request_id,
                "Idempotency-Key": key or uuid.uuid4().hex, **(headers or {})}
        if project is not None:
            sent["X-Project-ID"] = str(project)
        if raw is not None:
            response = self.http.post(template.format(**params), content=raw, headers=sent)
        else:
            response = self.http.post(template.format(**params), json=body, headers=sent)
        check("POST", template, response)
        return self.note(response)

    def get(self, token: str, template: str, *, headers: dict[str, str] | None = None,
            **params: Any) -> httpx.Response:
        path = {k: v for k, v in params.items() if "{" + k + "}" in template}
        query = {k: v for k, v in params.items() if k not in path and v is not None}
        response = self.http.get(template.format(**path), params=query, headers={
            **bearer(token), "X-Ledger-Position": str(self.position), **(headers or {})})
        if "text/csv" in response.headers.get("content-type", ""):
            assert response.status_code == 200
            assert "text/csv" in contract()["paths"][template]["get"]["responses"]["200"]["content"]
        else:
            check("GET", template, response)
        if response.status_code == 200:
            assert response.headers["X-Read-Model-Cache"] != "stale"
        return response

    def walk(self, token: str, template: str, page_size: int = 200,
             **params: Any) -> list[dict[str, Any]]:
        items, cursor, seen_cursors = [], None, set()
        while True:
            response = self.get(token, template, page_size=page_size, cursor=cursor, **params)
            assert response.status_code == 200, response.text
            body = response.json()
            assert len(body["items"]) <= page_size
            assert body["pagination"]["page_size"] == page_size
            items += body["items"]
            cursor = body["pagination"]["next_cursor"]
            if cursor is None:
                return items
            assert cursor not in seen_cursors
            seen_cursors.add(cursor)


@dataclass
class World:
    api: Api
    a: Caller
    b: Caller
    node_id: str
    allocation_a: str
    allocation_b: str
    session_id: str
    signature: str
    requests: dict[str, str]  # what each command was -> its X-Request-Id


@pytest.fixture(scope="module")
def world(services: Any, tokens: Any) -> Iterator[World]:
    with serve_own_database(services, webhook_secret=WEBHOOK_SECRET) as served, \
            client(served.url) as http:
        yield _drive(Api(served, http, tokens))


def _drive(api: Api) -> World:
    """The commands every test looks at, each under an X-Request-Id of its own."""
    requests = {name: f"audit-{name}-{uuid.uuid4().hex[:8]}" for name in (
        "fund_a", "fund_b", "node", "create_a", "create_b", "release_a", "checkout",
        "webhook", "refused")}
    a, b = api.caller(), api.caller()
    sku = f"audit-{uuid.uuid4().hex[:6]}"
    make_sku(api.http, api.admin, baremetal_sku(sku))
    node = api.note(api.http.post("/api/v1/admin/nodes", headers={
        **bearer(api.admin), "Idempotency-Key": uuid.uuid4().hex,
        "X-Request-Id": requests["node"]}, json={
        "host": f"10.77.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}", "sku": sku,
        "gpus_total": 8, "region_code": "eu-1", "probe": False}))
    check("POST", "/api/v1/admin/nodes", node)
    assert node.status_code == 201, node.text
    make_node(api.http, api.admin, sku)
    for caller, name in ((a, "fund_a"), (b, "fund_b")):
        response = api.command(api.admin, ADJUST, {
            "direction": "credit", "amount_minor": 100_000, "currency": "USD",
            "reason": PLANTED_REASON}, request_id=requests[name], user_id=caller.user)
        assert response.status_code == 200, response.text
    created = {}
    for caller, name in ((a, "create_a"), (b, "create_b")):
        response = api.command(caller.token, CREATE, {
            "scheduler_type": "bare_metal", "requested_count": 1,
            "scheduler_request": {"sku": sku, "ssh_authorized_key": PLANTED_SSH}},
            request_id=requests[name], project=caller.project)
        assert response.status_code == 201, response.text
        created[name] = response.json()["allocations"][0]["id"]
    released = api.command(a.token, RELEASE, None, request_id=requests["release_a"],
                           project=a.project, allocation_id=created["create_a"])
    assert released.status_code in (200, 202), released.text
    checkout = api.command(a.token, CHECKOUT, {"amount_minor": 2_500, "currency": "USD"},
                           request_id=requests["checkout"])
    assert checkout.status_code == 200, checkout.text
    session_id = checkout.json()["payment_session_id"]
    raw = json.dumps({"id": f"evt_{uuid.uuid4().hex}", "type": "checkout.session.completed",
                      "data": {"object": {"id": f"cs_{session_id}", "amount_total": 2_500,
                                          "currency": "usd", "payment_intent": "pi_audit",
                                          "metadata": {"payment_session_id": session_id,
                                                       "api_token": PLANTED_TOKEN}}}}).encode()
    signature = webhooks.sign(WEBHOOK_SECRET, raw)
    hook = api.command(None, WEBHOOK, None, raw=raw, request_id=requests["webhook"],
                       headers={"Content-Type": "application/json", webhooks.HEADER: signature})
    assert hook.status_code == 200, hook.text
    refused = api.command(api.admin, ADJUST, {
        "direction": "debit", "amount_minor": 10**12, "currency": "USD",
        "reason": PLANTED_REASON}, request_id=requests["refused"], user_id=b.user)
    assert refused.status_code == 400, refused.text
    return World(api, a, b, node.json()["id"], created["create_a"], created["create_b"],
                 session_id, signature, requests)


def one_row(world: World, name: str) -> dict[str, Any]:
    rows = world.api.walk(world.api.admin, ADMIN, correlation_id=world.requests[name])
    assert len(rows) == 1, (name, rows)
    return rows[0]


def test_each_command_leaves_exactly_one_row_naming_actor_action_and_target(
        world: World, tokens: Any) -> None:
    admin = str(tokens.admin_id)
    expected = {
        "fund_a": ("billing.balance.adjust", "billing_account", None, admin, "admin", "success"),
        "fund_b": ("billing.balance.adjust", "billing_account", None, admin, "admin", "success"),
        "node": ("node.create", "node", world.node_id, admin, "admin", "success"),
        "create_a": ("allocation.create", "allocation", world.allocation_a, str(world.a.user),
                     "user", "success"),
        "create_b": ("allocation.create", "allocation", world.allocation_b, str(world.b.user),
                     "user", "success"),
        "release_a": ("allocation.release", "allocation", world.allocation_a,
                      str(world.a.user), "user", "success"),
        "checkout": ("payment.session.create", "payment_session", world.session_id,
                     str(world.a.user), "user", "success"),
        "webhook": ("payment.webhook.receive", "provider_event", None, None, "system",
                    "success"),
        "refused": ("billing.balance.adjust", "idempotency_key", None, admin, "admin",
                    "failure"),
    }
    for name, (action, target_type, target_id, actor, role, result) in expected.items():
        row = one_row(world, name)
        assert (row["action"], row["target_type"], row["actor_user_id"], row["actor_role"],
                row["result"]) == (action, target_type, actor, role, result), (name, row)
        assert row["correlation_id"] == world.requests[name]
        if target_id is not None:
            assert row["target_id"] == target_id
        assert row["presentation"]["debug_refs"]["correlation_id"] == world.requests[name]
    fund = one_row(world, "fund_a")["metadata"]
    assert (fund["amount_minor"], fund["currency"], fund["direction"]) == \
        (100_000, "USD", "credit")
    assert one_row(world, "refused")["metadata"]["status"] == 400
    webhook = one_row(world, "webhook")["metadata"]
    assert webhook["event_type"] == "checkout.session.completed"
    assert webhook["source"] == "webhook"


def test_callers_see_only_their_scope(world: World) -> None:
    api, a, b = world.api, world.a, world.b
    mine_a = api.walk(a.token, MINE)
    mine_b = api.walk(b.token, MINE)
    ids_a, ids_b = {r["correlation_id"] for r in mine_a}, {r["correlation_id"] for r in mine_b}
    req = world.requests
    assert {req[n] for n in ("fund_a", "create_a", "release_a", "checkout", "webhook")} <= ids_a
    assert not ids_a & {req[n] for n in ("fund_b", "create_b", "refused", "node")}
    assert {req[n] for n in ("fund_b", "create_b")} <= ids_b
    assert not ids_b & {req[n] for n in ("fund_a", "create_a", "release_a", "webhook")}
    # a refusal appends only its idempotency record: its row is the actor's (and operators')
    assert req["refused"] not in ids_b
    assert req["refused"] in {r["correlation_id"] for r in api.walk(api.admin, MINE)}
    for template in (ACCOUNT, COMPAT[ACCOUNT]):
        assert api.walk(a.token, template) == mine_a
    # project: members only (403 for anyone else, the same for a project that does not exist)
    project_a = api.walk(a.token, PROJECT, project_id=a.project)
    assert {r["correlation_id"] for r in project_a} == {req["create_a"], req["release_a"]}
    for project in (a.project, uuid.uuid4()):
        denied = api.get(b.token, PROJECT, project_id=project)
        assert denied.status_code == 403, denied.text
    for template in (V3_PROJECT, COMPAT[V3_PROJECT]):
        headers = {"X-Project-ID": str(a.project)}
        assert api.walk(a.token, template, headers=headers) == project_a
        assert api.get(b.token, template, headers=headers).status_code == 403
        assert api.get(a.token, template).status_code == 400
    # org and tenant: the token's tenant only
    org_a = api.walk(a.token, ORG, org_id=a.tenant)
    assert {req["create_a"], req["release_a"], req["checkout"], req["webhook"]} <= \
        {r["correlation_id"] for r in org_a}
    assert not {r["correlation_id"] for r in org_a} & {req["create_b"], req["fund_b"]}
    assert api.get(b.token, ORG, org_id=a.tenant).status_code == 403
    for template in (TENANT, COMPAT[TENANT]):
        assert api.walk(a.token, template) == org_a
        assert api.walk(a.token, template, headers={"X-Tenant-ID": str(a.tenant)}) == org_a
        assert api.get(a.token, template,
                       headers={"X-Tenant-ID": str(b.tenant)}).status_code == 403
    # actor filters apply inside the scope
    assert api.walk(a.token, V3_PROJECT, headers={"X-Project-ID": str(a.project)},
                    actor_user_id=str(b.user)) == []
    # operators only
    for template in (ADMIN, EXPORT, PLATFORM, PLATFORM_EXPORT, COMPAT[PLATFORM],
                     COMPAT[PLATFORM_EXPORT]):
        assert api.get(a.token, template).status_code == 403
    everything = api.walk(api.admin, ADMIN)
    for template in (PLATFORM, COMPAT[PLATFORM]):
        assert api.walk(api.admin, template) == everything
    assert {r["id"] for r in mine_a + mine_b} <= {r["id"] for r in everything}
    assert api.walk(api.admin, ADMIN, actor_user_id=str(a.user)) == \
        [r for r in everything if r["actor_user_id"] == str(a.user)]
    assert api.walk(api.admin, ADMIN, actor_role="system") == \
        [r for r in everything if r["actor_role"] == "system"]
    assert api.walk(api.admin, PLATFORM, action=["allocation.create", "node.create"]) == \
        [r for r in everything if r["action"] in ("allocation.create", "node.create")]


def ordered(items: list[dict[str, Any]], sort: str) -> list[dict[str, Any]]:
    """``items`` in ``sort`` order: the sort's field, then occurred_at desc, then id desc."""
    field, _, direction = sort.rpartition("_")
    found = sorted(items, key=lambda r: r["id"], reverse=True)
    found.sort(key=lambda r: datetime.fromisoformat(r["occurred_at"]), reverse=True)
    if field == "occurred_at":
        return found if direction == "desc" else list(reversed(found))
    key = {"action": lambda r: r["action"], "result": lambda r: r["result"],
           "target": lambda r: (r["target_type"], r["target_id"] or "")}[field]
    return sorted(found, key=key, reverse=direction == "desc")


def test_every_sort_pages_without_gaps_or_repeats_and_cursors_keep_their_sort(
        world: World) -> None:
    api = world.api
    everything = api.walk(api.admin, ADMIN)
    assert len(everything) >= 9 and len({r["id"] for r in everything}) == len(everything)
    assert {r["result"] for r in everything} == {"success", "failure"}
    for sort in SORTS:
        whole = api.walk(api.admin, ADMIN, sort=sort)
        assert whole == ordered(everything, sort), sort
        assert api.walk(api.admin, ADMIN, page_size=2, sort=sort) == whole, sort
        assert api.walk(api.admin, PLATFORM, page_size=3, sort=sort) == whole, sort
    first = api.get(api.admin, ADMIN, page_size=2).json()
    cursor = first["pagination"]["next_cursor"]
    assert cursor is not None
    for params in ({"sort": "action_asc"}, {"sort": "occurred_at_asc"},
                   {"action": "allocation.create"}):
        mismatch = api.get(api.admin, ADMIN, page_size=2, cursor=cursor, **params)
        assert mismatch.status_code == 400 and mismatch.json()["code"] == "invalid_request"
    assert api.get(api.admin, PLATFORM, page_size=2, cursor=cursor).status_code == 400
    assert api.get(api.admin, ADMIN, page_size=2, cursor=cursor[:-2] + "xx").status_code == 400
    assert api.get(api.admin, ADMIN, page_size=0).status_code == 400
    assert api.get(api.admin, ADMIN, sort="newest").status_code == 400
    assert api.get(api.admin, PLATFORM, actor_role=["user", "robot"]).status_code == 400
    assert api.get(api.admin, EXPORT, action="Allocation Create").status_code == 400


def test_exports_equal_the_list(world: World) -> None:
    api = world.api
    for sort in ("occurred_at_desc", "target_asc", "result_desc"):
        for params in ({}, {"action": "allocation.create"}, {"actor_role": "admin"}):
            listed = api.walk(api.admin, ADMIN, sort=sort, **params)
            for template in (EXPORT, PLATFORM_EXPORT, COMPAT[PLATFORM_EXPORT]):
                text = api.get(api.admin, template, sort=sort, **params)
                lines = list(csv.reader(io.StringIO(text.text)))
                assert tuple(lines[0]) == CSV_COLUMNS
                assert lines[1:] == [csv_row(item) for item in listed], (template, sort, params)
                as_json = api.get(api.admin, template, sort=sort, format="json", **params).json()
                assert as_json["items"] == listed
                assert as_json["export"] == {"format": "json", "count": len(listed), "sort": sort}


def test_no_audit_row_holds_a_secret_the_commands_carried(world: World) -> None:
    api = world.api
    planted = (PLANTED_SSH, PLANTED_TOKEN, PLANTED_REASON, world.signature, world.a.token,
               world.b.token, api.admin, WEBHOOK_SECRET)
    answers = [json.dumps(api.walk(api.admin, ADMIN)), json.dumps(api.walk(world.a.token, MINE)),
               api.get(api.admin, EXPORT).text,
               api.get(api.admin, PLATFORM_EXPORT, format="json").text]
    with api.served.stores.query_pool.connection() as conn:
        stored = conn.execute("SELECT row_to_json(a)::text AS t FROM readmodels.audit_logs a"
                              ).fetchall()
    answers += [row["t"] for row in stored]
    assert len(stored) >= 9
    for text in answers:
        for secret in planted:
            assert secret not in text


def snapshot(served: Served) -> list[list[dict[str, Any]]]:
    with served.stores.query_pool.connection() as conn:
        return [conn.execute(f"SELECT * FROM readmodels.{table} ORDER BY 1").fetchall()
                for table in ("audit_logs", "audit_log_scopes")]


def test_rebuilding_in_any_batch_size_gives_the_same_rows(world: World) -> None:
    """A command's events split over several batches merge into the row one batch makes."""
    from consumers.rebuild import rebuild
    from projections import BY_NAME

    served = world.api.served
    before = snapshot(served)
    assert len(before[0]) >= 9
    with served.stores.query_pool.connection() as conn:  # damage the read model
        conn.execute("UPDATE readmodels.audit_logs SET action = 'x', details = '{}'")
    for batch_size in (1, 2, 1000):
        count = rebuild(served.stores.app, served.stores.read_models, BY_NAME["audit_logs"],
                        batch_size=batch_size)
        assert count == served.stores.app.recorder.max_notification_id()
        assert snapshot(served) == before, batch_size
