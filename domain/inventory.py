"""Node inventory: a node's identity, lifecycle, resource slots and placement claims.

One ``NodeInventory`` stream per node holds everything placement correctness ranges
over: its slots and the claims on them. Every guard (one live claim per slot, an
exclusive claim excludes all others, no new claim on a node that is not schedulable)
is decided on the loaded aggregate and saved at the next version, so the version is
the node's placement generation: two writers that decided from the same state cannot
both save. ``HostRegistry`` keeps one live node per host; ``NodeDirectory`` is the
authoritative list of nodes placement searches (with each node's SKU and slice SKUs).

State is kept JSON-shaped (ids and times as strings) so that read models can fold the
same events with the same code.

Public ``status`` = ``offline`` when the node is unreachable while ``active`` or
``cordoned``, else its administrative state; a cordoned node that goes offline comes
back cordoned.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate

from domain.skus import NAMESPACE, iso, refusal

LIVE = ("reserved", "provisioning", "active", "releasing")
TERMINAL = ("released", "failed")
#: claim status -> where it may go next (inventory-and-placement §3.4)
CLAIM_EDGES = {"reserved": ("provisioning", "releasing", "failed"),
               "provisioning": ("active", "releasing", "failed"),
               "active": ("releasing",), "releasing": ("released",)}
SLOT_STATUSES = ("available", "reserved", "provisioning", "active", "releasing", "cleanup",
                 "cleanup_blocked", "failed", "disabled")
#: statuses an operator may set by hand (on an unclaimed slot only)
OPERATOR_SLOT_STATUSES = ("available", "cleanup", "cleanup_blocked", "disabled")
MAX_SLOTS = 64
APPROVAL_KEYS = ("storage_ownership", "destructive_wipe_policy", "fabric_claim_mode",
                 "fabric_vf_pci_address")
#: administrative states from which a node may be retired
RETIRABLE = ("active", "cordoned", "draining")
TOMBSTONE = "removed"


def node_slot_id(node_id: UUID | str, slot_index: int) -> str:
    return str(uuid5(NAMESPACE, f"{node_id}:slot:{slot_index}"))


def claim_id_for(allocation_id: UUID | str, node_id: UUID | str, slot_id: str | None) -> str:
    return str(uuid5(NAMESPACE, f"{allocation_id}:{node_id}:{slot_id or 'node'}"))


def host_id_for(host: str) -> UUID:
    return uuid5(NAMESPACE, f"host:{host.strip().lower()}")


DIRECTORY_ID = uuid5(NAMESPACE, "node-directory")


def slot_is_approved(slot: dict[str, Any]) -> bool:
    """The contract's approval rule for a whole-GPU slice slot to be ``available``."""
    meta = slot.get("capacity_metadata") or {}
    return (meta.get("storage_ownership") == "slice"
            and bool(meta.get("destructive_wipe_policy"))
            and meta.get("fabric_claim_mode") == "per_slot_vf"
            and bool(meta.get("fabric_vf_pci_address")))


def slot_sku(slot: dict[str, Any]) -> str | None:
    """A slot's SKU lives in its capacity metadata (it keeps slice SKUs apart from the
    node SKU)."""
    return (slot.get("capacity_metadata") or {}).get("sku")


