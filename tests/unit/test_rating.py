"""The rating engine and usage records, in memory: the one rounding rule, rating_key
idempotency, split slices summing to the whole, FX, and the meter lifecycle."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain import skus, usage, usage_views
from domain.app import Ledgercore
from domain.billing import BillingAccount, account_id_for
from domain.errors import DomainError, InvalidRequest
from domain.money import Money
from domain.provenance import CommandContext
from domain.rating import (MS_PER_HOUR, Terms, fx_snapshot, rate_slice, rating_key,
                           round_half_even, to_ms)

T0 = datetime(2026, 2, 1, 9, 0, tzinfo=timezone.utc)
MINUTE = timedelta(minutes=1)


def terms(price: int = 300, currency: str = "USD", units: int = 1, *, amount_currency: str = "USD",
          fx: dict[str, Any] | None = None, record_id: uuid.UUID | None = None) -> Terms:
    return Terms(record_id=record_id or uuid.uuid4(), start_time=T0, units=units,
                 unit_price=Money(price, currency), amount_currency=amount_currency, fx=fx,
                 pricing_source="sku_unit_price", pricing_plan_id=None, pricing_plan_version=None,
                 pricing_snapshot={})


def fx(source: str, rate: str, target: str = "USD") -> dict[str, Any]:
    return fx_snapshot(source_currency=source, target_currency=target, rate=rate,
                       provider="manual", provider_rate_id=None, captured_at=T0)


# ---- the rounding rule ------------------------------------------------------------
def test_round_half_even_on_integers() -> None:
    assert [round_half_even(n, 2) for n in (1, 3, 5, 7)] == [0, 2, 2, 4]
    assert [round_half_even(n, 3) for n in (1, 2, 4, 5)] == [0, 1, 1, 2]
    assert round_half_even(10**30 + 1, 2) == 5 * 10**29  # exact far beyond float precision


def test_amount_is_price_times_units_times_hours_rounded_once() -> None:
    t = terms(price=299, units=8)
    line = rate_slice(t, T0, T0 + 7 * MINUTE)  # 299 × 8 × 7/60 = 279.07
    assert line.amount == Money(279, "USD")
    assert line.unit_quantity_millis == 8 * 7 * 60_000 and line.units == 8
    assert rate_slice(t, T0, T0 + timedelta(hours=1)).amount.amount_minor == 2392
    one = terms(price=1)
    assert one.accrued(T0 + 30 * MINUTE) == 0   # 0.5 → 0 (ties to even)
    assert one.accrued(T0 + 90 * MINUTE) == 2   # 1.5 → 2
    assert one.accrued(T0 + 150 * MINUTE) == 2  # 2.5 → 2


def test_slices_are_rated_cumulatively_so_small_slices_are_not_lost() -> None:
    """Sixty one-minute slices of a 1-cent-per-hour price: rounding each on its own
    would bill 0; rated cumulatively they bill the hour's 1 cent, like one slice."""
    t = terms(price=1)
    lines = [rate_slice(t, T0 + n * MINUTE, T0 + (n + 1) * MINUTE) for n in range(60)]
    assert sum(line.amount.amount_minor for line in lines) == 1
    assert rate_slice(t, T0, T0 + 60 * MINUTE).amount.amount_minor == 1
    assert round_half_even(1 * 60_000, MS_PER_HOUR) == 0  # what per-line rounding would give


@settings(max_examples=300, deadline=None)
@given(price=st.integers(0, 10**9), units=st.integers(1, 64),
       cuts=st.lists(st.integers(1, 10 * 3600 * 1000), min_size=1, max_size=12, unique=True),
       rate=st.none() | st.sampled_from(["1.0850", "0.0067", "3.6725", "0.333333333333333333"]),
       currency=st.sampled_from(["EUR", "JPY", "KWD"]))
def test_split_slices_sum_to_the_whole_period(price: int, units: int, cuts: list[int],
                                              rate: str | None, currency: str) -> None:
    t = terms(price, currency if rate else "USD", units, fx=fx(currency, rate) if rate else None)
    edges = [T0] + [T0 + timedelta(milliseconds=c) for c in sorted(cuts)]
    lines = [rate_slice(t, a, b) for a, b in zip(edges, edges[1:])]
    whole = rate_slice(t, edges[0], edges[-1])
    assert sum(line.amount.amount_minor for line in lines) == whole.amount.amount_minor
    assert sum(line.unit_quantity_millis for line in lines) == whole.unit_quantity_millis
    assert all(line.amount.amount_minor >= 0 for line in lines)  # accrued cost is monotone
    assert whole.amount.amount_minor == t.accrued(edges[-1])


