"""Usage and rated usage through HTTP on real Postgres, checked against the contract:
lists, filters, sorts and pages, the streamed CSV export (equal to the list), rated
line details, 404s, shadow rating (which writes nothing) and a rebuild of the usage
read model. Usage is seeded with the domain commands on the server's own stores; reads
wait for it with ``X-Ledger-Position``."""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest

from api.queries.usage import CSV_COLUMNS, _export
from consumers.direct import catch_up
from consumers.rebuild import rebuild
from domain import skus, usage
from domain.errors import DomainError
from domain.money import Money
from domain.provenance import CommandContext
from infra.db import Stores
from projections import BY_NAME
from projections.usage import UsageFilter, stream_usage
from tests.contract.test_contract import check
from tests.harness import bearer, client

USAGE, CSV = "/api/v1/billing/usage", "/api/v1/billing/usage/csv"
RATED, LINE = "/api/v1/billing/rated-usage", "/api/v1/billing/rated-usage/{rated_usage_line_id}"
SHADOW = "/api/v1/admin/billing/shadow-rating"
SORTS = ("start_time_desc", "start_time_asc", "cost_desc", "cost_asc")
NOW = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=1)
H = timedelta(hours=1)


def render(result: Any) -> dict[str, Any]:
    if isinstance(result, DomainError):
        return {"status": 400, "body": {"code": result.code, "details": result.details}}
    return {"status": 200, "body": result}


@dataclass
class Env:
    url: str
    stores: Stores
    position: int = 0

    def run(self, factory: Any, **kwargs: Any) -> dict[str, Any]:
        ctx = CommandContext(actor_id=str(uuid.uuid4()), actor_type="system", source="system")
        outcome = self.stores.app.execute(factory(ctx, render=render, **kwargs))
        assert outcome.response["status"] == 200, outcome.response
        self.position = max(self.position, outcome.position or 0)
        return outcome.response["body"]

    def get(self, http: httpx.Client, token: str, template: str, **params: Any) -> httpx.Response:
        path = {k: v for k, v in params.items() if "{" + k + "}" in template}
        query = {k: v for k, v in params.items() if k not in path}
        response = http.get(template.format(**path), params=query, headers={
            **bearer(token), "X-Ledger-Position": str(self.position)})
        if template != CSV or response.status_code != 200:
            check("GET", template, response)
        return response


@pytest.fixture(scope="module")
def env(services: Any) -> Iterator[Env]:
    """A database of its own, so the rebuild sees only what these tests wrote."""
    from tests.conftest import serve_own_database

    with serve_own_database(services) as served:
        yield Env(served.url, served.stores)


@dataclass
class Seeded:
    user: uuid.UUID
    org: uuid.UUID
    records: dict[str, str] = field(default_factory=dict)  # name -> usage record id
    allocations: dict[str, str] = field(default_factory=dict)
    app_instance: uuid.UUID = field(default_factory=uuid.uuid4)


