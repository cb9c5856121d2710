"""The billing account: a money ledger per owner, one hash chain per account.

Every movement is a ``LedgerEntryPosted`` event (or a subclass naming the movement);
balances are folds of those entries and are never stored anywhere as a decision
input but here. Entries are append-only; a correction is a new entry.
"""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate

from domain.canonical import GENESIS_HASH, ledger_entry_hash
from domain.commands import Command, Render, Session
from domain.errors import InsufficientBalance, InvalidRequest
from domain.money import INT64_MAX, Money
from domain.provenance import CommandContext

NAMESPACE = uuid5(NAMESPACE_URL, "https://ledgercore.invalid/billing")

#: entry_type -> (sign of the wallet leg, the balancing account)
ENTRY_TYPES: dict[str, tuple[int, str]] = {
    "admin_credit": (+1, "adjustments"),
    "admin_debit": (-1, "adjustments"),
    "payment_credit": (+1, "psp_clearing"),
    "refund": (-1, "refunds_payable"),
    "refund_internal_credit": (+1, "refunds_payable"),
    "chargeback": (-1, "psp_disputes"),
    "chargeback_reversal": (+1, "psp_disputes"),
    "usage_charge": (-1, "usage_revenue"),
}
#: entries that record what already happened elsewhere (the provider took the money,
#: the GPU ran): they post even when the balance goes below zero; every other debit
#: is refused rather than overdraw
MAY_OVERDRAW = frozenset({"chargeback", "usage_charge"})


@lru_cache(maxsize=65_536)
def account_id_for(owner_user_id: UUID) -> UUID:
    """The ledger is keyed by owner user (see docs/decisions.md). Remembered: each
    command asks it at least twice, and a name-based UUID is a SHA-1."""
    return uuid5(NAMESPACE, f"billing-account:{owner_user_id}")


def wallet(owner_user_id: UUID, currency: str) -> str:
    return f"wallet:{owner_user_id}:{currency}"


def entry_body(
    *,
    account_id: UUID,
    entry_id: UUID,
    seq: int,
    entry_type: str,
    amount_minor: int,
    currency: str,
    reference_type: str | None,
    reference_id: str | None,
    legs: list[dict[str, Any]],
    balance_after_minor: int,
    occurred_at: datetime,
    correlation_id: str | None,
) -> dict[str, Any]:
    """What an entry's hash covers. Auditors recompute it from an export."""
    return {
        "account_id": str(account_id),
        "entry_id": str(entry_id),
        "seq": seq,
        "entry_type": entry_type,
        "amount_minor": amount_minor,
        "currency": currency,
        "reference_type": reference_type,
        "reference_id": reference_id,
        "legs": legs,
        "balance_after_minor": balance_after_minor,
        "occurred_at": occurred_at.isoformat(),
        "correlation_id": correlation_id,
    }


