"""Regression tests for what contract fuzzing (``test_fuzz.py``) found, each the
request it failed on (shrunk) against a real server over a database of its own; the
findings are listed in docs/reliability.md, "Contract fuzzing"."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from api.auth import mint_token
from api.commands.allocations import CreateAllocationRequest
from api.launch_request import V3ComputeLaunchSubmitRequest
from domain.canonical import first_float
from tests.contract.schemas import error_schema, errors_in
from tests.harness import bearer, client

PROJECT = uuid.uuid4()


@pytest.fixture(scope="module")
def served(services: Any) -> Iterator[Any]:
    from tests.conftest import serve_own_database
    with serve_own_database(services) as server:
        yield server


@pytest.fixture(scope="module")
def admin(tokens: Any) -> dict[str, str]:
    token = mint_token(tokens.secret, user_id=uuid.uuid4(), tenant_id=uuid.uuid4(), role="admin",
                       platform_roles=["platform_superadmin"], project_ids=[str(PROJECT)])
    return {**bearer(token), "X-Project-ID": str(PROJECT)}


def refused(response: Any, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert not errors_in(response.json(), error_schema())
    return response.json()


def fields(body: dict[str, Any]) -> set[str]:
    return {f["field"] for f in body.get("details", {}).get("fields", [])}


# ---- 405 without the methods the path does serve ------------------------------------
def test_a_405_names_every_method_the_path_serves(served: Any, admin: dict[str, str]) -> None:
    """Was: ``OPTIONS /api/v1/admin/billing/reconciliation`` → 405 with no ``Allow`` (the
    error handler dropped the exception's headers), then ``Allow: POST`` (Starlette names
    the first route on the path only)."""
    with client(served.url) as http:
        for method in ("OPTIONS", "TRACE", "DELETE"):
            response = http.request(method, "/api/v1/admin/billing/reconciliation", headers=admin)
            assert refused(response, 405)["details"]["reason"] == "method_not_allowed"
            assert response.headers["Allow"] == "GET, POST"
        slots = f"/api/v1/admin/nodes/{uuid.uuid4()}/resource-slots"
        assert http.request("OPTIONS", slots, headers=admin).headers["Allow"] == "GET, PUT"
        assert http.request("TRACE", "/api/v1/healthz").headers["Allow"] == "GET"


# ---- ssh_key_ids refused whatever they held -----------------------------------------
def test_ssh_key_ids_take_uuids_sent_as_json_strings(served: Any, admin: dict[str, str]) -> None:
    """Was: any ``ssh_key_ids`` → 400 ``ssh_key_ids.0: Input should be an instance of UUID``
    (the model's strict mode reached into the list; FastAPI validates the parsed body in
    Python mode, where a uuid is a str)."""
    key = str(uuid.uuid4())
    assert CreateAllocationRequest.model_validate(
        {"scheduler_type": "bare_metal", "ssh_key_ids": [key]}).ssh_key_ids == [uuid.UUID(key)]
    assert V3ComputeLaunchSubmitRequest.model_validate(
        {"sku": "s", "ssh_key_ids": [key]}).ssh_key_ids == [uuid.UUID(key)]
    with client(served.url) as http:
        created = http.post("/api/v1/allocations", headers=admin,
                            json={"scheduler_type": "bare_metal", "ssh_key_ids": [key]})
        assert "ssh_key_ids.0" not in fields(created.json()), created.text
        assert created.json().get("code") != "validation_error", created.text
        checked = http.post("/api/v1/launch/compute/precheck", headers=admin,
                            json={"sku": "no-such-sku", "ssh_key_ids": [key]})
        assert checked.status_code == 200, checked.text
        bad = http.post("/api/v1/allocations", headers=admin,
                        json={"scheduler_type": "bare_metal", "ssh_key_ids": ["not-a-uuid"]})
        assert "ssh_key_ids.0" in fields(refused(bad))


# ---- a float in a free-form object --------------------------------------------------
def test_a_float_in_a_free_form_object_is_a_400_not_a_500(served: Any,
                                                           admin: dict[str, str]) -> None:
    """Was: ``POST …/financial-restrictions/tenant/{id}`` with an ``Idempotency-Key`` and
    ``metadata: {"x": 0.2}`` → 500 (the key's fingerprint is canonical JSON, which refuses
    floats); the same for a launch's ``scheduler_request``."""
    assert first_float({"a": [1, {"b": 0.5}]}) == "a.1.b"
    assert first_float({"a": [1, True, "0.5", None]}) is None
    keyed = {**admin, "Idempotency-Key": uuid.uuid4().hex}
    with client(served.url) as http:
        restriction = http.post(
            f"/api/v1/admin/billing/financial-restrictions/tenant/{uuid.uuid4()}", headers=keyed,
            json={"state": "restricted", "reason": "b", "metadata": {"x": [{"y": 0.2}]}})
        body = refused(restriction)
        assert fields(body) == {"metadata"} and "x.0.y" in str(body), body
        launch = http.post("/api/v1/launch/compute", headers=keyed,
                           json={"sku": "s", "scheduler_request": {"memory_gb": 1.5}})
        assert fields(refused(launch)) == {"scheduler_request"}
        whole = http.post(
            f"/api/v1/admin/billing/financial-restrictions/tenant/{uuid.uuid4()}",
            headers={**admin, "Idempotency-Key": uuid.uuid4().hex},
            json={"state": "restricted", "reason": "b", "metadata": {"x": [{"y": 2}]}})
        assert whole.status_code == 200, whole.text


