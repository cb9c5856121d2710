"""Invoices, budgets, the billing account and currency settings through HTTP on real
Postgres, checked against the contract (with the three unsatisfiable schemas repaired
as docs/decisions.md records, and the raw contract's complaints pinned to exactly those
defects). Usage is seeded with the domain commands on the server's own stores, invoices
at chosen past moments (``now``), budgets around the real clock; reads wait with
``X-Ledger-Position``. The operator CLI (``invoices close|mark-due|pay|write-off|void``,
``budgets set``) runs in-process against the same database."""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from consumers.direct import catch_up
from consumers.rebuild import rebuild
from domain import billing, budgets, invoices, skus, usage
from domain.billing import account_id_for
from domain.errors import DomainError
from domain.invoices import NO_ORG, Period, invoice_id_for
from domain.money import Money
from domain.provenance import CommandContext
from infra.db import Stores
from projections import BY_NAME
from tests.contract.schemas import errors_in, response_schema
from tests.contract.test_contract import check
from tests.harness import bearer, client

INVOICES, INVOICE = "/api/v1/billing/invoices", "/api/v1/billing/invoices/{invoice_id}"
POSTURE, DECISIONS = "/api/v1/billing/budget-posture", "/api/v1/billing/budget-decisions"
ACCOUNT, CURRENCY = "/api/v1/billing/account", "/api/v1/billing/currency-settings"
RATED = "/api/v1/billing/rated-usage"
H = timedelta(hours=1)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


# ---- the contract, with its three unsatisfiable schemas repaired -------------------
def repaired_schema(method: str, path: str, status: int) -> dict[str, Any]:
    """The contract's schema with the repairs of docs/decisions.md: ``display_name``
    (required, undeclared, in a closed schema) dropped from ``required`` of
    ``BillingAccountResponse`` and ``BillingBudgetPosture``; ``BillingInvoiceDetail``'s
    two closed ``allOf`` parts merged into one closed object."""
    schema = copy.deepcopy(response_schema(method, path, status))
    components = schema["components"]["schemas"]
    for name in ("BillingAccountResponse", "BillingBudgetPosture"):
        components[name]["required"].remove("display_name")
    summary, extra = copy.deepcopy(components["BillingInvoiceSummary"]), \
        components["BillingInvoiceDetail"]["allOf"][1]
    summary["properties"].update(extra["properties"])
    summary["required"] += extra["required"]
    components["BillingInvoiceDetail"] = summary
    return schema


def check_repaired(method: str, path: str, response: httpx.Response,
                   raw_defect: str | None) -> None:
    """Valid against the repaired schema; against the raw contract, wrong only by the
    known defect (``raw_defect``: a fragment every raw complaint contains)."""
    assert response.status_code == 200, response.text
    assert not errors_in(response.json(), repaired_schema(method, path, 200))
    raw = errors_in(response.json(), response_schema(method, path, 200))
    if raw_defect is None:
        assert not raw
    else:
        assert raw and all(raw_defect in problem for problem in raw), raw


def render(result: Any) -> dict[str, Any]:
    if isinstance(result, DomainError):
        return {"status": 400, "body": {"code": result.code, "details": result.details}}
    return {"status": 200, "body": result}


@dataclass
class Env:
    url: str
    stores: Stores
    dsn: str
    position: int = 0

    def run(self, factory: Any, now: datetime | None = None, **kwargs: Any) -> dict[str, Any]:
        ctx = CommandContext(actor_id=str(uuid.uuid4()), actor_type="system", source="system",
                             **({"now": now} if now else {}))
        outcome = self.stores.app.execute(factory(ctx, render=render, **kwargs))
        assert outcome.response["status"] == 200, outcome.response
        self.position = max(self.position, outcome.position or 0)
        return outcome.response["body"]

    def headers(self, token: str) -> dict[str, str]:
        return {**bearer(token), "X-Ledger-Position": str(self.position)}

    def get(self, http: httpx.Client, token: str, template: str, **params: Any) -> httpx.Response:
        path = {k: v for k, v in params.items() if "{" + k + "}" in template}
        query = {k: v for k, v in params.items() if k not in path}
        response = http.get(template.format(**path), params=query, headers=self.headers(token))
        if response.status_code != 200:
            check("GET", template, response)
        return response


@pytest.fixture(scope="module")
def env(services: Any) -> Iterator[Env]:
    from tests.conftest import serve_own_database

    with serve_own_database(services) as served:
        yield Env(served.url, served.stores, served.dsn)


def sku(env: Env, price: int) -> str:
    name = f"gpu-{uuid.uuid4().hex[:6]}"
    env.run(skus.create_sku, sku=name, spec={
        "vendor": "nvidia", "display_name": "GPU", "resource_class": "gpu_baremetal",
        "billing_unit": "gpu_hour", "scheduling_unit": "node",
        "resources": {"accelerator_count": 8},
        "unit_price": {"amount_minor": price, "currency": "USD"}})
    return name


