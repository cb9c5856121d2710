"""The billing account: a money ledger per owner, one hash chain per account.

Every movement is a ``LedgerEntryPosted`` event (or a subclass naming the movement);
balances are folds of those entries and are never stored anywhere as a decision
input but here. Entries are append-only; a correction is a new entry.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate

from domain.canonical import GENESIS_HASH, ledger_entry_hash
from domain.errors import InsufficientBalance, InvalidRequest
from domain.money import INT64_MAX, Money

NAMESPACE = uuid5(NAMESPACE_URL, "https://ledgercore.invalid/billing")

#: entry_type -> (sign of the wallet leg, the balancing account)
ENTRY_TYPES: dict[str, tuple[int, str]] = {
    "admin_credit": (+1, "adjustments"),
    "admin_debit": (-1, "adjustments"),
}


def account_id_for(owner_user_id: UUID) -> UUID:
    """The ledger is keyed by owner user (see docs/decisions.md)."""
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

    def _post(self, event_class: type[LedgerEntryPosted], *, entry_type: str, amount: Money,
              reference_type: str | None, reference_id: str | None,
              provenance: dict[str, Any], at: datetime, **extra: Any) -> UUID:
        sign, contra = ENTRY_TYPES[entry_type]
        signed = sign * amount.amount_minor
        after = self.balance(amount.currency) + signed
        if after < 0:
            raise InsufficientBalance(
                "the balance does not cover this debit",
                balance_minor=self.balance(amount.currency),
                currency=amount.currency,
                requested_minor=amount.amount_minor,
            )
        if after > INT64_MAX:
            raise InvalidRequest("the balance would exceed the int64 range",
                                 currency=amount.currency)
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
