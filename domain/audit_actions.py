"""What an event says for the audit log: its action, target, rank and allow-listed
details, and the scope (project, org, user) it names. Pure: no I/O.

A command is one save under one ``causation_id``; its audit row is made from every
event it appended that carries provenance. The event with the highest ``rank`` names
the row's action and target (the command's intent: ``allocation.create`` outranks the
placement claims it reserved). Details are copied only from the fields listed here,
and only when they are scalars: free-form payloads (webhook bodies, scheduler
requests, app specs, reasons typed by people) never reach an audit row.

An idempotency record (``IdempotencyKeyRecorded``) ranks lowest: it names the row
only when the command appended nothing else, i.e. a refusal (``failure``) or a no-op
under an ``Idempotency-Key``; its action then comes from the operation it answered.

May import: the standard library only.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

NAMESPACE = uuid5(NAMESPACE_URL, "https://ledgercore.invalid/audit-log")
IDEMPOTENCY_TOPIC = "ledgercore.IdempotencyKeyRecorded"
#: the contract's ``AuditLogEntry.actor_role`` values (a node agent acts as ``system``)
ROLES = ("user", "admin", "service_account", "system")
MAX_TEXT = 200


@dataclass(frozen=True)
class Rule:
    action: str
    target_type: str
    rank: int
    #: details copied when scalar: an attribute name, or ``attr.key`` inside a dict attribute
    fields: tuple[str, ...] = ()
    #: the target's id: this attribute instead of the aggregate's id
    target_attr: str | None = None


@dataclass(frozen=True)
class Fact:
    """One event's contribution to its command's audit row."""

    action: str
    target_type: str
    target_id: str
    rank: int
    details: dict[str, Any]


LEDGER = ("entry_id", "entry_type", "amount_minor", "currency")
LEASE = ("lease.sku", "lease.node_id", "lease.gpus_total", "lease.region_code",
         "lease.resource_class", "lease.scheduler_type", "lease.source")
NODE = ("identity.sku", "identity.region_code", "identity.onboarding_mode",
        "identity.gpus_total", "identity.host")
RULES: dict[str, Rule] = {
    # billing ledger
    "ledgercore.BillingAccountOpened": Rule("billing.account.open", "billing_account", 0,
                                            ("primary_currency",)),
    "ledgercore.BalanceAdjusted": Rule("billing.balance.adjust", "billing_account", 5,
                                       (*LEDGER, "direction")),
    "ledgercore.PaymentCredited": Rule("billing.payment.credit", "billing_account", 2,
                                       (*LEDGER, "payment_session_id")),
    "ledgercore.LedgerMoneyMoved": Rule("billing.ledger.post", "billing_account", 1, LEDGER),
    "ledgercore.LedgerEntryPosted": Rule("billing.ledger.post", "billing_account", 1, LEDGER),
    # allocations and placement
    "ledgercore.AllocationRequested": Rule("allocation.create", "allocation", 5, LEASE),
    "ledgercore.AllocationMoved": Rule("allocation.status.change", "allocation", 2, ("to",)),
    "ledgercore.PlacementClaimsReserved": Rule("placement.claims.reserve", "node", 1,
                                               ("allocation_id", "backfill")),
    "ledgercore.PlacementClaimsMoved": Rule("placement.claims.move", "node", 1,
                                            ("allocation_id", "to")),
    "ledgercore.ConcurrencyPolicySet": Rule("allocation.concurrency_policy.set",
                                            "allocation_concurrency_policy", 5,
                                            ("value", "previous_value")),
    # nodes and SKUs
    "ledgercore.NodeRegistered": Rule("node.create", "node", 5, NODE),
    "ledgercore.NodeCordoned": Rule("node.cordon", "node", 5, ("previous_status",)),
    "ledgercore.NodeSchedulingResumed": Rule("node.uncordon", "node", 5, ("previous_status",)),
    "ledgercore.NodeDrainStarted": Rule("node.drain", "node", 5, ("previous_status", "task_id")),
    "ledgercore.NodeRetired": Rule("node.retire", "node", 5, ("previous_status",)),
    "ledgercore.NodeReactivated": Rule("node.reactivate", "node", 5),
    "ledgercore.NodeTombstoned": Rule("node.delete", "node", 5, ("how", "previous_status")),
    "ledgercore.NodeSlotsUpserted": Rule("node.slots.upsert", "node", 4),
    "ledgercore.SlotCleanupRecorded": Rule("node.slot.cleanup", "node", 4,
                                           ("slot_id", "outcome")),
    "ledgercore.SkuCreated": Rule("sku.create", "sku", 5, ("sku",)),
    "ledgercore.SkuUpdated": Rule("sku.update", "sku", 5),
    "ledgercore.SkuActivated": Rule("sku.activate", "sku", 5),
    "ledgercore.SkuDeactivated": Rule("sku.deactivate", "sku", 5),
    # payments
    "ledgercore.ProviderEventReceived": Rule("payment.webhook.receive", "provider_event", 6,
                                             ("provider", "provider_event_id", "event_type")),
    "ledgercore.PaymentSessionInitiated": Rule("payment.session.create", "payment_session", 5,
                                               ("amount_minor", "currency")),
    "ledgercore.PaymentCheckoutCompleted": Rule("payment.checkout.complete", "payment_session",
                                                3, ("credited_amount_minor", "currency")),
    "ledgercore.PaymentSessionCredited": Rule("payment.session.credit", "payment_session", 4,
                                              ("amount_minor", "currency", "source",
                                               "ledger_entry_id")),
    "ledgercore.PaymentSessionExpired": Rule("payment.session.expire", "payment_session", 4),
    "ledgercore.PaymentSessionFailed": Rule("payment.session.fail", "payment_session", 4),
    # refunds, disputes, restrictions, reconciliation
    "ledgercore.RefundRequested": Rule("billing.refund.create", "refund", 5,
                                       ("amount_minor", "currency", "mode",
                                        "payment_session_id")),
    "ledgercore.RefundPolicyApplied": Rule("billing.refund.policy.apply", "refund", 3,
                                           ("outcome", "in_window", "amount_minor",
                                            "ledger_entry_id")),
    "ledgercore.RefundCompleted": Rule("billing.refund.complete", "refund", 4,
                                       ("internal_ledger_entry_id",)),
    "ledgercore.RefundFailed": Rule("billing.refund.fail", "refund", 4,
                                    ("compensation_entry_id",)),
    "ledgercore.DisputeOpened": Rule("billing.dispute.open", "payment_dispute", 5,
                                     ("payment_session_id", "amount_minor", "currency")),
    "ledgercore.DisputeStatusChanged": Rule("billing.dispute.status.change", "payment_dispute",
                                            4, ("status",)),
    "ledgercore.DisputeChargebackLinked": Rule("billing.dispute.chargeback.link",
                                               "payment_dispute", 3, ("ledger_entry_id",)),
    "ledgercore.DisputeReversalLinked": Rule("billing.dispute.reversal.link",
                                             "payment_dispute", 3, ("ledger_entry_id",)),
    "ledgercore.FinancialRestrictionSet": Rule("billing.restriction.set",
                                               "financial_restriction", 5,
                                               ("scope_type", "scope_id", "state")),
    "ledgercore.ReconciliationRunStarted": Rule("billing.reconciliation.start",
                                                "reconciliation_run", 5),
    "ledgercore.ReconciliationRunCompleted": Rule("billing.reconciliation.complete",
                                                  "reconciliation_run", 4),
    "ledgercore.ReconciliationRunFailed": Rule("billing.reconciliation.fail",
                                               "reconciliation_run", 4),
    # invoices, budgets, usage
    "ledgercore.InvoiceDrafted": Rule("billing.invoice.draft", "invoice", 4,
                                      ("currency", "period", "revision")),
    "ledgercore.InvoiceLineAdded": Rule("billing.invoice.line.add", "invoice", 2),
    "ledgercore.InvoiceLinesCarried": Rule("billing.invoice.lines.carry", "invoice", 2),
    "ledgercore.InvoiceFinalized": Rule("billing.invoice.finalize", "invoice", 5,
                                        ("total_minor", "line_count")),
    "ledgercore.InvoicePaymentApplied": Rule("billing.invoice.payment.apply", "invoice", 5,
                                             ("amount_minor", "applied_minor", "status")),
    "ledgercore.InvoiceVoided": Rule("billing.invoice.void", "invoice", 5),
    "ledgercore.BudgetPolicyCreated": Rule("billing.budget.create", "budget_policy", 5,
                                           ("scope_type",)),
    "ledgercore.BudgetPolicySet": Rule("billing.budget.set", "budget_policy", 4,
                                       ("period", "threshold_percent", "enforcement_mode",
                                        "active")),
    "ledgercore.UsageStarted": Rule("usage.start", "usage_record", 4),
    "ledgercore.UsageSliceRated": Rule("usage.rate", "usage_record", 3,
                                       ("rated_usage_line_id", "ledger_entry_id")),
    "ledgercore.UsageStopped": Rule("usage.stop", "usage_record", 4),
    # apps and app instances
    "ledgercore.AppRegistered": Rule("app.create", "app", 5, ("slug",)),
    "ledgercore.AppVersionRegistered": Rule("app.version.create", "app", 5,
                                            ("version", "runtime_backend")),
    "ledgercore.AppVersionPublished": Rule("app.version.publish", "app", 5, ("version",)),
    "ledgercore.AppVersionDeprecated": Rule("app.version.deprecate", "app", 5, ("version",)),
    "ledgercore.AppEntitlementUpserted": Rule("app.entitlement.upsert", "app_entitlement", 5,
                                              ("enabled",)),
    "ledgercore.AppInstanceRequested": Rule("app_instance.create", "app_instance", 5,
                                            ("spec.app_slug", "app_version")),
    "ledgercore.AppInstanceMoved": Rule("app_instance.status.change", "app_instance", 3,
                                        ("from_status", "to", "trigger")),
    "ledgercore.AppInstanceRuntimeObserved": Rule("app_instance.runtime.observe",
                                                  "app_instance", 2),
    "ledgercore.AppInstanceMemberMaterialized": Rule("app_instance.member.materialize",
                                                     "app_instance", 2),
    "ledgercore.AppInstanceMemberChanged": Rule("app_instance.member.change", "app_instance", 2,
                                                ("member_id", "status")),
    "ledgercore.AppInstanceMemberPlaced": Rule("app_instance.member.place", "app_instance", 2,
                                               ("member_id", "node_id")),
    "ledgercore.AppMemberOperationRequested": Rule("app_instance.member_operation.create",
                                                   "app_instance", 4),
    "ledgercore.AppMemberOperationProgressed": Rule("app_instance.member_operation.progress",
                                                    "app_instance", 3,
                                                    ("operation_id", "status")),
    "ledgercore.AppRepairOperationRequested": Rule("app_instance.repair.create",
                                                   "app_instance", 4),
    "ledgercore.AppRepairOperationProgressed": Rule("app_instance.repair.progress",
                                                    "app_instance", 3,
                                                    ("operation_id", "status")),
    "ledgercore.AllocationAppBound": Rule("app_instance.member.bind", "allocation", 1,
                                          ("app_instance_id", "member_id")),
    "ledgercore.AllocationAppUnbound": Rule("app_instance.member.unbind", "allocation", 1,
                                            ("app_instance_id", "member_id")),
    "ledgercore.AppInstanceAdmitted": Rule("app_instance.quota.admit", "app_instance", 0,
                                           (), "app_instance_id"),
    "ledgercore.AppInstanceRetired": Rule("app_instance.quota.retire", "app_instance", 0,
                                          (), "app_instance_id"),
}
#: a lease status entered -> the action of the command that moved it there
MOVES = {"releasing": "allocation.release", "restarting": "allocation.restart"}
#: operations whose refusals (or no-ops) under a key are named like their events
OPERATION_ACTIONS = {
    "adminAdjustBalance": "billing.balance.adjust", "createAllocation": "allocation.create",
    "launchCompute": "allocation.create", "releaseAllocation": "allocation.release",
    "restartAllocation": "allocation.restart",
    "adminForceReleaseAllocation": "allocation.force_release",
    "adminCreateNode": "node.create", "adminCordonNode": "node.cordon",
    "adminDrainNode": "node.drain", "createChargeSession": "payment.session.create",
    "adminReconcilePaymentSession": "payment.session.credit",
}


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _scalar(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, str):
        return value[:MAX_TEXT]
    return _SKIP


_SKIP = object()


def _field(event: Any, path: str) -> Any:
    name, _, key = path.partition(".")
    value = getattr(event, name, None)
    if key:
        value = value.get(key) if isinstance(value, dict) else None
    return _scalar(value)


def _details(event: Any, fields: tuple[str, ...]) -> dict[str, Any]:
    found = {}
    for path in fields:
        value = _field(event, path)
        if value is not _SKIP and value is not None:
            found[path.rpartition(".")[2]] = value
    return found


def topic_of(event: Any) -> str:
    return str(getattr(type(event), "TOPIC", "") or type(event).__qualname__)


def operation_of(scope: str) -> str:
    """The operationId inside an idempotency scope (``actor_type:principal:op:key``)."""
    parts = scope.split(":", 3)
    return parts[2] if len(parts) == 4 else ""


def fact(event: Any) -> Fact:
    """What ``event`` (one carrying provenance) says for its command's audit row."""
    topic = topic_of(event)
    target_id = str(event.originator_id)
    if topic == IDEMPOTENCY_TOPIC:
        operation = operation_of(str(getattr(event, "scope", "")))
        status = (getattr(event, "response", None) or {}).get("status")
        details: dict[str, Any] = {"operation_id": operation}
        if isinstance(status, int):
            details["status"] = status
        action = OPERATION_ACTIONS.get(operation) or ("api." + snake(operation or "command"))
        return Fact(action, "idempotency_key", target_id, -1, details)
    rule = RULES.get(topic)
    if rule is None:
        name = topic.rpartition(".")[2]
        return Fact("event." + snake(name), "aggregate", target_id, 0, {"event": name})
    details = _details(event, rule.fields)
    action = rule.action
    rank = rule.rank
    refine = REFINE.get(topic)
    if refine is not None:
        action, rank = refine(event, action, rank)
    if rule.target_attr is not None and getattr(event, rule.target_attr, None) is not None:
        target_id = str(getattr(event, rule.target_attr))
    return Fact(action, rule.target_type, target_id, rank, details)