class NodeInventory(Aggregate):
    TOPIC = "ledgercore.NodeInventory"

    class Created(Aggregate.Created):
        """The node was registered."""

        TOPIC = "ledgercore.NodeRegistered"
        identity: dict[str, Any]
        admin_state: str
        online: bool
        provenance: dict[str, Any]

    class LivenessObserved(Aggregate.Event):
        TOPIC = "ledgercore.NodeLivenessObserved"
        online: bool
        source: str

        def apply(self, n: NodeInventory) -> None:
            n.online = self.online
            n.liveness_at = iso(self.timestamp)

    class Cordoned(Aggregate.Event):
        TOPIC = "ledgercore.NodeCordoned"
        previous_status: str
        provenance: dict[str, Any]

        def apply(self, n: NodeInventory) -> None:
            n.admin_state = "cordoned"

    class SchedulingResumed(Aggregate.Event):
        TOPIC = "ledgercore.NodeSchedulingResumed"
        previous_status: str
        provenance: dict[str, Any]

        def apply(self, n: NodeInventory) -> None:
            n.admin_state = "active"

    class DrainStarted(Aggregate.Event):
        TOPIC = "ledgercore.NodeDrainStarted"
        task_id: str
        previous_status: str
        provenance: dict[str, Any]

        def apply(self, n: NodeInventory) -> None:
            n.admin_state, n.drain_task_id = "draining", self.task_id

    class DrainCompleted(Aggregate.Event):
        """The last live claim of a draining node ended (or there was none)."""

        TOPIC = "ledgercore.NodeDrainCompleted"
        task_id: str

        def apply(self, n: NodeInventory) -> None:
            n.admin_state, n.drain_task_id = "cordoned", None

    class Retired(Aggregate.Event):
        TOPIC = "ledgercore.NodeRetired"
        previous_status: str
        provenance: dict[str, Any]

        def apply(self, n: NodeInventory) -> None:
            n.admin_state, n.drain_task_id = "retired", None

    class Reactivated(Aggregate.Event):
        """Back from retired with the same identity; offline until a probe sees it."""

        TOPIC = "ledgercore.NodeReactivated"
        provenance: dict[str, Any]

        def apply(self, n: NodeInventory) -> None:
            n.admin_state, n.online = "active", False

    class Tombstoned(Aggregate.Event):
        TOPIC = "ledgercore.NodeTombstoned"
        how: str  # removed | detached | force_detached
        previous_status: str
        provenance: dict[str, Any]

        def apply(self, n: NodeInventory) -> None:
            n.admin_state, n.drain_task_id = TOMBSTONE, None

    class SlotsUpserted(Aggregate.Event):
        TOPIC = "ledgercore.NodeSlotsUpserted"
        slots: list[dict[str, Any]]
        provenance: dict[str, Any]

        def apply(self, n: NodeInventory) -> None:
            for slot in self.slots:
                n.slots[slot["id"]] = dict(slot)

    class ClaimsReserved(Aggregate.Event):
        TOPIC = "ledgercore.PlacementClaimsReserved"
        allocation_id: str
        claims: list[dict[str, Any]]
        backfill: bool
        provenance: dict[str, Any]

        def apply(self, n: NodeInventory) -> None:
            at = iso(self.timestamp)
            for claim in self.claims:
                n.claims[claim["id"]] = {**claim, "created_at": at, "released_at": None}
                if claim["slot_id"]:
                    n._slot_follows(claim["slot_id"], claim["status"], at)

    class ClaimsMoved(Aggregate.Event):
        """Claims went from one status to the next along §3.4 (released/failed
        included); their slots follow (a slot whose claim ended goes to cleanup)."""

        TOPIC = "ledgercore.PlacementClaimsMoved"
        allocation_id: str
        claim_ids: list[str]
        to: str
        reason: str | None
        provenance: dict[str, Any]

        def apply(self, n: NodeInventory) -> None:
            at = iso(self.timestamp)
            for claim_id in self.claim_ids:
                claim = n.claims[claim_id]
                claim["status"] = self.to
                if self.to in TERMINAL:
                    claim["released_at"] = at
                if claim["slot_id"]:
                    n._slot_follows(claim["slot_id"], "cleanup" if self.to in TERMINAL else self.to, at)

    class SlotCleanupRecorded(Aggregate.Event):
        TOPIC = "ledgercore.SlotCleanupRecorded"
        slot_id: str
        outcome: str  # available | cleanup_blocked
        provenance: dict[str, Any]

        def apply(self, n: NodeInventory) -> None:
            n._slot_follows(self.slot_id, self.outcome, iso(self.timestamp))

    def __init__(self, identity: dict[str, Any], admin_state: str, online: bool,
                 provenance: dict[str, Any]):
        self.identity = dict(identity)
        self.admin_state, self.online = admin_state, online
        self.liveness_at: str | None = None
        self.drain_task_id: str | None = None
        self.slots: dict[str, dict[str, Any]] = {}
        self.claims: dict[str, dict[str, Any]] = {}

    def _slot_follows(self, slot_id: str, status: str, at: str) -> None:
        self.slots[slot_id] = {**self.slots[slot_id], "status": status, "updated_at": at}

    # ---- derived facts ----------------------------------------------------------------
    @property
    def node_id(self) -> str:
        return str(self.id)

    @property
    def status(self) -> str:
        if not self.online and self.admin_state in ("active", "cordoned"):
            return "offline"
        return self.admin_state

    @property
    def listed(self) -> bool:
        return self.admin_state != TOMBSTONE

    def live_claims(self, allocation_id: str | None = None) -> list[dict[str, Any]]:
        return [c for c in self.claims.values() if c["status"] in LIVE
                and (allocation_id is None or c["allocation_id"] == allocation_id)]

    def claims_of(self, allocation_id: str) -> list[dict[str, Any]]:
        return [c for c in self.claims.values() if c["allocation_id"] == allocation_id]

    @property
    def has_exclusive_claim(self) -> bool:
        return any(c["claim_kind"] == "node_exclusive" for c in self.live_claims())

    @property
    def schedulable_status(self) -> bool:
        """Active and reachable: the only status that gains claims."""
        return self.admin_state == "active" and self.online

    def baremetal_free(self) -> bool:
        """A free baremetal unit: no live claim, every slot available or disabled."""
        return (not self.live_claims()
                and all(s["status"] in ("available", "disabled") for s in self.slots.values()))

    def free_slice_slots(self, sku: str) -> list[dict[str, Any]]:
        """Slots that pass the slice filter for ``sku`` (node-level checks excluded)."""
        if self.has_exclusive_claim:
            return []
        return sorted((s for s in self.slots.values()
                       if s["status"] == "available" and s["capacity_shape"] == "gpu_slice"
                       and slot_sku(s) == sku and slot_is_approved(s)),
                      key=lambda s: s["slot_index"])

    @property
    def has_slice_history(self) -> bool:
        return any(s["capacity_shape"] == "gpu_slice" for s in self.slots.values())

    def slice_skus(self) -> list[str]:
        return sorted({slot_sku(s) for s in self.slots.values()
                       if s["capacity_shape"] == "gpu_slice" and slot_sku(s)})

    def guard_listed(self) -> None:
        if not self.listed:
            raise refusal("node_not_found", "not_found", "node not found", node_id=self.node_id)

    def guard_state(self, allowed: tuple[str, ...], action: str) -> None:
        if self.status not in allowed and self.status == "offline":
            raise refusal("node_offline", "conflict", f"cannot {action} a node that is offline",
                          node_id=self.node_id)
        if self.status not in allowed:
            raise refusal("invalid_request", "conflict",
                          f"cannot {action} a node that is {self.status}",
                          reason="invalid_node_state", status=self.status)

    def guard_no_live_claims(self, action: str) -> None:
        live = self.live_claims()
        if live:
            raise refusal("node_in_use", "conflict",
                          f"cannot {action} a node with live placement claims",
                          live_claim_count=len(live))


