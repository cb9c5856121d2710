"""Input limits on every implemented operation they apply to, each refused with a clear
``ErrorResponse``: ``page_size`` outside 1..200 on every paginated list, a body over the
size limit on every operation that takes one, and an ``X-Request-Id`` over 128
characters anywhere."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from api.app import create_app, implemented_routes
from api.auth import mint_token
from api.contract import contract
from tests.contract.schemas import error_schema, errors_in
from tests.contract.test_auth_matrix import concrete
from tests.harness import ServerThread, bearer, client

PROJECT = uuid.uuid4()


@pytest.fixture(scope="module")
def api(shared_database: Any, services: Any) -> Iterator[str]:
    from tests.conftest import make_settings

    with ServerThread(create_app(make_settings(services, shared_database.dsn))) as server:
        yield server.url


def parameters(method: str, path: str) -> set[str]:
    operation = contract()["paths"][path][method.lower()]
    return {p.get("$ref", "").rsplit("/", 1)[-1] or p.get("name", "") for p in operation.get("parameters", [])}


ROUTES = sorted(implemented_routes().items())
PAGED = [(op, m, p) for op, (m, p) in ROUTES if "PageSize" in parameters(m, p)]
WITH_BODY = [(op, m, p) for op, (m, p) in ROUTES
             if "requestBody" in contract()["paths"][p][m.lower()]]


def caller(tokens: Any) -> dict[str, str]:
    token = mint_token(tokens.secret, user_id=uuid.uuid4(), tenant_id=uuid.uuid4(), role="admin",
                       platform_roles=["platform_superadmin"], project_ids=[str(PROJECT)])
    return {**bearer(token), "X-Project-ID": str(PROJECT)}


def refused(response: Any, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert not errors_in(response.json(), error_schema())
    return response.json()


@pytest.mark.parametrize("operation_id, method, path", PAGED)
def test_page_size_outside_1_to_200_is_refused(api: str, tokens: Any, operation_id: str,
                                               method: str, path: str) -> None:
    with client(api) as http:
        for size in (0, 201, -1):
            body = refused(http.request(method, concrete(path), params={"page_size": size},
                                        headers=caller(tokens)))
            assert "page_size" in str(body.get("details")), (operation_id, size, body)


@pytest.mark.parametrize("operation_id, method, path", WITH_BODY)
def test_an_oversized_body_is_refused_before_anything_else(api: str, tokens: Any,
                                                          operation_id: str, method: str,
                                                          path: str) -> None:
    oversized = b'{"reason": "' + b"x" * 70_000 + b'"}'
    with client(api) as http:
        response = http.request(method, concrete(path), content=oversized,
                                headers={**caller(tokens), "Content-Type": "application/json"})
    assert refused(response)["details"]["reason"] == "body_too_large", operation_id


def test_a_request_id_over_128_characters_is_refused(api: str, tokens: Any) -> None:
    with client(api) as http:
        for operation_id, (method, path) in ROUTES:
            if method != "GET" or "{" in path:
                continue
            response = http.request(method, path, headers={**caller(tokens),
                                                           "X-Request-Id": "r" * 129})
            assert refused(response)["code"] == "validation_error", operation_id
