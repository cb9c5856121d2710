"""The eventsourcing library used naively: the reference for what ledgercore's write
path costs on top of the library.

A tiny aggregate with one event, an ``Application`` on ``eventsourcing.postgres`` with
the library's default settings (no schema, pool, snapshot or lock settings of ours),
and one command = get the aggregate, trigger its event, ``save`` it; sequential, in
this process (no HTTP)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from psycopg.conninfo import conninfo_to_dict


class Wallet(Aggregate):
    def __init__(self) -> None:
        self.balance = 0

    @event("Credited")
    def credit(self, amount: int) -> None:
        self.balance += amount


class NaiveApp(Application[UUID]):
    name = "naive"


def naive_env(dsn: str) -> dict[str, str]:
    info = conninfo_to_dict(dsn)
    return {"PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": str(info.get("dbname")), "POSTGRES_HOST": str(info.get("host", "127.0.0.1")),
            "POSTGRES_PORT": str(info.get("port", "5432")), "POSTGRES_USER": str(info.get("user", "postgres")),
            "POSTGRES_PASSWORD": str(info.get("password", ""))}


def measure(dsn: str, duration: float, aggregates: int, seed: int = 7,
            tick: Callable[[float], None] | None = None) -> dict[str, Any]:
    app = NaiveApp(env=naive_env(dsn))
    rng = random.Random(seed)
    try:
        ids = []
        for _ in range(aggregates):  # set-up, not timed
            wallet = Wallet()
            app.save(wallet)
            ids.append(wallet.id)
        commands = 0
        expected: dict[UUID, int] = {}
        started = time.monotonic()
        deadline = started + duration
        while time.monotonic() < deadline:
            wallet_id = rng.choice(ids)
            wallet = app.repository.get(wallet_id)
            amount = rng.randint(100, 10_000)
            wallet.credit(amount)
            app.save(wallet)
            expected[wallet_id] = expected.get(wallet_id, 0) + amount
            commands += 1
            if tick is not None and commands % 50 == 0:
                tick(time.monotonic() - started)
        elapsed = time.monotonic() - started
        lost = sum(1 for wallet_id, total in expected.items()
                   if app.repository.get(wallet_id).balance != total)
    finally:
        app.close()
    return {"aggregates": aggregates, "commands": commands, "seconds": elapsed,
            "events_per_second": commands / elapsed, "mismatched_aggregates": lost}
