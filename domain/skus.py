"""SKUs and the allocation concurrency policy.

A ``Sku`` is the catalog entry placement and rating work from: its class, units,
resources and price. A new SKU starts inactive; an inactive SKU takes no new claims.
There is no delete. The ``AllocationConcurrencyPolicy`` is the one global per-user cap;
each PUT is a new version whose ``effective_at`` is its commit time.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate

from domain.commands import Command, Render, Session
from domain.errors import DomainError
from domain.money import Money, is_known_currency
from domain.provenance import CommandContext

NAMESPACE = uuid5(NAMESPACE_URL, "https://ledgercore.invalid/inventory")
RESOURCE_CLASSES = ("gpu_baremetal", "gpu_slice", "cpu_vm", "cpu_baremetal", "control_plane")
#: the placement shape each schedulable class is claimed with (others are not placed here)
SHAPE_OF_CLASS = {"gpu_baremetal": "baremetal", "cpu_baremetal": "baremetal", "gpu_slice": "gpu_slice"}
#: fields a SKU may not change while it has live claims
PLACEMENT_FIELDS = ("resource_class", "billing_unit", "scheduling_unit")


def refusal(code: str, kind: str, message: str, **details: Any) -> DomainError:
    """A ``DomainError`` with a contract error code and the kind of refusal it is."""
    error = DomainError(message, **details)
    error.code, error.kind = code, kind
    return error


def sku_id_for(sku: str) -> UUID:
    return uuid5(NAMESPACE, f"sku:{sku}")


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


class Sku(Aggregate):
    TOPIC = "ledgercore.Sku"

    class Created(Aggregate.Created):
        TOPIC = "ledgercore.SkuCreated"
        sku: str
        spec: dict[str, Any]
        provenance: dict[str, Any]

    class Updated(Aggregate.Event):
        TOPIC = "ledgercore.SkuUpdated"
        before: dict[str, Any]
        after: dict[str, Any]
        provenance: dict[str, Any]

        def apply(self, s: Sku) -> None:
            s.spec = dict(self.after)

    class Activated(Aggregate.Event):
        TOPIC = "ledgercore.SkuActivated"
        provenance: dict[str, Any]

        def apply(self, s: Sku) -> None:
            s.active = True

    class Deactivated(Aggregate.Event):
        TOPIC = "ledgercore.SkuDeactivated"
        provenance: dict[str, Any]

        def apply(self, s: Sku) -> None:
            s.active = False

    def __init__(self, sku: str, spec: dict[str, Any], provenance: dict[str, Any]):
        self.sku, self.spec, self.active = sku, dict(spec), False

    @property
    def shape(self) -> str | None:
        return SHAPE_OF_CLASS.get(self.spec["resource_class"])

    @property
    def unit_price(self) -> Money:
        price = self.spec["unit_price"]
        return Money(price["amount_minor"], price["currency"])

    def as_admin(self) -> dict[str, Any]:
        return admin_sku_json(self.sku, self.spec, self.active)


def admin_sku_json(sku: str, spec: dict[str, Any], active: bool) -> dict[str, Any]:
    """The contract's ``AdminSku``."""
    family_id = spec.get("family_id") or sku
    body = {"sku": sku, "vendor": spec["vendor"], "display_name": spec["display_name"],
            "family_id": family_id, "family_version": spec.get("family_version") or "1",
            "family_display_name": spec.get("family_display_name") or spec["display_name"],
            "resource_class": spec["resource_class"], "billing_unit": spec["billing_unit"],
            "scheduling_unit": spec["scheduling_unit"], "resources": spec["resources"],
            "resource_profile": spec.get("resource_profile") or {}, "active": active,
            "unit_price": spec["unit_price"]}
    if spec.get("runtime_provider"):
        body["runtime_provider"] = spec["runtime_provider"]
    return body


