"""Reference model of the whole system's money: every movement of every account,
whatever caused it (an operator's adjustment, a provider's checkout, an operator's
reconciliation), in one ledger, beside the payment sessions that caused some of them.

``ReferenceSystem`` composes the family models (``billing.ReferenceLedger`` holds the
one ledger, ``payments.ReferencePayments`` the sessions) so that a debit is judged
against the whole balance, payments included; ``check_invariants(model, live)`` runs
each family's check on its part (``live = {"billing": billing.observe(...),
"payments": payments.observe(...)}``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from domain.testing import billing, payments


@dataclass
class ReferenceSystem:
    ledger: billing.ReferenceLedger = field(default_factory=billing.ReferenceLedger)
    payments: payments.ReferencePayments = field(default_factory=payments.ReferencePayments)

    def adjust(self, owner: str, direction: str, amount: int, currency: str,
               key: str | None = None, fingerprint: Any = None) -> str:
        return self.ledger.adjust(owner, direction, amount, currency, key, fingerprint)

    def start_payment(self, session_id: str, owner: str, amount: int, currency: str) -> None:
        self.payments.start(session_id, owner, amount, currency)

    def provider_event(self, event_id: str, event_type: str, session_id: str,
                       amount: tuple[int, str] | None) -> None:
        with self._credits():
            self.payments.provider_event(event_id, event_type, session_id, amount)

    def operator(self, session_id: str, action: str, override: int | None) -> str:
        with self._credits():
            return self.payments.operator(session_id, action, override)

    def _credits(self) -> Any:
        system = self

        class Posting:
            def __enter__(self) -> None:
                self.before = system.payments.balances()

            def __exit__(self, *exc: object) -> None:
                after = system.payments.balances()
                for (owner, currency), amount in after.items():
                    delta = amount - self.before.get((owner, currency), 0)
                    if delta:
                        system.ledger.post(owner, currency, delta)

        return Posting()


def check_invariants(model: ReferenceSystem, live: dict[str, Any]) -> None:
    billing.check_invariants(model.ledger, live["billing"])
    payments.check_invariants(model.payments, {**live["payments"], "balances": None})
