"""Refunds and disputes end to end over HTTP: top-ups through signed checkout webhooks,
admin refunds under policy (and their V3 twins), provider refund outcomes and dispute
events delivered repeatedly and out of order, the admin/caller/V3 lists, refusals
that append nothing, 403/404. Every JSON response is checked against the contract."""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from api import webhooks
from api.app import create_app
from api.auth import mint_token
from tests.contract.test_contract import check
from tests.harness import ServerThread, bearer, client

CHECKOUT = "/api/v1/payments/checkout-session"
WEBHOOK = "/api/v1/payments/webhook"
REFUNDS = "/api/v1/admin/users/{user_id}/refunds"
V3_REFUNDS = "/api/v1/platform/finance/users/{user_id}/refunds"
V3_REFUNDS_COMPAT = "/api/v1/v3/platform/finance/users/{user_id}/refunds"
MY_REFUNDS = "/api/v1/billing/refunds"
DISPUTES = "/api/v1/admin/payments/disputes"
DISPUTE = "/api/v1/admin/payments/disputes/{dispute_id}"
RESTRICT = "/api/v1/admin/billing/financial-restrictions/{scope_type}/{scope_id}"
BALANCE = "/api/v1/billing/balance"


@pytest.fixture(scope="module")
def env(shared_database: Any, services: Any) -> Iterator[Any]:
    from infra.db import Stores
    from tests.conftest import make_settings

    settings = make_settings(services, shared_database.dsn, webhook_secret="whsec_refunds")
    stores = Stores.open(settings)
    with ServerThread(create_app(settings, stores)) as server:
        with client(server.url) as http:
            yield Env(http, stores, settings)
    stores.close()


class Env:
    def __init__(self, http: Any, stores: Any, settings: Any):
        self.http, self.stores, self.settings = http, stores, settings
        self.position = "0"
        self.admin = mint_token(settings.jwt_secret, user_id=uuid.uuid4(), role="admin",
                                platform_roles=["platform_superadmin"])

    def head(self) -> int:
        return self.stores.app.recorder.max_notification_id() or 0

    def track(self, response: Any) -> Any:
        if "X-Ledger-Position" in response.headers:
            self.position = max(self.position, response.headers["X-Ledger-Position"], key=int)
        return response

    def webhook(self, event: dict[str, Any]) -> Any:
        raw = json.dumps(event).encode()
        response = self.http.post(WEBHOOK, content=raw, headers={
            "Content-Type": "application/json",
            webhooks.HEADER: webhooks.sign(self.settings.webhook_secret, raw)})
        check("POST", WEBHOOK, response)
        return self.track(response)

    def pay(self, user_token: str, amount: int, currency: str = "USD") -> tuple[str, str]:
        """A credited top-up: (payment session id, provider payment intent id)."""
        response = self.http.post(CHECKOUT, json={"amount_minor": amount, "currency": currency},
                                  headers=bearer(user_token))
        assert response.status_code == 200, response.text
        session_id, intent = response.json()["payment_session_id"], f"pi_{uuid.uuid4().hex[:14]}"
        reply = self.webhook({"id": f"evt_{uuid.uuid4().hex}", "type": "checkout.session.completed",
                              "data": {"object": {"amount_total": amount,
                                                  "currency": currency.lower(),
                                                  "payment_intent": intent,
                                                  "metadata": {"payment_session_id": session_id}}}})
        assert reply.status_code == 200
        return session_id, intent

    def refund(self, user_id: Any, body: dict[str, Any], path: str = REFUNDS,
               token: str | None = None, **headers: str) -> Any:
        response = self.http.post(path.format(user_id=user_id), json=body,
                                  headers={**bearer(token or self.admin), **headers})
        check("POST", path, response)
        return self.track(response)

    def get(self, path: str, template: str, token: str | None = None, **params: Any) -> Any:
        response = self.http.get(path, params=params, headers={
            **bearer(token or self.admin), "X-Ledger-Position": self.position})
        if response.headers.get("content-type", "").startswith("application/json"):
            check("GET", template, response)
        return response

    def balance(self, token: str, currency: str = "USD") -> int:
        body = self.get(BALANCE, BALANCE, token).json()
        return next((b["amount_minor"] for b in body["balances"] if b["currency"] == currency), 0)

    def entries(self, reference_id: str) -> list[tuple[str, int]]:
        from domain.billing import BillingAccount

        found = []
        for notification in self.stores.app.recorder.select_notifications(start=1, limit=10**7):
            event = self.stores.app.mapper.to_domain_event(notification)
            if isinstance(event, BillingAccount.LedgerEntryPosted) and \
                    event.reference_id == reference_id:
                found.append((event.entry_type, event.amount_minor))
        return found


