"""Refunds, and the refundable funds they draw on (billing-ledger §3 "Refunds", §4.6-7).

- ``RefundableFunds`` (one per user): what the user paid through the provider, per
  currency and per payment session, and what has gone back since: refunds (either
  outcome, unless failed) and chargebacks not reversed. The refundable rule reads
  nothing else. Payments are recorded by ``domain.payments`` when a session is
  credited; disputes (``domain.disputes``) record chargebacks and their reversals.
- ``ProviderPaymentLink`` (one per provider payment intent): the payment session and
  user a provider payment belongs to; disputes and ``pi_…`` payment references
  resolve through it.
- ``Refund`` (one per refund request): ``accepted → completed | failed``.

Rules (docs/decisions.md, "Refunds and disputes"):

- refundable(user, ccy) = paid − refunded − charged back, never below 0; with a
  payment reference also at most that payment's own remainder. A request above it is
  refused (409 ``refund_exceeds_refundable``); admin credits are never refundable.
- ``auto_policy``: a provider refund when the referenced payment was credited at most
  ``REFUND_WINDOW_DAYS`` ago, otherwise (or without a reference) an internal credit;
  ``force_internal_credit``: always an internal credit.
- A provider refund is capped at the unused balance (``unused_balance_rule_applied``;
  nothing unused → 400 ``insufficient_balance``), debits the wallet at once (entry
  ``refund``) and stays ``accepted`` until the provider's refund webhook reports
  ``succeeded`` (→ ``completed``) or ``failed``/``canceled`` (→ ``failed``, and a
  ``refund_internal_credit`` entry gives the money back: the refund nets to 0).
- An internal credit posts ``refund_internal_credit`` and is ``completed`` at once.
- A ``collections_hold`` on the user or its tenant refuses every refund (409
  ``refunds_blocked``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate

from domain.billing import BillingAccount, account_id_for
from domain.commands import Command, Render, Session
from domain.errors import DomainError, InsufficientBalance, InvalidRequest
from domain.money import Money, is_known_currency
from domain.provenance import CommandContext
from domain.restrictions import effective_restriction

NAMESPACE = uuid5(NAMESPACE_URL, "https://ledgercore.invalid/refunds")
REFUND_WINDOW_DAYS = 30
STATUSES = ("accepted", "completed", "failed")
MODES = ("auto_policy", "force_internal_credit")
#: provider refund statuses that settle an accepted provider refund
PROVIDER_SUCCEEDED = frozenset({"succeeded"})
PROVIDER_FAILED = frozenset({"failed", "canceled"})

#: what a provider-event handler returns: (aggregates changed, result fields)
Applied = tuple[list[Any], dict[str, Any]]


class RefundConflict(DomainError):
    """The refund does not fit the user's funds or posture (``details.reason``)."""

    code = "invalid_request"
    kind = "conflict"


class PaymentNotFound(DomainError):
    code = "invalid_request"
    kind = "not_found"


def funds_id_for(user_id: UUID) -> UUID:
    return uuid5(NAMESPACE, f"refundable-funds:{user_id}")


def link_id_for(payment_intent_id: str) -> UUID:
    return uuid5(NAMESPACE, f"stripe:payment_intent:{payment_intent_id}")


class ProviderPaymentLink(Aggregate):
    """Which payment session (and user) a provider payment intent paid."""

    TOPIC = "ledgercore.ProviderPaymentLink"

    class Created(Aggregate.Created):
        TOPIC = "ledgercore.ProviderPaymentLinked"
        provider: str
        payment_intent_id: str
        payment_session_id: UUID
        user_id: UUID
        org_id: UUID

    def __init__(self, provider: str, payment_intent_id: str, payment_session_id: UUID,
                 user_id: UUID, org_id: UUID):
        self.provider, self.payment_intent_id = provider, payment_intent_id
        self.payment_session_id, self.user_id, self.org_id = payment_session_id, user_id, org_id


