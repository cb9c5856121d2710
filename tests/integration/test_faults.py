"""Faults injected under load, each against services of the test's own (a private
Postgres, Redis and broker; the suite's shared ones are never stopped): Postgres
restarted mid-load, the API server process (and with it its projector process) SIGKILLed
at random moments, Redis stopped and started, the broker paused and restarted under
the Kafka transport, the relay and the Kafka projector SIGKILLed at random moments, and
the database refusing a batch's transaction after its commands changed aggregates in
memory. After recovery: every acknowledged command is in the event store exactly once,
no refused or failed one is half-applied, every read model equals a replay of the log
and every hash chain verifies. The numbers each test prints are the ones in
docs/reliability.md ("Fault injection"); ``LEDGERCORE_FAULT_*`` make it longer."""

from __future__ import annotations

import json
from collections import Counter
import random
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

import projections
from api.app import create_app
from infra.db import Stores
from projections.store import position
from tests.conftest import Database, make_settings
from tests.faults import (AdjustLoad, Private, assert_exactly_once, audited, crash, env_number,
                          private_services, read_model_balances, wait_caught_up)
from tests.contract.test_contract import check
from tests.harness import ServerThread, bearer, client

#: how many times Postgres is restarted under load, and the load between restarts (s)
RESTARTS = int(env_number("LEDGERCORE_FAULT_RESTARTS", 2))
LOAD_SECONDS = env_number("LEDGERCORE_FAULT_SECONDS", 3)
#: how long Postgres stays down at each restart
OUTAGE_SECONDS = 3.0
#: SIGKILLs of the relay and of the projector under load (each), and of the API process
KILLS = int(env_number("LEDGERCORE_FAULT_KILLS", 3))


@pytest.fixture(scope="module")
def private() -> Iterator[Private]:
    with private_services() as found:
        yield found


@contextmanager
def served(private: Private, **overrides: Any) -> Iterator[tuple[str, Stores]]:
    """An API server (direct transport unless overridden) over a fresh database on the
    private Postgres, with the private Redis."""
    database = Database(private.services)
    settings = make_settings(private.services, database.dsn, **overrides)
    stores = Stores.open(settings)
    try:
        with ServerThread(create_app(settings, stores)) as server:
            yield server.url, stores
    finally:
        stores.close()
        database.drop()


def report(name: str, numbers: dict[str, Any]) -> None:
    print(f"\n[reliability] {name}: {json.dumps(numbers, sort_keys=True)}")


