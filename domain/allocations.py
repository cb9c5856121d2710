"""Allocations: the ``Allocation`` lease aggregate and the per-user concurrency quota.

An ``Allocation`` is one single-node GPU lease. Its status follows allocations §3.1;
the node work each step needs is a *node task* the lease issues, a node agent picks up
and reports on (first result per task wins). Admission lives in ``domain.admission``,
the lifecycle commands in ``domain.leases``, the JSON the API answers in
``domain.allocation_views``.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate

from domain.commands import Session
from domain.skus import NAMESPACE, iso, refusal

#: statuses whose lease still holds placement and counts against the cap
LIVE_STATUSES = ("requested", "provisioning", "active", "restarting", "restart_failed",
                 "releasing", "release_failed")
STATUSES = LIVE_STATUSES + ("released", "failed")
#: statuses during which the lease is billed (allocations §3.1 status groups)
METERED = ("active", "restarting", "restart_failed", "releasing", "release_failed")
#: the ``placement_status`` of each allocation status (allocations §3.2)
PLACEMENT_OF = {"requested": "reserved", "restarting": "active", "restart_failed": "active",
                "release_failed": "releasing"}
#: timestamps kept from the first time a status is entered (the others: the latest)
FIRST_TIME_ONLY = ("provisioning", "active", "released", "failed")
#: the node task each phase issues and how long an agent has to report on it
TASK_TYPES = {"provision": "allocation.provision", "restart": "allocation.restart",
              "release": "allocation.release"}
TASK_TTL = timedelta(minutes=30)
#: the steps that start a new cycle of a phase (its node task and V3 task ids count them)
PHASE_OF_STEP = {"releasing": "release", "restarting": "restart"}


def quota_id_for(user_id: UUID | str) -> UUID:
    return uuid5(NAMESPACE, f"alloc-quota:{user_id}")


def node_task_id_for(allocation_id: UUID | str, phase: str, cycle: int) -> UUID:
    return uuid5(NAMESPACE, f"node-task:{phase}:{allocation_id}:{cycle}")


def v3_task_id_for(kind: str, allocation_id: UUID | str, cycle: int) -> UUID:
    """The V3 task of a launch, release or restart (allocations §3.5)."""
    return uuid5(NAMESPACE, f"{kind}:{allocation_id}:{cycle}")


class UserAllocationQuota(Aggregate):
    """The live allocations of one user: what the concurrency cap counts."""

    TOPIC = "ledgercore.UserAllocationQuota"

    class Created(Aggregate.Created):
        TOPIC = "ledgercore.UserAllocationQuotaOpened"
        user_id: str

    class Admitted(Aggregate.Event):
        TOPIC = "ledgercore.AllocationAdmitted"
        allocation_id: str
        project_id: str

        def apply(self, q: UserAllocationQuota) -> None:
            q.live.append(self.allocation_id)

    class Retired(Aggregate.Event):
        TOPIC = "ledgercore.AllocationRetired"
        allocation_id: str

        def apply(self, q: UserAllocationQuota) -> None:
            q.live.remove(self.allocation_id)

    def __init__(self, user_id: str):
        self.user_id = user_id
        self.live: list[str] = []


class Allocation(Aggregate):
    TOPIC = "ledgercore.Allocation"

    class Created(Aggregate.Created):
        """The lease was requested and admitted with its placement claims."""

        TOPIC = "ledgercore.AllocationRequested"
        lease: dict[str, Any]
        provenance: dict[str, Any]

    class Moved(Aggregate.Event):
        """One step of the lifecycle (allocations §3.1): ``to`` is the new status.
        ``details`` holds what the step brought: the release ``mode`` and ``cycle``,
        the ``connection`` on activation, a force-cleanup's facts."""

        TOPIC = "ledgercore.AllocationMoved"
        to: str
        reason: str | None
        details: dict[str, Any]
        provenance: dict[str, Any]

        def apply(self, a: Allocation) -> None:
            a.status = self.to
            a.placement_status = PLACEMENT_OF.get(self.to, self.to)
            at = iso(self.timestamp)
            if self.to in FIRST_TIME_ONLY:
                a.timestamps.setdefault(f"{self.to}_at", at)
            else:
                a.timestamps[f"{self.to}_at"] = at
            if self.reason:
                a.reasons[self.to] = self.reason
            if self.details.get("connection"):
                a.connection = dict(self.details["connection"])
            phase = PHASE_OF_STEP.get(self.to)
            if phase:
                a.cycles[phase] = a.cycles.get(phase, 0) + 1

    class TaskIssued(Aggregate.Event):
        """A node task for one phase (provision, restart, release) of the lease."""

        TOPIC = "ledgercore.NodeTaskIssued"
        task: dict[str, Any]

        def apply(self, a: Allocation) -> None:
            a.tasks[self.task["task_id"]] = {**self.task, "dispatched_at": None,
                                             "completed_at": None, "result": None,
                                             "summary": None}
            a.open_task = self.task["task_id"]

    class TaskDispatched(Aggregate.Event):
        """The node agent picked the task up (its first long-poll that returned it)."""

        TOPIC = "ledgercore.NodeTaskDispatched"
        task_id: str

        def apply(self, a: Allocation) -> None:
            a.tasks[self.task_id]["dispatched_at"] = iso(self.timestamp)

    class TaskCompleted(Aggregate.Event):
        """The task ended: ``success|failed|rejected`` from the agent, or
        ``superseded`` when a release replaced it. ``summary`` is safe to show."""

        TOPIC = "ledgercore.NodeTaskCompleted"
        task_id: str
        result: str
        summary: str | None
        reported_completed_at: str | None

        def apply(self, a: Allocation) -> None:
            task = a.tasks[self.task_id]
            task.update(completed_at=iso(self.timestamp), result=self.result,
                        summary=self.summary)
            if a.open_task == self.task_id:
                a.open_task = None

    def __init__(self, lease: dict[str, Any], provenance: dict[str, Any]):
        self.lease = dict(lease)
        self.status, self.placement_status = "requested", "reserved"
        self.timestamps: dict[str, str] = {}
        self.reasons: dict[str, str] = {}
        self.connection: dict[str, Any] | None = None
        self.tasks: dict[str, dict[str, Any]] = {}
        self.open_task: str | None = None
        self.cycles: dict[str, int] = {}

    @property
    def live(self) -> bool:
        return self.status in LIVE_STATUSES

    def issue_task(self, phase: str, now: datetime, correlation_id: str) -> str:
        """Issue the node task of ``phase`` for the current cycle; returns its id."""
        cycle = self.cycles.get(phase, 0)
        task_id = str(node_task_id_for(self.id, phase, cycle))
        self.trigger_event(Allocation.TaskIssued, timestamp=now, task={
            "task_id": task_id, "phase": phase, "task_type": TASK_TYPES[phase],
            "node_id": self.lease["node_id"], "cycle": cycle, "issued_at": iso(now),
            "expires_at": iso(now + TASK_TTL), "correlation_id": correlation_id})
        return task_id


def get_allocation(session: Session, allocation_id: UUID,
                   project_id: UUID | None = None) -> Allocation:
    """The allocation, or 404; with ``project_id``, one of another project is 404 too
    (nothing is revealed about it)."""
    allocation = session.get(allocation_id)
    if not isinstance(allocation, Allocation) or (
            project_id is not None and allocation.lease["project_id"] != str(project_id)):
        raise refusal("allocation_not_found", "not_found", "allocation not found",
                      allocation_id=str(allocation_id))
    return allocation
