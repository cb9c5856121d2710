"""What a team building a billing front end on ledgercore writes with the testing kit.

Every test here runs twice in ledgercore's CI (``ledgercore_mode = "both"``): in
process on the in-memory event store, and against the real API on Postgres. A test
that uses ``ledgercore_client`` talks HTTP, so it runs against the real API only.
"""

from __future__ import annotations

import uuid
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import rule

from ledgercore_testing import LedgercoreMachine, strategies, system


class FrontEndMachine(LedgercoreMachine):
    """The kit's machine plus what our front end does: a monthly fee it debits, never
    more than the customer holds (it checks first, as our UI does)."""

    @rule(n=st.integers(0, LedgercoreMachine.USERS - 1), fee=strategies.amounts(5_000))
    def front_end_charges_monthly_fee(self, n: int, fee: int) -> None:
        held = self.model.ledger.balance(str(self.users[n]), "USD")
        if held >= fee:
            assert self.adjust(n, "debit", fee, "USD") == "ok"


def test_front_end_keeps_ledgercore_promises(ledgercore: Any) -> None:
    FrontEndMachine.run(ledgercore)


@settings(max_examples=20, deadline=None)
@given(credits=st.lists(strategies.amounts(10**6), min_size=1, max_size=5))
def test_credits_add_up_and_an_overdraft_is_refused(ledgercore: Any, credits: list[int]) -> None:
    user = uuid.uuid4()
    model = system.ReferenceSystem()
    for amount in credits:
        assert ledgercore.adjust_balance(user, "credit", amount, "USD") == "ok"
        model.adjust(str(user), "credit", amount, "USD")
    assert ledgercore.adjust_balance(user, "debit", sum(credits) + 1, "USD") == "insufficient_balance"
    system.check_invariants(model, ledgercore.observe(model, [user]))


@settings(max_examples=25, deadline=None)
@given(body=strategies.invalid_adjustments())
def test_a_malformed_adjustment_is_a_400_and_moves_nothing(ledgercore_client: Any,
                                                            body: dict[str, Any]) -> None:
    user = uuid.uuid4()
    response = ledgercore_client.post(f"/api/v1/admin/users/{user}/balance", json=body,
                                      token=ledgercore_client.admin_token())
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"code", "message", "details", "correlation_id"}
    balance = ledgercore_client.get("/api/v1/billing/balance",
                                    token=ledgercore_client.token(user))
    assert balance.status_code == 200, balance.text
    assert all(b["amount_minor"] == 0 for b in balance.json().get("balances", []))