def meter(env: Env, name: str, owner: uuid.UUID, org: uuid.UUID | None, units: int,
          start: datetime, now: datetime) -> uuid.UUID:
    allocation = uuid.uuid4()
    env.run(usage.open_usage, now=now, start_time=start, meter=usage.Meter(
        usage_source="allocation", allocation_id=allocation, requested_by_user_id=owner,
        org_id=org, units=units, sku=name))
    return usage.usage_id_for_allocation(allocation)


def rate(env: Env, record: uuid.UUID, until: datetime, now: datetime) -> dict[str, Any]:
    [line] = env.run(usage.rate_usage, now=now, record_id=record, until=until)["lines"]
    return line


# ---- invoices -----------------------------------------------------------------------
@dataclass
class Invoiced:
    u: uuid.UUID
    v: uuid.UUID
    w: uuid.UUID
    org: uuid.UUID
    lines: dict[str, dict[str, Any]]  # name -> rated line row

    def invoice(self, owner: uuid.UUID, month: str, revision: int = 0,
                org: uuid.UUID | None = None) -> str:
        return str(invoice_id_for(owner, org or self.org, "USD", month, revision))


@pytest.fixture(scope="module")
def invoiced(env: Env) -> Invoiced:
    """U: October issued then partly paid (line A), a November draft (B, D and the late
    October line C rolled forward) and a November draft of usage without an org (E).
    V: October issued, voided, re-issued as a draft. W: a free October, paid at close."""
    gpu, free = sku(env, 300), sku(env, 0)
    s = Invoiced(u=uuid.uuid4(), v=uuid.uuid4(), w=uuid.uuid4(), org=uuid.uuid4(), lines={})
    r1 = meter(env, gpu, s.u, s.org, 2, at("2025-10-31T20:00"), at("2025-10-31T20:00"))
    rv = meter(env, gpu, s.v, s.org, 1, at("2025-10-31T21:00"), at("2025-10-31T21:00"))
    rw = meter(env, free, s.w, s.org, 1, at("2025-10-31T21:00"), at("2025-10-31T21:00"))
    s.lines["V"] = rate(env, rv, at("2025-10-31T23:00"), at("2025-10-31T23:00"))      # 600
    s.lines["W"] = rate(env, rw, at("2025-10-31T22:00"), at("2025-10-31T23:00"))      # 0
    s.lines["A"] = rate(env, r1, at("2025-11-01T00:00"), at("2025-11-01T00:00"))      # 2400
    closed = env.run(invoices.close_invoice_period, now=at("2025-11-01T00:05"), period="2025-10")
    assert {i["invoice_id"]: i["status"] for i in closed["finalized"]} == {
        s.invoice(s.u, "2025-10"): "issued", s.invoice(s.v, "2025-10"): "issued",
        s.invoice(s.w, "2025-10"): "paid"}
    s.lines["B"] = rate(env, r1, at("2025-11-01T02:00"), at("2025-11-01T02:00"))      # 1200
    r2 = meter(env, gpu, s.u, s.org, 1, at("2025-10-31T22:00"), at("2025-11-01T03:00"))
    s.lines["C"] = rate(env, r2, at("2025-10-31T23:00"), at("2025-11-01T03:00"))      # 300, late
    [s.lines["D"]] = env.run(usage.close_usage, now=at("2025-11-01T04:00"), record_id=r1,
                             end_time=at("2025-11-01T04:00"))["lines"]                  # 1200
    r3 = meter(env, gpu, s.u, None, 1, at("2025-11-01T04:00"), at("2025-11-01T05:00"))
    s.lines["E"] = rate(env, r3, at("2025-11-01T05:00"), at("2025-11-01T05:00"))      # 300
    env.run(invoices.apply_invoice_payment, now=at("2025-11-02T00:00"),
            invoice_id=uuid.UUID(s.invoice(s.u, "2025-10")), amount_minor=1000, reference="wire")
    env.run(invoices.void_invoice, now=at("2025-11-03T00:00"),
            invoice_id=uuid.UUID(s.invoice(s.v, "2025-10")), reason="wrong customer")
    return s


def ids(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["items"]]


def every_page(env: Env, http: httpx.Client, token: str, **params: Any) -> list[dict[str, Any]]:
    items, cursor = [], None
    while True:
        page = env.get(http, token, INVOICES, page_size=1, **params,
                       **({"cursor": cursor} if cursor else {}))
        check("GET", INVOICES, page)
        items += page.json()["items"]
        cursor = page.json()["pagination"]["next_cursor"]
        if cursor is None:
            return items


