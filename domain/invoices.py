"""Invoices: one ``Invoice`` aggregate per (payer, org, currency, calendar month,
revision), built from the rated usage lines of that month, and the commands that close
a month, apply a payment and void (and re-issue) an invoice.

How a rated line gets onto exactly one invoice:

- When a line is rated (``domain.usage``), the same command calls ``invoice_line``,
  which appends it to the payer's **draft** invoice of the line's month: the month
  holding its last billed millisecond (``bill_to`` − 1 ms). If that month is closed for
  the payer (its invoice finalized, or the month's close has run), the line rolls
  forward to the next month that is not (late usage is billed on the next invoice).
  Only months that have ended are closed, so there always is one.
- Closing a month marks it closed and finalizes its drafts: the lines freeze, with a
  digest of them in ``InvoiceFinalized``. Nothing ever edits a line after that.
- Voiding an issued invoice moves its lines, in the same command, onto a new draft
  revision of the same month (void and re-issue), so every rated line is on exactly
  one invoice that is not void.

``InvoicePeriodIndex`` shards (by payer) list a month's drafts and whether the month
is closed, so closing a month and routing late lines work from aggregates alone. In the prepaid model an invoice is a statement: issuing or paying
it posts no ledger entry (the usage charges already did). Tax is ``not_configured``
(zero); there are no payment terms, so ``due_at`` is null and ``due`` never happens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate

from domain.canonical import tagged_hash
from domain.commands import Command, Render, Session
from domain.errors import DomainError, InvalidRequest
from domain.provenance import CommandContext

NAMESPACE = uuid5(NAMESPACE_URL, "https://ledgercore.invalid/invoices")
SHARDS = 16
#: drafts one close command finalizes at most (the rest answer ``more``)
CLOSE_LIMIT = 500
#: the org of usage that names none (the contract's ``org_id`` is a required uuid)
NO_ORG = UUID(int=0)
TAX_TREATMENT = "not_configured"
#: the statuses that still expect a payment (and so may take one, or be written off)
OPEN = ("issued", "due", "partially_paid")
LINES_DIGEST_TAG = "ledgercore.invoice_lines.v1"
_PERIOD = re.compile(r"^([0-9]{4})-(0[1-9]|1[0-2])$")


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, order=True)
class Period:
    """A calendar month in UTC, named ``YYYY-MM``."""

    year: int
    month: int

    @classmethod
    def parse(cls, key: str) -> Period:
        match = _PERIOD.match(key or "")
        if not match:
            raise InvalidRequest("a period is a month, YYYY-MM", reason="invalid_period",
                                 field="period")
        return cls(int(match.group(1)), int(match.group(2)))

    @classmethod
    def of(cls, moment: datetime) -> Period:
        moment = moment.astimezone(timezone.utc)
        return cls(moment.year, moment.month)

    @property
    def key(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"

    @property
    def start(self) -> datetime:
        return datetime(self.year, self.month, 1, tzinfo=timezone.utc)

    @property
    def end(self) -> datetime:
        return self.next().start

    def next(self) -> Period:
        return Period(self.year + self.month // 12, self.month % 12 + 1)


def natural_period(bill_to: datetime) -> Period:
    """The month a line belongs to: the one holding its last billed millisecond."""
    return Period.of(bill_to - timedelta(milliseconds=1))


def invoice_id_for(owner: UUID, org: UUID, currency: str, period: str, revision: int) -> UUID:
    return uuid5(NAMESPACE, f"invoice:{owner}:{org}:{currency}:{period}:{revision}")


def invoice_line_id_for(invoice_id: UUID, rated_usage_line_id: str) -> UUID:
    return uuid5(NAMESPACE, f"invoice-line:{invoice_id}:{rated_usage_line_id}")


def index_id_for(period: str, shard: int) -> UUID:
    return uuid5(NAMESPACE, f"invoice-index:{period}:{shard}")


def shard_of(owner: UUID) -> int:
    return owner.int % SHARDS


def lines_digest(lines: tuple[dict[str, Any], ...]) -> str:
    return tagged_hash(LINES_DIGEST_TAG, list(lines))


def tax_snapshot() -> dict[str, Any]:
    """What tax was applied, frozen at finalization: none is configured."""
    return {"treatment": TAX_TREATMENT, "tax_total_minor": 0, "jurisdiction": None,
            "note": "no tax configuration; tax is zero"}


class Invoice(Aggregate):
    TOPIC = "ledgercore.Invoice"

    class Created(Aggregate.Created):
        TOPIC = "ledgercore.InvoiceDrafted"
        owner_user_id: UUID
        org_id: UUID
        currency: str
        period: str
        period_start: datetime
        period_end: datetime
        revision: int
        replaces: UUID | None
        provenance: dict[str, Any]

    class LineAdded(Aggregate.Event):
        """A rated usage line put on this draft (``line`` is the invoice line)."""

        TOPIC = "ledgercore.InvoiceLineAdded"
        line: dict[str, Any]
        provenance: dict[str, Any]

        def apply(self, invoice: Invoice) -> None:
            invoice.lines = (*invoice.lines, self.line)
            invoice.total_minor += self.line["amount_minor"]

    class LinesCarried(Aggregate.Event):
        """The lines of a voided revision, re-issued on this draft."""

        TOPIC = "ledgercore.InvoiceLinesCarried"
        from_invoice_id: UUID
        lines: list[dict[str, Any]]
        provenance: dict[str, Any]

        def apply(self, invoice: Invoice) -> None:
            invoice.lines = (*invoice.lines, *self.lines)
            invoice.total_minor += sum(line["amount_minor"] for line in self.lines)

    class Finalized(Aggregate.Event):
        """draft → issued: the lines freeze (``lines_digest`` is their fingerprint)."""

        TOPIC = "ledgercore.InvoiceFinalized"
        total_minor: int
        tax_total_minor: int
        tax_treatment: str
        tax_snapshot: dict[str, Any]
        line_count: int
        lines_digest: str
        finalized_at: datetime
        issued_at: datetime
        due_at: datetime | None
        provenance: dict[str, Any]

        def apply(self, invoice: Invoice) -> None:
            invoice.status = "issued"
            invoice.finalized_at, invoice.issued_at = self.finalized_at, self.issued_at
            invoice.due_at = self.due_at
            invoice.tax_snapshot = self.tax_snapshot

    class PaymentApplied(Aggregate.Event):
        """A payment recorded against the invoice (evidence only: the money is on the
        ledger already); ``status`` is the status after it."""

        TOPIC = "ledgercore.InvoicePaymentApplied"
        amount_minor: int
        applied_minor: int
        status: str
        reference: str
        provenance: dict[str, Any]

        def apply(self, invoice: Invoice) -> None:
            invoice.applied_minor, invoice.status = self.applied_minor, self.status

    class BecameDue(Aggregate.Event):
        """issued → due: its ``due_at`` has passed with nothing paid."""

        TOPIC = "ledgercore.InvoiceBecameDue"
        provenance: dict[str, Any]

        def apply(self, invoice: Invoice) -> None:
            invoice.status = "due"

    class WrittenOff(Aggregate.Event):
        """What was left to pay will not be collected (evidence only, like a payment:
        the usage was charged to the ledger when it was rated)."""

        TOPIC = "ledgercore.InvoiceWrittenOff"
        reason: str
        outstanding_minor: int
        provenance: dict[str, Any]

        def apply(self, invoice: Invoice) -> None:
            invoice.status = "write_off"

    class Voided(Aggregate.Event):
        TOPIC = "ledgercore.InvoiceVoided"
        reason: str
        replaced_by: UUID
        voided_at: datetime
        provenance: dict[str, Any]

        def apply(self, invoice: Invoice) -> None:
            invoice.status, invoice.voided_at = "void", self.voided_at
            invoice.replaced_by = self.replaced_by

    def __init__(self, owner_user_id: UUID, org_id: UUID, currency: str, period: str,
                 period_start: datetime, period_end: datetime, revision: int,
                 replaces: UUID | None, provenance: dict[str, Any]):
        self.owner_user_id, self.org_id, self.currency = owner_user_id, org_id, currency
        self.period, self.period_start, self.period_end = period, period_start, period_end
        self.revision, self.replaces = revision, replaces
        self.status = "draft"
        #: a tuple, so a command's rollback copy shares it instead of copying every line
        #: (appends build a new tuple from any sequence: a snapshot may hold a list)
        self.lines: tuple[dict[str, Any], ...] = ()
        self.total_minor = 0
        self.applied_minor = 0
        self.finalized_at: datetime | None = None
        self.issued_at: datetime | None = None
        self.due_at: datetime | None = None
        self.voided_at: datetime | None = None
        self.replaced_by: UUID | None = None
        self.tax_snapshot: dict[str, Any] = {}

    @classmethod
    def draft(cls, *, owner: UUID, org: UUID, currency: str, period: Period, revision: int,
              replaces: UUID | None, provenance: dict[str, Any], at: datetime) -> Invoice:
        return cls._create(cls.Created, id=invoice_id_for(owner, org, currency, period.key,
                                                          revision),
                           owner_user_id=owner, org_id=org, currency=currency,
                           period=period.key, period_start=period.start,
                           period_end=period.end, revision=revision, replaces=replaces,
                           provenance=provenance, timestamp=at)

    def add_line(self, line: dict[str, Any], provenance: dict[str, Any], at: datetime) -> None:
        assert self.status == "draft", "lines are only added to a draft"
        self.trigger_event(self.LineAdded, line=line, provenance=provenance, timestamp=at)

    def finalize(self, provenance: dict[str, Any], at: datetime,
                 due_at: datetime | None = None) -> None:
        if self.status != "draft":
            raise _refusal("conflict", "only a draft invoice can be finalized",
                           "invoice_not_draft", self)
        self.trigger_event(self.Finalized, total_minor=self.total_minor, tax_total_minor=0,
                           tax_treatment=TAX_TREATMENT, tax_snapshot=tax_snapshot(),
                           line_count=len(self.lines), lines_digest=lines_digest(self.lines),
                           finalized_at=at, issued_at=at,
                           due_at=due_at if self.total_minor else None,
                           provenance=provenance, timestamp=at)
        if self.total_minor == 0:  # nothing is owed: settled at once
            self.trigger_event(self.PaymentApplied, amount_minor=0, applied_minor=0,
                               status="paid", reference="nothing_due", provenance=provenance,
                               timestamp=at)

    def pay(self, amount_minor: int, reference: str, provenance: dict[str, Any],
            at: datetime) -> None:
        if self.status not in OPEN:
            raise _refusal("conflict", f"a {self.status} invoice takes no payment",
                           "invoice_not_payable", self)
        if type(amount_minor) is not int or amount_minor < 1:
            raise InvalidRequest("amount_minor must be at least 1", field="amount_minor")
        applied = self.applied_minor + amount_minor
        if applied > self.total_minor:
            raise _refusal("invalid", "the payment exceeds what is left to pay",
                           "invoice_overpayment", self,
                           outstanding_minor=self.total_minor - self.applied_minor)
        self.trigger_event(self.PaymentApplied, amount_minor=amount_minor,
                           applied_minor=applied,
                           status="paid" if applied == self.total_minor else "partially_paid",
                           reference=reference, provenance=provenance, timestamp=at)

    def fall_due(self, provenance: dict[str, Any], at: datetime) -> bool:
        """issued → due once ``due_at`` has passed; False if it does not apply (yet)."""
        if self.status != "issued" or self.due_at is None or at < self.due_at:
            return False
        self.trigger_event(self.BecameDue, provenance=provenance, timestamp=at)
        return True

    def write_off(self, reason: str, provenance: dict[str, Any], at: datetime) -> None:
        if self.status not in OPEN:
            raise _refusal("conflict", f"a {self.status} invoice cannot be written off",
                           "invoice_not_writable_off", self)
        self.trigger_event(self.WrittenOff, reason=reason,
                           outstanding_minor=self.total_minor - self.applied_minor,
                           provenance=provenance, timestamp=at)

    def as_row(self) -> dict[str, Any]:
        """The invoice as the command answers it (ids and amounts, no lines)."""
        return {"invoice_id": str(self.id), "owner_user_id": str(self.owner_user_id),
                "org_id": str(self.org_id), "period": self.period, "revision": self.revision,
                "status": self.status, "total": {"amount_minor": self.total_minor,
                                                 "currency": self.currency},
                "applied_minor": self.applied_minor, "line_count": len(self.lines),
                "due_at": None if self.due_at is None else _iso(self.due_at)}


class InvoicePeriodIndex(Aggregate):
    """The draft invoices of one month and shard (invoice id → True), and whether the
    month's close has run (then new lines of the month go to the next one)."""

    TOPIC = "ledgercore.InvoicePeriodIndex"

    class Created(Aggregate.Created):
        TOPIC = "ledgercore.InvoicePeriodIndexCreated"
        period: str
        shard: int
        provenance: dict[str, Any]

    class Added(Aggregate.Event):
        TOPIC = "ledgercore.InvoiceDraftIndexed"
        invoice_id: str
        provenance: dict[str, Any]

        def apply(self, index: InvoicePeriodIndex) -> None:
            index.drafts[self.invoice_id] = True

    class Removed(Aggregate.Event):
        TOPIC = "ledgercore.InvoiceDraftUnindexed"
        invoice_id: str
        provenance: dict[str, Any]

        def apply(self, index: InvoicePeriodIndex) -> None:
            index.drafts.pop(self.invoice_id, None)

    class AwaitingDue(Aggregate.Event):
        """An issued invoice with a ``due_at``, to be looked at by ``mark_invoices_due``."""

        TOPIC = "ledgercore.InvoiceAwaitingDue"
        invoice_id: str
        provenance: dict[str, Any]

        def apply(self, index: InvoicePeriodIndex) -> None:
            index.awaiting_due[self.invoice_id] = True

    class DueSettled(Aggregate.Event):
        """The invoice fell due, or was paid, voided or written off first."""

        TOPIC = "ledgercore.InvoiceDueSettled"
        invoice_id: str
        provenance: dict[str, Any]

        def apply(self, index: InvoicePeriodIndex) -> None:
            index.awaiting_due.pop(self.invoice_id, None)

    class Closed(Aggregate.Event):
        TOPIC = "ledgercore.InvoicePeriodClosed"
        provenance: dict[str, Any]

        def apply(self, index: InvoicePeriodIndex) -> None:
            index.closed = True

    def __init__(self, period: str, shard: int, provenance: dict[str, Any]):
        self.period, self.shard = period, shard
        self.drafts: dict[str, bool] = {}
        self.closed = False
        #: issued invoices whose due date has still to pass
        self.awaiting_due: dict[str, bool] = {}


