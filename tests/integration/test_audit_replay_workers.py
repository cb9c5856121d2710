"""The audit replay shared by worker processes, on Postgres: the same state as the fold in
one process, and a failing worker fails the replay.

One database holds a random history (``tests/property/test_replay_as_of.History``:
adjustments, usage meters, placement claims) followed by rounds of credits and debits
of more accounts, so that both parts of the log (``infra.audit.log.read_part``) hold
accounts. Folded by two workers, at the head and in the middle of the log, every
aggregate (balances, entry counts, last hashes, usage records, open claims) must be
the one the single process folds, in the same order. A worker whose database is gone,
or that cannot decode an event, must make the replay raise. A short log is folded in
the calling process unless ``workers`` says otherwise; an ``account`` replay and a
store other than Postgres always are.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from eventsourcing.persistence import MapperDeserialisationError
from psycopg.sql import SQL, Identifier

from domain.app import Ledgercore
from domain.billing import BillingAccount, account_id_for, adjust_balance
from domain.money import Money
from domain.provenance import CommandContext
from infra.audit.log import head
from infra.audit.replay import PARALLEL_MIN, AsOf, ReplayWorkerError, fold
from infra.db import Stores, ensure_schemas
from tests.conftest import own_stores
from tests.property.test_replay_as_of import History, build, random_steps, render

NS = uuid.UUID("3b8e2f4c-51a7-4d0b-9c61-0f2d8a7e5b19")
USERS = 16


@dataclass
class Logged:
    stores: Stores
    history: History
    users: list[uuid.UUID]  # the accounts credited and debited after the history
    middle: int  # a log position inside the history


def credit_and_debit(app: Ledgercore, users: list[uuid.UUID], rng: random.Random,
                     history: History) -> None:
    """One round: a credit, then sometimes a debit (some refused), for every user."""
    for user in users:
        ctx = CommandContext(actor_id="audit-workers", actor_type="system",
                             actor_role="operator", source="admin", now=history.clock)
        app.execute(adjust_balance(ctx, user_id=user, direction="credit",
                                   amount=Money(rng.randint(100, 10_000), "USD"),
                                   reason="audit", render=render))
        if rng.random() < 0.6:
            app.execute(adjust_balance(ctx, user_id=user, direction="debit",
                                       amount=Money(rng.randint(1, 12_000), "USD"),
                                       reason="audit", render=render))
        history.clock += timedelta(milliseconds=rng.randint(0, 50))


@pytest.fixture(scope="module")
def logged(services: Any) -> Iterator[Logged]:
    with own_stores(services, run_projector=False) as (_, stores):
        rng = random.Random(20261124)
        users = [uuid.uuid5(NS, str(n)) for n in range(USERS)]
        steps = random_steps(rng, 150)
        # the history's own first command opens the log; the other accounts come after
        history = build(steps, seed=11, app=stores.app)
        middle = head(stores.app) // 2
        for _ in range(4):
            credit_and_debit(stores.app, users, rng, history)
        yield Logged(stores, history, users, middle)


def content(state: AsOf) -> dict[str, Any]:
    """Everything a replay says but its timing."""
    answer = state.as_json()
    del answer["seconds"], answer["events_per_second"]
    return answer


def assert_same(shared: AsOf, alone: AsOf) -> None:
    assert (shared.workers, alone.workers) == (2, 1)
    assert content(shared) == content(alone)
    assert (shared.read, shared.events) == (alone.read, alone.events)
    for kind in ("accounts", "records", "nodes"):
        mine, theirs = getattr(shared, kind), getattr(alone, kind)
        assert list(mine) == list(theirs), kind  # same aggregates, same order
        for aggregate_id, aggregate in mine.items():
            assert type(aggregate) is type(theirs[aggregate_id])
            assert vars(aggregate) == vars(theirs[aggregate_id]), (kind, aggregate_id)


def test_two_workers_fold_what_one_process_folds(logged: Logged) -> None:
    app = logged.stores.app
    position = head(app)
    ticks: list[int] = []
    shared = fold(app, position, workers=2, tick=ticks.append)
    alone = fold(app, position, workers=1)
    assert_same(shared, alone)
    assert shared.read == shared.events > 0
    assert {account_id_for(user) for user in logged.users} < set(shared.accounts)
    assert shared.records and shared.nodes and shared.open_claims()
    # both parts of the log hold accounts (the last byte of the id, modulo 2)
    assert {aggregate_id.bytes[15] % 2 for aggregate_id in shared.accounts} == {0, 1}
    assert ticks and ticks == sorted(ticks) and ticks[-1] == position
    assert any(a.entry_count > 1 for a in shared.accounts.values())


def test_two_workers_fold_what_one_process_folds_in_the_middle_of_the_log(
        logged: Logged) -> None:
    app = logged.stores.app
    for position in (logged.middle, logged.middle + 1, 1):
        shared = fold(app, position, workers=2)
        alone = fold(app, position, workers=1)
        assert_same(shared, alone)
        assert shared.read <= position
    assert fold(app, logged.middle, workers=2).read < fold(app, head(app), workers=2).read


def test_a_short_log_is_folded_in_this_process_unless_workers_say_otherwise(
        logged: Logged) -> None:
    app = logged.stores.app
    position = head(app)
    assert position < PARALLEL_MIN
    assert fold(app, position).workers == 1
    assert fold(app, position, workers=2).workers == 2
    owner = logged.history.payers[0]
    mine = fold(app, position, account=owner, workers=2)
    assert mine.workers == 1 and set(mine.accounts) == {account_id_for(owner)}
    popo = Ledgercore(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    ctx = CommandContext(actor_id="x", source="admin")
    popo.execute(adjust_balance(ctx, user_id=owner, direction="credit",
                                amount=Money(10, "USD"), reason="r", render=render))
    in_memory = fold(popo, head(popo), workers=2)
    assert in_memory.workers == 1 and in_memory.balances() == {(str(owner), "USD"): 10}


def test_a_worker_without_its_database_fails_the_replay(
        new_database: Any, settings_for: Any) -> None:
    database = new_database()
    settings = settings_for(database.dsn)
    ensure_schemas(database.dsn)
    app = Ledgercore(env={**settings.eventstore_env(), "POSTGRES_CONNECT_TIMEOUT": "2"})
    try:
        ctx = CommandContext(actor_id="x", source="admin")
        app.execute(adjust_balance(ctx, user_id=uuid.uuid4(), direction="credit",
                                   amount=Money(10, "USD"), reason="r", render=render))
        database.drop()  # the workers' connections find no database
        with pytest.raises(ReplayWorkerError, match="(?s)of 2 failed.*OperationalError"):
            fold(app, 2, workers=2)
    finally:
        app.close()


def test_a_worker_that_cannot_decode_an_event_fails_the_replay(
        new_database: Any, settings_for: Any, stores_for: Any) -> None:
    stores = stores_for(settings_for(new_database().dsn))
    app = stores.app
    users = [uuid.uuid5(NS, f"undecodable:{n}") for n in range(8)]
    ctx = CommandContext(actor_id="x", source="admin")
    for user in users:
        app.execute(adjust_balance(ctx, user_id=user, direction="credit",
                                   amount=Money(10, "USD"), reason="r", render=render))
    whole = fold(app, head(app), workers=2)
    assert len(whole.accounts) == len(users)
    # one account of part 1 gets an event no JSON decoder reads
    broken = next(account_id_for(u) for u in users if account_id_for(u).bytes[15] % 2 == 1)
    recorder = app.recorder
    table = SQL("{0}.{1}").format(Identifier(recorder.datastore.schema),
                                  Identifier(recorder.events_table_name))
    with stores.query_pool.connection() as conn:
        conn.execute(SQL("UPDATE {0} SET state = %s WHERE originator_id = %s AND topic = %s")
                     .format(table), (b"{not json", broken, BillingAccount.BalanceAdjusted.TOPIC))
    with pytest.raises(ReplayWorkerError, match="(?s)worker 2 of 2 failed.*deserialise"):
        fold(app, head(app), workers=2)
    with pytest.raises(MapperDeserialisationError):
        fold(app, head(app), workers=1)