def _allocation_move(event: Any, action: str, rank: int) -> tuple[str, int]:
    to = getattr(event, "to", None)
    details = getattr(event, "details", None) or {}
    if to == "releasing":
        if details.get("mode") == "admin_force":
            return "allocation.force_release", 5
        return MOVES[to], 5
    if to in MOVES:
        return MOVES[to], 5
    if to == "released" and details.get("force_cleanup"):
        return "allocation.force_cleanup", 5
    return action, rank


REFINE: dict[str, Callable[[Any, str, int], tuple[str, int]]] = {
    "ledgercore.AllocationMoved": _allocation_move,
}


def result_of(fact_: Fact) -> str:
    """``failure`` for a command that was refused (its idempotency record answered an
    error), else ``success``."""
    status = fact_.details.get("status") if fact_.rank < 0 else None
    return "failure" if isinstance(status, int) and status >= 400 else "success"


# ---- scope --------------------------------------------------------------------------------
def _uuid(value: Any) -> UUID | None:
    if value is None or type(value) is UUID:
        return value
    try:
        return UUID(str(value))
    except ValueError:
        return None


def _first(event: Any, paths: tuple[str, ...]) -> UUID | None:
    for path in paths:
        name, _, key = path.partition(".")
        value = getattr(event, name, None)
        if key:
            value = value.get(key) if isinstance(value, dict) else None
        found = _uuid(value)
        if found is not None:
            return found
    return None


