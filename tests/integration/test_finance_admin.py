"""Billing reconciliation, diagnostics and the V3 platform finance views over HTTP, on a
database of their own (reconciliation counts everything in it). Problems are planted
by saving events the commands would never produce (an open meter for an allocation
that does not exist, an active allocation without a meter, a record closed without
its last slice, a tampered ledger entry) and each run must find exactly them. Every
operation is called on each of its paths; every JSON response is checked against the
contract."""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest

from api import webhooks
from api.auth import mint_token
from domain import usage
from domain.allocations import Allocation
from domain.billing import BillingAccount, account_id_for
from domain.errors import DomainError
from domain.money import Money
from domain.provenance import CommandContext
from domain.usage import UsageRecord
from tests.contract.test_contract import check
from tests.harness import bearer, client

RUN = "/api/v1/admin/billing/reconciliation"
RUN_V3 = "/api/v1/platform/finance/reconciliation"
RUN_COMPAT = "/api/v1/v3/platform/finance/reconciliation"
ONE_RUN = (RUN + "/{job_id}", RUN_V3 + "/{job_id}", RUN_COMPAT + "/{job_id}")
DIAGNOSTICS = ("/api/v1/admin/billing/diagnostics", "/api/v1/platform/finance/diagnostics",
               "/api/v1/v3/platform/finance/diagnostics")
FINANCE = ("/api/v1/platform/finance", "/api/v1/v3/platform/finance")
SESSIONS_V3 = tuple(p + "/sessions" for p in FINANCE)
DETAIL_V3 = tuple(p + "/sessions/{payment_session_id}" for p in FINANCE)
RAW_LIST = tuple(p + "/payment-sessions" for p in FINANCE)
RAW_GET = ("/api/v1/admin/payments/sessions/{payment_session_id}",
           *(p + "/payment-sessions/{payment_session_id}" for p in FINANCE))
RECONCILE = ("/api/v1/admin/payments/sessions/{payment_session_id}/reconcile",
             *(p + "/payment-sessions/{payment_session_id}/reconcile" for p in FINANCE))
CHECKOUT, WEBHOOK = "/api/v1/payments/checkout-session", "/api/v1/payments/webhook"
REFUNDS = "/api/v1/admin/users/{user_id}/refunds"
RESTRICT = "/api/v1/admin/billing/financial-restrictions/{scope_type}/{scope_id}"
PRICE = usage.Price(unit_price=Money(3_600, "USD"), usage_unit="gpu_hour",
                    pricing_source="test_price")
ZERO = {"missing_open_usage_count": 0, "orphan_open_usage_count": 0,
        "unbilled_closed_usage_count": 0}


def render(result: Any) -> dict[str, Any]:
    if isinstance(result, DomainError):
        return {"status": 400, "body": {"code": result.code, "details": result.details}}
    return {"status": 200, "body": result}