def test_invoices_list_filter_and_page(env: Env, invoiced: Invoiced, tokens: Any) -> None:
    s = invoiced
    token = tokens.user(s.u)
    nov = sorted([s.invoice(s.u, "2025-11"), s.invoice(s.u, "2025-11", org=NO_ORG)],
                 reverse=True)
    with client(env.url) as http:
        listed = env.get(http, token, INVOICES)
        check("GET", INVOICES, listed)
        assert ids(listed) == nov + [s.invoice(s.u, "2025-10")]  # latest month first
        assert listed.json()["pagination"] == {"next_cursor": None, "page_size": 50}
        by_id = {item["id"]: item for item in listed.json()["items"]}
        october = by_id[s.invoice(s.u, "2025-10")]
        assert october["status"] == "partially_paid"
        assert october["total"] == {"amount_minor": 2400, "currency": "USD"}
        assert october["tax_total"] == {"amount_minor": 0, "currency": "USD"}
        assert october["tax_treatment"] == "not_configured"
        assert october["tax_snapshot"]["treatment"] == "not_configured"
        assert october["period_start"] == "2025-10-01T00:00:00Z"
        assert october["period_end"] == "2025-11-01T00:00:00Z"
        assert october["finalized_at"] == october["issued_at"] == "2025-11-01T00:05:00Z"
        assert october["due_at"] is None and october["voided_at"] is None
        assert october["org_id"] == str(s.org)
        november = by_id[s.invoice(s.u, "2025-11")]
        assert november["status"] == "draft" and november["issued_at"] is None
        assert november["total"]["amount_minor"] == 1200 + 300 + 1200
        assert november["tax_snapshot"] == {}
        assert by_id[s.invoice(s.u, "2025-11", org=NO_ORG)]["org_id"] == str(NO_ORG)

        assert every_page(env, http, token) == listed.json()["items"]
        for status, want in (("draft", nov), ("partially_paid", [s.invoice(s.u, "2025-10")]),
                             ("paid", []), ("void", [])):
            assert ids(env.get(http, token, INVOICES, status=status)) == want, status
        assert [i["id"] for i in every_page(env, http, token, status="draft")] == nov

        first = env.get(http, token, INVOICES, page_size=1).json()
        cursor = first["pagination"]["next_cursor"]
        mismatch = env.get(http, token, INVOICES, page_size=1, cursor=cursor, status="draft")
        assert mismatch.status_code == 400
        assert mismatch.json()["details"]["reason"] == "cursor_mismatch"
        stolen = env.get(http, tokens.user(s.v), INVOICES, page_size=1, cursor=cursor)
        assert stolen.status_code == 400
        for bad in ({"page_size": 0}, {"page_size": 201}, {"status": "open"},
                    {"cursor": "garbage"}):
            assert env.get(http, token, INVOICES, **bad).status_code == 400, bad
        assert ids(env.get(http, tokens.user(uuid.uuid4()), INVOICES)) == []
        for response in (http.get(INVOICES), http.get(INVOICES, headers=bearer("nope"))):
            check("GET", INVOICES, response)
            assert response.status_code == 401


def test_invoice_detail_lines_and_scope(env: Env, invoiced: Invoiced, tokens: Any) -> None:
    s, lines = invoiced, invoiced.lines
    token = tokens.user(s.u)
    defect = "Additional properties are not allowed"  # two closed allOf parts: always
    with client(env.url) as http:
        october = env.get(http, token, INVOICE, invoice_id=s.invoice(s.u, "2025-10"))
        check_repaired("GET", INVOICE, october, defect)
        detail = october.json()
        [line] = detail["lines"]
        assert line["line_type"] == "rated_usage"
        assert line["rated_usage_line_id"] == str(lines["A"]["id"])
        assert line["ledger_entry_id"] == str(lines["A"]["ledger_entry_id"])
        assert line["amount"] == {"amount_minor": 2400, "currency": "USD"}
        assert line["payment_session_id"] is None and line["tax_rate_bps"] is None
        assert line["tax_evidence"] == {} and line["created_at"] == "2025-11-01T00:00:00Z"
        assert "2025-10-31T20:00:00Z" in line["description"]
        assert line["id"] == str(invoices.invoice_line_id_for(
            uuid.UUID(detail["id"]), str(lines["A"]["id"])))

        november = env.get(http, token, INVOICE, invoice_id=s.invoice(s.u, "2025-11"))
        check_repaired("GET", INVOICE, november, defect)
        body = november.json()
        assert [(l["rated_usage_line_id"], l["amount"]["amount_minor"]) for l in body["lines"]] \
            == [(str(lines[n]["id"]), lines[n]["amount_minor"]) for n in ("B", "C", "D")]
        assert body["total"]["amount_minor"] == sum(l["amount"]["amount_minor"]
                                                    for l in body["lines"])

        # every rated line of U is on exactly one of U's invoices that are not void
        rated = {i["id"] for i in env.get(http, token, RATED).json()["items"]}
        on_invoices = []
        for item in env.get(http, token, INVOICES).json()["items"]:
            if item["status"] != "void":
                got = env.get(http, token, INVOICE, invoice_id=item["id"]).json()
                on_invoices += [l["rated_usage_line_id"] for l in got["lines"]]
        assert sorted(on_invoices) == sorted(rated) and len(rated) == 5

        # each rated line links back to the invoice line that carries it
        links = {}
        for item in env.get(http, token, INVOICES).json()["items"]:
            for l in env.get(http, token, INVOICE, invoice_id=item["id"]).json()["lines"]:
                links[l["rated_usage_line_id"]] = (item["id"], l["id"])
        for name in ("A", "B", "C", "D", "E"):
            got = env.get(http, token, RATED + "/" + str(lines[name]["id"]))
            check("GET", RATED + "/{rated_usage_line_id}", got)
            assert (got.json()["invoice_id"], got.json()["invoice_line_id"]) \
                == links[str(lines[name]["id"])], name

        theirs = env.get(http, token, INVOICE, invoice_id=s.invoice(s.v, "2025-10"))
        assert theirs.status_code == 404
        assert theirs.json()["details"]["reason"] == "invoice_not_found"
        assert env.get(http, token, INVOICE, invoice_id=str(uuid.uuid4())).status_code == 404
        assert env.get(http, token, INVOICE, invoice_id="nope").status_code == 400
        for response in (http.get(INVOICE.format(invoice_id=s.invoice(s.u, "2025-10"))),):
            check("GET", INVOICE, response)
            assert response.status_code == 401


