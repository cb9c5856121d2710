"""Payment sessions (card top-ups through the payment provider) and the provider-event
inbox that makes every provider event count once.

A session moves ``initiated → checkout_completed → credited``, or ends ``expired`` or
``failed_reconcile``; operators recover with ``post_credit``, ``mark_expired`` and
``mark_failed``. The credit itself is a ``payment_credit`` entry on the initiating
user's billing account, saved in the same transaction as the session's ``Credited``
event, so a session is credited exactly once whoever (webhook or operator) gets there
first: the loser of that race conflicts on the session's version and re-decides.
The same command records the credited money as refundable (``domain.refunds``).

Provider events other than a checkout's (disputes, refund outcomes) go through
``provider_event``: the same inbox, then the handler ``domain.disputes`` or
``domain.refunds`` supplies.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate

from domain.billing import BillingAccount, account_id_for
from domain.commands import Command, Render, Session
from domain.errors import DomainError, InvalidRequest
from domain.money import Money, is_known_currency
from domain.provenance import CommandContext
from domain.refunds import record_payment

NAMESPACE = uuid5(NAMESPACE_URL, "https://ledgercore.invalid/payments")
STATUSES = ("initiated", "checkout_completed", "credited", "failed_reconcile", "expired")


class SessionConflict(DomainError):
    """The action does not fit the session's state."""

    code = "invalid_request"
    kind = "conflict"


class SessionNotFound(DomainError):
    code = "invalid_request"
    kind = "not_found"


def inbox_id_for(provider: str, provider_event_id: str) -> UUID:
    return uuid5(NAMESPACE, f"{provider}:{provider_event_id}")


class ProviderEventInbox(Aggregate):
    """One per provider event id: its creation is the dedupe."""

    TOPIC = "ledgercore.ProviderEventInbox"

    class Created(Aggregate.Created):
        TOPIC = "ledgercore.ProviderEventReceived"
        provider: str
        provider_event_id: str
        event_type: str
        payload_sha256: str
        provenance: dict[str, Any]

    def __init__(self, provider: str, provider_event_id: str, event_type: str,
                 payload_sha256: str, provenance: dict[str, Any]):
        self.provider, self.provider_event_id = provider, provider_event_id
        self.event_type, self.payload_sha256 = event_type, payload_sha256

    @classmethod
    def receive(cls, provider: str, provider_event_id: str, event_type: str,
                payload_sha256: str, provenance: dict[str, Any], at: datetime) -> ProviderEventInbox:
        return cls._create(cls.Created, id=inbox_id_for(provider, provider_event_id),
                           provider=provider, provider_event_id=provider_event_id,
                           event_type=event_type, payload_sha256=payload_sha256,
                           provenance=provenance, timestamp=at)


