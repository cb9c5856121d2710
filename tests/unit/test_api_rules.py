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


# ---- tenant and project roles ------------------------------------------------------------
def principal(**claims: Any) -> Principal:
    import jwt

    from api.auth import ISSUER, principal_from_token

    body = {"iss": ISSUER, "sub": str(uuid.uuid4()), "exp": 4_102_444_800, **claims}
    return principal_from_token(jwt.encode(body, SECRET, algorithm="HS256"), SECRET)


def test_role_claims_are_parsed_and_default_to_member() -> None:
    listed, ruled, other = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    plain = principal(project_ids=[str(listed)])
    assert (plain.tenant_role, plain.project_role(listed)) == ("member", "member")
    caller = principal(tenant_role="billing_viewer", project_ids=[str(listed)],
                       project_roles={str(ruled): "viewer", str(listed).upper(): "admin"})
    assert caller.tenant_role == "billing_viewer"
    assert caller.project_ids == {listed, ruled}  # a project with a role is a membership
    assert (caller.project_role(listed), caller.project_role(ruled)) == ("admin", "viewer")
    assert other not in caller.project_ids
    # a tenant owner or admin is at least that in each project it belongs to
    assert principal(tenant_role="admin", project_roles={str(ruled): "viewer"}
                     ).project_role(ruled) == "admin"
    assert principal(tenant_role="admin", project_roles={str(ruled): "owner"}
                     ).project_role(ruled) == "owner"
    assert principal(tenant_role="billing_viewer", project_roles={str(ruled): "viewer"}
                     ).project_role(ruled) == "viewer"
    # mint_token writes the same claims
    minted = mint_token(SECRET, user_id=uuid.uuid4(), tenant_role="billing_viewer",
                        project_roles={ruled: "viewer"})
    from api.auth import principal_from_token
    parsed = principal_from_token(minted, SECRET)
    assert (parsed.tenant_role, parsed.project_role(ruled)) == ("billing_viewer", "viewer")
    assert parsed.project_ids == {ruled}


@pytest.mark.parametrize("claims", [
    {"tenant_role": "superuser"}, {"tenant_role": ""}, {"tenant_role": "viewer"},
    {"tenant_role": ["owner"]}, {"tenant_role": 1},
    {"project_roles": {str(uuid.uuid4()): "billing_viewer"}},
    {"project_roles": {str(uuid.uuid4()): "Owner"}},
    {"project_roles": {str(uuid.uuid4()): None}},
    {"project_roles": {"not-a-uuid": "member"}},
    {"project_roles": [str(uuid.uuid4())]}, {"project_roles": "owner"},
    {"project_roles": {"a" * 32: "owner", "A" * 32: "viewer"}},  # one project, two roles
    {"actor_type": "node", "tenant_role": "member"},
    {"actor_type": "node", "project_roles": {}},
])
def test_an_unknown_role_value_makes_the_token_invalid(http: TestClient,
                                                       claims: dict[str, Any]) -> None:
    import jwt

    from api.auth import ISSUER

    body = {"iss": ISSUER, "sub": str(uuid.uuid4()), "exp": 4_102_444_800, **claims}
    response = call(http, jwt.encode(body, SECRET, algorithm="HS256"), str(uuid.uuid4()))
    assert (response.status_code, response.json()["code"]) == (401, "token_invalid")


def test_the_scope_key_changes_with_any_role() -> None:
    project, user = uuid.uuid4(), str(uuid.uuid4())
    keys = {principal(sub=user, project_ids=[str(project)], **claims).scope_key for claims in (
        {}, {"tenant_role": "admin"}, {"tenant_role": "billing_viewer"},
        {"project_roles": {str(project): "viewer"}}, {"project_roles": {str(project): "owner"}})}
    assert len(keys) == 5
    # the member default spelled out is the same caller
    assert principal(sub=user, project_ids=[str(project)]).scope_key == principal(
        sub=user, tenant_role="member", project_roles={str(project): "member"}).scope_key


def test_a_viewer_only_reads_a_project(http: TestClient) -> None:
    """``project_access``: a viewer's GET passes, anything else is 403 after the
    membership check (a foreign project stays the membership's 403)."""
    app = FastAPI()
    app.state.settings = Settings(jwt_secret=SECRET)

    @app.api_route("/scoped", methods=["GET", "POST", "PUT", "DELETE"])
    def scoped(request: Request, principal: Principal = Depends(authenticate)) -> dict[str, Any]:
        return {"project": str(project_scope(request, principal))}

    errors.install(app)
    client = TestClient(app)
    project = uuid.uuid4()
    roles = {role: mint_token(SECRET, user_id=uuid.uuid4(), project_roles={project: role})
             for role in ("viewer", "member", "admin", "owner")}
    lifted = mint_token(SECRET, user_id=uuid.uuid4(), tenant_role="admin",
                        project_roles={project: "viewer"})
    for method in ("GET", "POST", "PUT", "DELETE"):
        for role, token in {**roles, "viewer, tenant admin": lifted}.items():
            response = client.request(method, "/scoped", headers={
                "Authorization": f"Bearer {token}", "X-Project-ID": str(project)})
            refused = role == "viewer" and method != "GET"
            assert response.status_code == (403 if refused else 200), (method, role)
            if refused:
                assert response.json()["code"] == "insufficient_permissions"
        elsewhere = client.request(method, "/scoped", headers={
            "Authorization": f"Bearer {roles['viewer']}", "X-Project-ID": str(uuid.uuid4())})
        assert (elsewhere.status_code, elsewhere.json()["message"]) == \
            (403, "no access to this project")


def test_the_testing_kit_mints_roles() -> None:
    from api.auth import principal_from_token
    from ledgercore_testing import Tokens

    tokens, project, other = Tokens(SECRET), uuid.uuid4(), uuid.uuid4()
    caller = principal_from_token(tokens.user(
        uuid.uuid4(), tenant_id=uuid.uuid4(), project_id=project, tenant_role="billing_viewer",
        project_role="viewer", project_roles={str(other): "admin"}), SECRET)
    assert caller.tenant_role == "billing_viewer"
    assert (caller.project_role(project), caller.project_role(other)) == ("viewer", "admin")
    plain = principal_from_token(tokens.user(uuid.uuid4(), project_id=project), SECRET)
    assert (plain.tenant_role, plain.project_role(project)) == ("member", "member")
    with pytest.raises(ValueError):
        tokens.user(uuid.uuid4(), project_role="viewer")


def test_the_token_command_mints_tenant_and_project_roles(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from api.auth import principal_from_token
    from infra.cli import cli

    secret = "c" * 40
    monkeypatch.setenv("LEDGERCORE_JWT_SECRET", secret)
    viewing, member = uuid.uuid4(), uuid.uuid4()
    result = CliRunner().invoke(cli, ["token", "--user-id", str(uuid.uuid4()),
                                      "--project", f"{viewing}=viewer", "--project", str(member),
                                      "--tenant-role", "billing_viewer"])
    assert result.exit_code == 0, result.output
    principal = principal_from_token(result.stdout.strip().splitlines()[-1], secret)
    assert principal.project_ids == {viewing, member}
    assert principal.project_role(viewing) == "viewer"
    assert principal.project_role(member) == "member"
    assert principal.tenant_role == "billing_viewer"
