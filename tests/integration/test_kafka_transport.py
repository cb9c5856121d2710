"""The Kafka transport end to end: API → event store → relay → broker → projector
group → read model, with the relay and projector as real processes, killed at the
worst moments and restarted."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
from eventsourcing.persistence import IntegrityError

from api.app import create_app
from consumers.relay import Relay
from consumers.wire import decode
from domain.billing import BillingAccount
from domain.money import Money
from projections import dead_letters as dl
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


PROVENANCE = {"actor_id": str(uuid.uuid4()), "actor_type": "user", "actor_role": "admin",
              "source": "test", "correlation_id": None, "causation_id": None}


def append_events(stores: Any, count: int) -> None:
    """``count`` events of one new billing account, in one save."""
    now = datetime.now(timezone.utc)
    account = BillingAccount.open(uuid.uuid4(), "USD", PROVENANCE, now)
    for _ in range(count - 1):
        account.adjust(direction="credit", amount=Money(100, "USD"), reason="relay",
                       adjustment_id=uuid.uuid4(), provenance=PROVENANCE, at=now)
    stores.app.save(account)


def published_ids(bootstrap: str, topic: str) -> list[int]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, consumer_timeout_ms=3000,
                             auto_offset_reset="earliest", enable_auto_commit=False)
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(3)])
        consumer.seek_to_beginning()
        decoded = [decode(message) for message in consumer]
    finally:
        consumer.close()
    return [value.id for kind, value in decoded if kind == "event"]


def test_two_relays_at_once_by_mistake_lose_nothing(
        new_database: Any, settings_for: Any, stores_for: Any, broker: Any) -> None:
    """A relay remembers its position between batches. Two started at once by mistake:
    the one recording a batch second fails (the tracking upsert never stands still or
    moves back), forgets its position, reads it again and goes on from there; a stale
    one whose batch reaches further records it (republishing what the other did)."""
    topic = f"ledgercore.test.{uuid.uuid4().hex[:8]}"
    stores = stores_for(settings_for(new_database().dsn, transport="kafka",
                                     kafka_bootstrap=broker.bootstrap, kafka_topic=topic,
                                     kafka_partitions=3))
    reads: list[str] = []
    max_tracking_id = stores.read_models.max_tracking_id

    def spied(name: str) -> int | None:
        reads.append(name)
        return max_tracking_id(name)

    stores.read_models.max_tracking_id = spied
    first, second = (Relay(stores.app, stores.read_models, broker.bootstrap, topic, 3,
                           batch_size=4) for _ in range(2))
    try:
        assert first.run_once() == 0 and second.run_once() == 0  # both at 0
        assert len(reads) == 2
        append_events(stores, 6)  # notifications 1..6
        assert first.run_once() == 4  # publishes and records 1..4
        assert len(reads) == 2  # from memory
        with pytest.raises(IntegrityError):
            second.run_once()  # publishes 1..4 again; cannot record 4 again
        assert second.run_once() == 2  # reads 4 again: 5..6
        assert len(reads) == 3
        append_events(stores, 2)  # 7..8
        assert first.run_once() == 4  # from its stale 4: 5..8, recorded (8 > 6)
        with pytest.raises(IntegrityError):
            second.run_once()  # 7..8 again; cannot record 8 again
        assert second.run_once() == 0 and first.run_once() == 0
        assert len(reads) == 4
    finally:
        first.close()
        second.close()
    assert max_tracking_id(f"relay|{topic}") == 8
    published = published_ids(broker.bootstrap, topic)
    assert set(published) == set(range(1, 9))  # duplicates, no losses
    assert sorted(published) == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8]


def test_a_broker_that_stops_answering_fails_the_batch_in_time_and_loses_nothing(
        new_database: Any, settings_for: Any, stores_for: Any, caplog: Any) -> None:
    """A batch waits at most ``publish_seconds`` for the broker, its flush included (a
    producer can otherwise wait without end, as for a restarted broker's producer id).
    With the broker stopped, the batch fails in time; once it answers again, the
    relay publishes everything, and nothing is missing."""
    import signal
    import threading

    from infra.services import Broker

    broker = Broker().start()  # its own: it is stopped below
    try:
        topic = f"ledgercore.test.{uuid.uuid4().hex[:8]}"
        stores = stores_for(settings_for(new_database().dsn, transport="kafka",
                                         kafka_bootstrap=broker.bootstrap, kafka_topic=topic,
                                         kafka_partitions=3))
        relay = Relay(stores.app, stores.read_models, broker.bootstrap, topic, 3,
                      publish_seconds=1)
        thread = threading.Thread(target=relay.run_forever, daemon=True)
        try:
            assert relay.run_once() == 0
            thread.start()
            broker.process.send_signal(signal.SIGSTOP)
            try:
                append_events(stores, 5)
                deadline = time.monotonic() + 10
                while not any("relay batch failed" in r.getMessage() for r in caplog.records):
                    assert time.monotonic() < deadline, "the batch still waits for a stopped broker"
                    time.sleep(0.1)
            finally:
                broker.process.send_signal(signal.SIGCONT)
            deadline = time.monotonic() + 90
            while (stores.read_models.max_tracking_id(f"relay|{topic}") or 0) < 5:
                assert time.monotonic() < deadline, "nothing published after the broker came back"
                time.sleep(0.2)
            assert set(published_ids(broker.bootstrap, topic)) == {1, 2, 3, 4, 5}
        finally:
            relay.stop()
            if thread.is_alive():
                thread.join(timeout=60)
            relay.close()
    finally:
        broker.stop()


def test_the_outbox_republish_check_is_due_exactly_when_there_is_work(
        new_database: Any, settings_for: Any, stores_for: Any) -> None:
    """The relay runs the republish transaction only after one query saying there is
    work: it must say yes whenever ``outbox_to_republish`` would return an event."""
    store = stores_for(settings_for(new_database().dsn)).read_models
    schema = store.datastore.schema
    a, b = uuid.uuid4(), uuid.uuid4()
    states: list[list[tuple[uuid.UUID, int, str]]] = [
        [],
        [(a, 10, "failed"), (a, 11, "parked")],
        [(a, 10, "pending"), (a, 11, "parked")],
        [(a, 10, "published"), (a, 11, "parked")],
        [(a, 10, "discarded"), (a, 11, "parked")],
        [(a, 10, "failed"), (a, 9, "parked")],
        [(a, 10, "failed"), (b, 11, "parked")],
        [(a, 10, "failed"), (a, 11, "published")],
        [(a, 10, "published"), (b, 11, "discarded")],
    ]
    answers = []
    for rows in states:
        with store.datastore.transaction(commit=True) as cur:
            cur.execute(f"DELETE FROM {schema}.outbox_failed")
            for aggregate, notification_id, status in rows:
                cur.execute(
                    f"INSERT INTO {schema}.outbox_failed (event_id, notification_id,"
                    " originator_id, originator_version, event_topic, aggregate_type, payload,"
                    " error, status, retry_count, occurred_at) VALUES (%s, %s, %s, 1, 't', 'A',"
                    " '{}', 'e', %s, 1, now())",
                    (uuid.uuid4(), notification_id, aggregate, status))
        with store.datastore.cursor() as cur:
            due = dl.outbox_republish_due(cur, schema)
        with store.datastore.transaction(commit=False) as cur:  # what the work would do
            work = bool(dl.outbox_to_republish(cur, schema))
        assert due == work, rows
        answers.append(due)
    assert answers == [False, False, True, True, True, True, True, False, False]
