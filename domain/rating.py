"""The rating engine: pure functions from a usage record's frozen terms and a time slice
to a rated usage line. No aggregates, no I/O, no floats.

The one rounding rule (docs/decisions.md, "Usage and rating"):

- ``unit_quantity_millis`` = units × milliseconds of the slice (one GPU-hour of one
  GPU = 3,600,000), timestamps truncated to whole milliseconds, so quantities are exact
  integers and never rounded.
- The amount is rated **cumulatively** from the record's ``start_time``:
  ``accrued(t) = round_half_even(unit_price_minor × units × ms(start_time, t)
  × fx_rate × 10^(exp_target − exp_price) / 3,600,000)`` (exact rational arithmetic,
  one rounding), and a line over ``[bill_from, bill_to)`` is
  ``accrued(bill_to) − accrued(bill_from)``. However a period is cut into slices, its
  lines sum to the rounded total of the whole period, and accrued cost never decreases.

``rating_key`` is a tagged SHA-256 over canonical JSON of everything that decides a
line (record, slice, price, FX rate, pricing layer/plan); the line id derives from it,
so the same slice rated twice is the same line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from domain.canonical import tagged_hash
from domain.errors import InvalidRequest
from domain.money import INT64_MAX, Money, exponent, is_known_currency

NAMESPACE = uuid5(NAMESPACE_URL, "https://ledgercore.invalid/usage")
MS_PER_HOUR = 3_600_000
RATING_VERSION = "v1"
RATING_KEY_TAG = "ledgercore.rating_key.v1"
ROUNDING = "ROUND_HALF_EVEN"
FORMULA = ("cumulative: accrued(t) = round_half_even(unit_price_minor * units * ms(start_time, t)"
           " * fx_rate * 10^(exp_amount - exp_price) / 3600000); line = accrued(bill_to) - "
           "accrued(bill_from)")
QUANTITY = "unit_quantity_millis = units * milliseconds(bill_from, bill_to)"
BILLING_UNITS = ("gpu_hour", "node_hour", "vcpu_hour")
#: a decimal FX rate as the contract's BillingFXSnapshot carries it: digits, one point
_RATE = re.compile(r"^[0-9]{1,18}(\.[0-9]{1,18})?$")


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def to_ms(moment: datetime) -> datetime:
    """UTC, truncated to the millisecond: the precision every slice boundary has."""
    if moment.tzinfo is None:
        raise InvalidRequest("times must carry a time zone", reason="naive_datetime")
    moment = moment.astimezone(timezone.utc)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def ms_between(start: datetime, end: datetime) -> int:
    return (end - start) // timedelta(milliseconds=1)


def round_half_even(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded to the nearest integer, ties to even (both ≥ 0)."""
    quotient, remainder = divmod(numerator, denominator)
    if 2 * remainder > denominator or (2 * remainder == denominator and quotient % 2 == 1):
        quotient += 1
    return quotient


def fx_snapshot(*, source_currency: str, target_currency: str, rate: str, provider: str,
                provider_rate_id: str | None, captured_at: datetime | str) -> dict[str, Any]:
    """A validated ``BillingFXSnapshot``: 1 unit of ``source`` = ``rate`` units of
    ``target``. The rate stays the string it was given (evidence is never reformatted)."""
    if not isinstance(rate, str) or not _RATE.match(rate) or Decimal(rate) <= 0:
        raise InvalidRequest("an FX rate is a positive decimal string", reason="invalid_fx_rate",
                             field="fx_snapshot.rate")
    for code in (source_currency, target_currency):
        if not is_known_currency(code):
            raise InvalidRequest(f"unknown currency {code}", reason="unsupported_currency")
    if isinstance(captured_at, datetime):
        captured_at = iso(to_ms(captured_at))
    return {"source_currency": source_currency, "target_currency": target_currency,
            "rate": rate, "provider": provider, "provider_rate_id": provider_rate_id,
            "captured_at": captured_at}


def price_snapshot(*, unit_price: Money, billing_unit: str, sku: str | None,
                   pricing_source: str, pricing_plan_id: UUID | None,
                   pricing_plan_version: str | None, captured_at: datetime) -> dict[str, Any]:
    """What a record is rated with, frozen when it opens; every line carries it, so replay
    never depends on today's prices or code defaults."""
    return {"rating_version": RATING_VERSION, "sku": sku, "billing_unit": billing_unit,
            "unit_price": unit_price.as_json(), "price_exponent": exponent(unit_price.currency),
            "pricing_source": pricing_source,
            "pricing_plan_id": None if pricing_plan_id is None else str(pricing_plan_id),
            "pricing_plan_version": pricing_plan_version, "captured_at": iso(captured_at),
            "quantity": QUANTITY, "formula": FORMULA, "rounding": ROUNDING}


