"""Poison events: an event a read model cannot apply lands in the dead-letter queue, the
projector goes on with everything else, and a requeue after the fix applies it once.
Both transports, through HTTP; plus the relay's failed outbox (an event too large for
the broker) with requeue and discard."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import StoredEvent
from eventsourcing.utils import _topic_cache, _type_cache, register_topic

from api.app import create_app, implemented_routes
from consumers.kafka_projector import KafkaProjector, dlq_topic
from consumers.relay import Relay
from projections import dead_letters as dl
from projections.billing_ledger import BillingLedger
from tests.conftest import serve_own_database
from tests.contract.test_contract import check
from tests.harness import ServerThread, bearer, client

POISON = "poison: this reason breaks the billing_ledger read model"
BASE = "/api/v1/admin"
V3 = "/api/v1/v3/platform/ops"


class GpuRetagged(Aggregate.Event):
    """An event class of a newer ledgercore: the running version has no such topic."""

    TOPIC = "ledgercore.test.GpuRetagged"
    label: str
    provenance: dict[str, Any]


@pytest.fixture
def faulty_billing_ledger(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """The billing_ledger read model refuses any adjustment whose reason is POISON (a
    stand-in for a projection bug); calling the returned function is the fix."""
    original = BillingLedger.apply_many

    def apply_many(self: Any, cur: Any, schema: str, items: Any) -> None:
        for item in items:
            if getattr(item.event, "reason", None) == POISON:
                raise ValueError("billing_ledger cannot apply this adjustment")
        original(self, cur, schema, items)

    monkeypatch.setattr(BillingLedger, "apply_many", apply_many)
    return lambda: monkeypatch.setattr(BillingLedger, "apply_many", original)


ROUTES = implemented_routes()


def conforms(operation_id: str, response: Any) -> None:
    """The response is what the contract declares for that operation and status."""
    method, path = ROUTES[operation_id]
    check(method.lower(), path, response)


def credit(http: Any, admin: str, user: uuid.UUID, amount: int, reason: str = "test") -> Any:
    response = http.post(f"/api/v1/admin/users/{user}/balance", headers=bearer(admin),
                         json={"direction": "credit", "amount_minor": amount, "currency": "USD",
                               "reason": reason})
    assert response.status_code == 200, response.text
    return response


def balance(http: Any, tokens: Any, user: uuid.UUID, position: str | None = None) -> int:
    headers = bearer(tokens.user(user))
    if position:
        headers["X-Ledger-Position"] = position
    response = http.get("/api/v1/billing/balance", headers=headers)
    assert response.status_code == 200, response.text
    if position:
        assert response.headers["X-Read-Model-Cache"] != "stale"
    return response.json()["balance"]["amount_minor"]


def eventually(probe: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not reached in {timeout} s (last: {value!r})")
        time.sleep(0.1)


def dlq(http: Any, admin: str, prefix: str = BASE, **params: Any) -> list[dict[str, Any]]:
    response = http.get(f"{prefix}/dlq/messages", headers=bearer(admin), params=params)
    assert response.status_code == 200, response.text
    conforms("adminListDLQMessages" if prefix == BASE else "listV3PlatformOpsDLQMessagesCompat",
          response)
    return response.json()["items"]


def overview(http: Any, admin: str) -> dict[str, Any]:
    response = http.get("/api/v1/admin/ops/overview", headers=bearer(admin))
    assert response.status_code == 200, response.text
    conforms("adminGetOpsOverview", response)
    return response.json()


def ledger_entries(stores: Any, user: uuid.UUID) -> list[int]:
    with stores.query_pool.connection() as conn:
        return [r["amount_minor"] for r in conn.execute(
            "SELECT amount_minor FROM readmodels.ledger_entries WHERE owner_user_id = %s"
            " ORDER BY seq", (user,))]


def poison_then_recover(http: Any, tokens: Any, stores: Any, fix: Callable[[], None]) -> None:
    """The scenario both transports must pass."""
    admin = tokens.admin()
    a, b = uuid.uuid4(), uuid.uuid4()
    credit(http, admin, a, 100)
    credit(http, admin, a, 50, POISON)
    credit(http, admin, a, 7)  # same aggregate after the poison: parked behind it
    last = credit(http, admin, b, 30)  # another aggregate: goes on

    # the projector kept going: b's balance, and a's up to the poison event
    assert balance(http, tokens, b, last.headers["X-Ledger-Position"]) == 30
    assert balance(http, tokens, a) == 100
    messages = eventually(lambda: dlq(http, admin))
    assert len(messages) == 1
    message = messages[0]
    assert message["subject"] == "dlq.ledgercore.billing_ledger"
    assert message["event_type"] == "BalanceAdjusted"
    assert message["requeue_enabled"] is True
    letter = message["payload"]["_dead_letter"]
    assert letter["projection"] == "billing_ledger"
    assert letter["aggregate_id"] == str(stores.app.billing_account(a).id)
    assert "cannot apply this adjustment" in letter["error"]
    assert letter["parked_events"] == 1
    assert message["payload"]["reason"] == POISON
    assert dlq(http, admin, subject_prefix="dlq.ledgercore.payments") == []
    assert len(dlq(http, admin, V3, subject_prefix="dlq.ledgercore.billing")) == 1
    ops = overview(http, admin)
    assert ops["queue_depth"]["dlq_pending"] == 2  # the poison event and the one behind it
    assert ops["service_health"]["billing_worker_ok"] is False
    assert ops["service_health"]["provisioning_worker_ok"] is True

    seq = message["stream_seq"]
    # requeued before the fix: it fails again and is back, with a second attempt
    first = http.post(f"{BASE}/dlq/messages/{seq}/requeue", headers=bearer(admin))
    assert first.status_code == 200, first.text
    conforms("adminRequeueDLQMessage", first)
    assert first.json()["status"] == "requeued"
    assert first.json()["target_subject"] == message["original_topic"]
    again = eventually(lambda: [m for m in dlq(http, admin)
                                if m["payload"]["_dead_letter"]["attempts"] == 2])
    assert again[0]["stream_seq"] == seq
    assert balance(http, tokens, a) == 100

    fix()
    key = {"Idempotency-Key": f"requeue-{seq}"}
    requeued = http.post(f"{BASE}/dlq/messages/{seq}/requeue", headers={**bearer(admin), **key})
    assert requeued.status_code == 200, requeued.text
    replay = http.post(f"{BASE}/dlq/messages/{seq}/requeue", headers={**bearer(admin), **key})
    assert replay.status_code == 200 and replay.json() == requeued.json()
    assert replay.headers.get("Idempotent-Replayed") == "true"
    eventually(lambda: balance(http, tokens, a) == 157)
    assert ledger_entries(stores, a) == [100, 50, 7]  # each applied once, in order
    assert dlq(http, admin) == []
    # a requeue of what is no longer pending: 409; an unknown one: 404
    conflict = http.post(f"{V3}/dlq/messages/{seq}/requeue", headers=bearer(admin))
    assert conflict.status_code == 409
    conforms("requeueV3PlatformOpsDLQMessageCompat", conflict)
    missing = http.post(f"{BASE}/dlq/messages/{seq + 10_000}/requeue", headers=bearer(admin))
    assert missing.status_code == 404
    conforms("adminRequeueDLQMessage", missing)
    # later events of a keep flowing normally
    last = credit(http, admin, a, 1)
    assert balance(http, tokens, a, last.headers["X-Ledger-Position"]) == 158
    assert ledger_entries(stores, a) == [100, 50, 7, 1]
    eventually(lambda: overview(http, admin)["queue_depth"]["dlq_pending"] == 0)
    assert overview(http, admin)["service_health"]["billing_worker_ok"] is True
    with stores.query_pool.connection() as conn:
        actions = conn.execute("SELECT action, result, actor_id FROM readmodels.pipeline_actions"
                               " ORDER BY id").fetchall()
    assert [(r["action"], r["result"]) for r in actions] == [
        ("ops.dlq.requeue", "success"), ("ops.dlq.requeue", "success"),
        ("ops.dlq.requeue", "failure"), ("ops.dlq.requeue", "failure")]
    assert {r["actor_id"] for r in actions} == {str(tokens.admin_id)}


# ---- the direct transport -------------------------------------------------------------
@pytest.fixture
def served(services: Any) -> Iterator[Any]:
    with serve_own_database(services) as served:
        yield served


def test_direct_poison_is_dead_lettered_and_requeued_once(
        served: Any, tokens: Any, faulty_billing_ledger: Callable[[], None]) -> None:
    with client(served.url) as http:
        poison_then_recover(http, tokens, served.stores, faulty_billing_ledger)


def unknown_event(stores: Any) -> tuple[uuid.UUID, StoredEvent]:
    """A stored event of a class this version does not know (written by a newer one)."""
    event = GpuRetagged(originator_id=uuid.uuid4(), originator_version=1,
                        timestamp=datetime.now(timezone.utc), label="a100-spot",
                        provenance={"correlation_id": "future-version", "source": "system"})
    stored = stores.app.mapper.to_stored_event(event)
    _topic_cache.pop(GpuRetagged.TOPIC, None)
    _type_cache.pop(GpuRetagged, None)
    return event.originator_id, stored


def test_direct_unknown_event_class_is_dead_lettered_for_every_read_model(
        served: Any, tokens: Any) -> None:
    stores, admin = served.stores, tokens.admin()
    user = uuid.uuid4()
    with client(served.url) as http:
        credit(http, admin, user, 10)
        _, stored = unknown_event(stores)
        stores.app.recorder.insert_events([stored])
        last = credit(http, admin, user, 5)
        # the projector went past the unreadable event
        assert balance(http, tokens, user, last.headers["X-Ledger-Position"]) == 15
        models = [p.name for p in stores.read_models.projections]
        messages = eventually(lambda: len(dlq(http, admin)) == len(models) and dlq(http, admin))
        assert {m["subject"] for m in messages} == {f"dlq.ledgercore.{n}" for n in models}
        assert {m["event_type"] for m in messages} == {"GpuRetagged"}
        assert {m["correlation_id"] for m in messages} == {"future-version"}
        assert all("TopicError" in m["payload"]["_dead_letter"]["error"] for m in messages)
        assert overview(http, admin)["queue_depth"]["dlq_pending"] == len(models)

        # an operator decides the billing ledger never needs it
        ledger = next(m for m in messages if m["subject"].endswith(".billing_ledger"))
        seq = ledger["stream_seq"]
        discarded = http.post(f"{V3}/dlq/messages/{seq}/discard", headers=bearer(admin))
        assert discarded.status_code == 200, discarded.text
        conforms("discardV3PlatformOpsDLQMessageCompat", discarded)
        assert discarded.json() == {"ok": True, "stream_seq": seq, "status": "discarded",
                                    "target_subject": None}
        twice = http.post(f"{BASE}/dlq/messages/{seq}/discard", headers=bearer(admin))
        assert twice.status_code == 200 and twice.json()["status"] == "discarded"
        refused = http.post(f"{BASE}/dlq/messages/{seq}/requeue", headers=bearer(admin))
        assert refused.status_code == 409
        conforms("adminRequeueDLQMessage", refused)
        assert len(dlq(http, admin)) == len(models) - 1

        # the fix: this version learns the class; requeue the rest, each applies once
        register_topic(GpuRetagged.TOPIC, GpuRetagged)
        for message in dlq(http, admin):
            response = http.post(f"{BASE}/dlq/messages/{message['stream_seq']}/requeue",
                                 headers=bearer(admin))
            assert response.status_code == 200, response.text
        assert dlq(http, admin) == []

        def statuses() -> dict[str, int]:
            with stores.query_pool.connection() as conn:
                rows = conn.execute("SELECT status, count(*) AS n FROM readmodels.dead_letters"
                                    " GROUP BY status").fetchall()
            return {r["status"]: r["n"] for r in rows}

        eventually(lambda: statuses() == {"applied": len(models) - 1, "discarded": 1})
        assert overview(http, admin)["queue_depth"]["dlq_pending"] == 0
        last = credit(http, admin, user, 1)
        assert balance(http, tokens, user, last.headers["X-Ledger-Position"]) == 16


def test_operator_endpoints_refuse_plain_users_and_unknown_ids(served: Any, tokens: Any) -> None:
    admin, user = tokens.admin(), tokens.user(uuid.uuid4())
    with client(served.url) as http:
        for path in (f"{BASE}/dlq/messages", f"{BASE}/outbox/failed", f"{BASE}/ops/overview"):
            assert http.get(path, headers=bearer(user)).status_code == 403
            assert http.get(path).status_code == 401
        event = uuid.uuid4()
        for prefix, op in ((BASE, "adminRequeueOutboxEvent"),
                           (V3, "requeueV3PlatformOpsOutboxEventCompat")):
            response = http.post(f"{prefix}/outbox/{event}/requeue", headers=bearer(admin))
            assert response.status_code == 404
            conforms(op, response)
        assert http.post(f"{BASE}/outbox/{event}/discard",
                         headers=bearer(user)).status_code == 403
        assert http.post(f"{BASE}/dlq/messages/0/discard",
                         headers=bearer(admin)).status_code == 400
        assert http.post(f"{V3}/dlq/messages/5/discard", headers=bearer(admin)).status_code == 404
        listed = http.get(f"{V3}/outbox/failed", headers=bearer(admin), params={"page_size": 1})
        assert listed.status_code == 200
        conforms("listV3PlatformOpsFailedOutboxEventsCompat", listed)
        assert listed.json() == {"items": [], "pagination": {"next_cursor": None, "page_size": 1}}
        ops = overview(http, admin)
        assert ops["queue_depth"] == {"outbox_pending": 0, "dlq_pending": 0,
                                      "dlq_runbook_id": None}
        assert ops["service_health"]["outbox_relay_ok"] is True


def test_the_requeue_check_is_due_exactly_when_there_is_work(
        new_database: Any, settings_for: Any, stores_for: Any) -> None:
    """Projectors skip the requeue work after one query saying there is none: it must say
    yes whenever something is requeued or ``release_orphans`` would release an event."""
    store = stores_for(settings_for(new_database().dsn)).read_models
    schema = store.datastore.schema
    a, b = uuid.uuid4(), uuid.uuid4()
    states: list[list[tuple[str, uuid.UUID, int, str]]] = [
        [],
        [("billing_ledger", a, 10, "pending"), ("billing_ledger", a, 11, "parked")],
        [("billing_ledger", a, 10, "requeued"), ("billing_ledger", a, 11, "parked")],
        [("billing_ledger", a, 10, "applied"), ("billing_ledger", a, 11, "parked")],
        [("billing_ledger", a, 10, "discarded"), ("billing_ledger", a, 11, "parked")],
        [("billing_ledger", a, 10, "pending"), ("billing_ledger", a, 9, "parked")],
        [("billing_ledger", a, 10, "pending"), ("payments", a, 11, "parked")],
        [("billing_ledger", a, 10, "pending"), ("billing_ledger", b, 11, "parked")],
        [("billing_ledger", a, 10, "pending"), ("billing_ledger", a, 11, "applied")],
    ]
    answers = []
    for rows in states:
        with store.datastore.transaction(commit=True) as cur:
            cur.execute(f"DELETE FROM {schema}.dead_letters")
            for projection, aggregate, notification_id, status in rows:
                cur.execute(
                    f"INSERT INTO {schema}.dead_letters (projection, source, notification_id,"
                    " originator_id, originator_version, event_topic, payload, first_seen,"
                    " last_seen, attempts, status) VALUES (%s, 'log', %s, %s, 1, 't', '{}',"
                    " now(), now(), 1, %s)", (projection, notification_id, aggregate, status))
        with store.datastore.cursor() as cur:
            due = dl.requeue_due(cur, schema)
        with store.datastore.transaction(commit=False) as cur:  # what the work would do
            dl.release_orphans(cur, schema)
            work = cur.rowcount > 0 or bool(dl.requeued_projections(cur, schema))
        assert due == work, rows
        answers.append(due)
    assert answers == [False, False, True, True, True, True, True, True, False]


# ---- the Kafka transport --------------------------------------------------------------
class Worker:
    """A relay or projector running in a thread of this process (so a fault patched
    into a projection here reaches it)."""

    def __init__(self, worker: Any):
        self.worker = worker
        self.thread = threading.Thread(target=worker.run_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.worker.stop()
        self.thread.join(timeout=15)
        self.worker.close()


@pytest.fixture
def kafka_served(new_database: Any, settings_for: Any, stores_for: Any, broker: Any
                 ) -> Iterator[Any]:
    database = new_database()
    topic = f"ledgercore.test.{uuid.uuid4().hex[:8]}"
    settings = settings_for(database.dsn, transport="kafka", kafka_bootstrap=broker.bootstrap,
                            kafka_topic=topic, kafka_partitions=2, read_wait_seconds=60)
    stores = stores_for(settings)
    workers: list[Worker] = []

    def start(relay: bool = True) -> None:
        if relay:
            workers.append(Worker(Relay(stores.app, stores.read_models, broker.bootstrap,
                                        topic, 2)))
        workers.append(Worker(KafkaProjector(stores.app.mapper, stores.read_models,
                                             broker.bootstrap, topic, 2,
                                             group_id=f"projectors-{topic}")))

    with ServerThread(create_app(settings, stores)) as server:
        yield server.url, stores, start, broker, topic
    for worker in workers:
        worker.stop()


@pytest.mark.kafka
def test_kafka_poison_is_dead_lettered_published_to_dlq_topic_and_requeued_once(
        kafka_served: Any, tokens: Any, faulty_billing_ledger: Callable[[], None]) -> None:
    from kafka import KafkaConsumer, TopicPartition

    base, stores, start, broker, topic = kafka_served
    start()
    with client(base) as http:
        poison_then_recover(http, tokens, stores, faulty_billing_ledger)
        with stores.query_pool.connection() as conn:
            row = conn.execute("SELECT * FROM readmodels.dead_letters WHERE status = 'applied'"
                               " AND NOT late AND projection = 'billing_ledger'").fetchone()
        assert row["kafka_topic"] == topic and row["kafka_offset"] is not None
        assert row["source"] == f"kafka:{topic}/{row['kafka_partition']}"
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, consumer_timeout_ms=5000,
                             auto_offset_reset="earliest", enable_auto_commit=False)
    try:
        consumer.assign([TopicPartition(dlq_topic(topic), 0)])
        consumer.seek_to_beginning()
        published = [dict(m.headers) for m in consumer]
    finally:
        consumer.close()
    # the poison message, as it was consumed, with why and where it came from
    assert len(published) == 1 and published[0]["dlq_projection"] == b"billing_ledger"
    assert b"cannot apply this adjustment" in published[0]["dlq_error"]
    assert published[0]["dlq_original"].startswith(f"{topic}/".encode())


@pytest.mark.kafka
def test_kafka_relay_parks_an_unpublishable_event_and_requeue_delivers_it_once(
        kafka_served: Any, tokens: Any) -> None:
    base, stores, start, broker, topic = kafka_served
    relays: list[Worker] = []

    def start_relay(max_bytes: int | None) -> None:
        relays.append(Worker(Relay(stores.app, stores.read_models, broker.bootstrap, topic, 2,
                                   max_request_size=max_bytes)))

    def stop_relay() -> None:
        relays.pop().stop()

    start(relay=False)
    start_relay(3000)  # a broker limit this event exceeds
    admin, user, other, third = tokens.admin(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    try:
        with client(base) as http:
            credit(http, admin, user, 10)
            credit(http, admin, user, 20, "x" * 4000)  # too large to publish
            credit(http, admin, third, 40, "y" * 4000)  # too large, and will be discarded
            last = credit(http, admin, other, 5)
            # the relay went on past it
            assert balance(http, tokens, other, last.headers["X-Ledger-Position"]) == 5
            failed = http.get(f"{BASE}/outbox/failed", headers=bearer(admin))
            conforms("adminListFailedOutboxEvents", failed)
            items = failed.json()["items"]
            assert len(items) == 2
            item, doomed = items  # by occurred_at
            assert item["event_type"] == "BalanceAdjusted"
            assert item["aggregate_type"] == "BillingAccount"
            assert item["aggregate_id"] == str(stores.app.billing_account(user).id)
            assert item["retry_count"] == 1 and "MessageSizeTooLarge" in item["payload"]["_outbox"]["error"]
            assert len(item["payload"]["reason"]) == 200  # summarised, not the whole payload
            assert ledger_entries(stores, user) == [10]

            credit(http, admin, user, 3)  # parked behind the failed one (same aggregate)
            # not yet relayed: the parked event (failed ones are listed, not pending)
            eventually(lambda: overview(http, admin)["queue_depth"]["outbox_pending"] == 1)
            # the third user's event is discarded: it leaves the list, is never delivered
            discarded = http.post(f"{BASE}/outbox/{doomed['id']}/discard", headers=bearer(admin))
            assert discarded.status_code == 200, discarded.text
            conforms("adminDiscardOutboxEvent", discarded)
            assert discarded.json()["status"] == "discarded"
            listed = http.get(f"{BASE}/outbox/failed", headers=bearer(admin)).json()["items"]
            assert [i["id"] for i in listed] == [item["id"]]
            # the fix: the relay restarts with the broker's real limit; the operator requeues
            stop_relay()
            requeued = http.post(f"{BASE}/outbox/{item['id']}/requeue", headers=bearer(admin))
            assert requeued.status_code == 200, requeued.text
            conforms("adminRequeueOutboxEvent", requeued)
            assert requeued.json() == {"ok": True, "outbox_event_id": item["id"], "status": "pending"}
            again = http.post(f"{BASE}/outbox/{item['id']}/requeue", headers=bearer(admin))
            assert again.status_code == 409
            conforms("adminRequeueOutboxEvent", again)
            start_relay(None)
            eventually(lambda: ledger_entries(stores, user) == [10, 20, 3])
            assert balance(http, tokens, user) == 33
            empty = http.get(f"{V3}/outbox/failed", headers=bearer(admin))
            assert empty.json()["items"] == []
            gone = http.post(f"{V3}/outbox/{item['id']}/discard", headers=bearer(admin))
            assert gone.status_code == 409
            conforms("discardV3PlatformOpsOutboxEventCompat", gone)
            ops = overview(http, admin)
            assert ops["service_health"]["outbox_relay_ok"] is True
            assert ledger_entries(stores, user) == [10, 20, 3]
            assert ledger_entries(stores, third) == []
    finally:
        for relay in relays:
            relay.stop()
