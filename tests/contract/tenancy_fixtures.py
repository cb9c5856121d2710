"""Two tenants and a neighbour project on one real server, for the tenancy tests
(``test_tenancy.py``).

Tenant A (its own tenant, project, two users — the tenant's and project's owner, and
a plain member — and the project's adapter service account) owns one of each kind of
resource the API serves with an id: allocations, a V3 compute launch (its task and
workload), app instances with a member, member operations and a repair operation, a
checkout session, refunds, usage records, rated usage lines, invoices, budgets and a
financial restriction. Tenant B (its own tenant, project, user and adapter) owns an
allocation, so its lists are not trivially empty.
N is A's neighbour: another project of A's tenant, with a user (its project's owner,
a member of the tenant) and an adapter.

Almost everything is created through the HTTP API; what has no operation of its own is
seeded with the domain commands through the server's own application, as an operator's
CLI would (the catalog's apps and versions, usage and its rating, invoice periods,
budgets). Every request sends back the highest ``X-Ledger-Position`` seen, so reads
answer from read models that have caught up with everything written before them.

``World.secrets`` holds every identifier of A's (and a few uniquely tagged amounts and
texts): the tests assert that no answer to B carries any of them beyond what B sent.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from typing import Any

import httpx

from api import webhooks
from api.auth import mint_token
from domain import budgets, invoices, usage
from domain.apps import register_app, register_version
from domain.errors import DomainError
from domain.money import Money
from domain.provenance import CommandContext
from infra.db import Stores
from tests.contract.schemas import error_schema, errors_in
from tests.contract.test_contract import check
from tests.harness import bearer, client

#: amounts and texts no other tenant could have: found in an answer to B, they leak A
BALANCE_A = 7_316_429
CHECKOUT_A = 4_818_273
REFUND_A = 1_219_341
SECRET_TEXT = "tenant-a-private-7f3c"
#: nodes of the first SKU: room for A's, B's and the role matrix's allocations
NODES = 16
APP_MANIFEST = {"operating_modes": ["platform_managed"], "pricing": [
    {"component": "control_plane", "usage_unit": "instance_hour",
     "unit_price": {"amount_minor": 360, "currency": "USD"}}]}


@dataclass
class Tenant:
    """A tenant with one project: a user (the project's owner, and ``tenant_role`` of the
    tenant), a second member (a token without role claims: tenant and project
    ``member``), the project's adapter."""

    name: str
    secret: str
    tenant: uuid.UUID = field(default_factory=uuid.uuid4)
    project: uuid.UUID = field(default_factory=uuid.uuid4)
    user: uuid.UUID = field(default_factory=uuid.uuid4)
    member: uuid.UUID = field(default_factory=uuid.uuid4)
    adapter_id: uuid.UUID = field(default_factory=uuid.uuid4)
    tenant_role: str = "owner"
    ids: dict[str, str] = field(default_factory=dict)

    def person(self, user: uuid.UUID | None = None, *, tenant_role: str | None = None,
               project_role: str | None = None) -> str:
        """A token of ``user`` (default: the tenant's user) as a member of the project,
        in the roles given (the claims are left out for those not given)."""
        return mint_token(self.secret, user_id=user or self.user, tenant_id=self.tenant,
                          project_ids=[str(self.project)], tenant_role=tenant_role,
                          project_roles={self.project: project_role} if project_role else None)

    @property
    def token(self) -> str:
        return self.person(tenant_role=self.tenant_role, project_role="owner")

    @property
    def member_token(self) -> str:
        return self.person(self.member)

    @property
    def adapter(self) -> str:
        return mint_token(self.secret, user_id=self.adapter_id, tenant_id=self.tenant,
                          actor_type="service_account", project_id=str(self.project))


#: 200s checked against docs/decisions.md's repair of the contract's three
#: unsatisfiable schemas (as tests/integration/test_invoices_budgets.py does)
REPAIRED = {("GET", "/api/v1/billing/account"), ("GET", "/api/v1/billing/budget-posture"),
            ("GET", "/api/v1/billing/invoices/{invoice_id}")}
