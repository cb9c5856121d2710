"""Reference model of monthly invoices, and its invariants (billing-ledger §4.12–13).

``ReferenceInvoices`` decides, independently of ``domain.invoices``, which invoice each
rated line must land on (the draft of its month, else the next month still open), what
closing a month, paying and voiding do, and remembers what it has seen (each line as
rated, each invoice's last status, the lines of each finalized invoice), so that
``check_invariants`` can check the edges and that nothing finalized ever changes:

- every rated line is on exactly one invoice that is not void, with its rated amount;
- an invoice's total is the sum of its lines; ``applied`` ≤ total; ``paid`` ⇔
  finalized and fully applied; the status moves along ``EDGES`` only;
- a finalized invoice's lines and total never change, and its one ``Finalized`` event
  carries the digest of those lines.

``observe(app, model, record_ids)`` reads the real invoices (and the rated lines of the
given usage records) into the plain dict ``check_invariants`` compares.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from domain.invoices import Invoice, invoice_id_for, lines_digest, natural_period
from domain.usage import UsageRecord

EDGES = {"draft": {"draft", "issued", "paid"},
         "issued": {"issued", "partially_paid", "paid", "void"},
         "partially_paid": {"partially_paid", "paid"}, "paid": {"paid"}, "void": {"void"}}
Key = tuple[UUID, UUID, str]  # (payer, org, month)


@dataclass
class ModelInvoice:
    status: str = "draft"
    lines: list[tuple[str, int]] = field(default_factory=list)  # (rated line id, amount)
    applied: int = 0

    @property
    def total(self) -> int:
        return sum(amount for _, amount in self.lines)


@dataclass
class ReferenceInvoices:
    """Which invoice each line must land on, decided independently of the domain."""

    revisions: dict[Key, list[ModelInvoice]] = field(default_factory=dict)
    closed: set[str] = field(default_factory=set)
    #: rated line id -> amount, as rated
    rated: dict[str, int] = field(default_factory=dict)
    #: what the checks saw last: invoice id -> status, and -> (lines, total) once final
    seen_status: dict[UUID, str] = field(default_factory=dict)
    frozen: dict[UUID, tuple[Any, ...]] = field(default_factory=dict)

    def current(self, key: Key) -> ModelInvoice | None:
        revs = self.revisions.get(key)
        return revs[-1] if revs else None  # a void one is always followed by its re-issue

    def place(self, owner: UUID, org: UUID, bill_to: datetime, line_id: str,
              amount: int) -> str:
        self.rated[line_id] = amount
        period = natural_period(bill_to)
        while True:
            key = (owner, org, period.key)
            current = self.current(key)
            if current is None and period.key not in self.closed:
                current = ModelInvoice()
                self.revisions[key] = [current]
            if current is not None and current.status == "draft":
                current.lines.append((line_id, amount))
                return period.key
            period = period.next()

    def close(self, month: str) -> None:
        self.closed.add(month)
        for (_, _, period), revs in self.revisions.items():
            if period == month and revs[-1].status == "draft":
                revs[-1].status = "paid" if revs[-1].total == 0 else "issued"

    def pay(self, key: Key, amount: int) -> str | None:
        """The refusal the domain must answer, or None (and the payment is applied)."""
        current = self.current(key)
        if current.status not in ("issued", "partially_paid"):
            return "invoice_not_payable"
        if current.applied + amount > current.total:
            return "invoice_overpayment"
        current.applied += amount
        current.status = "paid" if current.applied == current.total else "partially_paid"
        return None

    def void(self, key: Key) -> str | None:
        current = self.current(key)
        if current.status != "issued":
            return "invoice_not_voidable"
        current.status = "void"
        self.revisions[key].append(ModelInvoice(lines=list(current.lines)))
        return None


def observe(app: Any, model: ReferenceInvoices, record_ids: list[str]) -> dict[str, Any]:
    """``invoices``: {(key, revision): plain invoice} for every revision the model has
    and the one after the last (None when absent, as it must be); ``record_lines``: the
    rated line ids of the given usage records' streams."""
    found: dict[tuple[Key, int], dict[str, Any] | None] = {}
    for key, revs in model.revisions.items():
        for revision in range(len(revs) + 1):
            invoice = app.get_or_none(invoice_id_for(key[0], key[1], "USD", key[2], revision))
            found[(key, revision)] = None if invoice is None else {
                "id": invoice.id, "status": invoice.status, "total": invoice.total_minor,
                "applied": invoice.applied_minor, "finalized_at": invoice.finalized_at,
                "raw_lines": invoice.lines, "lines_digest": lines_digest(invoice.lines),
                "lines": [(l["rated_usage_line_id"], l["amount_minor"]) for l in invoice.lines],
                "finalized": [(e.lines_digest, e.total_minor) for e in app.events.get(invoice.id)
                              if isinstance(e, Invoice.Finalized)]}
    lines = {str(e.rated_usage_line_id) for rid in record_ids
             for e in app.events.get(UUID(str(rid))) if isinstance(e, UsageRecord.SliceRated)}
    return {"invoices": found, "record_lines": lines}


def check_invariants(model: ReferenceInvoices, live: dict[str, Any]) -> None:
    """Raises AssertionError naming the first broken invariant (``live`` as ``observe``
    builds it). Remembers statuses and finalized lines in ``model`` for the next call."""
    expected = {(key, r): m for key, revs in model.revisions.items() for r, m in enumerate(revs)}
    for (key, revision), invoice in live["invoices"].items():
        assert (invoice is None) == ((key, revision) not in expected), \
            f"invoice {key[2]} revision {revision}: exists={invoice is not None}"
    on_invoices: Counter[str] = Counter()
    for where, want in expected.items():
        got = live["invoices"][where]
        name = f"invoice {where[0][2]} rev {where[1]} ({want.status})"
        assert got["lines"] == want.lines, f"{name}: lines differ from the model's"
        assert got["status"] == want.status, f"{name}: status {got['status']}"
        assert got["total"] == sum(a for _, a in got["lines"]) == want.total, \
            f"{name}: total is not the sum of its lines"
        assert got["applied"] == want.applied <= got["total"], f"{name}: applied"
        assert (got["status"] == "paid") == (got["status"] != "void"
                                             and got["finalized_at"] is not None
                                             and got["applied"] == got["total"]), \
            f"{name}: paid ⇔ finalized and fully applied"
        for line_id, amount in got["lines"]:  # never revalued: what was rated
            assert model.rated[line_id] == amount, f"{name}: line {line_id} revalued"
        previous = model.seen_status.get(got["id"], "draft")
        assert got["status"] in EDGES[previous], f"{name}: edge {previous} -> {got['status']}"
        model.seen_status[got["id"]] = got["status"]
        if got["status"] != "draft":
            snapshot = (got["raw_lines"], got["total"])
            assert model.frozen.setdefault(got["id"], snapshot) == snapshot, \
                f"{name}: changed after it was finalized"
            assert got["finalized"] == [(got["lines_digest"], got["total"])], \
                f"{name}: not exactly one Finalized event with its lines' digest"
        if got["status"] != "void":
            on_invoices.update(line_id for line_id, _ in got["lines"])
    assert on_invoices == Counter(list(model.rated)), \
        "a rated line is not on exactly one invoice that is not void"
    assert set(model.rated) == live["record_lines"], "rated lines differ from the records'"