def _refusal(kind: str, message: str, reason: str, invoice: Invoice | None,
             **details: Any) -> DomainError:
    error = InvalidRequest(message, reason=reason, **details,
                           **({"invoice_id": str(invoice.id), "status": invoice.status}
                              if invoice is not None else {}))
    error.kind = kind
    return error


# ---- the domain API the rating commands call inside their own session ---------------
def _index(session: Session, ctx: CommandContext, period: str, shard: int) -> InvoicePeriodIndex:
    index = session.get(index_id_for(period, shard))
    if index is None:
        index = InvoicePeriodIndex._create(InvoicePeriodIndex.Created,
                                           id=index_id_for(period, shard), period=period,
                                           shard=shard, provenance=ctx.provenance(),
                                           timestamp=ctx.now)
        session.loaded[index.id] = index
    return index


def _new_draft(session: Session, ctx: CommandContext, *, owner: UUID, org: UUID,
               currency: str, period: Period, revision: int,
               replaces: UUID | None) -> list[Any]:
    """A new draft, listed in its month's index: [draft, index]."""
    session.get(invoice_id_for(owner, org, currency, period.key, revision))  # (for rollback)
    draft = Invoice.draft(owner=owner, org=org, currency=currency, period=period,
                          revision=revision, replaces=replaces, provenance=ctx.provenance(),
                          at=ctx.now)
    session.loaded[draft.id] = draft
    index = _index(session, ctx, period.key, shard_of(owner))
    index.trigger_event(InvoicePeriodIndex.Added, invoice_id=str(draft.id),
                        provenance=ctx.provenance(), timestamp=ctx.now)
    return [draft, index]


