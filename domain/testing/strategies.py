"""Hypothesis strategies for valid and deliberately invalid commands of every area.

Valid strategies draw request bodies the contract's schema accepts (and, with the
defaults, the service accepts too); each ``invalid_*`` strategy draws a body that
breaks exactly one rule of the contract's schema for that operation (so the service
answers ``400 validation_error``, never 422), by taking a valid body and replacing or
adding one field. They are plain ``SearchStrategy`` values built from ``st.*``
primitives, so they compose (``st.lists``, ``.map``, ``st.one_of``) and shrink toward
small, readable examples. Semantically wrong but well-formed values (a currency ISO
4217 does not know, a SKU nobody created) have their own strategies.

Areas: money; billing movements and payment-provider webhooks; nodes, slots and SKUs;
allocation and app-instance lifecycles; node-agent reports (delivered in any order,
repeated).

May import: ``hypothesis`` and ``domain`` only.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar
from uuid import UUID

from hypothesis import strategies as st

from domain.money import INT64_MAX

T = TypeVar("T")
Body = dict[str, Any]

# ---- combinators -------------------------------------------------------------------------

#: values that are not integers, for integer fields (JSON-serializable)
NOT_INTEGERS = st.one_of(st.floats(allow_nan=False, allow_infinity=False).filter(
    lambda f: f != int(f)), st.text(max_size=5), st.booleans(), st.none())
NOT_STRINGS = st.one_of(st.integers(), st.booleans(), st.none(), st.lists(st.integers(), max_size=2))


def breaking_one(valid: st.SearchStrategy[Body],
                 breakers: list[tuple[str, st.SearchStrategy[Any]]]) -> st.SearchStrategy[Body]:
    """Bodies drawn from ``valid`` with exactly one field replaced (or added) by a value
    from its breaker. A breaker value of ``DROP`` removes the field instead."""

    @st.composite
    def build(draw: Any) -> Body:
        body = dict(draw(valid))
        field, values = draw(st.sampled_from(breakers))
        value = draw(values)
        if value is DROP:
            body.pop(field, None)
        else:
            body[field] = value
        return body

    return build()


DROP = object()
#: a breaker that removes a required field
MISSING = st.just(DROP)


def in_any_order(items: list[T], *, repeats: bool = True) -> st.SearchStrategy[list[T]]:
    """``items`` shuffled, and (``repeats``) with some of them delivered more than once,
    as a provider or an agent may redeliver: every item appears at least once."""
    if not items:
        return st.just([])
    extra = st.lists(st.sampled_from(items), max_size=len(items)) if repeats else st.just([])
    return st.tuples(st.permutations(items), extra, st.randoms(use_true_random=False)).map(
        lambda t: _shuffled(list(t[0]) + list(t[1]), t[2]))


def _shuffled(items: list[T], rnd: Any) -> list[T]:
    rnd.shuffle(items)
    return items


# ---- money -------------------------------------------------------------------------------

#: currencies with 2, 0 and 3 minor-unit digits
CURRENCIES = ("USD", "EUR", "AED", "JPY", "KWD")


def currencies() -> st.SearchStrategy[str]:
    return st.sampled_from(CURRENCIES)


def unknown_currencies() -> st.SearchStrategy[str]:
    """Three upper-case letters (the schema's pattern) that ISO 4217 does not know."""
    return st.sampled_from(["ZZZ", "XYZ", "ABC", "QQQ"])


def amounts(max_minor: int = 10**12) -> st.SearchStrategy[int]:
    """Positive amounts in minor units (integers: money is never a float)."""
    return st.integers(min_value=1, max_value=max_minor)


def amounts_near_limits() -> st.SearchStrategy[int]:
    """Small amounts and amounts near the int64 ceiling (balance overflow)."""
    return st.one_of(amounts(10**6), st.integers(INT64_MAX // 2, INT64_MAX))


def money(max_minor: int = 10**12) -> st.SearchStrategy[Body]:
    """The contract's ``Money``: ``{"amount_minor": int, "currency": "USD"}``."""
    return st.fixed_dictionaries({"amount_minor": amounts(max_minor), "currency": currencies()})


def invalid_money() -> st.SearchStrategy[Body]:
    return breaking_one(money(), [
        ("amount_minor", NOT_INTEGERS), ("amount_minor", MISSING),
        ("currency", st.text(max_size=6).filter(lambda s: not _iso_shaped(s))),
        ("currency", MISSING), ("extra", st.just(1))])


def _iso_shaped(code: str) -> bool:
    return len(code) == 3 and code.isascii() and code.isalpha() and code.isupper()


# ---- billing movements -------------------------------------------------------------------


def adjustments(max_minor: int = 10**12) -> st.SearchStrategy[Body]:
    """Valid ``AdminAdjustBalanceRequest`` bodies."""
    return st.fixed_dictionaries({
        "direction": st.sampled_from(["credit", "debit"]),
        "amount_minor": amounts(max_minor),
        "currency": currencies(),
        "reason": st.text(min_size=1, max_size=40),
    })


def invalid_adjustments() -> st.SearchStrategy[Body]:
    """Bodies the contract's schema rejects: each breaks exactly one rule."""
    return breaking_one(adjustments(), [
        ("amount_minor", st.integers(max_value=0)),
        ("amount_minor", NOT_INTEGERS),
        ("amount_minor", MISSING),
        ("currency", st.text(max_size=6).filter(lambda s: not _iso_shaped(s))),
        ("direction", st.text(max_size=10).filter(lambda s: s not in ("credit", "debit"))),
        ("reason", NOT_STRINGS),
        ("reason", MISSING),
        ("unknown_field", st.just(1)),
    ])


def charge_sessions(max_minor: int = 10**9) -> st.SearchStrategy[Body]:
    """Valid ``CreateChargeSessionRequest`` bodies (a user starts paying)."""
    return st.fixed_dictionaries({"amount_minor": amounts(max_minor), "currency": currencies()})


def invalid_charge_sessions() -> st.SearchStrategy[Body]:
    return breaking_one(charge_sessions(), [
        ("amount_minor", st.integers(max_value=0)), ("amount_minor", NOT_INTEGERS),
        ("amount_minor", MISSING),
        ("currency", st.text(max_size=6).filter(lambda s: not _iso_shaped(s))),
        ("tip", st.just(1))])


RECONCILE_ACTIONS = ("post_credit", "mark_expired", "mark_failed")


def reconciliations() -> st.SearchStrategy[Body]:
    """Valid ``AdminReconcilePaymentSessionRequest`` bodies (an operator's action)."""
    return st.fixed_dictionaries(
        {"action": st.sampled_from(RECONCILE_ACTIONS),
         "reason": st.text(min_size=3, max_size=30)},
        optional={"amount_minor": amounts(10**6)})


def invalid_reconciliations() -> st.SearchStrategy[Body]:
    return breaking_one(reconciliations(), [
        ("action", st.text(max_size=12).filter(lambda s: s not in RECONCILE_ACTIONS)),
        ("action", MISSING), ("reason", st.text(max_size=2)), ("reason", MISSING),
        ("amount_minor", st.integers(max_value=0)), ("amount_minor", NOT_INTEGERS),
        ("note", st.just("x"))])


# ---- payment-provider webhooks -------------------------------------------------------------


def provider_event_ids() -> st.SearchStrategy[str]:
    """Fresh-looking provider event ids (``evt_…``); draw once and reuse for redelivery."""
    return st.text("0123456789abcdef", min_size=8, max_size=24).map(lambda s: f"evt_{s}")


def checkout_event(event_id: str, kind: str, payment_session_id: UUID | str,
                   amount_minor: int | None = None, currency: str = "USD",
                   payment_intent: str | None = None) -> Body:
    """The provider's ``checkout.session.completed`` / ``.expired`` event, as its
    webhook body (sign the JSON with ``api.webhooks.sign`` before sending)."""
    obj: Body = {"id": f"cs_{UUID(str(payment_session_id)).hex}", "object": "checkout.session",
                 "client_reference_id": str(payment_session_id),
                 "metadata": {"payment_session_id": str(payment_session_id)}}
    if kind == "completed":
        obj.update(amount_total=amount_minor, currency=currency.lower(), payment_status="paid",
                   payment_intent=payment_intent)
    return {"id": event_id, "type": f"checkout.session.{kind}", "data": {"object": obj}}


def checkout_events(payment_session_id: UUID | str, amount_minor: int, currency: str
                    ) -> st.SearchStrategy[Body]:
    """A checkout's provider events: completed with the requested amount (mostly) or
    another one, or expired."""
    return st.builds(
        lambda event_id, kind, exact, other: checkout_event(
            event_id, kind, payment_session_id, amount_minor if exact else other, currency),
        provider_event_ids(), st.sampled_from(["completed", "completed", "expired"]),
        st.booleans() | st.just(True), amounts(10**9))


DISPUTE_STATUSES = ("warning_needs_response", "needs_response", "under_review", "won", "lost",
                    "warning_closed")


def dispute_event(event_id: str, dispute_id: str, payment_intent: str, status: str,
                  amount_minor: int, currency: str = "USD") -> Body:
    """A ``charge.dispute.updated`` webhook body."""
    return {"id": event_id, "type": "charge.dispute.updated", "data": {"object": {
        "id": dispute_id, "object": "dispute", "status": status, "amount": amount_minor,
        "currency": currency.lower(), "payment_intent": payment_intent}}}


def dispute_events(payment_intent: str, amount_minor: int, currency: str = "USD"
                   ) -> st.SearchStrategy[Body]:
    return st.builds(
        lambda event_id, n, status: dispute_event(event_id, f"dp_{payment_intent}_{n}",
                                                  payment_intent, status, amount_minor, currency),
        provider_event_ids(), st.integers(0, 1), st.sampled_from(DISPUTE_STATUSES))


def invalid_webhook_bodies() -> st.SearchStrategy[Any]:
    """Webhook bodies that are not provider events (no id or type, not an object) or
    carry a checkout amount that is not money: answered 400, nothing recorded."""
    session = "00000000-0000-4000-8000-000000000001"
    return st.one_of(
        st.lists(st.integers(), max_size=2),
        st.fixed_dictionaries({"type": st.just("checkout.session.completed")}),
        st.fixed_dictionaries({"id": provider_event_ids(), "type": NOT_STRINGS}),
        provider_event_ids().map(lambda e: {**checkout_event(e, "completed", session, 1),
                                            "id": ""}),
        st.tuples(provider_event_ids(), NOT_INTEGERS.filter(lambda v: v is not None)).map(
            lambda t: _with_amount(checkout_event(t[0], "completed", session, 1), t[1])))


def _with_amount(event: Body, amount: Any) -> Body:
    event["data"]["object"]["amount_total"] = amount
    return event


# ---- nodes, slots, SKUs --------------------------------------------------------------------

RESOURCE_CLASSES = ("gpu_baremetal", "gpu_slice", "cpu_vm")
#: resource class -> (scheduling unit, billing unit, allowed accelerator counts)
SHAPES = {"gpu_baremetal": ("node", "node_hour", [8]), "gpu_slice": ("slice", "gpu_hour", [1, 2, 4]),
          "cpu_vm": ("vm", "vcpu_hour", [])}


def sku_names() -> st.SearchStrategy[str]:
    return st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12).filter(
        lambda s: s[0].isalnum())


def skus(name: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[Body]:
    """Valid ``AdminCreateSkuRequest`` bodies: a baremetal, slice or VM SKU whose
    scheduling unit and accelerator counts fit its class (the service's validity
    rules, not only the schema's), priced in a known currency."""

    @st.composite
    def build(draw: Any) -> Body:
        cls = draw(st.sampled_from(RESOURCE_CLASSES))
        unit, billing, counts = SHAPES[cls]
        if cls == "gpu_slice":
            counts = draw(st.lists(st.sampled_from([1, 2, 4]), min_size=1, max_size=3, unique=True))
        return {"sku": draw(name or sku_names()), "vendor": "nvidia",
                "display_name": draw(st.text(min_size=1, max_size=20)),
                "resource_class": cls, "billing_unit": billing, "scheduling_unit": unit,
                "resources": {"allowed_accelerator_counts": sorted(counts)},
                "unit_price": draw(money(10**6))}

    return build()


def invalid_skus() -> st.SearchStrategy[Body]:
    return breaking_one(skus(), [
        ("sku", st.just("")), ("sku", MISSING), ("vendor", MISSING),
        ("resource_class", st.text(max_size=8).filter(lambda s: s not in RESOURCE_CLASSES)),
        ("billing_unit", st.just("minute")), ("scheduling_unit", st.just("rack")),
        ("resources", st.just({})), ("resources", st.just({"allowed_accelerator_counts": [0]})),
        ("unit_price", invalid_money()), ("unit_price", MISSING), ("colour", st.just("red"))])


def node_registrations(sku: str | st.SearchStrategy[str] = "bm-node") -> st.SearchStrategy[Body]:
    """Valid ``AdminCreateNodeRequest`` bodies for ``sku`` (``probe`` off: no network)."""
    return st.fixed_dictionaries({
        "host": st.from_regex(r"\A10\.0\.[0-9]{1,2}\.[0-9]{1,2}\Z"),
        "sku": sku if isinstance(sku, st.SearchStrategy) else st.just(sku),
        "gpus_total": st.sampled_from([0, 1, 4, 8]),
        "onboarding_mode": st.just("manual"), "probe": st.just(False)},
        optional={"port": st.integers(1, 65535), "region_code": st.just("region-maas-1")})


def invalid_node_registrations() -> st.SearchStrategy[Body]:
    return breaking_one(node_registrations(), [
        ("host", st.text(max_size=2)), ("host", MISSING), ("sku", st.just("")),
        ("gpus_total", st.integers(max_value=-1)), ("gpus_total", NOT_INTEGERS),
        ("port", st.integers(max_value=0) | st.integers(min_value=65536)),
        ("onboarding_mode", st.just("pxe")), ("probe", st.just("yes")), ("rack", st.just(1))])


SLOT_STATUSES = ("available", "reserved", "active", "cleanup", "cleanup_blocked", "disabled")
#: slot metadata an operator approves a slice slot with (inventory §3.4 [C])
APPROVED_SLOT_METADATA = {"storage_ownership": "slice", "destructive_wipe_policy": "blkdiscard",
                          "fabric_claim_mode": "per_slot_vf",
                          "fabric_vf_pci_address": "0000:01:00.1"}


def slots(sku: str | None = None) -> st.SearchStrategy[Body]:
    """Valid ``AdminUpsertNodeResourceSlot`` items: mostly approved, available slice slots."""
    return st.builds(
        lambda index, status, numa, approved: {
            "slot_index": index, "status": status, "capacity_shape": "gpu_slice",
            "numa_node": numa, "gpu_index": index,
            "capacity_metadata": {**(APPROVED_SLOT_METADATA if approved else {}),
                                  **({"sku": sku} if sku else {})}},
        st.integers(0, 7), st.sampled_from(["available"] * 4 + ["disabled", "cleanup"]),
        st.integers(0, 1), st.booleans() | st.just(True))


def slot_upserts(sku: str | None = None) -> st.SearchStrategy[Body]:
    """Valid ``AdminUpsertNodeResourceSlotsRequest`` bodies (distinct slot indexes)."""
    return st.lists(slots(sku), min_size=1, max_size=8,
                    unique_by=lambda s: s["slot_index"]).map(lambda items: {"slots": items})


def invalid_slot_upserts() -> st.SearchStrategy[Body]:
    bad_slot = breaking_one(slots(), [
        ("slot_index", st.integers(max_value=-1)), ("slot_index", MISSING),
        ("status", st.just("busy")), ("capacity_shape", st.just("vm")),
        ("max_claims", st.integers(max_value=0)), ("colour", st.just(1))])
    return st.one_of(st.just({"slots": []}), st.just({}),
                     bad_slot.map(lambda s: {"slots": [s]}),
                     st.lists(slots(), min_size=65, max_size=65).map(lambda s: {"slots": s}))


# ---- allocations -------------------------------------------------------------------------------

SCHEDULER_TYPES = ("bare_metal", "slurm", "k8s", "ray")
#: what a user or operator can do to a live allocation
LIFECYCLE_COMMANDS = ("release", "restart", "force_release", "force_cleanup",
                      "force_cleanup_verified")
TASK_STATUSES = ("success", "failed", "rejected")


def allocation_requests(sku: str = "bm-node", node_id: UUID | None = None
                        ) -> st.SearchStrategy[Body]:
    """Valid ``CreateAllocationRequest`` bodies: ``requested_count`` baremetal leases of
    ``sku`` (or pinned to ``node_id``)."""
    placement: Body = ({"node_id": st.just(str(node_id))} if node_id else
                       {"scheduler_request": st.just({"sku": sku})})
    return st.fixed_dictionaries({"scheduler_type": st.just("bare_metal"),
                                  "requested_count": st.integers(1, 3), **placement})


def invalid_allocation_requests() -> st.SearchStrategy[Body]:
    return breaking_one(allocation_requests(), [
        ("scheduler_type", st.text(max_size=8).filter(lambda s: s not in SCHEDULER_TYPES)),
        ("scheduler_type", MISSING),
        ("requested_count", st.integers(max_value=0) | st.integers(min_value=21)),
        ("requested_count", NOT_INTEGERS.filter(lambda v: v is not None)),
        ("node_id", st.text(max_size=10)), ("capacity_shape", st.just("vm")),
        ("gpu_count", st.integers(max_value=0)), ("ssh_key_ids", st.just([])),
        ("priority", st.just(1))])


def launches(sku: str = "bm-node") -> st.SearchStrategy[Body]:
    """Valid ``V3ComputeLaunchSubmitRequest`` bodies (all or none)."""
    return st.fixed_dictionaries({"sku": st.just(sku), "unit_count": st.integers(1, 3)},
                                 optional={"name": st.text(max_size=20),
                                           "resource_class": st.just("gpu_baremetal")})


def invalid_launches() -> st.SearchStrategy[Body]:
    return breaking_one(launches(), [
        ("sku", st.just("")), ("sku", MISSING), ("unit_count", st.integers(max_value=0)),
        ("name", st.text(min_size=121, max_size=130)), ("resource_class", st.just("tpu")),
        ("ssh_key_ids", st.just(["not-a-uuid"])), ("colour", st.just(1))])


def lifecycle_commands(max_size: int = 8) -> st.SearchStrategy[list[str]]:
    """A user's and operators' commands on one allocation, in any order, repeated."""
    return st.lists(st.sampled_from(LIFECYCLE_COMMANDS), max_size=max_size)


def completed_at(base: datetime | None = None) -> st.SearchStrategy[str]:
    base = base or datetime(2026, 1, 1, tzinfo=timezone.utc)
    return st.integers(0, 10**7).map(lambda s: (base + timedelta(seconds=s)).isoformat())


def task_results() -> st.SearchStrategy[Body]:
    """Valid ``InternalNodeTaskResultRequest`` bodies (a node agent's report)."""
    return st.fixed_dictionaries({
        "status": st.sampled_from(["success", "success", "failed", "rejected"]),
        "completed_at": completed_at(), "output": st.just({})},
        optional={"error": st.none() | st.text(max_size=20)})


def invalid_task_results() -> st.SearchStrategy[Body]:
    return breaking_one(task_results(), [
        ("status", st.text(max_size=8).filter(lambda s: s not in TASK_STATUSES)),
        ("status", MISSING), ("completed_at", st.just("yesterday")),
        ("completed_at", MISSING), ("output", st.just([])), ("output", MISSING),
        ("exit_code", st.just(0))])


def reports_in_any_order(reports: list[T]) -> st.SearchStrategy[list[T]]:
    """Agent reports (or provider events) as a network delivers them: any order,
    some more than once."""
    return in_any_order(reports)


# ---- app instances -----------------------------------------------------------------------------

APP_INSTANCE_COMMANDS = ("stop", "start", "restart", "upgrade", "rollback", "decommission")
OPERATING_MODES = ("tenant_dedicated", "platform_managed")


def app_slugs() -> st.SearchStrategy[str]:
    return st.from_regex(r"\A[a-z0-9][a-z0-9-]{1,20}\Z")


def app_instance_requests(slug: str | None = None, version: str = "1.0.0"
                          ) -> st.SearchStrategy[Body]:
    """Valid ``CreateAppInstanceRequest`` bodies for ``slug`` at ``version``."""
    return st.fixed_dictionaries(
        {"app_slug": st.just(slug) if slug else app_slugs(), "app_version": st.just(version),
         "display_name": st.text(min_size=1, max_size=30)},
        optional={"operating_mode": st.sampled_from(OPERATING_MODES),
                  "config": st.dictionaries(st.text(min_size=1, max_size=8),
                                            st.integers() | st.text(max_size=8), max_size=3)})


def invalid_app_instance_requests() -> st.SearchStrategy[Body]:
    return breaking_one(app_instance_requests(), [
        ("app_slug", st.sampled_from(["", "A", "-x", "UPPER", "a" * 70])), ("app_slug", MISSING),
        ("app_version", st.just("")), ("display_name", MISSING),
        ("operating_mode", st.just("shared")), ("app_artifact_id", st.just("nope")),
        ("placement_intent", st.just({"target_allocation_id": "nope"})),
        ("replicas", st.just(2))])


def app_instance_commands(max_size: int = 8) -> st.SearchStrategy[list[str]]:
    """Lifecycle commands on one app instance, in any order, repeated."""
    return st.lists(st.sampled_from(APP_INSTANCE_COMMANDS), max_size=max_size)
