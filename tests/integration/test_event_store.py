"""The event store's recorder (``infra.event_store``) on a real Postgres: one save of
several aggregates stores every event once, in order, each under the notification id
the save answered, and reads back equal; a stale version is refused whole."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

import pytest
from eventsourcing.persistence import IntegrityError

from domain.billing import BillingAccount
from domain.money import Money
from infra.event_store import ArrayInsertRecorder

PROVENANCE = {"actor_id": str(uuid.uuid4()), "actor_type": "user", "actor_role": "admin",
              "source": "test", "correlation_id": None, "causation_id": None}


def account_with(entries: int) -> BillingAccount:
    now = datetime.now(timezone.utc)
    account = BillingAccount.open(uuid.uuid4(), "USD", PROVENANCE, now)
    for n in range(entries):
        account.adjust(direction="credit", amount=Money(100 + n, "USD"), reason="r",
                       adjustment_id=uuid.uuid4(), provenance=PROVENANCE, at=now)
    return account


def test_a_save_of_several_aggregates_is_stored_in_order(new_database: Any, settings_for: Any,
                                                         stores_for: Any) -> None:
    app = stores_for(settings_for(new_database().dsn)).app
    assert isinstance(app.recorder, ArrayInsertRecorder)
    accounts = [account_with(n) for n in (3, 1, 5)]
    pending = [(a.id, e.originator_version) for a in accounts for e in a._pending_events]
    recordings = app.save(*accounts)
    assert [(r.domain_event.originator_id, r.domain_event.originator_version)
            for r in recordings] == pending
    ids = [r.notification.id for r in recordings]
    assert ids == sorted(ids) and len(set(ids)) == len(ids) == 12
    stored = app.recorder.select_notifications(ids[0], len(ids))
    assert [(n.id, n.originator_id, n.originator_version) for n in stored] == [
        (i, *p) for i, p in zip(ids, pending)]
    for account in accounts:
        again = app.repository.get(account.id)
        assert again.version == account.version and again.balances == account.balances

    stale = app.repository.get(accounts[0].id)
    fresh = account_with(2)
    stale.adjust(direction="credit", amount=Money(1, "USD"), reason="r",
                 adjustment_id=uuid.uuid4(), provenance=PROVENANCE,
                 at=datetime.now(timezone.utc))
    accounts[0].adjust(direction="credit", amount=Money(2, "USD"), reason="r",
                       adjustment_id=uuid.uuid4(), provenance=PROVENANCE,
                       at=datetime.now(timezone.utc))
    app.save(accounts[0])
    with pytest.raises(IntegrityError):
        app.save(fresh, stale)
    assert app.get_or_none(fresh.id) is None  # nothing of the refused save is stored
    assert app.recorder.max_notification_id() == ids[-1] + 1


def test_racing_saves_never_let_a_reader_see_a_later_id_before_an_earlier_one(
        new_database: Any, settings_for: Any, stores_for: Any) -> None:
    """Saves from four threads race while a reader tails the log: whenever the reader
    has seen notification id N, every id below N it will ever see was already there
    (the table lock makes commits follow id order), and each save NOTIFYs."""
    import threading

    import psycopg

    settings = settings_for(new_database().dsn)
    app = stores_for(settings).app
    listener = psycopg.connect(settings.pg_dsn, autocommit=True)
    listener.execute(f'LISTEN "{app.recorder.channel_name}"')
    polls: list[tuple[int, int]] = []  # (highest id seen, how many ids at or below it)
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            ids = [n.id for n in app.recorder.select_notifications(1, 100_000)]
            if ids:
                polls.append((ids[-1], len(ids)))

    def write() -> None:
        for n in range(60):
            app.save(*[account_with(n % 3) for _ in range(1 + n % 2)])

    reader = threading.Thread(target=read)
    writers = [threading.Thread(target=write) for _ in range(4)]
    reader.start()
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    done.set()
    reader.join()
    final = [n.id for n in app.recorder.select_notifications(1, 100_000)]
    assert len(final) == 4 * sum((1 + n % 2) * (1 + n % 3) for n in range(60))
    assert len(polls) > 10
    for highest, count in polls:
        assert sum(1 for i in final if i <= highest) == count
    notified = sum(1 for _ in listener.notifies(timeout=1, stop_after=240))
    listener.close()
    assert notified == 240