class RefundableFunds(Aggregate):
    """Per user: money paid in through the provider and what has gone back out."""

    TOPIC = "ledgercore.RefundableFunds"

    class Created(Aggregate.Created):
        TOPIC = "ledgercore.RefundableFundsOpened"
        user_id: UUID

    class PaymentRecorded(Aggregate.Event):
        TOPIC = "ledgercore.RefundablePaymentRecorded"
        payment_session_id: UUID
        org_id: UUID
        payment_intent_id: str | None
        amount_minor: int
        currency: str
        credited_at: datetime

        def apply(self, f: RefundableFunds) -> None:
            f.org_id = self.org_id
            f.payments[str(self.payment_session_id)] = {
                "amount_minor": self.amount_minor, "currency": self.currency,
                "credited_at": self.credited_at, "payment_intent_id": self.payment_intent_id,
                "refunded": 0, "charged_back": 0}
            f._add(self.currency, "paid", self.amount_minor)

    class Drawn(Aggregate.Event):
        """A refund (``kind`` refund) or chargeback (``kind`` chargeback) takes money
        back; ``Restored`` gives it back (a failed refund, a won dispute)."""

        TOPIC = "ledgercore.RefundableFundsDrawn"
        kind: str  # refund | chargeback
        reference_id: UUID  # refund id or dispute id
        payment_session_id: UUID | None
        amount_minor: int
        currency: str

        def apply(self, f: RefundableFunds) -> None:
            f._move(self.kind, self.payment_session_id, self.currency, self.amount_minor)

    class Restored(Drawn):
        TOPIC = "ledgercore.RefundableFundsRestored"

        def apply(self, f: RefundableFunds) -> None:
            f._move(self.kind, self.payment_session_id, self.currency, -self.amount_minor)

    def __init__(self, user_id: UUID):
        self.user_id = user_id
        self.org_id: UUID | None = None
        #: currency -> {"paid", "refunded", "charged_back"}
        self.totals: dict[str, dict[str, int]] = {}
        #: payment session id (str) -> amount, currency, credited_at, refunded, ...
        self.payments: dict[str, dict[str, Any]] = {}

    def _add(self, currency: str, key: str, amount: int) -> None:
        totals = self.totals.setdefault(currency, {"paid": 0, "refunded": 0, "charged_back": 0})
        totals[key] += amount

    def _move(self, kind: str, payment_session_id: UUID | None, currency: str, amount: int) -> None:
        key = "refunded" if kind == "refund" else "charged_back"
        self._add(currency, key, amount)
        payment = self.payments.get(str(payment_session_id))
        if payment is not None and payment["currency"] == currency:
            payment[key] += amount

    def refundable(self, currency: str) -> int:
        t = self.totals.get(currency)
        return 0 if t is None else max(0, t["paid"] - t["refunded"] - t["charged_back"])

    def payment_remainder(self, payment_key: str) -> int:
        p = self.payments[payment_key]
        return max(0, p["amount_minor"] - p["refunded"] - p["charged_back"])

    def resolve(self, reference: str) -> str | None:
        """The payment a ``payment_reference`` names: a payment session id or the
        provider's payment intent id, of this user's credited payments."""
        if reference in self.payments:
            return reference
        try:
            as_uuid = str(UUID(reference))
        except ValueError:
            as_uuid = None
        if as_uuid in self.payments:
            return as_uuid
        return next((key for key, p in self.payments.items()
                     if p["payment_intent_id"] == reference), None)

    def draw(self, kind: str, reference_id: UUID, payment_session_id: UUID | None,
             amount: Money, at: datetime, restore: bool = False) -> None:
        self.trigger_event(self.Restored if restore else self.Drawn, kind=kind,
                           reference_id=reference_id, payment_session_id=payment_session_id,
                           amount_minor=amount.amount_minor, currency=amount.currency,
                           timestamp=at)


def open_funds(session: Session, user_id: UUID, at: datetime) -> RefundableFunds:
    funds = session.get(funds_id_for(user_id))
    if funds is None:
        funds = RefundableFunds._create(RefundableFunds.Created, id=funds_id_for(user_id),
                                        user_id=user_id, timestamp=at)
    return funds


def record_payment(session: Session, *, payment_session_id: UUID, user_id: UUID, org_id: UUID,
                   payment_intent_id: str | None, amount: Money, at: datetime) -> list[Any]:
    """A payment session was credited: its money becomes refundable, and its provider
    payment intent is linked to it (for disputes). Called by ``domain.payments`` in
    the same command as the credit."""
    funds = open_funds(session, user_id, at)
    if str(payment_session_id) in funds.payments:
        return []
    funds.trigger_event(funds.PaymentRecorded, payment_session_id=payment_session_id,
                        org_id=org_id, payment_intent_id=payment_intent_id,
                        amount_minor=amount.amount_minor, currency=amount.currency,
                        credited_at=at, timestamp=at)
    changed: list[Any] = [funds]
    if payment_intent_id and session.get(link_id_for(payment_intent_id)) is None:
        changed.append(ProviderPaymentLink._create(
            ProviderPaymentLink.Created, id=link_id_for(payment_intent_id), provider="stripe",
            payment_intent_id=payment_intent_id, payment_session_id=payment_session_id,
            user_id=user_id, org_id=org_id, timestamp=at))
    return changed


