"""Node inventory and placement under random SKU, node-lifecycle, slot and claim
commands, checked after every step against ``domain.testing.inventory``: the
reference decides each outcome on its own (accepted, or refused with which code), a
refused command must append nothing, and the §4 invariants hold on the real
aggregates (no double booking, coherence, counts, state = reference, replay).

Races: two reservations decided from the same loaded state (the second save must
conflict and change nothing), and a reservation decided before a lifecycle or slot
change of its node is saved (it must conflict when the node moved)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from eventsourcing.persistence import IntegrityError
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from domain import placement
from domain.app import Ledgercore
from domain.commands import Command, Session, run_decision
from domain.errors import DomainError
from domain.inventory import node_slot_id
from domain.nodes import (cordon, drain, observe_liveness, reactivate, register_node,
                          resume_scheduling, retire, tombstone, upsert_slots)
from domain.provenance import CommandContext
from domain.skus import create_sku, set_sku_active, update_sku
from domain.testing.inventory import (LIVE, RealAggregates, ReferenceInventory, ReplayCheck,
                                      check_invariants, check_step)

APPROVED = {"storage_ownership": "slice", "destructive_wipe_policy": "blkdiscard",
            "fabric_claim_mode": "per_slot_vf", "fabric_vf_pci_address": "0000:01:00.1"}
SKU_NAMES = ["bm-a", "sl-a", "bm-b", "sl-b", "vm-a"]
SLICE_SKUS = ["sl-a", "sl-b"]
HOSTS = ["h0", "h1", "h2", "h3"]
GHOST = str(uuid.UUID(int=7))


def outcome_of(result: Any) -> dict[str, Any]:
    if isinstance(result, DomainError):
        reason = result.details.get("reason")
        return {"outcome": f"{result.code}/{reason}" if reason else result.code}
    return {"outcome": "ok", "result": result}


def sku_spec(cls: str, *, unit: str | None = None, counts: list[int] | None = None,
             key: str | None = None, currency: str = "USD", name: str = "x") -> dict[str, Any]:
    default_unit, billing = {"gpu_baremetal": ("node", "node_hour"),
                             "gpu_slice": ("slice", "gpu_hour"), "cpu_vm": ("vm", "vcpu_hour")}[cls]
    if counts is None:
        counts = [8] if cls == "gpu_baremetal" else [1, 2, 4] if cls == "gpu_slice" else []
    return {"vendor": "nv", "display_name": name, "resource_class": cls, "billing_unit": billing,
            "scheduling_unit": unit or default_unit,
            "resources": {"allowed_accelerator_counts": counts},
            "resource_profile": {"topology_group_key": key} if key else {},
            "unit_price": {"amount_minor": 100, "currency": currency}}


@st.composite
def sku_specs(draw: Any) -> dict[str, Any]:
    """Mostly valid SKU bodies; about one in five breaks one validity rule."""
    cls = draw(st.sampled_from(["gpu_baremetal", "gpu_slice", "cpu_vm"]))
    counts = None
    if cls == "gpu_slice":
        counts = draw(st.lists(st.sampled_from([1, 2, 4]), min_size=1, max_size=3, unique=True))
    breaker = draw(st.sampled_from([None] * 8 + ["unit", "counts", "currency"]))
    unit = None
    if breaker == "unit":
        unit = draw(st.sampled_from(["node", "slice", "vm"]))
    elif breaker == "counts" and cls == "gpu_slice":
        counts = draw(st.sampled_from([[], [1, 1], [2, 4, 2]]))
    return sku_spec(cls, unit=unit, counts=counts, key=draw(st.sampled_from([None, "numa_node"])),
                    currency="ZZZ" if breaker == "currency" else "USD",
                    name=draw(st.sampled_from(["A", "B"])))


@st.composite
def slot_specs(draw: Any) -> dict[str, Any]:
    """Mostly valid slot writes; some unapproved, system-owned or shared."""
    shape = draw(st.sampled_from(["gpu_slice"] * 4 + ["baremetal"]))
    status = draw(st.sampled_from(["available"] * 4 + ["disabled", "cleanup", "cleanup",
                                                       "cleanup_blocked", "reserved"]))
    meta = dict(APPROVED) if draw(st.integers(0, 3)) else {
        k: v for k, v in APPROVED.items() if k != draw(st.sampled_from(sorted(APPROVED)))}
    sku = draw(st.sampled_from(SLICE_SKUS + [None]))
    if sku:
        meta["sku"] = sku
    return {"slot_index": draw(st.integers(0, 5)), "status": status, "capacity_shape": shape,
            "numa_node": draw(st.integers(0, 1)), "gpu_index": 0, "capacity_metadata": meta,
            "max_claims": draw(st.sampled_from([None] * 6 + [1, 2]))}


def approved_slot(index: int, sku: str, numa: int, status: str = "available") -> dict[str, Any]:
    return {"slot_index": index, "status": status, "capacity_shape": "gpu_slice",
            "numa_node": numa, "gpu_index": index, "capacity_metadata": {**APPROVED, "sku": sku}}


NODE = st.integers(0, 7)
ALLOC = st.integers(0, 15)
#: mostly the two SKUs the fleet starts with, so placement sequences get deep
PLACED_SKUS = st.sampled_from(["sl-a", "bm-a"] * 3 + SKU_NAMES[2:] + ["nope"])
#: usually the allocation's own node, sometimes another (or a missing) one
OTHER_NODE = st.one_of(st.none(), st.none(), st.none(), NODE)


class InventoryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.app = Ledgercore(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
        self.ref = ReferenceInventory()
        self.node_ids: list[str] = []
        #: allocation id -> {sku, count, user, project, node (where its claims last went)}
        self.allocs: dict[str, dict[str, Any]] = {}
        self.replay = ReplayCheck()
        self.real = RealAggregates(self.app)
        self.seen: ReferenceInventory | None = None
        self.made = 0

    def new_id(self, kind: str) -> str:
        """Deterministic ids: candidate order depends on them, so must replays."""
        self.made += 1
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{kind}-{self.made}"))

    # ---- plumbing -------------------------------------------------------------------
    def ctx(self) -> CommandContext:
        return CommandContext(actor_id="property", actor_role="admin", source="admin")

    def position(self) -> int:
        return self.app.recorder.max_notification_id() or 0

    def run(self, command: Command) -> tuple[str, Any]:
        before = self.position()
        response = self.app.execute(command).response
        if response["outcome"] != "ok":
            assert self.position() == before, f"refused ({response['outcome']}) but appended"
        return response["outcome"], response.get("result")

    def node_at(self, n: int) -> str:
        if n == 7 or not self.node_ids:
            return GHOST
        return self.node_ids[n % len(self.node_ids)]

    def alloc_at(self, n: int) -> str:
        return list(self.allocs)[n % len(self.allocs)]

    def real_node(self, node_id: str) -> Any:
        self.real.refresh()
        return self.real.get(node_id)

    def claims_of(self, node_id: str) -> dict[str, dict[str, Any]]:
        node = self.real_node(node_id)
        return {} if node is None else {k: dict(v) for k, v in node.claims.items()}

    def reserve_command(self, allocation_id: str, sku: str, count: int, node_id: str | None,
                        move_from: str | None = None) -> Command:
        info = self.allocs.get(allocation_id) or {"user": GHOST, "project": GHOST}

        def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
            ids = {"allocation_id": uuid.UUID(allocation_id), "user_id": uuid.UUID(info["user"]),
                   "project_id": uuid.UUID(info["project"]), "sku": sku, "count": count}
            if move_from is None:
                node = placement.reserve(session, ctx, node_id=node_id and uuid.UUID(node_id),
                                         **ids)
                changed = [node]
            else:
                node = placement.move(session, ctx, from_node=move_from,
                                      to_node=node_id and uuid.UUID(node_id), **ids)
                changed = [node, session.get(uuid.UUID(move_from))]
            slots = {s["id"]: s["slot_index"] for s in node.slots.values()}
            held = sorted(slots[c["slot_id"]] for c in node.live_claims(allocation_id)
                          if c["slot_id"])
            return changed, {"node": node.node_id, "slots": held}

        return Command(self.ctx(), decide, outcome_of)

    def remember(self, allocation_id: str, sku: str, count: int, node_id: str) -> None:
        info = self.allocs.setdefault(allocation_id, {"user": GHOST, "project": GHOST})
        info.update(sku=sku, count=count, node=node_id)

    def reserve_and_check(self, allocation_id: str, sku: str, count: int,
                          node_id: str | None) -> str:
        plan = self.ref.plan_reserve(allocation_id, sku, count, node_id=node_id)
        before = {n: self.real_node(n).status for n in self.node_ids if self.real_node(n).listed}
        got, result = self.run(self.reserve_command(allocation_id, sku, count, node_id))
        assert got == plan.outcome, (got, plan.outcome)
        if plan.ok:
            assert before[result["node"]] == "active", "a claim on a node that was not active"
            self.ref.apply_reserve(plan, allocation_id, result["node"], result["slots"])
            self.remember(allocation_id, sku, count, result["node"])
        return got

    # ---- setup ----------------------------------------------------------------------
    @initialize()
    def a_small_fleet(self) -> None:
        """bm-a and sl-a (1, 2 or 4 slots, all on one NUMA node), both active; two bm-a
        nodes, n0 with four approved sl-a slots (NUMA 0,0,1,1)."""
        for name, spec in (("bm-a", sku_spec("gpu_baremetal")),
                           ("sl-a", sku_spec("gpu_slice", key="numa_node"))):
            assert self.run(create_sku(self.ctx(), sku=name, spec=spec, render=outcome_of))[0] \
                == self.ref.create_sku(name, spec) == "ok"
            assert self.run(set_sku_active(self.ctx(), sku=name, active=True,
                                           render=outcome_of))[0] == "ok"
            self.ref.set_sku_active(name, True)
        for host in ("h0", "h1"):
            self.register(host, "bm-a", True, True)
        slots = [approved_slot(i, "sl-a", i // 2) for i in range(4)]
        self.upsert(self.node_ids[0], slots)

    # ---- SKUs -----------------------------------------------------------------------
    @rule(name=st.sampled_from(SKU_NAMES), spec=sku_specs())
    def create_a_sku(self, name: str, spec: dict[str, Any]) -> None:
        expected = self.ref.create_sku(name, spec)
        assert self.run(create_sku(self.ctx(), sku=name, spec=spec, render=outcome_of))[0] \
            == expected

    @rule(name=st.sampled_from(SKU_NAMES), spec=sku_specs())
    def update_a_sku(self, name: str, spec: dict[str, Any]) -> None:
        expected = self.ref.update_sku(name, spec)
        got, _ = self.run(update_sku(self.ctx(), sku=name, spec=spec,
                                     live_claims=placement.live_claims_for_sku, render=outcome_of))
        assert got == expected

    @rule(name=st.sampled_from(SKU_NAMES), active=st.booleans())
    def toggle_a_sku(self, name: str, active: bool) -> None:
        expected = self.ref.set_sku_active(name, active)
        assert self.run(set_sku_active(self.ctx(), sku=name, active=active,
                                       render=outcome_of))[0] == expected

    # ---- nodes ----------------------------------------------------------------------
    @rule(host=st.sampled_from(HOSTS), sku=st.sampled_from(SKU_NAMES + ["nope"]),
          online=st.booleans(), manual=st.sampled_from([True, True, True, False]))
    def register(self, host: str, sku: str, online: bool, manual: bool) -> None:
        node_id = self.new_id("node")
        expected = self.ref.register(node_id, host, sku, online, manual)
        identity = {"host": host, "hostname": None, "port": 22, "ssh_username": "ubuntu",
                    "sku": sku, "gpus_total": 8, "region_code": "r1",
                    "onboarding_mode": "manual" if manual else "maas"}
        got, _ = self.run(register_node(self.ctx(), identity=identity, online=online,
                                        node_id=uuid.UUID(node_id), render=outcome_of))
        assert got == expected
        if got == "ok":
            self.node_ids.append(node_id)

    def upsert(self, node_id: str, slots: list[dict[str, Any]]) -> str:
        expected = self.ref.upsert_slots(node_id, slots)
        claims = self.claims_of(node_id)
        got, _ = self.run(upsert_slots(self.ctx(), node_id=uuid.UUID(node_id), slots=slots,
                                       render=outcome_of))
        assert got == expected
        assert self.claims_of(node_id) == claims, "a slot write changed a claim"
        return got

    @rule(n=NODE, slots=st.lists(slot_specs(), min_size=1, max_size=3),
          bulk=st.sampled_from([None] * 9 + [(4, 60), (4, 61), (0, 65)]))
    def upsert_slots(self, n: int, slots: list[dict[str, Any]],
                     bulk: tuple[int, int] | None) -> None:
        """A few slots, or (rarely) many at the 64-slot limit: with the initial 0..3,
        60 from index 4 fit exactly, 61 do not, and 65 never do."""
        if bulk is not None:
            first, many = bulk
            slots = [{"slot_index": i, "status": "disabled", "capacity_shape": "gpu_slice",
                      "capacity_metadata": {}} for i in range(first, first + many)]
        self.upsert(self.node_at(n), slots)

    @rule(n=NODE, index=st.integers(0, 5), missing=st.sampled_from(sorted(APPROVED)))
    def unapproved_slot_back_from_cleanup(self, n: int, index: int, missing: str) -> None:
        """An operator may write an unapproved slice slot as ``cleanup``; a successful
        wipe then makes it ``available`` (the domain allows this today, see the kit):
        it must still never be claimed or counted free."""
        node_id = self.node_at(n)
        meta = {k: v for k, v in APPROVED.items() if k != missing}
        slot = {**approved_slot(index, "sl-a", 0, "cleanup"),
                "capacity_metadata": {**meta, "sku": "sl-a"}}
        if self.upsert(node_id, [slot]) == "ok":
            self.cleanup_and_check(node_id, index, True)

    @precondition(lambda self: any(self.ref.claimed_indexes(n) for n in self.ref.nodes))
    @rule(i=st.integers(0, 20), status=st.sampled_from(["available", "disabled"]))
    def edit_a_claimed_slot(self, i: int, status: str) -> None:
        held = sorted((n, x) for n in self.ref.nodes for x in self.ref.claimed_indexes(n))
        node_id, index = held[i % len(held)]
        assert self.upsert(node_id, [approved_slot(index, "sl-a", 0, status)]) \
            == "invalid_request/slot_has_live_claim"

    @rule(n=NODE, online=st.booleans())
    def probe(self, n: int, online: bool) -> None:
        self.probe_node(self.node_at(n), online)

    def probe_node(self, node_id: str, online: bool) -> None:
        expected = self.ref.probe(node_id, online)
        claims = self.claims_of(node_id)
        got, _ = self.run(observe_liveness(self.ctx(), node_id=uuid.UUID(node_id), online=online,
                                           source="probe", render=outcome_of))
        assert got == expected
        assert self.claims_of(node_id) == claims

    LIFECYCLE = {"cordon": cordon, "drain": drain, "resume_scheduling": resume_scheduling,
                 "retire": retire, "reactivate": reactivate}

    @rule(n=NODE, op=st.sampled_from(sorted(LIFECYCLE)))
    def lifecycle(self, n: int, op: str) -> None:
        self.lifecycle_op(self.node_at(n), op)

    def lifecycle_op(self, node_id: str, op: str) -> str:
        expected = getattr(self.ref, op)(node_id)
        claims = self.claims_of(node_id)
        got, _ = self.run(self.LIFECYCLE[op](self.ctx(), node_id=uuid.UUID(node_id),
                                             render=outcome_of))
        assert got == expected, (op, got, expected)
        assert self.claims_of(node_id) == claims, f"{op} changed a claim"
        return got

    @rule(n=NODE, how=st.sampled_from(["removed", "detached", "force_detached"]))
    def tombstone_a_node(self, n: int, how: str) -> None:
        node_id = self.node_at(n)
        expected = self.ref.tombstone(node_id, how)
        got, _ = self.run(tombstone(self.ctx(), node_id=uuid.UUID(node_id), how=how,
                                    render=outcome_of))
        assert got == expected

    # ---- placement ------------------------------------------------------------------
    @rule(sku=PLACED_SKUS, count=st.sampled_from([1, 1, 2, 4, 3]), pin=st.none() | NODE)
    def reserve(self, sku: str, count: int, pin: int | None) -> None:
        self.reserve_and_check(self.new_id("allocation"), sku, count,
                               None if pin is None else self.node_at(pin))

    def ended(self) -> list[str]:
        return [a for a in self.allocs if self.ref.allocation_node(a) is None]

    @precondition(lambda self: self.ended())
    @rule(a=ALLOC, same_node=st.booleans())
    def place_an_ended_allocation_again(self, a: int, same_node: bool) -> None:
        """Placement retried after failed provisioning (or a release): the allocation
        already has ended claims, perhaps on the very node it lands on again."""
        ended = self.ended()
        allocation_id = ended[a % len(ended)]
        info = self.allocs[allocation_id]
        self.reserve_and_check(allocation_id, info["sku"], info["count"],
                               info["node"] if same_node else None)

    def claim_command(self, op: str, node_id: str, allocation_id: str, to: str = "") -> Command:
        def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
            ids = {"node_id": node_id, "allocation_id": uuid.UUID(allocation_id)}
            if op == "advance":
                node = placement.advance(session, ctx, to=to, **ids)
            elif op == "release":
                node = placement.release(session, ctx, **ids)
            else:
                node = placement.fail(session, ctx, reason="provisioning failed", **ids)
            return [node], {"node": node.node_id}

        return Command(self.ctx(), decide, outcome_of)

    def alloc_and_node(self, a: int, elsewhere: int | None) -> tuple[str, str]:
        allocation_id = self.alloc_at(a)
        node_id = self.allocs[allocation_id]["node"]
        return allocation_id, node_id if elsewhere is None else self.node_at(elsewhere)

    @precondition(lambda self: self.allocs)
    @rule(a=ALLOC, to=st.sampled_from(["provisioning", "active", "releasing"]),
          elsewhere=OTHER_NODE)
    def advance(self, a: int, to: str, elsewhere: int | None) -> None:
        allocation_id, node_id = self.alloc_and_node(a, elsewhere)
        expected = self.ref.advance(node_id, allocation_id, to)
        got, _ = self.run(self.claim_command("advance", node_id, allocation_id, to))
        assert got == expected

    @precondition(lambda self: self.allocs)
    @rule(a=ALLOC, elsewhere=OTHER_NODE)
    def release(self, a: int, elsewhere: int | None) -> None:
        allocation_id, node_id = self.alloc_and_node(a, elsewhere)
        before = self.real_node(node_id)
        held = {c["slot_id"] for c in before.live_claims(allocation_id)} if before else set()
        expected = self.ref.release(node_id, allocation_id)
        got, _ = self.run(self.claim_command("release", node_id, allocation_id))
        assert got == expected
        if got == "ok":  # exactly the slots it held go to cleanup
            after = self.real_node(node_id)
            for slot_id, slot in after.slots.items():
                was = before.slots[slot_id]["status"] if slot_id in before.slots else None
                assert slot["status"] == ("cleanup" if slot_id in held else was), \
                    (slot_id, was, slot["status"])

    @precondition(lambda self: self.allocs)
    @rule(a=ALLOC, elsewhere=OTHER_NODE)
    def fail(self, a: int, elsewhere: int | None) -> None:
        allocation_id, node_id = self.alloc_and_node(a, elsewhere)
        expected = self.ref.fail(node_id, allocation_id)
        got, _ = self.run(self.claim_command("fail", node_id, allocation_id))
        assert got == expected

    @precondition(lambda self: self.allocs)
    @rule(a=ALLOC, to=st.none() | NODE)
    def move(self, a: int, to: int | None) -> None:
        allocation_id = self.alloc_at(a)
        info = self.allocs[allocation_id]
        to_node = None if to is None else self.node_at(to)
        plan = self.ref.plan_move(allocation_id, info["node"], info["sku"], info["count"], to_node)
        got, result = self.run(self.reserve_command(allocation_id, info["sku"], info["count"],
                                                    to_node, move_from=info["node"]))
        assert got == plan.outcome, (got, plan.outcome)
        if plan.ok:
            self.ref.apply_move(plan, allocation_id, info["node"], result["node"], result["slots"])
            info["node"] = result["node"]

    @rule(n=NODE, index=st.integers(0, 5), succeeded=st.booleans(), pick=st.booleans())
    def record_slot_cleanup(self, n: int, index: int, succeeded: bool, pick: bool) -> None:
        node_id = self.node_at(n)
        cleaning = sorted((i, x) for i, node in self.ref.nodes.items()
                          for x, s in node.slots.items() if s.status == "cleanup")
        if pick and cleaning:
            node_id, index = cleaning[(n + index) % len(cleaning)]
        self.cleanup_and_check(node_id, index, succeeded)

    def cleanup_and_check(self, node_id: str, index: int, succeeded: bool) -> None:
        expected = self.ref.record_slot_cleanup(node_id, index, succeeded)

        def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
            node = placement.record_slot_cleanup(session, ctx, node_id=node_id,
                                                 slot_id=node_slot_id(node_id, index),
                                                 succeeded=succeeded)
            return [node], {}

        got, _ = self.run(Command(self.ctx(), decide, outcome_of))
        assert got == expected
        if got == "ok":
            slot = self.real_node(node_id).slots[node_slot_id(node_id, index)]
            assert slot["status"] == self.ref.nodes[node_id].slots[index].status

    # ---- races ----------------------------------------------------------------------
    def decide_alone(self, command: Command) -> tuple[Session, str, Any]:
        session = Session(self.app)
        response, _, _ = run_decision(command, command.ctx, session)
        return session, response["outcome"], response.get("result")

    @rule(sku=st.sampled_from(["bm-a", "sl-a", "sl-b", "bm-b"]), count=st.sampled_from([1, 2]))
    def two_reservations_race(self, sku: str, count: int) -> None:
        """Both decided from the same versions. On the same node (always so for the last
        free unit) the first save wins and the second conflicts, changing nothing;
        retried (as ``execute`` would) it sees the new state. On different nodes (the
        domain spreads baremetal writers) both land, each where the spec allows."""
        first, second = self.new_id("allocation"), self.new_id("allocation")
        plan = self.ref.plan_reserve(first, sku, count)
        plan_second = self.ref.plan_reserve(second, sku, count)
        session_a, got_a, result_a = self.decide_alone(
            self.reserve_command(first, sku, count, None))
        session_b, got_b, result_b = self.decide_alone(
            self.reserve_command(second, sku, count, None))
        assert got_a == plan.outcome and got_b == plan_second.outcome
        if not plan.ok:
            assert not session_a.changed() and not session_b.changed()
            return
        plan_second.check(result_b["node"], result_b["slots"])
        before = self.position()
        self.app.save(*session_a.changed())
        self.ref.apply_reserve(plan, first, result_a["node"], result_a["slots"])
        self.remember(first, sku, count, result_a["node"])
        after = self.position()
        assert after == before + 1
        if result_b["node"] == result_a["node"]:
            event("race: same node, the second save conflicts")
            with pytest.raises(IntegrityError):
                self.app.save(*session_b.changed())
            assert self.position() == after, "the losing save appended"
            self.reserve_and_check(second, sku, count, None)
        else:
            event("race: different nodes, both land")
            assert len(plan.nodes) > 1, "two writers took the last unit"
            now = self.ref.plan_reserve(second, sku, count)
            self.app.save(*session_b.changed())
            self.ref.apply_reserve(now, second, result_b["node"], result_b["slots"])
            self.remember(second, sku, count, result_b["node"])

    @precondition(lambda self: self.node_ids)
    @rule(n=NODE, sku=st.sampled_from(["bm-a", "sl-a"]), count=st.sampled_from([1, 2]),
          op=st.sampled_from(["cordon", "drain", "retire", "offline", "online", "slot",
                              "reserve"]))
    def reservation_races_a_node_change(self, n: int, sku: str, count: int, op: str) -> None:
        """A pinned reservation decided, then its node changed by another command, then
        the reservation saved: it must conflict if the node moved, else land as decided."""
        node_id = self.node_at(n)
        allocation_id = self.new_id("allocation")
        plan = self.ref.plan_reserve(allocation_id, sku, count, node_id=node_id)
        session, got, result = self.decide_alone(
            self.reserve_command(allocation_id, sku, count, node_id))
        assert got == plan.outcome, (got, plan.outcome)
        node = self.real_node(node_id)
        version = node.version if node is not None else None
        if op in ("offline", "online"):
            self.probe_node(node_id, op == "online")
        elif op == "slot":
            if node_id != GHOST:
                self.upsert(node_id, [approved_slot(0, "sl-a", 0, "disabled")])
        elif op == "reserve":
            self.reserve_and_check(self.new_id("allocation"), sku, count, node_id)
        elif node_id != GHOST:
            self.lifecycle_op(node_id, op)
        if not plan.ok:
            return
        moved = self.real_node(node_id).version != version
        before = self.position()
        if moved:
            event(f"stale reservation after {op}: conflicts")
            with pytest.raises(IntegrityError):
                self.app.save(*session.changed())
            assert self.position() == before, "a stale reservation appended"
        else:
            event(f"stale reservation after {op}: node unchanged, lands")
            self.app.save(*session.changed())
            self.ref.apply_reserve(plan, allocation_id, result["node"], result["slots"])
            self.remember(allocation_id, sku, count, result["node"])

    # ---- invariants -----------------------------------------------------------------
    @invariant()
    def matches_the_reference(self) -> None:
        seen = check_invariants(self.app, self.ref, self.replay, self.real)
        if self.seen is not None:
            check_step(self.seen, seen)
        self.seen = seen
        for allocation_id, info in self.allocs.items():
            live = [c for c in seen.claims.values()
                    if c.allocation_id == allocation_id and c.status in LIVE]
            if live and self.ref.skus[info["sku"]].shape == "gpu_slice" and live[0].kind == "slot":
                assert len(live) == info["count"], f"slice of {info['count']} holds {len(live)}"
            if live:
                assert all(c.node_id == info["node"] for c in live)


TestInventory = InventoryMachine.TestCase
TestInventory.settings = settings(max_examples=500, stateful_step_count=25, deadline=None)
