"""Every implemented operation against callers it must turn away: no token, a token
signed with another key, an expired token, and (for operator operations) a plain
user. Each gets the documented 401/403 as an ``ErrorResponse`` before anything about
the request itself (its body, its ids) is looked at."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from api.app import create_app, implemented_routes
from api.auth import mint_token
from tests.contract.schemas import error_schema, errors_in
from tests.harness import ServerThread, bearer, client

#: operations without bearer auth: the webhook (signed by the provider) and health
PUBLIC = {"stripeWebhook", "getHealth"}
OPERATOR_PREFIXES = ("/api/v1/admin/", "/api/v1/platform/", "/api/v1/v3/platform/")


def concrete(path: str) -> str:
    """A path template with every parameter filled (ids that exist nowhere)."""
    parts = []
    for part in path.split("/"):
        if part.startswith("{"):
            name = part[1:-1]
            part = "no-such-sku" if name == "sku" else "user" if name == "scope_type" else str(uuid.uuid4())
        parts.append(part)
    return "/".join(parts)


@pytest.fixture(scope="module")
def api(shared_database: Any, services: Any) -> Iterator[str]:
    from tests.conftest import make_settings

    with ServerThread(create_app(make_settings(services, shared_database.dsn))) as server:
        yield server.url


OPERATIONS = sorted((op, method, path) for op, (method, path) in implemented_routes().items()
                    if op not in PUBLIC)


def send(http: Any, method: str, path: str, headers: dict[str, str]) -> Any:
    body = {} if method in ("POST", "PUT", "PATCH") else None
    return http.request(method, concrete(path), json=body,
                        headers={**headers, "X-Project-ID": str(uuid.uuid4())})


@pytest.mark.parametrize("operation_id, method, path", OPERATIONS)
def test_unauthenticated_callers_get_401(api: str, tokens: Any, operation_id: str, method: str,
                                         path: str) -> None:
    user = uuid.uuid4()
    callers = {
        "token_missing": {},
        "token_invalid": bearer(mint_token("another-secret-" + "x" * 32, user_id=user)),
        "token_expired": bearer(mint_token(tokens.secret, user_id=user, ttl_seconds=-60)),
    }
    with client(api) as http:
        for code, headers in callers.items():
            response = send(http, method, path, headers)
            assert response.status_code == 401, (operation_id, code, response.text)
            assert response.json()["code"] == code
            assert not errors_in(response.json(), error_schema())


@pytest.mark.parametrize("operation_id, method, path",
                         [o for o in OPERATIONS if o[2].startswith(OPERATOR_PREFIXES)])
def test_operator_operations_refuse_a_plain_user_before_reading_the_request(
        api: str, tokens: Any, operation_id: str, method: str, path: str) -> None:
    user = uuid.uuid4()
    with client(api) as http:
        response = send(http, method, path, bearer(mint_token(tokens.secret, user_id=user)))
    assert response.status_code == 403, (operation_id, response.text)
    assert response.json()["code"] in ("admin_required", "insufficient_permissions")
    assert not errors_in(response.json(), error_schema())


NODE_CHANNEL = [o for o in OPERATIONS if o[2].startswith("/internal/v1/nodes/")]


@pytest.mark.parametrize("operation_id, method, path", NODE_CHANNEL)
def test_the_node_task_channel_takes_only_that_nodes_token(
        api: str, tokens: Any, operation_id: str, method: str, path: str) -> None:
    node, other = str(uuid.uuid4()), str(uuid.uuid4())
    concrete_path = concrete(path.replace("{node_id}", node))
    callers = {"user": mint_token(tokens.secret, user_id=uuid.uuid4()),
               "admin": tokens.admin(),
               "another node": mint_token(tokens.secret, user_id=other, actor_type="node")}
    with client(api) as http:
        for who, token in callers.items():
            response = http.request(method, concrete_path, headers=bearer(token),
                                    json={} if method == "POST" else None)
            assert response.status_code == 403, (operation_id, who, response.text)
            assert not errors_in(response.json(), error_schema())
        own = http.request(method, concrete_path, json={} if method == "POST" else None,
                           headers=bearer(mint_token(tokens.secret, user_id=node, actor_type="node")))
        assert own.status_code == (403 if method == "GET" else 400), own.text  # unknown node; empty body


def test_a_node_token_serves_nothing_but_its_task_channel(api: str, tokens: Any) -> None:
    token = mint_token(tokens.secret, user_id=uuid.uuid4(), actor_type="node")
    with client(api) as http:
        for operation_id, method, path in OPERATIONS:
            if path.startswith("/internal/"):
                continue
            response = send(http, method, path, bearer(token))
            assert response.status_code == 403, (operation_id, response.text)
            assert response.json()["code"] == "insufficient_permissions", operation_id