#: header-scoped operations that declare no 403, yet answer it for a project the caller
#: is not a member of (api-conventions §2.5: the scope rule holds for every operation)
UNDECLARED_403 = {("GET", "/api/v1/allocations"), ("GET", "/api/v1/allocations/limits")}


@lru_cache(maxsize=None)
def _repaired(method: str, template: str) -> dict[str, Any]:
    from tests.integration.test_invoices_budgets import repaired_schema

    return repaired_schema(method, template, 200)


def conforms(method: str, template: str, response: httpx.Response) -> None:
    """The answer is one the contract allows (``test_contract.check``), with the two
    exceptions above."""
    if response.status_code == 200 and (method, template) in REPAIRED:
        assert not errors_in(response.json(), _repaired(method, template)), response.text
    elif response.status_code == 403 and (method, template) in UNDECLARED_403:
        assert not errors_in(response.json(), error_schema()), response.text
    else:
        check(method, template, response)


class World:
    """The server, its stores, the two tenants and the operators' tokens."""

    def __init__(self, http: httpx.Client, stores: Stores, secret: str, webhook_secret: str):
        self.http, self.stores, self.secret = http, stores, secret
        self.webhook_secret = webhook_secret
        self.admin = mint_token(secret, user_id=uuid.uuid4(), role="admin",
                                platform_roles=["platform_superadmin"])
        self.ops = mint_token(secret, user_id=uuid.uuid4(), platform_roles=["platform_ops"])
        self.a, self.b = Tenant("A", secret), Tenant("B", secret)
        self.n = Tenant("N", secret, tenant=self.a.tenant, tenant_role="member")
        self.position = 0
        self.requests = 0
        self.statuses: Counter[int] = Counter()
        #: A's first answers to keyed requests, by key: what a replay must give back
        self.keyed: dict[str, tuple[int, Any]] = {}
        self.skus: list[str] = []
        self.slugs: list[str] = []
        self.nodes: list[str] = []
        #: while set, requests carry ``X-Request-Id: <tag>-<n>`` and the ids are kept
        self.tag: str | None = None
        self.correlation_ids: list[str] = []

    # ---- requests ------------------------------------------------------------------------------
    def call(self, method: str, template: str, token: str | None, *, project: Any = None,
             body: Any = None, key: str | None = None, query: dict[str, Any] | None = None,
             headers: dict[str, str] | None = None, checked: bool = True,
             **path: Any) -> httpx.Response:
        """One request, with the read position so far; the answer is checked against the
        contract (status declared, or an allowed undeclared one; body valid)."""
        sent = {"X-Ledger-Position": str(self.position), **(bearer(token) if token else {}),
                **(headers or {})}
        if project is not None:
            sent["X-Project-ID"] = str(project)
        if key is not None:
            sent["Idempotency-Key"] = key
        if self.tag is not None:
            self.correlation_ids.append(f"{self.tag}-{uuid.uuid4().hex}")
            sent["X-Request-Id"] = self.correlation_ids[-1]
        response = self.http.request(method, template.format(**path), json=body,
                                     params=query, headers=sent)
        self.requests += 1
        self.statuses[response.status_code] += 1
        if checked and not template.endswith("/csv") and "export" not in template:
            conforms(method, template, response)
        self.position = max(self.position, int(response.headers.get("X-Ledger-Position", 0)))
        return response

    def ok(self, method: str, template: str, token: str | None, status: int = 200,
           **kwargs: Any) -> dict[str, Any]:
        response = self.call(method, template, token, **kwargs)
        assert response.status_code == status, (method, template, response.text)
        return response.json() if response.content else {}

    def run(self, factory: Any, now: datetime | None = None, **kwargs: Any) -> dict[str, Any]:
        """A domain command through the server's application, as an operator's CLI."""
        ctx = CommandContext(actor_id=str(uuid.uuid4()), actor_type="user", actor_role="admin",
                             source="admin", **({"now": now} if now else {}))

        def render(result: Any) -> dict[str, Any]:
            if isinstance(result, DomainError):
                raise result
            return {"status": 200, "body": result}

        outcome = self.stores.app.execute(factory(ctx, render=render, **kwargs))
        self.position = max(self.position, outcome.position or 0)
        return outcome.response["body"]

    def webhook(self, event: dict[str, Any], headers: dict[str, str] | None = None
                ) -> httpx.Response:
        """A provider event, signed as the provider signs it."""
        raw = json.dumps(event).encode()
        tagged = {}
        if self.tag is not None:
            self.correlation_ids.append(f"{self.tag}-{uuid.uuid4().hex}")
            tagged["X-Request-Id"] = self.correlation_ids[-1]
        response = self.http.post("/api/v1/payments/webhook", content=raw, headers={
            "Content-Type": "application/json", **tagged, **(headers or {}),
            webhooks.HEADER: webhooks.sign(self.webhook_secret, raw)})
        self.requests += 1
        self.statuses[response.status_code] += 1
        self.position = max(self.position, int(response.headers.get("X-Ledger-Position", 0)))
        return response

    # ---- what A owns -----------------------------------------------------------------------------
    @property
    def secrets(self) -> dict[str, str]:
        """Every identifier of A's, by name, and A's tagged amounts and text."""
        a = self.a
        found = {"user": str(a.user), "member": str(a.member), "tenant": str(a.tenant),
                 "project": str(a.project), "adapter": str(a.adapter_id), **a.ids,
                 "balance": str(BALANCE_A), "checkout": str(CHECKOUT_A),
                 "refund_amount": str(REFUND_A), "text": SECRET_TEXT}
        found.update({f"correlation_{n}": c for n, c in enumerate(self.correlation_ids)})
        return found


