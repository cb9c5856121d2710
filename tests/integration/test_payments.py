"""Top-ups end to end: checkout session, signed provider webhooks (repeated,
mismatched, racing an operator), operator reconciliation and the admin lists. Every
response is checked against the contract."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from api import webhooks
from api.app import create_app
from api.auth import mint_token
from tests.contract.test_contract import check
from tests.harness import ServerThread, bearer, client

CHECKOUT = "/api/v1/payments/checkout-session"
WEBHOOK = "/api/v1/payments/webhook"
SESSIONS = "/api/v1/admin/payments/sessions"
SESSION = "/api/v1/admin/payments/sessions/{payment_session_id}"
RECONCILE = "/api/v1/admin/payments/sessions/{payment_session_id}/reconcile"


@pytest.fixture(scope="module")
def env(shared_database: Any, services: Any) -> Iterator[Any]:
    from infra.db import Stores
    from tests.conftest import make_settings

    settings = make_settings(services, shared_database.dsn, webhook_secret="whsec_test_secret")
    stores = Stores.open(settings)
    with ServerThread(create_app(settings, stores)) as server:
        yield server.url, stores, settings
    stores.close()


class Payer:
    def __init__(self, secret: str):
        self.user, self.tenant = uuid.uuid4(), uuid.uuid4()
        self.token = mint_token(secret, user_id=self.user, tenant_id=self.tenant)
        self.position = "0"


def completed(session_id: str, amount: int, currency: str = "usd", event_id: str | None = None,
              event_type: str = "checkout.session.completed") -> dict[str, Any]:
    return {"id": event_id or f"evt_{uuid.uuid4().hex}", "type": event_type,
            "data": {"object": {"id": f"cs_{session_id}", "amount_total": amount,
                                "currency": currency, "payment_intent": "pi_123",
                                "metadata": {"payment_session_id": session_id}}}}


def send_webhook(http: Any, secret: str, event: Any, signature: str | None = None) -> Any:
    raw = json.dumps(event).encode()
    headers = {"Content-Type": "application/json",
               webhooks.HEADER: signature if signature is not None else webhooks.sign(secret, raw)}
    response = http.post(WEBHOOK, content=raw, headers=headers)
    check("POST", WEBHOOK, response)
    return response


def start_checkout(http: Any, payer: Payer, amount: int, currency: str = "USD") -> str:
    """The new session's id; ``payer.position`` keeps the command's position."""
    response = http.post(CHECKOUT, json={"amount_minor": amount, "currency": currency},
                         headers=bearer(payer.token))
    check("POST", CHECKOUT, response)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["url"].startswith("https://") and body["provider_session_id"]
    payer.position = response.headers["X-Ledger-Position"]
    return body["payment_session_id"]


def admin_get(http: Any, tokens: Any, session_id: str, position: str | None = None) -> Any:
    headers = bearer(tokens.admin())
    if position:
        headers["X-Ledger-Position"] = position
    response = http.get(SESSION.format(payment_session_id=session_id), headers=headers)
    check("GET", SESSION, response)
    return response


def balance(http: Any, payer: Payer, position: str) -> int:
    response = http.get("/api/v1/billing/balance",
                        headers={**bearer(payer.token), "X-Ledger-Position": position})
    return response.json()["balance"]["amount_minor"]


def credits_for(stores: Any, session_id: str) -> int:
    from domain.billing import BillingAccount

    count = 0
    for notification in stores.app.recorder.select_notifications(start=1, limit=10**6):
        event = stores.app.mapper.to_domain_event(notification)
        if isinstance(event, BillingAccount.PaymentCredited) and \
                str(event.payment_session_id) == session_id:
            count += 1
    return count


def test_a_checkout_is_credited_once_however_often_the_provider_calls(env: Any, tokens: Any) -> None:
    base, stores, settings = env
    payer = Payer(settings.jwt_secret)
    with client(base) as http:
        session_id = start_checkout(http, payer, 2_500)
        assert admin_get(http, tokens, session_id, payer.position).json()["status"] == "initiated"
        event = completed(session_id, 2_500)
        first = send_webhook(http, settings.webhook_secret, event)
        assert first.status_code == 200 and first.json() == {"ok": True}
        position = first.headers["X-Ledger-Position"]
        before = stores.app.recorder.max_notification_id()
        for _ in range(3):  # the same provider event again
            assert send_webhook(http, settings.webhook_secret, event).status_code == 200
        assert stores.app.recorder.max_notification_id() == before
        # a different event id for the same checkout credits nothing more
        assert send_webhook(http, settings.webhook_secret, completed(session_id, 2_500)).status_code == 200
        assert balance(http, payer, position) == 2_500
        detail = admin_get(http, tokens, session_id, position).json()
        assert detail["status"] == "credited"
        assert detail["credited_amount"] == {"amount_minor": 2_500, "currency": "USD"}
        assert detail["ledger_entry_id"] and detail["credited_at"] and detail["checkout_completed_at"]
    assert credits_for(stores, session_id) == 1


def test_a_mismatched_amount_fails_reconcile_until_an_operator_credits(env: Any, tokens: Any) -> None:
    base, stores, settings = env
    payer = Payer(settings.jwt_secret)
    with client(base) as http:
        session_id = start_checkout(http, payer, 1_000)
        reply = send_webhook(http, settings.webhook_secret, completed(session_id, 999))
        detail = admin_get(http, tokens, session_id, reply.headers["X-Ledger-Position"]).json()
        assert detail["status"] == "failed_reconcile" and "999" in detail["failure_reason"]
        assert balance(http, payer, reply.headers["X-Ledger-Position"]) == 0
        url = RECONCILE.format(payment_session_id=session_id)
        short = http.post(url, json={"action": "post_credit", "reason": "ok"}, headers=bearer(tokens.admin()))
        check("POST", RECONCILE, short)
        assert short.status_code == 400  # reason needs three characters
        credit = http.post(url, json={"action": "post_credit", "reason": "customer paid 999"},
                           headers=bearer(tokens.admin()))
        check("POST", RECONCILE, credit)
        assert credit.status_code == 200
        assert credit.json()["status"] == "credited"
        assert credit.json()["credited_amount"] == {"amount_minor": 999, "currency": "USD"}
        again = http.post(url, json={"action": "mark_failed", "reason": "oops again"},
                          headers=bearer(tokens.admin()))
        check("POST", RECONCILE, again)
        assert again.status_code == 409
        assert again.json()["details"]["reason"] == "payment_session_already_credited"
        assert balance(http, payer, credit.headers["X-Ledger-Position"]) == 999
        missing = http.post(RECONCILE.format(payment_session_id=uuid.uuid4()),
                            json={"action": "mark_expired", "reason": "nothing"},
                            headers=bearer(tokens.admin()))
        check("POST", RECONCILE, missing)
        assert missing.status_code == 404
        never_paid = start_checkout(http, payer, 5)
        refused = http.post(RECONCILE.format(payment_session_id=never_paid),
                            json={"action": "post_credit", "reason": "no evidence"},
                            headers=bearer(tokens.admin()))
        assert refused.status_code == 409
        assert refused.json()["details"]["reason"] == "payment_session_not_completed"


def test_bad_signatures_and_bodies_are_refused_and_change_nothing(env: Any) -> None:
    base, stores, settings = env
    event = completed(str(uuid.uuid4()), 100)
    raw = json.dumps(event).encode()
    before = stores.app.recorder.max_notification_id()
    with client(base) as http:
        for signature in ("", "t=1,v1=deadbeef", webhooks.sign("wrong-secret", raw),
                          webhooks.sign(settings.webhook_secret, raw, at=int(time.time()) - 3600)):
            response = send_webhook(http, settings.webhook_secret, event, signature=signature)
            assert response.status_code == 401
            assert response.json()["code"] == "stripe_signature_invalid"
        for body in ([1, 2], {"type": "x"}, {"id": "evt_1", "type": "checkout.session.completed",
                                             "data": {"object": {"amount_total": 1.5, "currency": "usd"}}}):
            response = send_webhook(http, settings.webhook_secret, body)
            assert response.status_code == 400 and response.json()["code"] == "invalid_request"
        unknown = send_webhook(http, settings.webhook_secret,
                               {"id": "evt_other", "type": "customer.created", "data": {}})
        assert unknown.status_code == 200
    assert stores.app.recorder.max_notification_id() == before + 1  # only the inbox record


def test_webhook_racing_an_operator_credits_once(env: Any, tokens: Any) -> None:
    base, stores, settings = env
    for _ in range(5):
        payer = Payer(settings.jwt_secret)
        with client(base) as http:
            session_id = start_checkout(http, payer, 700)
            send_webhook(http, settings.webhook_secret,
                         completed(session_id, 700, event_type="checkout.session.expired"))
        results: dict[str, int] = {}

        def webhook() -> None:
            with httpx.Client(base_url=base) as http:
                results["webhook"] = send_webhook(http, settings.webhook_secret,
                                                  completed(session_id, 700)).status_code

        def operator() -> None:
            with httpx.Client(base_url=base) as http:
                results["operator"] = http.post(
                    RECONCILE.format(payment_session_id=session_id),
                    json={"action": "post_credit", "reason": "customer called"},
                    headers=bearer(tokens.admin())).status_code

        threads = [threading.Thread(target=webhook), threading.Thread(target=operator)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results["webhook"] == 200 and results["operator"] in (200, 409)
        assert credits_for(stores, session_id) == 1
        assert stores.app.billing_account(payer.user).balances == {"USD": 700}


def test_admin_list_filters_pages_and_permissions(env: Any, tokens: Any) -> None:
    base, stores, settings = env
    payer = Payer(settings.jwt_secret)
    with client(base) as http:
        made = [start_checkout(http, payer, 10 + n) for n in range(5)]
        reply = send_webhook(http, settings.webhook_secret, completed(made[0], 10))
        position = reply.headers["X-Ledger-Position"]
        seen: list[str] = []
        cursor = None
        while True:
            params = {"user_id": str(payer.user), "page_size": 2}
            if cursor:
                params["cursor"] = cursor
            page = http.get(SESSIONS, params=params,
                            headers={**bearer(tokens.admin()), "X-Ledger-Position": position})
            check("GET", SESSIONS, page)
            assert page.status_code == 200
            seen += [item["id"] for item in page.json()["items"]]
            cursor = page.json()["pagination"]["next_cursor"]
            if cursor is None:
                break
            moved = http.get(SESSIONS, params={**params, "cursor": cursor, "status": "credited"},
                             headers=bearer(tokens.admin()))
            assert moved.status_code == 400 and moved.json()["details"]["reason"] == "cursor_mismatch"
        assert sorted(seen) == sorted(made) and len(seen) == len(set(seen))
        credited = http.get(SESSIONS, params={"user_id": str(payer.user), "status": "credited"},
                            headers=bearer(tokens.admin())).json()["items"]
        assert [item["id"] for item in credited] == [made[0]]
        for bad in ({"page_size": 0}, {"page_size": 201}, {"status": "nope"}, {"user_id": "x"}):
            response = http.get(SESSIONS, params=bad, headers=bearer(tokens.admin()))
            check("GET", SESSIONS, response)
            assert response.status_code == 400
        ops = mint_token(tokens.secret, user_id=uuid.uuid4(), platform_roles=["platform_ops"])
        assert http.get(SESSIONS, headers=bearer(ops)).status_code == 200
        assert http.get(SESSIONS, headers=bearer(payer.token)).status_code == 403
        denied = http.post(RECONCILE.format(payment_session_id=made[1]),
                           json={"action": "mark_expired", "reason": "by ops"}, headers=bearer(ops))
        assert denied.status_code == 403 and denied.json()["code"] == "admin_required"
        assert admin_get(http, tokens, str(uuid.uuid4())).status_code == 404
        no_tenant = mint_token(tokens.secret, user_id=uuid.uuid4())
        refused = http.post(CHECKOUT, json={"amount_minor": 5}, headers=bearer(no_tenant))
        check("POST", CHECKOUT, refused)
        assert refused.status_code == 403
