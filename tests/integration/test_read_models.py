"""Read-model behaviour: Redis down, a lagging projector, rebuilds, and runners that
race for the same batch."""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

from eventsourcing.persistence import IntegrityError

from api.app import create_app
from consumers.direct import catch_up
from consumers.rebuild import rebuild
from infra.db import ensure_schemas, read_model_datastore
from infra.services import free_port
from projections import BY_NAME
from projections.store import Item, ReadModelStore, position
from tests.harness import ROOT, ServerThread, bearer, client

BODY = {"direction": "credit", "amount_minor": 42, "currency": "USD", "reason": "rm"}


def test_redis_down_means_bypass_not_an_error(new_database: Any, settings_for: Any,
                                              tokens: Any) -> None:
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    settings = settings_for(new_database().dsn, redis_url=dead_redis)
    user = uuid.uuid4()
    with ServerThread(create_app(settings)) as server, client(server.url) as http:
        pos = http.post(f"/api/v1/admin/users/{user}/balance", json=BODY,
                        headers=bearer(tokens.admin())).headers["X-Ledger-Position"]
        for _ in range(2):
            read = http.get("/api/v1/billing/balance",
                            headers={**bearer(tokens.user(user)), "X-Ledger-Position": pos})
            assert read.status_code == 200
            assert read.headers["X-Read-Model-Cache"] == "bypass"
            assert read.json()["balance"]["amount_minor"] == 42


def test_a_lagging_read_model_answers_stale_after_the_bounded_wait(
        new_database: Any, settings_for: Any, tokens: Any) -> None:
    settings = settings_for(new_database().dsn, run_projector=False, read_wait_seconds=0.3)
    user = uuid.uuid4()
    with ServerThread(create_app(settings)) as server, client(server.url) as http:
        pos = http.post(f"/api/v1/admin/users/{user}/balance", json=BODY,
                        headers=bearer(tokens.admin())).headers["X-Ledger-Position"]
        read = http.get("/api/v1/billing/balance",
                        headers={**bearer(tokens.user(user)), "X-Ledger-Position": pos})
        assert read.status_code == 200
        assert read.headers["X-Read-Model-Cache"] == "stale"
        assert read.json()["balance"]["amount_minor"] == 0
        bad = http.get("/api/v1/billing/balance",
                       headers={**bearer(tokens.user(user)), "X-Ledger-Position": "-1"})
        assert bad.status_code == 400


def snapshot(stores: Any) -> dict[str, list[Any]]:
    with stores.query_pool.connection() as conn:
        return {table: conn.execute(f"SELECT * FROM readmodels.{table} ORDER BY 1, 2").fetchall()
                for table in BY_NAME["billing_ledger"].tables}