def test_void_reissues_and_zero_totals_are_paid(env: Env, invoiced: Invoiced,
                                                tokens: Any) -> None:
    s = invoiced
    with client(env.url) as http:
        token = tokens.user(s.v)
        listed = env.get(http, token, INVOICES).json()["items"]
        assert [(i["id"], i["status"]) for i in listed] == sorted([
            (s.invoice(s.v, "2025-10", 1), "draft"), (s.invoice(s.v, "2025-10"), "void")],
            reverse=True)
        void, reissue = (env.get(http, token, INVOICE, invoice_id=s.invoice(s.v, "2025-10", r))
                         .json() for r in (0, 1))
        assert void["voided_at"] == "2025-11-03T00:00:00Z"
        assert void["finalized_at"] == "2025-11-01T00:05:00Z"
        assert [l["rated_usage_line_id"] for l in void["lines"]] == \
            [l["rated_usage_line_id"] for l in reissue["lines"]] == [str(s.lines["V"]["id"])]
        assert void["lines"][0]["id"] != reissue["lines"][0]["id"]
        assert reissue["total"] == void["total"] == {"amount_minor": 600, "currency": "USD"}
        assert reissue["period_start"] == "2025-10-01T00:00:00Z"

        [free] = env.get(http, tokens.user(s.w), INVOICES).json()["items"]
        assert free["status"] == "paid" and free["total"]["amount_minor"] == 0


def test_a_rebuild_reproduces_the_invoices_read_model(env: Env, invoiced: Invoiced) -> None:
    stores = env.stores
    catch_up(stores.app, stores.read_models)

    def snapshot() -> dict[str, list[Any]]:
        with stores.query_pool.connection() as conn:
            return {t: conn.execute(f"SELECT * FROM readmodels.{t} ORDER BY id").fetchall()
                    for t in BY_NAME["invoices"].tables}

    before = snapshot()
    assert len(before["invoices"]) >= 6 and len(before["invoice_lines"]) >= 7
    with stores.query_pool.connection() as conn:
        conn.execute("DELETE FROM readmodels.invoice_lines")
        conn.execute("UPDATE readmodels.invoices SET total_minor = 0, status = 'draft'")
    rebuild(stores.app, stores.read_models, BY_NAME["invoices"], batch_size=4)
    assert snapshot() == before


# ---- budgets --------------------------------------------------------------------------
@dataclass
class Budgeted:
    tenant: uuid.UUID
    project: uuid.UUID
    other_project: uuid.UUID
    user: uuid.UUID
    policies: dict[str, str]  # name -> id
    rated_at: list[str]


def runtime(env: Env, owner: uuid.UUID, org: uuid.UUID, project: uuid.UUID | None,
            start: datetime, seconds: int) -> dict[str, Any]:
    """An app runtime at 100 minor units per second, closed after ``seconds``."""
    record = uuid.uuid4()
    env.run(usage.open_usage, record_id=record, start_time=start, meter=usage.Meter(
        usage_source="app_runtime", app_instance_id=uuid.uuid4(), requested_by_user_id=owner,
        org_id=org, project_id=project, units=1),
        price=usage.Price(unit_price=Money(360_000, "USD"), usage_unit="gpu_hour",
                          pricing_source="app_manifest"))
    [line] = env.run(usage.close_usage, record_id=record,
                     end_time=start + timedelta(seconds=seconds))["lines"]
    return line