def seed(env: Env) -> Seeded:
    """One user's usage: a closed allocation, an open rated one, an open one never rated,
    a closed app runtime; and another user's allocation that must never show."""
    sku = f"h100-{uuid.uuid4().hex[:6]}"
    env.run(skus.create_sku, sku=sku, spec={
        "vendor": "nvidia", "display_name": "H100", "resource_class": "gpu_baremetal",
        "billing_unit": "gpu_hour", "scheduling_unit": "node",
        "resources": {"accelerator_count": 8},
        "unit_price": {"amount_minor": 300, "currency": "USD"}})
    s = Seeded(user=uuid.uuid4(), org=uuid.uuid4())

    def allocation(name: str, owner: uuid.UUID, units: int, start: datetime) -> uuid.UUID:
        allocation_id = uuid.uuid4()
        meter = usage.Meter(usage_source="allocation", allocation_id=allocation_id,
                            requested_by_user_id=owner, org_id=s.org, project_id=uuid.uuid4(),
                            units=units, sku=sku)
        env.run(usage.open_usage, meter=meter, start_time=start)
        record = usage.usage_id_for_allocation(allocation_id)
        s.records[name], s.allocations[name] = str(record), str(allocation_id)
        return record

    closed = allocation("closed", s.user, 2, NOW - 10 * H)
    env.run(usage.rate_usage, record_id=closed, until=NOW - 8 * H)
    env.run(usage.close_usage, record_id=closed, end_time=NOW - 7 * H)       # 2×300×3 = 1800
    running = allocation("running", s.user, 1, NOW - 5 * H)
    env.run(usage.rate_usage, record_id=running, until=NOW - 3 * H)
    env.run(usage.rate_usage, record_id=running, until=NOW - 1 * H)          # 1×300×4 = 1200
    allocation("fresh", s.user, 4, NOW - 30 * timedelta(minutes=1))           # not rated: 0
    allocation("other", uuid.uuid4(), 1, NOW - 2 * H)
    env.run(usage.rate_usage, record_id=uuid.UUID(s.records["other"]), until=NOW)
    app_record = usage.usage_id_for_app(s.app_instance, "gateway", 1)
    env.run(usage.open_usage, record_id=app_record, start_time=NOW - 20 * H,
            meter=usage.Meter(usage_source="app_runtime", app_instance_id=s.app_instance,
                              requested_by_user_id=s.user, org_id=s.org, units=1,
                              control_plane_component=True,
                              operating_mode="platform_managed", control_plane_scope="platform",
                              runtime_backend="k8s"),
            price=usage.Price(unit_price=Money(100, "USD"), usage_unit="gpu_hour",
                              pricing_source="app_manifest"))
    env.run(usage.close_usage, record_id=app_record, end_time=NOW - 19 * H - H / 2)
    s.records["app"] = str(app_record)                                          # 100×0.5 = 50
    return s


@pytest.fixture(scope="module")
def seeded(env: Env) -> Seeded:
    return seed(env)


def z(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def ids(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["items"]]


def every_page(env: Env, http: httpx.Client, token: str, template: str, **params: Any
               ) -> list[dict[str, Any]]:
    items, cursor = [], None
    while True:
        page = env.get(http, token, template, page_size=1, **params,
                       **({"cursor": cursor} if cursor else {}))
        assert page.status_code == 200, page.text
        items += page.json()["items"]
        cursor = page.json()["pagination"]["next_cursor"]
        if cursor is None:
            return items


def test_usage_lists_the_callers_records_sorted_filtered_and_paged(
        env: Env, seeded: Seeded, tokens: Any) -> None:
    r = seeded.records
    token = tokens.user(seeded.user)
    with client(env.url) as http:
        listed = env.get(http, token, USAGE)
        assert ids(listed) == [r["fresh"], r["running"], r["closed"], r["app"]]  # newest first
        assert listed.json()["pagination"] == {"next_cursor": None, "page_size": 50}
        by_id = {item["id"]: item for item in listed.json()["items"]}
        assert by_id[r["closed"]]["cost"] == {"amount_minor": 1800, "currency": "USD"}
        assert by_id[r["closed"]]["end_time"] == by_id[r["closed"]]["last_billed_at"]
        assert by_id[r["running"]]["cost"]["amount_minor"] == 1200
        assert by_id[r["running"]]["end_time"] is None
        assert by_id[r["fresh"]]["last_billed_at"] is None
        assert by_id[r["fresh"]]["cost"]["amount_minor"] == 0
        assert by_id[r["app"]]["cost"]["amount_minor"] == 50
        assert by_id[r["app"]]["app_instance_id"] == str(seeded.app_instance)
        assert by_id[r["app"]]["control_plane_component"] is True
        assert by_id[r["closed"]]["allocation_id"] == seeded.allocations["closed"]

        expected = {"start_time_desc": [r["fresh"], r["running"], r["closed"], r["app"]],
                    "start_time_asc": [r["app"], r["closed"], r["running"], r["fresh"]],
                    "cost_desc": [r["closed"], r["running"], r["app"], r["fresh"]],
                    "cost_asc": [r["fresh"], r["app"], r["running"], r["closed"]]}
        for sort, order in expected.items():
            assert ids(env.get(http, token, USAGE, sort=sort)) == order
            assert [i["id"] for i in every_page(env, http, token, USAGE, sort=sort)] == order

        for params, want in (
                ({"allocation_id": seeded.allocations["running"]}, [r["running"]]),
                ({"allocation_id": seeded.allocations["other"]}, []),  # another user's
                ({"app_instance_id": str(seeded.app_instance)}, [r["app"]]),
                ({"usage_source": "app_runtime"}, [r["app"]]),
                ({"usage_source": "allocation", "sort": "start_time_asc"},
                 [r["closed"], r["running"], r["fresh"]]),
                # records whose usage overlaps [from, to)
                ({"from": (NOW - 6 * H).isoformat(), "to": (NOW - H).isoformat()}, [r["running"]]),
                ({"from": (NOW - 8 * H).isoformat()}, [r["fresh"], r["running"], r["closed"]]),
                ({"to": (NOW - 9 * H).isoformat()}, [r["closed"], r["app"]])):
            assert ids(env.get(http, token, USAGE, **params)) == want, params

        first = env.get(http, token, USAGE, page_size=2).json()
        cursor = first["pagination"]["next_cursor"]
        for other in ({"sort": "cost_asc"}, {"usage_source": "allocation"}):
            mismatch = env.get(http, token, USAGE, page_size=2, cursor=cursor, **other)
            assert mismatch.status_code == 400
            assert mismatch.json()["details"]["reason"] == "cursor_mismatch"
        stolen = env.get(http, tokens.user(uuid.uuid4()), USAGE, page_size=2, cursor=cursor)
        assert stolen.status_code == 400
        for bad in ({"page_size": 0}, {"page_size": 201}, {"sort": "id_asc"},
                    {"usage_source": "gpu"}, {"allocation_id": "nope"},
                    {"from": NOW.isoformat(), "to": (NOW - H).isoformat()}):
            assert env.get(http, token, USAGE, **bad).status_code == 400, bad
        assert ids(env.get(http, tokens.user(uuid.uuid4()), USAGE)) == []
        assert env.get(http, "not-a-token", USAGE).status_code == 401
        assert http.get(USAGE).status_code == 401


def parse_csv(response: httpx.Response) -> list[dict[str, str]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(response.text)))
    assert tuple(rows[0]) == CSV_COLUMNS
    return [dict(zip(CSV_COLUMNS, row)) for row in rows[1:]]