def sku_body(name: str) -> dict[str, Any]:
    return {"sku": name, "vendor": "nvidia", "display_name": f"{name} node",
            "resource_class": "gpu_baremetal", "billing_unit": "node_hour",
            "scheduling_unit": "node",
            "resources": {"accelerator_count": 8, "allowed_accelerator_counts": [8]},
            "unit_price": {"amount_minor": 2500, "currency": "USD"}}


def _operator_setup(w: World) -> None:
    for _ in range(2):
        name = f"tn-{uuid.uuid4().hex[:6]}"
        w.ok("POST", "/api/v1/admin/skus", w.admin, 201, body=sku_body(name), key=uuid.uuid4().hex)
        w.ok("POST", "/api/v1/admin/skus/{sku}/activate", w.admin, sku=name, key=uuid.uuid4().hex)
        w.skus.append(name)
    # room for every allocation the tests make as A's user (the default is 5 per user)
    w.ok("PUT", "/api/v1/admin/allocations/limits/policy", w.admin, body={"value": 50},
         key=uuid.uuid4().hex)
    for i in range(NODES):
        node = w.ok("POST", "/api/v1/admin/nodes", w.admin, 201, key=uuid.uuid4().hex, body={
            "host": f"10.77.{i}.{uuid.uuid4().int % 250}", "sku": w.skus[0], "gpus_total": 8,
            "region_code": "eu-1", "probe": False})
        w.nodes.append(node["id"])
    for _ in range(2):
        slug = f"tn-{uuid.uuid4().hex[:8]}"
        w.run(register_app, slug=slug, display_name="Tenancy app", category="inference",
              publisher="core42")
        for version in ("1", "2"):
            w.run(register_version, slug=slug, version=version, runtime_backend="k8s",
                  manifest=APP_MANIFEST)
            w.ok("POST", "/api/v1/admin/apps/catalog/{app_slug}/versions/{version}/publish",
                 w.admin, app_slug=slug, version=version, key=uuid.uuid4().hex)
        w.slugs.append(slug)
    for tenant, amount in ((w.a, BALANCE_A), (w.b, 100_000)):
        w.ok("POST", "/api/v1/admin/users/{user_id}/balance", w.admin, user_id=tenant.user,
             body={"direction": "credit", "amount_minor": amount, "currency": "USD",
                   "reason": "funds"}, key=uuid.uuid4().hex)
        w.ok("PUT", "/api/v1/projects/{project_id}/apps/entitlements/{app_slug}", w.admin,
             project_id=tenant.project, app_slug=w.slugs[0], body={"enabled": True},
             key=uuid.uuid4().hex)