def public_sku_json(sku: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The contract's ``Sku`` (the public catalog shows active SKUs only)."""
    return {"sku": sku, "vendor": spec["vendor"], "name": spec["display_name"],
            "resource_class": spec["resource_class"], "billing_unit": spec["billing_unit"],
            "scheduling_unit": spec["scheduling_unit"], "resources": spec["resources"],
            "unit_price": spec["unit_price"]}


def _validate_spec(spec: dict[str, Any]) -> None:
    resources = spec["resources"]
    counts = resources.get("allowed_accelerator_counts") or []
    if spec["resource_class"] == "gpu_slice":
        if spec["scheduling_unit"] != "slice":
            raise refusal("invalid_request", "invalid", "a gpu_slice SKU is scheduled by slice",
                          reason="invalid_sku_units", field="scheduling_unit")
        if not counts:
            raise refusal("invalid_request", "invalid",
                          "a gpu_slice SKU needs allowed_accelerator_counts",
                          reason="invalid_sku_resources", field="resources.allowed_accelerator_counts")
    if spec["resource_class"] in ("gpu_baremetal", "cpu_baremetal") and spec["scheduling_unit"] != "node":
        raise refusal("invalid_request", "invalid", "a baremetal SKU is scheduled by node",
                      reason="invalid_sku_units", field="scheduling_unit")
    if len(set(counts)) != len(counts):
        raise refusal("invalid_request", "invalid", "allowed_accelerator_counts has duplicates",
                      reason="invalid_sku_resources", field="resources.allowed_accelerator_counts")
    if not is_known_currency(spec["unit_price"]["currency"]):
        raise refusal("invalid_request", "invalid", "unit_price.currency is not an ISO 4217 currency",
                      reason="unknown_currency", field="unit_price.currency")


def create_sku(ctx: CommandContext, *, sku: str, spec: dict[str, Any], render: Render) -> Command:
    """``adminCreateSku``: a new SKU, inactive until activated."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        if session.get(sku_id_for(sku)) is not None:
            raise refusal("invalid_request", "conflict", f"SKU {sku!r} already exists",
                          reason="sku_already_exists")
        _validate_spec(spec)
        created = Sku._create(Sku.Created, id=sku_id_for(sku), sku=sku, spec=spec,
                              provenance=ctx.provenance(), timestamp=ctx.now)
        return [created], created.as_admin()

    return Command(ctx, decide, render)


def update_sku(ctx: CommandContext, *, sku: str, spec: dict[str, Any],
               live_claims: Any, render: Render) -> Command:
    """``adminUpdateSku`` (a full body). ``live_claims(session, sku)`` says whether any
    node holds a live claim for the SKU; while one does, the placement fields stay."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        current = get_sku(session, sku, kind="not_found")
        _validate_spec(spec)
        moved = [f for f in PLACEMENT_FIELDS if current.spec[f] != spec[f]]
        if moved and live_claims(session, sku):
            raise refusal("invalid_request", "invalid",
                          "the SKU has live placement claims; its class and units cannot change",
                          reason="sku_has_live_claims", fields=moved)
        if spec != current.spec:
            current.trigger_event(Sku.Updated, before=current.spec, after=spec,
                                  provenance=ctx.provenance(), timestamp=ctx.now)
        return [current], current.as_admin()

    return Command(ctx, decide, render)


def set_sku_active(ctx: CommandContext, *, sku: str, active: bool, render: Render) -> Command:
    """``adminActivateSku`` / ``adminDeactivateSku``: idempotent toggles."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        current = get_sku(session, sku, kind="not_found")
        if current.active != active:
            current.trigger_event(Sku.Activated if active else Sku.Deactivated,
                                  provenance=ctx.provenance(), timestamp=ctx.now)
        return [current], current.as_admin()

    return Command(ctx, decide, render)


def get_sku(session: Session, sku: str, *, kind: str) -> Sku:
    found = session.get(sku_id_for(sku))
    if found is None:
        raise refusal("sku_not_found", kind, f"SKU {sku!r} does not exist", sku=sku)
    return found


# ---- the allocation concurrency policy ---------------------------------------------------
POLICY_KEY = "allocation.max_concurrent_per_user"
POLICY_ID = uuid5(NAMESPACE, f"policy:{POLICY_KEY}")
POLICY_DESCRIPTION = "Maximum number of concurrent live allocations per user."
DEFAULT_MAX_CONCURRENT = 5
BOUNDS = {"min_value": 1, "max_value": 1000}


class AllocationConcurrencyPolicy(Aggregate):
    TOPIC = "ledgercore.AllocationConcurrencyPolicy"

    class Created(Aggregate.Created):
        TOPIC = "ledgercore.AllocationConcurrencyPolicyOpened"

    class Set(Aggregate.Event):
        TOPIC = "ledgercore.ConcurrencyPolicySet"
        value: int
        previous_value: int
        reason: str | None
        provenance: dict[str, Any]

        def apply(self, p: AllocationConcurrencyPolicy) -> None:
            p.value, p.reason = self.value, self.reason
            p.effective_at = iso(self.timestamp)
            p.created_by = self.provenance.get("actor_id")
            p.correlation_id = self.provenance.get("correlation_id")

    def __init__(self) -> None:
        self.value, self.reason = DEFAULT_MAX_CONCURRENT, None
        self.effective_at: str | None = None
        self.created_by: str | None = None
        self.correlation_id: str | None = None


def policy_json(value: int, effective_at: str | None, created_by: str | None,
                reason: str | None, correlation: str | None) -> dict[str, Any]:
    """The contract's ``AdminAllocationConcurrencyPolicy`` (the default when never set)."""
    moment = effective_at or "1970-01-01T00:00:00Z"
    try:
        created_by = str(UUID(created_by)) if created_by else None
    except ValueError:
        created_by = None
    return {"policy_key": POLICY_KEY, "description": POLICY_DESCRIPTION, "value_type": "integer",
            "scope_type": "global", "value": value, "default_value": DEFAULT_MAX_CONCURRENT,
            "bounds": dict(BOUNDS), "effective_at": moment, "created_at": moment,
            "created_by_user_id": created_by, "reason": reason, "correlation_id": correlation}


def current_policy(session: Session) -> int:
    policy = session.get(POLICY_ID)
    return DEFAULT_MAX_CONCURRENT if policy is None else policy.value


def set_concurrency_policy(ctx: CommandContext, *, value: int, reason: str | None,
                           render: Render) -> Command:
    """``adminSetAllocationConcurrencyPolicy``: lowering it releases nothing."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        if not BOUNDS["min_value"] <= value <= BOUNDS["max_value"]:
            raise refusal("validation_error", "invalid", "value is outside the policy bounds",
                          fields=[{"location": "body", "field": "value", "reason": "out_of_bounds",
                                   "message": f"must be within {BOUNDS}"}])
        policy = session.get(POLICY_ID)
        if policy is None:
            policy = AllocationConcurrencyPolicy._create(
                AllocationConcurrencyPolicy.Created, id=POLICY_ID, timestamp=ctx.now)
        policy.trigger_event(AllocationConcurrencyPolicy.Set, value=value,
                             previous_value=policy.value, reason=reason,
                             provenance=ctx.provenance(), timestamp=ctx.now)
        return [policy], policy_json(policy.value, policy.effective_at, policy.created_by,
                                     policy.reason, policy.correlation_id)

    return Command(ctx, decide, render)