def current_revision(session: Session, owner: UUID, org: UUID, currency: str,
                     period: Period) -> tuple[Invoice | None, int]:
    """The month's invoice that is not void (None: none yet) and its revision."""
    revision = 0
    while True:
        invoice = session.get(invoice_id_for(owner, org, currency, period.key, revision))
        if invoice is None or invoice.status != "void":
            return invoice, revision
        revision += 1


def _closed(session: Session, period: Period, owner: UUID) -> bool:
    index = session.get(index_id_for(period.key, shard_of(owner)))
    return index is not None and index.closed


def _describe(meter: dict[str, Any], line: Any) -> str:
    what = meter.get("sku") or meter.get("usage_source")
    return (f"{what}: {line.units} × {meter.get('usage_unit')}, "
            f"{_iso(line.bill_from)} – {_iso(line.bill_to)}")


def invoice_line(session: Session, ctx: CommandContext, record: Any, line: Any) -> list[Any]:
    """Put a just-rated line (``UsageRecord.SliceRated``) of ``record`` on its payer's
    draft invoice (see the module docstring for which one); returns the aggregates
    changed. Called once per rated line, in the command that rates it."""
    owner = record.owner
    org = UUID(record.meter["org_id"]) if record.meter.get("org_id") else NO_ORG
    currency = line.amount["currency"]
    period = natural_period(line.bill_to)
    changed: list[Any] = []
    while True:
        invoice, revision = current_revision(session, owner, org, currency, period)
        if invoice is None and not _closed(session, period, owner):
            changed = _new_draft(session, ctx, owner=owner, org=org, currency=currency,
                                 period=period, revision=revision, replaces=None)
            invoice = changed[0]
            break
        if invoice is not None and invoice.status == "draft":
            changed = [invoice]
            break
        period = period.next()  # ends: only months that have ended are ever closed
    invoice.add_line({
        "id": str(invoice_line_id_for(invoice.id, str(line.rated_usage_line_id))),
        "line_type": "rated_usage", "description": _describe(record.meter, line),
        "amount_minor": line.amount["amount_minor"],
        "rated_usage_line_id": str(line.rated_usage_line_id),
        "usage_record_id": str(record.id),
        "ledger_entry_id": None if line.ledger_entry_id is None else str(line.ledger_entry_id),
        "bill_from": _iso(line.bill_from), "bill_to": _iso(line.bill_to),
        "created_at": _iso(ctx.now)}, ctx.provenance(), ctx.now)
    return changed