class PaymentSession(Aggregate):
    TOPIC = "ledgercore.PaymentSession"

    class Created(Aggregate.Created):
        TOPIC = "ledgercore.PaymentSessionInitiated"
        org_id: UUID
        initiated_by_user_id: UUID
        provider_session_id: str
        amount_minor: int
        currency: str
        provenance: dict[str, Any]

    class CheckoutCompleted(Aggregate.Event):
        TOPIC = "ledgercore.PaymentCheckoutCompleted"
        payment_intent_id: str | None
        credited_amount_minor: int
        currency: str
        provider_event_id: str
        provenance: dict[str, Any]

        def apply(self, s: PaymentSession) -> None:
            s.status = "checkout_completed"
            s.payment_intent_id = self.payment_intent_id
            s.credited_amount = (self.credited_amount_minor, self.currency)
            s.checkout_completed_at = self.timestamp

    class Credited(Aggregate.Event):
        TOPIC = "ledgercore.PaymentSessionCredited"
        ledger_entry_id: UUID
        amount_minor: int
        currency: str
        source: str  # webhook | manual
        reason: str | None
        provenance: dict[str, Any]

        def apply(self, s: PaymentSession) -> None:
            s.status = "credited"
            s.ledger_entry_id = self.ledger_entry_id
            s.credited_amount = (self.amount_minor, self.currency)
            s.credited_at = self.timestamp

    class Expired(Aggregate.Event):
        TOPIC = "ledgercore.PaymentSessionExpired"
        reason: str
        provenance: dict[str, Any]

        def apply(self, s: PaymentSession) -> None:
            s.status = "expired"

    class Failed(Aggregate.Event):
        TOPIC = "ledgercore.PaymentSessionFailed"
        failure_reason: str
        provenance: dict[str, Any]

        def apply(self, s: PaymentSession) -> None:
            s.status = "failed_reconcile"
            s.failure_reason = self.failure_reason
            s.failed_at = self.timestamp

    def __init__(self, org_id: UUID, initiated_by_user_id: UUID, provider_session_id: str,
                 amount_minor: int, currency: str, provenance: dict[str, Any]):
        self.org_id, self.initiated_by_user_id = org_id, initiated_by_user_id
        self.provider_session_id = provider_session_id
        self.requested = (amount_minor, currency)
        self.status = "initiated"
        self.correlation_id = provenance.get("correlation_id") or ""
        self.payment_intent_id: str | None = None
        self.credited_amount: tuple[int, str] | None = None
        self.checkout_completed_at: datetime | None = None
        self.credited_at: datetime | None = None
        self.failed_at: datetime | None = None
        self.failure_reason: str | None = None
        self.ledger_entry_id: UUID | None = None

    @classmethod
    def initiate(cls, session_id: UUID, *, org_id: UUID, user_id: UUID, provider_session_id: str,
                 amount: Money, provenance: dict[str, Any], at: datetime) -> PaymentSession:
        return cls._create(cls.Created, id=session_id, org_id=org_id,
                           initiated_by_user_id=user_id, provider_session_id=provider_session_id,
                           amount_minor=amount.amount_minor, currency=amount.currency,
                           provenance=provenance, timestamp=at)

    def as_contract(self) -> dict[str, Any]:
        """The contract's ``PaymentSession``."""
        return session_json({
            "id": self.id, "org_id": self.org_id, "initiated_by_user_id": self.initiated_by_user_id,
            "stripe_checkout_session_id": self.provider_session_id,
            "stripe_payment_intent_id": self.payment_intent_id,
            "requested_amount_minor": self.requested[0], "requested_currency": self.requested[1],
            "credited_amount_minor": self.credited_amount[0] if self.credited_amount else None,
            "credited_currency": self.credited_amount[1] if self.credited_amount else None,
            "status": self.status, "initiated_at": self.created_on,
            "checkout_completed_at": self.checkout_completed_at, "credited_at": self.credited_at,
            "failed_at": self.failed_at, "failure_reason": self.failure_reason,
            "ledger_entry_id": self.ledger_entry_id, "correlation_id": self.correlation_id,
            "created_at": self.created_on,
        })


def _iso(value: Any) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def session_json(row: dict[str, Any]) -> dict[str, Any]:
    """A session's fields (aggregate or read-model row) as the contract's JSON."""
    credited = None
    if row["credited_amount_minor"] is not None:
        credited = {"amount_minor": row["credited_amount_minor"], "currency": row["credited_currency"]}
    return {
        "id": str(row["id"]), "org_id": str(row["org_id"]),
        "initiated_by_user_id": str(row["initiated_by_user_id"]),
        "stripe_checkout_session_id": row["stripe_checkout_session_id"],
        "stripe_payment_intent_id": row["stripe_payment_intent_id"],
        "requested_amount": {"amount_minor": row["requested_amount_minor"],
                             "currency": row["requested_currency"]},
        "credited_amount": credited,
        "status": row["status"],
        "initiated_at": _iso(row["initiated_at"]),
        "checkout_completed_at": _iso(row["checkout_completed_at"]),
        "credited_at": _iso(row["credited_at"]),
        "failed_at": _iso(row["failed_at"]),
        "failure_reason": row["failure_reason"],
        "ledger_entry_id": None if row["ledger_entry_id"] is None else str(row["ledger_entry_id"]),
        "correlation_id": row["correlation_id"],
        "created_at": _iso(row["created_at"]),
    }


