"""Reference model of payment sessions and their credits (billing-ledger §4, 4–5: a
session is credited at most once, whatever the provider redelivers or reorders, and
only with the amount the provider collected or an operator's override).

``observe(app, model, users)`` reads the real sessions and accounts into the plain dict
``check_invariants(model, live)`` compares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from domain.billing import BillingAccount


@dataclass
class ModelSession:
    user: str
    requested: tuple[int, str]
    status: str = "initiated"
    credited: tuple[int, str] | None = None
    reported: tuple[int, str] | None = None  # what the provider said it collected


@dataclass
class ReferencePayments:
    sessions: dict[str, ModelSession] = field(default_factory=dict)
    seen_events: set[str] = field(default_factory=set)

    def start(self, session_id: str, user: str, amount: int, currency: str) -> None:
        self.sessions[session_id] = ModelSession(user, (amount, currency))

    def provider_event(self, event_id: str, event_type: str, session_id: str,
                       amount: tuple[int, str] | None) -> None:
        if event_id in self.seen_events:
            return
        self.seen_events.add(event_id)
        s = self.sessions.get(session_id)
        if s is None:
            return
        if event_type == "completed" and s.status in ("initiated", "expired"):
            s.reported = amount
            if amount == s.requested:
                s.status, s.credited = "credited", amount
            else:
                s.status = "failed_reconcile"
        elif event_type == "expired" and s.status in ("initiated", "checkout_completed"):
            s.status = "expired"

    def operator(self, session_id: str, action: str, override: int | None) -> str:
        """'ok' or the refusal's reason."""
        s = self.sessions.get(session_id)
        if s is None:
            return "payment_session_not_found"
        if s.status == "credited":
            return "payment_session_already_credited"
        if action == "post_credit":
            if s.status == "initiated":
                return "payment_session_not_completed"
            # the override, else what the provider collected, else what was requested
            minor, currency = s.reported or s.requested
            s.status = "credited"
            s.credited = (override if override is not None else minor, currency)
        elif action == "mark_expired":
            if s.status == "expired":
                return "payment_session_already_expired"
            s.status = "expired"
        else:
            if s.status == "failed_reconcile":
                return "payment_session_already_failed"
            s.status = "failed_reconcile"
        return "ok"

    def balances(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for s in self.sessions.values():
            if s.credited:
                key = (s.user, s.credited[1])
                out[key] = out.get(key, 0) + s.credited[0]
        return out


def observe(app: Any, model: ReferencePayments, users: Any) -> dict[str, Any]:
    """The model's sessions and the accounts of ``users`` in ``app`` (any persistence)."""
    sessions, credits, balances = {}, {}, {}
    for session_id in model.sessions:
        payment = app.get_or_none(UUID(session_id))
        assert payment is not None, f"session {session_id} does not exist"
        sessions[session_id] = (payment.status, payment.credited_amount
                                if payment.status == "credited" else None)
    for user in users:
        account = app.billing_account(UUID(str(user)))
        if account is None:
            continue
        for event in app.events.get(account.id):
            if isinstance(event, BillingAccount.PaymentCredited):
                key = str(event.payment_session_id)
                credits[key] = credits.get(key, 0) + 1
        for currency, amount in account.balances.items():
            balances[(str(user), currency)] = amount
    return {"sessions": sessions, "credits": credits, "balances": balances}


def check_invariants(model: ReferencePayments, live: dict[str, Any]) -> None:
    """``live``: ``{"sessions": {id: (status, credited or None)}, "credits": {id: count},
    "balances": {(user, ccy): amount}}`` for the model's sessions and users (``balances``
    None: the accounts also move otherwise, and the whole system's ledger checks them)."""
    for session_id, s in model.sessions.items():
        status, credited = live["sessions"][session_id]
        assert status == s.status, f"session {session_id}: {status} != {s.status}"
        count = live["credits"].get(session_id, 0)
        assert count == (1 if s.status == "credited" else 0), \
            f"session {session_id} has {count} payment credits in state {status}"
        if s.status == "credited":
            assert credited == s.credited, f"session {session_id} credited {credited} != {s.credited}"
    if live.get("balances") is None:  # checked by a ledger that sees every movement
        return
    live_balances = {k: v for k, v in live["balances"].items() if v}
    assert live_balances == model.balances(), f"{live_balances} != {model.balances()}"