#: the keyed requests A makes, which B later sends with the same key and body
def keyed_requests(w: World) -> dict[str, dict[str, Any]]:
    a = w.a
    return {
        "create": {"method": "POST", "template": "/api/v1/allocations", "status": 201,
                   "body": {"scheduler_type": "bare_metal", "requested_count": 2,
                            "scheduler_request": {"sku": w.skus[0]}}},
        "launch": {"method": "POST", "template": "/api/v1/launch/compute", "status": 202,
                   "body": {"sku": w.skus[0], "unit_count": 1, "name": "a launch"}},
        "checkout": {"method": "POST", "template": "/api/v1/payments/checkout-session",
                     "status": 200, "body": {"amount_minor": CHECKOUT_A, "currency": "USD"}},
        "app": {"method": "POST", "template": "/api/v1/projects/{project_id}/app-instances",
                "status": 202, "body": {"app_slug": w.slugs[0], "app_version": "1",
                                        "display_name": "a app"},
                "path": {"project_id": a.project}},
    }


def key_of(name: str) -> str:
    return f"tenancy-{name}-{RUN_KEYS}"


RUN_KEYS = uuid.uuid4().hex[:8]


def _tenant_a(w: World) -> None:
    a, ids = w.a, w.a.ids
    answers = {}
    for name, spec in keyed_requests(w).items():
        response = w.call(spec["method"], spec["template"], a.token, project=a.project,
                          body=spec["body"], key=key_of(name), **spec.get("path", {}))
        assert response.status_code == spec["status"], (name, response.text)
        w.keyed[name] = (response.status_code, response.json())
        answers[name] = response.json()
    ids["allocation"], ids["allocation_2"] = (x["id"] for x in answers["create"]["allocations"])
    ids["task"] = answers["launch"]["task_id"]
    ids["workload"] = answers["launch"]["workload_id"]
    ids["payment_session"] = answers["checkout"]["payment_session_id"]
    ids["provider_session"] = answers["checkout"]["provider_session_id"]
    ids["app_instance"] = answers["app"]["id"]
    released = w.call("POST", "/api/v1/allocations/{allocation_id}/release", a.token,
                      project=a.project, key=key_of("release"), allocation_id=ids["workload"])
    assert released.status_code == 202, released.text
    w.keyed["release"] = (released.status_code, released.json())

    instance = {"project_id": a.project, "app_instance_id": ids["app_instance"]}
    base = "/api/v1/projects/{project_id}/app-instances/{app_instance_id}"
    w.ok("POST", base + "/report", a.adapter, body={"status": "running"}, **instance)
    for n in (1, 2):
        op = w.ok("POST", base + "/member-operations", a.token, 202, key=uuid.uuid4().hex,
                  body={"action": "add", "component_key": f"worker-{n}"}, **instance)
        ids[f"member_operation_{n}" if n > 1 else "member_operation"] = op["id"]
    for name in ("member_operation", "member_operation_2"):
        member = str(uuid.uuid4())
        w.ok("POST", base + "/member-operations/{operation_id}/report", a.adapter,
             body={"status": "in_progress", "target_member_id": member},
             operation_id=ids[name], **instance)
        ids[name.replace("_operation", "")] = member
    for name in ("repair_operation_2", "repair_operation"):  # one open repair at a time
        repair = w.ok("POST", base + "/repair", a.token, 202, key=uuid.uuid4().hex,
                      body={"action": "reconcile", "scope": "whole_runtime",
                            "reason": SECRET_TEXT}, **instance)
        ids[name] = repair["id"]
        if name.endswith("_2"):
            for status in ("in_progress", "succeeded"):
                w.ok("POST", base + "/repair-operations/{repair_operation_id}/report", a.adapter,
                     body={"status": status}, repair_operation_id=repair["id"], **instance)
    launched = w.ok("POST", "/api/v1/launch/apps/{app_slug}", a.token, 202, project=a.project,
                    key=uuid.uuid4().hex, app_slug=w.slugs[0],
                    body={"app_version": "1", "display_name": "a launched app"})
    ids["app_instance_2"] = launched["workload_id"]
    ids["app_task"] = launched["task_id"]

    ids["payment_intent"] = f"pi_{uuid.uuid4().hex}"
    paid = w.webhook({"id": f"evt_{uuid.uuid4().hex}", "type": "checkout.session.completed",
                      "data": {"object": {"id": ids["provider_session"],
                                          "amount_total": CHECKOUT_A, "currency": "usd",
                                          "payment_intent": ids["payment_intent"],
                                          "metadata": {"payment_session_id":
                                                       ids["payment_session"]}}}})
    assert paid.status_code == 200, paid.text
    for n in (1, 2):
        refund = w.ok("POST", "/api/v1/admin/users/{user_id}/refunds", w.admin, 201,
                      user_id=a.user, key=uuid.uuid4().hex,
                      body={"amount_minor": REFUND_A + n, "currency": "USD",
                            "reason": "goodwill", "mode": "force_internal_credit"})
        ids[f"refund_{n}"] = refund["refund_id"]
    w.ok("POST", "/api/v1/admin/billing/financial-restrictions/{scope_type}/{scope_id}", w.admin,
         scope_type="project", scope_id=a.project, key=uuid.uuid4().hex,
         body={"state": "at_risk", "reason": SECRET_TEXT})
    _billing_history(w)


