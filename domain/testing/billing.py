"""Reference model of the billing ledger and its invariants (billing-ledger §4: balances
per currency are the sum of their entries, never negative, never past int64; entries
are append-only along a hash chain; an idempotency key answers its first answer).

``observe(app, owners)`` reads the real accounts of ``owners`` (aggregates and their
entry events) into the plain dict ``check_invariants(model, live)`` compares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from domain.billing import BillingAccount, account_id_for, entry_record, verify_chain
from domain.money import INT64_MAX


@dataclass
class ReferenceLedger:
    """Obviously correct: balances are dicts, entries are a list, nothing else."""

    balances: dict[tuple[str, str], int] = field(default_factory=dict)
    entries: list[tuple[str, str, int]] = field(default_factory=list)  # (owner, ccy, signed)
    answers: dict[str, tuple[str, Any]] = field(default_factory=dict)  # idempotency key -> answer

    def balance(self, owner: str, currency: str) -> int:
        return self.balances.get((owner, currency), 0)

    def adjust(self, owner: str, direction: str, amount: int, currency: str,
               key: str | None = None, fingerprint: Any = None) -> str:
        """'ok', 'insufficient_balance', 'out_of_range' or 'key_reused'."""
        if key is not None and key in self.answers:
            seen_fingerprint, answer = self.answers[key]
            return answer if seen_fingerprint == fingerprint else "key_reused"
        signed = amount if direction == "credit" else -amount
        after = self.balance(owner, currency) + signed
        if after < 0:
            answer = "insufficient_balance"
        elif after > INT64_MAX:
            answer = "out_of_range"
        else:
            self.balances[(owner, currency)] = after
            self.entries.append((owner, currency, signed))
            answer = "ok"
        if key is not None:
            self.answers[key] = (fingerprint, answer)
        return answer

    def post(self, owner: str, currency: str, signed: int) -> None:
        """A movement from elsewhere (a payment's credit): always accepted."""
        self.balances[(owner, currency)] = self.balance(owner, currency) + signed
        self.entries.append((owner, currency, signed))

    def owners(self) -> set[str]:
        return {owner for owner, _ in self.balances}


def observe(app: Any, owners: Any) -> dict[str, Any]:
    """The accounts of ``owners`` (user ids) in ``app`` (a ``domain.app.Ledgercore`` on
    any persistence) as ``check_invariants`` reads them."""
    balances: dict[tuple[str, str], int] = {}
    entries: list[tuple[str, str, int]] = []
    problems: list[str] = []
    for owner in owners:
        account = app.billing_account(UUID(str(owner)))
        if account is None:
            continue
        for currency, amount in account.balances.items():
            balances[(str(owner), currency)] = amount
        events = [e for e in app.events.get(account_id_for(UUID(str(owner))))
                  if isinstance(e, BillingAccount.LedgerEntryPosted)]
        entries += [(str(owner), e.currency, e.amount_minor) for e in events]
        problems += verify_chain(account.id, [entry_record(e) for e in events])
    return {"balances": balances, "entries": entries, "chain_problems": problems}


def check_invariants(model: ReferenceLedger, live: dict[str, Any]) -> None:
    """``live``: ``{"balances": {(owner, ccy): amount}, "entries": [(owner, ccy, signed)],
    "chain_problems": [str]}`` read from the system under test for the model's owners.

    Raises AssertionError naming the first broken invariant."""
    model_balances = {k: v for k, v in model.balances.items() if v != 0}
    live_balances = {k: v for k, v in live["balances"].items() if v != 0}
    assert live_balances == model_balances, f"balances differ: {live_balances} != {model_balances}"
    sums: dict[tuple[str, str], int] = {}
    for owner, currency, signed in live["entries"]:
        sums[(owner, currency)] = sums.get((owner, currency), 0) + signed
    assert {k: v for k, v in sums.items() if v != 0} == live_balances, \
        "a balance is not the sum of its entries"
    assert sorted(live["entries"]) == sorted(model.entries), "entries differ from the model's"
    assert all(v >= 0 for v in live_balances.values()), "a balance is negative"
    assert not live.get("chain_problems"), f"hash chain broken: {live['chain_problems'][:3]}"