@dataclass(frozen=True)
class Terms:
    """Everything a record's lines are rated from; fixed when the record opens."""

    record_id: UUID
    start_time: datetime
    units: int
    unit_price: Money
    amount_currency: str
    fx: dict[str, Any] | None
    pricing_source: str
    pricing_plan_id: str | None
    pricing_plan_version: str | None
    pricing_snapshot: dict[str, Any]
    #: the pricing layer (``customer``; a reseller's ``wholesale`` layer would be another)
    layer: str = "customer"

    def accrued(self, moment: datetime) -> int:
        """The record's rounded total from ``start_time`` up to ``moment``."""
        numerator = self.unit_price.amount_minor * self.units * ms_between(self.start_time, moment)
        denominator = MS_PER_HOUR
        if self.fx is not None:
            rate = Fraction(Decimal(self.fx["rate"]))
            numerator *= rate.numerator
            denominator *= rate.denominator
            shift = exponent(self.amount_currency) - exponent(self.unit_price.currency)
            if shift >= 0:
                numerator *= 10**shift
            else:
                denominator *= 10**-shift
        return round_half_even(numerator, denominator)


@dataclass(frozen=True)
class RatedSlice:
    id: UUID
    rating_key: str
    bill_from: datetime
    bill_to: datetime
    unit_quantity_millis: int
    units: int
    unit_price: Money
    amount: Money
    terms: Terms


def rating_key(terms: Terms, bill_from: datetime, bill_to: datetime) -> str:
    return tagged_hash(RATING_KEY_TAG, {
        "usage_record_id": str(terms.record_id), "bill_from": iso(bill_from),
        "bill_to": iso(bill_to), "layer": terms.layer, "units": terms.units,
        "pricing_source": terms.pricing_source, "pricing_plan_id": terms.pricing_plan_id,
        "pricing_plan_version": terms.pricing_plan_version,
        "unit_price": terms.unit_price.as_json(), "amount_currency": terms.amount_currency,
        "fx_rate": None if terms.fx is None else terms.fx["rate"]})


def line_id_for(key: str) -> UUID:
    return uuid5(NAMESPACE, f"rated-line:{key}")


def rate_slice(terms: Terms, bill_from: datetime, bill_to: datetime) -> RatedSlice:
    """Rate ``[bill_from, bill_to)`` of the record (both on the millisecond grid,
    ``start_time ≤ bill_from < bill_to``). Pure: same inputs, same line."""
    if not terms.start_time <= bill_from < bill_to:
        raise InvalidRequest("a slice runs forward from the record's start",
                             reason="invalid_slice")
    accrued_to = terms.accrued(bill_to)
    if accrued_to > INT64_MAX:
        raise InvalidRequest("the accrued amount would exceed the int64 range",
                             reason="amount_out_of_range")
    amount = accrued_to - terms.accrued(bill_from)
    key = rating_key(terms, bill_from, bill_to)
    return RatedSlice(id=line_id_for(key), rating_key=key, bill_from=bill_from, bill_to=bill_to,
                      unit_quantity_millis=terms.units * ms_between(bill_from, bill_to),
                      units=terms.units, unit_price=terms.unit_price,
                      amount=Money(amount, terms.amount_currency), terms=terms)


def shadow_terms(terms: Terms, candidate: Money, *, pricing_source: str,
                 pricing_plan_id: str | None, pricing_plan_version: str | None,
                 pricing_snapshot: dict[str, Any] | None) -> Terms:
    """The record's terms with a candidate price. A candidate in the record's price
    currency is converted with the record's own FX snapshot; one in the amount currency
    needs none; any other currency cannot be compared with what was charged."""
    if candidate.currency == terms.unit_price.currency:
        fx = terms.fx
    elif candidate.currency == terms.amount_currency:
        fx = None
    else:
        raise InvalidRequest(
            f"candidate price is in {candidate.currency}; the record is priced in "
            f"{terms.unit_price.currency} and charged in {terms.amount_currency}",
            reason="currency_mismatch", usage_record_id=str(terms.record_id))
    snapshot = pricing_snapshot if pricing_snapshot is not None else {
        **terms.pricing_snapshot, "unit_price": candidate.as_json(),
        "price_exponent": exponent(candidate.currency), "pricing_source": pricing_source,
        "pricing_plan_id": pricing_plan_id, "pricing_plan_version": pricing_plan_version}
    return Terms(record_id=terms.record_id, start_time=terms.start_time, units=terms.units,
                 unit_price=candidate, amount_currency=terms.amount_currency, fx=fx,
                 pricing_source=pricing_source, pricing_plan_id=pricing_plan_id,
                 pricing_plan_version=pricing_plan_version, pricing_snapshot=snapshot,
                 layer="shadow")
