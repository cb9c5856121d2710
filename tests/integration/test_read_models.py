"""Read-model behaviour: Redis down, a lagging projector, and rebuilds."""

from __future__ import annotations

import subprocess
import sys
import uuid
from typing import Any

from api.app import create_app
from consumers.direct import catch_up
from consumers.rebuild import rebuild
from infra.services import free_port
from projections import BY_NAME
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
