"""Billing reconciliation runs (billing-ledger §3 "Reconciliation", §4.10-11, §5 ``verify``).

A run checks usage against allocations and the ledger, and the ledger against itself,
then records what it found as a ``ReconciliationRun`` (``Started`` and ``Completed`` or
``Failed`` in one save). It only reports: every fix is a separate, appended command.

``inspect(app)`` folds the event log from position 1 up to the position current when it
starts — never from snapshots, never from read models — so a run sees one consistent
state however long it takes and whatever is written meanwhile. The counters:

- ``missing_open_usage_count``: allocations in a metered status (``METERED``: billing
  runs while capacity is held, allocations §3.1) with no open usage record naming them.
- ``orphan_open_usage_count``: open allocation usage records whose allocation is not in
  a metered status: unknown (gone, or never admitted here), never activated
  (``requested``/``provisioning``) or ended (``released``/``failed``). App-runtime
  records are not judged: no app-instance lifecycle lives in this service.
- ``unbilled_closed_usage_count``: usage records that are closed but not rated up to
  their end (rated to ``last_billed_at``, or ``start_time`` when never rated, before
  ``end_time``), plus records with a positive rated line whose ``usage_charge`` is not in
  the ledger as that line's entry (missing, another amount or currency, another
  reference).

Ledger integrity has no counter in the contract. Every account's hash chain must verify
(``billing.verify_chain``: sequence, links, balanced legs, running balance, hashes), its
balances must equal the sum of its entries per currency, and the account as the
repository loads it (snapshot plus later events) at the folded version must have the
folded balances and last hash. Problems make the run's severity ``error``; the details
are kept on its ``Completed`` event (``findings``, ``stats``).

Severity: ``error`` when an unbilled closed record or a ledger problem exists, ``warn``
when only missing or orphan meters do, ``ok`` otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate
from eventsourcing.utils import get_topic

from domain.allocations import Allocation
from domain.billing import BillingAccount, entry_record, verify_chain
from domain.commands import Command, Render, Session
from domain.errors import DomainError
from domain.provenance import CommandContext
from domain.rating import iso
from domain.usage import UsageRecord

NAMESPACE = uuid5(NAMESPACE_URL, "https://ledgercore.invalid/reconciliation")
#: allocation statuses in which the allocation's meter must be open (allocations §3.1)
METERED = frozenset({"active", "restarting", "restart_failed", "releasing", "release_failed"})
STATUSES = ("running", "completed", "failed")
#: findings kept on a run's event (the counters count them all)
MAX_FINDINGS = 100
#: notifications read per query while folding the log
PAGE = 1000


class RunConflict(DomainError):
    code = "invalid_request"
    kind = "conflict"


# ---- what a fold of the log yields ---------------------------------------------------
@dataclass(frozen=True)
class RecordFacts:
    """What the checks need of one usage record."""

    id: UUID
    usage_source: str
    allocation_id: UUID | None
    start_time: datetime
    end_time: datetime | None
    last_billed_at: datetime | None

    @classmethod
    def of(cls, record: UsageRecord) -> RecordFacts:
        allocation = record.meter.get("allocation_id")
        return cls(record.id, record.meter["usage_source"],
                   UUID(allocation) if allocation else None, record.start_time,
                   record.end_time, record.last_billed_at)

    @property
    def billed_to(self) -> datetime:
        return self.last_billed_at or self.start_time


@dataclass(frozen=True)
class LineFacts:
    """One rated line (``UsageSliceRated``) and the entry it says charged it."""

    usage_record_id: UUID
    line_id: UUID
    amount_minor: int
    currency: str
    ledger_entry_id: UUID | None


@dataclass
class Folded:
    """The state at ``position``: allocation statuses, usage records, rated lines, and
    every account's entries (``billing.entry_record`` dicts, in ``seq`` order)."""

    position: int
    allocations: dict[UUID, str] = field(default_factory=dict)
    records: dict[UUID, RecordFacts] = field(default_factory=dict)
    lines: list[LineFacts] = field(default_factory=list)
    entries: dict[UUID, list[dict[str, Any]]] = field(default_factory=dict)
    accounts: dict[UUID, BillingAccount] = field(default_factory=dict)