class Env:
    def __init__(self, http: httpx.Client, stores: Any, settings: Any):
        self.http, self.stores, self.settings = http, stores, settings
        self.position = 0
        secret = settings.jwt_secret
        self.admin_id = uuid.uuid4()
        self.admin = mint_token(secret, user_id=self.admin_id, role="admin",
                                platform_roles=["platform_superadmin"])
        self.ops = mint_token(secret, user_id=uuid.uuid4(), platform_roles=["platform_ops"])
        self.reader = mint_token(secret, user_id=uuid.uuid4(), capabilities=["platform.ops.read"])
        self.user = mint_token(secret, user_id=uuid.uuid4())

    # ---- HTTP ----------------------------------------------------------------------------
    def track(self, response: httpx.Response) -> httpx.Response:
        if "X-Ledger-Position" in response.headers:
            self.position = max(self.position, int(response.headers["X-Ledger-Position"]))
        return response

    def get(self, template: str, token: str | None = None, **params: Any) -> httpx.Response:
        path = {k: v for k, v in params.items() if "{" + k + "}" in template}
        query = {k: v for k, v in params.items() if k not in path}
        headers = {"X-Ledger-Position": str(self.position)}
        if token != "":
            headers.update(bearer(token or self.admin))
        response = self.http.get(template.format(**path), params=query, headers=headers)
        if response.headers.get("content-type", "").startswith("application/json"):
            check("GET", template, response)
        return response

    def post(self, template: str, token: str | None = None, body: Any = None,
             headers: dict[str, str] | None = None, **path: Any) -> httpx.Response:
        all_headers = dict(headers or {})
        if token != "":
            all_headers.update(bearer(token or self.admin))
        response = self.http.post(template.format(**path), json=body, headers=all_headers)
        check("POST", template, response)
        return self.track(response)

    def run(self, token: str | None = None, path: str = RUN, **headers: str) -> dict[str, Any]:
        response = self.post(path, token, headers=headers)
        assert response.status_code == 202, response.text
        return response.json()

    def webhook(self, session_id: str, amount: int, **headers: str) -> None:
        raw = json.dumps({"id": f"evt_{uuid.uuid4().hex}", "type": "checkout.session.completed",
                          "data": {"object": {"amount_total": amount, "currency": "usd",
                                              "payment_intent": f"pi_{uuid.uuid4().hex[:12]}",
                                              "metadata": {"payment_session_id": session_id}}}}
                         ).encode()
        response = self.http.post(WEBHOOK, content=raw, headers={
            "Content-Type": "application/json", **headers,
            webhooks.HEADER: webhooks.sign(self.settings.webhook_secret, raw)})
        assert response.status_code == 200, response.text
        self.track(response)

    def checkout(self, token: str, amount: int, **headers: str) -> str:
        response = self.post(CHECKOUT, token, {"amount_minor": amount, "currency": "USD"},
                             headers=headers)
        assert response.status_code == 200, response.text
        return response.json()["payment_session_id"]

    # ---- the write side directly -----------------------------------------------------------
    def head(self) -> int:
        return self.stores.app.recorder.max_notification_id() or 0

    def command(self, factory: Any, correlation: str | None = None, **kwargs: Any) -> Any:
        ctx = CommandContext(actor_id="tests", actor_type="system", source="system",
                             **({"correlation_id": correlation} if correlation else {}))
        outcome = self.stores.app.execute(factory(ctx, render=render, **kwargs))
        assert outcome.response["status"] == 200, outcome.response
        self.position = max(self.position, outcome.position or 0)
        return outcome.response["body"]

    def save(self, *aggregates: Any) -> None:
        """Plant events no command would append (and forget cached copies)."""
        recordings = self.stores.app.save(*aggregates)
        self.stores.app.cache.clear()
        self.position = max(self.position, recordings[-1].notification.id)

    def meter(self, allocation_id: uuid.UUID, owner: uuid.UUID, start: datetime,
              correlation: str | None = None) -> str:
        meter = usage.Meter(usage_source="allocation", allocation_id=allocation_id,
                            requested_by_user_id=owner, units=1)
        body = self.command(usage.open_usage, correlation, meter=meter, start_time=start,
                            price=PRICE)
        return str(body["usage_record"]["id"])

    def allocation(self, *statuses: str) -> uuid.UUID:
        """An allocation that went through ``statuses`` (no claims, no meter)."""
        now = datetime.now(timezone.utc)
        provenance = {"actor_id": "tests", "actor_type": "system", "actor_role": "system",
                      "source": "system", "correlation_id": "planted", "causation_id": None}
        allocation = Allocation._create(Allocation.Created, id=uuid.uuid4(),
                                        lease={"requested_by_user_id": str(uuid.uuid4())},
                                        provenance=provenance, timestamp=now)
        for status in statuses:
            allocation.trigger_event(Allocation.Moved, to=status, reason=None, details={},
                                     provenance=provenance, timestamp=now)
        self.save(allocation)
        return allocation.id

    def move(self, allocation_id: uuid.UUID, status: str) -> None:
        allocation = self.stores.app.repository.get(allocation_id)
        allocation.trigger_event(Allocation.Moved, to=status, reason=None, details={},
                                 provenance={"correlation_id": "planted"},
                                 timestamp=datetime.now(timezone.utc))
        self.save(allocation)


