"""Reference model of refunds and disputes over credited payments, and the invariants
the real system must keep (billing-ledger §4: 1, 4, 6, 7, 8, 15).

Obviously correct by construction: plain dicts and lists, and every total (what was
paid, refunded, charged back) recomputed from scratch whenever it is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

WINDOW = timedelta(days=30)
#: provider dispute status -> ours (the statuses the property machine sends)
DISPUTE_STATUS = {"warning_needs_response": "needs_response", "needs_response": "needs_response",
                  "under_review": "evidence_submitted", "won": "won", "lost": "lost",
                  "warning_closed": "closed"}
WITHDRAWN = {"needs_response", "under_review", "won", "lost"}
RANK = {"opened": 0, "needs_response": 1, "evidence_submitted": 2, "won": 3, "lost": 3,
        "closed": 3}


@dataclass
class MPayment:
    user: str
    amount: int
    currency: str
    credited_at: datetime
    payment_intent: str


@dataclass
class MRefund:
    user: str
    payment: str | None
    amount: int
    currency: str
    outcome: str
    status: str


@dataclass
class MDispute:
    payment: str
    amount: int
    status: str = "opened"
    chargeback: bool = False
    reversal: bool = False


@dataclass
class ReferenceRefunds:
    balances: dict[tuple[str, str], int] = field(default_factory=dict)
    payments: dict[str, MPayment] = field(default_factory=dict)
    refunds: dict[str, MRefund] = field(default_factory=dict)
    disputes: dict[str, MDispute] = field(default_factory=dict)
    blocked: set[str] = field(default_factory=set)
    seen_events: set[str] = field(default_factory=set)

    def _move(self, user: str, currency: str, signed: int) -> None:
        self.balances[(user, currency)] = self.balances.get((user, currency), 0) + signed

    # ---- money in -------------------------------------------------------------------
    def pay(self, key: str, user: str, amount: int, currency: str, at: datetime,
            payment_intent: str) -> None:
        self.payments[key] = MPayment(user, amount, currency, at, payment_intent)
        self._move(user, currency, amount)

    def adjust(self, user: str, direction: str, amount: int, currency: str) -> str:
        signed = amount if direction == "credit" else -amount
        if signed < 0 and self.balances.get((user, currency), 0) + signed < 0:
            return "insufficient_balance"
        self._move(user, currency, signed)
        return "ok"

    # ---- what is refundable --------------------------------------------------------
    def refundable(self, user: str, currency: str, payment: str | None = None) -> int:
        def mine(key: str) -> bool:
            p = self.payments[key]
            return p.user == user and p.currency == currency and payment in (None, key)

        paid = sum(p.amount for k, p in self.payments.items() if mine(k))
        refunded = sum(r.amount for r in self.refunds.values() if r.status != "failed"
                       and r.user == user and r.currency == currency
                       and (payment is None or r.payment == payment))
        charged = sum(d.amount for d in self.disputes.values()
                      if d.chargeback and not d.reversal and mine(d.payment))
        return max(0, paid - refunded - charged)

    # ---- refunds -------------------------------------------------------------------
    def refund(self, refund_id: str, user: str, amount: int, currency: str,
               reference: str | None, mode: str, now: datetime) -> dict[str, Any] | str:
        """The response's fields, or the refusal's reason."""
        if user in self.blocked:
            return "refunds_blocked"
        payment = None
        if reference is not None:
            payment = next((k for k, p in self.payments.items() if p.user == user
                            and reference in (k, p.payment_intent)), None)
            if payment is None:
                return "payment_not_found"
            if self.payments[payment].currency != currency:
                return "payment_currency_mismatch"
        refundable = self.refundable(user, currency)
        if payment is not None:
            refundable = min(refundable, self.refundable(user, currency, payment))
        if amount > refundable:
            return "refund_exceeds_refundable"
        in_window = payment is not None and now - self.payments[payment].credited_at <= WINDOW
        outcome = "provider_refund" if mode == "auto_policy" and in_window else "internal_credit"
        final, capped = amount, False
        if outcome == "provider_refund":
            unused = self.balances.get((user, currency), 0)
            if final > unused:
                final, capped = unused, True
            if final < 1:
                return "no_unused_balance"
        status = "accepted" if outcome == "provider_refund" else "completed"
        self.refunds[refund_id] = MRefund(user, payment, final, currency, outcome, status)
        self._move(user, currency, -final if outcome == "provider_refund" else final)
        return {"outcome": outcome, "status": status, "amount": final, "in_window": in_window,
                "unused_balance_rule_applied": capped}

    def provider_refund_event(self, event_id: str, refund_id: str, status: str) -> None:
        if event_id in self.seen_events:
            return
        self.seen_events.add(event_id)
        r = self.refunds.get(refund_id)
        if r is None or r.outcome != "provider_refund" or r.status != "accepted":
            return
        if status == "succeeded":
            r.status = "completed"
        elif status in ("failed", "canceled"):
            r.status = "failed"
            self._move(r.user, r.currency, r.amount)

    # ---- disputes ------------------------------------------------------------------
    def dispute_event(self, event_id: str, dispute: str, payment: str, provider_status: str,
                      amount: int) -> None:
        if event_id in self.seen_events:
            return
        self.seen_events.add(event_id)
        p = self.payments[payment]
        d = self.disputes.setdefault(dispute, MDispute(payment, amount))
        status = DISPUTE_STATUS.get(provider_status, "opened")
        if RANK[d.status] < 3 and RANK[status] >= RANK[d.status]:
            d.status = status
        if (provider_status in WITHDRAWN or d.status in ("won", "lost")) and not d.chargeback:
            d.chargeback = True
            self._move(p.user, p.currency, -d.amount)
        if d.status == "won" and d.chargeback and not d.reversal:
            d.reversal = True
            self._move(p.user, p.currency, d.amount)


def check_invariants(model: ReferenceRefunds, live: dict[str, Any]) -> None:
    """``live`` as read from the system under test:

    - ``balances``: {(user, ccy): amount} from the accounts;
    - ``entries``: [(user, ccy, entry_type, signed amount, reference_id)] in order;
    - ``chain_problems``: what ``domain.billing.verify_chain`` found;
    - ``refunds``: {refund id: (status, outcome, amount_minor)};
    - ``disputes``: {provider dispute id: (status, chargeback entry id, reversal entry id)}.
    """
    assert not live["chain_problems"], f"hash chain broken: {live['chain_problems'][:3]}"
    sums: dict[tuple[str, str], int] = {}
    for user, currency, _, signed, _ in live["entries"]:
        sums[(user, currency)] = sums.get((user, currency), 0) + signed
    nonzero = {k: v for k, v in live["balances"].items() if v}
    assert {k: v for k, v in sums.items() if v} == nonzero, "a balance is not its entries' sum"
    expected = {k: v for k, v in model.balances.items() if v}
    assert nonzero == expected, f"balances {nonzero} != model {expected}"

    by_reference: dict[tuple[str, str], list[int]] = {}
    for _, _, entry_type, signed, reference in live["entries"]:
        by_reference.setdefault((entry_type, reference), []).append(signed)
    for (entry_type, reference), amounts in by_reference.items():
        assert len(amounts) == 1 or entry_type in ("admin_credit", "admin_debit"), \
            f"{entry_type} for {reference} posted {len(amounts)} times"

    for refund_id, r in model.refunds.items():
        assert live["refunds"][refund_id] == (r.status, r.outcome, r.amount), \
            f"refund {refund_id}: {live['refunds'][refund_id]} != {(r.status, r.outcome, r.amount)}"
        out = by_reference.get(("refund", refund_id), [])
        back = by_reference.get(("refund_internal_credit", refund_id), [])
        if r.outcome == "provider_refund":
            assert out == [-r.amount], f"refund {refund_id} payout entries {out}"
            assert back == ([r.amount] if r.status == "failed" else []), \
                f"refund {refund_id} compensation entries {back}"
        else:
            assert out == [] and back == [r.amount], f"refund {refund_id} credit entries {back}"
    assert set(live["refunds"]) == set(model.refunds), "refunds differ from the model's"
    users_ccys = {(p.user, p.currency) for p in model.payments.values()}
    for user, currency in users_ccys:
        paid = sum(p.amount for p in model.payments.values()
                   if (p.user, p.currency) == (user, currency))
        refunded = sum(r.amount for r in model.refunds.values()
                       if r.status != "failed" and (r.user, r.currency) == (user, currency))
        assert refunded <= paid, f"{user} {currency}: refunded {refunded} > paid {paid}"
    for key, p in model.payments.items():
        refunded = sum(r.amount for r in model.refunds.values()
                       if r.payment == key and r.status != "failed")
        assert refunded <= p.amount, f"payment {key}: refunded {refunded} > {p.amount}"

    for dispute, d in model.disputes.items():
        status, chargeback, reversal = live["disputes"][dispute]
        assert status == d.status, f"dispute {dispute}: {status} != {d.status}"
        assert (chargeback is not None, reversal is not None) == (d.chargeback, d.reversal), \
            f"dispute {dispute}: entries {chargeback, reversal} != model {d.chargeback, d.reversal}"
        assert reversal is None or (chargeback is not None and status == "won"), \
            f"dispute {dispute}: a reversal without its chargeback or a win"
        assert status != "won" or reversal is not None, f"dispute {dispute} won without reversal"
        assert status != "lost" or reversal is None, f"dispute {dispute} lost but reversed"
    disputes_posted: dict[str, int] = {}
    for _, _, entry_type, signed, reference in live["entries"]:
        if entry_type in ("chargeback", "chargeback_reversal"):
            disputes_posted[reference] = disputes_posted.get(reference, 0) + signed
    for reference, net in disputes_posted.items():
        pair = [by_reference.get((t, reference)) for t in ("chargeback", "chargeback_reversal")]
        if pair[1] is not None:
            assert net == 0, f"dispute {reference}: chargeback and reversal net to {net}"
    assert set(live["disputes"]) == set(model.disputes), "disputes differ from the model's"