# ---- date-time query parameters -----------------------------------------------------
@pytest.mark.parametrize("query", [
    {"to": "0.5"},                                              # was 200: unix seconds
    {"from": "1700000000"},                                     # was 200
    {"from": "2024-01-01", "to": "2024-01-02T00:00:00Z"},       # was 500: naive vs aware
    {"from": "2024-01-01T00:00:00", "to": "2024-01-02T00:00:00Z"},
])
def test_a_date_time_query_parameter_takes_rfc3339_only(served: Any, admin: dict[str, str],
                                                        query: dict[str, str]) -> None:
    """``format: date-time`` is RFC 3339 with an offset; pydantic's ``datetime`` also
    takes a number (unix seconds) and offset-less times, and comparing an offset-less
    ``from`` with an aware ``to`` raised (500)."""
    with client(served.url) as http:
        for path in ("/api/v1/admin/payments/sessions", "/api/v1/platform/finance/payment-sessions",
                     "/api/v1/billing/usage", "/api/v1/billing/usage/csv",
                     f"/api/v1/platform/finance/users/{uuid.uuid4()}/refunds",
                     "/api/v1/platform/finance/reconciliation"):
            body = refused(http.get(path, params=query, headers=admin))
            assert fields(body) & {"from", "to"}, (path, body)
        fine = http.get("/api/v1/admin/payments/sessions", headers=admin,
                        params={"from": "2024-01-01T00:00:00Z", "to": "2024-01-02T00:00:00+02:00"})
        assert fine.status_code == 200, fine.text


# ---- a declared header nobody read ---------------------------------------------------
def test_a_precheck_refuses_a_malformed_idempotency_key(served: Any,
                                                        admin: dict[str, str]) -> None:
    """Was: ``POST /api/v1/launch/compute/precheck`` with a 129-character
    ``Idempotency-Key`` (the contract says at most 128) → 200: the precheck ignored it."""
    with client(served.url) as http:
        for path in ("/api/v1/launch/compute/precheck", "/api/v1/v3/launch/compute/precheck"):
            response = http.post(path, json={"sku": "s"},
                                 headers={**admin, "Idempotency-Key": "k" * 129})
            assert refused(response)["details"]["header"] == "Idempotency-Key"
            assert http.post(path, json={"sku": "s"},
                             headers={**admin, "Idempotency-Key": "k" * 128}).status_code == 200


# ---- a node host idna cannot encode --------------------------------------------------
def test_a_node_host_that_is_no_host_name_is_a_400(served: Any, admin: dict[str, str]) -> None:
    """Was: ``POST /api/v1/admin/nodes`` with ``host: "i;\\u001b\\u00d0…"`` → 500
    (``UnicodeError`` from the idna codec in the liveness probe)."""
    with client(served.url) as http:
        for host in ("i;\u001b\u00d0\u00c3l", "a..b", "-ab", "x" * 64 + ".example"):
            response = http.post("/api/v1/admin/nodes", headers=admin,
                                 json={"host": host, "sku": "s", "gpus_total": 1})
            assert fields(refused(response)) == {"host"}, host


