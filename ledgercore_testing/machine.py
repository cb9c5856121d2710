"""``LedgercoreMachine``: a ready Hypothesis ``RuleBasedStateMachine`` over a running
ledgercore (either mode), checked after every step against the whole-system reference
model (``domain.testing.system``) with the kit's invariants.

Its rules: operators credit and debit accounts (sometimes under an Idempotency-Key,
and replay those keys); users start checkouts; the provider sends checkout events
(completed with the requested or another amount, expired) that are delivered late, out
of order and more than once; operators reconcile sessions. Subclass it to add your
own rules (use ``self.ledgercore`` to act, ``self.model`` to say what must follow),
then run it with ``MyMachine.run(ledgercore)`` inside a test that has the
``ledgercore`` fixture::

    class MyMachine(LedgercoreMachine):
        @rule(user=LedgercoreMachine.user_index(), amount=strategies.amounts(10**4))
        def my_top_up(self, user, amount):
            self.adjust(user, "credit", amount, "USD")

    def test_my_rules(ledgercore):
        MyMachine.run(ledgercore)

May import: ``domain``, ``hypothesis``, and ``ledgercore_testing.running``.
"""

from __future__ import annotations

import uuid
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, invariant, rule,
                                 run_state_machine_as_test)

from domain.testing import strategies
from domain.testing.system import ReferenceSystem, check_invariants
from ledgercore_testing.running import RunningLedgercore

KEYS = [f"key-{n}" for n in range(4)]
#: how hard ``run`` tries by default, per mode (HTTP steps cost milliseconds each)
DEFAULTS = {"memory": {"max_examples": 100, "stateful_step_count": 30},
            "service": {"max_examples": 10, "stateful_step_count": 15}}


class LedgercoreMachine(RuleBasedStateMachine):
    #: the ledgercore under test; set by ``run``
    ledgercore: RunningLedgercore
    #: users per example (fresh ids each example: examples never see each other's data)
    USERS = 3

    sessions = Bundle("sessions")
    deliveries = Bundle("deliveries")

    def __init__(self) -> None:
        super().__init__()
        self.model = ReferenceSystem()
        self.users = [uuid.uuid4() for _ in range(self.USERS)]
        self.tenant = uuid.uuid4()
        #: Idempotency-Keys and provider event ids are remembered by ledgercore for
        #: good: this example's never meet another example's
        self.key_prefix = uuid.uuid4().hex[:12]
        #: key -> the first command sent under it (user index, direction, amount, ccy)
        self.sent: dict[str, tuple[int, str, int, str]] = {}

    @classmethod
    def user_index(cls) -> st.SearchStrategy[int]:
        return st.integers(0, cls.USERS - 1)

    @classmethod
    def run(cls, ledgercore: RunningLedgercore, **overrides: Any) -> None:
        """Run this machine against ``ledgercore``; ``overrides`` are Hypothesis
        ``settings`` (``max_examples``, ``stateful_step_count``, ...)."""
        bound = type(cls.__name__, (cls,), {"ledgercore": ledgercore})
        options = {**DEFAULTS.get(ledgercore.mode, DEFAULTS["memory"]), "deadline": None,
                   "suppress_health_check": list(HealthCheck), **overrides}
        run_state_machine_as_test(bound, settings=settings(**options))

    # ---- money moved by operators -------------------------------------------------------
    def adjust(self, n: int, direction: str, amount: int, currency: str,
               key: str | None = None) -> str:
        """Send an adjustment and assert the answer is the model's."""
        user = self.users[n]
        fingerprint = (str(user), direction, amount, currency)
        answer = self.ledgercore.adjust_balance(
            user, direction, amount, currency, key=key and f"{self.key_prefix}-{key}")
        expected = self.model.adjust(str(user), direction, amount, currency, key, fingerprint)
        assert answer == expected, f"adjust {direction} {amount} {currency}: {answer} != {expected}"
        return answer

    # amounts stay far below the int64 ceiling, where a payment credit would be refused
    # for a reason the payments model does not know (the billing machine covers it)
    @rule(n=st.integers(0, USERS - 1),
          direction=st.sampled_from(["credit", "debit"]),
          amount=strategies.amounts(10**12), currency=strategies.currencies(),
          key=st.none() | st.sampled_from(KEYS))
    def operator_adjusts(self, n: int, direction: str, amount: int, currency: str,
                         key: str | None) -> None:
        self.adjust(n, direction, amount, currency, key)
        if key is not None:
            self.sent.setdefault(key, (n, direction, amount, currency))

    @rule(key=st.sampled_from(KEYS))
    def operator_retries(self, key: str) -> None:
        """The same key and request again: the first answer, nothing new."""
        if key in self.sent:
            self.adjust(*self.sent[key], key=key)

    # ---- payments ---------------------------------------------------------------------------
    @rule(target=sessions, n=st.integers(0, USERS - 1), amount=strategies.amounts(10**9),
          currency=strategies.currencies())
    def user_starts_checkout(self, n: int, amount: int, currency: str) -> str:
        session = self.ledgercore.start_payment(self.users[n], self.tenant, amount, currency)
        self.model.start_payment(session, str(self.users[n]), amount, currency)
        return session

    @rule(target=deliveries, session=sessions, data=st.data())
    def provider_sends(self, session: str, data: Any) -> dict[str, Any]:
        """A provider event, delivered now, later, or more than once (the bundle)."""
        amount, currency = self.model.payments.sessions[session].requested
        event = data.draw(strategies.checkout_events(session, amount, currency))
        # provider event ids are global facts: this example's never meet another's
        return {**event, "id": f"{event['id']}_{self.key_prefix}"}

    @rule(event=deliveries)
    def webhook_arrives(self, event: dict[str, Any]) -> None:
        answer = self.ledgercore.deliver_webhook(event)
        assert answer == "ok", answer
        kind = event["type"].rsplit(".", 1)[-1]
        obj = event["data"]["object"]
        amount = (obj["amount_total"], obj["currency"].upper()) if kind == "completed" else None
        self.model.provider_event(event["id"], kind, obj["client_reference_id"], amount)

    @rule(session=sessions, action=st.sampled_from(strategies.RECONCILE_ACTIONS),
          override=st.none() | strategies.amounts(10**6))
    def operator_reconciles(self, session: str, action: str, override: int | None) -> None:
        answer = self.ledgercore.reconcile(session, action, override)
        expected = self.model.operator(session, action, override)
        assert answer == expected, f"reconcile {action}: {answer} != {expected}"

    # ---- the invariants ----------------------------------------------------------------------
    @invariant()
    def ledgercore_keeps_its_promises(self) -> None:
        check_invariants(self.model, self.ledgercore.observe(self.model, self.users))