# ---- commands ------------------------------------------------------------------------
def close_invoice_period(ctx: CommandContext, *, period: str, limit: int = CLOSE_LIMIT,
                         due_days: int | None = None, render: Render) -> Command:
    """Finalize the month's drafts (at most ``limit``; ``more`` says run it again). A
    month can only be closed once it has ended. Lines rated later for it roll forward
    onto the next draft; a re-issued (voided) revision is finalized by the next run.
    With ``due_days`` each invoice that owes something is due that many days after
    its issue (``mark_invoices_due`` moves it to ``due`` then); without, it has no due date."""
    month = Period.parse(period)
    if not 1 <= limit <= 10 * CLOSE_LIMIT:
        raise ValueError("limit out of range")
    if due_days is not None and not 0 <= due_days <= 366:
        raise ValueError("due_days out of range")

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        if ctx.now < month.end:
            raise InvalidRequest(f"{month.key} has not ended yet", reason="period_not_ended",
                                 period=month.key, period_end=_iso(month.end))
        changed: dict[UUID, Any] = {}
        for shard in range(SHARDS):  # from now on the month takes no new draft
            index = _index(session, ctx, month.key, shard)
            if not index.closed:
                index.trigger_event(InvoicePeriodIndex.Closed, provenance=ctx.provenance(),
                                    timestamp=ctx.now)
                changed[index.id] = index
        finalized: list[dict[str, Any]] = []
        more = False
        for shard in range(SHARDS):
            index = session.get(index_id_for(month.key, shard))
            for invoice_id in list(index.drafts):
                if len(finalized) == limit:
                    more = True
                    break
                invoice = session.get(UUID(invoice_id))
                if invoice.status == "draft":
                    invoice.finalize(ctx.provenance(), ctx.now, due_at=None if due_days is None
                                     else ctx.now + timedelta(days=due_days))
                    changed[invoice.id] = invoice
                    finalized.append(invoice.as_row())
                    if invoice.status == "issued" and invoice.due_at is not None:
                        index.trigger_event(InvoicePeriodIndex.AwaitingDue,
                                            invoice_id=invoice_id, provenance=ctx.provenance(),
                                            timestamp=ctx.now)
                index.trigger_event(InvoicePeriodIndex.Removed, invoice_id=invoice_id,
                                    provenance=ctx.provenance(), timestamp=ctx.now)
                changed[index.id] = index
            if more:
                break
        return list(changed.values()), {"period": month.key, "finalized": finalized,
                                        "more": more}

    reads = tuple(index_id_for(month.key, s) for s in range(SHARDS))
    return Command(ctx, decide, render, reads=reads)


