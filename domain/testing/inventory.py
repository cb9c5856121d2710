"""Reference model of node inventory and placement, and its invariants
(inventory-and-placement §3 state machines, §4 invariants).

``ReferenceInventory`` is meant to be obviously correct: plain dataclasses (nodes with
an administrative state and a liveness flag, slots keyed by ``slot_index``, claims
keyed by id, SKUs, hosts) changed by the same operations as the domain, each written
straight from the spec. Where the spec leaves a choice open the model takes the one
the domain documents, named as such in the method's docstring:

- a ``manual`` node is registered ``active`` (enrollment is outside the service), a
  ``maas`` one ``registered`` (§6 Q2);
- a drain ends (``cordoned``) when the node's last live claim ends, at once without
  one (§6 Q1);
- a wrong node state is ``invalid_request``/``invalid_node_state``, or ``node_offline``
  when the node is offline (§3.1 guards); a pinned reservation on a node that is not
  schedulable is ``node_offline``, on one without room ``node_in_use`` (§5.3);
- SKU validity (§6 Q11): a ``gpu_slice`` SKU is scheduled by ``slice`` and has
  allowed counts, a baremetal one by ``node``; counts are unique; the currency is
  ISO 4217. A new SKU is inactive;
- unpinned candidates (§5.3): slices on the fullest node first (most live claims),
  ties by node id; baremetal on a node without slice history if one is free, else on
  one with slice history, any of them (the domain picks at random among equals so
  that racing writers spread out); which free slots of the chosen node a slice takes
  is the domain's choice too. ``Plan`` holds what the spec allows; the domain's choice
  is checked against it (``Plan.check``) and then adopted;
- a claim id is ``uuid5(NS, "{allocation}:{node}:{slot or 'node'}")`` (§5.1), so an
  allocation never claims the same slot (or node) twice: a node or slot it held
  before is not free *for it*;
- terminal claims are frozen (§3.4): they neither move nor stop the allocation's live
  claims from moving.

- a successful wipe makes a ``cleanup`` slot ``available``, except a slice slot
  without approved metadata (an operator may write one as ``cleanup``), which becomes
  ``disabled``: only approved slots may be available (§3.4 [C]).

Outcomes are ``"ok"`` or the refusal as ``code`` / ``code/reason``.

``check_invariants(app, reference)`` loads the real aggregates and asserts §4:

(a) no double booking, (b) slot/claim coherence, (c) the counts below (each a
partition of its universe, matching the domain's views and the reference), (d) the
real state equals the reference, (e) a read model folded from the stored events
(``fold``) equals ``state_of`` of the aggregate. ``check_step(before, after)``
asserts what may change in one command (guarded placement, monotone claims, cleanup
safety).

**Counts.** Per listed node, over its slots (``total`` = number of slots):

- ``free``: ``available``, the node schedulable (``active`` and online), no live
  ``node_exclusive`` claim on the node, and (``gpu_slice`` slots) approved
  metadata. This is the view's ``schedulable_available``;
- ``claimed``: the slot is ``reserved|provisioning|active|releasing``;
- ``unavailable``: every other slot (``cleanup*``, ``failed``, ``disabled``, or
  ``available`` on a node that cannot take it).

Per SKU, over its units: a baremetal-shaped SKU's units are the listed nodes whose
node SKU it is; ``free`` = the SKU is active, the node schedulable, with no live claim
and every slot ``available|disabled`` (§3.2); ``claimed`` = the node holds a live
``node_exclusive`` claim; ``unavailable`` = the rest (e.g. a node holding slices). A
``gpu_slice`` SKU's units are the ``gpu_slice`` slots whose metadata names it on listed
nodes; ``free`` = the SKU is active and the slot is per-node ``free``; ``claimed`` =
the slot is in a claim state; ``unavailable`` = the rest. Other classes have none.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from domain.inventory import (DIRECTORY_ID, NodeInventory, claim_id_for, fold, host_id_for,
                              node_slot_id, slot_is_approved, state_of)
from domain.inventory_views import free_units, occupancy, slot_summary
from domain.money import is_known_currency
from domain.skus import sku_id_for

LIVE = ("reserved", "provisioning", "active", "releasing")
TERMINAL = ("released", "failed")
#: §3.4 (and §3.3: reserved|provisioning|active → releasing)
EDGES = {"reserved": ("provisioning", "releasing", "failed"),
         "provisioning": ("active", "releasing", "failed"),
         "active": ("releasing",), "releasing": ("released",),
         "released": (), "failed": ()}
OPERATOR_STATUSES = ("available", "cleanup", "cleanup_blocked", "disabled")
SLOT_COUNTERS = ("available", "reserved", "provisioning", "active", "releasing", "cleanup",
                 "cleanup_blocked", "failed", "disabled")
MAX_SLOTS = 64
SHAPES = {"gpu_baremetal": "baremetal", "cpu_baremetal": "baremetal", "gpu_slice": "gpu_slice"}
REMOVED = "removed"


def approved(meta: dict[str, Any] | None) -> bool:
    """§2.2 approval rule for a whole-GPU slice slot to be ``available``."""
    meta = meta or {}
    return (meta.get("storage_ownership") == "slice" and bool(meta.get("destructive_wipe_policy"))
            and meta.get("fabric_claim_mode") == "per_slot_vf"
            and bool(meta.get("fabric_vf_pci_address")))


def public_status(admin_state: str, online: bool) -> str:
    """§3.1: ``offline`` while unreachable and ``active|cordoned``, else the admin state."""
    return "offline" if not online and admin_state in ("active", "cordoned") else admin_state


def wrong_state(node: RNode) -> str:
    """The refusal for a lifecycle action the node's status does not allow."""
    return "node_offline" if node.status == "offline" else "invalid_request/invalid_node_state"


