"""The billing-ledger and audit-log read models write a batch in one statement per table
(``INSERT ... SELECT FROM unnest(...)``): what a batch writes must not depend on how the
events were cut into batches. Applied straight to schemas of a fresh database, with
events made in memory."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from domain.billing import BillingAccount
from domain.money import Money
from projections.audit_logs import AuditLogs
from projections.billing_ledger import BillingLedger
from projections.store import Item

PROJECTIONS = (BillingLedger(), AuditLogs())
KEYS = {"billing_accounts": "account_id", "ledger_entries": "entry_id",
        "balances": "owner_user_id, currency", "audit_logs": "id",
        "audit_log_scopes": "aggregate_id"}
AT = datetime(2025, 3, 1, tzinfo=timezone.utc)


@pytest.fixture
def conn(new_database: Any) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(new_database().dsn, autocommit=True, row_factory=dict_row) as conn:
        yield conn


def schema(conn: psycopg.Connection[Any], name: str) -> str:
    conn.execute(f'CREATE SCHEMA "{name}"')
    for projection in PROJECTIONS:
        for statement in projection.ddl(name):
            conn.execute(statement)
    return name


def apply(conn: psycopg.Connection[Any], name: str, batches: Sequence[Sequence[Item]]) -> None:
    for batch in batches:
        with conn.transaction(), conn.cursor() as cur:
            for projection in PROJECTIONS:
                projection.apply_many(cur, name, batch)


def rows(conn: psycopg.Connection[Any], name: str) -> dict[str, list[dict[str, Any]]]:
    return {table: conn.execute(f'SELECT * FROM "{name}".{table} ORDER BY {key}').fetchall()
            for table, key in KEYS.items()}


def provenance(causation: str | None) -> dict[str, Any]:
    return {"actor_id": str(uuid.uuid4()), "actor_type": "user", "actor_role": "admin",
            "source": "admin", "correlation_id": str(uuid.uuid4()), "causation_id": causation}


def history() -> tuple[list[Item], uuid.UUID, uuid.UUID]:
    """Two accounts. Command 1 opens A and adjusts it in USD twice and EUR once; command
    2 opens B with one USD credit; command 3 credits A and B in USD; then an event
    recorded without a causation id (a row of its own)."""
    a_user, b_user = uuid.uuid4(), uuid.uuid4()
    first = provenance(str(uuid.uuid4()))
    a = BillingAccount.open(a_user, "USD", first, AT)
    for n, (direction, minor, currency) in enumerate((("credit", 1000, "USD"),
                                                      ("debit", 300, "USD"),
                                                      ("credit", 70, "EUR"))):
        a.adjust(direction=direction, amount=Money(minor, currency), reason="test",
                 adjustment_id=uuid.uuid4(), provenance=first,
                 at=AT + timedelta(seconds=n + 1))
    second = provenance(str(uuid.uuid4()))
    b = BillingAccount.open(b_user, "USD", second, AT + timedelta(seconds=10))
    b.adjust(direction="credit", amount=Money(5, "USD"), reason="test",
             adjustment_id=uuid.uuid4(), provenance=second, at=AT + timedelta(seconds=11))
    events = a.collect_events() + b.collect_events()
    third = provenance(str(uuid.uuid4()))
    for n, account in enumerate((a, b)):
        account.adjust(direction="credit", amount=Money(20 + n, "USD"), reason="test",
                       adjustment_id=uuid.uuid4(), provenance=third,
                       at=AT + timedelta(seconds=20 + n))
    a.adjust(direction="credit", amount=Money(1, "EUR"), reason="test",
             adjustment_id=uuid.uuid4(), provenance=provenance(None),
             at=AT + timedelta(seconds=30))
    events += a.collect_events() + b.collect_events()
    events.sort(key=lambda e: e.timestamp)
    return [Item(n, event) for n, event in enumerate(events, start=1)], a_user, b_user


def test_one_batch_writes_what_event_by_event_and_split_batches_write(
        conn: psycopg.Connection[Any]) -> None:
    items, a_user, b_user = history()
    apply(conn, schema(conn, "whole"), [items])
    apply(conn, schema(conn, "single"), [[item] for item in items])
    # command 1 cut after its opening and first entry; command 3 across two batches
    apply(conn, schema(conn, "split"), [items[:2], items[2:8], items[8:]])
    whole = rows(conn, "whole")
    assert rows(conn, "single") == whole
    assert rows(conn, "split") == whole

    balances = {(r["owner_user_id"], r["currency"]): (r["amount_minor"], r["notification_id"])
                for r in whole["balances"]}
    by_id = {e.event.entry_id: e.notification_id for e in items
             if isinstance(e.event, BillingAccount.LedgerEntryPosted)}
    last = {key: max(by_id[r["entry_id"]] for r in whole["ledger_entries"]
                     if (r["owner_user_id"], r["currency"]) == key) for key in balances}
    assert balances == {(a_user, "USD"): (1000 - 300 + 20, last[(a_user, "USD")]),
                        (a_user, "EUR"): (70 + 1, last[(a_user, "EUR")]),
                        (b_user, "USD"): (5 + 21, last[(b_user, "USD")])}
    assert len(whole["ledger_entries"]) == 7
    assert [r["legs"] for r in whole["ledger_entries"]] == [
        next(i.event.legs for i in items if getattr(i.event, "entry_id", None) == r["entry_id"])
        for r in whole["ledger_entries"]]
    audit = whole["audit_logs"]
    assert sorted(r["event_count"] for r in audit) == [1, 2, 2, 4]
    opening = next(r for r in audit if r["event_count"] == 4)
    assert opening["action"] == "billing.balance.adjust"  # the first adjustment leads
    assert opening["lead_notification_id"] == 2 and opening["first_notification_id"] == 1
    assert opening["details"]["amount_minor"] == 1000 and opening["subject_user_id"] == a_user
    assert all(r["actor_user_id"] is not None and r["project_id"] is None for r in audit)
    assert {(r["user_id"], r["project_id"], r["org_id"]) for r in whole["audit_log_scopes"]} \
        == {(a_user, None, None), (b_user, None, None)}


def test_a_commands_events_in_any_batch_order_make_one_row(
        conn: psycopg.Connection[Any]) -> None:
    """The audit upsert's merge does not depend on arrival order (Kafka partitions):
    command 1 (the first four events) together, last-first, and interleaved."""
    items = history()[0][:4]
    audit = AuditLogs()
    for name, batches in (("together", [items]), ("reversed", [items[2:], items[:2]]),
                          ("interleaved", [items[1::2], items[0::2]])):
        schema(conn, name)
        for batch in batches:
            with conn.transaction(), conn.cursor() as cur:
                audit.apply_many(cur, name, batch)
    together = rows(conn, "together")["audit_logs"]
    assert len(together) == 1 and together[0]["event_count"] == 4
    assert rows(conn, "reversed")["audit_logs"] == together
    assert rows(conn, "interleaved")["audit_logs"] == together


def test_apply_one_event_still_works(conn: psycopg.Connection[Any]) -> None:
    items, a_user, _ = history()
    name = schema(conn, "one")
    with conn.transaction(), conn.cursor() as cur:
        for item in items:
            for projection in PROJECTIONS:
                projection.apply(cur, name, item.event, item.notification_id)
    whole = schema(conn, "whole")
    apply(conn, whole, [items])
    assert rows(conn, name) == rows(conn, whole)
    orphan = items[1].event  # an entry of an account this schema never opened
    with pytest.raises(LookupError), conn.transaction(), conn.cursor() as cur:
        BillingLedger().apply(cur, schema(conn, "empty"), orphan, 1)