@dataclass(frozen=True)
class Report:
    summary: dict[str, Any]
    findings: list[dict[str, Any]]
    stats: dict[str, Any]


def event_topics(*aggregates: type[Aggregate]) -> list[str]:
    """The stored topics of every event class declared in these aggregates."""
    topics = set()
    for aggregate in aggregates:
        for value in vars(aggregate).values():
            if isinstance(value, type) and issubclass(value, aggregate.Event) \
                    and value is not aggregate.Event:
                topics.add(get_topic(value))
    return sorted(topics)


def fold_log(app: Any, position: int, page: int = PAGE) -> Folded:
    """Fold every allocation, usage record and billing account from the log's first
    event up to ``position`` (inclusive), without snapshots."""
    folded = Folded(position)
    aggregates: dict[UUID, Any] = {}
    topics = event_topics(Allocation, UsageRecord, BillingAccount)
    start = 1
    while start <= position:
        batch = app.recorder.select_notifications(start=start, limit=page, stop=position,
                                                  topics=topics)
        for notification in batch:
            event = app.mapper.to_domain_event(notification)
            aggregates[event.originator_id] = event.mutate(aggregates.get(event.originator_id))
            if isinstance(event, UsageRecord.SliceRated):
                folded.lines.append(LineFacts(
                    event.originator_id, event.rated_usage_line_id,
                    event.amount["amount_minor"], event.amount["currency"],
                    event.ledger_entry_id))
            elif isinstance(event, BillingAccount.LedgerEntryPosted):
                folded.entries.setdefault(event.originator_id, []).append(entry_record(event))
        if len(batch) < page:
            break
        start = batch[-1].id + 1
    for aggregate_id, aggregate in aggregates.items():
        if isinstance(aggregate, Allocation):
            folded.allocations[aggregate_id] = aggregate.status
        elif isinstance(aggregate, UsageRecord):
            folded.records[aggregate_id] = RecordFacts.of(aggregate)
        elif isinstance(aggregate, BillingAccount):
            folded.accounts[aggregate_id] = aggregate
    return folded


# ---- the checks (pure) -----------------------------------------------------------------
def usage_problems(allocations: Mapping[UUID, str], records: Iterable[RecordFacts],
                   lines: Iterable[LineFacts], entries: Mapping[UUID, dict[str, Any]]
                   ) -> tuple[list[UUID], list[RecordFacts], dict[UUID, str]]:
    """(allocations missing an open meter, orphan open records, unbilled records →
    why). ``entries`` maps entry id → ``entry_record`` dict, across accounts."""
    records = list(records)
    metered_open = {r.allocation_id for r in records
                    if r.end_time is None and r.allocation_id is not None}
    missing = sorted(a for a, status in allocations.items()
                     if status in METERED and a not in metered_open)
    orphans = sorted((r for r in records if r.end_time is None and r.usage_source == "allocation"
                      and allocations.get(r.allocation_id) not in METERED),
                     key=lambda r: r.id)
    unbilled: dict[UUID, str] = {}
    for r in records:
        if r.end_time is not None and r.billed_to < r.end_time:
            unbilled[r.id] = f"closed at {iso(r.end_time)} but rated to {iso(r.billed_to)}"
    for line in lines:
        if line.amount_minor <= 0 or line.usage_record_id in unbilled:
            continue
        entry = entries.get(line.ledger_entry_id) if line.ledger_entry_id else None
        if entry is None:
            unbilled[line.usage_record_id] = f"rated line {line.line_id} has no usage_charge"
        elif (entry["entry_type"], entry["amount_minor"], entry["currency"],
              entry["reference_id"]) != ("usage_charge", -line.amount_minor, line.currency,
                                         str(line.line_id)):
            unbilled[line.usage_record_id] = (f"rated line {line.line_id}: entry"
                                              f" {line.ledger_entry_id} does not charge it")
    return missing, orphans, dict(sorted(unbilled.items()))


