"""The allocation lifecycle under random launches, agent dispatches and reports
(duplicated, stale, on the wrong node), restarts, releases, force-releases,
force-cleanups, policy and balance changes, billing ticks and idempotent replays,
checked after every step against the kit's reference model
(``domain.testing.allocations``) on the library's in-memory persistence.

The model decides each outcome on its own (accepted, or refused with which code); a
refused or no-op command must append nothing (a refusal under an Idempotency-Key only
its idempotency record); after every step the real aggregates must match the model:
§3.1 edges only, claims ↔ status, no double booking, quota = live leases, accrued cost
= Σ rated lines = the model's, balance = funds − Σ charges, timestamps ordered.

``test_planted_bugs_are_caught`` runs the same machine against deliberately broken
variants of ``domain.leases`` and asserts Hypothesis finds each."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule, run_state_machine_as_test)

from domain import admission, leases
from domain.admission import create_allocations, submit_launch
from domain.allocations import quota_id_for
from domain.app import Ledgercore
from domain.billing import adjust_balance
from domain.errors import DomainError, IdempotencyKeyReused
from domain.idempotency import record_id_for
from domain.leases import (dispatch_node_tasks, force_cleanup, report_node_task,
                           request_release, request_restart)
from domain.money import Money
from domain.nodes import get_node, register_node
from domain.provenance import CommandContext, IdempotencyClaim
from domain.skus import create_sku, set_concurrency_policy, set_sku_active
from domain.testing.allocations import (EventMirror, ReferenceAllocations, check_invariants,
                                        observe)
from domain.usage import rate_open_usage

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=timezone.utc)
NS = uuid.UUID("6a1d3c2e-0000-4000-8000-000000000005")
#: (sku, billing unit, unit price minor): a node-hour SKU on two nodes, a GPU-hour one
#: (4 GPUs) on a third; prices that make rounding (ties included) common
SKUS = {"bm-node": ("node_hour", 999), "bm-gpu": ("gpu_hour", 7)}
NODES = [("bm-node", 8), ("bm-node", 8), ("bm-gpu", 4)]
#: seconds the clock moves: often whole minutes or hours, sometimes anything up to 3 h
STEPS = st.sampled_from([0, 1, 59, 600, 1800, 3600, 5400]) | st.integers(0, 3 * 3600)
FUNDS = st.sampled_from([5000, 5000, 300, 1, 0])
LEASE = st.integers(0, 7)
#: what an agent reports: mostly success, so that leases get deep into their lifecycle
RESULTS = st.sampled_from(["success", "success", "success", "failed", "rejected"])


def render(result: Any) -> dict[str, Any]:
    if isinstance(result, DomainError):
        return {"error": result.code, "reason": result.details.get("reason")}
    return {"ok": result}


def refusal(response: dict[str, Any], with_reason: bool = True) -> str:
    if "ok" in response:
        return "ok"
    reason = response.get("reason") if with_reason else None
    return f"{response['error']}/{reason}" if reason else response["error"]


def sku_spec(unit: str, price: int) -> dict[str, Any]:
    return {"vendor": "nv", "display_name": "n", "resource_class": "gpu_baremetal",
            "billing_unit": unit, "scheduling_unit": "node",
            "resources": {"allowed_accelerator_counts": [8], "accelerator_count": 8},
            "unit_price": {"amount_minor": price, "currency": "USD"}}


class AllocationMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.app = Ledgercore(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
        self.model = ReferenceAllocations()
        self.clock = T0
        self.made = 0
        self.users = [str(uuid.uuid5(NS, f"user-{i}")) for i in range(2)]
        self.projects = [uuid.uuid5(NS, f"project-{i}") for i in range(2)]
        #: commands sent under an Idempotency-Key: (factory, kwargs, claim, response)
        self.keyed: list[tuple[Any, dict[str, Any], IdempotencyClaim, dict[str, Any]]] = []
        self.costs: dict[str, int] = {}
        self.mirror = EventMirror(self.app)
        for sku, (unit, price) in SKUS.items():
            self.run(create_sku, sku=sku, spec=sku_spec(unit, price))
            self.run(set_sku_active, sku=sku, active=True)
            self.model.add_sku(sku, price, unit)
        self.node_ids = []
        for index, (sku, gpus) in enumerate(NODES):
            node_id = uuid.uuid5(NS, f"node-{index}")
            self.run(register_node, online=True, node_id=node_id, identity={
                "host": f"h{index}", "hostname": None, "port": 22, "ssh_username": "u",
                "sku": sku, "gpus_total": gpus, "region_code": "r", "onboarding_mode": "manual"})
            self.node_ids.append(str(node_id))
            self.model.add_node(str(node_id), sku, gpus)

    # ---- plumbing -------------------------------------------------------------------
    def ctx(self, claim: IdempotencyClaim | None = None) -> CommandContext:
        return CommandContext(actor_id="property", actor_role="admin", source="admin",
                              now=self.clock, idempotency=claim)

    def position(self) -> int:
        return self.app.recorder.max_notification_id() or 0

    def run(self, factory: Any, **kwargs: Any) -> dict[str, Any]:
        return self.app.execute(factory(self.ctx(), render=render, **kwargs)).response

    def send(self, factory: Any, keyed: bool, **kwargs: Any) -> tuple[dict[str, Any], bool]:
        """Run a command (under a fresh Idempotency-Key when ``keyed``); answers the
        response and whether it appended anything besides its idempotency record."""
        claim = None
        if keyed:
            self.made += 1
            claim = IdempotencyClaim(scope=f"property:{self.made}", fingerprint=repr(kwargs))
        before = self.position()
        response = self.app.execute(factory(self.ctx(claim), render=render, **kwargs)).response
        appended = self.app.recorder.select_notifications(start=before + 1, limit=10_000)
        if claim is not None:
            self.keyed.append((factory, kwargs, claim, response))
            record = record_id_for(claim.scope)
            assert [n for n in appended if n.originator_id == record], "no idempotency record"
            appended = [n for n in appended if n.originator_id != record]
        return response, bool(appended)

    def pick(self, n: int) -> str:
        """A lease: mostly a live one (``n`` < 6), else any (in admission order)."""
        live = [lease.id for lease in self.model.leases.values() if lease.live]
        if n < 6 and live:
            return live[n % len(live)]
        return list(self.model.leases)[n % len(self.model.leases)]

    def lease_project(self, lease_id: str) -> uuid.UUID:
        return uuid.UUID(self.model.leases[lease_id].project)

    # ---- setup ----------------------------------------------------------------------
    @initialize(funds=st.tuples(FUNDS, FUNDS), policy=st.integers(1, 3))
    def start(self, funds: tuple[int, int], policy: int) -> None:
        for user, amount in zip(self.users, funds):
            if amount:
                self.fund(self.users.index(user), amount)
        self.set_policy(policy)

    # ---- money, policy, clock -------------------------------------------------------
    @rule(user=st.integers(0, 1), amount=st.sampled_from([1, 300, 5000]))
    def fund(self, user: int, amount: int) -> None:
        response = self.run(adjust_balance, user_id=uuid.UUID(self.users[user]),
                            direction="credit", amount=Money(amount, "USD"), reason="top-up")
        assert "ok" in response
        self.model.fund(self.users[user], amount)

    @rule(value=st.integers(1, 3))
    def set_policy(self, value: int) -> None:
        """A tight per-user cap; lowering it evicts nothing."""
        assert "ok" in self.run(set_concurrency_policy, value=value, reason="property")
        self.model.set_policy(value)

    @rule(seconds=STEPS)
    def advance(self, seconds: int) -> None:
        self.clock += timedelta(seconds=seconds)

    @rule()
    def tick(self) -> None:
        """The billing clock: every open meter rated up to now."""
        before = self.position()
        answer = self.run(rate_open_usage, until=self.clock)["ok"]
        assert not answer["failed"] and not answer["more"]
        due = [lease for lease in self.model.leases.values() if lease.meter_start is not None
               and lease.meter_end is None and lease.billed_to < self.clock]
        assert answer["rated_records"] == len(due)
        event("tick: rated" if due else "tick: nothing due")
        self.model.tick(self.clock)
        if not due:
            assert self.position() == before, "a tick with nothing due appended"

    # ---- launches -------------------------------------------------------------------
    def admitted(self, user: int, plan: Any, response: dict[str, Any], appended: bool,
                 project: uuid.UUID) -> None:
        got = refusal(response, with_reason=False)
        event(f"admission: {got}" + (f" ({plan.created})" if got == "ok" else ""))
        assert got == plan.outcome, (got, plan.outcome)
        if got != "ok":
            assert not appended, f"refused ({got}) but appended"
            return
        allocations = response["ok"]["allocations"]
        assert len(allocations) == plan.created
        nodes = [a["node_id"] for a in allocations]
        assert len(set(nodes)) == len(nodes) and set(nodes) <= set(plan.candidates)
        for allocation in allocations:
            assert allocation["status"] == "requested" and allocation["active_at"] is None
            assert len(allocation["placement_claims"]) == 1
            self.model.admit(allocation["id"], self.users[user], str(project),
                             allocation["node_id"], self.clock)
        quota = self.app.get_or_none(quota_id_for(self.users[user]))
        assert len(quota.live) <= self.model.policy, "admitted over the concurrency cap"

    @rule(user=st.integers(0, 1), sku=st.sampled_from(sorted(SKUS)), n=st.integers(1, 3),
          keyed=st.booleans())
    def submit(self, user: int, sku: str, n: int, keyed: bool) -> None:
        """``submitV3ComputeLaunch``: n baremetal leases, all or none."""
        plan = self.model.plan_admission(self.users[user], sku, n, None, all_or_none=True)
        project = self.projects[user]
        response, appended = self.send(
            submit_launch, keyed, user_id=uuid.UUID(self.users[user]), tenant_id=None,
            project_id=project, sku=sku, unit_count=n, request={})
        self.admitted(user, plan, response, appended, project)

    @rule(user=st.integers(0, 1), n=st.integers(1, 3), pin=st.none() | st.integers(0, 2),
          sku=st.sampled_from(sorted(SKUS)), keyed=st.booleans())
    def create(self, user: int, n: int, pin: int | None, sku: str, keyed: bool) -> None:
        """``createAllocation``: as many of n as the cap and capacity allow, pinned to a
        node (its SKU) or not (``scheduler_request.sku``)."""
        node = None if pin is None else self.node_ids[pin]
        if node is not None:
            sku = self.model.nodes[node][0]
        plan = self.model.plan_admission(self.users[user], sku, n, node, all_or_none=False)
        project = self.projects[user]
        response, appended = self.send(
            create_allocations, keyed, user_id=uuid.UUID(self.users[user]), tenant_id=None,
            project_id=project, requested_count=n, node_id=node and uuid.UUID(node),
            capacity_shape=None, gpu_count=None,
            request={"scheduler_request": {"sku": sku}} if node is None else {})
        self.admitted(user, plan, response, appended, project)
        if plan.outcome == "ok":
            assert response["ok"]["requested_count"] == n

    # ---- the node agent -------------------------------------------------------------
    @rule(node=st.integers(0, 2))
    def dispatch(self, node: int) -> None:
        """``internalNodeWaitTask``: the open task, handed out again until reported."""
        expected, first = self.model.dispatch(self.node_ids[node], self.clock)
        before = self.position()
        task = self.run(dispatch_node_tasks, node_id=uuid.UUID(self.node_ids[node]))["ok"]["task"]
        assert (task and task["task_id"]) == expected, (task, expected)
        assert (self.position() != before) == first, "a repeated hand-out appended (or none did)"

    @rule(results=st.tuples(RESULTS, RESULTS, RESULTS))
    def agents(self, results: tuple[str, str, str]) -> None:
        """Every node's agent long-polls once and reports on the task it got."""
        for node, status in zip(range(len(self.node_ids)), results):
            task = self.model.holder(self.node_ids[node])
            task_id = task.open_task if task else None
            self.dispatch(node)
            if task_id is not None:
                self.send_report(self.node_ids[node], task_id, status)

    @precondition(lambda self: self.model.leases)
    @rule(n=LEASE, which=st.integers(0, 7), status=RESULTS,
          wrong_node=st.sampled_from([False] * 7 + [True]))
    def report(self, n: int, which: int, status: str, wrong_node: bool) -> None:
        """``internalNodeTaskResult``: mostly on the open task; also on an ended one
        (a duplicate, or a report of a superseded task), an unknown one, or from
        another node."""
        lease = self.model.leases[self.pick(n)]
        tasks = list(lease.tasks)
        if which == 7:
            task_id = str(uuid.uuid5(NS, f"unknown-task-{self.made}"))
        elif which < 4 and lease.open_task:
            task_id = lease.open_task
        else:
            task_id = tasks[which % len(tasks)]
        node = lease.node
        if wrong_node:
            node = next(n for n in self.node_ids if n != lease.node)
        self.send_report(node, task_id, status)

    def send_report(self, node: str, task_id: str, status: str) -> None:
        found = self.model.find_task(node, task_id)
        was = found[0].status if found else None
        ended = found[1].result if found else None
        expected = self.model.report(node, task_id, status, self.clock)
        if expected == "applied":
            event(f"report: {status} {was} -> {found[0].status}")
        else:
            event(f"report: {expected}" + (" (superseded task)" if ended == "superseded" else
                                           " (duplicate)" if ended else ""))
        before = self.position()
        response = self.run(report_node_task, node_id=uuid.UUID(node),
                            task_id=uuid.UUID(task_id), status=status, error=None,
                            completed_at=self.clock, output={})
        got = refusal(response) if "error" in response else (
            "applied" if response["ok"]["applied"] else "stale")
        assert got == expected, (got, expected)
        assert (self.position() != before) == (expected == "applied")

    # ---- user and operator commands -------------------------------------------------
    @precondition(lambda self: self.model.leases)
    @rule(n=LEASE, force=st.booleans(), foreign=st.sampled_from([False] * 5 + [True]),
          keyed=st.booleans(), times=st.integers(1, 2))
    def release(self, n: int, force: bool, foreign: bool, keyed: bool, times: int) -> None:
        """``releaseAllocation`` (in its project, or another: 404) or
        ``adminForceReleaseAllocation``; ``times=2``: sent again at once."""
        lease_id = self.pick(n)
        if foreign and not force:
            project = self.projects[1 - self.projects.index(self.lease_project(lease_id))]
        else:
            project = None if force else self.lease_project(lease_id)
        for _ in range(times):
            previous = self.model.leases[lease_id].status
            expected = ("allocation_not_found" if foreign and not force
                        else self.model.release(lease_id, self.clock))
            event(f"release from {previous}: {expected}")
            response, appended = self.send(
                request_release, keyed, allocation_id=uuid.UUID(lease_id), project_id=project,
                mode="admin_force" if force else "user", reason="property" if force else None)
            assert refusal(response) == expected, (refusal(response), expected)
            assert appended == (expected == "ok")
            if expected == "ok":
                answer = response["ok"]
                assert answer["previous_status"] == previous
                assert answer["allocation"]["status"] == self.model.leases[lease_id].status

    @precondition(lambda self: self.model.leases)
    @rule(n=LEASE, foreign=st.sampled_from([False] * 5 + [True]))
    def restart(self, n: int, foreign: bool) -> None:
        lease_id = self.pick(n)
        project = self.lease_project(lease_id)
        if foreign:
            project = self.projects[1 - self.projects.index(project)]
            expected = "allocation_not_found"
        else:
            was = self.model.leases[lease_id].status
            expected = self.model.restart(lease_id, self.clock)
            event(f"restart from {was}: {expected}")
        response, appended = self.send(request_restart, False, allocation_id=uuid.UUID(lease_id),
                                       project_id=project)
        assert refusal(response) == expected, (refusal(response), expected)
        assert appended == (expected == "ok")

    @precondition(lambda self: self.model.leases)
    @rule(n=LEASE, verified=st.booleans())
    def cleanup(self, n: int, verified: bool) -> None:
        """``adminForceCleanupAllocation`` from whatever state the lease is in."""
        lease_id = self.pick(n)
        was = self.model.leases[lease_id].status
        expected = self.model.force_cleanup(lease_id, verified, self.clock)
        event(f"force-cleanup from {was} (verified={verified}): {expected}")
        response, appended = self.send(force_cleanup, False, allocation_id=uuid.UUID(lease_id),
                                       reason="operator verified", runtime_verified_absent=verified)
        assert refusal(response) == expected, (refusal(response), expected)
        assert appended == (expected == "ok")

    # ---- idempotency ----------------------------------------------------------------
    @precondition(lambda self: self.keyed)
    @rule(k=st.integers(0, 15), tamper=st.sampled_from([False] * 3 + [True]))
    def replay(self, k: int, tamper: bool) -> None:
        """The same key and body: the stored answer (same ids), nothing appended. The
        same key with another body: refused, nothing appended."""
        factory, kwargs, claim, response = self.keyed[k % len(self.keyed)]
        if tamper:
            claim = IdempotencyClaim(scope=claim.scope, fingerprint=claim.fingerprint + "!")
        before = self.position()
        try:
            outcome = self.app.execute(factory(self.ctx(claim), render=render, **kwargs))
        except IdempotencyKeyReused:
            assert tamper, "a same-body replay was refused"
        else:
            assert not tamper, "a key reused with another body was executed"
            assert outcome.replayed and outcome.response == response
        assert self.position() == before, "a replay appended"

    # ---- invariants -----------------------------------------------------------------
    @invariant()
    def matches_the_model(self) -> None:
        live = observe(self.app, self.model, self.mirror)
        check_invariants(self.model, live)
        for lease_id, lease in live["leases"].items():  # accrued cost never decreases
            cost = lease["usage"]["cost"] if lease["usage"] else 0
            assert cost >= self.costs.get(lease_id, 0), f"{lease_id}: accrued cost decreased"
            self.costs[lease_id] = cost