def _credit(ctx: CommandContext, session: Session, payment: PaymentSession, amount: Money,
            source: str, reason: str | None) -> list[Any]:
    account = session.get(account_id_for(payment.initiated_by_user_id))
    if account is None:
        account = BillingAccount.open(payment.initiated_by_user_id, session.default_currency,
                                      ctx.provenance(), ctx.now)
    entry_id = account.credit_payment(payment_session_id=payment.id, amount=amount,
                                      source=source, provenance=ctx.provenance(), at=ctx.now)
    payment.trigger_event(payment.Credited, ledger_entry_id=entry_id,
                          amount_minor=amount.amount_minor, currency=amount.currency,
                          source=source, reason=reason, provenance=ctx.provenance(),
                          timestamp=ctx.now)
    # the credited money becomes refundable, and disputes find it by payment intent
    return [account, payment] + record_payment(
        session, payment_session_id=payment.id, user_id=payment.initiated_by_user_id,
        org_id=payment.org_id, payment_intent_id=payment.payment_intent_id, amount=amount,
        at=ctx.now)


# ---- commands ------------------------------------------------------------------------
def create_charge_session(ctx: CommandContext, *, session_id: UUID, org_id: UUID, user_id: UUID,
                          provider_session_id: str, url: str, amount: Money,
                          render: Render) -> Command:
    """``createChargeSession``: record the session before the caller is redirected."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        if session.get(session_id) is not None:
            raise SessionConflict("this payment session already exists", reason="session_exists")
        payment = PaymentSession.initiate(session_id, org_id=org_id, user_id=user_id,
                                          provider_session_id=provider_session_id,
                                          amount=amount, provenance=ctx.provenance(), at=ctx.now)
        return [payment], {"url": url, "payment_session_id": str(session_id),
                           "provider_session_id": provider_session_id}

    return Command(ctx, decide, render)


def checkout_event(ctx: CommandContext, *, provider_event_id: str, event_type: str,
                   payload_sha256: str, payment_session_id: UUID | None,
                   amount: Money | None, payment_intent_id: str | None,
                   render: Render) -> Command:
    """A verified provider event: recorded once in the inbox, then applied.

    ``checkout.session.completed`` credits the session (or marks it
    ``failed_reconcile`` when amount or currency differ from what was requested);
    ``checkout.session.expired`` expires it. A repeated event id changes nothing."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        inbox_id = inbox_id_for("stripe", provider_event_id)
        if session.get(inbox_id) is not None:
            return [], {"ok": True, "duplicate": True}
        changed: list[Any] = [ProviderEventInbox.receive(
            "stripe", provider_event_id, event_type, payload_sha256, ctx.provenance(), ctx.now)]
        payment = session.get(payment_session_id) if payment_session_id else None
        if not isinstance(payment, PaymentSession):
            return changed, {"ok": True, "applied": False}
        if event_type == "checkout.session.completed" and amount is not None:
            if payment.status not in ("initiated", "expired"):
                return changed, {"ok": True, "applied": False}  # already settled
            payment.trigger_event(payment.CheckoutCompleted, payment_intent_id=payment_intent_id,
                                  credited_amount_minor=amount.amount_minor,
                                  currency=amount.currency, provider_event_id=provider_event_id,
                                  provenance=ctx.provenance(), timestamp=ctx.now)
            if (amount.amount_minor, amount.currency) != payment.requested:
                payment.trigger_event(
                    payment.Failed, provenance=ctx.provenance(), timestamp=ctx.now,
                    failure_reason=(f"provider reported {amount.amount_minor} {amount.currency},"
                                    f" requested {payment.requested[0]} {payment.requested[1]}"))
                return changed + [payment], {"ok": True, "applied": True}
            return changed + _credit(ctx, session, payment, amount, "webhook", None), \
                {"ok": True, "applied": True}
        if event_type == "checkout.session.expired" and payment.status in (
                "initiated", "checkout_completed"):
            payment.trigger_event(payment.Expired, reason="provider expired the checkout",
                                  provenance=ctx.provenance(), timestamp=ctx.now)
            return changed + [payment], {"ok": True, "applied": True}
        return changed, {"ok": True, "applied": False}

    return Command(ctx, decide, render)