def customer(env: Env) -> tuple[uuid.UUID, str]:
    user = uuid.uuid4()
    return user, mint_token(env.settings.jwt_secret, user_id=user, tenant_id=uuid.uuid4())


def refund_event(refund_id: str, status: str, amount: int, event_id: str | None = None,
                 event_type: str = "refund.updated") -> dict[str, Any]:
    return {"id": event_id or f"evt_{uuid.uuid4().hex}", "type": event_type,
            "data": {"object": {"id": f"re_{refund_id[:8]}", "object": "refund", "status": status,
                                "amount": amount, "currency": "usd",
                                "metadata": {"refund_id": refund_id}}}}


def dispute_event(dispute_id: str, intent: str, status: str, amount: int,
                  event_type: str = "charge.dispute.updated",
                  event_id: str | None = None) -> dict[str, Any]:
    return {"id": event_id or f"evt_{uuid.uuid4().hex}", "type": event_type,
            "data": {"object": {"id": dispute_id, "object": "dispute", "amount": amount,
                                "currency": "usd", "charge": "ch_123", "payment_intent": intent,
                                "reason": "fraudulent", "status": status,
                                "evidence_details": {"due_by": 1_900_000_000},
                                "metadata": {"case": "A-1"}}}}


# ---- refunds ---------------------------------------------------------------------------
def test_refund_outcomes_follow_the_policy_and_the_provider(env: Env) -> None:
    user, token = customer(env)
    session_id, intent = env.pay(token, 10_000)
    provider = env.refund(user, {"amount_minor": 3_000, "reason": "duplicate charge",
                                 "payment_reference": session_id})
    assert provider.status_code == 201, provider.text
    body = provider.json()
    assert body["outcome"] == "provider_refund" and body["status"] == "accepted"
    assert body["amount"] == {"amount_minor": 3_000, "currency": "USD"}
    assert body["policy_applied"] == {"refund_window_days": 30, "in_window": True,
                                      "unused_balance_rule_applied": False}
    assert env.balance(token) == 7_000
    refund_id = body["refund_id"]

    # the provider reports success, then the same event again: one completion
    event = refund_event(refund_id, "succeeded", 3_000)
    assert env.webhook(event).status_code == 200
    head = env.head()
    assert env.webhook(event).status_code == 200 and env.head() == head
    mine = env.get(MY_REFUNDS, MY_REFUNDS, token).json()["items"]
    assert [(r["id"], r["status"], r["provider_refund_id"]) for r in mine] == \
        [(refund_id, "completed", f"re_{refund_id[:8]}")]
    assert mine[0]["requested_by_user_id"] and mine[0]["payment_reference"] == session_id
    # a late "failed" for a completed refund changes nothing
    env.webhook(refund_event(refund_id, "failed", 3_000))
    assert env.balance(token) == 7_000

    internal = env.refund(user, {"amount_minor": 2_000, "reason": "goodwill credit",
                                 "payment_reference": intent, "mode": "force_internal_credit"},
                          path=V3_REFUNDS)
    assert internal.status_code == 201
    assert (internal.json()["outcome"], internal.json()["status"]) == \
        ("internal_credit", "completed")
    assert env.balance(token) == 9_000
    listed = {r["id"]: r for r in env.get(REFUNDS.format(user_id=user), REFUNDS).json()["items"]}
    assert listed[internal.json()["refund_id"]]["internal_ledger_entry_id"]
    for refund_id_, row in listed.items():  # the read model says what the aggregate says
        assert row == env.stores.app.get_or_none(uuid.UUID(refund_id_)).as_contract()
    assert env.entries(internal.json()["refund_id"]) == [("refund_internal_credit", 2_000)]

    # without a payment reference there is no window evidence: internal credit
    plain = env.refund(user, {"amount_minor": 500, "reason": "sla credit"},
                       path=V3_REFUNDS_COMPAT)
    assert plain.json()["outcome"] == "internal_credit"
    assert plain.json()["policy_applied"]["in_window"] is False

    # refundable is now 10 000 - 3 000 - 2 000 - 500 = 4 500
    head = env.head()
    over = env.refund(user, {"amount_minor": 4_501, "reason": "too much"})
    assert over.status_code == 409
    assert over.json()["details"]["reason"] == "refund_exceeds_refundable"
    assert over.json()["details"]["refundable_minor"] == 4_500
    assert env.head() == head

    # a provider refund that fails gives the money back: the refund nets to 0
    failing = env.refund(user, {"amount_minor": 1_000, "reason": "card refund",
                                "payment_reference": session_id}).json()
    assert env.balance(token) == 9_500 - 1_000
    env.webhook(refund_event(failing["refund_id"], "failed", 1_000,
                             event_type="refund.failed"))
    assert env.balance(token) == 9_500
    assert sorted(env.entries(failing["refund_id"])) == [("refund", -1_000),
                                                         ("refund_internal_credit", 1_000)]
    status = {r["id"]: r["status"] for r in env.get(MY_REFUNDS, MY_REFUNDS, token).json()["items"]}
    assert status[failing["refund_id"]] == "failed"


