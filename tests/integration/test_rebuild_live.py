"""Rebuilding a read model while commands keep arriving over HTTP from several clients:
afterwards the rebuilt tables equal an uninterrupted projection of the same event log
(built in a second database), and no reader ever saw a half-built model."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import projections
from consumers.direct import catch_up
from consumers.rebuild import rebuild
from tests.conftest import serve_own_database
from tests.harness import bearer, client

MODEL = "billing_ledger"
CLIENTS = 4


def table_rows(stores: Any, table: str) -> list[str]:
    with stores.query_pool.connection() as conn:
        rows = conn.execute(f"SELECT to_jsonb(t) AS r FROM readmodels.{table} t").fetchall()
    return sorted(json.dumps(row["r"], sort_keys=True) for row in rows)


def credit(http: Any, admin: str, user: uuid.UUID, amount: int) -> Any:
    response = http.post(f"/api/v1/admin/users/{user}/balance", headers=bearer(admin),
                         json={"direction": "credit", "amount_minor": amount, "currency": "USD",
                               "reason": "live"})
    assert response.status_code == 200, response.text
    return response


def test_rebuild_under_live_load_equals_an_uninterrupted_projection(
        services: Any, tokens: Any, new_database: Any, settings_for: Any, stores_for: Any) -> None:
    admin = tokens.admin()
    users = [uuid.uuid4() for _ in range(CLIENTS)]
    watched = users[0]
    with serve_own_database(services) as served, client(served.url) as http:
        stores = served.stores
        for n in range(150):  # history for the rebuild to replay
            credit(http, admin, users[n % CLIENTS], 1 + n % 7)

        stop = threading.Event()
        failures: list[str] = []
        last_positions: list[int] = []
        lock = threading.Lock()

        def writer(user: uuid.UUID) -> None:
            with client(served.url) as own:
                while not stop.is_set():
                    try:
                        response = credit(own, admin, user, 3)
                    except AssertionError as error:
                        failures.append(f"write: {error}")
                        return
                    with lock:
                        last_positions.append(int(response.headers["X-Ledger-Position"]))

        #: what each reader saw, in its own order (two readers' reads interleave)
        seen: list[dict[str, list[int]]] = [{"balance": [], "entries": []} for _ in range(2)]

        def reader(index: int) -> None:
            """Credits only: a balance or an entry count that goes down between two reads
            of one reader was read from a half-built model."""
            mine = seen[index]
            with client(served.url) as own:
                while not stop.is_set():
                    response = own.get("/api/v1/billing/balance",
                                       headers=bearer(tokens.user(watched)))
                    if response.status_code != 200:
                        failures.append(f"read: {response.status_code} {response.text}")
                        return
                    mine["balance"].append(response.json()["balance"]["amount_minor"])
                    with stores.query_pool.connection() as conn:
                        mine["entries"].append(conn.execute(
                            "SELECT count(*) AS n FROM readmodels.ledger_entries").fetchone()["n"])

        threads = [threading.Thread(target=writer, args=(u,)) for u in users]
        threads += [threading.Thread(target=reader, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        rebuilt = []
        try:
            time.sleep(0.5)
            for _ in range(2):
                rebuilt.append(rebuild(stores.app, stores.read_models,
                                       projections.BY_NAME[MODEL]))
                time.sleep(0.5)
        finally:
            time.sleep(0.5)
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
        assert not failures, failures[:5]
        assert rebuilt[1] > rebuilt[0] > 150  # commands kept arriving during the rebuilds
        for series in (series for mine in seen for series in mine.values()):
            assert series and all(a <= b for a, b in zip(series, series[1:])), series

        # everything written reaches the rebuilt read model
        final = credit(http, admin, watched, 1)
        response = http.get("/api/v1/billing/balance", headers={
            **bearer(tokens.user(watched)), "X-Ledger-Position": final.headers["X-Ledger-Position"]})
        assert response.headers["X-Read-Model-Cache"] != "stale"
        assert response.json()["balance"]["amount_minor"] == \
            stores.app.billing_account(watched).balances["USD"]
        head = stores.app.recorder.max_notification_id()
        deadline = time.monotonic() + 30
        while stores.read_models.tracked(MODEL, "log") < head and time.monotonic() < deadline:
            time.sleep(0.05)

        with stores.query_pool.connection() as conn:  # no batch tripped over the rebuild
            assert conn.execute("SELECT count(*) AS n FROM readmodels.dead_letters"
                                ).fetchone()["n"] == 0

        # an uninterrupted projection of the same log, in a second database
        other = stores_for(settings_for(new_database().dsn))
        assert catch_up(stores.app, other.read_models) == head
        for table in projections.BY_NAME[MODEL].tables:
            assert table_rows(stores, table) == table_rows(other, table), table
        for user in users:
            assert stores.app.billing_account(user).balances["USD"] == sum(
                r["amount_minor"] for r in map(json.loads, table_rows(stores, "ledger_entries"))
                if r["owner_user_id"] == str(user))