def flattened(item: dict[str, Any]) -> dict[str, str]:
    """A list item as the CSV writes it (``units`` aside: the list has no such field)."""
    values = {**item, "cost_amount_minor": item["cost"]["amount_minor"],
              "cost_currency": item["cost"]["currency"]}
    return {c: "" if values[c] is None else str(values[c]).lower()
            if isinstance(values[c], bool) else str(values[c]) for c in CSV_COLUMNS if c != "units"}


def test_the_csv_export_is_the_list_streamed(env: Env, seeded: Seeded, tokens: Any) -> None:
    token = tokens.user(seeded.user)
    with client(env.url) as http:
        for params in [{"sort": s} for s in SORTS] + [
                {"usage_source": "allocation"}, {"allocation_id": seeded.allocations["closed"]},
                {"from": (NOW - 6 * H).isoformat(), "sort": "cost_desc"}]:
            listed = env.get(http, token, USAGE, **params).json()["items"]
            exported = parse_csv(env.get(http, token, CSV, **params))
            assert [{k: v for k, v in row.items() if k != "units"} for row in exported] == \
                [flattened(item) for item in listed], params
        units = {row["id"]: row["units"] for row in parse_csv(env.get(http, token, CSV))}
        assert units[seeded.records["closed"]] == "2" and units[seeded.records["fresh"]] == "4"
        assert parse_csv(env.get(http, tokens.user(uuid.uuid4()), CSV)) == []
        assert env.get(http, token, CSV, sort="nope").status_code == 400
        assert env.get(http, token, CSV, **{"from": NOW.isoformat(),
                                            "to": (NOW - H).isoformat()}).status_code == 400
        assert http.get(CSV).status_code == 401
        check("GET", CSV, http.get(CSV))

    # Streaming: the rows come from a server-side cursor, a chunk at a time.
    filters = UsageFilter(owner=seeded.user)
    with env.stores.query_pool.connection() as conn:
        rows = stream_usage(conn, "readmodels", filters, sort="start_time_asc", chunk=2)
        first = next(rows)
        cursors = [c["name"] for c in conn.execute("SELECT name FROM pg_cursors").fetchall()]
        assert cursors == ["usage_export"] and first["id"] == uuid.UUID(seeded.records["app"])
        assert len([first, *rows]) == 4
    chunks = list(_export(env.stores.query_pool, filters, "start_time_desc", chunk=1))
    assert len(chunks) == 5  # one per row, and the (empty) tail after the last
    with client(env.url) as http:
        assert "".join(chunks) == env.get(http, token, CSV).text