class Refund(Aggregate):
    TOPIC = "ledgercore.Refund"

    class Created(Aggregate.Created):
        TOPIC = "ledgercore.RefundRequested"
        org_id: UUID
        user_id: UUID
        requested_by_user_id: UUID | None
        amount_minor: int
        currency: str
        reason: str
        payment_reference: str | None
        payment_session_id: UUID | None
        mode: str
        provenance: dict[str, Any]

    class PolicyApplied(Aggregate.Event):
        TOPIC = "ledgercore.RefundPolicyApplied"
        refund_window_days: int
        in_window: bool
        unused_balance_rule_applied: bool
        outcome: str  # provider_refund | internal_credit
        amount_minor: int  # after the unused-balance cap
        ledger_entry_id: UUID
        provenance: dict[str, Any]

        def apply(self, r: Refund) -> None:
            r.policy = {"refund_window_days": self.refund_window_days,
                        "in_window": self.in_window,
                        "unused_balance_rule_applied": self.unused_balance_rule_applied}
            r.outcome, r.amount_minor = self.outcome, self.amount_minor
            r.ledger_entry_id = self.ledger_entry_id
            r.updated_at = self.timestamp

    class Completed(Aggregate.Event):
        TOPIC = "ledgercore.RefundCompleted"
        provider_refund_id: str | None
        internal_ledger_entry_id: UUID | None
        provider_event_id: str | None
        provenance: dict[str, Any]

        def apply(self, r: Refund) -> None:
            r.status = "completed"
            r.provider_refund_id = self.provider_refund_id
            r.internal_ledger_entry_id = self.internal_ledger_entry_id
            r.updated_at = self.timestamp

    class Failed(Aggregate.Event):
        TOPIC = "ledgercore.RefundFailed"
        reason: str
        provider_refund_id: str | None
        provider_event_id: str | None
        compensation_entry_id: UUID
        provenance: dict[str, Any]

        def apply(self, r: Refund) -> None:
            r.status = "failed"
            r.provider_refund_id = self.provider_refund_id
            r.failure_reason = self.reason
            r.compensation_entry_id = self.compensation_entry_id
            r.updated_at = self.timestamp

    def __init__(self, org_id: UUID, user_id: UUID, requested_by_user_id: UUID | None,
                 amount_minor: int, currency: str, reason: str, payment_reference: str | None,
                 payment_session_id: UUID | None, mode: str, provenance: dict[str, Any]):
        self.org_id, self.user_id = org_id, user_id
        self.requested_by_user_id = requested_by_user_id
        self.requested_minor = self.amount_minor = amount_minor
        self.currency = currency
        self.reason, self.payment_reference, self.mode = reason, payment_reference, mode
        self.payment_session_id = payment_session_id
        self.correlation_id = provenance.get("correlation_id") or ""
        self.status = "accepted"
        self.outcome: str | None = None
        self.policy: dict[str, Any] = {}
        self.ledger_entry_id: UUID | None = None
        self.provider_refund_id: str | None = None
        self.internal_ledger_entry_id: UUID | None = None
        self.compensation_entry_id: UUID | None = None
        self.failure_reason: str | None = None
        self.updated_at: datetime | None = None

    @property
    def amount(self) -> Money:
        return Money(self.amount_minor, self.currency)

    def response(self) -> dict[str, Any]:
        """The contract's ``AdminCreateRefundResponse``."""
        return {"refund_id": str(self.id), "outcome": self.outcome, "status": self.status,
                "amount": self.amount.as_json(), "policy_applied": dict(self.policy)}

    def as_contract(self) -> dict[str, Any]:
        """The contract's ``RefundRequest``."""
        return refund_json({
            "id": self.id, "org_id": self.org_id, "user_id": self.user_id,
            "requested_by_user_id": self.requested_by_user_id, "amount_minor": self.amount_minor,
            "currency": self.currency, "reason": self.reason,
            "payment_reference": self.payment_reference, "mode": self.mode,
            "outcome": self.outcome, "status": self.status,
            "provider_refund_id": self.provider_refund_id,
            "internal_ledger_entry_id": self.internal_ledger_entry_id,
            "correlation_id": self.correlation_id, "created_at": self.created_on,
            "updated_at": self.updated_at or self.created_on})


