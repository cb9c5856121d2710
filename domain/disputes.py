"""Payment disputes (chargebacks) reported by the provider's ``charge.dispute.*``
webhooks (billing-ledger §3 "Disputes", §4.8).

One ``PaymentDispute`` per provider dispute id (a deterministic id, so the first event
of any type creates it). Every event carries the whole provider dispute object; each is
applied once (``domain.payments.provider_event`` dedupes by event id) and:

- moves the status forward only: ``opened`` < ``needs_response`` < ``evidence_submitted``
  < a terminal ``won | lost | closed``; a stale event never moves it back and the first
  terminal status stays;
- posts the one ``chargeback`` (−amount) as soon as any event shows the funds were
  withdrawn (provider status ``needs_response``, ``under_review``, ``won`` or ``lost``;
  inquiries, ``warning_*``, withdraw nothing);
- posts the one ``chargeback_reversal`` (+amount) when the dispute is ``won``.

So whatever the order or repetition of deliveries, a dispute debits at most once and
credits at most once, a reversal always follows its chargeback, and a won dispute nets
to 0. A dispute whose payment intent was never credited here is left to the inbox.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate

from domain.billing import BillingAccount, account_id_for
from domain.commands import Session
from domain.errors import InvalidRequest
from domain.money import Money, is_known_currency
from domain.provenance import CommandContext
from domain.refunds import Applied, ProviderPaymentLink, link_id_for, open_funds

NAMESPACE = uuid5(NAMESPACE_URL, "https://ledgercore.invalid/disputes")
STATUSES = ("opened", "needs_response", "evidence_due", "evidence_submitted", "won", "lost",
            "closed")
#: provider (Stripe) dispute status -> ours; anything else is ``opened``
STATUS_OF = {"warning_needs_response": "needs_response", "needs_response": "needs_response",
             "warning_under_review": "evidence_submitted", "under_review": "evidence_submitted",
             "won": "won", "lost": "lost", "warning_closed": "closed",
             "charge_refunded": "closed", "prevented": "closed"}
#: provider statuses that mean the provider has taken the disputed funds
FUNDS_WITHDRAWN = frozenset({"needs_response", "under_review", "won", "lost"})
RANK = {"opened": 0, "needs_response": 1, "evidence_due": 1, "evidence_submitted": 2,
        "won": 3, "lost": 3, "closed": 3}
TERMINAL = frozenset({"won", "lost", "closed"})


def dispute_id_for(provider_dispute_id: str) -> UUID:
    return uuid5(NAMESPACE, f"stripe:{provider_dispute_id}")


@dataclass(frozen=True)
class ProviderDispute:
    """What a provider dispute object says."""

    provider_dispute_id: str
    provider_status: str
    amount: Money
    charge_id: str | None
    payment_intent_id: str | None
    reason: str | None
    evidence_due_at: datetime | None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return STATUS_OF.get(self.provider_status, "opened")

    @property
    def funds_withdrawn(self) -> bool:
        return self.provider_status in FUNDS_WITHDRAWN


def parse_provider_dispute(obj: dict[str, Any]) -> ProviderDispute:
    """A ``charge.dispute.*`` event's object, or ``InvalidRequest``."""
    dispute_id, status = obj.get("id"), obj.get("status")
    if not isinstance(dispute_id, str) or not dispute_id or not isinstance(status, str):
        raise InvalidRequest("a dispute object needs string id and status", field="data.object")
    code = str(obj.get("currency") or "").upper()
    if type(obj.get("amount")) is not int or obj["amount"] < 1 or not is_known_currency(code):
        raise InvalidRequest("amount must be a positive integer in a known currency",
                             field="amount")

    def text(value: Any) -> str | None:
        if isinstance(value, dict):  # an expanded object
            value = value.get("id")
        return value if isinstance(value, str) and value else None

    due = (obj.get("evidence_details") or {}).get("due_by") \
        if isinstance(obj.get("evidence_details"), dict) else None
    if due is not None and (type(due) is not int or due < 0):
        raise InvalidRequest("evidence_details.due_by must be epoch seconds",
                             field="evidence_details.due_by")
    metadata = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    return ProviderDispute(
        provider_dispute_id=dispute_id, provider_status=status, amount=Money(obj["amount"], code),
        charge_id=text(obj.get("charge")), payment_intent_id=text(obj.get("payment_intent")),
        reason=text(obj.get("reason")),
        evidence_due_at=None if due is None else datetime.fromtimestamp(due, timezone.utc),
        metadata=metadata)