def provider_event(ctx: CommandContext, *, provider_event_id: str, event_type: str,
                   payload_sha256: str,
                   apply: Callable[[CommandContext, Session], tuple[list[Any], dict[str, Any]]],
                   render: Render) -> Command:
    """A verified provider event other than a checkout's (disputes, refund outcomes):
    recorded once in the inbox, in the same transaction as what ``apply`` decides
    (``domain.disputes``, ``domain.refunds``). A repeated event id changes nothing."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        if session.get(inbox_id_for("stripe", provider_event_id)) is not None:
            return [], {"ok": True, "duplicate": True}
        inbox = ProviderEventInbox.receive("stripe", provider_event_id, event_type,
                                           payload_sha256, ctx.provenance(), ctx.now)
        changed, result = apply(ctx, session)
        unique = list({id(a): a for a in [inbox, *changed]}.values())
        return unique, {"ok": True, **result}

    return Command(ctx, decide, render)


def reconcile_payment_session(ctx: CommandContext, *, payment_session_id: UUID, action: str,
                              amount_minor: int | None, reason: str,
                              failure_reason: str | None, render: Render) -> Command:
    """``adminReconcilePaymentSession``: an operator's audited recovery action."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        payment = session.get(payment_session_id)
        if not isinstance(payment, PaymentSession):
            raise SessionNotFound("payment session not found", reason="payment_session_not_found")
        if payment.status == "credited":
            raise SessionConflict("the payment session is already credited",
                                  reason="payment_session_already_credited")
        if action == "post_credit":
            if payment.status == "initiated":
                raise SessionConflict("the checkout was never completed; nothing to credit",
                                      reason="payment_session_not_completed")
            minor, currency = payment.credited_amount or payment.requested
            if amount_minor is not None:
                minor = amount_minor
            changed = _credit(ctx, session, payment, Money(minor, currency), "manual", reason)
        elif action == "mark_expired":
            if payment.status == "expired":
                raise SessionConflict("the payment session is already expired",
                                      reason="payment_session_already_expired")
            payment.trigger_event(payment.Expired, reason=reason, provenance=ctx.provenance(),
                                  timestamp=ctx.now)
            changed = [payment]
        elif action == "mark_failed":
            if payment.status == "failed_reconcile":
                raise SessionConflict("the payment session is already failed",
                                      reason="payment_session_already_failed")
            payment.trigger_event(payment.Failed, failure_reason=failure_reason or reason,
                                  provenance=ctx.provenance(), timestamp=ctx.now)
            changed = [payment]
        else:
            raise InvalidRequest(f"unknown action {action!r}", field="action")
        return changed, payment.as_contract()

    return Command(ctx, decide, render)


def provider_amount(amount_total: Any, currency: Any) -> Money:
    """The provider's amount: integer minor units and a currency code, or refused."""
    if type(amount_total) is not int or amount_total < 1:
        raise InvalidRequest("amount_total must be a positive integer", field="amount_total")
    code = str(currency or "").upper()
    if not is_known_currency(code):
        raise InvalidRequest(f"unknown currency {currency!r}", field="currency")
    return Money(amount_total, code)