def mark_invoices_due(ctx: CommandContext, *, period: str, limit: int = CLOSE_LIMIT,
                      render: Render) -> Command:
    """The month's clock tick: every issued invoice whose ``due_at`` has passed becomes
    ``due`` (at most ``limit`` looked at; ``more`` says run it again). An invoice paid,
    voided or written off before its due date leaves the watch list without a change."""
    month = Period.parse(period)
    if not 1 <= limit <= 10 * CLOSE_LIMIT:
        raise ValueError("limit out of range")

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        changed: dict[UUID, Any] = {}
        became_due: list[dict[str, Any]] = []
        looked, more = 0, False
        for shard in range(SHARDS):
            index = session.get(index_id_for(month.key, shard))
            if index is None:
                continue
            for invoice_id in list(index.awaiting_due):
                if looked == limit:
                    more = True
                    break
                looked += 1
                invoice = session.get(UUID(invoice_id))
                if invoice.status == "issued" and not invoice.fall_due(ctx.provenance(),
                                                                      ctx.now):
                    continue  # not yet
                if invoice.status == "due" and invoice.id not in changed:
                    changed[invoice.id] = invoice
                    became_due.append(invoice.as_row())
                index.trigger_event(InvoicePeriodIndex.DueSettled, invoice_id=invoice_id,
                                    provenance=ctx.provenance(), timestamp=ctx.now)
                changed[index.id] = index
            if more:
                break
        return list(changed.values()), {"period": month.key, "became_due": became_due,
                                        "more": more}

    reads = tuple(index_id_for(month.key, s) for s in range(SHARDS))
    return Command(ctx, decide, render, reads=reads)