def test_rated_lines_list_detail_and_match_the_ledger(env: Env, seeded: Seeded,
                                                      tokens: Any) -> None:
    token = tokens.user(seeded.user)
    r = seeded.records
    with client(env.url) as http:
        lines = env.get(http, token, RATED).json()["items"]
        assert [(l["usage_record_id"], l["amount"]["amount_minor"]) for l in lines] == [
            (r["running"], 600), (r["running"], 600), (r["closed"], 600), (r["closed"], 1200),
            (r["app"], 50)]  # newest slice first
        assert every_page(env, http, token, RATED) == lines
        closed = env.get(http, token, RATED, usage_record_id=r["closed"]).json()["items"]
        assert [(l["bill_from"], l["bill_to"]) for l in reversed(closed)] == [
            (z(NOW - 10 * H), z(NOW - 8 * H)), (z(NOW - 8 * H), z(NOW - 7 * H))]
        line = closed[0]
        assert line["unit_quantity_millis"] == 2 * 3_600_000 and line["units"] == 2
        assert line["unit_price"] == {"amount_minor": 300, "currency": "USD"}
        assert line["org_id"] == str(seeded.org) and line["fx_snapshot"] is None
        assert line["pricing_source"] == "sku_unit_price"
        # each rated line is on its month's draft invoice from the moment it is rated
        assert all(l["invoice_id"] and l["invoice_line_id"] for l in lines)
        assert line["pricing_snapshot"]["rounding"] == "ROUND_HALF_EVEN"
        assert env.get(http, token, RATED, usage_record_id=r["other"]).json()["items"] == []

        detail = env.get(http, token, LINE, rated_usage_line_id=line["id"])
        assert detail.status_code == 200 and detail.json() == line
        assert env.get(http, tokens.user(uuid.uuid4()), RATED).json()["items"] == []
        missing = env.get(http, token, LINE, rated_usage_line_id=str(uuid.uuid4()))
        assert missing.status_code == 404
        assert missing.json()["details"]["reason"] == "rated_usage_line_not_found"
        assert env.get(http, token, LINE, rated_usage_line_id="nope").status_code == 400
        assert env.get(http, token, RATED, cursor="garbage").status_code == 400
        assert http.get(RATED).status_code == 401

        balance = http.get("/api/v1/billing/balance", headers={
            **bearer(token), "X-Ledger-Position": str(env.position)}).json()
        assert balance["balance"] == {"amount_minor": -3050, "currency": "USD"}
    with env.stores.query_pool.connection() as conn:
        entries = conn.execute(
            "SELECT entry_id, amount_minor, reference_type, reference_id FROM"
            " readmodels.ledger_entries WHERE owner_user_id = %s", (seeded.user,)).fetchall()
    assert {(str(e["entry_id"]), e["reference_id"], e["amount_minor"]) for e in entries} == {
        (l["ledger_entry_id"], l["id"], -l["amount"]["amount_minor"]) for l in lines}
    assert {e["reference_type"] for e in entries} == {"rated_usage_line"}


def test_another_users_line_is_not_found(env: Env, seeded: Seeded, tokens: Any) -> None:
    with client(env.url) as http:
        theirs = env.get(http, tokens.admin(), RATED).json()["items"]
        assert theirs == []  # even an admin sees only their own ledger's usage here
        with env.stores.query_pool.connection() as conn:
            other = conn.execute("SELECT id FROM readmodels.rated_usage_lines WHERE"
                                 " usage_record_id = %s", (seeded.records["other"],)).fetchone()
        answer = env.get(http, tokens.user(seeded.user), LINE, rated_usage_line_id=str(other["id"]))
        assert answer.status_code == 404