class PaymentDispute(Aggregate):
    TOPIC = "ledgercore.PaymentDispute"

    class Created(Aggregate.Created):
        TOPIC = "ledgercore.DisputeOpened"
        provider: str
        provider_dispute_id: str
        payment_session_id: UUID
        user_id: UUID
        org_id: UUID
        provider_charge_id: str | None
        provider_payment_intent_id: str | None
        amount_minor: int
        currency: str
        reason: str | None
        metadata: dict[str, Any]
        provider_event_id: str
        provenance: dict[str, Any]

    class StatusChanged(Aggregate.Event):
        TOPIC = "ledgercore.DisputeStatusChanged"
        status: str
        provider_status: str
        evidence_due_at: datetime | None
        provider_event_id: str
        provenance: dict[str, Any]

        def apply(self, d: PaymentDispute) -> None:
            d.status, d.provider_status = self.status, self.provider_status
            d.evidence_due_at = self.evidence_due_at or d.evidence_due_at
            if self.status == "evidence_submitted" and d.evidence_submitted_at is None:
                d.evidence_submitted_at = self.timestamp
            if self.status in TERMINAL:
                d.closed_at = self.timestamp
            d.provider_event_id, d.updated_at = self.provider_event_id, self.timestamp

    class ChargebackLinked(Aggregate.Event):
        TOPIC = "ledgercore.DisputeChargebackLinked"
        ledger_entry_id: UUID
        provider_event_id: str
        provenance: dict[str, Any]

        def apply(self, d: PaymentDispute) -> None:
            d.chargeback_ledger_entry_id, d.updated_at = self.ledger_entry_id, self.timestamp

    class ReversalLinked(Aggregate.Event):
        TOPIC = "ledgercore.DisputeReversalLinked"
        ledger_entry_id: UUID
        provider_event_id: str
        provenance: dict[str, Any]

        def apply(self, d: PaymentDispute) -> None:
            d.reversal_ledger_entry_id, d.updated_at = self.ledger_entry_id, self.timestamp

    def __init__(self, provider: str, provider_dispute_id: str, payment_session_id: UUID,
                 user_id: UUID, org_id: UUID, provider_charge_id: str | None,
                 provider_payment_intent_id: str | None, amount_minor: int, currency: str,
                 reason: str | None, metadata: dict[str, Any], provider_event_id: str,
                 provenance: dict[str, Any]):
        self.provider, self.provider_dispute_id = provider, provider_dispute_id
        self.payment_session_id, self.user_id, self.org_id = payment_session_id, user_id, org_id
        self.provider_charge_id = provider_charge_id
        self.provider_payment_intent_id = provider_payment_intent_id
        self.amount_minor, self.currency = amount_minor, currency
        self.reason, self.metadata = reason, metadata
        self.provider_event_id = provider_event_id
        self.correlation_id = provenance.get("correlation_id")
        self.status, self.provider_status = "opened", None
        self.evidence_due_at: datetime | None = None
        self.evidence_submitted_at: datetime | None = None
        self.closed_at: datetime | None = None
        self.chargeback_ledger_entry_id: UUID | None = None
        self.reversal_ledger_entry_id: UUID | None = None
        self.updated_at: datetime | None = None

    @property
    def amount(self) -> Money:
        return Money(self.amount_minor, self.currency)

    def as_contract(self) -> dict[str, Any]:
        return dispute_json({**{k: getattr(self, k) for k in (
            "provider", "provider_dispute_id", "payment_session_id", "user_id", "org_id",
            "provider_charge_id", "provider_payment_intent_id", "status", "provider_status",
            "reason", "amount_minor", "currency", "evidence_due_at", "evidence_submitted_at",
            "closed_at", "provider_event_id", "chargeback_ledger_entry_id",
            "reversal_ledger_entry_id", "correlation_id", "metadata")},
            "id": self.id, "created_at": self.created_on,
            "updated_at": self.updated_at or self.created_on})


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def dispute_json(row: dict[str, Any]) -> dict[str, Any]:
    """A dispute's fields (aggregate or read-model row) as the contract's ``PaymentDispute``."""
    def opt(value: Any) -> str | None:
        return None if value is None else str(value)

    return {
        "id": str(row["id"]), "org_id": str(row["org_id"]), "user_id": opt(row["user_id"]),
        "payment_session_id": opt(row["payment_session_id"]), "provider": row["provider"],
        "provider_dispute_id": row["provider_dispute_id"],
        "provider_charge_id": row["provider_charge_id"],
        "provider_payment_intent_id": row["provider_payment_intent_id"],
        "status": row["status"], "provider_status": row["provider_status"],
        "reason": row["reason"],
        "amount": {"amount_minor": row["amount_minor"], "currency": row["currency"]},
        "evidence_due_at": _iso(row["evidence_due_at"]),
        "evidence_submitted_at": _iso(row["evidence_submitted_at"]),
        "closed_at": _iso(row["closed_at"]), "provider_event_id": row["provider_event_id"],
        "chargeback_ledger_entry_id": opt(row["chargeback_ledger_entry_id"]),
        "reversal_ledger_entry_id": opt(row["reversal_ledger_entry_id"]),
        "correlation_id": row["correlation_id"], "metadata": row["metadata"] or {},
        "created_at": _iso(row["created_at"]), "updated_at": _iso(row["updated_at"]),
    }