TestAllocationMachine = AllocationMachine.TestCase
TestAllocationMachine.settings = settings(max_examples=500, stateful_step_count=50,
                                          deadline=None)


# ---- planted bugs: the machine must catch each -----------------------------------------
def _restart_from_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    """``failed`` may go back to ``restarting`` (§5.2 forbids it)."""
    monkeypatch.setitem(leases.STEP_FROM, "restarting",
                        leases.STEP_FROM["restarting"] + ("failed",))


def _release_keeps_claims(monkeypatch: pytest.MonkeyPatch) -> None:
    """A release that never frees the lease's claims."""
    monkeypatch.setattr(leases, "release",
                        lambda session, ctx, *, node_id, allocation_id: get_node(session, node_id))


def _meter_never_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    """A release or failure that leaves the meter running."""
    monkeypatch.setattr(leases, "stop_meter", lambda session, ctx, **kwargs: ([], None))


def _quota_keeps_ended_leases(monkeypatch: pytest.MonkeyPatch) -> None:
    """An ended lease still counts against the concurrency cap."""
    monkeypatch.setattr(leases, "quota_id_for", lambda user_id: uuid.uuid5(NS, "no-such-quota"))


def _no_balance_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Launches admitted without a positive balance."""
    monkeypatch.setattr(admission, "financial_gate", lambda session, **kwargs: None)


@pytest.mark.parametrize("plant", [_restart_from_failed, _release_keeps_claims,
                                   _meter_never_stops, _quota_keeps_ended_leases,
                                   _no_balance_gate])
def test_planted_bugs_are_caught(monkeypatch: pytest.MonkeyPatch, plant: Any) -> None:
    plant(monkeypatch)
    with pytest.raises(AssertionError):
        run_state_machine_as_test(AllocationMachine, settings=settings(
            max_examples=1500, stateful_step_count=25, deadline=None, database=None,
            phases=(Phase.generate,), suppress_health_check=list(HealthCheck),
            report_multiple_bugs=False))
