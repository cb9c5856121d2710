"""Usage records (meters) and the commands that open, rate and close them.

A ``UsageRecord`` is one metered thing: an allocation while it is active, or an app
runtime while it runs. It opens with its owner, SKU, units and the price and FX terms
frozen at that moment (later price or FX changes never revalue it), and closes with an
end time. Rating bills ``[last_billed_at, until)`` as one ``BillingRatedUsageLine``
(``domain.rating``) and, in the same command, posts its ``usage_charge`` on the
owner's ``BillingAccount``; the line records the entry's id. A zero-amount line posts
no entry. Every line also goes, in the same command, onto the payer's draft invoice
(``domain.invoices.invoice_line``). Slices are contiguous from ``start_time``; rating up to a moment already
billed is a no-op.

``OpenUsageIndex`` shards (by record id) list the open records, so the clock tick
``rate_open_usage`` finds them from aggregates alone; a record enters its shard when
it opens and leaves when it closes.

Other domains call ``open_meter`` / ``stop_meter`` / ``rate_meter`` inside their own
command (an allocation's activation opens its meter in the same transaction); the
``*_usage`` functions are the same as stand-alone commands. The contract's JSON and
shadow rating are in ``domain.usage_views``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate

from domain.billing import BillingAccount, account_id_for
from domain.commands import Command, Render, Session
from domain.errors import DomainError
from domain.invoices import invoice_line
from domain.money import Money
from domain.provenance import CommandContext
from domain.rating import (NAMESPACE, Terms, fx_snapshot, iso, price_snapshot, rate_slice,
                           to_ms)
from domain.skus import Sku, get_sku, refusal

SHARDS = 16
#: records one clock tick rates at most (the rest report ``more`` and wait for the next)
TICK_LIMIT = 500
USAGE_SOURCES = ("allocation", "app_runtime")


def usage_id_for_allocation(allocation_id: UUID | str) -> UUID:
    """allocations §4: one record per allocation, so a re-open is a no-op."""
    return uuid5(NAMESPACE, f"usage:allocation:{allocation_id}")


def usage_id_for_app(app_instance_id: UUID | str, component: str, cycle: int) -> UUID:
    """app-instances §4.2: one record per entry into ``running``."""
    return uuid5(NAMESPACE, f"usage:app:{app_instance_id}:{component}:{cycle}")


def index_id_for(shard: int) -> UUID:
    return uuid5(NAMESPACE, f"open-usage-index:{shard}")


def shard_of(record_id: UUID) -> int:
    return record_id.int % SHARDS


@dataclass(frozen=True)
class Meter:
    """What is metered and who pays (the contract's ``UsageRecord`` identity fields)."""

    usage_source: str
    requested_by_user_id: UUID
    units: int
    sku: str | None = None
    usage_unit: str | None = None  # default: the SKU's billing unit
    allocation_id: UUID | None = None
    app_instance_id: UUID | None = None
    org_id: UUID | None = None
    project_id: UUID | None = None
    control_plane_component: bool = False
    operating_mode: str | None = None
    control_plane_scope: str | None = None
    runtime_backend: str | None = None


@dataclass(frozen=True)
class Price:
    """A price that does not come from the SKU (an app manifest's ``pricing`` block)."""

    unit_price: Money
    usage_unit: str
    pricing_source: str
    pricing_plan_id: UUID | None = None
    pricing_plan_version: str | None = None


def units_for(sku: Sku, gpus_total: int) -> int:
    """allocations §4: GPUs for ``gpu_hour``, 1 for ``node_hour``, vCPUs for ``vcpu_hour``."""
    unit = sku.spec["billing_unit"]
    if unit == "gpu_hour":
        return gpus_total
    if unit == "vcpu_hour":
        return int(sku.spec["resources"].get("vcpu_count") or 1)
    return 1


def meter_for_allocation(allocation_id: UUID, lease: dict[str, Any], sku: Sku) -> Meter:
    """The meter an allocation opens when it becomes active (``Allocation.lease``)."""
    return Meter(usage_source="allocation", allocation_id=allocation_id,
                 requested_by_user_id=UUID(lease["requested_by_user_id"]),
                 org_id=UUID(lease["org_id"]) if lease.get("org_id") else None,
                 project_id=UUID(lease["project_id"]) if lease.get("project_id") else None,
                 sku=sku.sku, units=units_for(sku, int(lease["gpus_total"])))


class UsageRecord(Aggregate):
    TOPIC = "ledgercore.UsageRecord"

    class Created(Aggregate.Created):
        TOPIC = "ledgercore.UsageStarted"
        meter: dict[str, Any]
        start_time: datetime
        terms: dict[str, Any]
        provenance: dict[str, Any]

    class SliceRated(Aggregate.Event):
        """One rated line; ``ledger_entry_id`` is its ``usage_charge`` (None at 0)."""

        TOPIC = "ledgercore.UsageSliceRated"
        rated_usage_line_id: UUID
        rating_key: str
        bill_from: datetime
        bill_to: datetime
        unit_quantity_millis: int
        units: int
        unit_price: dict[str, Any]
        amount: dict[str, Any]
        ledger_entry_id: UUID | None
        cost_after_minor: int
        provenance: dict[str, Any]

        def apply(self, r: UsageRecord) -> None:
            r.last_billed_at = self.bill_to
            r.cost_minor = self.cost_after_minor

    class Stopped(Aggregate.Event):
        """``end_time`` is the reported end unless earlier slices were already billed
        past it: billed time is never taken back, so the end is then the billed end."""

        TOPIC = "ledgercore.UsageStopped"
        end_time: datetime
        reported_end_time: datetime
        provenance: dict[str, Any]

        def apply(self, r: UsageRecord) -> None:
            r.end_time = self.end_time

    def __init__(self, meter: dict[str, Any], start_time: datetime, terms: dict[str, Any],
                 provenance: dict[str, Any]):
        self.meter, self.start_time, self.terms_json = dict(meter), start_time, dict(terms)
        self.end_time: datetime | None = None
        self.last_billed_at: datetime | None = None
        self.cost_minor = 0

    @property
    def owner(self) -> UUID:
        return UUID(self.meter["requested_by_user_id"])

    @property
    def billed_to(self) -> datetime:
        return self.last_billed_at or self.start_time

    @property
    def currency(self) -> str:
        return self.terms_json["amount_currency"]

    @property
    def terms(self) -> Terms:
        t = self.terms_json
        return Terms(record_id=self.id, start_time=self.start_time, units=self.meter["units"],
                     unit_price=Money(t["unit_price"]["amount_minor"], t["unit_price"]["currency"]),
                     amount_currency=t["amount_currency"], fx=t["fx_snapshot"],
                     pricing_source=t["pricing_source"], pricing_plan_id=t["pricing_plan_id"],
                     pricing_plan_version=t["pricing_plan_version"],
                     pricing_snapshot=t["pricing_snapshot"])

    def rate(self, account: Callable[[], BillingAccount], until: datetime,
             provenance: dict[str, Any], at: datetime) -> UsageRecord.SliceRated | None:
        """Bill ``[billed_to, until)`` (cut at ``end_time``): the line's event, or None
        when nothing is due. ``account()`` gives the owner's account, asked for only when
        there is something to charge. Everything that can refuse runs before anything
        changes."""
        until = to_ms(until)
        if self.end_time is not None:
            until = min(until, self.end_time)
        if until <= self.billed_to:
            return None
        line = rate_slice(self.terms, self.billed_to, until)
        entry_id = None
        if line.amount.amount_minor > 0:
            payer = account()
            assert payer.owner_user_id == self.owner, "a usage charge goes to the record's owner"
            entry_id = payer.move(
                entry_type="usage_charge", amount=line.amount, reference_type="rated_usage_line",
                reference_id=str(line.id), provenance=provenance, at=at,
                details={"usage_record_id": str(self.id), "rating_key": line.rating_key,
                         "bill_from": iso(line.bill_from), "bill_to": iso(line.bill_to)})
        self.trigger_event(
            self.SliceRated, rated_usage_line_id=line.id, rating_key=line.rating_key,
            bill_from=line.bill_from, bill_to=line.bill_to,
            unit_quantity_millis=line.unit_quantity_millis, units=line.units,
            unit_price=line.unit_price.as_json(), amount=line.amount.as_json(),
            ledger_entry_id=entry_id, cost_after_minor=self.cost_minor + line.amount.amount_minor,
            provenance=provenance, timestamp=at)
        return self.pending_events[-1]

    def row(self) -> dict[str, Any]:
        """The record as a read-model row (``usage_record_json`` renders it)."""
        return {**self.meter, "id": self.id, "start_time": self.start_time,
                "end_time": self.end_time, "last_billed_at": self.last_billed_at,
                "cost_minor": self.cost_minor, "currency": self.currency}


class OpenUsageIndex(Aggregate):
    """The open records of one shard (record id → start time)."""

    TOPIC = "ledgercore.OpenUsageIndex"

    class Created(Aggregate.Created):
        TOPIC = "ledgercore.OpenUsageIndexCreated"
        shard: int
        provenance: dict[str, Any]

    class Added(Aggregate.Event):
        TOPIC = "ledgercore.OpenUsageIndexed"
        usage_record_id: str
        provenance: dict[str, Any]

        def apply(self, index: OpenUsageIndex) -> None:
            index.open[self.usage_record_id] = True

    class Removed(Aggregate.Event):
        TOPIC = "ledgercore.OpenUsageUnindexed"
        usage_record_id: str
        provenance: dict[str, Any]

        def apply(self, index: OpenUsageIndex) -> None:
            index.open.pop(self.usage_record_id, None)

    def __init__(self, shard: int, provenance: dict[str, Any]):
        self.shard = shard
        self.open: dict[str, bool] = {}


# ---- rows --------------------------------------------------------------------------
def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def line_row(record: UsageRecord, event: UsageRecord.SliceRated) -> dict[str, Any]:
    """A rated line as a read-model row, from its record and event."""
    t = record.terms_json
    return {"id": event.rated_usage_line_id, "usage_record_id": record.id,
            "org_id": record.meter["org_id"], "project_id": record.meter["project_id"],
            "requested_by_user_id": record.meter["requested_by_user_id"],
            "usage_source": record.meter["usage_source"], "usage_unit": record.meter["usage_unit"],
            "bill_from": event.bill_from, "bill_to": event.bill_to,
            "unit_quantity_millis": event.unit_quantity_millis, "units": event.units,
            "unit_price_minor": event.unit_price["amount_minor"],
            "unit_price_currency": event.unit_price["currency"],
            "amount_minor": event.amount["amount_minor"],
            "amount_currency": event.amount["currency"],
            "pricing_source": t["pricing_source"], "pricing_plan_id": t["pricing_plan_id"],
            "pricing_plan_version": t["pricing_plan_version"],
            "pricing_snapshot": t["pricing_snapshot"], "fx_snapshot": t["fx_snapshot"],
            "rating_key": event.rating_key, "ledger_entry_id": event.ledger_entry_id,
            "invoice_line_id": None, "invoice_id": None, "created_at": event.timestamp}


# ---- the domain API other commands call inside their own session -------------------
def _not_found(record_id: UUID) -> DomainError:
    return refusal("invalid_request", "not_found", "usage record not found",
                   reason="usage_record_not_found", usage_record_id=str(record_id))


def _not_in_future(moment: datetime, ctx: CommandContext, field: str) -> datetime:
    moment = to_ms(moment)
    if moment > ctx.now:
        raise refusal("invalid_request", "invalid", f"{field} is in the future",
                      reason="time_in_future", field=field)
    return moment


def owner_account(session: Session, ctx: CommandContext, owner: UUID
                  ) -> Callable[[], BillingAccount]:
    """The owner's account, opened (in this session) on first use if it does not exist."""

    def get() -> BillingAccount:
        account = session.get(account_id_for(owner))
        if account is None:
            account = BillingAccount.open(owner, session.default_currency, ctx.provenance(),
                                          ctx.now)
            session.loaded[account.id] = account
        return account

    return get


def _index(session: Session, shard: int, ctx: CommandContext) -> OpenUsageIndex:
    index = session.get(index_id_for(shard))
    if index is None:
        index = OpenUsageIndex._create(OpenUsageIndex.Created, id=index_id_for(shard),
                                       shard=shard, provenance=ctx.provenance(),
                                       timestamp=ctx.now)
        session.loaded[index.id] = index
    return index


def open_meter(session: Session, ctx: CommandContext, *, record_id: UUID, meter: Meter,
               start_time: datetime, price: Price | None = None,
               fx: dict[str, Any] | None = None) -> list[Any]:
    """Open the record (a re-open is a no-op: returns nothing to save). The price comes
    from ``price`` or else the SKU, and is charged in the owner's primary currency:
    a price in another currency needs ``fx`` (``rating.fx_snapshot``) for exactly that
    pair. Both are frozen into the record."""
    if session.get(record_id) is not None:
        return []
    if meter.usage_source not in USAGE_SOURCES:
        raise refusal("invalid_request", "invalid", "unknown usage_source", field="usage_source")
    if type(meter.units) is not int or meter.units < 1:
        raise refusal("invalid_request", "invalid", "units must be a positive integer",
                      field="units")
    start = _not_in_future(start_time, ctx, "start_time")
    if price is None:
        if meter.sku is None:
            raise refusal("invalid_request", "invalid", "a meter needs a SKU or a price",
                          reason="price_missing")
        sku = get_sku(session, meter.sku, kind="invalid")
        billing_unit = sku.spec["billing_unit"]
        price = Price(unit_price=sku.unit_price, usage_unit=meter.usage_unit or billing_unit,
                      pricing_source="sku_unit_price")
    else:
        billing_unit = price.usage_unit
    if price.unit_price.amount_minor < 0:
        raise refusal("invalid_request", "invalid", "a unit price is never negative",
                      field="unit_price")
    account = session.get(account_id_for(meter.requested_by_user_id))
    currency = account.primary_currency if account is not None else session.default_currency
    pair = (price.unit_price.currency, currency)
    if pair[0] == currency:
        fx = None
    elif fx is None or (fx["source_currency"], fx["target_currency"]) != pair:
        raise refusal("invalid_request", "invalid",
                      f"the price is in {price.unit_price.currency} and the account in "
                      f"{currency}: an FX snapshot for that pair is required",
                      reason="fx_snapshot_required")
    else:
        fx = fx_snapshot(**fx)  # validated again: a hand-built dict gets the same checks
    snapshot = price_snapshot(
        unit_price=price.unit_price, billing_unit=billing_unit, sku=meter.sku,
        pricing_source=price.pricing_source, pricing_plan_id=price.pricing_plan_id,
        pricing_plan_version=price.pricing_plan_version, captured_at=ctx.now)
    fields = {k: (str(v) if isinstance(v, UUID) else v) for k, v in asdict(meter).items()}
    fields["usage_unit"] = price.usage_unit
    terms = {"unit_price": price.unit_price.as_json(), "amount_currency": currency,
             "fx_snapshot": fx, "pricing_source": price.pricing_source,
             "pricing_plan_id": _str(price.pricing_plan_id),
             "pricing_plan_version": price.pricing_plan_version, "pricing_snapshot": snapshot}
    record = UsageRecord._create(UsageRecord.Created, id=record_id, meter=fields,
                                 start_time=start, terms=terms, provenance=ctx.provenance(),
                                 timestamp=ctx.now)
    session.loaded[record.id] = record
    index = _index(session, shard_of(record_id), ctx)
    index.trigger_event(OpenUsageIndex.Added, usage_record_id=str(record_id),
                        provenance=ctx.provenance(), timestamp=ctx.now)
    return [record, index]


def charged(line: UsageRecord.SliceRated | None) -> bool:
    return line is not None and line.amount["amount_minor"] > 0


def rate_meter(session: Session, ctx: CommandContext, *, record_id: UUID,
               until: datetime) -> tuple[list[Any], UsageRecord.SliceRated | None]:
    """Rate the record up to ``until`` (never past its end, never in the future)."""
    record = session.get(record_id)
    if record is None:
        raise _not_found(record_id)
    until = _not_in_future(until, ctx, "until")
    account = owner_account(session, ctx, record.owner)
    line = record.rate(account, until, ctx.provenance(), ctx.now)
    if line is None:
        return [], None
    invoiced = invoice_line(session, ctx, record, line)  # on the payer's draft invoice
    return ([record, account()] if charged(line) else [record]) + invoiced, line


def stop_meter(session: Session, ctx: CommandContext, *, record_id: UUID,
               end_time: datetime) -> tuple[list[Any], UsageRecord.SliceRated | None]:
    """Rate the final slice and close the record. A record that was never opened (a
    lease never active) has nothing to bill; a closed one stays as it was."""
    record = session.get(record_id)
    if record is None or record.end_time is not None:
        return [], None
    reported = _not_in_future(end_time, ctx, "end_time")
    if reported < record.start_time:
        raise refusal("invalid_request", "invalid", "end_time is before start_time",
                      reason="end_before_start", field="end_time")
    end = max(reported, record.billed_to)
    account = owner_account(session, ctx, record.owner)
    line = record.rate(account, end, ctx.provenance(), ctx.now)
    invoiced = [] if line is None else invoice_line(session, ctx, record, line)
    record.trigger_event(UsageRecord.Stopped, end_time=end, reported_end_time=reported,
                         provenance=ctx.provenance(), timestamp=ctx.now)
    index = _index(session, shard_of(record_id), ctx)
    index.trigger_event(OpenUsageIndex.Removed, usage_record_id=str(record_id),
                        provenance=ctx.provenance(), timestamp=ctx.now)
    changed = [record, index] + ([account()] if charged(line) else []) + invoiced
    return changed, line


# ---- stand-alone commands ----------------------------------------------------------
def _lines(record: UsageRecord, line: UsageRecord.SliceRated | None) -> list[dict[str, Any]]:
    return [] if line is None else [line_row(record, line)]


def open_usage(ctx: CommandContext, *, meter: Meter, start_time: datetime,
               record_id: UUID | None = None, price: Price | None = None,
               fx: dict[str, Any] | None = None, render: Render) -> Command:
    """Open a meter (id defaults to the allocation's); answers the record."""
    if record_id is None:
        if meter.allocation_id is None:
            raise ValueError("record_id is required for a meter that is not an allocation's")
        record_id = usage_id_for_allocation(meter.allocation_id)
    rid = record_id

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        changed = open_meter(session, ctx, record_id=rid, meter=meter, start_time=start_time,
                             price=price, fx=fx)
        return changed, {"opened": bool(changed), "usage_record": session.get(rid).row()}

    reads = (rid, account_id_for(meter.requested_by_user_id), index_id_for(shard_of(rid)))
    return Command(ctx, decide, render, reads=reads)


def close_usage(ctx: CommandContext, *, record_id: UUID, end_time: datetime,
                render: Render) -> Command:
    """Rate up to ``end_time`` and close; a record never opened is ``not_found``."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        record = session.get(record_id)
        if record is None:
            raise _not_found(record_id)
        changed, line = stop_meter(session, ctx, record_id=record_id, end_time=end_time)
        return changed, {"usage_record": record.row(), "lines": _lines(record, line)}

    return Command(ctx, decide, render)


def rate_usage(ctx: CommandContext, *, record_id: UUID, until: datetime,
               render: Render) -> Command:
    """Rate one record up to ``until``; a second call for the same moment is a no-op."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        changed, line = rate_meter(session, ctx, record_id=record_id, until=until)
        record = session.get(record_id)
        return changed, {"usage_record": record.row(), "lines": _lines(record, line)}

    return Command(ctx, decide, render)


def rate_open_usage(ctx: CommandContext, *, until: datetime, limit: int = TICK_LIMIT,
                    render: Render) -> Command:
    """The clock tick: rate every open record up to ``until``, at most ``limit`` of them
    per command (``more`` tells the caller to tick again). A record the tick cannot
    rate (its amount would leave int64) is reported in ``failed`` and left as it was."""
    if not 1 <= limit <= 10 * TICK_LIMIT:
        raise ValueError("limit out of range")

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        moment = _not_in_future(until, ctx, "until")
        changed: dict[UUID, Any] = {}
        rated, lines, failed, more = 0, [], [], False
        for shard in range(SHARDS):
            index = session.get(index_id_for(shard))
            for rid in list(index.open) if index is not None else []:
                record = session.get(UUID(rid))
                if record is None or record.billed_to >= moment:
                    continue
                if rated == limit:
                    more = True
                    break
                account = owner_account(session, ctx, record.owner)
                try:
                    line = record.rate(account, moment, ctx.provenance(), ctx.now)
                except DomainError as error:
                    failed.append({"usage_record_id": rid, "reason": error.details.get("reason")})
                    continue
                rated += 1
                changed[record.id] = record
                if charged(line):
                    changed[account_id_for(record.owner)] = account()
                for invoiced in invoice_line(session, ctx, record, line) if line else []:
                    changed[invoiced.id] = invoiced
                lines += _lines(record, line)
            if more:
                break
        return list(changed.values()), {"until": iso(moment), "rated_records": rated,
                                        "lines": lines, "failed": failed, "more": more}

    return Command(ctx, decide, render, reads=tuple(index_id_for(s) for s in range(SHARDS)))