@dataclass
class RSlot:
    status: str
    shape: str
    sku: str | None
    approved: bool
    numa: Any = None


@dataclass
class RNode:
    id: str
    host: str
    sku: str
    admin_state: str
    online: bool
    slots: dict[int, RSlot] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return public_status(self.admin_state, self.online)

    @property
    def listed(self) -> bool:
        return self.admin_state != REMOVED

    @property
    def schedulable(self) -> bool:
        return self.admin_state == "active" and self.online


@dataclass
class RClaim:
    id: str
    allocation_id: str
    node_id: str
    slot_index: int | None
    kind: str
    sku: str
    status: str


@dataclass
class RSku:
    name: str
    resource_class: str
    billing_unit: str
    scheduling_unit: str
    counts: tuple[int, ...]
    topology_key: str | None
    active: bool = False

    @property
    def shape(self) -> str | None:
        return SHAPES.get(self.resource_class)


@dataclass
class Plan:
    """What a reservation will do: its outcome and, if ``ok``, where it may land."""

    outcome: str
    nodes: tuple[str, ...] = ()  # where it may land (any one of them)
    shape: str | None = None
    sku: str | None = None
    k: int = 0
    free: tuple[int, ...] = ()
    key: str | None = None
    numa: dict[int, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    def check(self, node_id: str, slot_indexes: list[int]) -> None:
        """The domain's choice must be one the spec allows."""
        assert node_id in self.nodes, f"placed on {node_id}, expected one of {self.nodes}"
        if self.shape == "baremetal":
            assert slot_indexes == [], f"a baremetal claim holds slots {slot_indexes}"
            return
        assert len(slot_indexes) == self.k == len(set(slot_indexes)), \
            f"slice of {self.k} took slots {slot_indexes}"
        assert set(slot_indexes) <= set(self.free), f"took {slot_indexes}, free {self.free}"
        if self.key is not None:
            assert len({str(self.numa[i]) for i in slot_indexes}) == 1, \
                f"slots {slot_indexes} span topology groups"


def _spec_problem(spec: dict[str, Any]) -> str | None:
    cls, unit = spec["resource_class"], spec["scheduling_unit"]
    counts = spec["resources"].get("allowed_accelerator_counts") or []
    if cls == "gpu_slice" and unit != "slice":
        return "invalid_request/invalid_sku_units"
    if cls == "gpu_slice" and not counts:
        return "invalid_request/invalid_sku_resources"
    if cls in ("gpu_baremetal", "cpu_baremetal") and unit != "node":
        return "invalid_request/invalid_sku_units"
    if len(set(counts)) != len(counts):
        return "invalid_request/invalid_sku_resources"
    if not is_known_currency(spec["unit_price"]["currency"]):
        return "invalid_request/unknown_currency"
    return None


def _sku_from_spec(name: str, spec: dict[str, Any], active: bool) -> RSku:
    return RSku(name, spec["resource_class"], spec["billing_unit"], spec["scheduling_unit"],
                tuple(spec["resources"].get("allowed_accelerator_counts") or ()),
                (spec.get("resource_profile") or {}).get("topology_group_key"), active)


@dataclass
class ReferenceInventory:
    skus: dict[str, RSku] = field(default_factory=dict)
    nodes: dict[str, RNode] = field(default_factory=dict)  # tombstoned ones too
    hosts: dict[str, str | None] = field(default_factory=dict)
    claims: dict[str, RClaim] = field(default_factory=dict)

    # ---- queries --------------------------------------------------------------------
    def listed(self, node_id: str) -> RNode | None:
        node = self.nodes.get(node_id)
        return node if node is not None and node.listed else None

    def live(self, node_id: str) -> list[RClaim]:
        return [c for c in self.claims.values() if c.node_id == node_id and c.status in LIVE]

    def exclusive(self, node_id: str) -> bool:
        return any(c.kind == "node_exclusive" for c in self.live(node_id))

    def baremetal_free(self, node: RNode) -> bool:
        """§3.2: no live claim, every slot available or disabled."""
        return not self.live(node.id) and all(s.status in ("available", "disabled")
                                              for s in node.slots.values())

    def slot_free(self, node: RNode, slot: RSlot) -> bool:
        return (slot.status == "available" and node.listed and node.schedulable
                and not self.exclusive(node.id) and (slot.shape != "gpu_slice" or slot.approved))

    def claimed_indexes(self, node_id: str) -> set[int]:
        return {c.slot_index for c in self.live(node_id) if c.slot_index is not None}

    def allocation_node(self, allocation_id: str) -> str | None:
        """The node holding the allocation's live claims (else None)."""
        nodes = {c.node_id for c in self.claims.values()
                 if c.allocation_id == allocation_id and c.status in LIVE}
        assert len(nodes) <= 1, f"allocation {allocation_id} is live on {nodes}"
        return next(iter(nodes), None)

    # ---- SKUs -----------------------------------------------------------------------
    def create_sku(self, name: str, spec: dict[str, Any]) -> str:
        if name in self.skus:
            return "invalid_request/sku_already_exists"
        problem = _spec_problem(spec)
        if problem:
            return problem
        self.skus[name] = _sku_from_spec(name, spec, active=False)
        return "ok"

    def update_sku(self, name: str, spec: dict[str, Any]) -> str:
        """A class or unit change while the SKU has live claims is refused (§5.2)."""
        current = self.skus.get(name)
        if current is None:
            return "sku_not_found"
        problem = _spec_problem(spec)
        if problem:
            return problem
        after = _sku_from_spec(name, spec, current.active)
        moved = (after.resource_class, after.billing_unit, after.scheduling_unit) != (
            current.resource_class, current.billing_unit, current.scheduling_unit)
        if moved and any(c.sku == name and c.status in LIVE for c in self.claims.values()):
            return "invalid_request/sku_has_live_claims"
        self.skus[name] = after
        return "ok"

    def set_sku_active(self, name: str, active: bool) -> str:
        if name not in self.skus:
            return "sku_not_found"
        self.skus[name].active = active
        return "ok"

    # ---- node lifecycle (§3.1) ------------------------------------------------------
    def register(self, node_id: str, host: str, sku: str, online: bool, manual: bool) -> str:
        if sku not in self.skus:
            return "sku_not_found"
        if self.hosts.get(host):
            return "node_already_exists"
        self.nodes[node_id] = RNode(node_id, host, sku, "active" if manual else "registered",
                                    online)
        self.hosts[host] = node_id
        return "ok"

    def probe(self, node_id: str, online: bool) -> str:
        node = self.listed(node_id)
        if node is None:
            return "node_not_found"
        node.online = online
        return "ok"

    def cordon(self, node_id: str) -> str:
        node = self.listed(node_id)
        if node is None:
            return "node_not_found"
        if node.admin_state == "cordoned":
            return "ok"
        if node.status != "active":
            return wrong_state(node)
        node.admin_state = "cordoned"
        return "ok"

    def resume_scheduling(self, node_id: str) -> str:
        node = self.listed(node_id)
        if node is None:
            return "node_not_found"
        if node.admin_state == "active":
            return "ok"
        if node.status != "cordoned":
            return wrong_state(node)
        node.admin_state = "active"
        return "ok"

    def drain(self, node_id: str) -> str:
        node = self.listed(node_id)
        if node is None:
            return "node_not_found"
        if node.admin_state == "draining":
            return "ok"
        if node.status not in ("active", "cordoned"):
            return wrong_state(node)
        node.admin_state = "draining" if self.live(node_id) else "cordoned"
        return "ok"

    def retire(self, node_id: str) -> str:
        node = self.listed(node_id)
        if node is None:
            return "node_not_found"
        if self.live(node_id):
            return "node_in_use"
        if node.admin_state not in ("active", "cordoned", "draining"):  # offline = active|cordoned
            return wrong_state(node)
        node.admin_state = "retired"
        return "ok"

    def reactivate(self, node_id: str) -> str:
        node = self.listed(node_id)
        if node is None:
            return "node_not_found"
        if node.status != "retired":
            return wrong_state(node)
        node.admin_state, node.online = "active", False
        return "ok"

    def tombstone(self, node_id: str, how: str) -> str:
        """remove / detach from ``retired``; force-detach from ``draining|removing|retired``."""
        node = self.listed(node_id)
        if node is None:
            return "node_not_found"
        if self.live(node_id):
            return "node_in_use"
        allowed = ("draining", "removing", "retired") if how == "force_detached" else ("retired",)
        if node.status not in allowed:
            return wrong_state(node)
        node.admin_state = REMOVED
        self.hosts[node.host] = None
        return "ok"

    # ---- slots (§3.3, §4.12) --------------------------------------------------------
    def upsert_slots(self, node_id: str, slots: list[dict[str, Any]]) -> str:
        node = self.listed(node_id)
        if node is None:
            return "node_not_found"
        indexes = [s["slot_index"] for s in slots]
        if len(set(indexes)) != len(indexes):
            return "invalid_request/duplicate_slot_index"
        claimed = self.claimed_indexes(node_id)
        for given in slots:
            if given["slot_index"] in claimed:
                return "invalid_request/slot_has_live_claim"
            if given["status"] not in OPERATOR_STATUSES:
                return "invalid_request/slot_status_system_owned"
            if (given.get("max_claims") or 1) > 1:
                return "invalid_request/slot_sharing_refused"
            if (given["status"] == "available" and given["capacity_shape"] == "gpu_slice"
                    and not approved(given.get("capacity_metadata"))):
                return "invalid_request/slot_not_approved"
        if len(set(node.slots) | set(indexes)) > MAX_SLOTS:
            return "invalid_request/too_many_slots"
        for given in slots:
            meta = given.get("capacity_metadata") or {}
            node.slots[given["slot_index"]] = RSlot(given["status"], given["capacity_shape"],
                                                    meta.get("sku"), approved(meta),
                                                    given.get("numa_node"))
        return "ok"

    def record_slot_cleanup(self, node_id: str, slot_index: int, succeeded: bool) -> str:
        node = self.listed(node_id)
        if node is None:
            return "node_not_found"
        slot = node.slots.get(slot_index)
        if slot is None or slot.status != "cleanup":
            return "invalid_request/slot_not_in_cleanup"
        usable = slot.shape != "gpu_slice" or slot.approved
        slot.status = ("available" if usable else "disabled") if succeeded else "cleanup_blocked"
        return "ok"

    # ---- placement (§3.3 filter, §3.4, §5.3) ----------------------------------------
    def _fit(self, node: RNode, sku: RSku, k: int, allocation_id: str) -> Plan | None:
        if not node.schedulable:
            return None
        if sku.shape == "baremetal":
            if (node.sku != sku.name or not self.baremetal_free(node)
                    or claim_id_for(allocation_id, node.id, None) in self.claims):
                return None
            return Plan("ok", (node.id,), "baremetal", sku.name, 1)
        if self.exclusive(node.id):
            return None
        free = sorted(i for i, s in node.slots.items()
                      if s.status == "available" and s.shape == "gpu_slice" and s.sku == sku.name
                      and s.approved and claim_id_for(allocation_id, node.id,
                                                      node_slot_id(node.id, i)) not in self.claims)
        numa = {i: node.slots[i].numa for i in free}
        if sku.topology_key is None:
            fits = len(free) >= k
        else:
            groups = Counter(str(numa[i]) for i in free)
            fits = any(n >= k for n in groups.values())
        return Plan("ok", (node.id,), "gpu_slice", sku.name, k, tuple(free), sku.topology_key,
                    numa) if fits else None

    def _unpinned(self, allocation_id: str, sku: RSku, k: int, exclude: str | None) -> Plan:
        nodes = [n for n in self.nodes.values() if n.listed and n.schedulable and n.id != exclude]
        if sku.shape == "baremetal":
            fits = [n for n in nodes if self._fit(n, sku, k, allocation_id) is not None]
            plain = [n.id for n in fits
                     if not any(s.shape == "gpu_slice" for s in n.slots.values())]
            tier = tuple(sorted(plain or [n.id for n in fits]))
            return Plan("ok", tier, "baremetal", sku.name, 1) if tier else Plan("sku_unavailable")
        nodes = [n for n in nodes if any(s.shape == "gpu_slice" and s.sku == sku.name
                                         for s in n.slots.values())]
        for node in sorted(nodes, key=lambda n: (-len(self.live(n.id)), n.id)):
            plan = self._fit(node, sku, k, allocation_id)
            if plan is not None:
                return plan
        return Plan("sku_unavailable")

    def plan_reserve(self, allocation_id: str, sku: str, count: int, node_id: str | None = None,
                     exclude: str | None = None) -> Plan:
        """Decide a reservation on the current state without changing it."""
        wanted = self.skus.get(sku)
        if wanted is None:
            return Plan("sku_not_found")
        if wanted.shape is None:
            return Plan("invalid_request/sku_not_placeable")
        k = 1
        if wanted.shape == "gpu_slice":
            if count not in wanted.counts:
                return Plan("invalid_request/gpu_count_not_allowed")
            k = count
        if not wanted.active:
            return Plan("sku_unavailable")
        if node_id is not None:
            node = self.listed(node_id)
            if node is None:
                return Plan("node_not_found")
            plan = self._fit(node, wanted, k, allocation_id)
            if plan is not None:
                return plan
            return Plan("node_offline" if not node.schedulable else "node_in_use")
        return self._unpinned(allocation_id, wanted, k, exclude)

    def apply_reserve(self, plan: Plan, allocation_id: str, node_id: str,
                      slot_indexes: list[int]) -> list[str]:
        """Adopt the domain's (checked) choice; returns the new claim ids."""
        assert plan.ok
        plan.check(node_id, slot_indexes)
        node = self.nodes[node_id]
        made = []
        for index in slot_indexes or [None]:
            slot_id = None if index is None else node_slot_id(node_id, index)
            claim_id = claim_id_for(allocation_id, node_id, slot_id)
            assert claim_id not in self.claims, f"claim {claim_id} would be made twice"
            self.claims[claim_id] = RClaim(claim_id, allocation_id, node_id, index,
                                           "slot" if index is not None else "node_exclusive",
                                           plan.sku, "reserved")
            if index is not None:
                node.slots[index].status = "reserved"
            made.append(claim_id)
        return made

    def _movers(self, node_id: str, allocation_id: str, to: str) -> list[RClaim] | None:
        """The allocation's claims on the node that move to ``to`` (None: refused)."""
        mine = [c for c in self.claims.values()
                if c.node_id == node_id and c.allocation_id == allocation_id]
        live = [c for c in mine if c.status in LIVE]
        movers = [c for c in (live or mine) if c.status != to]
        if any(to not in EDGES[c.status] for c in movers):
            return None
        return movers

    def _move(self, node: RNode, claims: list[RClaim], to: str) -> None:
        for claim in claims:
            claim.status = to
            if claim.slot_index is not None:
                node.slots[claim.slot_index].status = "cleanup" if to in TERMINAL else to
        if to in TERMINAL and node.admin_state == "draining" and not self.live(node.id):
            node.admin_state = "cordoned"

    def advance(self, node_id: str, allocation_id: str, to: str) -> str:
        node = self.listed(node_id)
        if node is None:
            return "node_not_found"
        movers = self._movers(node_id, allocation_id, to)
        if movers is None:
            return "invalid_request/invalid_claim_transition"
        self._move(node, movers, to)
        return "ok"

    def fail(self, node_id: str, allocation_id: str) -> str:
        return self.advance(node_id, allocation_id, "failed")

    def release(self, node_id: str, allocation_id: str) -> str:
        """Live claims go (through ``releasing``) to ``released``; their slots to cleanup."""
        node = self.listed(node_id)
        if node is None:
            return "node_not_found"
        live = [c for c in self.live(node_id) if c.allocation_id == allocation_id]
        self._move(node, live, "released")
        return "ok"

    def plan_move(self, allocation_id: str, from_node: str, sku: str, count: int,
                  to_node: str | None) -> Plan:
        plan = self.plan_reserve(allocation_id, sku, count, node_id=to_node, exclude=from_node)
        if not plan.ok:
            return plan
        if plan.nodes == (from_node,):
            return Plan("invalid_request/same_node")
        if self.listed(from_node) is None:
            return Plan("node_not_found")
        return plan

    def apply_move(self, plan: Plan, allocation_id: str, from_node: str, node_id: str,
                   slot_indexes: list[int]) -> None:
        self.apply_reserve(plan, allocation_id, node_id, slot_indexes)
        assert self.release(from_node, allocation_id) == "ok"

    # ---- comparable state and counts ------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"skus": {n: vars(s) for n, s in self.skus.items()},
                "nodes": {i: {**{k: v for k, v in vars(n).items() if k != "slots"},
                              "status": n.status,
                              "slots": {x: vars(s) for x, s in n.slots.items()}}
                          for i, n in self.nodes.items()},
                "hosts": {h: n for h, n in self.hosts.items() if n},
                "claims": {i: vars(c) for i, c in self.claims.items()}}

    def node_counts(self, node_id: str) -> dict[str, int]:
        node = self.nodes[node_id]
        total = len(node.slots)
        free = sum(1 for s in node.slots.values() if self.slot_free(node, s))
        claimed = sum(1 for s in node.slots.values() if s.status in LIVE)
        unavailable = sum(1 for s in node.slots.values()
                          if s.status not in LIVE and not self.slot_free(node, s))
        assert free + claimed + unavailable == total, (node_id, free, claimed, unavailable, total)
        return {"total": total, "free": free, "claimed": claimed, "unavailable": unavailable}

    def sku_counts(self, name: str) -> dict[str, int]:
        sku = self.skus[name]
        free = claimed = unavailable = 0
        if sku.shape == "baremetal":
            nodes = [n for n in self.nodes.values() if n.listed and n.sku == name]
            for n in nodes:
                if self.exclusive(n.id):
                    claimed += 1
                elif sku.active and n.schedulable and self.baremetal_free(n):
                    free += 1
                else:
                    unavailable += 1
            total = len(nodes)
        elif sku.shape == "gpu_slice":
            units = [(n, s) for n in self.nodes.values() if n.listed for s in n.slots.values()
                     if s.shape == "gpu_slice" and s.sku == name]
            for n, s in units:
                if s.status in LIVE:
                    claimed += 1
                elif sku.active and self.slot_free(n, s):
                    free += 1
                else:
                    unavailable += 1
            total = len(units)
        else:
            total = 0
        assert free + claimed + unavailable == total
        return {"total": total, "free": free, "claimed": claimed, "unavailable": unavailable}

    def node_free_units(self, node_id: str) -> int:
        """What the view's ``free_units`` must say: 0 unless schedulable; 1 for a free
        node with no slice history; else its approved available slice slots (none
        under an exclusive claim)."""
        node = self.nodes[node_id]
        if not node.schedulable:
            return 0
        has_slices = any(s.shape == "gpu_slice" for s in node.slots.values())
        if self.baremetal_free(node) and not has_slices:
            return 1
        if self.exclusive(node_id):
            return 0
        return sum(1 for s in node.slots.values()
                   if s.status == "available" and s.shape == "gpu_slice" and s.approved)

    def node_occupancy(self, node_id: str) -> str:
        """§3.2 ``occupancy_status``."""
        node = self.nodes[node_id]
        live = self.live(node_id)
        exclusive = [c for c in live if c.kind == "node_exclusive"]
        if exclusive:
            return {"reserved": "reserved", "provisioning": "assigned", "active": "assigned",
                    "releasing": "releasing"}[exclusive[0].status]
        if live:
            return "assigned"
        if any(s.status in ("cleanup", "cleanup_blocked") for s in node.slots.values()):
            return "cleanup"
        return "available" if node.status in ("active", "cordoned") else "unavailable"


