"""Idempotency, bad input, auth and racing clients against a real server (direct)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from api.app import create_app
from api.auth import mint_token
from tests.harness import ServerThread, bearer, client


@pytest.fixture(scope="module")
def env(shared_database: Any, services: Any) -> Iterator[Any]:
    from infra.db import Stores
    from tests.conftest import make_settings

    settings = make_settings(services, shared_database.dsn)
    stores = Stores.open(settings)
    with ServerThread(create_app(settings, stores)) as server:
        yield server.url, stores
    stores.close()


def event_count(stores: Any) -> int:
    return stores.app.recorder.max_notification_id() or 0


def url(user: uuid.UUID) -> str:
    return f"/api/v1/admin/users/{user}/balance"


BODY = {"direction": "credit", "amount_minor": 300, "currency": "USD", "reason": "goodwill"}


def test_same_key_same_body_replays_the_original_and_appends_nothing(env: Any, tokens: Any) -> None:
    base, stores = env
    user = uuid.uuid4()
    headers = {**bearer(tokens.admin()), "Idempotency-Key": "replay-1"}
    with client(base) as http:
        first = http.post(url(user), json=BODY, headers=headers)
        assert first.status_code == 200
        before = event_count(stores)
        for _ in range(3):
            again = http.post(url(user), json=BODY, headers=headers)
            assert (again.status_code, again.json()) == (first.status_code, first.json())
            assert again.headers["Idempotent-Replayed"] == "true"
        assert event_count(stores) == before
        account = stores.app.billing_account(user)
        assert account.balances == {"USD": 300}


def test_same_key_different_body_is_409_and_appends_nothing(env: Any, tokens: Any) -> None:
    base, stores = env
    user = uuid.uuid4()
    headers = {**bearer(tokens.admin()), "Idempotency-Key": "reuse-1"}
    with client(base) as http:
        assert http.post(url(user), json=BODY, headers=headers).status_code == 200
        before = event_count(stores)
        conflict = http.post(url(user), json={**BODY, "amount_minor": 301}, headers=headers)
        assert conflict.status_code == 409
        assert conflict.json()["code"] == "invalid_request"
        assert conflict.json()["details"]["reason"] == "idempotency_key_reused"
        other_user = http.post(url(uuid.uuid4()), json=BODY, headers=headers)
        assert other_user.status_code == 409  # the path is part of the request too
        assert event_count(stores) == before


def test_a_refused_debit_is_replayed_as_refused_even_after_a_credit(env: Any, tokens: Any) -> None:
    base, stores = env
    user = uuid.uuid4()
    debit = {**BODY, "direction": "debit"}
    headers = {**bearer(tokens.admin()), "Idempotency-Key": "refused-1"}
    with client(base) as http:
        refused = http.post(url(user), json=debit, headers=headers)
        assert refused.status_code == 400 and refused.json()["code"] == "insufficient_balance"
        http.post(url(user), json=BODY, headers=bearer(tokens.admin()))
        replay = http.post(url(user), json=debit, headers=headers)
        assert (replay.status_code, replay.json()) == (400, refused.json())
        assert stores.app.billing_account(user).balances == {"USD": 300}


def test_keys_are_scoped_to_the_caller(env: Any, tokens: Any) -> None:
    base, stores = env
    user = uuid.uuid4()
    other_admin = mint_token(tokens.secret, user_id=uuid.uuid4(), role="admin")
    with client(base) as http:
        a = http.post(url(user), json=BODY, headers={**bearer(tokens.admin()), "Idempotency-Key": "k"})
        b = http.post(url(user), json=BODY, headers={**bearer(other_admin), "Idempotency-Key": "k"})
        assert a.status_code == b.status_code == 200
        assert "Idempotent-Replayed" not in b.headers
    assert stores.app.billing_account(user).balances == {"USD": 600}


@pytest.mark.parametrize("body, field", [
    ({**BODY, "amount_minor": -5}, "amount_minor"),
    ({**BODY, "amount_minor": 0}, "amount_minor"),
    ({**BODY, "amount_minor": 1.5}, "amount_minor"),
    ({**BODY, "amount_minor": 10.0}, "amount_minor"),
    ({**BODY, "amount_minor": "10"}, "amount_minor"),
    ({**BODY, "amount_minor": True}, "amount_minor"),
    ({**BODY, "currency": "usd"}, "currency"),
    ({**BODY, "direction": "sideways"}, "direction"),
    ({**BODY, "surprise": 1}, "surprise"),
    ({k: v for k, v in BODY.items() if k != "reason"}, "reason"),
])
def test_invalid_bodies_are_400_validation_error(env: Any, tokens: Any, body: Any, field: str) -> None:
    base, stores = env
    before = event_count(stores)
    with client(base) as http:
        response = http.post(url(uuid.uuid4()), json=body,
                             headers={**bearer(tokens.admin()), "X-Request-Id": "req-abc"})
    assert response.status_code == 400
    payload = response.json()
    assert payload["code"] == "validation_error"
    assert payload["correlation_id"] == "req-abc"
    assert any(f["field"] == field and f["location"] == "body" for f in payload["details"]["fields"])
    assert event_count(stores) == before


def test_unknown_currency_malformed_json_bad_uuid_and_oversized_body(env: Any, tokens: Any) -> None:
    base, stores = env
    before = event_count(stores)
    admin = bearer(tokens.admin())
    with client(base) as http:
        unknown = http.post(url(uuid.uuid4()), json={**BODY, "currency": "ZZZ"}, headers=admin)
        assert unknown.status_code == 400 and unknown.json()["code"] == "invalid_request"
        assert unknown.json()["details"]["reason"] == "unsupported_currency"
        malformed = http.post(url(uuid.uuid4()), content=b'{"direction": "credit",',
                              headers={**admin, "Content-Type": "application/json"})
        assert malformed.status_code == 400 and malformed.json()["code"] == "validation_error"
        bad_id = http.post("/api/v1/admin/users/not-a-uuid/balance", json=BODY, headers=admin)
        assert bad_id.status_code == 400
        assert bad_id.json()["details"]["fields"][0]["location"] == "path"
        huge = http.post(url(uuid.uuid4()), json={**BODY, "reason": "x" * 200_000}, headers=admin)
        assert huge.status_code == 400
        assert huge.json()["details"]["reason"] == "body_too_large"
        long_key = http.post(url(uuid.uuid4()), json=BODY,
                             headers={**admin, "Idempotency-Key": "k" * 129})
        assert long_key.status_code == 400 and long_key.json()["details"]["header"] == "Idempotency-Key"
    assert event_count(stores) == before


def test_auth_failures(env: Any, tokens: Any) -> None:
    base, stores = env
    before = event_count(stores)
    user = uuid.uuid4()
    expired = mint_token(tokens.secret, user_id=uuid.uuid4(), role="admin", ttl_seconds=-10)
    forged = mint_token("another-secret-another-secret-xx", user_id=uuid.uuid4(), role="admin")
    plain_user = tokens.user(uuid.uuid4())
    with client(base) as http:
        cases = [
            ({}, 401, "token_missing"),
            ({"Authorization": "Basic abc"}, 401, "token_invalid"),
            (bearer("not.a.jwt"), 401, "token_invalid"),
            (bearer(expired), 401, "token_expired"),
            (bearer(forged), 401, "token_invalid"),
            (bearer(plain_user), 403, "admin_required"),
        ]
        for headers, status, code in cases:
            response = http.post(url(user), json=BODY, headers=headers)
            assert (response.status_code, response.json()["code"]) == (status, code), headers
        assert http.get("/api/v1/billing/balance").status_code == 401
    assert event_count(stores) == before


def test_racing_clients_lose_nothing(env: Any, tokens: Any) -> None:
    """Many clients credit and debit one account at once: every acknowledged command
    is applied exactly once and no debit overdraws."""
    base, stores = env
    user = uuid.uuid4()
    admin = bearer(tokens.admin())
    results: list[tuple[str, int, int]] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        with httpx.Client(base_url=base, timeout=60) as http:
            for i in range(15):
                direction = "credit" if (n + i) % 3 else "debit"
                r = http.post(url(user), headers=admin, json={
                    "direction": direction, "amount_minor": 10, "currency": "USD", "reason": "race"})
                with lock:
                    results.append((direction, r.status_code, 10))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {status for _, status, _ in results} <= {200, 400, 409}
    credits = sum(a for d, s, a in results if d == "credit" and s == 200)
    debits = sum(a for d, s, a in results if d == "debit" and s == 200)
    assert credits > 0
    account = stores.app.billing_account(user)
    assert account.balances.get("USD", 0) == credits - debits >= 0
    with client(base) as http:
        pos = str(stores.app.recorder.max_notification_id())
        read = http.get("/api/v1/billing/balance",
                        headers={**bearer(tokens.user(user)), "X-Ledger-Position": pos})
        assert read.json()["balance"]["amount_minor"] == credits - debits