def test_fx_converts_with_the_snapshot_and_currency_exponents() -> None:
    hour = T0 + timedelta(hours=1)
    assert terms(1000, "EUR", fx=fx("EUR", "1.0850")).accrued(hour) == 1085   # 10.00 EUR
    assert terms(1500, "JPY", fx=fx("JPY", "0.0067")).accrued(hour) == 1005   # ¥1500 (exp 0)
    assert terms(1000, "KWD", fx=fx("KWD", "3.25")).accrued(hour) == 325      # 1.000 KWD (exp 3)
    assert terms(100, "USD", amount_currency="JPY",
                 fx=fx("USD", "151.5", "JPY")).accrued(hour) == 152           # $1 → ¥151.5 → 152
    for bad in ("1e3", "-1", "0", "1.", ".5", "abc"):
        with pytest.raises(InvalidRequest):
            fx("EUR", bad)
    with pytest.raises(InvalidRequest):
        fx("EUR", 1.085)  # type: ignore[arg-type]  # a float rate is refused


def test_times_are_truncated_to_the_millisecond_and_must_be_aware() -> None:
    assert to_ms(T0 + timedelta(microseconds=1999)) == T0 + timedelta(milliseconds=1)
    with pytest.raises(InvalidRequest):
        to_ms(datetime(2026, 1, 1))


# ---- rating_key -------------------------------------------------------------------
def test_rating_key_is_a_pure_function_of_the_slice_and_its_terms() -> None:
    record = uuid.uuid4()
    a, b = terms(record_id=record), terms(record_id=record)
    first, again = rate_slice(a, T0, T0 + MINUTE), rate_slice(b, T0, T0 + MINUTE)
    assert first == again and first.id == again.id and first.rating_key == again.rating_key
    assert len(first.rating_key) == 64
    others = {rating_key(a, T0, T0 + 2 * MINUTE),
              rating_key(terms(301, record_id=record), T0, T0 + MINUTE),
              rating_key(terms(record_id=uuid.uuid4()), T0, T0 + MINUTE),
              rating_key(terms(units=2, record_id=record), T0, T0 + MINUTE)}
    assert first.rating_key not in others and len(others) == 4


# ---- usage records in the application ---------------------------------------------
def render(result: Any) -> dict[str, Any]:
    if isinstance(result, DomainError):
        return {"error": result.details.get("reason") or result.code, "kind": result.kind}
    return {"ok": result}


