"""The reconciliation checks as pure functions, and a fold of an in-memory event log.
(The HTTP side and planted problems on Postgres: tests/integration/test_finance_admin.py.)"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

from domain.allocations import Allocation
from domain.app import Ledgercore
from domain.billing import BillingAccount, entry_record
from domain.money import Money
from domain.reconciliation import (LineFacts, RecordFacts, check, fold_log, inspect,
                                   ledger_problems, severity_of, usage_problems)

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
H = timedelta(hours=1)
PROVENANCE = {"correlation_id": "c", "actor_id": "t", "actor_type": "system"}


def record(allocation: uuid.UUID | None, end: datetime | None = None,
           billed: datetime | None = None, source: str = "allocation") -> RecordFacts:
    return RecordFacts(uuid.uuid4(), source, allocation, T0, end, billed)


def charged_account(owner: uuid.UUID, line_id: uuid.UUID, amount: int) -> BillingAccount:
    account = BillingAccount.open(owner, "USD", PROVENANCE, T0)
    account.move(entry_type="usage_charge", amount=Money(amount, "USD"),
                 reference_type="rated_usage_line", reference_id=str(line_id), details={},
                 provenance=PROVENANCE, at=T0 + H)
    return account


def test_meters_follow_the_metered_statuses() -> None:
    active, releasing, released, requested = (uuid.uuid4() for _ in range(4))
    statuses = {active: "active", releasing: "releasing", released: "released",
                requested: "requested"}
    open_for_releasing = record(releasing)
    orphan_released, orphan_requested, orphan_gone = (record(released), record(requested),
                                                      record(uuid.uuid4()))
    app_runtime = record(None, source="app_runtime")  # no app lifecycle here: not judged
    missing, orphans, unbilled = usage_problems(
        statuses, [open_for_releasing, orphan_released, orphan_requested, orphan_gone,
                   app_runtime], [], {})
    assert missing == [active]
    assert {r.id for r in orphans} == {orphan_released.id, orphan_requested.id, orphan_gone.id}
    assert unbilled == {}


def test_unbilled_means_not_rated_to_the_end_or_a_line_without_its_charge() -> None:
    owner = uuid.uuid4()
    done = record(None, end=T0 + H, billed=T0 + H)
    short = record(None, end=T0 + H, billed=T0 + H / 2)
    never = record(None, end=T0 + H)
    instant = record(None, end=T0)  # closed at its start: nothing to rate
    good_line, lost_line, wrong_line, free_line = (uuid.uuid4() for _ in range(4))
    good = charged_account(owner, good_line, 100)
    wrong = charged_account(uuid.uuid4(), wrong_line, 99)
    entries = {e["entry_id"]: e for a in (good, wrong) for e in
               (entry_record(x) for x in a.pending_events if hasattr(x, "entry_id"))}
    good_entry, wrong_entry = list(entries)
    charging = record(None)
    lines = [LineFacts(done.id, good_line, 100, "USD", good_entry),
             LineFacts(charging.id, lost_line, 50, "USD", None),
             LineFacts(instant.id, wrong_line, 100, "USD", wrong_entry),
             LineFacts(never.id, free_line, 0, "USD", None)]
    _, _, unbilled = usage_problems({}, [done, short, never, instant, charging], lines, entries)
    assert set(unbilled) == {short.id, never.id, charging.id, instant.id}
    assert "no usage_charge" in unbilled[charging.id]
    assert "does not charge it" in unbilled[instant.id]


def test_severity_and_ledger_integrity() -> None:
    assert severity_of(0, 0, 0, 0) == "ok"
    assert severity_of(1, 0, 0, 0) == severity_of(0, 2, 0, 0) == "warn"
    assert severity_of(0, 0, 1, 0) == severity_of(0, 0, 0, 1) == "error"
    account = BillingAccount.open(uuid.uuid4(), "USD", PROVENANCE, T0)
    for amount in (500, 200):
        account.adjust(direction="credit", amount=Money(amount, "USD"), reason="r",
                       adjustment_id=uuid.uuid4(), provenance=PROVENANCE, at=T0)
    chain = [entry_record(e) for e in account.pending_events if hasattr(e, "entry_id")]
    assert ledger_problems({account.id: chain}, {account.id: account}) == []
    tampered = [chain[0], {**chain[1], "amount_minor": 300}]
    problems = ledger_problems({account.id: tampered}, {account.id: account})
    assert any("entry_hash" in p for p in problems) and any("sums" in p for p in problems)
    assert ledger_problems({uuid.uuid4(): []}, {}) != []  # entries without an account


def test_a_fold_of_the_log_sees_what_the_aggregates_say() -> None:
    app = Ledgercore(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    allocation = Allocation._create(Allocation.Created, id=uuid.uuid4(), lease={},
                                    provenance=PROVENANCE, timestamp=T0)
    allocation.trigger_event(Allocation.Moved, to="active", reason=None, details={}, provenance=PROVENANCE,
                             timestamp=T0)
    account = BillingAccount.open(uuid.uuid4(), "USD", PROVENANCE, T0)
    account.adjust(direction="credit", amount=Money(5, "USD"), reason="r",
                   adjustment_id=uuid.uuid4(), provenance=PROVENANCE, at=T0)
    app.save(allocation, account)
    folded = fold_log(app, app.recorder.max_notification_id(), page=1)
    assert folded.allocations == {allocation.id: "active"}
    assert list(folded.entries) == [account.id] and folded.accounts[account.id].balances == \
        {"USD": 5}
    report = check(folded, T0)
    assert report.summary["missing_open_usage_count"] == 1
    assert report.summary["sample_allocation_id"] == str(allocation.id)
    assert report.summary["severity"] == "warn" and report.stats["ledger_entries"] == 1
    assert inspect(app).summary["missing_open_usage_count"] == 1