@pytest.fixture(scope="module")
def env(services: Any) -> Iterator[Env]:
    from tests.conftest import serve_own_database

    with serve_own_database(services, webhook_secret="whsec_finance") as served:
        with client(served.url) as http:
            yield Env(http, served.stores, served.settings)


def customer(env: Env) -> tuple[uuid.UUID, str]:
    user = uuid.uuid4()
    return user, mint_token(env.settings.jwt_secret, user_id=user, tenant_id=uuid.uuid4())


def counts(run: dict[str, Any]) -> dict[str, int]:
    return {k: run["summary"][k] for k in ZERO}


# ---- reconciliation ------------------------------------------------------------------------
def test_a_consistent_state_reconciles_ok_on_every_path(env: Env) -> None:
    before = env.get(RUN).json()
    assert before["runs"] == [] and before["pagination"] == {"next_cursor": None, "page_size": 50}
    assert before["current"]["checked_at"] == "1970-01-01T00:00:00Z"
    assert before["current"]["severity"] == "warn"  # nothing checked is not "ok"

    user, token = customer(env)
    env.webhook(env.checkout(token, 5_000), 5_000)
    metered = env.allocation("provisioning", "active")
    record = env.meter(metered, user, datetime.now(timezone.utc) - timedelta(hours=2))
    env.command(usage.rate_usage, record_id=uuid.UUID(record),
                until=datetime.now(timezone.utc) - timedelta(hours=1))
    env.allocation()  # requested: no meter expected

    run = env.run(**{"X-Request-Id": "recon-first"})
    assert run["status"] == "completed" and counts(run) == ZERO
    assert run["summary"]["severity"] == "ok"
    assert run["summary"]["sample_allocation_id"] is None
    assert run["requested_by_user_id"] == str(env.admin_id)
    assert run["correlation_id"] == "recon-first" and run["completed_at"] >= run["created_at"]
    listed = env.get(RUN).json()
    assert listed["current"] == run["summary"] and listed["runs"] == [run]
    for path in ONE_RUN:
        assert env.get(path, job_id=run["id"]).json() == run
    for path in (RUN_V3, RUN_COMPAT):
        twin = env.run(path=path)
        assert twin["status"] == "completed" and counts(twin) == ZERO


def test_planted_problems_are_found_and_clear_once_fixed(env: Env) -> None:
    owner = uuid.uuid4()
    start = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(hours=3)
    gone = uuid.uuid4()  # never admitted here
    orphan = env.meter(gone, owner, start)
    run = env.run()
    assert counts(run) == {**ZERO, "orphan_open_usage_count": 1}
    assert run["summary"]["severity"] == "warn"
    assert run["summary"]["sample_usage_id"] == orphan
    assert run["summary"]["sample_allocation_id"] == str(gone)

    unmetered = env.allocation("provisioning", "active")
    ended = env.allocation("provisioning", "active")
    closed = env.meter(ended, owner, start)
    env.move(ended, "releasing")
    env.move(ended, "released")
    record = env.stores.app.repository.get(uuid.UUID(closed))  # closed, last slice never rated
    record.trigger_event(UsageRecord.Stopped, end_time=start + timedelta(hours=1),
                         reported_end_time=start + timedelta(hours=1),
                         provenance={"correlation_id": "planted"},
                         timestamp=datetime.now(timezone.utc))
    env.save(record)
    run = env.run()
    assert counts(run) == {"missing_open_usage_count": 1, "orphan_open_usage_count": 1,
                           "unbilled_closed_usage_count": 1}
    assert run["summary"]["severity"] == "error"
    assert run["summary"]["sample_allocation_id"] == str(unmetered)
    assert run["summary"]["sample_usage_id"] == orphan
    stats = env.stores.app.repository.get(uuid.UUID(run["id"])).stats
    assert stats["finding_count"] == 3 and stats["ledger_problem_count"] == 0

    # each fix is its own command; the next run is clean again
    env.command(usage.close_usage, record_id=uuid.UUID(orphan), end_time=start + timedelta(hours=2))
    env.command(usage.rate_usage, record_id=uuid.UUID(closed), until=start + timedelta(hours=1))
    env.move(unmetered, "failed")
    run = env.run()
    assert counts(run) == ZERO and run["summary"]["severity"] == "ok"
    assert env.get(RUN).json()["current"] == run["summary"]