class Meters:
    def __init__(self) -> None:
        self.app = Ledgercore(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
        self.user = uuid.uuid4()
        self.now = T0 + timedelta(days=1)
        self.run(skus.create_sku, sku="h100", spec={
            "vendor": "nvidia", "display_name": "H100", "resource_class": "gpu_baremetal",
            "billing_unit": "gpu_hour", "scheduling_unit": "node",
            "resources": {"accelerator_count": 8},
            "unit_price": {"amount_minor": 300, "currency": "USD"}})

    def run(self, factory: Any, **kwargs: Any) -> dict[str, Any]:
        ctx = CommandContext(actor_id="t", actor_type="system", source="system", now=self.now)
        return self.app.execute(factory(ctx, render=render, **kwargs)).response

    def open(self, units: int = 2, **kwargs: Any) -> uuid.UUID:
        allocation = uuid.uuid4()
        meter = usage.Meter(usage_source="allocation", allocation_id=allocation,
                            requested_by_user_id=self.user, units=units, sku="h100")
        assert "ok" in self.run(usage.open_usage, meter=meter, start_time=T0, **kwargs)
        return usage.usage_id_for_allocation(allocation)

    def position(self) -> int:
        return self.app.recorder.max_notification_id() or 0

    def balance(self) -> int:
        account = self.app.billing_account(self.user)
        return 0 if account is None else account.balance("USD")


def test_rating_the_same_interval_twice_is_a_no_op() -> None:
    m = Meters()
    record = m.open()
    first = m.run(usage.rate_usage, record_id=record, until=T0 + timedelta(hours=1))
    assert [l["amount_minor"] for l in first["ok"]["lines"]] == [600]
    before = m.position()
    for until in (T0 + timedelta(hours=1), T0 + 30 * MINUTE,
                  T0 + timedelta(hours=1, microseconds=999)):  # same millisecond
        assert m.run(usage.rate_usage, record_id=record, until=until)["ok"]["lines"] == []
    assert m.position() == before and m.balance() == -600
    tick = m.run(usage.rate_open_usage, until=T0 + timedelta(hours=1))["ok"]
    assert tick["rated_records"] == 0 and m.position() == before


def test_a_price_change_after_open_never_revalues_the_record() -> None:
    m = Meters()
    record = m.open(units=1)
    m.run(usage.rate_usage, record_id=record, until=T0 + timedelta(hours=1))
    spec = m.app.repository.get(skus.sku_id_for("h100")).spec
    m.run(skus.update_sku, sku="h100", spec={**spec, "unit_price": {"amount_minor": 9999,
                                                                    "currency": "USD"}},
          live_claims=lambda session, sku: False)
    later = m.run(usage.rate_usage, record_id=record, until=T0 + timedelta(hours=2))["ok"]
    assert later["lines"][0]["amount_minor"] == 300 and later["usage_record"]["cost_minor"] == 600
    assert later["lines"][0]["pricing_snapshot"]["unit_price"] == {"amount_minor": 300,
                                                                  "currency": "USD"}
    newer = m.open(units=1)  # a record opened after the change takes the new price
    assert m.app.repository.get(newer).terms.unit_price.amount_minor == 9999


def test_close_rates_up_to_the_end_and_a_late_end_never_unbills() -> None:
    m = Meters()
    record = m.open(units=1)
    closed = m.run(usage.close_usage, record_id=record, end_time=T0 + 90 * MINUTE)["ok"]
    assert closed["usage_record"]["end_time"] == T0 + 90 * MINUTE
    assert closed["usage_record"]["last_billed_at"] == T0 + 90 * MINUTE
    assert closed["usage_record"]["cost_minor"] == 450 == -m.balance()
    before = m.position()
    again = m.run(usage.close_usage, record_id=record, end_time=T0 + 95 * MINUTE)
    assert again["ok"]["lines"] == []
    assert m.run(usage.rate_usage, record_id=record, until=m.now)["ok"]["lines"] == []
    assert m.position() == before
    # a tick billed past the end that arrives later: the billed time stands
    late = m.open(units=1)
    m.run(usage.rate_usage, record_id=late, until=T0 + timedelta(hours=2))
    ended = m.run(usage.close_usage, record_id=late, end_time=T0 + timedelta(hours=1))["ok"]
    assert ended["usage_record"]["end_time"] == T0 + timedelta(hours=2)
    stopped = [e for e in m.app.events.get(late) if isinstance(e, usage.UsageRecord.Stopped)]
    assert stopped[0].reported_end_time == T0 + timedelta(hours=1)


def test_a_meter_never_opened_is_never_billed_and_the_future_is_not_billed() -> None:
    m = Meters()
    missing = usage.usage_id_for_allocation(uuid.uuid4())
    for factory, kwargs in ((usage.rate_usage, {"until": m.now}),
                            (usage.close_usage, {"end_time": m.now})):
        assert m.run(factory, record_id=missing, **kwargs) == {
            "error": "usage_record_not_found", "kind": "not_found"}
    record = m.open()
    future = m.run(usage.rate_usage, record_id=record, until=m.now + MINUTE)
    assert future["error"] == "time_in_future"
    assert m.app.billing_account(m.user) is None


def test_zero_priced_usage_rates_lines_without_ledger_entries() -> None:
    m = Meters()
    record = m.open(price=usage.Price(unit_price=Money(0, "USD"), usage_unit="gpu_hour",
                                      pricing_source="app_manifest"))
    line = m.run(usage.rate_usage, record_id=record, until=T0 + MINUTE)["ok"]["lines"][0]
    assert line["amount_minor"] == 0 and line["ledger_entry_id"] is None
    assert line["pricing_source"] == "app_manifest"
    assert m.app.billing_account(m.user) is None


def test_fx_is_required_for_another_currency_and_frozen_at_open() -> None:
    m = Meters()
    eur = usage.Price(unit_price=Money(1000, "EUR"), usage_unit="gpu_hour", pricing_source="p")
    meter = usage.Meter(usage_source="app_runtime", app_instance_id=uuid.uuid4(),
                        requested_by_user_id=m.user, units=1, control_plane_component=True)
    rid = usage.usage_id_for_app(meter.app_instance_id, "api", 1)
    refused = m.run(usage.open_usage, meter=meter, start_time=T0, record_id=rid, price=eur)
    assert refused["error"] == "fx_snapshot_required"
    m.run(usage.open_usage, meter=meter, start_time=T0, record_id=rid, price=eur,
          fx=fx("EUR", "1.0850"))
    line = m.run(usage.rate_usage, record_id=rid, until=T0 + timedelta(hours=1))["ok"]["lines"][0]
    assert (line["amount_minor"], line["amount_currency"]) == (1085, "USD")
    assert line["unit_price_currency"] == "EUR"
    assert line["fx_snapshot"]["rate"] == "1.0850" and m.balance() == -1085


def test_the_tick_is_bounded_and_charges_post_in_the_same_command() -> None:
    m = Meters()
    records = [m.open(units=1) for _ in range(3)]
    until = T0 + timedelta(hours=1)
    first = m.run(usage.rate_open_usage, until=until, limit=2)["ok"]
    assert first["rated_records"] == 2 and first["more"]
    second = m.run(usage.rate_open_usage, until=until, limit=2)["ok"]
    assert second["rated_records"] == 1 and not second["more"]
    assert {l["usage_record_id"] for l in first["lines"] + second["lines"]} == set(records)
    account = m.app.billing_account(m.user)
    charges = [e for e in m.app.events.get(account_id_for(m.user))
               if isinstance(e, BillingAccount.LedgerEntryPosted)]
    lines = {l["id"]: l for l in first["lines"] + second["lines"]}
    assert {e.reference_id: -e.amount_minor for e in charges} == {
        str(i): l["amount_minor"] for i, l in lines.items()}
    assert all(l["ledger_entry_id"] in {e.entry_id for e in charges} for l in lines.values())
    assert account.balance("USD") == -900


def test_shadow_rating_compares_a_candidate_price_and_writes_nothing() -> None:
    m = Meters()
    org = uuid.uuid4()
    allocation = uuid.uuid4()
    meter = usage.Meter(usage_source="allocation", allocation_id=allocation, org_id=org,
                        requested_by_user_id=m.user, units=2, sku="h100")
    m.run(usage.open_usage, meter=meter, start_time=T0)
    record = usage.usage_id_for_allocation(allocation)
    m.run(usage.rate_usage, record_id=record, until=T0 + 90 * MINUTE)
    before = m.position()
    loaded = {record: m.app.repository.get(record)}
    result = usage_views.shadow_rate(loaded, org_id=org, candidate=Money(250, "USD"),
                               pricing_source="shadow_rating", pricing_plan_id=None,
                               pricing_plan_version="v2", pricing_snapshot=None)
    line = result["lines"][0]
    assert line["existing_rated_amount"]["amount_minor"] == 900
    assert line["candidate_rated_amount"]["amount_minor"] == 750
    assert line["delta_amount"]["amount_minor"] == -150
    assert result["totals"]["delta_amount"]["amount_minor"] == -150
    assert line["unit_quantity_millis"] == 2 * 90 * 60_000
    assert result["ledger_writes"] is False and result["rated_usage_writes"] is False
    assert m.position() == before
    with pytest.raises(DomainError) as other_org:
        usage_views.shadow_rate(loaded, org_id=uuid.uuid4(), candidate=Money(250, "USD"),
                          pricing_source="s", pricing_plan_id=None, pricing_plan_version=None,
                          pricing_snapshot=None)
    assert other_org.value.details["reason"] == "usage_record_not_found"
    with pytest.raises(DomainError) as currency:
        usage_views.shadow_rate(loaded, org_id=org, candidate=Money(250, "EUR"), pricing_source="s",
                          pricing_plan_id=None, pricing_plan_version=None, pricing_snapshot=None)
    assert currency.value.details["reason"] == "currency_mismatch"