def test_shadow_rating_compares_and_writes_nothing(env: Env, seeded: Seeded, tokens: Any) -> None:
    r = seeded.records
    body = {"org_id": str(seeded.org), "usage_record_ids": [r["closed"], r["running"]],
            "candidate_unit_price": {"amount_minor": 250, "currency": "USD"},
            "pricing_plan_version": "2026-q3"}
    admin = bearer(tokens.admin())
    with client(env.url) as http:
        before = env.stores.app.recorder.max_notification_id()
        answer = http.post(SHADOW, json=body, headers={**admin, "Idempotency-Key": "ignored"})
        check("POST", SHADOW, answer)
        assert answer.status_code == 200, answer.text
        result = answer.json()
        assert result["ledger_writes"] is False and result["rated_usage_writes"] is False
        assert [(l["usage_record_id"], l["existing_rated_amount"]["amount_minor"],
                 l["candidate_rated_amount"]["amount_minor"], l["delta_amount"]["amount_minor"])
                for l in result["lines"]] == [(r["closed"], 1800, 1500, -300),
                                              (r["running"], 1200, 1000, -200)]
        assert result["totals"] == {
            "existing_rated_amount": {"amount_minor": 3000, "currency": "USD"},
            "candidate_rated_amount": {"amount_minor": 2500, "currency": "USD"},
            "delta_amount": {"amount_minor": -500, "currency": "USD"}}
        line = result["lines"][0]
        assert line["unit_quantity_millis"] == 2 * 3 * 3_600_000
        assert line["pricing_source"] == "shadow_rating"
        assert line["pricing_plan_version"] == "2026-q3"
        assert line["candidate_rating_key"] != http.get(
            RATED, params={"usage_record_id": r["closed"]},
            headers=bearer(tokens.user(seeded.user))).json()["items"][0]["rating_key"]
        again = http.post(SHADOW, json=body, headers=admin)
        assert again.json() == result and "X-Ledger-Position" not in again.headers
        # nothing was appended: no ledger, usage or idempotency event
        assert env.stores.app.recorder.max_notification_id() == before

        for changed, reason in (({"usage_record_ids": [r["app"]]}, "not_shadow_ratable"),
                                ({"usage_record_ids": [r["other"]], "org_id": str(uuid.uuid4())},
                                 "usage_record_not_found"),
                                ({"usage_record_ids": [str(uuid.uuid4())]},
                                 "usage_record_not_found"),
                                ({"candidate_unit_price": {"amount_minor": 1, "currency": "EUR"}},
                                 "currency_mismatch"),
                                ({"candidate_unit_price": {"amount_minor": 1, "currency": "ZZZ"}},
                                 "unsupported_currency")):
            refused = http.post(SHADOW, json={**body, **changed}, headers=admin)
            check("POST", SHADOW, refused)
            assert refused.status_code == 400 and refused.json()["details"]["reason"] == reason
        for bad in ({"usage_record_ids": []}, {"usage_record_ids": [str(uuid.uuid4())] * 101},
                    {"candidate_unit_price": {"amount_minor": 1.5, "currency": "USD"}},
                    {"surprise": 1}):
            refused = http.post(SHADOW, json={**body, **bad}, headers=admin)
            check("POST", SHADOW, refused)
            assert refused.status_code == 400 and refused.json()["code"] == "validation_error"
        denied = http.post(SHADOW, json=body, headers=bearer(tokens.user(seeded.user)))
        check("POST", SHADOW, denied)
        assert denied.status_code == 403 and denied.json()["code"] == "admin_required"
        unauthenticated = http.post(SHADOW, json=body)
        check("POST", SHADOW, unauthenticated)
        assert unauthenticated.status_code == 401
        assert env.stores.app.recorder.max_notification_id() == before


def snapshot(stores: Stores) -> dict[str, list[Any]]:
    with stores.query_pool.connection() as conn:
        return {table: conn.execute(
            f"SELECT * FROM readmodels.{table} ORDER BY id").fetchall()
            for table in BY_NAME["usage"].tables}


def test_a_rebuild_reproduces_the_usage_read_model(env: Env, seeded: Seeded) -> None:
    stores = env.stores
    catch_up(stores.app, stores.read_models)
    before = snapshot(stores)
    assert len(before["usage_records"]) == 5 and len(before["rated_usage_lines"]) == 6
    with stores.query_pool.connection() as conn:  # damage the read model
        conn.execute("DELETE FROM readmodels.rated_usage_lines")
        conn.execute("UPDATE readmodels.usage_records SET cost_minor = 0")
    rebuild(stores.app, stores.read_models, BY_NAME["usage"], batch_size=3)
    assert snapshot(stores) == before
