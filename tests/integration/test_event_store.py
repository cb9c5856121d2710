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