PROJECT = ("project_id", "lease.project_id", "spec.project_id")
ORG = ("org_id", "lease.org_id", "spec.tenant_id")
USER = ("owner_user_id", "user_id", "initiated_by_user_id", "lease.requested_by_user_id",
        "spec.requested_by_user_id", "requested_by_user_id")


def own_scope(event: Any) -> tuple[UUID | None, UUID | None, UUID | None]:
    """(project, org, user) the event itself names, any of them None."""
    project, org, user = _first(event, PROJECT), _first(event, ORG), _first(event, USER)
    scope_type = getattr(event, "scope_type", None)
    if topic_of(event) == "ledgercore.FinancialRestrictionSet":
        scope_id = _uuid(getattr(event, "scope_id", None))
        if scope_type == "project":
            project = project or scope_id
        elif scope_type in ("org", "tenant"):
            org = org or scope_id
        elif scope_type == "user":
            user = user or scope_id
    return project, org, user


#: attributes naming another aggregate whose scope an event shares
RELATED = ("allocation_id", "app_instance_id", "payment_session_id")


def related_ids(event: Any) -> list[UUID]:
    """The aggregates whose known scope applies to ``event``: its own, then related ones."""
    found = [event.originator_id]
    for name in RELATED:
        value = _uuid(getattr(event, name, None))
        if value is not None:
            found.append(value)
    return found


# ---- actor --------------------------------------------------------------------------------
def actor(provenance: dict[str, Any]) -> tuple[UUID | None, UUID | None, str, str]:
    """(user id, service account id, contract role, actor reference) of a provenance."""
    actor_type = provenance.get("actor_type")
    actor_id = provenance.get("actor_id")
    user = _uuid(actor_id) if actor_type == "user" else None
    service_account = _uuid(actor_id) if actor_type == "service_account" else None
    role = provenance.get("actor_role") or "system"
    if role not in ROLES:
        role = "system"
    return user, service_account, role, f"{actor_type or 'system'}:{actor_id or '-'}"


def actor_user_id(provenance: dict[str, Any]) -> UUID | None:
    """The acting user or service account's id (None for system actors)."""
    if provenance.get("actor_type") in ("user", "service_account"):
        return _uuid(provenance.get("actor_id"))
    return None


def row_id(provenance: dict[str, Any], event: Any) -> UUID:
    """The audit row of the command that appended ``event``: one per causation id (an
    event recorded without one is a row of its own)."""
    causation = provenance.get("causation_id")
    if causation:
        return uuid5(NAMESPACE, f"command:{causation}")
    return uuid5(NAMESPACE, f"event:{event.originator_id}:{event.originator_version}")