class HostRegistry(Aggregate):
    """The node a host is bound to: one live node per host."""

    TOPIC = "ledgercore.HostRegistry"

    class Created(Aggregate.Created):
        TOPIC = "ledgercore.HostRegistryOpened"
        host: str

    class Bound(Aggregate.Event):
        TOPIC = "ledgercore.HostBound"
        node_id: str

        def apply(self, h: HostRegistry) -> None:
            h.node_id = self.node_id

    class Unbound(Aggregate.Event):
        TOPIC = "ledgercore.HostUnbound"
        node_id: str

        def apply(self, h: HostRegistry) -> None:
            h.node_id = None

    def __init__(self, host: str):
        self.host = host
        self.node_id: str | None = None


class NodeDirectory(Aggregate):
    """Every listed node with the SKUs it can serve: where placement looks. Changed only
    by node registration, slot upserts that change a node's slice SKUs, and removal."""

    TOPIC = "ledgercore.NodeDirectory"

    class Created(Aggregate.Created):
        TOPIC = "ledgercore.NodeDirectoryOpened"

    class Listed(Aggregate.Event):
        TOPIC = "ledgercore.NodeListed"
        node_id: str
        sku: str
        region_code: str
        slice_skus: list[str]

        def apply(self, d: NodeDirectory) -> None:
            d.nodes[self.node_id] = {"sku": self.sku, "region_code": self.region_code,
                                     "slice_skus": list(self.slice_skus)}

    class Unlisted(Aggregate.Event):
        TOPIC = "ledgercore.NodeUnlisted"
        node_id: str

        def apply(self, d: NodeDirectory) -> None:
            d.nodes.pop(self.node_id, None)

    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, Any]] = {}

    def serving(self, sku: str, shape: str, region_code: str | None) -> list[str]:
        return sorted(node_id for node_id, entry in self.nodes.items()
                      if (region_code is None or entry["region_code"] == region_code)
                      and ((shape == "baremetal" and entry["sku"] == sku)
                           or (shape == "gpu_slice" and sku in entry["slice_skus"])))


# ---- folding events outside the event store (read models) ------------------------------
def state_of(aggregate: Aggregate) -> dict[str, Any]:
    """An aggregate's state as JSON-ready data (``restore`` brings it back)."""
    state = {k: v for k, v in vars(aggregate).items() if k != "_pending_events"}
    state["_id"] = str(state["_id"])
    state["_created_on"] = state["_created_on"].isoformat()
    state["_modified_on"] = state["_modified_on"].isoformat()
    return state


def restore(cls: type[Aggregate], state: dict[str, Any]) -> Any:
    aggregate = object.__new__(cls)
    aggregate.__dict__.update(state)
    aggregate.__dict__.update(_id=UUID(state["_id"]), _pending_events=[],
                              _created_on=datetime.fromisoformat(state["_created_on"]),
                              _modified_on=datetime.fromisoformat(state["_modified_on"]))
    return aggregate


def fold(cls: type[Aggregate], state: dict[str, Any] | None, event: Any) -> Any:
    """Apply one stored event to a state from ``state_of`` (None before the first):
    a read model's copy of an aggregate, moved by the aggregate's own code."""
    if state is None:
        return event.mutate(None)
    aggregate = restore(cls, state)
    event.mutate(aggregate)
    return aggregate
