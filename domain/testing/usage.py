"""Reference model of metering and rating, and its invariants (billing-ledger §4:
9 rating is pure and idempotent, 10 coverage, 11 rated ↔ ledger, 13 never revalued;
allocations §8.11 accrued cost monotone, never-active never billed).

Obviously correct, and computed differently from ``domain.rating``: amounts are
``Fraction``s rounded by Python's ``round`` (ties to even), times are plain datetimes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from typing import Any

from domain.money import exponent

def on_ms_grid(moment: datetime) -> datetime:
    moment = moment.astimezone(timezone.utc)
    return moment - timedelta(microseconds=moment.microsecond % 1000)


@dataclass
class ModelRecord:
    owner: str
    start: datetime
    units: int
    price_minor: int
    price_currency: str
    amount_currency: str
    fx_rate: str | None
    end: datetime | None = None
    billed_to: datetime | None = None
    lines: list[tuple[datetime, datetime, int]] = field(default_factory=list)

    def total(self, moment: datetime) -> int:
        """What the whole period from ``start`` to ``moment`` costs, rounded once."""
        hours = Fraction((moment - self.start) // timedelta(microseconds=1), 3_600_000_000)
        amount = Fraction(self.price_minor) * self.units * hours
        if self.fx_rate is not None:
            amount *= Fraction(Decimal(self.fx_rate))
            shift = exponent(self.amount_currency) - exponent(self.price_currency)
            amount *= Fraction(10) ** shift
        return round(amount)

    @property
    def cost(self) -> int:
        return sum(amount for _, _, amount in self.lines)


@dataclass
class ReferenceUsage:
    records: dict[str, ModelRecord] = field(default_factory=dict)

    def open(self, record_id: str, record: ModelRecord) -> bool:
        """False for a re-open (a no-op)."""
        if record_id in self.records:
            return False
        record.start = on_ms_grid(record.start)
        self.records[record_id] = record
        return True

    def rate(self, record_id: str, until: datetime) -> int | None:
        """The new line's amount, or None when nothing is due."""
        record = self.records[record_id]
        until = on_ms_grid(until)
        if record.end is not None:
            until = min(until, record.end)
        billed_to = record.billed_to or record.start
        if until <= billed_to:
            return None
        amount = record.total(until) - record.total(billed_to)
        record.lines.append((billed_to, until, amount))
        record.billed_to = until
        return amount

    def close(self, record_id: str, end: datetime) -> None:
        record = self.records[record_id]
        if record.end is not None:
            return
        end = max(on_ms_grid(end), record.billed_to or record.start)
        record.end = end
        self.rate(record_id, end)

    def open_ids(self) -> list[str]:
        return [rid for rid, r in self.records.items() if r.end is None]

    def charged(self, owner: str, currency: str) -> int:
        return sum(r.cost for r in self.records.values()
                   if r.owner == owner and r.amount_currency == currency)


def check_usage_invariants(model: ReferenceUsage, live: dict[str, Any]) -> None:
    """``live``: ``{"records": {id: {"cost", "start", "end", "last_billed_at",
    "lines": [{"bill_from", "bill_to", "amount", "ledger_entry_id", "rating_key"}]}},
    "charges": {(owner, ccy): [(reference_id, amount_minor)]}, "balances": {(owner, ccy):
    int}, "line_owner": {line_id: (owner, ccy)}, "chain_problems": [str]}``.

    Raises AssertionError naming the first broken invariant."""
    assert set(live["records"]) == set(model.records), "records differ from the model's"
    keys = set()
    for rid, want in model.records.items():
        got = live["records"][rid]
        assert got["start"] == want.start, f"{rid}: start_time"
        assert got["end"] == want.end, f"{rid}: end_time {got['end']} != {want.end}"
        assert got["last_billed_at"] == want.billed_to, f"{rid}: last_billed_at"
        lines = [(l["bill_from"], l["bill_to"], l["amount"]) for l in got["lines"]]
        assert lines == want.lines, f"{rid}: lines {lines} != {want.lines}"
        assert got["cost"] == sum(a for _, _, a in lines), f"{rid}: cost is not the sum of lines"
        edge = want.start
        for bill_from, bill_to, _ in lines:  # coverage: contiguous from start_time
            assert bill_from == edge and bill_to > bill_from, f"{rid}: slices not contiguous"
            edge = bill_to
        if want.end is not None:
            assert (got["last_billed_at"] or want.start) == want.end == edge, \
                f"{rid}: closed but not billed to its end"
        for line in got["lines"]:
            assert line["rating_key"] not in keys, "a rating_key repeats"
            keys.add(line["rating_key"])
            assert (line["ledger_entry_id"] is None) == (line["amount"] == 0), \
                f"{rid}: a charged line has no entry, or a zero line has one"
    charged_lines = {l["id"]: l["amount"] for r in live["records"].values()
                     for l in r["lines"] if l["amount"]}
    posted = {}
    for (owner, currency), charges in live["charges"].items():
        for reference_id, amount in charges:
            assert reference_id not in posted, f"line {reference_id} charged twice"
            posted[reference_id] = -amount
        total = -sum(amount for _, amount in charges)
        assert total == model.charged(owner, currency), \
            f"{owner} {currency}: charges {total} != rated {model.charged(owner, currency)}"
        assert live["balances"].get((owner, currency), 0) == -total, \
            f"{owner} {currency}: the balance moved by other than the usage charges"
    assert posted == charged_lines, "usage_charge entries and charged lines differ"
    assert not live["chain_problems"], f"hash chain broken: {live['chain_problems'][:3]}"