def ledger_problems(entries: Mapping[UUID, list[dict[str, Any]]],
                    accounts: Mapping[UUID, BillingAccount]) -> list[str]:
    """Each account's chain verifies and its balances are the sums of its entries."""
    problems = []
    for account_id in sorted(set(entries) | set(accounts)):
        chain = entries.get(account_id, [])
        problems += verify_chain(account_id, chain)
        sums: dict[str, int] = {}
        for entry in chain:
            sums[entry["currency"]] = sums.get(entry["currency"], 0) + entry["amount_minor"]
        account = accounts.get(account_id)
        if account is None:
            problems.append(f"account {account_id}: entries without an opened account")
        elif account.balances != sums:
            problems.append(f"account {account_id}: balances {account.balances} are not the"
                            f" sums of its entries {sums}")
    return problems


def severity_of(missing: int, orphan: int, unbilled: int, ledger: int) -> str:
    if unbilled or ledger:
        return "error"
    return "warn" if missing or orphan else "ok"


def check(folded: Folded, checked_at: datetime, extra_ledger: Iterable[str] = ()) -> Report:
    """The run's summary, findings and statistics for a folded state."""
    by_entry = {e["entry_id"]: e for chain in folded.entries.values() for e in chain}
    missing, orphans, unbilled = usage_problems(folded.allocations, folded.records.values(),
                                                folded.lines, by_entry)
    ledger = ledger_problems(folded.entries, folded.accounts) + list(extra_ledger)
    sample_allocation = missing[0] if missing else next(
        (r.allocation_id for r in orphans if r.allocation_id), None)
    sample_usage = orphans[0].id if orphans else next(iter(unbilled), None)
    summary = {
        "checked_at": iso(checked_at),
        "missing_open_usage_count": len(missing),
        "orphan_open_usage_count": len(orphans),
        "unbilled_closed_usage_count": len(unbilled),
        "sample_allocation_id": None if sample_allocation is None else str(sample_allocation),
        "sample_usage_id": None if sample_usage is None else str(sample_usage),
        "severity": severity_of(len(missing), len(orphans), len(unbilled), len(ledger)),
    }
    findings = ([{"check": "missing_open_usage", "allocation_id": str(a),
                  "detail": f"allocation is {folded.allocations[a]} with no open usage record"}
                 for a in missing]
                + [{"check": "orphan_open_usage", "usage_record_id": str(r.id),
                    "allocation_id": None if r.allocation_id is None else str(r.allocation_id),
                    "detail": "allocation is " + folded.allocations.get(r.allocation_id, "unknown")}
                   for r in orphans]
                + [{"check": "unbilled_closed_usage", "usage_record_id": str(r), "detail": why}
                   for r, why in unbilled.items()]
                + [{"check": "ledger_integrity", "detail": problem} for problem in ledger])
    stats = {"position": folded.position, "allocations": len(folded.allocations),
             "usage_records": len(folded.records), "rated_lines": len(folded.lines),
             "accounts": len(folded.accounts), "ledger_entries": len(by_entry),
             "ledger_problem_count": len(ledger), "finding_count": len(findings)}
    return Report(summary, findings[:MAX_FINDINGS], stats)


def snapshot_problems(app: Any, accounts: Mapping[UUID, BillingAccount]) -> list[str]:
    """Each account as the repository loads it (its latest snapshot at or below the
    folded version, plus the events after it) must equal the fold from the start."""
    problems = []
    for account_id, folded in sorted(accounts.items()):
        loaded = app.repository.get(account_id, version=folded.version)
        if (loaded.balances, loaded.last_hash, loaded.entry_count) != \
                (folded.balances, folded.last_hash, folded.entry_count):
            problems.append(f"account {account_id}: the stored state at version"
                            f" {folded.version} differs from a fold of its events")
    return problems


def inspect(app: Any) -> Report:
    """Run every check on the log as it stands now (``checked_at``)."""
    checked_at = datetime.now(timezone.utc)
    position = app.recorder.max_notification_id() or 0
    folded = fold_log(app, position)
    return check(folded, checked_at, snapshot_problems(app, folded.accounts))


# ---- the run ---------------------------------------------------------------------------
def pending_summary(at: datetime) -> dict[str, Any]:
    """The summary of a run that has not checked anything (yet)."""
    return {"checked_at": iso(at), "missing_open_usage_count": 0, "orphan_open_usage_count": 0,
            "unbilled_closed_usage_count": 0, "sample_allocation_id": None,
            "sample_usage_id": None, "severity": "warn"}