def test_a_provider_refund_is_capped_at_the_unused_balance(env: Env) -> None:
    user, token = customer(env)
    session_id, _ = env.pay(token, 5_000)
    spend = env.http.post(f"/api/v1/admin/users/{user}/balance", headers=bearer(env.admin), json={
        "direction": "debit", "amount_minor": 4_000, "currency": "USD", "reason": "usage"})
    assert spend.status_code == 200
    env.track(spend)
    capped = env.refund(user, {"amount_minor": 2_500, "reason": "unused credit",
                               "payment_reference": session_id}).json()
    assert capped["amount"]["amount_minor"] == 1_000
    assert capped["policy_applied"]["unused_balance_rule_applied"] is True
    assert env.balance(token) == 0
    head = env.head()
    nothing_left = env.refund(user, {"amount_minor": 1, "reason": "again please",
                                     "payment_reference": session_id})
    assert nothing_left.status_code == 400 and nothing_left.json()["code"] == "insufficient_balance"
    assert env.head() == head


def test_refund_refusals_append_nothing(env: Env) -> None:
    user, token = customer(env)
    session_id, _ = env.pay(token, 1_000)
    ops = mint_token(env.settings.jwt_secret, user_id=uuid.uuid4(), platform_roles=["platform_ops"])
    good = {"amount_minor": 100, "reason": "because", "payment_reference": session_id}
    head = env.head()
    for body in ({**good, "amount_minor": 0}, {**good, "amount_minor": 1.5},
                 {**good, "amount_minor": "100"}, {**good, "reason": "ab"},
                 {**good, "mode": "cash"}, {**good, "extra": 1}, {"reason": "no amount"},
                 {**good, "currency": "usd"}):
        response = env.refund(user, body)
        assert response.status_code == 400 and response.json()["code"] == "validation_error", body
    unsupported = env.refund(user, {**good, "currency": "XXX"})
    assert unsupported.status_code == 400
    assert unsupported.json()["details"]["reason"] == "unsupported_currency"
    mismatch = env.refund(user, {**good, "currency": "EUR"})
    assert mismatch.status_code == 400
    assert mismatch.json()["details"]["reason"] == "payment_currency_mismatch"
    for reference in ("pi_unknown", str(uuid.uuid4())):
        missing = env.refund(user, {**good, "payment_reference": reference})
        assert missing.status_code == 404
        assert missing.json()["details"]["reason"] == "payment_not_found"
    stranger, _ = customer(env)
    assert env.refund(stranger, good).status_code == 404  # someone else's payment
    assert env.refund(uuid.uuid4(), {"amount_minor": 1, "reason": "none paid"}).status_code == 409
    for path in (REFUNDS, V3_REFUNDS, V3_REFUNDS_COMPAT):
        assert env.refund(user, good, path=path, token=ops).json()["code"] == "admin_required"
        assert env.refund(user, good, path=path, token=token).status_code == 403
    unauthenticated = env.http.post(REFUNDS.format(user_id=user), json=good)
    check("POST", REFUNDS, unauthenticated)
    assert unauthenticated.status_code == 401
    assert env.head() == head

    hold = env.http.post(RESTRICT.format(scope_type="user", scope_id=user),
                         json={"state": "collections_hold", "reason": "unpaid invoice"},
                         headers=bearer(env.admin))
    assert hold.status_code == 200
    head = env.head()
    blocked = env.refund(user, good, path=V3_REFUNDS)
    assert blocked.status_code == 409 and blocked.json()["details"]["reason"] == "refunds_blocked"
    assert env.head() == head
    env.http.post(RESTRICT.format(scope_type="user", scope_id=user),
                  json={"state": "healthy", "reason": "paid"}, headers=bearer(env.admin))

    # Idempotency-Key: a replay (on any alias) answers the same refund, a new body 409
    first = env.refund(user, good, **{"Idempotency-Key": "refund-1"})
    assert first.status_code == 201
    head = env.head()
    again = env.refund(user, good, path=V3_REFUNDS_COMPAT, **{"Idempotency-Key": "refund-1"})
    assert again.status_code == 201 and again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    reused = env.refund(user, {**good, "amount_minor": 101}, **{"Idempotency-Key": "refund-1"})
    assert reused.status_code == 409
    assert reused.json()["details"]["reason"] == "idempotency_key_reused"
    assert env.head() == head
    assert env.balance(token) == 900


