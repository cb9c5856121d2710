"""Meters under a moving clock: open, tick, rate, re-rate, close, and price or FX
changes after open, checked after every step against the kit's reference model
(``domain.testing.usage``) on the library's in-memory persistence."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from domain import skus, usage
from domain.app import Ledgercore
from domain.billing import BillingAccount, account_id_for, entry_record, verify_chain
from domain.errors import DomainError
from domain.provenance import CommandContext
from domain.rating import fx_snapshot
from domain.testing.usage import ModelRecord, ReferenceUsage, check_usage_invariants

T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)
#: SKU -> price currency; the accounts are in USD, so the others are rated through FX
SKUS = {"h100-usd": "USD", "a100-eur": "EUR", "l4-jpy": "JPY", "mi300-kwd": "KWD"}
RATES = st.sampled_from(["1.0850", "0.9", "1", "0.0067", "3.2500", "1.000000000000000001"])
#: small prices make exact halves (ties) common, large ones exercise the range
PRICES = st.integers(0, 9) | st.integers(0, 10**7)
#: microseconds: up to 3 h at random (off the millisecond grid, truncated onto it), or
#: whole quarter hours (halves of small prices: ties to round to even)
STEPS = st.integers(0, 3 * 3600 * 10**6) | st.sampled_from([0, 15, 30, 45, 90]).map(
    lambda minutes: minutes * 60 * 10**6)


def render(result: Any) -> dict[str, Any]:
    if isinstance(result, DomainError):
        return {"error": result.details.get("reason") or result.code, "kind": result.kind}
    return {"ok": result}


def spec(price: int, currency: str) -> dict[str, Any]:
    return {"vendor": "nvidia", "display_name": "GPU", "resource_class": "gpu_baremetal",
            "billing_unit": "gpu_hour", "scheduling_unit": "node",
            "resources": {"accelerator_count": 8}, "unit_price": {"amount_minor": price,
                                                                   "currency": currency}}


class UsageMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.app = Ledgercore(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
        self.model = ReferenceUsage()
        self.clock = T0
        self.users = [uuid.uuid4() for _ in range(2)]
        self.prices = {sku: (3, currency) for sku, currency in SKUS.items()}
        self.rates = {currency: "1.0850" for currency in SKUS.values() if currency != "USD"}
        self.allocations: list[uuid.UUID] = []
        self.costs: dict[str, int] = {}
        self.last_until: dict[str, datetime] = {}
        for sku, (price, currency) in self.prices.items():
            self.run(skus.create_sku, sku=sku, spec=spec(price, currency))

    def ctx(self) -> CommandContext:
        return CommandContext(actor_id="clock", actor_type="system", source="system",
                              now=self.clock)

    def run(self, factory: Any, **kwargs: Any) -> dict[str, Any]:
        return self.app.execute(factory(self.ctx(), render=render, **kwargs)).response

    def position(self) -> int:
        return self.app.recorder.max_notification_id() or 0

    def record_ids(self) -> list[str]:
        return list(self.model.records)

    # ---- rules -------------------------------------------------------------------
    @rule(micros=STEPS)
    def advance(self, micros: int) -> None:
        self.clock += timedelta(microseconds=micros)

    @rule(user=st.integers(0, 1), sku=st.sampled_from(sorted(SKUS)), units=st.integers(1, 16),
          back=STEPS, again=st.booleans())
    def open(self, user: int, sku: str, units: int, back: int, again: bool) -> None:
        """An allocation becomes active (``again``: the same activation delivered twice)."""
        if again and self.allocations:
            allocation = self.allocations[-1]
        else:
            allocation = uuid.uuid4()
            self.allocations.append(allocation)
        price, currency = self.prices[sku]
        start = max(T0, self.clock - timedelta(microseconds=back))
        fx = None if currency == "USD" else fx_snapshot(
            source_currency=currency, target_currency="USD", rate=self.rates[currency],
            provider="manual", provider_rate_id=None, captured_at=self.clock)
        meter = usage.Meter(usage_source="allocation", allocation_id=allocation,
                            requested_by_user_id=self.users[user], units=units, sku=sku)
        answer = self.run(usage.open_usage, meter=meter, start_time=start, fx=fx)
        rid = str(usage.usage_id_for_allocation(allocation))
        opened = self.model.open(rid, ModelRecord(
            owner=str(self.users[user]), start=start, units=units, price_minor=price,
            price_currency=currency, amount_currency="USD",
            fx_rate=None if fx is None else fx["rate"]))
        assert answer["ok"]["opened"] == opened

    @rule(sku=st.sampled_from(sorted(SKUS)), price=PRICES)
    def change_price(self, sku: str, price: int) -> None:
        """A later price never revalues an open record: the model keeps each record's."""
        currency = self.prices[sku][1]
        self.run(skus.update_sku, sku=sku, spec=spec(price, currency),
                 live_claims=lambda session, name: False)
        self.prices[sku] = (price, currency)

    @rule(currency=st.sampled_from(["EUR", "JPY", "KWD"]), rate=RATES)
    def change_fx(self, currency: str, rate: str) -> None:
        self.rates[currency] = rate

    @precondition(lambda self: self.model.records)
    @rule(data=st.data(), back=STEPS)
    def rate(self, data: Any, back: int) -> None:
        rid = data.draw(st.sampled_from(self.record_ids()))
        until = max(T0, self.clock - timedelta(microseconds=back))
        before = self.position()
        answer = self.run(usage.rate_usage, record_id=uuid.UUID(rid), until=until)
        amount = self.model.rate(rid, until)
        lines = answer["ok"]["lines"]
        assert [l["amount_minor"] for l in lines] == ([] if amount is None else [amount])
        assert (self.position() == before) == (amount is None)
        self.last_until[rid] = until

    @precondition(lambda self: self.last_until)
    @rule(data=st.data())
    def rerate(self, data: Any) -> None:
        """Rating up to a moment already billed appends nothing."""
        rid = data.draw(st.sampled_from(sorted(self.last_until)))
        before = self.position()
        answer = self.run(usage.rate_usage, record_id=uuid.UUID(rid), until=self.last_until[rid])
        assert answer["ok"]["lines"] == [] and self.position() == before
        assert self.model.rate(rid, self.last_until[rid]) is None

    @rule(limit=st.integers(1, 4))
    def tick(self, limit: int) -> None:
        """The clock tick rates every open record up to now, ``limit`` at a time."""
        while True:
            answer = self.run(usage.rate_open_usage, until=self.clock, limit=limit)["ok"]
            assert answer["rated_records"] <= limit and not answer["failed"]
            for line in answer["lines"]:
                rid = str(line["usage_record_id"])
                assert self.model.rate(rid, self.clock) == line["amount_minor"]
            if not answer["more"]:
                break
        for rid in self.model.open_ids():  # every open record is billed up to now
            assert self.model.rate(rid, self.clock) is None

    @precondition(lambda self: self.model.records)
    @rule(data=st.data(), back=STEPS)
    def close(self, data: Any, back: int) -> None:
        rid = data.draw(st.sampled_from(self.record_ids()))
        end = max(self.model.records[rid].start, self.clock - timedelta(microseconds=back))
        self.run(usage.close_usage, record_id=uuid.UUID(rid), end_time=end)
        self.model.close(rid, end)

    @rule()
    def never_opened(self) -> None:
        """A lease that never became active has no record: rating or closing it bills
        nothing and appends nothing."""
        before = self.position()
        missing = usage.usage_id_for_allocation(uuid.uuid4())
        for factory, kwargs in ((usage.rate_usage, {"until": self.clock}),
                                (usage.close_usage, {"end_time": self.clock})):
            answer = self.run(factory, record_id=missing, **kwargs)
            assert answer == {"error": "usage_record_not_found", "kind": "not_found"}
        assert self.position() == before

    # ---- invariants ----------------------------------------------------------------
    def live(self) -> dict[str, Any]:
        records = {}
        for rid in self.model.records:
            record = self.app.repository.get(uuid.UUID(rid))
            lines = [{"id": str(e.rated_usage_line_id), "bill_from": e.bill_from,
                      "bill_to": e.bill_to, "amount": e.amount["amount_minor"],
                      "ledger_entry_id": e.ledger_entry_id, "rating_key": e.rating_key}
                     for e in self.app.events.get(record.id)
                     if isinstance(e, usage.UsageRecord.SliceRated)]
            records[rid] = {"cost": record.cost_minor, "start": record.start_time,
                            "end": record.end_time, "last_billed_at": record.last_billed_at,
                            "lines": lines}
        charges: dict[tuple[str, str], list[tuple[str, int]]] = {}
        balances, problems = {}, []
        for user in self.users:
            account = self.app.billing_account(user)
            if account is None:
                continue
            entries = [e for e in self.app.events.get(account_id_for(user))
                       if isinstance(e, BillingAccount.LedgerEntryPosted)]
            for e in entries:
                assert e.entry_type == "usage_charge" and e.reference_type == "rated_usage_line"
                charges.setdefault((str(user), e.currency), []).append(
                    (e.reference_id, e.amount_minor))
            balances.update({(str(user), c): a for c, a in account.balances.items()})
            problems += verify_chain(account.id, [entry_record(e) for e in entries])
        return {"records": records, "charges": charges, "balances": balances,
                "chain_problems": problems}

    @invariant()
    def matches_the_model(self) -> None:
        check_usage_invariants(self.model, self.live())

    @invariant()
    def accrued_cost_is_monotone(self) -> None:
        for rid, record in self.model.records.items():
            assert record.cost >= self.costs.get(rid, 0)
            self.costs[rid] = record.cost


TestUsageMachine = UsageMachine.TestCase
TestUsageMachine.settings = settings(max_examples=500, stateful_step_count=25, deadline=None)