def test_checks_that_break_are_recorded_as_failed_runs(env: Env, monkeypatch: Any) -> None:
    current = env.get(RUN).json()["current"]

    def broken(app: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr("api.commands.reconciliation.inspect", broken)
    run = env.run(**{"X-Request-Id": "recon-failed"})
    assert run["status"] == "failed" and "boom" in run["failure_reason"]
    assert run["summary"]["severity"] == "error" and counts(run) == ZERO
    assert env.get(ONE_RUN[0], job_id=run["id"]).json() == run
    assert env.get(RUN).json()["current"] == current  # a failed run says nothing


def test_runs_replay_by_key_and_refuse_the_wrong_callers(env: Env) -> None:
    first = env.post(RUN, headers={"Idempotency-Key": "recon-key"})
    assert first.status_code == 202
    head = env.head()
    for path in (RUN, RUN_V3, RUN_COMPAT):
        again = env.post(path, headers={"Idempotency-Key": "recon-key"})
        assert again.status_code == 202 and again.json() == first.json()
        assert again.headers["Idempotent-Replayed"] == "true"
    assert env.head() == head
    assert env.run(env.ops)["status"] == "completed"  # platform_ops may run checks
    head = env.head()
    for path in (RUN, RUN_V3, RUN_COMPAT):
        assert env.post(path, token="").status_code == 401
        assert env.post(path, env.user).json()["code"] == "insufficient_permissions"
        assert env.post(path, env.reader).status_code == 403
        assert env.get(path, "").status_code == 401
        assert env.get(path, env.user).status_code == 403
        assert env.get(path, env.reader).status_code == 200
    assert env.head() == head  # refusals append nothing
    for path in ONE_RUN:
        assert env.get(path, job_id=uuid.uuid4()).status_code == 404
        assert env.get(path, job_id="nope").status_code == 400
        assert env.get(path, env.user, job_id=uuid.uuid4()).status_code == 403


def test_reconciliation_lists_filter_sort_page_and_export(env: Env) -> None:
    tag = uuid.uuid4().hex[:8]
    made = [env.run(**{"X-Request-Id": f"lists-{tag}-{n}"}) for n in range(3)]
    ids = [r["id"] for r in made]

    def walk(path: str, **params: Any) -> list[dict[str, Any]]:
        seen, cursor = [], None
        while True:
            page = env.get(path, page_size=2, **params, **({"cursor": cursor} if cursor else {}))
            assert page.status_code == 200, page.text
            seen += page.json()["runs"]
            cursor = page.json()["pagination"]["next_cursor"]
            if cursor is None:
                return seen

    everything = walk(RUN)
    assert len(everything) == len({r["id"] for r in everything}) >= 3
    assert [r["created_at"] for r in everything] == sorted(
        (r["created_at"] for r in everything), reverse=True)
    mine = walk(RUN_V3, search=f"lists-{tag}")
    assert [r["id"] for r in mine] == ids[::-1]
    assert [r["id"] for r in walk(RUN_COMPAT, search=tag.upper(), sort="created_at_asc")] == ids
    assert [r["id"] for r in walk(RUN_V3, correlation_id=f"lists-{tag}-1")] == [ids[1]]
    assert [r["id"] for r in walk(RUN_V3, search=f"lists-{tag}", sort="checked_at_asc",
                                  time_range="24h", status=["completed"])] == ids
    failed = walk(RUN_V3, status="failed")
    assert failed and all(r["status"] == "failed" for r in failed)
    both = walk(RUN_V3, status=["failed", "completed"])
    assert {r["id"] for r in both} == {r["id"] for r in everything}
    by_status = walk(RUN_V3, sort="status_desc")
    assert [r["status"] for r in by_status] == sorted((r["status"] for r in by_status),
                                                      reverse=True)
    assert walk(RUN_V3, time_range="custom", **{"from": "2999-01-01T00:00:00Z"}) == []
    assert walk(RUN_V3, status="running") == []

    exported = env.get(RUN_V3, format="csv", search=f"lists-{tag}", sort="created_at_asc",
                       page_size=2)
    assert exported.status_code == 200 and exported.headers["content-type"].startswith("text/csv")
    assert exported.headers["X-Read-Model-Cache"] in ("hit", "miss", "bypass", "stale")
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert [r["id"] for r in rows] == ids[:2] and exported.headers["X-Next-Cursor"]
    assert rows[0]["severity"] == made[0]["summary"]["severity"]
    assert rows[0]["ledger_problem_count"] == "0" and rows[0]["correlation_id"] == f"lists-{tag}-0"
    rest = env.get(RUN_V3, format="csv", search=f"lists-{tag}", sort="created_at_asc",
                   page_size=2, cursor=exported.headers["X-Next-Cursor"])
    assert [r["id"] for r in csv.DictReader(io.StringIO(rest.text))] == ids[2:]

    first = env.get(RUN_V3, page_size=1).json()["pagination"]["next_cursor"]
    for params in ({"sort": "created_at_asc", "cursor": first}, {"cursor": "garbage"},
                   {"time_range": "6h", "from": "2024-01-01T00:00:00Z"},
                   {"from": "2025-01-02T00:00:00Z", "to": "2025-01-01T00:00:00Z"},
                   {"sort": "id_asc"}, {"format": "xml"}, {"status": "done"},
                   {"time_range": "1h"}, {"page_size": 0}, {"page_size": 201}):
        assert env.get(RUN_V3, **params).status_code == 400, params
    assert env.get(RUN, page_size=0).status_code == 400


# ---- diagnostics -----------------------------------------------------------------------------
def test_diagnostics_return_exactly_what_carries_the_correlation_id(env: Env) -> None:
    user, token = customer(env)
    cid, hook = f"diag-{uuid.uuid4().hex[:10]}", f"hook-{uuid.uuid4().hex[:10]}"
    session_id = env.checkout(token, 4_000, **{"X-Request-Id": cid})
    env.webhook(session_id, 4_000, **{"X-Request-Id": hook})
    refund = env.post(REFUNDS, body={"amount_minor": 700, "reason": "goodwill",
                                     "mode": "force_internal_credit"},
                      headers={"X-Request-Id": cid}, user_id=user)
    assert refund.status_code == 201, refund.text
    record = env.meter(uuid.uuid4(), user, datetime.now(timezone.utc) - timedelta(hours=1),
                       correlation=cid)
    env.checkout(token, 999)  # another correlation: never shows

    answers = [env.get(path, correlation_id=cid) for path in DIAGNOSTICS]
    assert all(a.status_code == 200 for a in answers)
    body = answers[0].json()
    assert all(a.json() == body for a in answers)
    assert body["correlation_id"] == cid
    assert [s["id"] for s in body["payment_sessions"]] == [session_id]
    assert body["payment_sessions"][0]["status"] == "credited"
    assert [r["id"] for r in body["refunds"]] == [refund.json()["refund_id"]]
    assert [r["id"] for r in body["usage_records"]] == [record]
    assert [(e["entry_type"], e["amount"]["amount_minor"], e["user_id"])
            for e in body["ledger_entries"]] == [("refund_internal_credit", 700, str(user))]
    actions = [(a["action"], a["target_type"]) for a in body["audit_logs"]]
    assert ("payment_session_initiated", "payment_session") in actions
    assert ("refund_requested", "refund") in actions
    assert ("refund_internal_credit", "ledger_entry") in actions
    assert ("usage_started", "usage_record") in actions
    assert all(a["correlation_id"] == cid and a["result"] == "succeeded"
               for a in body["audit_logs"])
    initiated = next(a for a in body["audit_logs"] if a["action"] == "payment_session_initiated")
    assert initiated["actor_user_id"] == str(user) and initiated["target_id"] == session_id

    credit = env.get(DIAGNOSTICS[1], correlation_id=hook).json()
    assert [s["id"] for s in credit["payment_sessions"]] == [session_id]  # changed under it
    assert [e["entry_type"] for e in credit["ledger_entries"]] == ["payment_credit"]
    assert credit["refunds"] == [] and credit["usage_records"] == []
    assert {a["action"] for a in credit["audit_logs"]} >= {"payment_credit",
                                                           "payment_session_credited"}
    nothing = env.get(DIAGNOSTICS[2], correlation_id="no-such-correlation").json()
    assert all(nothing[k] == [] for k in ("payment_sessions", "refunds", "usage_records",
                                          "ledger_entries", "audit_logs"))

    env.command(usage.close_usage, record_id=uuid.UUID(record),
                end_time=datetime.now(timezone.utc))  # no orphan left for later runs
    for path in DIAGNOSTICS:
        assert env.get(path).status_code == 400  # correlation_id is required
        assert env.get(path, correlation_id="").status_code == 400
        assert env.get(path, correlation_id="x" * 129).status_code == 400
        assert env.get(path, env.user).status_code == 403  # before the missing parameter
        assert env.get(path, "", correlation_id=cid).status_code == 401
        assert env.get(path, env.reader, correlation_id=cid).status_code == 200


# ---- V3 platform finance ----------------------------------------------------------------------
def test_v3_finance_overview_sessions_and_detail(env: Env) -> None:
    user, token = customer(env)
    cid = f"v3-{uuid.uuid4().hex[:10]}"
    good = env.checkout(token, 2_500, **{"X-Request-Id": cid})
    env.webhook(good, 2_500)
    short = env.checkout(token, 1_000)
    env.webhook(short, 900)  # provider paid another amount: failed_reconcile
    hold = env.post(RESTRICT, body={"state": "at_risk", "reason": "low runway"},
                    scope_type="user", scope_id=user)
    assert hold.status_code == 200

    for path in FINANCE:
        first = env.get(path, page_size=200)
        second = env.get(path, page_size=200)
        assert first.status_code == second.status_code == 200
        body = second.json()
        assert body["meta"]["cache"] == second.headers["X-Read-Model-Cache"] == "hit"
        assert first.json()["meta"]["cache"] == first.headers["X-Read-Model-Cache"]
        kpis = {k["key"]: k for k in body["kpis"]}
        assert int(kpis["payment_sessions_attention"]["value"]) >= 1
        assert kpis["payment_sessions_attention"]["severity"] == "warn"
        assert kpis["reconciliation"]["value"] in ("ok", "warn", "error")
        queue = {(q["target_type"], q["target_id"]): q for q in body["action_queue"]}
        assert queue[("payment_session", short)]["code"] == \
            "payment_session_credit_failed_reconcile"
        assert ("payment_session", good) not in queue
        cards = [c for c in body["interventions"]
                 if c["key"] == f"financial_restriction:user:{user}"]
        assert len(cards) == 1 and cards[0]["severity"] == "warn"
        rows = {s["id"]: s for s in body["sessions"]}
        assert rows[good]["status"] == "credited" and rows[good]["correlation_id"] == cid
        assert rows[good]["credited_amount_minor"] == 2_500 and rows[good]["ledger_entry_id"]
        assert rows[short]["attention_reason"] == "credit_failed_reconcile"
        assert rows[short]["reason_hint"].startswith("provider reported 900 USD")
        assert body["activity"] and all(a["source"] in ("payment_session", "ledger", "refund",
                                                        "audit", "outbox")
                                        for a in body["activity"])
    paged = env.get(FINANCE[0], page_size=1).json()
    assert len(paged["sessions"]) == 1 and paged["pagination"]["next_cursor"]

    for path in SESSIONS_V3:
        mine = env.get(path, user_id=user).json()
        assert [s["id"] for s in mine["sessions"]] == [short, good]  # newest first
        assert mine["filters"] == {"status": None, "user_id": str(user), "correlation_id": None}
        credited = env.get(path, user_id=user, status="credited").json()["sessions"]
        assert [s["id"] for s in credited] == [good]
        assert [s["id"] for s in env.get(path, correlation_id=cid).json()["sessions"]] == [good]
        assert env.get(path, status="no-such-status").json()["sessions"] == []
        page = env.get(path, user_id=user, page_size=1).json()
        rest = env.get(path, user_id=user, page_size=1,
                       cursor=page["pagination"]["next_cursor"]).json()
        assert [s["id"] for s in page["sessions"] + rest["sessions"]] == [short, good]
        assert env.get(path, user_id="nope").status_code == 400

    for path in DETAIL_V3:
        detail = env.get(path, payment_session_id=good).json()
        assert detail["summary"]["id"] == good and detail["meta"]["cache"] in ("miss", "hit")
        ops = {o["key"]: o for o in detail["operations"]}
        assert not ops["post_credit"]["enabled"]
        assert ops["post_credit"]["disabled_reason"] == "payment_session_already_credited"
        assert ops["create_refund"]["enabled"]
        assert detail["diagnostics"]["payment_session_count"] == 1
        assert detail["diagnostics"]["correlation_id"] == cid
        assert detail["recovery_policy"]["provider_replay_supported"] is False
        assert {a["action"] for a in detail["activity"]} >= {"payment_session_initiated",
                                                             "payment_session_credited",
                                                             "payment_credit"}
        failing = {o["key"]: o for o in
                   env.get(path, payment_session_id=short).json()["operations"]}
        assert failing["post_credit"]["enabled"] and not failing["mark_failed"]["enabled"]
        assert not failing["create_refund"]["enabled"]
        assert env.get(path, payment_session_id=uuid.uuid4()).status_code == 404
        assert env.get(path, payment_session_id="nope").status_code == 400
        assert env.get(path, env.user, payment_session_id=good).status_code == 403
    for path in (*FINANCE, *SESSIONS_V3):
        assert env.get(path, "").status_code == 401
        assert env.get(path, env.user).status_code == 403
        assert env.get(path, env.reader).status_code == 200
    env.post(RESTRICT, body={"state": "healthy", "reason": "topped up"},
             scope_type="user", scope_id=user)


def test_raw_payment_session_twins(env: Env) -> None:
    user, token = customer(env)
    cid = f"raw-{uuid.uuid4().hex[:10]}"
    amounts = (3_000, 1_000, 2_000)
    made = []
    for amount in amounts:
        session_id = env.checkout(token, amount, **{"X-Request-Id": cid})
        env.webhook(session_id, amount)
        made.append(session_id)
    pending = env.checkout(token, 500, **{"X-Request-Id": cid})

    def walk(path: str, **params: Any) -> list[dict[str, Any]]:
        seen, cursor = [], None
        while True:
            page = env.get(path, page_size=2, user_id=user, **params,
                           **({"cursor": cursor} if cursor else {}))
            assert page.status_code == 200, page.text
            seen += page.json()["items"]
            cursor = page.json()["pagination"]["next_cursor"]
            if cursor is None:
                return seen

    for path in RAW_LIST:
        by_id = walk(path)
        assert [s["id"] for s in by_id] == sorted(made + [pending])  # id_asc by default
        requested = walk(path, sort="requested_amount_desc")
        assert [s["requested_amount"]["amount_minor"] for s in requested] == [3_000, 2_000,
                                                                              1_000, 500]
        credited = walk(path, sort="credited_amount_asc")
        assert [s["id"] for s in credited] == [pending, made[1], made[2], made[0]]
        assert [s["id"] for s in walk(path, status="initiated")] == [pending]
        assert len(walk(path, correlation_id=cid, time_range="24h")) == 4
        assert walk(path, correlation_id="other") == []
        assert walk(path, time_range="custom", **{"from": "2999-01-01T00:00:00Z"}) == []
        newest = walk(path, sort="created_at_desc")
        assert [s["id"] for s in newest] == [pending] + made[::-1]
        exported = env.get(path, user_id=user, format="csv", sort="requested_amount_asc",
                           page_size=3)
        assert exported.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(exported.text)))
        assert [int(r["requested_amount_minor"]) for r in rows] == [500, 1_000, 2_000]
        assert rows[0]["credited_amount_minor"] == "" and rows[1]["credited_currency"] == "USD"
        assert exported.headers["X-Next-Cursor"]
        for params in ({"sort": "amount_desc"}, {"format": "xml"}, {"status": "done"},
                       {"time_range": "24h", "to": "2030-01-01T00:00:00Z"}, {"page_size": 0}):
            assert env.get(path, **params).status_code == 400, params
        assert env.get(path, env.user).status_code == 403
    admin_list = env.get("/api/v1/admin/payments/sessions", user_id=user).json()["items"]
    assert [s["id"] for s in admin_list] == [pending] + made[::-1]  # unchanged: newest first

    for path in RAW_GET:
        assert env.get(path, payment_session_id=made[0]).json()["status"] == "credited"
        assert env.get(path, payment_session_id=uuid.uuid4()).status_code == 404

    short = env.checkout(token, 1_000)
    env.webhook(short, 800)
    body = {"action": "post_credit", "reason": "provider confirmed 800", "amount_minor": 800}
    credited = env.post(RECONCILE[1], body=body, headers={"Idempotency-Key": "raw-1"},
                        payment_session_id=short)
    assert credited.status_code == 200 and credited.json()["status"] == "credited"
    head = env.head()
    replay = env.post(RECONCILE[2], body=body, headers={"Idempotency-Key": "raw-1"},
                      payment_session_id=short)
    assert replay.json() == credited.json() and replay.headers["Idempotent-Replayed"] == "true"
    assert env.head() == head
    for path in RECONCILE:
        again = env.post(path, body=body, payment_session_id=short)
        assert again.status_code == 409
        assert again.json()["details"]["reason"] == "payment_session_already_credited"
        assert env.post(path, body=body, payment_session_id=uuid.uuid4()).status_code == 404
        assert env.post(path, body={"action": "post_credit"},
                        payment_session_id=short).status_code == 400
        assert env.post(path, env.ops, body=body, payment_session_id=short).status_code == 403
    assert env.get(RAW_GET[1], payment_session_id=short).json()["credited_amount"] == \
        {"amount_minor": 800, "currency": "USD"}