class BillingAccount(Aggregate):
    TOPIC = "ledgercore.BillingAccount"

    class Created(Aggregate.Created):
        TOPIC = "ledgercore.BillingAccountOpened"
        owner_user_id: UUID
        primary_currency: str
        provenance: dict[str, Any]

    class LedgerEntryPosted(Aggregate.Event):
        TOPIC = "ledgercore.LedgerEntryPosted"
        entry_id: UUID
        seq: int
        entry_type: str
        amount_minor: int
        currency: str
        reference_type: str | None
        reference_id: str | None
        legs: list[dict[str, Any]]
        balance_after_minor: int
        prev_hash: str
        entry_hash: str
        occurred_at: datetime
        provenance: dict[str, Any]

        def apply(self, account: BillingAccount) -> None:
            account.balances[self.currency] = self.balance_after_minor
            account.last_hash = self.entry_hash
            account.entry_count = self.seq

    class BalanceAdjusted(LedgerEntryPosted):
        TOPIC = "ledgercore.BalanceAdjusted"
        direction: str
        reason: str

    class PaymentCredited(LedgerEntryPosted):
        TOPIC = "ledgercore.PaymentCredited"
        payment_session_id: UUID
        source: str  # webhook | manual

    class MoneyMoved(LedgerEntryPosted):
        """Any other movement (refunds, chargebacks and their reversals, usage
        charges): ``details`` names what it settles (refund id, dispute id, rated
        usage line, ...)."""

        TOPIC = "ledgercore.LedgerMoneyMoved"
        details: dict[str, Any]

    def __init__(self, owner_user_id: UUID, primary_currency: str, provenance: dict[str, Any]):
        self.owner_user_id = owner_user_id
        self.primary_currency = primary_currency
        self.balances: dict[str, int] = {}
        self.last_hash = GENESIS_HASH
        self.entry_count = 0

    @classmethod
    def open(cls, owner_user_id: UUID, primary_currency: str, provenance: dict[str, Any],
             at: datetime) -> BillingAccount:
        return cls._create(
            cls.Created,
            id=account_id_for(owner_user_id),
            owner_user_id=owner_user_id,
            primary_currency=primary_currency,
            provenance=provenance,
            timestamp=at,
        )

    def balance(self, currency: str) -> int:
        return self.balances.get(currency, 0)

    def adjust(self, *, direction: str, amount: Money, reason: str, adjustment_id: UUID,
               provenance: dict[str, Any], at: datetime) -> UUID:
        if direction not in ("credit", "debit"):
            raise InvalidRequest("direction must be credit or debit", field="direction")
        if amount.amount_minor < 1:
            raise InvalidRequest("amount_minor must be at least 1", field="amount_minor")
        entry_type = f"admin_{direction}"
        return self._post(
            self.BalanceAdjusted,
            entry_type=entry_type,
            amount=amount,
            reference_type="admin_adjustment",
            reference_id=str(adjustment_id),
            provenance=provenance,
            at=at,
            direction=direction,
            reason=reason,
        )

    def credit_payment(self, *, payment_session_id: UUID, amount: Money, source: str,
                       provenance: dict[str, Any], at: datetime) -> UUID:
        """A checkout's money arriving: one ``payment_credit`` per payment session (the
        session's state machine guarantees the "one")."""
        return self._post(self.PaymentCredited, entry_type="payment_credit", amount=amount,
                          reference_type="payment_session", reference_id=str(payment_session_id),
                          provenance=provenance, at=at, payment_session_id=payment_session_id,
                          source=source)

    def move(self, *, entry_type: str, amount: Money, reference_type: str, reference_id: str,
             details: dict[str, Any], provenance: dict[str, Any], at: datetime) -> UUID:
        """Post a refund, chargeback, reversal or usage charge (``ENTRY_TYPES``):
        ``amount`` is positive, the entry type gives the sign."""
        if amount.amount_minor < 1:
            raise InvalidRequest("amount_minor must be at least 1", field="amount_minor")
        return self._post(self.MoneyMoved, entry_type=entry_type, amount=amount,
                          reference_type=reference_type, reference_id=reference_id,
                          provenance=provenance, at=at, details=details)

    def _post(self, event_class: type[LedgerEntryPosted], *, entry_type: str, amount: Money,
              reference_type: str | None, reference_id: str | None,
              provenance: dict[str, Any], at: datetime, **extra: Any) -> UUID:
        sign, contra = ENTRY_TYPES[entry_type]
        signed = sign * amount.amount_minor
        after = self.balance(amount.currency) + signed
        if after < 0 and signed < 0 and entry_type not in MAY_OVERDRAW:
            raise InsufficientBalance(
                "the balance does not cover this debit",
                balance_minor=self.balance(amount.currency),
                currency=amount.currency,
                requested_minor=amount.amount_minor,
            )
        if not -INT64_MAX <= after <= INT64_MAX:
            raise InvalidRequest("the balance would exceed the int64 range",
                                 reason="balance_out_of_range", currency=amount.currency)
        seq = self.entry_count + 1
        entry_id = uuid5(NAMESPACE, f"entry:{self.id}:{seq}")
        legs = [
            {"account": wallet(self.owner_user_id, amount.currency), "amount_minor": signed},
            {"account": contra, "amount_minor": -signed},
        ]
        body = entry_body(
            account_id=self.id, entry_id=entry_id, seq=seq, entry_type=entry_type,
            amount_minor=signed, currency=amount.currency, reference_type=reference_type,
            reference_id=reference_id, legs=legs, balance_after_minor=after, occurred_at=at,
            correlation_id=provenance.get("correlation_id"),
        )
        self.trigger_event(
            event_class,
            entry_id=entry_id,
            seq=seq,
            entry_type=entry_type,
            amount_minor=signed,
            currency=amount.currency,
            reference_type=reference_type,
            reference_id=reference_id,
            legs=legs,
            balance_after_minor=after,
            prev_hash=self.last_hash,
            entry_hash=ledger_entry_hash(body, self.last_hash),
            occurred_at=at,
            provenance=provenance,
            timestamp=at,
            **extra,
        )
        return entry_id


