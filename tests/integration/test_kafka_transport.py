"""The Kafka transport end to end: API → event store → relay → broker → projector
group → read model, with the relay and projector as real processes, killed at the
worst moments and restarted."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from api.app import create_app
from tests.harness import CliProcess, ServerThread, bearer, client

pytestmark = pytest.mark.kafka


@pytest.fixture
def kafka_env(new_database: Any, settings_for: Any, stores_for: Any, broker: Any,
              tmp_path: Any) -> Iterator[Any]:
    database = new_database()
    topic = f"ledgercore.test.{uuid.uuid4().hex[:8]}"
    settings = settings_for(database.dsn, transport="kafka", kafka_bootstrap=broker.bootstrap,
                            kafka_topic=topic, kafka_partitions=3, read_wait_seconds=60)
    stores = stores_for(settings)
    env = {"LEDGERCORE_PG_DSN": database.dsn, "LEDGERCORE_KAFKA_BOOTSTRAP": broker.bootstrap,
           "LEDGERCORE_TRANSPORT": "kafka", "LEDGERCORE_KAFKA_TOPIC": topic,
           "LEDGERCORE_KAFKA_PARTITIONS": "3", "LEDGERCORE_JWT_SECRET": settings.jwt_secret,
           "LEDGERCORE_KAFKA_GROUP": f"projectors-{topic}", "LEDGERCORE_DATA_DIR": str(tmp_path)}
    processes: list[CliProcess] = []

    def spawn(command: str, fault: str | None = None) -> CliProcess:
        extra = {"LEDGERCORE_TEST_FAULT": fault} if fault else {}
        processes.append(CliProcess([command], {**env, **extra}, command).start())
        return processes[-1]

    with ServerThread(create_app(settings, stores)) as server:
        yield server.url, stores, spawn
    for process in processes:
        process.stop()


def credit(http: Any, admin: str, user: uuid.UUID, amount: int, direction: str = "credit") -> Any:
    return http.post(f"/api/v1/admin/users/{user}/balance", headers=bearer(admin),
                     json={"direction": direction, "amount_minor": amount, "currency": "USD",
                           "reason": "kafka"})


def read(http: Any, token: str, position: str) -> Any:
    return http.get("/api/v1/billing/balance",
                    headers={**bearer(token), "X-Ledger-Position": position})


def ledger_rows(stores: Any) -> tuple[int, dict[Any, int], dict[Any, int]]:
    with stores.query_pool.connection() as conn:
        entries = conn.execute("SELECT count(*) AS n FROM readmodels.ledger_entries").fetchone()["n"]
        sums = {r["owner_user_id"]: r["s"] for r in conn.execute(
            "SELECT owner_user_id, sum(amount_minor) AS s FROM readmodels.ledger_entries"
            " GROUP BY owner_user_id")}
        balances = {r["owner_user_id"]: r["amount_minor"] for r in conn.execute(
            "SELECT owner_user_id, amount_minor FROM readmodels.balances WHERE currency='USD'")}
    return entries, sums, balances


def test_credit_debit_balance_through_kafka(kafka_env: Any, tokens: Any) -> None:
    base, stores, spawn = kafka_env
    spawn("relay")
    spawn("project")
    users = [uuid.uuid4() for _ in range(5)]
    with client(base) as http:
        last = None
        for n, user in enumerate(users):
            assert credit(http, tokens.admin(), user, 100 + n).status_code == 200
            last = credit(http, tokens.admin(), user, 30, "debit")
            assert last.status_code == 200
        for n, user in enumerate(users):
            response = read(http, tokens.user(user), last.headers["X-Ledger-Position"])
            assert response.status_code == 200
            assert response.headers["X-Read-Model-Cache"] != "stale"
            assert response.json()["balance"]["amount_minor"] == 70 + n


def wait_exit(process: CliProcess, timeout: float = 60) -> int:
    try:
        return process.wait(timeout)
    except Exception:
        pytest.fail(f"{process.name} did not crash as injected:\n{process.output()[-3000:]}")


def test_killed_relay_and_projector_lose_nothing_and_double_count_nothing(
        kafka_env: Any, tokens: Any) -> None:
    base, stores, spawn = kafka_env
    users = [uuid.uuid4() for _ in range(4)]
    expected: dict[uuid.UUID, int] = {}
    with client(base) as http:
        for round_ in range(3):
            for n, user in enumerate(users):
                assert credit(http, tokens.admin(), user, 10 * (n + 1)).status_code == 200
                expected[user] = expected.get(user, 0) + 10 * (n + 1)

        # The relay publishes a batch, the broker acknowledges, and it dies before
        # recording its position: the batch will be published again.
        assert wait_exit(spawn("relay", fault="relay_after_publish")) == 137
        assert stores.read_models.max_tracking_id(f"relay|{stores.settings.kafka_topic}") is None

        # The projector commits a view transaction and dies before committing the
        # Kafka offset: the batch will be delivered again.
        assert wait_exit(spawn("project", fault="projector_after_view_commit")) == 137
        entries, _, _ = ledger_rows(stores)
        assert entries > 0

        # More writes while both are down, then both come back.
        for user in users:
            last = credit(http, tokens.admin(), user, 1)
            expected[user] += 1
        spawn("relay")
        spawn("project")
        for user in users:
            response = read(http, tokens.user(user), last.headers["X-Ledger-Position"])
            assert response.headers["X-Read-Model-Cache"] != "stale"
            assert response.json()["balance"]["amount_minor"] == expected[user]

    entries, sums, balances = ledger_rows(stores)
    assert entries == len(users) * 4  # 3 rounds + 1, each applied exactly once
    assert sums == balances == {u: expected[u] for u in users}
    for user in users:
        assert stores.app.billing_account(user).balances == {"USD": expected[user]}