# ---- last: it leaves the ledger broken ----------------------------------------------------------
def test_a_tampered_ledger_entry_makes_the_run_an_error(env: Env) -> None:
    user, token = customer(env)
    env.webhook(env.checkout(token, 1_000), 1_000)
    account = env.stores.app.repository.get(account_id_for(user))
    account.trigger_event(
        BillingAccount.MoneyMoved, entry_id=uuid.uuid4(), seq=account.entry_count + 1,
        entry_type="admin_credit", amount_minor=50, currency="USD", reference_type=None,
        reference_id=None, legs=[{"account": f"wallet:{user}:USD", "amount_minor": 50},
                                 {"account": "adjustments", "amount_minor": -50}],
        balance_after_minor=1_050, prev_hash=account.last_hash, entry_hash="0" * 64,
        occurred_at=datetime.now(timezone.utc), provenance={"correlation_id": "tamper"},
        details={}, timestamp=datetime.now(timezone.utc))
    env.save(account)
    run = env.run(**{"X-Request-Id": "recon-tampered"})
    assert run["status"] == "completed" and counts(run) == ZERO
    assert run["summary"]["severity"] == "error"
    stats = env.stores.app.repository.get(uuid.UUID(run["id"])).stats
    assert stats["ledger_problem_count"] == 1
    exported = env.get(RUN_V3, format="csv", correlation_id="recon-tampered")
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert [(r["id"], r["severity"], r["ledger_problem_count"]) for r in rows] == \
        [(run["id"], "error", "1")]
    overview = env.get(FINANCE[0]).json()
    assert {"severity": "error", "target_id": run["id"]}.items() <= next(
        q for q in overview["action_queue"] if q["target_type"] == "reconciliation_run").items()