# ---- NUL characters ------------------------------------------------------------------
def sku(name: str, **changes: Any) -> dict[str, Any]:
    return {"sku": name, "vendor": "v", "display_name": "d", "resource_class": "gpu_baremetal",
            "billing_unit": "gpu_hour", "scheduling_unit": "node",
            "resources": {"allowed_accelerator_counts": [1]},
            "unit_price": {"amount_minor": 100, "currency": "USD"}, **changes}


def test_a_nul_character_is_refused_before_it_can_stop_a_projection(
        served: Any, admin: dict[str, str]) -> None:
    """Was: ``POST /api/v1/admin/skus`` with ``display_name: "a\\u0000b"`` → 201, and the
    inventory projection then failed on that event for good (Postgres jsonb/text hold no
    NUL): every later inventory read was stale. A NUL in a filter (``search=a%00``) → 503
    from the read model instead of a 400."""
    tag = uuid.uuid4().hex[:6]
    with client(served.url) as http:
        body = refused(http.post("/api/v1/admin/skus", headers=admin,
                                 json=sku(f"nul-{tag}", display_name="a\u0000b")))
        assert body["details"]["fields"][0]["reason"] == "nul_character"
        literal = json.dumps(sku(f"esc-{tag}", display_name="a\\u0000b"))  # a backslash, no NUL
        assert http.post("/api/v1/admin/skus", content=literal,
                         headers={**admin, "Content-Type": "application/json"}).status_code == 201
        made = http.post("/api/v1/admin/skus", headers=admin, json=sku(f"ok-{tag}"))
        assert made.status_code == 201, made.text
        listed = http.get("/api/v1/admin/skus", params={"page_size": 200},
                          headers={**admin, "X-Ledger-Position": made.headers["X-Ledger-Position"]})
        assert listed.headers["X-Read-Model-Cache"] != "stale"
        assert {f"esc-{tag}", f"ok-{tag}"} <= {item["sku"] for item in listed.json()["items"]}
        for path, params in (("/api/v1/compute", {"search": "a\u0000"}),
                             ("/api/v1/admin/billing/diagnostics", {"correlation_id": "\u0000"})):
            assert refused(http.get(path, params=params, headers=admin))["details"]["fields"][0][
                "location"] == "query", path
        assert refused(http.post("/api/v1/admin/skus/a%00b/activate", headers=admin)
                       )["details"]["fields"][0]["location"] == "path"


# ---- an amount past int64 ----------------------------------------------------------
def test_an_amount_past_int64_is_refused_before_it_can_stop_a_projection(
        served: Any, admin: dict[str, str]) -> None:
    """Was: ``POST /api/v1/payments/checkout-session`` with ``amount_minor: 2**63`` → 200,
    and the payments projection (``bigint`` columns) then failed on that event for good;
    the direct projector applies every read model in one batch, so all of them stopped."""
    huge = 2**63
    with client(served.url) as http:
        for path, body in (
                ("/api/v1/payments/checkout-session", {"amount_minor": huge, "currency": "USD"}),
                (f"/api/v1/admin/users/{uuid.uuid4()}/balance",
                 {"direction": "credit", "amount_minor": huge, "currency": "USD", "reason": "r"}),
                (f"/api/v1/admin/users/{uuid.uuid4()}/refunds",
                 {"amount_minor": huge, "currency": "USD", "reason": "rrr"}),
                ("/api/v1/admin/skus", sku(f"big-{uuid.uuid4().hex[:6]}",
                                           unit_price={"amount_minor": huge, "currency": "USD"}))):
            body = refused(http.post(path, json=body, headers=admin))
            assert any("amount_minor" in field for field in fields(body)), (path, body)
        made = http.post("/api/v1/payments/checkout-session", headers=admin,
                         json={"amount_minor": 2**63 - 1, "currency": "USD"})
        assert made.status_code == 200, made.text
        listed = http.get("/api/v1/admin/payments/sessions",
                          headers={**admin, "X-Ledger-Position": made.headers["X-Ledger-Position"]})
        assert listed.headers["X-Read-Model-Cache"] != "stale", listed.text