def this_month_start() -> datetime:
    """A start for usage well inside the current month (skips the first minutes)."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    if now - Period.of(now).start < timedelta(minutes=10):
        pytest.skip("too close to the start of a month")
    return now - timedelta(minutes=5)


@pytest.fixture(scope="module")
def budgeted(env: Env) -> Budgeted:
    b = Budgeted(tenant=uuid.uuid4(), project=uuid.uuid4(), other_project=uuid.uuid4(),
                 user=uuid.uuid4(), policies={}, rated_at=[])
    now = datetime.now(timezone.utc)

    def policy(name: str, amount: int, threshold: int, mode: str, project: uuid.UUID | None = None,
               **extra: Any) -> None:
        body = env.run(budgets.set_budget, org_id=b.tenant,
                       scope_type="project" if project else "tenant", project_id=project,
                       name=name, period=extra.pop("period", "monthly"),
                       amount=Money(amount, "USD"), threshold_percent=threshold,
                       enforcement_mode=mode, **extra)
        b.policies[name] = body["id"]

    policy("tenant monthly", 50_000, 50, "notify_only")
    policy("tenant monthly", 10_000, 50, "notify_only")  # set again: updated, same id
    policy("project", 5_000, 80, "block_launch", project=b.project)
    policy("not mine", 100, 80, "suspend", project=b.other_project)
    policy("old", 100, 10, "notify_only", active=False)
    policy("future", 100, 10, "block_launch", period="custom",
           starts_at=now + timedelta(days=10), ends_at=now + timedelta(days=20))
    start = this_month_start()
    b.rated_at.append(runtime(env, b.user, b.tenant, b.project, start, 60)["created_at"])
    b.rated_at.append(runtime(env, uuid.uuid4(), b.tenant, b.other_project, start, 10)["created_at"])
    runtime(env, b.user, uuid.uuid4(), b.project, start, 100)  # another tenant's usage
    return b


def z(moment: Any) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def test_budget_posture(env: Env, budgeted: Budgeted, tokens: Any) -> None:
    b = budgeted
    token = tokens.user(b.user, tenant_id=b.tenant, project_ids=[str(b.project)])
    defect = "'display_name' is a required property"
    with client(env.url) as http:
        answer = env.get(http, token, POSTURE)
        check_repaired("GET", POSTURE, answer, defect)
        items = answer.json()["items"]
        assert [i["name"] for i in items] == ["future", "old", "tenant monthly", "project"]
        assert "display_name" not in items[0]
        by_name = {i["name"]: i for i in items}
        tenant = by_name["tenant monthly"]
        assert tenant["id"] == b.policies["tenant monthly"]
        assert tenant["amount"] == {"amount_minor": 10_000, "currency": "USD"}
        assert tenant["department_id"] == tenant["org_id"] == str(b.tenant)
        assert tenant["project_id"] is None and tenant["period"] == "monthly"
        month = Period.of(datetime.now(timezone.utc))
        assert tenant["starts_at"] == z(month.start) and tenant["ends_at"] is None
        event = tenant["latest_event"]
        assert event["threshold_key"] == "threshold_50" and event["status"] == "open"
        assert event["spent"] == {"amount_minor": 7_000, "currency": "USD"}  # 6000 + 1000
        assert event["percent_used"] == 70 and event["seen_count"] == 2
        assert event["first_seen_at"] == z(b.rated_at[0])
        assert event["last_seen_at"] == z(b.rated_at[1])
        assert (event["period_start"], event["period_end"]) == (z(month.start), z(month.end))
        project = by_name["project"]["latest_event"]
        assert project["threshold_key"] == "budget_exceeded" and project["percent_used"] == 120
        assert project["spent"]["amount_minor"] == 6_000 and project["seen_count"] == 1
        assert by_name["project"]["enforcement_mode"] == "block_launch"
        assert by_name["old"]["active"] is False and by_name["old"]["latest_event"] is None
        assert by_name["future"]["latest_event"] is None

        assert [i["name"] for i in env.get(http, token, POSTURE, scope_type="project")
                .json()["items"]] == ["project"]
        assert [i["name"] for i in env.get(http, token, POSTURE, scope_type="tenant")
                .json()["items"]] == ["future", "old", "tenant monthly"]
        assert [i["name"] for i in env.get(http, token, POSTURE, project_id=str(b.project))
                .json()["items"]] == ["project"]
        outside = env.get(http, token, POSTURE, project_id=str(b.other_project))
        assert outside.status_code == 400
        assert outside.json()["details"]["reason"] == "project_not_in_scope"
        assert env.get(http, token, POSTURE, scope_type="org").status_code == 400
        no_tenant = env.get(http, tokens.user(b.user), POSTURE)
        check("GET", POSTURE, no_tenant)
        assert no_tenant.json() == {"items": []}
        assert http.get(POSTURE).status_code == 401


def test_budget_decisions_are_what_ifs(env: Env, budgeted: Budgeted, tokens: Any) -> None:
    b = budgeted
    token = tokens.user(b.user, tenant_id=b.tenant, project_ids=[str(b.project)])

    def decide(body: dict[str, Any], who: str = token) -> httpx.Response:
        response = http.post(DECISIONS, json=body, headers=env.headers(who))
        check("POST", DECISIONS, response)
        return response

    def usd(amount: int) -> dict[str, Any]:
        return {"amount_minor": amount, "currency": "USD"}

    with client(env.url) as http:
        before = env.stores.app.recorder.max_notification_id()
        both = decide({"proposed_amount": usd(0), "project_id": str(b.project)}).json()
        assert both["decision"] == "would_block"
        tenant, project = both["items"]
        assert (tenant["display_name"], tenant["decision"], tenant["reason"]) == \
            ("tenant monthly", "warn", "threshold_crossed")
        assert tenant["spent"] == usd(7_000) and tenant["percent_used_before"] == 70
        assert tenant["budget_policy_id"] == b.policies["tenant monthly"]
        assert (project["decision"], project["reason"], project["enforcement_mode"]) == \
            ("would_block", "budget_exceeded", "block_launch")
        assert project["project_id"] == str(b.project) and project["percent_used_after"] == 120

        verdicts = []
        for amount in (0, 2_999, 3_000, 3_001, 10**9):
            [item] = decide({"proposed_amount": usd(amount)}).json()["items"]
            assert item["projected_spend"] == usd(7_000 + amount)
            verdicts.append((item["reason"], item["decision"]))
        assert verdicts == [("threshold_crossed", "warn")] * 3 + [("budget_exceeded", "warn")] * 2

        # a tenant with a blocking budget: monotone in the proposed amount
        blocking = uuid.uuid4()
        env.run(budgets.set_budget, org_id=blocking, scope_type="tenant", project_id=None,
                name="cap", period="annual", amount=Money(100_000, "USD"), threshold_percent=90,
                enforcement_mode="suspend")
        who = tokens.user(uuid.uuid4(), tenant_id=blocking)
        seen = [decide({"proposed_amount": usd(a)}, who).json()["decision"]
                for a in (0, 89_999, 90_000, 100_000, 100_001)]
        assert seen == ["allow", "allow", "warn", "warn", "would_block"]

        euro = uuid.uuid4()
        env.run(budgets.set_budget, org_id=euro, scope_type="tenant", project_id=None,
                name="eur", period="quarterly", amount=Money(100, "EUR"), threshold_percent=50,
                enforcement_mode="block_launch")
        who = tokens.user(uuid.uuid4(), tenant_id=euro)
        mismatch = decide({"proposed_amount": usd(1)}, who)
        assert mismatch.status_code == 400
        assert mismatch.json()["details"]["reason"] == "currency_mismatch"
        assert decide({"proposed_amount": {"amount_minor": 60, "currency": "EUR"}},
                      who).json()["decision"] == "warn"

        assert decide({"proposed_amount": usd(5)}, tokens.user(b.user)).json() == \
            {"decision": "allow", "items": []}
        for body, reason in (({"proposed_amount": usd(1), "project_id": str(b.other_project)},
                              "project_not_in_scope"),
                             ({"proposed_amount": {"amount_minor": 1, "currency": "ZZZ"}},
                              "unsupported_currency")):
            refused = decide(body)
            assert refused.status_code == 400 and refused.json()["details"]["reason"] == reason
        for body in ({"proposed_amount": usd(-1)}, {}, {"proposed_amount": usd(1), "x": 1},
                     {"proposed_amount": {"amount_minor": 1.5, "currency": "USD"}}):
            refused = decide(body)
            assert refused.status_code == 400 and refused.json()["code"] == "validation_error"
        assert http.post(DECISIONS, json={"proposed_amount": usd(1)}).status_code == 401
        # what-ifs append nothing (the budgets set above aside)
        assert env.stores.app.recorder.max_notification_id() == before + 4


# ---- account and currency settings -------------------------------------------------
def test_billing_account_and_currency_settings(env: Env, budgeted: Budgeted,
                                               tokens: Any) -> None:
    b = budgeted
    env.run(billing.adjust_balance, user_id=b.user, direction="credit",
            amount=Money(500, "EUR"), reason="goodwill")
    token = tokens.user(b.user, tenant_id=b.tenant)
    with client(env.url) as http:
        account = env.get(http, token, ACCOUNT)
        check_repaired("GET", ACCOUNT, account, "'display_name' is a required property")
        assert account.json() == {
            "billing_account_id": str(account_id_for(b.user)), "tenant_id": str(b.tenant),
            "account_type": "tenant", "parent_billing_account_id": None,
            "reseller_tenant_id": None, "invoice_recipient_tenant_id": str(b.tenant),
            "default_currency": "USD", "wholesale_pricing_plan_id": None,
            "customer_pricing_plan_id": None, "tax_responsibility": "platform",
            "credit_risk_owner": "platform", "status": "active"}
        settings = env.get(http, token, CURRENCY)
        check("GET", CURRENCY, settings)
        assert settings.json() == {"tenant_id": str(b.tenant), "default_currency": "USD",
                                   "supported_currencies": ["EUR", "USD"], "fx_snapshot": None}

        newcomer = tokens.user(uuid.uuid4(), tenant_id=b.tenant)
        assert env.get(http, newcomer, ACCOUNT).json()["billing_account_id"] is None
        assert env.get(http, newcomer, CURRENCY).json()["supported_currencies"] == ["USD"]
        for path in (ACCOUNT, CURRENCY):
            forbidden = env.get(http, tokens.user(b.user), path)
            assert forbidden.status_code == 403
            assert forbidden.json()["code"] == "insufficient_permissions"
            assert forbidden.json()["details"]["reason"] == "tenant_required"
            unauthenticated = http.get(path)
            check("GET", path, unauthenticated)
            assert unauthenticated.status_code == 401


# ---- the operator CLI ----------------------------------------------------------------
def test_the_cli_closes_pays_voids_and_sets_budgets(services: Any, tokens: Any, tmp_path: Any,
                                                    monkeypatch: Any) -> None:
    """On a database of its own: its close rates every open meter there."""
    from tests.conftest import SECRET, serve_own_database

    with serve_own_database(services) as served:
        cli_scenario(Env(served.url, served.stores, served.dsn), tokens, tmp_path, monkeypatch,
                     SECRET)


def cli_scenario(env: Env, tokens: Any, tmp_path: Any, monkeypatch: Any, secret: str) -> None:
    from infra.cli import cli

    for name, value in (("PG_DSN", env.dsn), ("JWT_SECRET", secret), ("WEBHOOK_SECRET", "w" * 32),
                        ("DATA_DIR", str(tmp_path)), ("REDIS_URL", "")):
        monkeypatch.setenv(f"LEDGERCORE_{name}", value)
    runner = CliRunner()

    def cli_json(*args: str) -> dict[str, Any]:
        result = runner.invoke(cli, list(args))
        assert result.exit_code == 0, (result.output, result.exception)
        env.position = env.stores.app.recorder.max_notification_id()
        return json.loads(result.stdout)

    # usage that ran into the end of last month, still open: the close rates it first
    now = datetime.now(timezone.utc)
    last = Period.of(Period.of(now).start - timedelta(days=1))
    owner, tenant = uuid.uuid4(), uuid.uuid4()
    record = meter(env, sku(env, 360), owner, tenant, 1, last.end - 2 * H, now)
    unfinished = runner.invoke(cli, ["invoices", "close", "--period", Period.of(now).key])
    assert unfinished.exit_code == 1
    closed = cli_json("invoices", "close", "--period", last.key)
    assert closed["rated_records"] == 1
    [mine] = closed["finalized"]
    assert mine["owner_user_id"] == str(owner) and mine["status"] == "issued"
    assert mine["total"] == {"amount_minor": 720, "currency": "USD"}
    assert env.stores.app.get_or_none(record).last_billed_at == last.end
    paid = cli_json("invoices", "pay", "--invoice", mine["invoice_id"], "--amount-minor", "720",
                    "--reference", "wire-1")
    assert paid["ok"]["status"] == "paid"
    refused = runner.invoke(cli, ["invoices", "void", "--invoice", mine["invoice_id"],
                                  "--reason", "late"])
    assert refused.exit_code == 1
    assert json.loads(refused.stdout)["error"]["details"]["reason"] == "invoice_not_voidable"

    # payment terms of zero days: due at once, then written off
    earlier = Period.of(last.start - timedelta(days=1))
    debtor = uuid.uuid4()
    meter(env, sku(env, 360), debtor, tenant, 1, earlier.end - H, earlier.end - H)
    [owed] = cli_json("invoices", "close", "--period", earlier.key, "--due-days", "0")["finalized"]
    assert owed["due_at"] is not None and owed["status"] == "issued"
    assert [i["invoice_id"] for i in cli_json("invoices", "mark-due", "--period",
                                              earlier.key)["became_due"]] == [owed["invoice_id"]]
    written = cli_json("invoices", "write-off", "--invoice", owed["invoice_id"],
                       "--reason", "uncollectable")
    assert written["ok"]["status"] == "write_off"

    set_ = cli_json("budgets", "set", "--tenant", str(tenant), "--name", "ops",
                    "--amount-minor", "1000", "--threshold", "75", "--mode", "block_launch")
    assert set_["ok"]["scope_type"] == "tenant" and set_["ok"]["amount"]["amount_minor"] == 1000
    bad = runner.invoke(cli, ["budgets", "set", "--tenant", str(tenant), "--name", "x",
                              "--amount-minor", "0"])
    assert bad.exit_code == 1
    with client(env.url) as http:
        token = tokens.user(owner, tenant_id=tenant)
        [invoice] = env.get(http, token, INVOICES).json()["items"]
        assert (invoice["id"], invoice["status"]) == (mine["invoice_id"], "paid")
        [budget] = env.get(http, token, POSTURE).json()["items"]
        assert (budget["name"], budget["threshold_percent"]) == ("ops", 75)


def test_rated_line_follows_its_invoice_through_a_void(env: Env, invoiced: Invoiced,
                                                       tokens: Any) -> None:
    """V's October invoice was voided and its line re-issued on revision 1: the rated
    line now points at revision 1, never at the void invoice."""
    s = invoiced
    token = tokens.user(s.v)
    with client(env.url) as http:
        listed = env.get(http, token, RATED)
        check("GET", RATED, listed)
        [line] = listed.json()["items"]
        assert line["id"] == str(s.lines["V"]["id"])
        assert line["invoice_id"] == s.invoice(s.v, "2025-10", revision=1)
        detail = env.get(http, token, INVOICE, invoice_id=line["invoice_id"]).json()
        assert detail["status"] == "draft"
        assert [l["id"] for l in detail["lines"]] == [line["invoice_line_id"]]
        void = env.get(http, token, INVOICE, invoice_id=s.invoice(s.v, "2025-10")).json()
        assert void["status"] == "void"
        assert line["invoice_line_id"] not in [l["id"] for l in void["lines"]]


def refused(env: Env, factory: Any, now: datetime, **kwargs: Any) -> dict[str, Any]:
    ctx = CommandContext(actor_id=str(uuid.uuid4()), actor_type="system", source="system",
                         now=now)
    outcome = env.stores.app.execute(factory(ctx, render=render, **kwargs))
    assert outcome.response["status"] != 200 and outcome.position is None, outcome.response
    return outcome.response["body"]


def test_payment_terms_due_and_write_off(env: Env, tokens: Any) -> None:
    """Closing with payment terms gives each invoice that owes something a ``due_at``;
    the month's clock tick moves the unpaid ones to ``due`` once it has passed; a due
    invoice still takes payments and can be written off or voided; a written-off one
    takes nothing more."""
    gpu, free = sku(env, 300), sku(env, 0)
    late, payer, writer, voider, nothing = (uuid.uuid4() for _ in range(5))
    org = uuid.uuid4()
    for owner in (late, payer, writer, voider):
        record = meter(env, gpu, owner, org, 1, at("2025-06-30T22:00"), at("2025-06-30T22:00"))
        rate(env, record, at("2025-06-30T23:00"), at("2025-06-30T23:00"))           # 300
    record = meter(env, free, nothing, org, 1, at("2025-06-30T22:00"), at("2025-06-30T22:00"))
    rate(env, record, at("2025-06-30T23:00"), at("2025-06-30T23:00"))               # 0
    invoice = {o: invoice_id_for(o, org, "USD", "2025-06", 0)
               for o in (late, payer, writer, voider, nothing)}

    closed = env.run(invoices.close_invoice_period, now=at("2025-07-01T00:00"),
                     period="2025-06", due_days=14)
    due_at = {uuid.UUID(i["invoice_id"]): i["due_at"] for i in closed["finalized"]}
    assert due_at == {**{invoice[o]: "2025-07-15T00:00:00Z" for o in (late, payer, writer,
                                                                      voider)},
                      invoice[nothing]: None}  # nothing owed: paid at once, never due
    env.run(invoices.apply_invoice_payment, now=at("2025-07-02T00:00"),
            invoice_id=invoice[payer], amount_minor=300, reference="wire")

    early = env.run(invoices.mark_invoices_due, now=at("2025-07-14T23:59"), period="2025-06")
    assert early["became_due"] == []
    tick = env.run(invoices.mark_invoices_due, now=at("2025-07-15T00:00"), period="2025-06")
    assert sorted(i["invoice_id"] for i in tick["became_due"]) \
        == sorted(str(invoice[o]) for o in (late, writer, voider))
    position = env.position
    again = env.run(invoices.mark_invoices_due, now=at("2025-07-20T00:00"), period="2025-06")
    assert again["became_due"] == [] and env.position == position  # nothing left to watch

    env.run(invoices.apply_invoice_payment, now=at("2025-07-16T00:00"),
            invoice_id=invoice[late], amount_minor=100, reference="cheque")
    written = env.run(invoices.write_off_invoice, now=at("2025-07-17T00:00"),
                      invoice_id=invoice[writer], reason="uncollectable")
    assert written["status"] == "write_off"
    voided = env.run(invoices.void_invoice, now=at("2025-07-17T00:00"),
                     invoice_id=invoice[voider], reason="wrong customer")
    assert voided["status"] == "void"
    for factory, kwargs in ((invoices.apply_invoice_payment,
                             {"amount_minor": 1, "reference": "late"}),
                            (invoices.write_off_invoice, {"reason": "twice"}),
                            (invoices.void_invoice, {"reason": "too late"})):
        body = refused(env, factory, at("2025-07-18T00:00"), invoice_id=invoice[writer],
                       **kwargs)
        assert body["details"]["status"] == "write_off", body
    body = refused(env, invoices.write_off_invoice, at("2025-07-18T00:00"),
                   invoice_id=invoice[payer], reason="paid already")
    assert body["details"]["reason"] == "invoice_not_writable_off"

    want = {late: "partially_paid", payer: "paid", writer: "write_off", voider: "void",
            nothing: "paid"}
    with client(env.url) as http:
        for owner, status in want.items():
            token = tokens.user(owner)
            got = env.get(http, token, INVOICE, invoice_id=str(invoice[owner]))
            assert got.json()["status"] == status, owner
            filtered = env.get(http, token, INVOICES, status=status)
            check("GET", INVOICES, filtered)
            assert str(invoice[owner]) in ids(filtered)
        assert env.get(http, tokens.user(late), INVOICE,
                       invoice_id=str(invoice[late])).json()["due_at"] == "2025-07-15T00:00:00Z"
        assert ids(env.get(http, tokens.user(writer), INVOICES, status="due")) == []