def _iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def refund_json(row: dict[str, Any]) -> dict[str, Any]:
    """A refund's fields (aggregate or read-model row) as the contract's ``RefundRequest``."""
    def opt(value: Any) -> str | None:
        return None if value is None else str(value)

    return {"id": str(row["id"]), "org_id": str(row["org_id"]), "user_id": str(row["user_id"]),
            "requested_by_user_id": opt(row["requested_by_user_id"]),
            "amount": {"amount_minor": row["amount_minor"], "currency": row["currency"]},
            "reason": row["reason"], "payment_reference": row["payment_reference"],
            "mode": row["mode"], "outcome": row["outcome"], "status": row["status"],
            "provider_refund_id": row["provider_refund_id"],
            "internal_ledger_entry_id": opt(row["internal_ledger_entry_id"]),
            "correlation_id": row["correlation_id"], "created_at": _iso(row["created_at"]),
            "updated_at": _iso(row["updated_at"])}


# ---- commands ------------------------------------------------------------------------
def create_refund(ctx: CommandContext, *, refund_id: UUID, user_id: UUID,
                  requested_by_user_id: UUID | None, amount: Money, reason: str,
                  payment_reference: str | None, mode: str, render: Render) -> Command:
    """``adminCreateRefund`` (and its V3 twins): decide the policy, post the entry."""
    if mode not in MODES:
        raise InvalidRequest(f"unknown mode {mode!r}", field="mode")
    if not is_known_currency(amount.currency) or amount.amount_minor < 1:
        raise InvalidRequest("a refund needs a positive amount in a known currency",
                             field="amount_minor")

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        if session.get(refund_id) is not None:
            raise RefundConflict("this refund already exists", reason="refund_exists")
        funds = session.get(funds_id_for(user_id))
        restriction = effective_restriction(
            session, user_id=user_id, tenant_id=funds.org_id if funds else None, project_ids=[])
        if restriction is not None and restriction.effects.get("refunds_blocked"):
            raise RefundConflict("a financial restriction blocks refunds for this user",
                                 reason="refunds_blocked", state=restriction.state,
                                 scope_type=restriction.scope_type)
        payment_key = None
        if payment_reference is not None:
            payment_key = funds.resolve(payment_reference) if funds else None
            if payment_key is None:
                raise PaymentNotFound("no credited payment of this user has that reference",
                                      reason="payment_not_found", resource="payment")
            if funds.payments[payment_key]["currency"] != amount.currency:
                raise InvalidRequest("the refund's currency is not the payment's",
                                     reason="payment_currency_mismatch", field="currency")
        refundable = funds.refundable(amount.currency) if funds else 0
        if payment_key is not None:
            refundable = min(refundable, funds.payment_remainder(payment_key))
        if amount.amount_minor > refundable:
            raise RefundConflict(
                "the refund exceeds what is refundable", reason="refund_exceeds_refundable",
                refundable_minor=refundable, currency=amount.currency,
                requested_minor=amount.amount_minor)
        window = timedelta(days=REFUND_WINDOW_DAYS)
        in_window = payment_key is not None and \
            ctx.now - funds.payments[payment_key]["credited_at"] <= window
        outcome = "provider_refund" if mode == "auto_policy" and in_window else "internal_credit"
        account = session.get(account_id_for(user_id))
        if account is None:  # cannot happen with funds, which come from a credit
            account = BillingAccount.open(user_id, session.default_currency,
                                          ctx.provenance(), ctx.now)
        final, capped = amount.amount_minor, False
        if outcome == "provider_refund":
            unused = account.balance(amount.currency)
            if final > unused:
                final, capped = unused, True
            if final < 1:
                raise InsufficientBalance("no unused balance to pay back to the provider",
                                          reason="no_unused_balance", balance_minor=unused,
                                          currency=amount.currency,
                                          requested_minor=amount.amount_minor)
        payment_session_id = UUID(payment_key) if payment_key else None
        refund = Refund._create(
            Refund.Created, id=refund_id, org_id=funds.org_id, user_id=user_id,
            requested_by_user_id=requested_by_user_id, amount_minor=amount.amount_minor,
            currency=amount.currency, reason=reason, payment_reference=payment_reference,
            payment_session_id=payment_session_id, mode=mode, provenance=ctx.provenance(),
            timestamp=ctx.now)
        money = Money(final, amount.currency)
        entry_id = account.move(
            entry_type="refund" if outcome == "provider_refund" else "refund_internal_credit",
            amount=money, reference_type="refund", reference_id=str(refund_id),
            details={"outcome": outcome, "payment_session_id": payment_key},
            provenance=ctx.provenance(), at=ctx.now)
        refund.trigger_event(Refund.PolicyApplied, refund_window_days=REFUND_WINDOW_DAYS,
                             in_window=in_window, unused_balance_rule_applied=capped,
                             outcome=outcome, amount_minor=final, ledger_entry_id=entry_id,
                             provenance=ctx.provenance(), timestamp=ctx.now)
        if outcome == "internal_credit":
            refund.trigger_event(Refund.Completed, provider_refund_id=None,
                                 internal_ledger_entry_id=entry_id, provider_event_id=None,
                                 provenance=ctx.provenance(), timestamp=ctx.now)
        funds.draw("refund", refund_id, payment_session_id, money, ctx.now)
        return [refund, account, funds], refund.response()

    return Command(ctx, decide, render)