def dispute_update(provider_event_id: str, report: ProviderDispute
                   ) -> Callable[[CommandContext, Session], Applied]:
    """A ``charge.dispute.*`` event, applied once (the inbox dedupes its id)."""

    def apply(ctx: CommandContext, session: Session) -> Applied:
        link = session.get(link_id_for(report.payment_intent_id)) \
            if report.payment_intent_id else None
        if not isinstance(link, ProviderPaymentLink):
            return [], {"applied": False}  # not a payment credited here
        dispute_id = dispute_id_for(report.provider_dispute_id)
        dispute = session.get(dispute_id)
        if dispute is None:
            dispute = PaymentDispute._create(
                PaymentDispute.Created, id=dispute_id, provider="stripe",
                provider_dispute_id=report.provider_dispute_id,
                payment_session_id=link.payment_session_id, user_id=link.user_id,
                org_id=link.org_id, provider_charge_id=report.charge_id,
                provider_payment_intent_id=report.payment_intent_id,
                amount_minor=report.amount.amount_minor, currency=report.amount.currency,
                reason=report.reason, metadata=report.metadata,
                provider_event_id=provider_event_id, provenance=ctx.provenance(),
                timestamp=ctx.now)
        changed: list[Any] = [dispute]
        status = report.status
        if dispute.status not in TERMINAL and RANK[status] >= RANK[dispute.status] and (
                status != dispute.status or report.provider_status != dispute.provider_status
                or (report.evidence_due_at or dispute.evidence_due_at) != dispute.evidence_due_at):
            dispute.trigger_event(PaymentDispute.StatusChanged, status=status,
                                  provider_status=report.provider_status,
                                  evidence_due_at=report.evidence_due_at,
                                  provider_event_id=provider_event_id,
                                  provenance=ctx.provenance(), timestamp=ctx.now)
        withdrawn = report.funds_withdrawn or dispute.status in ("won", "lost")
        if withdrawn and dispute.chargeback_ledger_entry_id is None:
            changed += _post(ctx, session, dispute, "chargeback", provider_event_id)
        if dispute.status == "won" and dispute.chargeback_ledger_entry_id is not None \
                and dispute.reversal_ledger_entry_id is None:
            changed += _post(ctx, session, dispute, "chargeback_reversal", provider_event_id)
        return changed, {"applied": True}

    return apply


def _post(ctx: CommandContext, session: Session, dispute: PaymentDispute, entry_type: str,
          provider_event_id: str) -> list[Any]:
    """Post the chargeback or its reversal, link it, and move the refundable funds."""
    account = session.get(account_id_for(dispute.user_id))
    if account is None:  # a linked payment was credited, so this cannot happen
        account = BillingAccount.open(dispute.user_id, session.default_currency,
                                      ctx.provenance(), ctx.now)
    entry_id = account.move(
        entry_type=entry_type, amount=dispute.amount, reference_type="payment_dispute",
        reference_id=str(dispute.id),
        details={"provider_dispute_id": dispute.provider_dispute_id,
                 "payment_session_id": str(dispute.payment_session_id)},
        provenance=ctx.provenance(), at=ctx.now)
    event = PaymentDispute.ChargebackLinked if entry_type == "chargeback" \
        else PaymentDispute.ReversalLinked
    dispute.trigger_event(event, ledger_entry_id=entry_id, provider_event_id=provider_event_id,
                          provenance=ctx.provenance(), timestamp=ctx.now)
    funds = open_funds(session, dispute.user_id, ctx.now)
    funds.draw("chargeback", dispute.id, dispute.payment_session_id, dispute.amount, ctx.now,
               restore=entry_type == "chargeback_reversal")
    return [account, funds]
