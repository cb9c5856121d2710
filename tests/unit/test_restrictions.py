"""The admission gate's view of restrictions, decided from aggregates."""

from __future__ import annotations

import uuid

from domain.app import Ledgercore
from domain.commands import Session
from domain.provenance import CommandContext
from domain.restrictions import effective_restriction, effects_of, set_financial_restriction


def test_effective_restriction_is_the_most_severe_over_the_callers_scopes() -> None:
    app = Ledgercore(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    user, tenant, project = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()

    def restrict(scope_type: str, scope_id: uuid.UUID, state: str) -> None:
        app.execute(set_financial_restriction(
            CommandContext(actor_id="t"), scope_type=scope_type, scope_id=scope_id, state=state,
            reason=state, metadata={}, render=lambda r: {}))

    def gate() -> str | None:
        found = effective_restriction(Session(app), user_id=user, tenant_id=tenant,
                                      project_ids=[project])
        return None if found is None else found.state

    assert gate() is None
    restrict("user", user, "at_risk")
    assert gate() == "at_risk"
    restrict("project", project, "suspended")
    restrict("tenant", tenant, "restricted")
    assert gate() == "suspended"
    restrict("project", project, "healthy")
    assert gate() == "restricted"
    assert effects_of("restricted")["launch_blocked"] and not effects_of("at_risk")["launch_blocked"]
