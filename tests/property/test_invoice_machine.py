"""Invoices under a moving clock: meters open, rate, tick and close across month ends;
months close, invoices are paid (in part, in full, too much), voided and re-issued;
prices change. After every step the invoice aggregates are checked against a small
reference model (``domain.testing.invoices``: which invoice each rated line must be
on) and the invariants of billing-ledger §4.12–13: every rated line is on exactly one
invoice that is not void, an invoice's total is the sum of its lines, a line's amount is the rated amount, lines
never change once finalized (the finalized digest still matches), ``paid`` means the
payments equal the total, and the status only moves along the allowed edges. In
memory, on the library's POPO persistence."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule)

from domain import invoices, skus, usage
from domain.app import Ledgercore
from domain.errors import DomainError
from domain.invoices import NO_ORG, Period, invoice_id_for
from domain.testing.invoices import Key, ReferenceInvoices, check_invariants, observe
from domain.provenance import CommandContext

#: two hours into a month: meters opened back-dated start in the month before (ended,
#: closable at once), later ratings of it arrive late and roll forward
T0 = datetime(2026, 12, 1, 2, tzinfo=timezone.utc)
#: how far back meters start and ratings and ends reach (µs): up to 4 days (often whole
#: hours, so usage regularly starts in the month before)
HOUR = 3600 * 10**6
BACK = st.integers(0, 96).map(lambda h: h * HOUR) | st.integers(0, 96 * HOUR)
FIRST_MONTH = Period.of(T0 - timedelta(days=4))
#: microseconds: up to 36 hours at random, or whole days (months end every few steps)
STEPS = st.integers(0, 36 * 3600 * 10**6) | st.integers(0, 31).map(lambda d: d * 86400 * 10**6)


def render(result: Any) -> dict[str, Any]:
    if isinstance(result, DomainError):
        return {"error": result.details.get("reason") or result.code, "kind": result.kind}
    return {"ok": result}


def spec(price: int) -> dict[str, Any]:
    return {"vendor": "nvidia", "display_name": "GPU", "resource_class": "gpu_baremetal",
            "billing_unit": "gpu_hour", "scheduling_unit": "node",
            "resources": {"accelerator_count": 8},
            "unit_price": {"amount_minor": price, "currency": "USD"}}


class InvoiceMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.app = Ledgercore(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
        self.model = ReferenceInvoices()
        self.clock = T0
        # deterministic ids: the same steps must draw the same way when replayed
        self.users = [uuid.UUID(int=(1 << 64) + n) for n in range(2)]
        self.orgs = [uuid.UUID(int=(2 << 64) + n) for n in range(2)] + [None]
        self.allocations = 0
        self.records: dict[str, datetime] = {}  # record id -> start
        self.run(skus.create_sku, sku="gpu", spec=spec(300))
        self.run(skus.create_sku, sku="free", spec=spec(0))  # zero lines, zero invoices

    def ctx(self) -> CommandContext:
        return CommandContext(actor_id="clock", actor_type="system", source="system",
                              now=self.clock)

    def run(self, factory: Any, **kwargs: Any) -> dict[str, Any]:
        return self.app.execute(factory(self.ctx(), render=render, **kwargs)).response

    def placed(self, answer: dict[str, Any]) -> None:
        """Tell the model about the lines a usage command rated, in rating order."""
        for line in answer["ok"]["lines"]:
            org = uuid.UUID(line["org_id"]) if line["org_id"] else NO_ORG
            self.model.place(uuid.UUID(str(line["requested_by_user_id"])), org,
                             line["bill_to"], str(line["id"]), line["amount_minor"])

    def months(self) -> list[Period]:
        months, month = [], FIRST_MONTH
        while month.start <= self.clock:
            months.append(month)
            month = month.next()
        return months

    def with_status(self, *statuses: str) -> list[Key]:
        return sorted((k for k, revs in self.model.revisions.items()
                       if revs[-1].status in statuses), key=str)

    def current_id(self, key: Key) -> uuid.UUID:
        return invoice_id_for(key[0], key[1], "USD", key[2], len(self.model.revisions[key]) - 1)

    # ---- rules -------------------------------------------------------------------
    @initialize(user=st.integers(0, 1), org=st.integers(0, 2), hours=st.integers(3, 72))
    def usage_from_last_month(self, user: int, org: int, hours: int) -> None:
        """Every run starts with a meter running since the month before."""
        self.open(user, org, 1, hours * HOUR)

    @rule(micros=STEPS)
    def advance(self, micros: int) -> None:
        self.clock += timedelta(microseconds=micros)

    @rule(user=st.integers(0, 1), org=st.integers(0, 2), units=st.integers(1, 8), back=BACK,
          sku=st.sampled_from(["gpu", "free"]))
    def open(self, user: int, org: int, units: int, back: int, sku: str = "gpu") -> None:
        self.allocations += 1
        allocation = uuid.UUID(int=(3 << 64) + self.allocations)
        start = self.clock - timedelta(microseconds=back)
        meter = usage.Meter(usage_source="allocation", allocation_id=allocation,
                            requested_by_user_id=self.users[user], org_id=self.orgs[org],
                            units=units, sku=sku)
        answer = self.run(usage.open_usage, meter=meter, start_time=start)
        assert answer["ok"]["opened"]
        self.records[str(usage.usage_id_for_allocation(allocation))] = start

    @precondition(lambda self: self.records)
    @rule(data=st.data(), back=BACK)
    def rate(self, data: Any, back: int) -> None:
        rid = data.draw(st.sampled_from(sorted(self.records)))
        until = self.clock - timedelta(microseconds=back)
        self.placed(self.run(usage.rate_usage, record_id=uuid.UUID(rid), until=until))

    @rule(limit=st.integers(1, 3))
    def tick(self, limit: int) -> None:
        while True:
            answer = self.run(usage.rate_open_usage, until=self.clock, limit=limit)
            self.placed(answer)
            if not answer["ok"]["more"]:
                break

    @precondition(lambda self: self.records)
    @rule(data=st.data(), back=BACK)
    def stop(self, data: Any, back: int) -> None:
        rid = data.draw(st.sampled_from(sorted(self.records)))
        end = max(self.records[rid], self.clock - timedelta(microseconds=back))
        self.placed(self.run(usage.close_usage, record_id=uuid.UUID(rid), end_time=end))

    @rule(price=st.integers(0, 10**6))
    def change_price(self, price: int) -> None:
        """A later price never revalues a line already rated or invoiced."""
        self.run(skus.update_sku, sku="gpu", spec=spec(price),
                 live_claims=lambda session, name: False)

    def ended(self) -> list[Period]:
        return [month for month in self.months() if month.end <= self.clock]

    @rule()
    def close_current_month(self) -> None:
        before = self.app.recorder.max_notification_id()
        answer = self.run(invoices.close_invoice_period, period=Period.of(self.clock).key)
        assert answer == {"error": "period_not_ended", "kind": "invalid"}
        assert self.app.recorder.max_notification_id() == before

    @precondition(lambda self: self.ended())
    @rule(data=st.data(), limit=st.integers(1, 3), rate_first=st.booleans())
    def close_month(self, data: Any, limit: int, rate_first: bool) -> None:
        """Close an ended month (again, possibly: a re-run issues re-issued drafts);
        ``rate_first`` as the CLI does: every open meter rated up to the month's end."""
        self._close(data.draw(st.sampled_from(self.ended())), limit, rate_first)

    def _close(self, month: Period, limit: int, rate_first: bool) -> None:
        while rate_first:
            answer = self.run(usage.rate_open_usage, until=month.end, limit=limit)
            self.placed(answer)
            if not answer["ok"]["more"]:
                break
        while True:
            answer = self.run(invoices.close_invoice_period, period=month.key, limit=limit)
            assert len(answer["ok"]["finalized"]) <= limit
            if not answer["ok"]["more"]:
                break
        self.model.close(month.key)

    @precondition(lambda self: self.with_status("issued", "partially_paid"))
    @rule(data=st.data(), part=st.just(100) | st.integers(1, 99), extra=st.booleans())
    def pay(self, data: Any, part: int, extra: bool) -> None:
        """Pay part or all of what is left (``extra``: one minor unit too much)."""
        key = data.draw(st.sampled_from(self.with_status("issued", "partially_paid")))
        current = self.model.current(key)
        outstanding = current.total - current.applied
        amount = max(1, outstanding * part // 100) + (1 if extra else 0)
        answer = self.run(invoices.apply_invoice_payment, invoice_id=self.current_id(key),
                          amount_minor=amount, reference="test")
        refusal = self.model.pay(key, amount)
        assert answer.get("error") == refusal, (answer, refusal)

    @precondition(lambda self: self.with_status("issued"))
    @rule(data=st.data(), reissue=st.booleans())
    def void(self, data: Any, reissue: bool) -> None:
        """Void and re-issue: the lines move to a new draft of the same month, which
        the month's next close issues (``reissue``: at once)."""
        key = data.draw(st.sampled_from(self.with_status("issued")))
        answer = self.run(invoices.void_invoice, invoice_id=self.current_id(key), reason="wrong")
        assert self.model.void(key) is None and "ok" in answer, answer
        if reissue:
            self._close(Period.parse(key[2]), 3, False)

    @precondition(lambda self: self.model.revisions)
    @rule(data=st.data(), pay=st.booleans())
    def pay_or_void_any(self, data: Any, pay: bool) -> None:
        """Any invoice, any state: refused exactly when the model refuses (a draft, a
        paid or a voided one), and a refusal appends nothing."""
        key = data.draw(st.sampled_from(sorted(self.model.revisions, key=str)))
        revision = data.draw(st.integers(0, len(self.model.revisions[key]) - 1))
        invoice_id = invoice_id_for(key[0], key[1], "USD", key[2], revision)
        before = self.app.recorder.max_notification_id()
        if pay:
            answer = self.run(invoices.apply_invoice_payment, invoice_id=invoice_id,
                              amount_minor=1, reference="test")
            refusal = (self.model.pay(key, 1) if revision == len(self.model.revisions[key]) - 1
                       else "invoice_not_payable")
        else:
            answer = self.run(invoices.void_invoice, invoice_id=invoice_id, reason="wrong")
            refusal = (self.model.void(key) if revision == len(self.model.revisions[key]) - 1
                       else "invoice_not_voidable")
        assert answer.get("error") == refusal, (answer, refusal)
        if refusal is not None:
            assert self.app.recorder.max_notification_id() == before

    @rule()
    def unknown_invoice(self) -> None:
        answer = self.run(invoices.apply_invoice_payment, invoice_id=uuid.uuid4(),
                          amount_minor=1, reference="test")
        assert answer == {"error": "invoice_not_found", "kind": "not_found"}

    # ---- invariants ----------------------------------------------------------------
    @invariant()
    def invoices_match_the_model_and_hold_the_invariants(self) -> None:
        check_invariants(self.model, observe(self.app, self.model, list(self.records)))


TestInvoiceMachine = InvoiceMachine.TestCase
TestInvoiceMachine.settings = settings(max_examples=500, stateful_step_count=20, deadline=None)
