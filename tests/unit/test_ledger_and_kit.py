"""Aggregate rules, the hash chain and the kit's invariants, in memory."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

import pytest

from domain.app import Ledgercore
from domain.billing import BillingAccount, entry_record, verify_chain
from domain.canonical import canonical_json, tagged_hash
from domain.errors import InsufficientBalance, InvalidRequest
from domain.money import INT64_MAX, Money, UnknownCurrency
from domain.testing.billing import ReferenceLedger, check_invariants

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)


def account_with(*movements: tuple[str, int, str]) -> BillingAccount:
    account = BillingAccount.open(uuid.uuid4(), "USD", {"correlation_id": "c"}, NOW)
    for direction, amount, currency in movements:
        account.adjust(direction=direction, amount=Money(amount, currency), reason="r",
                       adjustment_id=uuid.uuid4(), provenance={"correlation_id": "c"}, at=NOW)
    return account


def entries(account: BillingAccount) -> list[dict]:
    return [entry_record(e) for e in account.pending_events
            if isinstance(e, BillingAccount.LedgerEntryPosted)]


def test_money_is_integer_minor_units_of_known_currencies() -> None:
    assert Money(5, "JPY").as_json() == {"amount_minor": 5, "currency": "JPY"}
    for bad in (1.5, "5", True):
        with pytest.raises(TypeError):
            Money(bad, "USD")  # type: ignore[arg-type]
    with pytest.raises(UnknownCurrency):
        Money(1, "ZZZ")


def test_balances_are_per_currency_and_debits_never_overdraw() -> None:
    account = account_with(("credit", 100, "USD"), ("credit", 5, "EUR"), ("debit", 60, "USD"))
    assert account.balances == {"USD": 40, "EUR": 5}
    with pytest.raises(InsufficientBalance):
        account.adjust(direction="debit", amount=Money(6, "EUR"), reason="r",
                       adjustment_id=uuid.uuid4(), provenance={}, at=NOW)
    with pytest.raises(InvalidRequest):
        account.adjust(direction="credit", amount=Money(INT64_MAX, "USD"), reason="r",
                       adjustment_id=uuid.uuid4(), provenance={}, at=NOW)
    assert account.balances == {"USD": 40, "EUR": 5}


def test_every_posting_balances_to_zero_and_the_chain_verifies() -> None:
    account = account_with(("credit", 100, "USD"), ("debit", 30, "USD"), ("credit", 9, "KWD"))
    chain = entries(account)
    assert all(sum(leg["amount_minor"] for leg in e["legs"]) == 0 for e in chain)
    assert verify_chain(account.id, chain) == []


@pytest.mark.parametrize("field, value", [
    ("amount_minor", 101), ("currency", "EUR"), ("prev_hash", "f" * 64),
    ("balance_after_minor", 1), ("entry_type", "admin_debit"),
])
def test_tampering_with_any_entry_breaks_the_chain(field: str, value: object) -> None:
    account = account_with(("credit", 100, "USD"), ("debit", 30, "USD"))
    chain = entries(account)
    chain[0] = {**chain[0], field: value}
    assert verify_chain(account.id, chain)


def test_dropping_an_entry_breaks_the_chain() -> None:
    account = account_with(("credit", 1, "USD"), ("credit", 2, "USD"), ("credit", 3, "USD"))
    chain = entries(account)
    assert verify_chain(account.id, [chain[0], chain[2]])


def test_canonical_json_is_stable_and_refuses_floats() -> None:
    assert canonical_json({"b": 1, "a": [None, "é"], "c": None}) == '{"a":[null,"é"],"b":1}'.encode()
    assert tagged_hash("t", {"a": 1, "absent": None}) == tagged_hash("t", {"a": 1})
    with pytest.raises(TypeError):
        canonical_json({"amount": 1.0})


def test_kit_invariants_can_fail() -> None:
    model = ReferenceLedger()
    assert model.adjust("u", "credit", 10, "USD") == "ok"
    good = {"balances": {("u", "USD"): 10}, "entries": [("u", "USD", 10)], "chain_problems": []}
    check_invariants(model, good)
    for broken in (
        {**good, "balances": {("u", "USD"): 11}},
        {**good, "entries": [("u", "USD", 10), ("u", "USD", 10)]},
        {**good, "chain_problems": ["entry 1: entry_hash does not match"]},
    ):
        with pytest.raises(AssertionError):
            check_invariants(model, broken)


def test_event_topics_are_explicit_and_stable() -> None:
    app = Ledgercore(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    account = account_with(("credit", 1, "USD"))
    topics = [app.mapper.to_stored_event(e).topic for e in account.collect_events()]
    assert topics == ["ledgercore.BillingAccountOpened", "ledgercore.BalanceAdjusted"]


def test_db_functions_are_refused() -> None:
    with pytest.raises(RuntimeError):
        Ledgercore(env={"PERSISTENCE_MODULE": "eventsourcing.popo",
                        "POSTGRES_ENABLE_DB_FUNCTIONS": "y"})
