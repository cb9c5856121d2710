"""Budget policies and the pure budget arithmetic (billing-ledger §3 Budgets).

A ``BudgetPolicy`` is a spending limit of a tenant, or of one project of it, over a
calendar period (UTC month, quarter or year) or one ``custom`` window. The contract has
no operation that creates one, so ``set_budget`` (CLI ``ledgercore budgets set``)
creates or updates it; its id follows from (tenant, scope, project, name), so setting
the same name again updates the policy.

Everything else here is pure and reads nothing: the window a policy is in force in at
a moment, the what-if decision for a proposed amount (``evaluate``, monotone in the
amount) and the threshold event derived from the spend lines of a window
(``threshold_event``). Spend itself is rated usage (``projections.budgets``).

Enforcement modes: ``notify_only`` never blocks (an exceeded budget warns);
``block_launch`` and ``suspend`` answer ``would_block`` for a proposal that would
exceed the budget. This service decides and reports; nothing here stops a launch or
suspends anything (that would be the launch gate's and a reviewed gate's call).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate

from domain.commands import Command, Render, Session
from domain.errors import InvalidRequest
from domain.money import INT64_MAX, Money, is_known_currency
from domain.provenance import CommandContext

NAMESPACE = uuid5(NAMESPACE_URL, "https://ledgercore.invalid/budgets")
SCOPES = ("tenant", "project")
PERIODS = ("monthly", "quarterly", "annual", "custom")
MODES = ("notify_only", "block_launch", "suspend")
DECISIONS = ("allow", "warn", "would_block")  # least to most severe
EXCEEDED_KEY = "budget_exceeded"


def budget_id_for(org_id: UUID, scope_type: str, project_id: UUID | None, name: str) -> UUID:
    return uuid5(NAMESPACE, f"budget:{org_id}:{scope_type}:{project_id or '-'}:{name}")


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def calendar_period(period: str, moment: datetime) -> tuple[datetime, datetime]:
    """The UTC calendar month, quarter or year holding ``moment``."""
    moment = moment.astimezone(timezone.utc)
    if period == "monthly":
        first, months = moment.month, 1
    elif period == "quarterly":
        first, months = 3 * ((moment.month - 1) // 3) + 1, 3
    else:
        first, months = 1, 12
    start = datetime(moment.year, first, 1, tzinfo=timezone.utc)
    year, month = divmod(first - 1 + months, 12)
    return start, datetime(moment.year + year, month + 1, 1, tzinfo=timezone.utc)


def window(period: str, starts_at: datetime, ends_at: datetime | None,
           moment: datetime) -> tuple[datetime, datetime] | None:
    """The part of the period holding ``moment`` in which the policy is in force
    (``[starts_at, ends_at)``), or None if it is not in force at ``moment``."""
    if moment < starts_at or (ends_at is not None and moment >= ends_at):
        return None
    if period == "custom":
        assert ends_at is not None
        return starts_at, ends_at
    start, end = calendar_period(period, moment)
    return max(start, starts_at), min(end, ends_at) if ends_at is not None else end


def percent(spent: int, budget: int) -> int:
    """floor(100 · spent / budget), integers only (budget ≥ 1)."""
    return (100 * spent) // budget


def evaluate(policy: dict[str, Any], *, spent: int, proposed: int,
             period: tuple[datetime, datetime]) -> dict[str, Any]:
    """One ``BillingBudgetDecisionItem``: what adding ``proposed`` to ``spent`` (both in
    the policy's currency, minor units) would mean for the policy."""
    budget, threshold = policy["amount_minor"], policy["threshold_percent"]
    projected = spent + proposed
    after = percent(projected, budget)
    if after < threshold:
        reason = "within_budget"
    elif projected <= budget:
        reason = "threshold_crossed"
    else:
        reason = "budget_exceeded"
    if reason == "within_budget":
        decision = "allow"
    elif reason == "threshold_crossed" or policy["enforcement_mode"] == "notify_only":
        decision = "warn"
    else:
        decision = "would_block"
    currency = policy["currency"]

    def money(amount: int) -> dict[str, Any]:
        return {"amount_minor": amount, "currency": currency}

    return {"budget_policy_id": str(policy["id"]), "scope_type": policy["scope_type"],
            "project_id": None if policy["project_id"] is None else str(policy["project_id"]),
            "display_name": policy["name"], "enforcement_mode": policy["enforcement_mode"],
            "decision": decision, "reason": reason, "period_start": _iso(period[0]),
            "period_end": _iso(period[1]), "spent": money(spent),
            "proposed_amount": money(proposed), "projected_spend": money(projected),
            "budget": money(budget), "threshold_percent": threshold,
            "percent_used_before": percent(spent, budget), "percent_used_after": after}


def overall(items: Iterable[dict[str, Any]]) -> str:
    """The most severe item decision; ``allow`` when no policy applies."""
    return max((item["decision"] for item in items), key=DECISIONS.index, default="allow")


def threshold_event(policy: dict[str, Any], period: tuple[datetime, datetime],
                    lines: list[tuple[datetime, int]]) -> dict[str, Any] | None:
    """The policy's ``BillingBudgetEvent`` in ``period``, derived from its spend
    ``lines`` ((rated at, amount) in rating order): ``budget_exceeded`` once spend is
    above the budget, else ``threshold_<p>`` once it reached ``threshold_percent``,
    else None. First seen = the line that crossed, last seen = the latest line,
    ``seen_count`` = lines from the crossing one on. Spend never falls within a
    period, so the event stays ``open``."""
    budget, threshold = policy["amount_minor"], policy["threshold_percent"]
    spent, crossed = 0, {}
    for index, (at, amount) in enumerate(lines):
        spent += amount
        if percent(spent, budget) >= threshold:
            crossed.setdefault(f"threshold_{threshold}", index)
        if spent > budget:
            crossed.setdefault(EXCEEDED_KEY, index)
    if not crossed:
        return None
    key = EXCEEDED_KEY if EXCEEDED_KEY in crossed else f"threshold_{threshold}"
    first = crossed[key]
    currency = policy["currency"]
    return {"id": str(uuid5(NAMESPACE, f"budget-event:{policy['id']}:{_iso(period[0])}:{key}")),
            "threshold_key": key, "period_start": _iso(period[0]), "period_end": _iso(period[1]),
            "spent": {"amount_minor": spent, "currency": currency},
            "budget": {"amount_minor": budget, "currency": currency},
            "percent_used": percent(spent, budget), "status": "open",
            "first_seen_at": _iso(lines[first][0]), "last_seen_at": _iso(lines[-1][0]),
            "seen_count": len(lines) - first, "correlation_id": None}


class BudgetPolicy(Aggregate):
    TOPIC = "ledgercore.BudgetPolicy"

    class Created(Aggregate.Created):
        TOPIC = "ledgercore.BudgetPolicyCreated"
        org_id: UUID
        scope_type: str
        project_id: UUID | None
        department_id: UUID
        provenance: dict[str, Any]

    class Set(Aggregate.Event):
        """The policy's terms, whole, each time they are set."""

        TOPIC = "ledgercore.BudgetPolicySet"
        name: str
        period: str
        amount: dict[str, Any]
        threshold_percent: int
        enforcement_mode: str
        active: bool
        starts_at: datetime
        ends_at: datetime | None
        provenance: dict[str, Any]

        def apply(self, policy: BudgetPolicy) -> None:
            policy.terms = {"name": self.name, "period": self.period, "amount": self.amount,
                            "threshold_percent": self.threshold_percent,
                            "enforcement_mode": self.enforcement_mode, "active": self.active,
                            "starts_at": self.starts_at, "ends_at": self.ends_at}

    def __init__(self, org_id: UUID, scope_type: str, project_id: UUID | None,
                 department_id: UUID, provenance: dict[str, Any]):
        self.org_id, self.scope_type, self.project_id = org_id, scope_type, project_id
        self.department_id = department_id
        self.terms: dict[str, Any] = {}

    def as_row(self) -> dict[str, Any]:
        t = self.terms
        return {"id": str(self.id), "org_id": str(self.org_id), "scope_type": self.scope_type,
                "project_id": None if self.project_id is None else str(self.project_id),
                "department_id": str(self.department_id), "name": t["name"],
                "period": t["period"], "amount": t["amount"],
                "threshold_percent": t["threshold_percent"],
                "enforcement_mode": t["enforcement_mode"], "active": t["active"],
                "starts_at": _iso(t["starts_at"]),
                "ends_at": None if t["ends_at"] is None else _iso(t["ends_at"])}


def _invalid(message: str, field: str, reason: str = "invalid_budget") -> InvalidRequest:
    return InvalidRequest(message, field=field, reason=reason)


def validate_terms(*, scope_type: str, project_id: UUID | None, name: str, period: str,
                   amount: Money, threshold_percent: int, enforcement_mode: str,
                   starts_at: datetime, ends_at: datetime | None) -> None:
    if scope_type not in SCOPES:
        raise _invalid("scope_type is tenant or project", "scope_type")
    if (scope_type == "project") != (project_id is not None):
        raise _invalid("a project budget names its project, a tenant budget none", "project_id")
    if not name.strip() or len(name) > 200:
        raise _invalid("a budget has a name of 1 to 200 characters", "name")
    if period not in PERIODS:
        raise _invalid(f"period is one of {', '.join(PERIODS)}", "period")
    if not is_known_currency(amount.currency):
        raise _invalid(f"unknown currency {amount.currency}", "amount.currency",
                       "unsupported_currency")
    if not 1 <= amount.amount_minor <= INT64_MAX:
        raise _invalid("a budget is at least 1 minor unit", "amount.amount_minor")
    if type(threshold_percent) is not int or not 1 <= threshold_percent <= 100:
        raise _invalid("threshold_percent is 1 to 100", "threshold_percent")
    if enforcement_mode not in MODES:
        raise _invalid(f"enforcement_mode is one of {', '.join(MODES)}", "enforcement_mode")
    for moment, field in ((starts_at, "starts_at"), (ends_at, "ends_at")):
        if moment is not None and moment.tzinfo is None:
            raise _invalid("times carry a time zone", field)
    if period == "custom" and ends_at is None:
        raise _invalid("a custom period needs ends_at", "ends_at")
    if ends_at is not None and ends_at <= starts_at:
        raise _invalid("ends_at must be after starts_at", "ends_at")


def set_budget(ctx: CommandContext, *, org_id: UUID, scope_type: str, project_id: UUID | None,
               name: str, period: str, amount: Money, threshold_percent: int,
               enforcement_mode: str, active: bool = True, starts_at: datetime | None = None,
               ends_at: datetime | None = None, render: Render) -> Command:
    """Create or update the policy named ``name`` in its scope. ``starts_at`` defaults to
    the start of the calendar period holding now (a budget set mid-month covers the
    month's spend so far); a ``custom`` one needs it. Departments are not modelled:
    ``department_id`` is the tenant's id (its root)."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        if starts_at is None and period == "custom":
            raise _invalid("a custom period needs starts_at", "starts_at")
        default = calendar_period(period, ctx.now)[0] if period in PERIODS[:3] else ctx.now
        start = (starts_at or default).astimezone(timezone.utc)
        end = None if ends_at is None else ends_at.astimezone(timezone.utc)
        validate_terms(scope_type=scope_type, project_id=project_id, name=name, period=period,
                       amount=amount, threshold_percent=threshold_percent,
                       enforcement_mode=enforcement_mode, starts_at=start, ends_at=end)
        policy_id = budget_id_for(org_id, scope_type, project_id, name)
        policy = session.get(policy_id)
        if policy is None:
            policy = BudgetPolicy._create(BudgetPolicy.Created, id=policy_id, org_id=org_id,
                                          scope_type=scope_type, project_id=project_id,
                                          department_id=org_id, provenance=ctx.provenance(),
                                          timestamp=ctx.now)
        policy.trigger_event(BudgetPolicy.Set, name=name, period=period,
                             amount=amount.as_json(), threshold_percent=threshold_percent,
                             enforcement_mode=enforcement_mode, active=active,
                             starts_at=start, ends_at=end, provenance=ctx.provenance(),
                             timestamp=ctx.now)
        return [policy], policy.as_row()

    return Command(ctx, decide, render)
