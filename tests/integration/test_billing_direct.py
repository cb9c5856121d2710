"""Credit, debit and balance end to end through HTTP, direct transport, real services."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from api.app import create_app
from tests.harness import ServerThread, bearer, client


@pytest.fixture(scope="module")
def api(request: Any, shared_database: Any, services: Any) -> Iterator[str]:
    from tests.conftest import make_settings

    settings = make_settings(services, shared_database.dsn)
    with ServerThread(create_app(settings)) as server:
        yield server.url


def adjust(http: Any, token: str, user: uuid.UUID, direction: str, amount: int,
           currency: str = "USD", key: str | None = None) -> Any:
    headers = bearer(token)
    if key:
        headers["Idempotency-Key"] = key
    return http.post(f"/api/v1/admin/users/{user}/balance", headers=headers,
                     json={"direction": direction, "amount_minor": amount,
                           "currency": currency, "reason": "test"})


def balance(http: Any, token: str, position: str | None = None) -> Any:
    headers = bearer(token)
    if position:
        headers["X-Ledger-Position"] = position
    return http.get("/api/v1/billing/balance", headers=headers)


def test_credit_debit_and_read_your_writes(api: str, tokens: Any) -> None:
    user = uuid.uuid4()
    with client(api) as http:
        first = balance(http, tokens.user(user))
        assert first.status_code == 200
        assert first.json() == {"balance": {"amount_minor": 0, "currency": "USD"},
                                "balances": [{"amount_minor": 0, "currency": "USD"}]}
        credit = adjust(http, tokens.admin(), user, "credit", 1_000)
        assert credit.status_code == 200 and credit.json() == {"ok": True}
        debit = adjust(http, tokens.admin(), user, "debit", 250)
        assert debit.status_code == 200
        eur = adjust(http, tokens.admin(), user, "credit", 7, currency="EUR")
        read = balance(http, tokens.user(user), eur.headers["X-Ledger-Position"])
        assert read.status_code == 200
        assert read.headers["X-Read-Model-Cache"] in ("miss", "hit")
        assert read.json() == {"balance": {"amount_minor": 750, "currency": "USD"},
                               "balances": [{"amount_minor": 7, "currency": "EUR"},
                                            {"amount_minor": 750, "currency": "USD"}]}
        assert int(read.headers["X-Ledger-Read-Position"]) >= int(eur.headers["X-Ledger-Position"])


def test_debit_beyond_balance_is_refused_and_appends_nothing(api: str, tokens: Any) -> None:
    user = uuid.uuid4()
    with client(api) as http:
        credit = adjust(http, tokens.admin(), user, "credit", 100)
        refused = adjust(http, tokens.admin(), user, "debit", 101)
        assert refused.status_code == 400
        body = refused.json()
        assert body["code"] == "insufficient_balance"
        assert body["details"] == {"balance_minor": 100, "currency": "USD", "requested_minor": 101}
        assert "X-Ledger-Position" not in refused.headers
        read = balance(http, tokens.user(user), credit.headers["X-Ledger-Position"])
        assert read.json()["balance"]["amount_minor"] == 100
        # a debit on an account that was never credited is refused the same way
        nobody = adjust(http, tokens.admin(), uuid.uuid4(), "debit", 1)
        assert nobody.status_code == 400 and nobody.json()["code"] == "insufficient_balance"


def test_cache_hits_until_a_new_event_then_misses(api: str, tokens: Any) -> None:
    user = uuid.uuid4()
    with client(api) as http:
        pos = adjust(http, tokens.admin(), user, "credit", 5).headers["X-Ledger-Position"]
        first = balance(http, tokens.user(user), pos)
        again = balance(http, tokens.user(user))
        # another caller's write moves the position, so the next read is a new key
        assert first.headers["X-Read-Model-Cache"] == "miss"
        assert again.headers["X-Read-Model-Cache"] in ("hit", "miss")
        pos2 = adjust(http, tokens.admin(), user, "credit", 6).headers["X-Ledger-Position"]
        after = balance(http, tokens.user(user), pos2)
        assert after.headers["X-Read-Model-Cache"] == "miss"
        assert after.json()["balance"]["amount_minor"] == 11
        repeat = balance(http, tokens.user(user), pos2)
        if repeat.headers["X-Ledger-Read-Position"] == after.headers["X-Ledger-Read-Position"]:
            assert repeat.headers["X-Read-Model-Cache"] == "hit"


def test_cached_balance_is_never_served_to_another_user(api: str, tokens: Any) -> None:
    rich, poor = uuid.uuid4(), uuid.uuid4()
    with client(api) as http:
        pos = adjust(http, tokens.admin(), rich, "credit", 999).headers["X-Ledger-Position"]
        assert balance(http, tokens.user(rich), pos).json()["balance"]["amount_minor"] == 999
        other = balance(http, tokens.user(poor), pos)
        assert other.json()["balance"]["amount_minor"] == 0


def test_health(api: str) -> None:
    with client(api) as http:
        response = http.get("/api/v1/healthz")
        assert response.status_code == 200 and response.json() == {"ok": True}