def wait_answering(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    with client(url) as http:
        while True:
            try:
                if http.get("/api/v1/healthz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the API did not answer again"
            time.sleep(0.1)


# ---- Postgres restarted mid-load --------------------------------------------------------
def first_ack_after(load: AdjustLoad, up: float) -> float:
    """Seconds from ``up`` (the service back) to the first command acknowledged after it."""
    while (first := load.acked_after(up)) is None:
        assert time.monotonic() - up < 60, "no command acknowledged after the restart"
        time.sleep(0.05)
    return first - up


def recovered(stores: Stores, load: AdjustLoad, catch_up_within: float = 60) -> tuple[Any, ...]:
    """After the fault: every unknown command retried to a final answer, every read model
    at the head, then every check of the module docstring. Returns their figures:
    (retries, seconds to catch up, what was found in the store, what was verified)."""
    retries = load.settle()
    caught_up = wait_caught_up(stores, catch_up_within)
    found = assert_exactly_once(stores, load)
    verified = audited(stores)
    balances, sums = read_model_balances(stores)
    expected = load.expected_balances()
    assert {u: balances.get(u, 0) for u in expected} == expected
    assert {u: sums.get(u, 0) for u in expected} == expected
    return retries, caught_up, found, verified


def test_postgres_restarted_mid_load_loses_and_doubles_nothing(private: Private,
                                                               tokens: Any) -> None:
    users = [uuid.uuid4() for _ in range(8)]
    outages: list[float] = []
    recoveries: list[float] = []
    downs: list[float] = []
    with served(private) as (url, stores):
        load = AdjustLoad(url, tokens.admin(), users, clients=6).start()
        try:
            for n in range(RESTARTS):
                time.sleep(LOAD_SECONDS)
                down = time.monotonic()
                downs.append(down)
                # a fast shutdown, then a crash (no checkpoint; crash recovery on start),
                # in turn: either way every connection and transaction in flight is cut
                crash(private.pg) if n % 2 else private.pg.stop()
                # longer than the store's own reconnect retries (10 × 0.2 s): a command
                # in flight is answered 503 (and retried by its client with its key) or
                # carried over the outage by the connection pool's wait
                time.sleep(OUTAGE_SECONDS)
                private.pg.start()
                up = time.monotonic()
                outages.append(up - down)
                recoveries.append(first_ack_after(load, up))
            time.sleep(LOAD_SECONDS)
        finally:
            load.stop()
        retries, caught_up, found, verified = recovered(stores, load)
    summary = load.summary()
    # the fault is exercised when commands were in flight as Postgres went down (their
    # transaction or their wait for a connection was cut); whether they then answered
    # 503 or were carried by the store's own retries depends on the timing
    in_flight = sum(any(c.in_flight_at(d) for d in downs) for c in load.sent)
    assert in_flight > 0, "no command was in flight during a restart: the fault was not exercised"
    assert summary["acknowledged"] > 0 and summary["refused"] > 0
    report("postgres restart", {**summary, **found, "restarts": RESTARTS, "retries": retries,
                                "in_flight_at_a_stop": in_flight,
                                "outage_s": [round(o, 2) for o in outages],
                                "first_ack_after_restart_s": [round(r, 2) for r in recoveries],
                                "read_models_caught_up_s": round(caught_up, 2),
                                "events_verified": verified.events,
                                "ledger_entries_verified": verified.entries})


# ---- the API server process SIGKILLed (its projector process goes with it) ---------------
def read_model_lag(stores: Stores) -> int:
    """How many events the slowest read model is behind the head of the log."""
    head = stores.app.recorder.max_notification_id() or 0
    prefix = stores.position_source_prefix()
    with stores.query_pool.connection() as conn, conn.cursor() as cur:
        return head - min(position(cur, p.name, prefix) for p in projections.ALL)


def test_api_process_killed_mid_load_loses_and_doubles_nothing(private: Private, tokens: Any,
                                                               tmp_path: Any) -> None:
    """The service as ``./scripts/run`` runs it: ``ledgercore run``, the API and its batch
    writer in one process, the direct transport's projector in a child process that the
    kernel stops when ``run`` dies. SIGKILLed under load at random moments (seeded) and
    started again on the same port: whatever it had in flight (requests, its batch
    queue, a projector batch) dies with it; retried with
    their keys, nothing acknowledged is lost or doubled, and the new process's projector
    resumes from the recorded positions to a replay-equal state."""
    import signal

    from tests.harness import CliProcess, free_port

    rng = random.Random(13)
    users = [uuid.uuid4() for _ in range(8)]
    database = Database(private.services)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"LEDGERCORE_PG_DSN": database.dsn, "LEDGERCORE_REDIS_URL": private.redis.url,
           "LEDGERCORE_JWT_SECRET": tokens.secret, "LEDGERCORE_HOST": "127.0.0.1",
           "LEDGERCORE_PORT": str(port), "LEDGERCORE_TRANSPORT": "direct",
           "LEDGERCORE_RUN_PROJECTOR": "on", "LEDGERCORE_DATA_DIR": str(tmp_path),
           "LEDGERCORE_REDIS_PREFIX": f"lc-kill-{uuid.uuid4().hex[:6]}"}
    processes: list[CliProcess] = []

    def start() -> None:
        """Start the service (the same port every time) and wait until it answers."""
        processes.append(CliProcess(["run"], env, "api-sigkill").start())
        try:
            wait_answering(url)
        except AssertionError:
            raise AssertionError(processes[-1].output()[-3000:]) from None

    stores: Stores | None = None
    kills: list[dict[str, Any]] = []
    try:
        start()
        stores = Stores.open(make_settings(private.services, database.dsn))
        load = AdjustLoad(url, tokens.admin(), users, clients=6, seed=17, backoff=0.2).start()
        try:
            for _ in range(KILLS):
                time.sleep(rng.uniform(0.5, 2.5))
                lag = read_model_lag(stores)
                moment = time.monotonic()
                processes[-1].process.send_signal(signal.SIGKILL)
                assert processes[-1].wait(10) == -signal.SIGKILL
                start()
                up = time.monotonic()
                kills.append({"at": moment, "read_models_behind": lag, "down_s": up - moment,
                              "first_ack_s": first_ack_after(load, up)})
            time.sleep(LOAD_SECONDS)
        finally:
            load.stop()
        retries, caught_up, found, verified = recovered(stores, load)
        assert processes[-1].process.poll() is None, processes[-1].output()[-3000:]
    finally:
        for process in processes:
            process.stop()
        if stores is not None:
            stores.close()
        database.drop()
    summary = load.summary()
    in_flight = [sum(c.in_flight_at(k["at"]) for c in load.sent) for k in kills]
    assert sum(in_flight) > 0, "no command was in flight at a kill: the fault was not exercised"
    assert summary["acknowledged"] > 0 and summary["refused"] > 0
    report("api process sigkill", {
        **summary, **found, "sigkills": KILLS, "retries": retries,
        "in_flight_at_each_kill": in_flight,
        "read_models_behind_at_each_kill": [k["read_models_behind"] for k in kills],
        "kill_to_answering_s": [round(k["down_s"], 2) for k in kills],
        "first_ack_after_restart_s": [round(k["first_ack_s"], 2) for k in kills],
        "read_models_caught_up_s": round(caught_up, 2), "events_verified": verified.events,
        "ledger_entries_verified": verified.entries})


# ---- Redis stopped and started -----------------------------------------------------------
BALANCE = "/api/v1/billing/balance"
ADJUST = "/api/v1/admin/users/{user}/balance"


def test_redis_stopped_queries_bypass_and_commands_go_on(private: Private, tokens: Any) -> None:
    user, admin = uuid.uuid4(), tokens.admin()
    token = tokens.user(user)
    with served(private) as (url, stores), client(url) as http:
        total = 0

        def adjust(amount: int) -> str:
            nonlocal total
            response = http.post(ADJUST.format(user=user), headers={
                **bearer(admin), "Idempotency-Key": uuid.uuid4().hex}, json={
                "direction": "credit", "amount_minor": amount, "currency": "USD", "reason": "r"})
            check("POST", ADJUST.replace("{user}", "{user_id}"), response)
            assert response.status_code == 200, response.text
            total += amount
            return response.headers["X-Ledger-Position"]

        def balance(at: str) -> tuple[str, float]:
            started = time.monotonic()
            response = http.get(BALANCE, headers={**bearer(token), "X-Ledger-Position": at})
            took = time.monotonic() - started
            check("GET", BALANCE, response)
            assert response.status_code == 200, response.text
            assert response.json()["balance"]["amount_minor"] == total
            return response.headers["X-Read-Model-Cache"], took

        at = adjust(100)
        assert [balance(at)[0] for _ in range(2)] == ["miss", "hit"]
        private.redis.stop()
        down: list[tuple[str, float]] = []
        for amount in (5, 7, 11):  # commands are unaffected, queries answer uncached
            at = adjust(amount)
            down += [balance(at) for _ in range(3)]
        assert {state for state, _ in down} == {"bypass"}
        private.redis.start()
        at = adjust(1)
        back = [balance(at)[0] for _ in range(3)]
        assert back == ["miss", "hit", "hit"], back
        assert stores.app.billing_account(user).balances == {"USD": total}
    report("redis stopped", {"queries_while_down": len(down), "bypass": len(down),
                             "commands_while_down": 3, "errors": 0,
                             "slowest_bypass_ms": round(max(t for _, t in down) * 1000, 1),
                             "after_restart": back})


# ---- the database refuses a batch's transaction ------------------------------------------
@contextmanager
def refusing(stores: Stores, marker: str) -> Iterator[None]:
    """A trigger that makes Postgres refuse any transaction appending an event whose
    state holds ``marker``; dropped on exit."""
    table = f'eventstore."{stores.app.recorder.events_table_name}"'
    with stores.query_pool.connection() as conn:
        conn.execute(f"""CREATE FUNCTION eventstore.fault_refuse() RETURNS trigger AS $$
            BEGIN
              IF position(convert_to('{marker}', 'UTF8') in NEW.state) > 0 THEN
                RAISE EXCEPTION 'fault injected: % refused', NEW.topic;
              END IF;
              RETURN NEW;
            END $$ LANGUAGE plpgsql""")
        conn.execute(f"CREATE TRIGGER fault_refuse BEFORE INSERT ON {table}"
                     " FOR EACH ROW EXECUTE FUNCTION eventstore.fault_refuse()")
    try:
        yield
    finally:
        with stores.query_pool.connection() as conn:
            conn.execute(f"DROP TRIGGER IF EXISTS fault_refuse ON {table}")
            conn.execute("DROP FUNCTION IF EXISTS eventstore.fault_refuse()")


def _waiting_on(stores: Stores, table: str) -> bool:
    """Is a transaction waiting for a lock on ``table`` (the batch writer, blocked)?"""
    with stores.query_pool.connection() as conn:
        row = conn.execute("SELECT count(*) AS n FROM pg_locks WHERE NOT granted"
                           " AND relation = %s::regclass", (table,)).fetchone()
    return bool(row and row["n"])


@contextmanager
def held_writer(stores: Stores, url: str, admin: str, expect: int) -> Iterator[None]:
    """Blocks the batch writer inside a save (a lock on the events table) while the
    body runs and until ``expect`` commands are queued behind it, so all of them are
    decided in ONE batch once the lock goes."""
    table = f'eventstore."{stores.app.recorder.events_table_name}"'
    holder = stores.query_pool.getconn()
    holder.autocommit = False
    holder.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")
    threads, _ = in_threads(url, [lambda h: h.post(
        ADJUST.format(user=uuid.uuid4()), headers=bearer(admin),
        json={"direction": "credit", "amount_minor": 1, "currency": "USD", "reason": "hold"})])
    try:
        deadline = time.monotonic() + 5
        while not _waiting_on(stores, table):  # the writer took the holding command
            assert time.monotonic() < deadline, "the batch writer never reached the lock"
            time.sleep(0.02)
        yield
        deadline = time.monotonic() + 7  # the writer's lock timeout is 10 s
        while stores.app._queue.qsize() < expect and time.monotonic() < deadline:
            time.sleep(0.02)
        assert stores.app._queue.qsize() == expect, \
            f"{stores.app._queue.qsize()} of {expect} commands queued behind the held writer"
    finally:
        holder.rollback()
        holder.autocommit = True
        stores.query_pool.putconn(holder)
        threads[0].join(timeout=30)


def in_threads(url: str, jobs: list[Any], gap: float = 0.0) -> tuple[list[Any], list[Any]]:
    """Each job on its own client and thread: (threads, results)."""
    results: list[Any] = [None] * len(jobs)

    def one(i: int) -> None:
        with client(url) as http:
            results[i] = jobs[i](http)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
        time.sleep(gap)
    return threads, results


def joined(threads: list[Any], results: list[Any]) -> list[Any]:
    for thread in threads:
        thread.join(timeout=60)
    assert all(r is not None for r in results), "a client got no answer"
    return results


def events_holding(stores: Stores, marker: str) -> int:
    with stores.query_pool.connection() as conn:
        return conn.execute(
            f'SELECT count(*) AS n FROM eventstore."{stores.app.recorder.events_table_name}"'
            " WHERE position(convert_to(%s, 'UTF8') in state) > 0", (marker,)).fetchone()["n"]


def test_a_refused_batch_transaction_fails_only_its_command(private: Private, tokens: Any) -> None:
    """One batch of eleven adjustments on two accounts, among them a credit whose event
    Postgres refuses (a trigger): the refused one answers 500 and leaves nothing, not
    even its idempotency record; every neighbour gets the answer it gets alone (the
    batch's in-memory changes are dropped and each command decided again)."""
    from tests.integration.test_inventory_commands import fund

    admin, marker = tokens.admin(), f"poison-{uuid.uuid4().hex[:8]}"
    a, b = uuid.uuid4(), uuid.uuid4()
    with served(private) as (url, stores), client(url) as http:
        fund(http, admin, a)  # 100_000

        def adjust(user: uuid.UUID, direction: str, amount: int, reason: str = "neighbour",
                   key: str | None = None) -> Any:
            key = key or uuid.uuid4().hex
            return lambda h: h.post(ADJUST.format(user=user), json={
                "direction": direction, "amount_minor": amount, "currency": "USD",
                "reason": reason}, headers={**bearer(admin), "Idempotency-Key": key})

        # the outcomes do not depend on the order: a's debits fit in any order, b's
        # debit never does
        poisoned = adjust(a, "credit", 1_000_000, marker)
        jobs = [adjust(a, "debit", 60_000), adjust(a, "credit", 7), adjust(b, "credit", 30),
                adjust(a, "debit", 39_000), poisoned, adjust(b, "debit", 500),
                adjust(a, "credit", 5), adjust(b, "credit", 2), adjust(a, "debit", 20),
                adjust(b, "credit", 1), adjust(a, "credit", 1)]
        with refusing(stores, marker):
            with held_writer(stores, url, admin, expect=len(jobs)):
                threads, results = in_threads(url, jobs)
            answers = [(r.status_code, r.json().get("code")) for r in joined(threads, results)]
            again = poisoned(http)  # a retry while the database still refuses: 500 again
        assert answers == [(200, None)] * 4 + [(500, "internal_error"), (400, "insufficient_balance")] \
            + [(200, None)] * 5, answers
        assert (again.status_code, again.json()["code"]) == (500, "internal_error")
        assert stores.app.billing_account(a).balances == {"USD": 100_000 - 60_000 + 7 - 39_000 + 5 - 20 + 1}
        assert stores.app.billing_account(b).balances == {"USD": 33}
        assert events_holding(stores, marker) == 0  # nothing of it: not its entry, not its key
        # the database accepts it again: the same key now runs it, once
        retried = poisoned(http)
        assert retried.status_code == 200 and "Idempotent-Replayed" not in retried.headers
        assert poisoned(http).headers["Idempotent-Replayed"] == "true"
        a_total = 1_000_000 + 100_000 - 60_000 + 7 - 39_000 + 5 - 20 + 1
        assert stores.app.billing_account(a).balances == {"USD": a_total}
        wait_caught_up(stores)
        balances, sums = read_model_balances(stores)
        assert (balances[a], sums[a], balances[b], sums[b]) == (a_total, a_total, 33, 33)
        audited(stores)
    report("refused transaction (balances)", {"batch": len(jobs), "failed": 1,
                                               "neighbours_answered_as_alone": len(jobs) - 1})


def test_a_refused_launch_leaves_no_claim_and_its_neighbour_gets_the_node(
        private: Private, tokens: Any) -> None:
    """Two launches for the one free node in one batch; Postgres refuses the first one's
    events (its allocation, node claim, quota). In memory the first had taken the node
    and the second was refused for capacity; decided again, the second gets the node and
    the first leaves no allocation, no claim, no quota entry."""
    from tests.integration.test_allocation_race import Caller, store_facts
    from tests.integration.test_inventory_commands import (LAUNCH, baremetal_sku, fund,
                                                           make_node, make_sku)

    admin, sku = tokens.admin(), f"ft-{uuid.uuid4().hex[:6]}"
    first, second = Caller(tokens), Caller(tokens)
    marker = str(first.project)
    with served(private) as (url, stores), client(url) as http:
        make_sku(http, admin, baremetal_sku(sku))
        node = make_node(http, admin, sku)["id"]
        for caller in (first, second):
            fund(http, admin, caller.user)
        with refusing(stores, marker):
            with held_writer(stores, url, admin, expect=2):
                threads, results = in_threads(url, [first.launch(sku), second.launch(sku)], gap=0.3)
            refused, admitted = joined(threads, results)
        assert (refused.status_code, refused.json()["code"]) == (500, "internal_error")
        check("POST", LAUNCH, admitted)
        assert admitted.status_code == 202, admitted.text
        assert events_holding(stores, marker) == 0
        live = store_facts(stores, {str(first.user), str(second.user)}, [node], 5)
        assert live == {str(first.user): set(), str(second.user): {admitted.json()["workload_id"]}}
        later = first.launch(sku)(http)  # the node is taken: refused cleanly, not a 500
        assert (later.status_code, later.json()["code"]) == (409, "sku_unavailable"), later.text
        wait_caught_up(stores)
        audited(stores)
    report("refused transaction (launch)", {"batch": 2, "failed": 1, "neighbour_admitted": 1})


# ---- the Kafka transport: relay and projector SIGKILLed, the broker paused and restarted --
@pytest.fixture
def kafka_stack(private: Private, tmp_path: Any) -> Iterator[Any]:
    """The API (transport=kafka) over a fresh database on the private Postgres, a broker
    of this test's own, and a ``spawn`` for the relay and projector processes (as in
    test_kafka_transport.py, which kills them at chosen points; here the moments are
    random and the broker itself fails too)."""
    from infra.services import Broker
    from tests.harness import CliProcess

    broker = Broker().start()
    database = Database(private.services)
    topic = f"ledgercore.faults.{uuid.uuid4().hex[:8]}"
    settings = make_settings(private.services, database.dsn, transport="kafka",
                             kafka_bootstrap=broker.bootstrap, kafka_topic=topic,
                             kafka_partitions=3, read_wait_seconds=60)
    env = {"LEDGERCORE_PG_DSN": database.dsn, "LEDGERCORE_KAFKA_BOOTSTRAP": broker.bootstrap,
           "LEDGERCORE_TRANSPORT": "kafka", "LEDGERCORE_KAFKA_TOPIC": topic,
           "LEDGERCORE_KAFKA_PARTITIONS": "3", "LEDGERCORE_JWT_SECRET": settings.jwt_secret,
           "LEDGERCORE_KAFKA_GROUP": f"projectors-{topic}", "LEDGERCORE_DATA_DIR": str(tmp_path)}
    processes: list[CliProcess] = []

    def spawn(command: str) -> CliProcess:
        processes.append(CliProcess([command], env, command).start())
        return processes[-1]

    stores = Stores.open(settings)
    try:
        with ServerThread(create_app(settings, stores)) as server:
            yield server.url, stores, spawn, broker
    finally:
        for process in processes:
            process.stop()
        broker.stop()
        stores.close()
        database.drop()


@pytest.mark.kafka
def test_kafka_workers_killed_and_broker_failing_lose_and_double_nothing(
        kafka_stack: Any, tokens: Any) -> None:
    import signal

    url, stores, spawn, broker = kafka_stack
    rng = random.Random(11)
    users = [uuid.uuid4() for _ in range(6)]
    workers = {"relay": spawn("relay"), "project": spawn("project")}
    load = AdjustLoad(url, tokens.admin(), users, clients=4, pause=0.01).start()
    kills: list[str] = []
    timings: dict[str, float] = {}
    try:
        # 1. the relay and the projector SIGKILLed at random moments, restarted at once
        for n in range(2 * KILLS):
            time.sleep(rng.uniform(0.3, 1.5))
            name = rng.choice(sorted(workers))
            workers[name].process.send_signal(signal.SIGKILL)
            assert workers[name].wait(10) == -signal.SIGKILL
            kills.append(name)
            workers[name] = spawn(name)
        # 2. the broker paused (unreachable, nothing lost) for 3 s under load
        time.sleep(1)
        broker.process.send_signal(signal.SIGSTOP)
        time.sleep(3)
        broker.process.send_signal(signal.SIGCONT)
        time.sleep(2)
        # 3. the broker restarted. The test broker keeps its log in memory, so a restart
        # is a new, empty broker: it is stopped when everything published was consumed
        # (a durable Kafka keeps what it acknowledged); commands go on while it is down.
        load.stop()
        timings["caught_up_after_pause_s"] = wait_caught_up(stores, 90) + 2
        broker.stop()
        load.start()
        time.sleep(2)
        broker.start()  # the same port
        restarted = time.monotonic()
        time.sleep(LOAD_SECONDS)
    finally:
        load.stop()
    retries, caught_up, found, verified = recovered(stores, load, catch_up_within=120)
    timings["caught_up_after_restart_s"] = time.monotonic() - restarted
    for name, process in workers.items():
        assert process.process.poll() is None, f"{name} died:\n{process.output()[-3000:]}"
    report("kafka faults", {**load.summary(), **found, "retries": retries,
                            "sigkills": dict(Counter(kills)), "broker_paused_s": 3,
                            "broker_restarts": 1, "final_catch_up_s": round(caught_up, 2),
                            **{k: round(v, 2) for k, v in timings.items()},
                            "events_verified": verified.events})
