"""The hot routes (``api/hot_routes.py``) answer exactly what FastAPI answers.

Two real servers share one database: one serves ``adminAdjustBalance`` hot, the other
with ``hot_routes`` off, so every request goes through FastAPI's routing. Each case
sends the same requests to both, each for a user of its own, and the answers must be
the same (status, body, headers), except the correlation id and the log position.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from api.app import create_app
from tests.harness import ServerThread, bearer, client

PATH = "/api/v1/admin/users/{user}/balance"
CREDIT = {"direction": "credit", "amount_minor": 300, "currency": "USD", "reason": "goodwill"}
DEBIT = {**CREDIT, "direction": "debit", "amount_minor": 500}
JSON = {"Content-Type": "application/json"}
#: headers whose value must be the same on both servers (when either sends one)
COMPARED_HEADERS = ("content-type", "idempotent-replayed", "allow", "www-authenticate")


@pytest.fixture(scope="module")
def servers(shared_database: Any, services: Any) -> Iterator[tuple[Any, Any]]:
    from infra.db import Stores
    from tests.conftest import make_settings

    hot_settings = make_settings(services, shared_database.dsn)
    plain_settings = make_settings(services, shared_database.dsn, hot_routes=False,
                                   run_projector=False)
    hot_stores, plain_stores = Stores.open(hot_settings), Stores.open(plain_settings)
    hot_app, plain_app = create_app(hot_settings, hot_stores), create_app(plain_settings, plain_stores)
    assert plain_app.state.hot_routes is None
    with ServerThread(hot_app) as hot, ServerThread(plain_app) as plain:
        yield (hot.url, hot_app.state.hot_routes), (plain.url, None)
    hot_stores.close()
    plain_stores.close()


def answer(response: Any) -> tuple[int, Any, dict[str, str]]:
    try:
        body = response.json()
    except ValueError:
        body = response.text
    if isinstance(body, dict):
        body.pop("correlation_id", None)
    headers = {name: response.headers[name] for name in COMPARED_HEADERS if name in response.headers}
    headers["x-ledger-position"] = "x-ledger-position" in response.headers
    return response.status_code, body, headers


def exchange(base: str, requests: list[tuple[str, dict[str, str], bytes]]) -> list[Any]:
    """The answers to ``requests``, for a user of their own; ``{key}`` in a header
    becomes a key of their own too (keys are scoped to the caller, who is the same
    admin on both servers)."""
    user, key = uuid.uuid4(), uuid.uuid4().hex
    with client(base) as http:
        return [answer(http.post(path.format(user=user, USER=str(user).upper(), HEX=user.hex),
                                 content=content,
                                 headers={k: v.replace("{key}", key) for k, v in headers.items()}))
                for path, headers, content in requests]


def body(value: Any) -> bytes:
    return json.dumps(value).encode()


def cases(admin: str, user_token: str) -> dict[str, list[tuple[str, dict[str, str], bytes]]]:
    auth = {**bearer(admin), **JSON}
    return {
        "credit": [(PATH, auth, body(CREDIT))],
        "credit then a covered debit": [(PATH, auth, body({**CREDIT, "amount_minor": 900})),
                                        (PATH, auth, body(DEBIT))],
        "a debit the balance does not cover": [(PATH, auth, body(CREDIT)), (PATH, auth, body(DEBIT))],
        "the user id in capitals": [(PATH.replace("{user}", "{USER}"), auth, body(CREDIT))],
        "the user id without dashes": [(PATH.replace("{user}", "{HEX}"), auth, body(CREDIT))],
        "a user id that is not one": [(PATH.replace("{user}", "not-a-uuid"), auth, body(CREDIT))],
        "a body that is not JSON": [(PATH, auth, b"{direction: credit")],
        "an empty body": [(PATH, auth, b"")],
        "a field the schema does not have": [(PATH, auth, body({**CREDIT, "extra": 1}))],
        "a float amount": [(PATH, auth, b'{"direction":"credit","amount_minor":300.0,'
                                        b'"currency":"USD","reason":"r"}')],
        "an amount given as a string": [(PATH, auth, body({**CREDIT, "amount_minor": "300"}))],
        "a zero amount": [(PATH, auth, body({**CREDIT, "amount_minor": 0}))],
        "an unknown direction": [(PATH, auth, body({**CREDIT, "direction": "sideways"}))],
        "a missing reason": [(PATH, auth, body({k: v for k, v in CREDIT.items() if k != "reason"}))],
        "a currency nobody knows": [(PATH, auth, body({**CREDIT, "currency": "XQQ"}))],
        "a lowercase currency": [(PATH, auth, body({**CREDIT, "currency": "usd"}))],
        "a JSON array": [(PATH, auth, b"[1, 2]")],
        "text/plain": [(PATH, {**bearer(admin), "Content-Type": "text/plain"}, body(CREDIT))],
        "JSON with a charset": [(PATH, {**bearer(admin),
                                        "Content-Type": "application/json; charset=utf-8"},
                                 body(CREDIT))],
        "no content type": [(PATH, bearer(admin), body(CREDIT))],
        "no token": [(PATH, JSON, body(CREDIT))],
        "a token that is not one": [(PATH, {**JSON, **bearer("nonsense")}, body(CREDIT))],
        "a user's token": [(PATH, {**bearer(user_token), **JSON}, body(CREDIT))],
        "a user's token and a bad body": [(PATH, {**bearer(user_token), **JSON}, b"nope")],
        "an Idempotency-Key replayed": [(PATH, {**auth, "Idempotency-Key": "k1-{key}"}, body(CREDIT))] * 3,
        "an Idempotency-Key reused with another body": [
            (PATH, {**auth, "Idempotency-Key": "k2-{key}"}, body(CREDIT)),
            (PATH, {**auth, "Idempotency-Key": "k2-{key}"}, body({**CREDIT, "amount_minor": 301}))],
        "an Idempotency-Key too long": [(PATH, {**auth, "Idempotency-Key": "{key}" + "k" * 129}, body(CREDIT))],
        "a refused debit replayed by its key": [
            (PATH, {**auth, "Idempotency-Key": "k3-{key}"}, body(DEBIT)),
            (PATH, auth, body({**CREDIT, "amount_minor": 900})),
            (PATH, {**auth, "Idempotency-Key": "k3-{key}"}, body(DEBIT))],
        "another path under the same prefix": [(PATH + "/extra", auth, body(CREDIT))],
    }


NAMES = list(cases("", ""))


@pytest.mark.parametrize("name", NAMES)
def test_a_hot_route_answers_what_fastapi_answers(servers: Any, tokens: Any, name: str) -> None:
    (hot_url, hot_routes), (plain_url, _) = servers
    requests = cases(tokens.admin(), tokens.user(uuid.uuid4()))[name]
    served_before = hot_routes.served
    hot = exchange(hot_url, requests)
    plain = exchange(plain_url, requests)
    assert hot == plain
    assert all(status < 500 for status, _, _ in hot)
    if name in ("credit", "credit then a covered debit", "a debit the balance does not cover",
                "an Idempotency-Key replayed", "a currency nobody knows"):
        # these are well-formed: the hot route answered them itself
        assert hot_routes.served - served_before == len(requests)


def test_the_hot_route_is_the_operation_fastapi_serves(servers: Any) -> None:
    (_, hot_routes), _ = servers
    [route] = hot_routes.routes
    assert route.method == "POST"
    assert route.pattern.pattern.startswith(r"/api/v1/admin/users/(?P<user_id>")
    assert route.endpoint.__name__ == "admin_adjust_balance"
