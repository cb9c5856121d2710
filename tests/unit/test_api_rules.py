"""Cross-cutting API rules: tokens, project scope, cursors — on a small test app."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.testclient import TestClient

from api import errors
from api.auth import Principal, authenticate, mint_token, project_scope
from api.middleware import RequestContext
from api.pagination import encode_cursor, page_request
from infra.settings import Settings

SECRET = "unit-secret-unit-secret-unit-secret"


@pytest.fixture
def http() -> TestClient:
    app = FastAPI()
    app.state.settings = Settings(jwt_secret=SECRET)

    @app.get("/scoped")
    def scoped(request: Request, principal: Principal = Depends(authenticate)) -> dict[str, Any]:
        return {"project": str(project_scope(request, principal))}

    errors.install(app)
    app.add_middleware(RequestContext, max_body_bytes=1024)
    return TestClient(app)


def call(http: TestClient, token: str | None, project: str | None) -> Any:
    headers = {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if project is not None:
        headers["X-Project-ID"] = project
    return http.get("/scoped", headers=headers)


def test_project_scope_rules(http: TestClient) -> None:
    mine, theirs = uuid.uuid4(), uuid.uuid4()
    member = mint_token(SECRET, user_id=uuid.uuid4(), project_ids=[str(mine)])
    robot = mint_token(SECRET, user_id=uuid.uuid4(), actor_type="service_account",
                       project_id=str(mine))
    assert call(http, member, str(mine)).json() == {"project": str(mine)}
    assert call(http, robot, str(mine)).status_code == 200
    assert (call(http, None, str(mine)).json()["code"]) == "token_missing"
    for project in (None, "", "not-a-uuid"):
        response = call(http, member, project)
        assert (response.status_code, response.json()["code"]) == (400, "validation_error")
    wrong = call(http, member, str(theirs))
    unknown = call(http, member, str(uuid.uuid4()))
    assert wrong.status_code == unknown.status_code == 403
    strip = lambda r: {k: v for k, v in r.json().items() if k != "correlation_id"}  # noqa: E731
    assert strip(wrong) == strip(unknown)  # reveals nothing about which projects exist
    robot_elsewhere = call(http, robot, str(theirs))
    assert (robot_elsewhere.status_code, robot_elsewhere.json()["code"]) == (403, "token_scope_invalid")


def test_tokens_with_bad_claims_are_invalid(http: TestClient) -> None:
    bad_sub = mint_token(SECRET, user_id="not-a-uuid")
    bad_role = mint_token(SECRET, user_id=uuid.uuid4(), role="root")
    for token in (bad_sub, bad_role):
        assert call(http, token, str(uuid.uuid4())).json()["code"] == "token_invalid"


def test_request_id_is_the_correlation_id_and_is_echoed(http: TestClient) -> None:
    response = http.get("/scoped", headers={"X-Request-Id": "abc-123"})
    assert response.json()["correlation_id"] == "abc-123"
    assert response.headers["X-Request-Id"] == "abc-123"
    generated = http.get("/scoped")
    assert len(generated.json()["correlation_id"]) == 36  # made here when none is given
    too_long = http.get("/scoped", headers={"X-Request-Id": "x" * 129})
    assert too_long.status_code == 400 and too_long.json()["code"] == "validation_error"
    assert too_long.json()["correlation_id"] != "x" * 129


def test_unknown_routes_and_methods_answer_the_error_envelope(http: TestClient) -> None:
    missing = http.get("/nowhere")
    assert missing.status_code == 404 and missing.json()["code"] == "invalid_request"
    wrong_method = http.post("/scoped")
    assert wrong_method.status_code == 405 and set(wrong_method.json()) >= {"code", "message"}


def cursor_for(**overrides: Any) -> str:
    args = dict(operation_id="op", sort="occurred_at_desc", filters={"a": 1}, scope="u1",
                last_key=["2026-01-01", "id-9"])
    args.update(overrides)
    return encode_cursor(SECRET, **args)


def read(cursor: str | None, page_size: int | None = None, **overrides: Any) -> Any:
    args = dict(operation_id="op", sort="occurred_at_desc", filters={"a": 1}, scope="u1")
    args.update(overrides)
    return page_request(SECRET, cursor=cursor, page_size=page_size, **args)


def test_cursors_round_trip_and_are_bound_to_sort_filters_and_scope() -> None:
    assert read(None).page_size == 50 and read(None).after is None
    assert read(cursor_for(), 10).after == ["2026-01-01", "id-9"]
    for change in ({"sort": "action_asc"}, {"filters": {"a": 2}}, {"scope": "u2"},
                   {"operation_id": "other"}):
        with pytest.raises(errors.ApiError) as raised:
            read(cursor_for(), **change)
        assert raised.value.details["reason"] == "cursor_mismatch"
    tampered = cursor_for()[:-3] + ("AAA" if not cursor_for().endswith("AAA") else "BBB")
    with pytest.raises(errors.ApiError) as raised:
        read(tampered)
    assert raised.value.details["reason"] == "cursor_invalid"
    for size in (0, 201):
        with pytest.raises(errors.ApiError) as raised:
            read(None, size)
        assert raised.value.code == "validation_error"


def test_a_verified_token_is_remembered_only_within_its_window(monkeypatch: pytest.MonkeyPatch) -> None:
    import api.auth as auth

    secret = "s" * 40
    user = uuid.uuid4()
    token = mint_token(secret, user_id=user, ttl_seconds=60)
    assert auth.principal_from_token(token, secret).user_id == user
    assert (secret, token) in auth._verified
    # the same token under another secret is verified again, and refused
    with pytest.raises(errors.ApiError) as refused:
        auth.principal_from_token(token, "t" * 40)
    assert refused.value.code == "token_invalid"
    # once its time is up, the remembered token is refused as expired
    now = auth.time.time()
    monkeypatch.setattr(auth.time, "time", lambda: now + 61)
    with pytest.raises(errors.ApiError) as expired:
        auth.principal_from_token(token, secret)
    assert expired.value.code == "token_expired"