def test_rebuild_from_the_event_store_gives_the_same_read_model(
        new_database: Any, settings_for: Any, stores_for: Any, tokens: Any) -> None:
    database = new_database()
    settings = settings_for(database.dsn)
    stores = stores_for(settings)
    users = [uuid.uuid4() for _ in range(3)]
    with ServerThread(create_app(settings, stores)) as server, client(server.url) as http:
        for n in range(12):
            body = {**BODY, "amount_minor": n + 1, "currency": ("USD", "EUR")[n % 2]}
            assert http.post(f"/api/v1/admin/users/{users[n % 3]}/balance", json=body,
                             headers=bearer(tokens.admin())).status_code == 200
    catch_up(stores.app, stores.read_models)
    before = snapshot(stores)
    assert len(before["ledger_entries"]) == 12
    with stores.query_pool.connection() as conn:  # damage the read model
        conn.execute("UPDATE readmodels.balances SET amount_minor = amount_minor + 1")
        conn.execute("DELETE FROM readmodels.ledger_entries WHERE seq = 1")
    count = rebuild(stores.app, stores.read_models, BY_NAME["billing_ledger"])
    assert count == stores.app.recorder.max_notification_id()
    assert snapshot(stores) == before
    # and the projector carries on from where the rebuild left it, skipping nothing
    assert catch_up(stores.app, stores.read_models) == stores.app.recorder.max_notification_id()
    assert snapshot(stores) == before

    # the operator command does the same from the command line
    with stores.query_pool.connection() as conn:
        conn.execute("DELETE FROM readmodels.balances")
    result = subprocess.run([sys.executable, "-m", "infra.cli", "rebuild", "billing_ledger"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={"LEDGERCORE_PG_DSN": database.dsn, "PATH": "/usr/bin:/bin",
                                 "LEDGERCORE_JWT_SECRET": "x" * 32})
    assert result.returncode == 0, result.stderr
    assert snapshot(stores) == before


def test_the_direct_projector_wakes_on_another_writers_notify(
        new_database: Any, settings_for: Any, stores_for: Any, tokens: Any) -> None:
    """A write by another process (here: a server without a projector) is projected at
    once through the event store's NOTIFY, not after the projector's idle timeout."""
    import time

    from api.consistency import current_position
    from consumers.direct import DirectProjector

    settings = settings_for(new_database().dsn, run_projector=False)
    projecting = stores_for(settings)
    projector = DirectProjector(projecting.app, projecting.read_models, settings.pg_dsn,
                                idle_seconds=60).start()
    try:
        with ServerThread(create_app(settings)) as server, client(server.url) as http:
            time.sleep(0.5)  # the projector's first pass and its LISTEN are done
            user = uuid.uuid4()
            sent = time.monotonic()
            answer = http.post(f"/api/v1/admin/users/{user}/balance", json=BODY,
                               headers=bearer(tokens.admin()))
            target = int(answer.headers["X-Ledger-Position"])
            while current_position(projecting, "billing_ledger") < target:
                assert time.monotonic() - sent < 5, "the projector did not wake on NOTIFY"
                time.sleep(0.01)
    finally:
        projector.stop()


# ---- runners racing for a batch --------------------------------------------------------
class Probe:
    """A read model keeping one row per notification it applies (no key: applying one
    twice would show). In the thread named ``stop_in`` it stops at its first event
    until ``gate`` opens."""

    name = "probe"
    tables = ("probe_rows",)

    def __init__(self) -> None:
        self.stop_in: str | None = None
        self.inside, self.gate = threading.Event(), threading.Event()

    def ddl(self, schema: str) -> list[str]:
        return [f"CREATE TABLE IF NOT EXISTS {schema}.probe_rows (notification_id bigint NOT NULL)"]

    def apply(self, cur: Any, schema: str, event: Any, notification_id: int) -> None:
        cur.execute(f"INSERT INTO {schema}.probe_rows VALUES (%s)", (notification_id,))
        if threading.current_thread().name == self.stop_in and not self.inside.is_set():
            self.inside.set()
            assert self.gate.wait(10)


@contextmanager
def two_runners(settings: Any, probe: Probe) -> Iterator[tuple[ReadModelStore, ReadModelStore]]:
    """Two stores with their own connections on one database, as two processes."""
    ensure_schemas(settings.pg_dsn)
    stores = [ReadModelStore(read_model_datastore(settings), [probe]) for _ in range(2)]
    stores[0].create_table()
    try:
        yield stores[0], stores[1]
    finally:
        for store in stores:
            store.datastore.close()


def probe_items(count: int) -> list[Item]:
    aggregate = SimpleNamespace(originator_id=uuid.uuid4())
    return [Item(n, aggregate) for n in range(1, count + 1)]


def probe_rows(store: ReadModelStore) -> list[int]:
    with store.datastore.cursor() as cur:
        cur.execute("SELECT notification_id FROM readmodels.probe_rows ORDER BY 1")
        return [row["notification_id"] for row in cur.fetchall()]


def probe_position(store: ReadModelStore) -> int:
    with store.datastore.cursor() as cur:
        return position(cur, "probe", "log")


def in_thread(name: str, work: Any) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = work()
        except Exception as error:  # noqa: BLE001 - the test looks at it
            outcome["error"] = error

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread, outcome


def test_two_runners_racing_a_first_batch_commit_it_once(new_database: Any,
                                                        settings_for: Any) -> None:
    """Neither has a tracking row to lock yet: both apply; the one that records its
    tracking second fails as the library's tracking upsert does and rolls back whole."""
    probe = Probe()
    with two_runners(settings_for(new_database().dsn), probe) as (first, second):
        items = probe_items(3)
        probe.stop_in = "first"
        thread, outcome = in_thread("first", lambda: first.apply_batch("log", items, 3))
        assert probe.inside.wait(10)  # the first has applied an event, not its tracking
        assert second.apply_batch("log", items, watermark=3) == 3
        probe.gate.set()
        thread.join(10)
        assert isinstance(outcome.get("error"), IntegrityError), outcome
        assert probe_rows(first) == [1, 2, 3]
        assert first.tracked("probe", "log") == 3 and probe_position(first) == 3
        # applied before: skipped; a lower watermark leaves the position where it is
        assert first.apply_batch("log", items, watermark=2) == 0
        assert probe_rows(first) == [1, 2, 3] and probe_position(first) == 3


def test_a_batch_waits_for_a_rebuild_then_applies_only_what_follows_it(
        new_database: Any, settings_for: Any) -> None:
    probe = Probe()
    with two_runners(settings_for(new_database().dsn), probe) as (rebuilding, projecting):
        items = probe_items(6)
        assert projecting.apply_batch("log", items[:2], watermark=2) == 2
        replaying, release = threading.Event(), threading.Event()

        def history() -> Iterator[Sequence[Item]]:
            yield items[:4]
            replaying.set()  # the first batch is replayed: the tracking rows are locked
            assert release.wait(10)

        rebuild_thread, rebuilt = in_thread("rebuild", lambda: rebuilding.rebuild(probe, history()))
        assert replaying.wait(10)
        batch_thread, batch = in_thread("batch", lambda: projecting.apply_batch("log", items, 6))
        batch_thread.join(0.5)
        assert batch_thread.is_alive(), batch  # waiting for the rebuild's tracking lock
        release.set()
        rebuild_thread.join(10)
        batch_thread.join(10)
        assert rebuilt == {"result": 4}
        assert batch == {"result": 2}  # read the rebuild's position: only 5 and 6 were left
        assert probe_rows(projecting) == [1, 2, 3, 4, 5, 6]
        assert projecting.tracked("probe", "log") == 6 and probe_position(projecting) == 6


# ---- how a batch commits -----------------------------------------------------------------
class CommitProbe:
    """A read model noting, for each event, whether its transaction's commit waits for
    the WAL flush (``synchronous_commit``)."""

    name = "commit_probe"
    tables = ("commit_probe_rows",)

    def ddl(self, schema: str) -> list[str]:
        return [f"CREATE TABLE IF NOT EXISTS {schema}.commit_probe_rows"
                " (notification_id bigint PRIMARY KEY, synchronous_commit text NOT NULL)"]

    def apply(self, cur: Any, schema: str, event: Any, notification_id: int) -> None:
        cur.execute(f"INSERT INTO {schema}.commit_probe_rows"
                    " VALUES (%s, current_setting('synchronous_commit'))", (notification_id,))


def test_the_direct_transport_alone_commits_its_batches_without_waiting_for_the_flush(
        new_database: Any, settings_for: Any, stores_for: Any) -> None:
    """The direct projector's source is the event log, read again from the tracking
    committed with the rows: a batch lost in a Postgres crash is applied again, so its
    commit need not wait. A batch from any other source (the Kafka transport's, whose
    offsets are committed after it) still waits, and the setting stays in its
    transaction."""
    from domain.billing import adjust_balance
    from domain.money import Money
    from domain.provenance import CommandContext

    settings = settings_for(new_database().dsn, run_projector=False)
    stores = stores_for(settings)
    user = uuid.uuid4()
    for _ in range(2):
        stores.app.execute(adjust_balance(
            CommandContext(actor_id=str(user)), user_id=user, direction="credit",
            amount=Money(42, "USD"), reason="rm", render=lambda result: {"result": result}))
    store = ReadModelStore(read_model_datastore(settings), [CommitProbe()])
    store.create_table()
    try:
        last = stores.app.recorder.max_notification_id()  # an opening and two credits
        assert last == 3 and catch_up(stores.app, store) == last
        aggregate = SimpleNamespace(originator_id=uuid.uuid4())
        store.apply_batch("kafka:events/0", [Item(7, aggregate)], watermark=7)
        with store.datastore.cursor() as cur:
            cur.execute("SELECT notification_id, synchronous_commit FROM"
                        " readmodels.commit_probe_rows ORDER BY 1")
            rows = [(row["notification_id"], row["synchronous_commit"]) for row in cur.fetchall()]
            cur.execute("SHOW synchronous_commit")
            default = cur.fetchone()["synchronous_commit"]
            applied_from_the_log = position(cur, "commit_probe", "log")
        assert rows == [(1, "off"), (2, "off"), (3, "off"), (7, "on")]
        assert default == "on"  # SET LOCAL: the pooled connections keep the default
        assert applied_from_the_log == 3
    finally:
        store.datastore.close()