# ---- the real side -------------------------------------------------------------------
class RealAggregates:
    """The app's aggregates as last stored, each reloaded only after a new event of its
    stream (found in the notification log), so checking after every step stays cheap."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.position = 0
        self.loaded: dict[UUID, Any] = {}
        #: node id -> (the aggregate object observed, its RNode and claims)
        self.observed: dict[str, tuple[Any, RNode, list[RClaim]]] = {}

    def refresh(self) -> None:
        top = self.app.recorder.max_notification_id() or 0
        if top > self.position:
            recorder = self.app.recorder
            for item in recorder.select_notifications(self.position + 1, top - self.position):
                self.loaded.pop(item.originator_id, None)
            self.position = top

    def get(self, aggregate_id: UUID | str) -> Any:
        aggregate_id = UUID(str(aggregate_id))
        if aggregate_id not in self.loaded:
            self.loaded[aggregate_id] = self.app.get_or_none(aggregate_id)
        return self.loaded[aggregate_id]


def _observe_node(node_id: str, node: NodeInventory) -> tuple[RNode, list[RClaim]]:
    assert isinstance(node, NodeInventory), f"node {node_id} is missing"
    by_id = {s["id"]: s for s in node.slots.values()}
    seen = RNode(node_id, node.identity["host"], node.identity["sku"], node.admin_state,
                 node.online)
    assert node.status == seen.status, (node.status, node_id)
    for slot_id, slot in node.slots.items():
        assert slot_id == slot["id"] == node_slot_id(node_id, slot["slot_index"])
        meta = slot.get("capacity_metadata") or {}
        seen.slots[slot["slot_index"]] = RSlot(slot["status"], slot["capacity_shape"],
                                               meta.get("sku"), approved(meta),
                                               slot.get("numa_node"))
    claims = []
    for claim_id, claim in node.claims.items():
        assert claim_id == claim["id"] and claim["node_id"] == node_id, claim
        assert claim["claim_kind"] in ("node_exclusive", "slot"), claim
        assert (claim["slot_id"] is None) == (claim["claim_kind"] == "node_exclusive"), claim
        index = None
        if claim["slot_id"] is not None:
            assert claim["slot_id"] in by_id, f"claim {claim_id} on an unknown slot"
            index = by_id[claim["slot_id"]]["slot_index"]
        claims.append(RClaim(claim_id, claim["allocation_id"], node_id, index,
                             claim["claim_kind"], claim["sku"], claim["status"]))
    return seen, claims


def observe(real: RealAggregates, reference: ReferenceInventory) -> ReferenceInventory:
    """The real aggregates (of the reference's nodes, SKUs and hosts) read into the
    reference's shape, strictly: a claim must sit on its own node and on a slot of it.
    The result shares objects with earlier observations: read it, never change it."""
    seen = ReferenceInventory()
    for name in reference.skus:
        sku = real.get(sku_id_for(name))
        assert sku is not None, f"SKU {name} is missing"
        seen.skus[name] = _sku_from_spec(name, sku.spec, sku.active)
    for host in reference.hosts:
        registry = real.get(host_id_for(host))
        seen.hosts[host] = registry.node_id if registry is not None else None
    for node_id in reference.nodes:
        node = real.get(node_id)
        cached = real.observed.get(node_id)
        if cached is None or cached[0] is not node:
            cached = (node, *_observe_node(node_id, node))
            real.observed[node_id] = cached
        seen.nodes[node_id] = cached[1]
        for claim in cached[2]:
            assert claim.id not in seen.claims, f"claim {claim.id} on two nodes"
            seen.claims[claim.id] = claim
    return seen


def check_placement(node: NodeInventory) -> None:
    """(a) no double booking and (b) coherence, on one real node aggregate; and only
    approved slice slots are ever ``available``."""
    live = [c for c in node.claims.values() if c["status"] in LIVE]
    held = Counter(c["slot_id"] for c in live if c["slot_id"] is not None)
    doubled = [s for s, n in held.items() if n > 1]
    assert not doubled, f"node {node.node_id}: slots {doubled} have two live claims"
    if any(c["claim_kind"] == "node_exclusive" for c in live):
        assert len(live) == 1, f"node {node.node_id}: an exclusive claim shares the node: {live}"
    for slot_id, slot in node.slots.items():
        holders = [c for c in live if c["slot_id"] == slot_id]
        where = f"node {node.node_id}: slot {slot['slot_index']} is {slot['status']}"
        if slot["status"] in LIVE:
            assert len(holders) == 1 and holders[0]["status"] == slot["status"], \
                f"{where}, claims {holders}"
        else:
            assert not holders, f"{where} under {holders}"
        if slot["status"] == "available" and slot["capacity_shape"] == "gpu_slice":
            assert slot_is_approved(slot), f"{where} without approved metadata (§3.4 [C])"
    for claim in node.claims.values():
        if claim["status"] in TERMINAL:
            assert claim["released_at"] is not None and claim["released_at"] >= claim["created_at"]
        else:
            assert claim["released_at"] is None


def check_views(node: NodeInventory, seen: ReferenceInventory) -> None:
    """(c) for one listed node: the domain's views agree with the counts defined above
    (computed on the observed state, which (d) then compares with the reference)."""
    node_id = node.node_id
    counts = seen.node_counts(node_id)
    summary = slot_summary(node)
    if counts["total"] == 0:
        assert summary is None
    else:
        assert summary["total"] == counts["total"] == sum(summary[s] for s in SLOT_COUNTERS)
        assert sum(summary[s] for s in LIVE) == counts["claimed"], (summary, counts)
        assert summary["schedulable_available"] == counts["free"], (summary, counts)
        assert summary["schedulable_available"] <= summary["available"]
        for key in ("total", *SLOT_COUNTERS):
            assert sum(group[key] for group in summary["by_sku"]) == summary[key], (key, summary)
        if seen.exclusive(node_id):
            assert summary["schedulable_available"] == 0
    assert free_units(node) == seen.node_free_units(node_id), \
        f"node {node_id}: free_units {free_units(node)} != {seen.node_free_units(node_id)}"
    status, holder = occupancy(node)
    assert status == seen.node_occupancy(node_id), \
        f"node {node_id}: occupancy {status} != {seen.node_occupancy(node_id)}"
    assert (holder is not None) == seen.exclusive(node_id)


class ReplayCheck:
    """(e) a read model's copy of each node, folded from the stored events with the
    aggregate's own code and kept as JSON between events (as a projection stores it)."""

    def __init__(self) -> None:
        self.copies: dict[str, tuple[int, Any]] = {}

    def check(self, app: Any, node: NodeInventory) -> None:
        version, state = self.copies.get(node.node_id, (0, None))
        if version == node.version:
            return
        for event in app.repository.event_store.get(node.id, gt=version or None):
            state = json.loads(json.dumps(state_of(fold(NodeInventory, state, event))))
            version = event.originator_version
        self.copies[node.node_id] = (version, state)
        assert version == node.version
        assert state == json.loads(json.dumps(state_of(node))), \
            f"node {node.node_id}: the folded read model differs from the aggregate"


def check_invariants(app: Any, reference: ReferenceInventory, replay: ReplayCheck | None = None,
                     real: RealAggregates | None = None) -> ReferenceInventory:
    """(a)–(e) for every node, SKU and host the reference knows; returns what was seen.
    Pass the same ``replay`` and ``real`` on every call to check incrementally (a node
    whose stream did not move is not checked again for (a), (b), (e) or its views)."""
    real = real or RealAggregates(app)
    real.refresh()
    replay = replay or ReplayCheck()
    seen = observe(real, reference)
    for node_id in reference.nodes:
        node = real.get(node_id)
        if replay.copies.get(node_id, (0,))[0] != node.version:
            check_placement(node)
            if node.listed:
                check_views(node, seen)
            replay.check(app, node)
        if node.listed:
            counts = seen.node_counts(node_id)
            assert counts == reference.node_counts(node_id), \
                f"node {node_id}: {counts} != reference {reference.node_counts(node_id)}"
    live_on: dict[str, set[str]] = {}
    for claim in seen.claims.values():
        if claim.status in LIVE:
            live_on.setdefault(claim.allocation_id, set()).add(claim.node_id)
    assert all(len(n) == 1 for n in live_on.values()), \
        f"an allocation is live on two nodes: {live_on}"
    for name in reference.skus:
        assert seen.sku_counts(name) == reference.sku_counts(name), \
            f"SKU {name}: {seen.sku_counts(name)} != reference {reference.sku_counts(name)}"
    listing = real.get(DIRECTORY_ID)
    listed = {i: n for i, n in seen.nodes.items() if n.listed}
    assert set(listing.nodes if listing else {}) == set(listed), "the directory lists other nodes"
    for node_id, entry in (listing.nodes if listing else {}).items():
        slice_skus = sorted({s.sku for s in listed[node_id].slots.values()
                             if s.shape == "gpu_slice" and s.sku})
        assert entry["sku"] == listed[node_id].sku and entry["slice_skus"] == slice_skus, entry
    real_state, model = seen.state(), reference.state()
    for part in ("skus", "hosts", "nodes", "claims"):
        assert real_state[part] == model[part], \
            f"{part} differ:\n real {real_state[part]}\nmodel {model[part]}"
    return seen


# ---- one command's changes (§4.3, §4.6, §4.7) ------------------------------------------
def check_step(before: ReferenceInventory, after: ReferenceInventory) -> None:
    """What one command may change, given the real state before and after it.

    - Guarded placement: a new claim's node was ``active`` (admin state active and
      online) and its SKU active; a slot claim took an ``available`` approved slot of
      its SKU on a node without a live exclusive claim; an exclusive claim took a node
      that was baremetal-free.
    - Monotone claims: a claim keeps its identity and only moves along §3.4 (possibly
      several edges, e.g. release); terminal claims never move; no claim disappears.
    - Cleanup safety: a slot that was in a claim state is afterwards in a claim state
      or ``cleanup`` (never straight to ``available``)."""
    for claim_id, claim in before.claims.items():
        assert claim_id in after.claims, f"claim {claim_id} disappeared"
        now = after.claims[claim_id]
        assert (now.allocation_id, now.node_id, now.slot_index, now.kind) == (
            claim.allocation_id, claim.node_id, claim.slot_index, claim.kind), (claim, now)
        assert now.status == claim.status or now.status in _reachable(claim.status), \
            f"claim {claim_id} went {claim.status} -> {now.status}"
    for claim_id, claim in after.claims.items():
        if claim_id in before.claims:
            continue
        node = before.nodes.get(claim.node_id)
        assert node is not None and node.status == "active" and node.schedulable, \
            f"claim {claim_id} made on a node that was {node and node.status}"
        assert before.skus[claim.sku].active, f"claim {claim_id} on inactive SKU {claim.sku}"
        assert claim.status == "reserved"
        if claim.kind == "slot":
            slot = node.slots.get(claim.slot_index)
            assert slot is not None and slot.status == "available" and slot.approved \
                and slot.shape == "gpu_slice" and slot.sku == claim.sku \
                and not before.exclusive(node.id), f"claim {claim_id} took slot {slot}"
        else:
            assert before.baremetal_free(node) and node.sku == claim.sku, \
                f"exclusive claim {claim_id} on a node that was not free"
    for node_id, node in before.nodes.items():
        for index, slot in node.slots.items():
            if slot.status in LIVE:
                now = after.nodes[node_id].slots[index].status
                assert now in LIVE or now == "cleanup", \
                    f"slot {index} of {node_id} went {slot.status} -> {now}"


def _reachable(status: str) -> set[str]:
    seen, todo = set(), list(EDGES[status])
    while todo:
        nxt = todo.pop()
        if nxt not in seen:
            seen.add(nxt)
            todo += EDGES[nxt]
    return seen


__all__ = ["ReferenceInventory", "Plan", "RealAggregates", "ReplayCheck", "approved",
           "check_invariants", "check_views",
           "check_step", "check_placement", "observe", "LIVE", "TERMINAL", "EDGES"]