@dataclass(frozen=True)
class ProviderRefund:
    """What a provider refund object says (``refund.*``, ``charge.refund.updated``)."""

    provider_refund_id: str
    refund_id: UUID | None  # ours, from the object's metadata
    status: str
    amount: Money | None
    failure_reason: str | None


def parse_provider_refund(obj: dict[str, Any]) -> ProviderRefund:
    refund_object_id = obj.get("id")
    status = obj.get("status")
    if not isinstance(refund_object_id, str) or not refund_object_id or not isinstance(status, str):
        raise InvalidRequest("a refund object needs string id and status", field="data.object")
    metadata = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    try:
        refund_id = UUID(str(metadata.get("refund_id")))
    except ValueError:
        refund_id = None
    amount = None
    if obj.get("amount") is not None:
        code = str(obj.get("currency") or "").upper()
        if type(obj["amount"]) is not int or obj["amount"] < 1 or not is_known_currency(code):
            raise InvalidRequest("amount must be a positive integer in a known currency",
                                 field="amount")
        amount = Money(obj["amount"], code)
    reason = obj.get("failure_reason")
    return ProviderRefund(refund_object_id, refund_id, status, amount,
                          reason if isinstance(reason, str) else None)


def refund_outcome(provider_event_id: str, report: ProviderRefund
                   ) -> Callable[[CommandContext, Session], Applied]:
    """A provider's refund report, applied once (``domain.payments.provider_event``
    dedupes by event id): settles an ``accepted`` provider refund; anything else
    (unknown refund, already settled, other amount, still pending) changes nothing."""

    def apply(ctx: CommandContext, session: Session) -> Applied:
        refund = session.get(report.refund_id) if report.refund_id else None
        if not isinstance(refund, Refund) or refund.outcome != "provider_refund" \
                or refund.status != "accepted":
            return [], {"applied": False}
        if report.amount is not None and report.amount != refund.amount:
            return [], {"applied": False}
        if report.status in PROVIDER_SUCCEEDED:
            refund.trigger_event(Refund.Completed, provider_refund_id=report.provider_refund_id,
                                 internal_ledger_entry_id=None,
                                 provider_event_id=provider_event_id,
                                 provenance=ctx.provenance(), timestamp=ctx.now)
            return [refund], {"applied": True}
        if report.status not in PROVIDER_FAILED:
            return [], {"applied": False}
        account = session.get(account_id_for(refund.user_id))
        entry_id = account.move(
            entry_type="refund_internal_credit", amount=refund.amount, reference_type="refund",
            reference_id=str(refund.id),
            details={"reason": "provider_refund_failed",
                     "compensates_entry_id": str(refund.ledger_entry_id)},
            provenance=ctx.provenance(), at=ctx.now)
        funds = session.get(funds_id_for(refund.user_id))
        funds.draw("refund", refund.id, refund.payment_session_id, refund.amount, ctx.now,
                   restore=True)
        refund.trigger_event(Refund.Failed, reason=report.failure_reason or report.status,
                             provider_refund_id=report.provider_refund_id,
                             provider_event_id=provider_event_id, compensation_entry_id=entry_id,
                             provenance=ctx.provenance(), timestamp=ctx.now)
        return [refund, account, funds], {"applied": True}

    return apply