def write_off_invoice(ctx: CommandContext, *, invoice_id: UUID, reason: str,
                      render: Render) -> Command:
    """Record that what is left to pay on an open invoice will not be collected."""
    if not reason:
        raise ValueError("a write-off names its reason")

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        invoice = _load(session, invoice_id)
        invoice.write_off(reason, ctx.provenance(), ctx.now)
        return [invoice], invoice.as_row()

    return Command(ctx, decide, render)


def _load(session: Session, invoice_id: UUID) -> Invoice:
    invoice = session.get(invoice_id)
    if not isinstance(invoice, Invoice):
        raise _refusal("not_found", "invoice not found", "invoice_not_found", None,
                       invoice_id=str(invoice_id))
    return invoice


def apply_invoice_payment(ctx: CommandContext, *, invoice_id: UUID, amount_minor: int,
                          reference: str, render: Render) -> Command:
    """Record a payment against an issued invoice: ``partially_paid`` until the payments
    reach the total, then ``paid``; more than is left to pay is refused."""
    if not reference:
        raise ValueError("a payment names its reference")

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        invoice = _load(session, invoice_id)
        invoice.pay(amount_minor, reference, ctx.provenance(), ctx.now)
        return [invoice], invoice.as_row()

    return Command(ctx, decide, render)


def void_invoice(ctx: CommandContext, *, invoice_id: UUID, reason: str,
                 render: Render) -> Command:
    """Void an issued invoice and re-issue its lines on a new draft revision of the same
    month (finalized by the month's next close). Drafts have nothing to void, and an
    invoice with payments applied is not voided (those would have to move too)."""
    if not reason:
        raise ValueError("a void names its reason")

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        invoice = _load(session, invoice_id)
        if invoice.status not in ("issued", "due"):
            raise _refusal("conflict", f"a {invoice.status} invoice cannot be voided",
                           "invoice_not_voidable", invoice)
        period = Period.parse(invoice.period)
        changed = _new_draft(session, ctx, owner=invoice.owner_user_id, org=invoice.org_id,
                             currency=invoice.currency, period=period,
                             revision=invoice.revision + 1, replaces=invoice.id)
        draft = changed[0]
        carried = [{**line, "id": str(invoice_line_id_for(draft.id, line["rated_usage_line_id"])),
                    "created_at": _iso(ctx.now)} for line in invoice.lines]
        if carried:
            draft.trigger_event(Invoice.LinesCarried, from_invoice_id=invoice.id, lines=carried,
                                provenance=ctx.provenance(), timestamp=ctx.now)
        invoice.trigger_event(Invoice.Voided, reason=reason, replaced_by=draft.id,
                              voided_at=ctx.now, provenance=ctx.provenance(), timestamp=ctx.now)
        return [invoice, *changed], {**invoice.as_row(), "replaced_by": str(draft.id)}

    return Command(ctx, decide, render)
