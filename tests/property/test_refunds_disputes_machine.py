"""Refunds and disputes over credited payments, with provider events (dispute updates,
refund outcomes) delivered late, out of order and repeatedly, admin credits and
debits, collections holds and a clock that moves across the refund window; checked
after every step against ``domain.testing.refunds`` and the ledger's hash chain."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from domain.app import Ledgercore
from domain.billing import BillingAccount, adjust_balance, entry_record, verify_chain
from domain.disputes import ProviderDispute, dispute_id_for, dispute_update
from domain.errors import DomainError
from domain.money import Money
from domain.payments import checkout_event, create_charge_session, provider_event
from domain.provenance import CommandContext
from domain.refunds import ProviderRefund, create_refund, refund_outcome
from domain.restrictions import set_financial_restriction
from domain.testing.refunds import ReferenceRefunds, check_invariants

CURRENCIES = ("USD", "JPY")
DISPUTE_STATUSES = ("warning_needs_response", "needs_response", "under_review", "won", "lost",
                    "warning_closed")
REFUND_STATUSES = ("succeeded", "failed", "canceled", "pending")


def render(result: Any) -> dict[str, Any]:
    if isinstance(result, DomainError):
        return {"refused": result.details.get("reason", result.code)}
    return result


class RefundsDisputesMachine(RuleBasedStateMachine):
    payments = Bundle("payments")
    provider_refunds = Bundle("provider_refunds")
    deliveries = Bundle("deliveries")

    def __init__(self) -> None:
        super().__init__()
        self.app = Ledgercore(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
        self.model = ReferenceRefunds()
        self.users = [uuid.uuid4() for _ in range(2)]
        self.clock = datetime(2024, 1, 1, tzinfo=timezone.utc)
        self.refund_ids: list[str] = []

    def ctx(self, source: str = "admin") -> CommandContext:
        return CommandContext(actor_id="property", source=source, now=self.clock)

    def run(self, command: Any) -> dict[str, Any]:
        return self.app.execute(command).response

    # ---- money in and out ----------------------------------------------------------
    @rule(target=payments, n=st.integers(0, 1), amount=st.integers(1, 10**6),
          currency=st.sampled_from(CURRENCIES))
    def pay(self, n: int, amount: int, currency: str) -> str:
        session_id, intent = uuid.uuid4(), f"pi_{uuid.uuid4().hex[:12]}"
        money = Money(amount, currency)
        self.run(create_charge_session(
            self.ctx("api"), session_id=session_id, org_id=uuid.uuid4(), user_id=self.users[n],
            provider_session_id=f"cs_{session_id.hex}", url="https://x.invalid", amount=money,
            render=render))
        assert self.run(checkout_event(
            self.ctx("webhook"), provider_event_id=f"evt_{uuid.uuid4().hex}",
            event_type="checkout.session.completed", payload_sha256="0" * 64,
            payment_session_id=session_id, amount=money, payment_intent_id=intent,
            render=render)) == {"ok": True, "applied": True}
        self.model.pay(str(session_id), str(self.users[n]), amount, currency, self.clock, intent)
        return str(session_id)

    @rule(days=st.integers(0, 20), hours=st.integers(0, 23))
    def time_passes(self, days: int, hours: int) -> None:
        self.clock += timedelta(days=days, hours=hours)

    @rule(n=st.integers(0, 1), direction=st.sampled_from(["credit", "debit"]),
          amount=st.integers(1, 10**6), currency=st.sampled_from(CURRENCIES))
    def adjust(self, n: int, direction: str, amount: int, currency: str) -> None:
        """Admin credits (never refundable) and debits."""
        answer = self.run(adjust_balance(self.ctx(), user_id=self.users[n], direction=direction,
                                         amount=Money(amount, currency), reason="p",
                                         render=render))
        expected = self.model.adjust(str(self.users[n]), direction, amount, currency)
        assert answer.get("refused", "ok") == expected

    @rule(n=st.integers(0, 1), currency=st.sampled_from(CURRENCIES), percent=st.integers(1, 100))
    def usage(self, n: int, currency: str, percent: int) -> None:
        """Spend part of the balance (an admin debit standing in for usage charges)."""
        amount = self.model.balances.get((str(self.users[n]), currency), 0) * percent // 100
        if amount > 0:
            self.adjust(n, "debit", amount, currency)

    @rule(n=st.integers(0, 1), hold=st.sampled_from([False, False, True]))
    def restrict(self, n: int, hold: bool) -> None:
        state = "collections_hold" if hold else "healthy"
        self.run(set_financial_restriction(self.ctx(), scope_type="user", scope_id=self.users[n],
                                           state=state, reason="p", metadata={}, render=render))
        (self.model.blocked.add if hold else self.model.blocked.discard)(str(self.users[n]))

    # ---- refunds -------------------------------------------------------------------
    def _refund(self, user: uuid.UUID, amount: int, currency: str, reference: str | None,
                mode: str) -> tuple[str, dict[str, Any]]:
        refund_id = uuid.uuid4()
        answer = self.run(create_refund(
            self.ctx(), refund_id=refund_id, user_id=user, requested_by_user_id=None,
            amount=Money(amount, currency), reason="property", payment_reference=reference,
            mode=mode, render=render))
        expected = self.model.refund(str(refund_id), str(user), amount, currency, reference,
                                     mode, self.clock)
        if isinstance(expected, str):
            assert answer == {"refused": expected}, (answer, expected)
            event(f"refund refused: {expected}")
        else:
            event(f"refund {expected['outcome']}, capped={expected['unused_balance_rule_applied']}")
            assert answer["status"] == expected["status"] and \
                answer["outcome"] == expected["outcome"], (answer, expected)
            assert answer["amount"] == {"amount_minor": expected["amount"], "currency": currency}
            assert answer["policy_applied"] == {
                "refund_window_days": 30, "in_window": expected["in_window"],
                "unused_balance_rule_applied": expected["unused_balance_rule_applied"]}
            self.refund_ids.append(str(refund_id))
        return str(refund_id), answer

    @rule(target=provider_refunds, payment=payments, fraction=st.integers(1, 100),
          by_intent=st.booleans(), mode=st.sampled_from(["auto_policy", "force_internal_credit"]),
          spent=st.sampled_from([0, 0, 30, 70]), stranger=st.sampled_from([False] * 5 + [True]))
    def refund_payment(self, payment: str, fraction: int, by_intent: bool, mode: str,
                       spent: int, stranger: bool) -> str:
        """Refund (part of, or more than) a payment, after spending ``spent`` percent
        of the balance (so the unused-balance cap comes into play); or, as
        ``stranger``, name it in a refund for the other user."""
        p = self.model.payments[payment]
        owner = self.users.index(uuid.UUID(p.user))
        if spent:
            self.usage(owner, p.currency, spent)
        amount = max(1, p.amount * fraction // 80)  # sometimes more than the payment
        reference = p.payment_intent if by_intent else payment
        user = self.users[1 - owner] if stranger else self.users[owner]
        refund_id, _ = self._refund(user, amount, p.currency, reference, mode)
        return refund_id

    @rule(n=st.integers(0, 1), amount=st.integers(1, 2 * 10**6),
          currency=st.sampled_from(CURRENCIES),
          reference=st.sampled_from([None, None, None, "pi_unknown", str(uuid.uuid4())]))
    def refund_unreferenced(self, n: int, amount: int, currency: str,
                            reference: str | None) -> None:
        self._refund(self.users[n], amount, currency, reference, "auto_policy")

    @rule(target=deliveries, refund=provider_refunds, status=st.sampled_from(REFUND_STATUSES),
          now=st.booleans())
    def provider_reports_refund(self, refund: str, status: str, now: bool) -> tuple:
        """The provider's refund outcome: delivered now, or later, or both."""
        delivery = ("refund", f"evt_{uuid.uuid4().hex}", refund, status)
        if now:
            self.deliver(delivery)
        return delivery

    # ---- disputes ------------------------------------------------------------------
    @rule(target=deliveries, payment=payments, which=st.integers(0, 1),
          status=st.sampled_from(DISPUTE_STATUSES), now=st.booleans())
    def provider_reports_dispute(self, payment: str, which: int, status: str, now: bool) -> tuple:
        """An event of one of (up to) two disputes on a credited payment, each for a
        fixed part of it: delivered now, or later, or both."""
        amount = max(1, self.model.payments[payment].amount * (which + 1) // 2)
        dispute = (f"dp_{payment[:8]}_{which}", payment, amount)
        delivery = ("dispute", f"evt_{uuid.uuid4().hex}", dispute, status)
        if now:
            self.deliver(delivery)
        return delivery

    @rule(delivery=deliveries)
    def deliver(self, delivery: tuple) -> None:
        """Deliver or redeliver (the bundle hands out old events too), in any order."""
        kind, event_id, subject, status = delivery
        if kind == "refund":
            report = ProviderRefund(f"re_{subject[:8]}", uuid.UUID(subject), status, None, None)
            apply = refund_outcome(event_id, report)
            self.model.provider_refund_event(event_id, subject, status)
        else:
            dispute, payment, amount = subject
            p = self.model.payments[payment]
            report = ProviderDispute(dispute, status, Money(amount, p.currency), "ch_1",
                                     p.payment_intent, "fraudulent", None)
            apply = dispute_update(event_id, report)
            self.model.dispute_event(event_id, dispute, payment, status, amount)
        answer = self.run(provider_event(self.ctx("webhook"), provider_event_id=event_id,
                                         event_type=kind, payload_sha256="0" * 64, apply=apply,
                                         render=render))
        assert answer["ok"] is True
        event(f"{kind} event {'repeated' if answer.get('duplicate') else 'new'}")
        if kind == "dispute":
            d = self.model.disputes[subject[0]]
            event(f"dispute {d.status}, chargeback={d.chargeback}, reversal={d.reversal}")

    # ---- invariants ----------------------------------------------------------------
    @invariant()
    def matches_the_model(self) -> None:
        balances, entries, problems = {}, [], []
        for user in self.users:
            account = self.app.billing_account(user)
            if account is None:
                continue
            records = [entry_record(e) for e in self.app.events.get(account.id)
                       if isinstance(e, BillingAccount.LedgerEntryPosted)]
            problems += verify_chain(account.id, records)
            entries += [(str(user), r["currency"], r["entry_type"], r["amount_minor"],
                         r["reference_id"]) for r in records]
            balances.update({(str(user), c): a for c, a in account.balances.items()})
        refunds = {}
        for refund_id in self.refund_ids:
            refund = self.app.get_or_none(uuid.UUID(refund_id))
            refunds[refund_id] = (refund.status, refund.outcome, refund.amount_minor)
        disputes = {}
        for dispute in self.model.disputes:
            d = self.app.get_or_none(dispute_id_for(dispute))
            disputes[dispute] = (d.status, d.chargeback_ledger_entry_id,
                                 d.reversal_ledger_entry_id)
        check_invariants(self.model, {"balances": balances, "entries": entries,
                                      "chain_problems": problems, "refunds": refunds,
                                      "disputes": disputes})


TestRefundsDisputes = RefundsDisputesMachine.TestCase
TestRefundsDisputes.settings = settings(max_examples=500, stateful_step_count=25, deadline=None)
