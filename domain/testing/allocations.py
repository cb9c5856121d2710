"""Reference model of the allocation lifecycle, and its invariants (allocations §3.1
statuses, edges and guards; §3.2 claims; §4 billing; §5 invariants 1-7, 9, 11, 12).

``ReferenceAllocations`` is meant to be obviously correct: plain dataclasses changed by
the same commands as the domain, each written straight from the spec's tables, and
never from ``domain.leases`` (its ``STEP_FROM`` is what the model checks). Baremetal
leases only: one ``node_exclusive`` claim per lease, so a node holds at most one live
lease. Where the spec leaves a choice open the model takes the one the domain
documents (docs/decisions.md), named here:

- release is accepted from ``requested``/``provisioning``/``restarting`` (§8 Q10): any
  open node task is superseded; a lease whose provision task no agent picked up has no
  runtime and goes ``releasing`` → ``released`` at once, without node work;
- a provision report that arrives before the task was picked up moves the lease
  ``requested`` → ``provisioning`` → ``active`` (or ``failed``) in one command;
- the first report of a task wins; a report of a task already ended (reported, or
  superseded by a release or force-cleanup) changes nothing; a report naming a task
  the node does not have is 404 ``allocation_not_found``;
- admission (§6.3 step 1): the balance gate (409 ``insufficient_balance`` unless the
  balance is above zero), then the cap (headroom = policy − live leases;
  ``submitV3ComputeLaunch`` is all or none, ``createAllocation`` admits
  min(n, headroom) attempts, at least one), then placement (``node_in_use`` for a busy
  pinned node, ``sku_unavailable`` when no node of the SKU is free). Which free node
  an unpinned lease gets is the domain's choice (random among equals);
- the meter runs from the first ``active`` to ``released`` (or ``failed``), through
  ``restarting``/``restart_failed``/``releasing``/``release_failed`` (§4, §8 Q5), and
  is rated cumulatively: accrued(t) = round_half_even(price × units × ms(start, t) /
  3,600,000) (docs/decisions.md "Usage and rating");
- a ``failed`` lease force-cleaned to ``released`` keeps its ``failed`` claims (claims
  never leave a terminal status, inventory §3.4), so §5.6 "released ⇒ every claim
  released" is read as "every claim ended, with ``released_at``".

``observe(app, model, mirror)`` reads the real aggregates and their event streams (an
``EventMirror`` reads the log forward, each event once) into the plain dict
``check_invariants(model, live)`` compares with the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from fractions import Fraction
from typing import Any
from uuid import UUID

from domain.allocations import Allocation, node_task_id_for, quota_id_for
from domain.billing import BillingAccount, account_id_for
from domain.inventory import NodeInventory, state_of
from domain.usage import UsageRecord, usage_id_for_allocation
from domain.workload_views import compute_workload_json, step_of

#: allocations §3.1: every edge the table allows, and nothing else
EDGES: dict[str, tuple[str, ...]] = {
    "requested": ("provisioning", "failed", "releasing"),
    "provisioning": ("active", "failed", "releasing"),
    "active": ("restarting", "releasing"),
    "restarting": ("active", "restart_failed", "releasing"),
    "restart_failed": ("restarting", "releasing"),
    "releasing": ("released", "release_failed"),
    "release_failed": ("releasing", "released"),
    "failed": ("released",),  # force-cleanup with the runtime verified absent only
    "released": (),
}
STATUSES = tuple(EDGES)
LIVE = ("requested", "provisioning", "active", "restarting", "restart_failed", "releasing",
        "release_failed")
#: §3.2: the placement_status and the claim status of each allocation status
PLACEMENT = {"requested": "reserved", "provisioning": "provisioning", "active": "active",
             "restarting": "active", "restart_failed": "active", "releasing": "releasing",
             "release_failed": "releasing", "released": "released", "failed": "failed"}
CLAIM = dict(PLACEMENT)
LIVE_CLAIMS = ("reserved", "provisioning", "active", "releasing")
#: §3.1 status groups: billed while capacity is held after activation
METERED = ("active", "restarting", "restart_failed", "releasing", "release_failed")
#: inventory-and-placement §3.4: the claim edges
CLAIM_EDGES = {"reserved": ("provisioning", "releasing", "failed"),
               "provisioning": ("active", "releasing", "failed"),
               "active": ("releasing",), "releasing": ("released",),
               "released": (), "failed": ()}
#: what a task's success and failure move the lease to, by phase (§6.2)
OUTCOMES = {"provision": ("active", "failed"), "restart": ("active", "restart_failed"),
            "release": ("released", "release_failed")}
MS_PER_HOUR = 3_600_000


def ms(delta: timedelta) -> int:
    return delta // timedelta(milliseconds=1)


@dataclass
class MTask:
    task_id: str
    phase: str
    dispatched: bool = False
    result: str | None = None


@dataclass
class MLease:
    id: str
    user: str
    project: str
    node: str
    price_minor: int
    units: int
    created_at: datetime
    status: str = "requested"
    #: every status entered, with when (the first is ``requested`` at creation)
    timeline: list[tuple[str, datetime]] = field(default_factory=list)
    tasks: dict[str, MTask] = field(default_factory=dict)
    open_task: str | None = None
    cycles: dict[str, int] = field(default_factory=dict)
    claim: str = "reserved"
    meter_start: datetime | None = None
    meter_end: datetime | None = None
    billed_to: datetime | None = None

    @property
    def live(self) -> bool:
        return self.status in LIVE

    def first(self, status: str) -> datetime | None:
        return next((at for s, at in self.timeline if s == status), None)

    def cost(self) -> int:
        """Accrued cost: the whole billed period rated at once (one rounding)."""
        if self.meter_start is None or self.billed_to is None:
            return 0
        return round(Fraction(self.price_minor * self.units * ms(self.billed_to - self.meter_start),
                              MS_PER_HOUR))


@dataclass
class Plan:
    """An admission decided by the model: ``outcome`` is ``ok`` or the refusal code;
    ``created`` leases, each on one of ``candidates`` (distinct nodes)."""

    outcome: str
    created: int = 0
    candidates: tuple[str, ...] = ()


@dataclass
class ReferenceAllocations:
    #: node id -> (sku, gpus_total)
    nodes: dict[str, tuple[str, int]] = field(default_factory=dict)
    #: sku -> (unit price minor, billing unit)
    skus: dict[str, tuple[int, str]] = field(default_factory=dict)
    leases: dict[str, MLease] = field(default_factory=dict)
    funds: dict[str, int] = field(default_factory=dict)
    policy: int = 5

    # ---- derived ---------------------------------------------------------------------
    def live_of(self, user: str) -> set[str]:
        return {i for i, lease in self.leases.items() if lease.user == user and lease.live}

    def charged(self, user: str) -> int:
        return sum(lease.cost() for lease in self.leases.values() if lease.user == user)

    def balance(self, user: str) -> int:
        return self.funds.get(user, 0) - self.charged(user)

    def holder(self, node: str) -> MLease | None:
        held = [lease for lease in self.leases.values() if lease.node == node and lease.live]
        assert len(held) <= 1, f"model: node {node} held twice"
        return held[0] if held else None

    def free_nodes(self, sku: str) -> tuple[str, ...]:
        return tuple(n for n, (s, _) in sorted(self.nodes.items())
                     if s == sku and self.holder(n) is None)

    # ---- setup -----------------------------------------------------------------------
    def add_sku(self, sku: str, price_minor: int, billing_unit: str) -> None:
        self.skus[sku] = (price_minor, billing_unit)

    def add_node(self, node: str, sku: str, gpus_total: int) -> None:
        self.nodes[node] = (sku, gpus_total)

    def fund(self, user: str, amount: int) -> None:
        self.funds[user] = self.funds.get(user, 0) + amount

    def set_policy(self, value: int) -> None:
        self.policy = value

    # ---- admission -------------------------------------------------------------------
    def plan_admission(self, user: str, sku: str, n: int, node: str | None,
                       all_or_none: bool) -> Plan:
        if self.balance(user) <= 0:
            return Plan("insufficient_balance")
        headroom = self.policy - len(self.live_of(user))
        if headroom < (n if all_or_none else 1):
            return Plan("allocation_concurrency_limit")
        if node is None:
            free = self.free_nodes(sku)
        else:
            free = (node,) if self.holder(node) is None else ()
        created = min(n, headroom, len(free))
        if created == 0 or (all_or_none and created < n):
            return Plan("node_in_use" if node is not None else "sku_unavailable")
        return Plan("ok", created, free)

    def admit(self, lease_id: str, user: str, project: str, node: str, at: datetime) -> None:
        assert lease_id not in self.leases, "model: an allocation admitted twice"
        assert self.holder(node) is None, "model: admitted onto a held node"
        sku, gpus = self.nodes[node]
        price, unit = self.skus[sku]
        lease = MLease(id=lease_id, user=user, project=project, node=node, price_minor=price,
                       units=gpus if unit == "gpu_hour" else 1, created_at=at,
                       timeline=[("requested", at)])
        self.leases[lease_id] = lease
        self._issue(lease, "provision")
        assert len(self.live_of(user)) <= self.policy, "model: admitted over the cap"

    # ---- lifecycle -------------------------------------------------------------------
    def _issue(self, lease: MLease, phase: str) -> None:
        task_id = str(node_task_id_for(lease.id, phase, lease.cycles.get(phase, 0)))
        assert task_id not in lease.tasks, "model: a task id repeats"
        lease.tasks[task_id] = MTask(task_id, phase)
        lease.open_task = task_id

    def _supersede(self, lease: MLease) -> None:
        if lease.open_task is not None:
            lease.tasks[lease.open_task].result = "superseded"
            lease.open_task = None

    def _move(self, lease: MLease, to: str, at: datetime) -> None:
        assert to in EDGES[lease.status], f"model: {lease.status} -> {to}"
        lease.status = to
        lease.timeline.append((to, at))
        if to in ("releasing", "restarting"):
            phase = "release" if to == "releasing" else "restart"
            lease.cycles[phase] = lease.cycles.get(phase, 0) + 1
        if lease.claim in LIVE_CLAIMS:
            lease.claim = CLAIM[to]
        if to == "active" and lease.meter_start is None:
            lease.meter_start = lease.billed_to = at
        if to in ("released", "failed") and lease.meter_start is not None:
            lease.meter_end = at
            lease.billed_to = max(lease.billed_to or at, at)

    def dispatch(self, node: str, at: datetime) -> tuple[str | None, bool]:
        """``internalNodeWaitTask``: (the task handed out or None, whether it changed
        anything: the first hand-out only)."""
        lease = self.holder(node)
        if lease is None or lease.open_task is None:
            return None, False
        task = lease.tasks[lease.open_task]
        first = not task.dispatched
        task.dispatched = True
        if first and task.phase == "provision" and lease.status == "requested":
            self._move(lease, "provisioning", at)
        return task.task_id, first

    def find_task(self, node: str, task_id: str) -> tuple[MLease, MTask] | None:
        for lease in self.leases.values():
            if lease.node == node and task_id in lease.tasks:
                return lease, lease.tasks[task_id]
        return None

    def report(self, node: str, task_id: str, status: str, at: datetime) -> str:
        """``internalNodeTaskResult``: ``applied``, ``stale`` (already ended: nothing
        changes) or ``allocation_not_found``."""
        found = self.find_task(node, task_id)
        if found is None:
            return "allocation_not_found"
        lease, task = found
        if task.result is not None:
            return "stale"
        task.result = status
        if lease.open_task == task_id:
            lease.open_task = None
        success, failure = OUTCOMES[task.phase]
        if status == "success":
            if lease.status == "requested":
                self._move(lease, "provisioning", at)
            self._move(lease, success, at)
        else:
            self._move(lease, failure, at)
        return "applied"

    def release(self, lease_id: str, at: datetime) -> str:
        """``releaseAllocation`` / ``adminForceReleaseAllocation`` (§3.1 guards)."""
        lease = self.leases[lease_id]
        if lease.status == "releasing":
            return "allocation_already_releasing"
        if lease.status in ("released", "failed"):
            return "allocation_not_active"
        task = lease.tasks.get(lease.open_task or "")
        no_runtime = lease.status == "requested" and (task is None or not task.dispatched)
        self._supersede(lease)
        self._move(lease, "releasing", at)
        if no_runtime:
            self._move(lease, "released", at)
        else:
            self._issue(lease, "release")
        return "ok"

    def restart(self, lease_id: str, at: datetime) -> str:
        lease = self.leases[lease_id]
        if lease.status == "restarting":
            return "allocation_not_active/restart_in_progress"
        if lease.status not in ("active", "restart_failed"):
            return "allocation_not_active"
        self._move(lease, "restarting", at)
        self._issue(lease, "restart")
        return "ok"

    def force_cleanup(self, lease_id: str, verified: bool, at: datetime) -> str:
        lease = self.leases[lease_id]
        if lease.status in ("requested", "provisioning"):
            self._supersede(lease)
            self._move(lease, "failed", at)
            return "ok"
        if lease.status in ("releasing", "release_failed", "failed"):
            if not verified:
                return "invalid_request/provider_deletion_unconfirmed"
            self._supersede(lease)
            self._move(lease, "released", at)
            return "ok"
        return "invalid_request/state_not_cleanable"

    def tick(self, until: datetime) -> None:
        """``rate_open_usage``: every open meter is billed up to ``until``."""
        for lease in self.leases.values():
            if lease.meter_start is not None and lease.meter_end is None:
                lease.billed_to = max(lease.billed_to or until, until)


# ---- the real side ---------------------------------------------------------------------
class EventMirror:
    """The application's log read forward (each event once), kept as events and folded
    aggregates per stream: what ``observe`` reads, independent of the application's
    repository and of the aggregates its commands mutate."""

    def __init__(self, app: Any):
        self.app = app
        self.position = 0
        self.streams: dict[UUID, list[Any]] = {}
        self.states: dict[UUID, Any] = {}

    def refresh(self) -> None:
        while True:
            batch = self.app.recorder.select_notifications(start=self.position + 1, limit=1000)
            for notification in batch:
                event = self.app.mapper.to_domain_event(notification)
                stream = event.originator_id
                self.streams.setdefault(stream, []).append(event)
                self.states[stream] = event.mutate(self.states.get(stream))
                self.position = notification.id
            if len(batch) < 1000:
                return

    def events(self, stream: UUID | str) -> list[Any]:
        return self.streams.get(UUID(str(stream)), [])

    def state(self, stream: UUID | str) -> Any:
        return self.states.get(UUID(str(stream)))


def observe(app: Any, model: ReferenceAllocations, mirror: EventMirror | None = None
            ) -> dict[str, Any]:
    """The real aggregates the model speaks of, as plain data: ``leases`` (state,
    ``moves`` folded from the stream, claims, usage), ``node_claims`` (every claim on
    each node, with its status history folded from the node's stream), ``quota``
    (live ids per user) and ``accounts`` (balance and entries per user). ``mirror``
    (kept by the caller between calls) reads only what was appended since."""
    mirror = mirror or EventMirror(app)
    mirror.refresh()
    node_claims: dict[str, dict[str, dict[str, Any]]] = {}
    for node_id in model.nodes:
        history: dict[str, list[str]] = {}
        for event in mirror.events(node_id):
            if isinstance(event, NodeInventory.ClaimsReserved):
                for claim in event.claims:
                    history[claim["id"]] = [claim["status"]]
            elif isinstance(event, NodeInventory.ClaimsMoved):
                for claim_id in event.claim_ids:
                    history[claim_id].append(event.to)
        node = mirror.state(node_id)
        node_claims[node_id] = {cid: {**claim, "history": history[cid]}
                                for cid, claim in node.claims.items()}
    leases: dict[str, dict[str, Any]] = {}
    for lease_id in model.leases:
        events = mirror.events(lease_id)
        allocation = mirror.state(lease_id)
        moves = [(e.to, e.timestamp) for e in events if isinstance(e, Allocation.Moved)]
        after_end = 0
        for index, event in enumerate(events):
            if isinstance(event, Allocation.Moved) and event.to == "released":
                after_end = len(events) - index - 1
                break
        record_events = mirror.events(usage_id_for_allocation(lease_id))
        usage = None
        if record_events:
            record = mirror.state(usage_id_for_allocation(lease_id))
            stopped = [i for i, e in enumerate(record_events) if isinstance(e, UsageRecord.Stopped)]
            usage = {"start": record.start_time, "end": record.end_time, "cost": record.cost_minor,
                     "lines": [e.amount["amount_minor"] for e in record_events
                               if isinstance(e, UsageRecord.SliceRated)],
                     "stops": len(stopped),
                     "events_after_stop": len(record_events) - stopped[0] - 1 if stopped else 0}
        leases[lease_id] = {
            "status": allocation.status, "placement_status": allocation.placement_status,
            "timestamps": dict(allocation.timestamps), "reasons": dict(allocation.reasons),
            "created_at": allocation.lease["created_at"], "node_id": allocation.lease["node_id"],
            "claim_ids": list(allocation.lease["claim_ids"]),
            "tasks": {tid: {"phase": t["phase"], "dispatched": t["dispatched_at"] is not None,
                            "result": t["result"]} for tid, t in allocation.tasks.items()},
            "open_task": allocation.open_task, "moves": moves, "events_after_released": after_end,
            "created_event_at": events[0].timestamp, "usage": usage,
            "row": _workload_row(allocation, events, usage)}
    quota, accounts = {}, {}
    users = {lease.user for lease in model.leases.values()} | set(model.funds)
    for user in users:
        q = mirror.state(quota_id_for(user))
        quota[user] = list(q.live) if q is not None else []
        account = mirror.state(account_id_for(UUID(user)))
        entries = [(e.entry_type, e.amount_minor) for e in mirror.events(account_id_for(UUID(user)))
                   if isinstance(e, BillingAccount.LedgerEntryPosted)]
        accounts[user] = {"balance": account.balance("USD") if account else 0, "entries": entries}
    return {"leases": leases, "node_claims": node_claims, "quota": quota, "accounts": accounts}


def _workload_row(allocation: Allocation, events: list[Any],
                  usage: dict[str, Any] | None) -> dict[str, Any]:
    """The V3 workbench row the ``workloads`` read model builds from these events
    (the same pure functions, fed the same way: each event's step, then the state)."""
    steps = [step for step in map(step_of, events) if step is not None]
    cost = None if usage is None else {"amount_minor": usage["cost"],
                                       "currency": allocation.lease["hourly_rate"]["currency"]}
    return compute_workload_json(state_of(allocation), steps, now=events[-1].timestamp,
                                 usage_cost=cost, node=None, funds=None)


def _stamp(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value.replace("Z", "+00:00"))


def check_invariants(model: ReferenceAllocations, live: dict[str, Any]) -> None:
    """Raises AssertionError naming the first broken invariant (``live`` as
    ``observe`` builds it)."""
    assert set(live["leases"]) == set(model.leases), "allocations differ from the model's"
    for lease_id, want in model.leases.items():
        got = live["leases"][lease_id]
        name = f"allocation {lease_id[:8]} ({want.status})"
        # §5.1 legal paths, and the timeline the model expects (statuses and times)
        status = "requested"
        for to, _ in got["moves"]:
            assert to in EDGES[status], f"{name}: illegal edge {status} -> {to}"
            status = to
        assert status == got["status"] == want.status, \
            f"{name}: status {got['status']} (folded {status}) != model {want.status}"
        assert [("requested", got["created_event_at"])] + got["moves"] == want.timeline, \
            f"{name}: timeline {got['moves']} != model {want.timeline}"
        times = [at for _, at in want.timeline]
        assert times == sorted(times), f"{name}: timeline out of order"
        # §5.14 the V3 row: the lease's status and id; §5.15 actions follow the guards
        row = got["row"]
        assert (row["status"], row["allocation_id"], row["kind"]) == (want.status, lease_id, "compute"), \
            f"{name}: V3 row {row['status']} != model {want.status}"
        enabled = {a["action"]: a["enabled"] for a in row["lifecycle_actions"]}
        assert enabled["release"] == (want.status not in ("releasing", "released", "failed")), \
            f"{name}: release action enabled={enabled['release']}"
        assert enabled["restart"] == (want.status in ("active", "restart_failed")), \
            f"{name}: restart action enabled={enabled['restart']}"
        assert row["accrued_cost"]["amount_minor"] == (want.cost() if want.meter_start else 0), \
            f"{name}: V3 accrued_cost"
        # §5.2 absorbing
        if want.status == "released":
            assert got["events_after_released"] == 0, f"{name}: changed after released"
        # §5.5 timestamps
        stamps = got["timestamps"]
        created = _stamp(got["created_at"])
        assert created == want.created_at, f"{name}: created_at"
        chain = [created] + [_stamp(stamps.get(f"{s}_at"))
                             for s in ("provisioning", "active", "released")]
        present = [t for t in chain if t is not None]
        assert present == sorted(present), \
            f"{name}: created ≤ provisioning ≤ active ≤ released broken"
        for s in ("provisioning", "active", "released", "failed"):
            assert _stamp(stamps.get(f"{s}_at")) == want.first(s), f"{name}: {s}_at"
        assert (stamps.get("released_at") is not None) == (want.status == "released"), \
            f"{name}: released_at set iff released"
        if want.status == "failed" or want.first("failed") is not None:
            assert got["reasons"].get("failed"), f"{name}: failed without a failure_reason"
        assert got["placement_status"] == PLACEMENT[want.status], f"{name}: placement_status"
        # tasks: at most one not ended, and it is the open one
        assert {t: (v["phase"], v["dispatched"], v["result"]) for t, v in got["tasks"].items()} \
            == {t: (v.phase, v.dispatched, v.result) for t, v in want.tasks.items()}, \
            f"{name}: node tasks differ from the model's"
        assert got["open_task"] == want.open_task, f"{name}: open task"
        pending = [t for t, v in got["tasks"].items() if v["result"] is None]
        assert pending == ([want.open_task] if want.open_task else []), \
            f"{name}: a task is pending besides the open one"
        # §5.6 claims ↔ status: on exactly its node, live exactly while the lease is
        assert got["node_id"] == want.node, f"{name}: node"
        mine = [c for n, claims in live["node_claims"].items() for c in claims.values()
                if c["allocation_id"] == lease_id]
        assert mine and {c["node_id"] for c in mine} == {want.node}, f"{name}: claims off its node"
        assert sorted(c["id"] for c in mine) == sorted(got["claim_ids"]), \
            f"{name}: claims are not its admission claims"
        for claim in mine:
            assert claim["status"] == want.claim, \
                f"{name}: claim {claim['status']} != model {want.claim}"
            assert (claim["status"] in LIVE_CLAIMS) == want.live, f"{name}: claim liveness"
            assert (claim["released_at"] is None) == want.live, f"{name}: claim released_at"
            history = claim["history"]
            for a, b in zip(history, history[1:]):
                assert b in CLAIM_EDGES[a], f"{name}: claim edge {a} -> {b}"
            assert history.count("released") <= 1, f"{name}: claims released twice"
        # §5.11 billing: a lease never active has no record and is never billed
        usage = got["usage"]
        assert (usage is not None and usage["end"] is None) == (
            got["status"] in METERED and stamps.get("active_at") is not None), \
            f"{name}: a meter is open ⇔ metered ∧ active_at"
        if want.meter_start is None:
            assert usage is None, f"{name}: never active but has a usage record"
        else:
            assert usage is not None, f"{name}: active without a usage record"
            assert usage["start"] == want.meter_start == want.first("active"), \
                f"{name}: usage start_time != active_at"
            assert usage["end"] == want.meter_end, \
                f"{name}: usage end_time {usage['end']} != {want.meter_end}"
            assert usage["cost"] == sum(usage["lines"]), f"{name}: cost != Σ its rated lines"
            assert usage["cost"] == want.cost(), \
                f"{name}: accrued cost {usage['cost']} != model {want.cost()}"
            assert usage["stops"] == (want.meter_end is not None), f"{name}: meter closed twice"
            if want.meter_end is not None:
                assert usage["events_after_stop"] == 0, f"{name}: meter changed after close"
    # §5.7 no double booking
    for node_id, claims in live["node_claims"].items():
        holders = {c["allocation_id"] for c in claims.values() if c["status"] in LIVE_CLAIMS}
        assert len([c for c in claims.values() if c["status"] in LIVE_CLAIMS]) <= 1, \
            f"node {node_id[:8]}: two live claims"
        holder = model.holder(node_id)
        assert holders == ({holder.id} if holder else set()), f"node {node_id[:8]}: holder"
    # §5.9 concurrency quota: exactly the live leases
    for user, ids in live["quota"].items():
        assert len(ids) == len(set(ids)), f"user {user[:8]}: a lease counted twice"
        assert set(ids) == model.live_of(user), \
            f"user {user[:8]}: quota {sorted(ids)} != live {sorted(model.live_of(user))}"
    # balance = funds − Σ charges, and the charges are the model's accrued cost
    for user, account in live["accounts"].items():
        funds = sum(a for t, a in account["entries"] if t == "admin_credit")
        charges = -sum(a for t, a in account["entries"] if t == "usage_charge")
        assert {t for t, _ in account["entries"]} <= {"admin_credit", "usage_charge"}
        assert funds == model.funds.get(user, 0), f"user {user[:8]}: funds"
        assert charges == model.charged(user), \
            f"user {user[:8]}: charged {charges} != model {model.charged(user)}"
        assert account["balance"] == funds - charges == model.balance(user), \
            f"user {user[:8]}: balance {account['balance']} != funds − charges"
