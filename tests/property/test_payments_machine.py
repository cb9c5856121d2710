"""Payment sessions under duplicated, reordered and delayed provider events and
racing operator actions, checked after every step against ``domain.testing.payments``."""

from __future__ import annotations

import uuid
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from domain.app import Ledgercore
from domain.errors import DomainError
from domain.money import Money
from domain.payments import (PaymentSession, checkout_event, create_charge_session,
                             reconcile_payment_session)
from domain.provenance import CommandContext
from domain.testing.payments import ReferencePayments, check_invariants, observe
from domain.testing.strategies import currencies


def render(result: Any) -> dict[str, Any]:
    if isinstance(result, DomainError):
        return {"refused": result.details.get("reason", result.code)}
    return {"ok": True}


class PaymentsMachine(RuleBasedStateMachine):
    sessions = Bundle("sessions")
    deliveries = Bundle("deliveries")

    def __init__(self) -> None:
        super().__init__()
        self.app = Ledgercore(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
        self.model = ReferencePayments()
        self.users = [uuid.uuid4() for _ in range(2)]

    def ctx(self, source: str = "api") -> CommandContext:
        return CommandContext(actor_id="property", source=source)

    @rule(target=sessions, n=st.integers(0, 1), amount=st.integers(1, 10**9), currency=currencies())
    def start(self, n: int, amount: int, currency: str) -> str:
        session_id = uuid.uuid4()
        outcome = self.app.execute(create_charge_session(
            self.ctx(), session_id=session_id, org_id=uuid.uuid4(), user_id=self.users[n],
            provider_session_id=f"cs_{session_id.hex}", url="https://x.invalid",
            amount=Money(amount, currency), render=render))
        assert outcome.response == {"ok": True}
        self.model.start(str(session_id), str(self.users[n]), amount, currency)
        return str(session_id)

    @rule(target=deliveries, session=sessions, kind=st.sampled_from(["completed", "expired"]),
          exact=st.booleans(), other_amount=st.integers(1, 10**9))
    def provider_sends(self, session: str, kind: str, exact: bool, other_amount: int) -> tuple:
        """A new provider event; it may be delivered now, later, or several times."""
        requested = self.model.sessions[session].requested
        amount = requested if exact else (other_amount, requested[1])
        return (f"evt_{uuid.uuid4().hex}", kind, session, amount)

    @rule(delivery=deliveries)
    def deliver(self, delivery: tuple) -> None:
        """Deliver (or redeliver: the bundle hands out old events too) in any order."""
        event_id, kind, session, amount = delivery
        outcome = self.app.execute(checkout_event(
            self.ctx("webhook"), provider_event_id=event_id,
            event_type=f"checkout.session.{kind}", payload_sha256="0" * 64,
            payment_session_id=uuid.UUID(session),
            amount=Money(*amount) if kind == "completed" else None,
            payment_intent_id=None, render=render))
        assert outcome.response == {"ok": True}
        self.model.provider_event(event_id, kind, session,
                                  amount if kind == "completed" else None)

    @rule(session=sessions, action=st.sampled_from(["post_credit", "mark_expired", "mark_failed"]),
          override=st.none() | st.integers(1, 10**6))
    def operator(self, session: str, action: str, override: int | None) -> None:
        outcome = self.app.execute(reconcile_payment_session(
            self.ctx("admin"), payment_session_id=uuid.UUID(session), action=action,
            amount_minor=override, reason="operator", failure_reason=None, render=render))
        expected = self.model.operator(session, action, override)
        assert outcome.response.get("refused", "ok") == expected

    @invariant()
    def matches_the_model(self) -> None:
        check_invariants(self.model, observe(self.app, self.model, self.users))
        assert all(isinstance(self.app.get_or_none(uuid.UUID(s)), PaymentSession)
                   for s in self.model.sessions)


TestPayments = PaymentsMachine.TestCase
TestPayments.settings = settings(max_examples=500, stateful_step_count=25, deadline=None)