def test_refund_lists_sort_filter_page_and_export(env: Env) -> None:
    user, token = customer(env)
    env.pay(token, 100_000)
    made = []
    for n, amount in enumerate((500, 300, 900, 100, 700)):
        response = env.refund(user, {"amount_minor": amount, "reason": f"credit {n}"},
                              **{"X-Request-Id": f"corr-{user}-{n % 2}"})
        assert response.status_code == 201
        made.append((response.json()["refund_id"], amount))
    url = V3_REFUNDS.format(user_id=user)

    def walk(template: str, path: str, **params: Any) -> list[dict[str, Any]]:
        seen, cursor = [], None
        while True:
            page = env.get(path, template, **params, page_size=2,
                           **({"cursor": cursor} if cursor else {}))
            assert page.status_code == 200, page.text
            seen += page.json()["items"]
            cursor = page.json()["pagination"]["next_cursor"]
            if cursor is None:
                return seen

    by_amount = walk(V3_REFUNDS, url, sort="amount_desc")
    assert [r["amount"]["amount_minor"] for r in by_amount] == [900, 700, 500, 300, 100]
    by_id = walk(V3_REFUNDS_COMPAT, V3_REFUNDS_COMPAT.format(user_id=user))
    assert [r["id"] for r in by_id] == sorted(r for r, _ in made)  # id_asc by default
    newest = walk(REFUNDS, REFUNDS.format(user_id=user))
    assert [r["id"] for r in newest] == [r for r, _ in reversed(made)]
    assert len(walk(V3_REFUNDS, url, time_range="24h", sort="created_at_asc")) == 5
    assert walk(V3_REFUNDS, url, time_range="custom", **{"from": "2999-01-01T00:00:00Z"}) == []
    correlated = walk(V3_REFUNDS, url, correlation_id=f"corr-{user}-1")
    assert sorted(r["amount"]["amount_minor"] for r in correlated) == [100, 300]
    assert walk(V3_REFUNDS, url, status="failed") == []
    mine = walk(MY_REFUNDS, MY_REFUNDS, status="completed")
    assert mine == []  # the admin's own refunds, not the customer's
    assert len(env.get(MY_REFUNDS, MY_REFUNDS, token).json()["items"]) == 5

    exported = env.get(url, V3_REFUNDS, format="csv", sort="amount_asc", page_size=3)
    assert exported.status_code == 200 and exported.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert [int(r["amount_minor"]) for r in rows] == [100, 300, 500]
    assert rows[0]["user_id"] == str(user) and rows[0]["outcome"] == "internal_credit"
    assert exported.headers["X-Next-Cursor"]

    first = env.get(url, V3_REFUNDS, sort="amount_desc", page_size=2).json()
    for params in ({"sort": "amount_asc", "cursor": first["pagination"]["next_cursor"]},
                   {"time_range": "6h", "from": "2024-01-01T00:00:00Z"},
                   {"from": "2025-01-02T00:00:00Z", "to": "2025-01-01T00:00:00Z"},
                   {"sort": "amount"}, {"format": "xml"}, {"time_range": "1h"},
                   {"page_size": 0}, {"status": "done"}):
        response = env.get(url, V3_REFUNDS, **params)
        assert response.status_code == 400, params
    ops = mint_token(env.settings.jwt_secret, user_id=uuid.uuid4(), platform_roles=["platform_ops"])
    assert env.get(url, V3_REFUNDS, ops).status_code == 200
    assert env.get(url, V3_REFUNDS, token).status_code == 403
    assert env.get(REFUNDS.format(user_id=user), REFUNDS, token).status_code == 403
    unauthenticated = env.http.get(MY_REFUNDS)
    check("GET", MY_REFUNDS, unauthenticated)
    assert unauthenticated.status_code == 401


