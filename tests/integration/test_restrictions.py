"""Financial restrictions and the caller's posture, through HTTP, checked against the
contract."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from api.app import create_app
from api.auth import mint_token
from tests.contract.test_contract import check
from tests.harness import ServerThread, bearer, client

SET = "/api/v1/admin/billing/financial-restrictions/{scope_type}/{scope_id}"
POSTURE = "/api/v1/billing/financial-posture"


@pytest.fixture(scope="module")
def api(shared_database: Any, services: Any) -> Iterator[str]:
    from tests.conftest import make_settings

    with ServerThread(create_app(make_settings(services, shared_database.dsn))) as server:
        yield server.url


def put(http: Any, token: str, scope_type: str, scope_id: Any, body: dict[str, Any]) -> Any:
    response = http.post(SET.format(scope_type=scope_type, scope_id=scope_id), json=body,
                         headers=bearer(token))
    check("POST", SET, response)
    return response


def posture(http: Any, token: str, position: str = "0") -> dict[str, Any]:
    response = http.get(POSTURE, headers={**bearer(token), "X-Ledger-Position": position})
    check("GET", POSTURE, response)
    assert response.status_code == 200
    return response.json()


def adjust(http: Any, admin: str, user: uuid.UUID, direction: str, amount: int) -> str:
    response = http.post(f"/api/v1/admin/users/{user}/balance", headers=bearer(admin), json={
        "direction": direction, "amount_minor": amount, "currency": "USD", "reason": "test"})
    assert response.status_code == 200, response.text
    return response.headers["X-Ledger-Position"]


def test_a_balance_not_above_zero_restricts_automatically(api: str, tokens: Any) -> None:
    user = uuid.uuid4()
    caller = mint_token(tokens.secret, user_id=user)
    with client(api) as http:
        empty = posture(http, caller)
        assert (empty["state"], empty["reason"], empty["selected_action"]) == (
            "restricted", "prepaid_balance_depleted", "restrict")
        assert empty["balance_minor"] == 0 and empty["effects"]["launch_blocked"] is True
        funded = posture(http, caller, adjust(http, tokens.admin(), user, "credit", 500))
        assert funded["state"] == "healthy" and funded["balance_minor"] == 500
        spent = posture(http, caller, adjust(http, tokens.admin(), user, "debit", 500))
        assert spent["state"] == "restricted" and spent["balance_minor"] == 0
        hold = put(http, tokens.admin(), "user", user, {"state": "collections_hold", "reason": "x"})
        worse = posture(http, caller, hold.headers["X-Ledger-Position"])
        assert worse["state"] == "collections_hold"  # a more severe restriction still wins


def test_the_most_severe_restriction_over_user_project_and_tenant_wins(api: str, tokens: Any) -> None:
    user, tenant, project = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    caller = mint_token(tokens.secret, user_id=user, tenant_id=tenant, project_ids=[str(project)])
    with client(api) as http:
        healthy = posture(http, caller, adjust(http, tokens.admin(), user, "credit", 100))
        assert healthy["state"] == "healthy" and healthy["restriction"] is None
        assert healthy["effects"]["launch_blocked"] is False
        at_risk = put(http, tokens.admin(), "user", user, {"state": "at_risk", "reason": "low runway"})
        assert at_risk.status_code == 200 and at_risk.json()["state"] == "at_risk"
        hold = put(http, tokens.admin(), "tenant", tenant,
                   {"state": "collections_hold", "reason": "invoice 42 unpaid", "metadata": {"n": 1}})
        now = posture(http, caller, hold.headers["X-Ledger-Position"])
        assert now["state"] == "collections_hold" and now["reason"] == "invoice 42 unpaid"
        assert now["effects"] == {"launch_blocked": True, "refunds_blocked": True,
                                  "disabled_reasons": ["financial_collections_hold"], "warnings": []}
        assert now["restriction"]["scope_type"] == "tenant"
        lifted = put(http, tokens.admin(), "tenant", tenant, {"state": "healthy", "reason": "paid"})
        assert lifted.json()["id"] == hold.json()["id"]  # one restriction per scope
        put(http, tokens.admin(), "project", project, {"state": "restricted", "reason": "budget"})
        last = put(http, tokens.admin(), "user", uuid.uuid4(), {"state": "suspended", "reason": "x"})
        after = posture(http, caller, last.headers["X-Ledger-Position"])
        assert after["state"] == "restricted" and after["effects"]["launch_blocked"] is True
        stranger = uuid.uuid4()
        position = adjust(http, tokens.admin(), stranger, "credit", 100)
        assert posture(http, tokens.user(stranger), position)["state"] == "healthy"


def test_restriction_input_and_permissions(api: str, tokens: Any) -> None:
    target = uuid.uuid4()
    ops = mint_token(tokens.secret, user_id=uuid.uuid4(), platform_roles=["platform_ops"])
    with client(api) as http:
        for body in ({"state": "frozen", "reason": "x"}, {"state": "restricted", "reason": ""},
                     {"state": "restricted"}, {"state": "restricted", "reason": "x", "extra": 1}):
            assert put(http, tokens.admin(), "user", target, body).status_code == 400
        bad_scope = http.post(SET.format(scope_type="planet", scope_id=target),
                              json={"state": "restricted", "reason": "x"}, headers=bearer(tokens.admin()))
        check("POST", SET, bad_scope)
        assert bad_scope.status_code == 400
        denied = put(http, ops, "user", target, {"state": "restricted", "reason": "x"})
        assert denied.status_code == 403 and denied.json()["code"] == "admin_required"
        assert http.get(POSTURE).status_code == 401