def _billing_history(w: World) -> None:
    """Two closed months of A's usage (two records, two rated lines, two invoices) and
    a tenant and a project budget."""
    a, ids = w.a, w.a.ids
    today = datetime.now(timezone.utc).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    months = [(today - timedelta(days=1)).replace(day=1)]
    months.insert(0, (months[0] - timedelta(days=1)).replace(day=1))
    for n, (month, allocation) in enumerate(zip(months, (ids["allocation"], ids["allocation_2"])),
                                            1):
        start = month + timedelta(days=9)
        w.run(usage.open_usage, now=start, start_time=start, meter=usage.Meter(
            usage_source="allocation", allocation_id=uuid.UUID(allocation),
            requested_by_user_id=a.user, org_id=a.tenant, project_id=a.project, units=1,
            sku=w.skus[0]))
        record = usage.usage_id_for_allocation(allocation)
        [line] = w.run(usage.close_usage, now=start + timedelta(hours=3), record_id=record,
                       end_time=start + timedelta(hours=2))["lines"]
        ids[f"usage_record_{n}" if n > 1 else "usage_record"] = str(record)
        ids[f"rated_line_{n}" if n > 1 else "rated_line"] = str(line["id"])
        period = month.strftime("%Y-%m")
        following = (month + timedelta(days=32)).replace(day=1)
        w.run(invoices.close_invoice_period, now=following + timedelta(minutes=5), period=period)
        invoice = invoices.invoice_id_for(a.user, a.tenant, "USD", period, 0)
        ids[f"invoice_{n}" if n > 1 else "invoice"] = str(invoice)
    for scope, project in (("tenant", None), ("project", a.project)):
        body = w.run(budgets.set_budget, org_id=a.tenant, scope_type=scope, project_id=project,
                     name=f"{SECRET_TEXT}-{scope}", period="monthly",
                     amount=Money(BALANCE_A + 1, "USD"), threshold_percent=50,
                     enforcement_mode="notify_only")
        ids[f"budget_{scope}"] = body["id"]


def _tenant_b(w: World) -> None:
    b = w.b
    created = w.ok("POST", "/api/v1/allocations", b.token, 201, project=b.project,
                   key=uuid.uuid4().hex, body={"scheduler_type": "bare_metal",
                                               "scheduler_request": {"sku": w.skus[0]}})
    b.ids["allocation"] = created["allocation"]["id"]


@contextmanager
def world(services: Any, secret: str) -> Iterator[World]:
    """A server over a database of its own, with A's and B's resources in it."""
    from tests.conftest import serve_own_database

    with serve_own_database(services, webhook_secret="whsec-tenancy") as served, \
            client(served.url) as http:
        w = World(http, served.stores, secret, served.settings.webhook_secret)
        _operator_setup(w)
        w.tag = "tenant-a"
        _tenant_a(w)
        w.tag = None
        _tenant_b(w)
        yield w