# ---- disputes --------------------------------------------------------------------------
def dispute_of(env: Env, provider_dispute_id: str) -> dict[str, Any]:
    items = env.get(DISPUTES, DISPUTES, provider_dispute_id=provider_dispute_id).json()["items"]
    assert len(items) == 1
    return items[0]


def test_a_won_dispute_nets_out_whatever_the_delivery_order(env: Env) -> None:
    user, token = customer(env)
    session_id, intent = env.pay(token, 5_000)
    dp = f"dp_{uuid.uuid4().hex[:12]}"
    created = dispute_event(dp, intent, "needs_response", 5_000, "charge.dispute.created")
    review = dispute_event(dp, intent, "under_review", 5_000)
    won = dispute_event(dp, intent, "won", 5_000, "charge.dispute.closed")
    assert env.webhook(review).status_code == 200  # arrives first
    assert env.balance(token) == 0  # funds withdrawn at once
    head = env.head()
    for event in (created, review, created):  # stale and repeated deliveries
        assert env.webhook(event).status_code == 200
    assert env.head() == head + 1  # only the late "created" event's inbox record
    dispute = dispute_of(env, dp)
    assert dispute["status"] == "evidence_submitted" and dispute["evidence_submitted_at"]
    assert dispute["chargeback_ledger_entry_id"] and dispute["reversal_ledger_entry_id"] is None
    for _ in range(2):
        env.webhook(won)
    assert env.balance(token) == 5_000
    detail = env.get(DISPUTE.format(dispute_id=dispute["id"]), DISPUTE).json()
    assert detail["status"] == "won" and detail["provider_status"] == "won" and detail["closed_at"]
    assert detail["user_id"] == str(user) and detail["payment_session_id"] == session_id
    assert detail["amount"] == {"amount_minor": 5_000, "currency": "USD"}
    assert detail["provider_payment_intent_id"] == intent and detail["metadata"] == {"case": "A-1"}
    assert detail["evidence_due_at"] == "2030-03-17T17:46:40Z"
    assert sorted(env.entries(dispute["id"])) == [("chargeback", -5_000),
                                                  ("chargeback_reversal", 5_000)]
    # a late "lost" after the win moves nothing
    env.webhook(dispute_event(dp, intent, "lost", 5_000, "charge.dispute.closed"))
    assert env.get(DISPUTE.format(dispute_id=dispute["id"]), DISPUTE).json()["status"] == "won"
    assert len(env.entries(dispute["id"])) == 2
    assert detail == env.stores.app.get_or_none(uuid.UUID(dispute["id"])).as_contract()