class ReconciliationRun(Aggregate):
    TOPIC = "ledgercore.ReconciliationRun"

    class Created(Aggregate.Created):
        TOPIC = "ledgercore.ReconciliationRunStarted"
        requested_by_user_id: UUID | None
        provenance: dict[str, Any]

    class Completed(Aggregate.Event):
        TOPIC = "ledgercore.ReconciliationRunCompleted"
        summary: dict[str, Any]
        findings: list[dict[str, Any]]
        stats: dict[str, Any]
        provenance: dict[str, Any]

        def apply(self, run: ReconciliationRun) -> None:
            run.status, run.summary, run.completed_at = "completed", dict(self.summary), \
                self.timestamp
            run.stats = dict(self.stats)

    class Failed(Aggregate.Event):
        TOPIC = "ledgercore.ReconciliationRunFailed"
        failure_reason: str
        summary: dict[str, Any]
        provenance: dict[str, Any]

        def apply(self, run: ReconciliationRun) -> None:
            run.status, run.summary, run.completed_at = "failed", dict(self.summary), \
                self.timestamp
            run.failure_reason = self.failure_reason

    def __init__(self, requested_by_user_id: UUID | None, provenance: dict[str, Any]):
        self.requested_by_user_id = requested_by_user_id
        self.correlation_id = provenance.get("correlation_id") or ""
        self.status = "running"
        self.summary: dict[str, Any] = {}
        self.stats: dict[str, Any] = {}
        self.failure_reason: str | None = None
        self.completed_at: datetime | None = None

    def as_contract(self) -> dict[str, Any]:
        return run_json({"id": self.id, "requested_by_user_id": self.requested_by_user_id,
                         "status": self.status,
                         "summary": self.summary or pending_summary(self.created_on),
                         "failure_reason": self.failure_reason,
                         "correlation_id": self.correlation_id, "created_at": self.created_on,
                         "completed_at": self.completed_at})


def run_json(row: Mapping[str, Any]) -> dict[str, Any]:
    """A run (aggregate or read-model row) as the contract's ``BillingReconciliationRun``."""
    return {"id": str(row["id"]),
            "requested_by_user_id": None if row["requested_by_user_id"] is None
            else str(row["requested_by_user_id"]),
            "status": row["status"], "summary": dict(row["summary"]),
            "failure_reason": row["failure_reason"], "correlation_id": row["correlation_id"],
            "created_at": iso(row["created_at"]),
            "completed_at": None if row["completed_at"] is None else iso(row["completed_at"])}


def never_checked() -> dict[str, Any]:
    """``current`` before any run completed: nothing checked, so not ``ok``."""
    return pending_summary(datetime(1970, 1, 1, tzinfo=timezone.utc))


def record_run(ctx: CommandContext, *, run_id: UUID, report: Report | None,
               failure_reason: str | None, completed_at: datetime, render: Render) -> Command:
    """Record a run that has finished: its ``Started`` and ``Completed`` (with
    ``report``) or ``Failed`` (with ``failure_reason``) events in one save."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        if session.get(run_id) is not None:
            raise RunConflict("this reconciliation run already exists", reason="run_exists")
        requested_by = None
        if ctx.actor_type in ("user", "service_account"):
            try:
                requested_by = UUID(ctx.actor_id)
            except ValueError:
                requested_by = None
        run = ReconciliationRun._create(ReconciliationRun.Created, id=run_id,
                                        requested_by_user_id=requested_by,
                                        provenance=ctx.provenance(), timestamp=ctx.now)
        at = max(completed_at, ctx.now)
        if report is not None:
            run.trigger_event(ReconciliationRun.Completed, summary=report.summary,
                              findings=report.findings, stats=report.stats,
                              provenance=ctx.provenance(), timestamp=at)
        else:
            summary = {**pending_summary(at), "severity": "error"}
            run.trigger_event(ReconciliationRun.Failed,
                              failure_reason=failure_reason or "the checks did not run",
                              summary=summary, provenance=ctx.provenance(), timestamp=at)
        return [run], run.as_contract()

    return Command(ctx, decide, render, reads=(run_id,))