def verify_chain(account_id: UUID, entries: list[dict[str, Any]]) -> list[str]:
    """Check one account's hash chain from its entries (ordered by ``seq``).

    Each entry is a dict with the ``entry_body`` fields plus ``prev_hash`` and
    ``entry_hash``. Returns the problems found; an empty list means the chain holds.
    Needs nothing but the entries: an auditor runs it offline on an export."""
    problems = []
    prev = GENESIS_HASH
    balances: dict[str, int] = {}
    for expected_seq, entry in enumerate(entries, start=1):
        where = f"account {account_id} entry {entry.get('seq')}"
        if entry["seq"] != expected_seq:
            problems.append(f"{where}: expected seq {expected_seq}")
        if entry["prev_hash"] != prev:
            problems.append(f"{where}: prev_hash does not link to the previous entry")
        if sum(leg["amount_minor"] for leg in entry["legs"]) != 0:
            problems.append(f"{where}: legs do not balance to zero")
        balances[entry["currency"]] = balances.get(entry["currency"], 0) + entry["amount_minor"]
        if balances[entry["currency"]] != entry["balance_after_minor"]:
            problems.append(f"{where}: balance_after_minor is not the running sum")
        body = {key: entry[key] for key in (
            "entry_id", "seq", "entry_type", "amount_minor", "currency", "reference_type",
            "reference_id", "legs", "balance_after_minor", "occurred_at", "correlation_id")}
        body["account_id"] = account_id
        recomputed = ledger_entry_hash(entry_body(**body), entry["prev_hash"])
        if recomputed != entry["entry_hash"]:
            problems.append(f"{where}: entry_hash does not match its contents")
        prev = entry["entry_hash"]
    return problems


def entry_record(event: BillingAccount.LedgerEntryPosted) -> dict[str, Any]:
    """An entry event as the plain dict ``verify_chain`` reads."""
    return {
        "entry_id": event.entry_id, "seq": event.seq, "entry_type": event.entry_type,
        "amount_minor": event.amount_minor, "currency": event.currency,
        "reference_type": event.reference_type, "reference_id": event.reference_id,
        "legs": event.legs, "balance_after_minor": event.balance_after_minor,
        "occurred_at": event.occurred_at, "correlation_id": event.provenance.get("correlation_id"),
        "prev_hash": event.prev_hash, "entry_hash": event.entry_hash,
    }


def adjust_balance(ctx: CommandContext, *, user_id: UUID, direction: str, amount: Money,
                   reason: str, render: Render) -> Command:
    """``adminAdjustBalance``: credit or debit a user's account (opened on first use)."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        account = session.get(account_id_for(user_id))
        if account is None:
            account = BillingAccount.open(user_id, session.default_currency,
                                          ctx.provenance(), ctx.now)
        entry_id = account.adjust(direction=direction, amount=amount, reason=reason,
                                  adjustment_id=UUID(ctx.causation_id),
                                  provenance=ctx.provenance(), at=ctx.now)
        return [account], {"ok": True, "entry_id": str(entry_id)}

    return Command(ctx, decide, render, reads=(account_id_for(user_id),))
