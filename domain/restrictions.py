"""Financial restrictions: an operator's non-destructive posture for a tenant, project
or user. They block new launches (and, under ``collections_hold``, refunds and payouts)
but never touch running workloads: suspending or force-releasing those is a separate,
reviewed action. The effective posture of a caller is the most severe restriction over
their user, their projects and their tenant.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate

from domain.commands import Command, Render, Session
from domain.provenance import CommandContext

NAMESPACE = uuid5(NAMESPACE_URL, "https://ledgercore.invalid/restrictions")
SCOPES = ("tenant", "project", "user")
#: least to most severe
STATES = ("healthy", "at_risk", "restricted", "suspended", "collections_hold")


def restriction_id_for(scope_type: str, scope_id: UUID) -> UUID:
    return uuid5(NAMESPACE, f"{scope_type}:{scope_id}")


def effects_of(state: str) -> dict[str, Any]:
    """What a state does (billing-ledger §3, financial restriction and posture)."""
    blocked = STATES.index(state) >= STATES.index("restricted")
    reasons = [] if state == "healthy" else [f"financial_{state}"]
    return {"launch_blocked": blocked, "refunds_blocked": state == "collections_hold",
            "disabled_reasons": reasons if blocked else [], "warnings": reasons if not blocked else []}


def severity(state: str) -> int:
    return STATES.index(state)


class FinancialRestriction(Aggregate):
    TOPIC = "ledgercore.FinancialRestriction"

    class Created(Aggregate.Created):
        TOPIC = "ledgercore.FinancialRestrictionOpened"
        scope_type: str
        scope_id: UUID

    class Set(Aggregate.Event):
        TOPIC = "ledgercore.FinancialRestrictionSet"
        scope_type: str
        scope_id: UUID
        state: str
        reason: str
        effects: dict[str, Any]
        metadata: dict[str, Any]
        provenance: dict[str, Any]

        def apply(self, r: FinancialRestriction) -> None:
            r.state, r.reason, r.effects = self.state, self.reason, self.effects
            r.correlation_id = self.provenance.get("correlation_id") or ""
            r.updated_at = self.timestamp

    def __init__(self, scope_type: str, scope_id: UUID):
        self.scope_type, self.scope_id = scope_type, scope_id
        self.state, self.reason = "healthy", ""
        self.effects: dict[str, Any] = effects_of("healthy")
        self.correlation_id = ""
        self.updated_at: datetime | None = None

    def as_contract(self) -> dict[str, Any]:
        return restriction_json({
            "id": self.id, "scope_type": self.scope_type, "scope_id": self.scope_id,
            "state": self.state, "reason": self.reason, "effects": self.effects,
            "correlation_id": self.correlation_id, "updated_at": self.updated_at})


def restriction_json(row: dict[str, Any]) -> dict[str, Any]:
    """The contract's ``FinancialRestriction`` from an aggregate's or a row's fields."""
    return {"id": str(row["id"]), "scope_type": row["scope_type"], "scope_id": str(row["scope_id"]),
            "state": row["state"], "reason": row["reason"], "effects": row["effects"],
            "correlation_id": row["correlation_id"],
            "updated_at": row["updated_at"].isoformat().replace("+00:00", "Z")}


def set_financial_restriction(ctx: CommandContext, *, scope_type: str, scope_id: UUID,
                              state: str, reason: str, metadata: dict[str, Any],
                              render: Render) -> Command:
    """``adminSetFinancialRestriction``."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        restriction_id = restriction_id_for(scope_type, scope_id)
        restriction = session.get(restriction_id)
        if restriction is None:
            restriction = FinancialRestriction._create(
                FinancialRestriction.Created, id=restriction_id, scope_type=scope_type,
                scope_id=scope_id, timestamp=ctx.now)
        restriction.trigger_event(restriction.Set, scope_type=scope_type, scope_id=scope_id,
                                  state=state, reason=reason,
                                  effects=effects_of(state), metadata=metadata,
                                  provenance=ctx.provenance(), timestamp=ctx.now)
        return [restriction], restriction.as_contract()

    return Command(ctx, decide, render)


def effective_restriction(session: Session, *, user_id: UUID, tenant_id: UUID | None,
                          project_ids: list[UUID]) -> FinancialRestriction | None:
    """The most severe restriction over a caller's scopes, decided from aggregates (the
    admission gate of launches uses this, never the read model)."""
    scopes = [("user", user_id)] + [("project", p) for p in project_ids]
    if tenant_id is not None:
        scopes.append(("tenant", tenant_id))
    found = [r for r in (session.get(restriction_id_for(t, i)) for t, i in scopes) if r is not None]
    return max(found, key=lambda r: severity(r.state), default=None)