def test_lost_disputes_inquiries_and_unknown_payments(env: Env) -> None:
    user, token = customer(env)
    _, intent = env.pay(token, 3_000)
    lost = f"dp_{uuid.uuid4().hex[:12]}"
    env.webhook(dispute_event(lost, intent, "lost", 1_200, "charge.dispute.closed"))  # first!
    env.webhook(dispute_event(lost, intent, "needs_response", 1_200, "charge.dispute.created"))
    assert env.balance(token) == 1_800
    found = dispute_of(env, lost)
    assert found["status"] == "lost" and found["reversal_ledger_entry_id"] is None
    # the disputed money is no longer refundable
    over = env.refund(user, {"amount_minor": 1_801, "reason": "refund rest"})
    assert over.status_code == 409 and over.json()["details"]["refundable_minor"] == 1_800

    inquiry = f"dp_{uuid.uuid4().hex[:12]}"
    env.webhook(dispute_event(inquiry, intent, "warning_needs_response", 3_000,
                              "charge.dispute.created"))
    env.webhook(dispute_event(inquiry, intent, "warning_closed", 3_000, "charge.dispute.closed"))
    closed = dispute_of(env, inquiry)
    assert closed["status"] == "closed" and closed["chargeback_ledger_entry_id"] is None
    assert env.balance(token) == 1_800

    listed = env.get(DISPUTES, DISPUTES, status="lost", page_size=200).json()["items"]
    assert lost in [d["provider_dispute_id"] for d in listed]
    assert all(d["status"] == "lost" for d in listed)

    head = env.head()
    unknown = env.webhook(dispute_event("dp_elsewhere", "pi_not_ours", "lost", 10))
    assert unknown.status_code == 200 and env.head() == head + 1  # the inbox record only
    for broken in ({"id": "dp_x", "status": "lost", "amount": 1.5, "currency": "usd"},
                   {"status": "lost", "amount": 10, "currency": "usd"},
                   {"id": "dp_x", "status": "lost", "amount": 10, "currency": "zzz"}):
        response = env.webhook({"id": f"evt_{uuid.uuid4().hex}", "type": "charge.dispute.created",
                                "data": {"object": broken}})
        assert response.status_code == 400 and response.json()["code"] == "invalid_request"
    bad_refund = env.webhook({"id": "evt_bad_refund", "type": "refund.updated",
                              "data": {"object": {"status": "succeeded"}}})
    assert bad_refund.status_code == 400
    assert env.head() == head + 1

    ops = mint_token(env.settings.jwt_secret, user_id=uuid.uuid4(), platform_roles=["platform_ops"])
    assert env.get(DISPUTES, DISPUTES, ops).status_code == 200
    assert env.get(DISPUTES, DISPUTES, token).status_code == 403
    assert env.get(DISPUTE.format(dispute_id=found["id"]), DISPUTE, token).status_code == 403
    assert env.get(DISPUTE.format(dispute_id=uuid.uuid4()), DISPUTE).status_code == 404
    assert env.get(DISPUTE.format(dispute_id="nope"), DISPUTE).status_code == 400
    for params in ({"status": "pending"}, {"page_size": 201}):
        assert env.get(DISPUTES, DISPUTES, **params).status_code == 400
    pages, cursor = [], None
    while True:
        page = env.get(DISPUTES, DISPUTES, page_size=1, **({"cursor": cursor} if cursor else {}))
        pages += [d["id"] for d in page.json()["items"]]
        cursor = page.json()["pagination"]["next_cursor"]
        if cursor is None:
            break
    assert len(pages) == len(set(pages)) >= 2
