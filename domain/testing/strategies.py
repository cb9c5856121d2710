"""Hypothesis strategies for valid and deliberately invalid commands."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

#: currencies with 2, 0 and 3 minor-unit digits
CURRENCIES = ("USD", "EUR", "AED", "JPY", "KWD")


def currencies() -> st.SearchStrategy[str]:
    return st.sampled_from(CURRENCIES)


def amounts(max_minor: int = 10**12) -> st.SearchStrategy[int]:
    return st.integers(min_value=1, max_value=max_minor)


def adjustments(max_minor: int = 10**12) -> st.SearchStrategy[dict[str, Any]]:
    """Valid ``AdminAdjustBalanceRequest`` bodies."""
    return st.fixed_dictionaries({
        "direction": st.sampled_from(["credit", "debit"]),
        "amount_minor": amounts(max_minor),
        "currency": currencies(),
        "reason": st.text(min_size=1, max_size=40),
    })


def invalid_adjustments() -> st.SearchStrategy[dict[str, Any]]:
    """Bodies the contract's schema rejects: each breaks exactly one rule."""
    valid = adjustments()
    breakers = st.sampled_from([
        ("amount_minor", st.integers(max_value=0)),
        ("amount_minor", st.floats(allow_nan=False, allow_infinity=False)),
        ("amount_minor", st.text(max_size=5)),
        ("amount_minor", st.booleans()),
        ("currency", st.text(max_size=6).filter(lambda s: not (len(s) == 3 and s.isupper() and s.isascii() and s.isalpha()))),
        ("direction", st.text(max_size=10).filter(lambda s: s not in ("credit", "debit"))),
        ("reason", st.none()),
        ("unknown_field", st.just(1)),
    ])

    @st.composite
    def build(draw: Any) -> dict[str, Any]:
        body = dict(draw(valid))
        field, values = draw(breakers)
        body[field] = draw(values)
        return body

    return build()
