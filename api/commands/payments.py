"""Payment commands: ``createChargeSession`` (refused to a tenant ``billing_viewer``),
``stripeWebhook`` (checkouts, disputes and provider refund outcomes),
``adminReconcilePaymentSession`` (also routed as
``reconcileV3PlatformFinancePaymentSession`` and its ``Compat`` twin, one idempotency
scope for the three)."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal
from uuid import UUID, uuid4, uuid5

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from api import idempotency, webhooks
from api.auth import Principal, admin, billing_writer
from api.commands import context, renderer, run
from api.errors import ApiError, correlation_id
from domain.disputes import dispute_update, parse_provider_dispute
from domain.errors import DomainError
from domain.money import INT64_MAX, Money, is_known_currency
from domain.payments import (NAMESPACE, checkout_event, create_charge_session,
                             provider_amount, provider_event, reconcile_payment_session)
from domain.provenance import CommandContext
from domain.refunds import parse_provider_refund, refund_outcome
from infra.payments import LocalCheckoutProvider

router = APIRouter()
#: provider events about money going back: disputes (any ``charge.dispute.*``) and
#: the outcome of a provider refund this service asked for
DISPUTE_EVENTS = "charge.dispute."
REFUND_EVENTS = frozenset({"refund.created", "refund.updated", "refund.failed",
                           "charge.refund.updated"})


class CreateChargeSessionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    amount_minor: int = Field(ge=1, le=INT64_MAX)
    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$")


class AdminReconcilePaymentSessionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    action: Literal["post_credit", "mark_expired", "mark_failed"]
    amount_minor: int | None = Field(default=None, ge=1, le=INT64_MAX)
    reason: str = Field(min_length=3)
    failure_reason: str | None = None


@router.post("/api/v1/payments/checkout-session", operation_id="createChargeSession")
async def create_charge_session_route(body: CreateChargeSessionRequest, request: Request,
                                      principal: Principal = Depends(billing_writer)
                                      ) -> JSONResponse:
    if not is_known_currency(body.currency):
        raise ApiError(400, "invalid_request", f"unknown currency {body.currency}",
                       field="currency", reason="unsupported_currency")
    if principal.tenant_id is None:
        raise ApiError(403, "insufficient_permissions", "a payment needs the caller's tenant")
    claim = idempotency.claim(request, principal, "createChargeSession", body.model_dump())
    # With a key, the session id follows from it, so a retry asks the provider for the
    # same checkout (and is answered from the stored record anyway).
    session_id = uuid5(NAMESPACE, claim.scope) if claim else uuid4()
    amount = Money(body.amount_minor, body.currency)
    provider = LocalCheckoutProvider(request.app.state.settings.checkout_base_url)
    checkout = provider.create_checkout(session_id, amount)
    command = create_charge_session(
        context(request, principal, "api", claim), session_id=session_id,
        org_id=principal.tenant_id, user_id=principal.user_id,
        provider_session_id=checkout.provider_session_id, url=checkout.url, amount=amount,
        render=renderer(request, 200, _as_is))
    return await run(request, command)


@router.post("/api/v1/payments/webhook", operation_id="stripeWebhook")
async def stripe_webhook(request: Request) -> JSONResponse:
    raw = await request.body()
    if not webhooks.verify(request.app.state.settings.webhook_secret, raw,
                           request.headers.get(webhooks.HEADER)):
        raise ApiError(401, "stripe_signature_invalid", "the webhook signature is not valid")
    idempotency.checked_key(request)  # declared by the contract; events dedupe by their id
    try:
        event = json.loads(raw)
        if not isinstance(event, dict):
            raise ValueError("not an object")
        event_id, event_type = event["id"], event["type"]
        if not (isinstance(event_id, str) and event_id and isinstance(event_type, str)):
            raise ValueError("id and type must be strings")
    except (ValueError, KeyError) as error:
        raise ApiError(400, "invalid_request", "the webhook body is not a provider event",
                       reason=str(error)) from None
    data = event.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    if not isinstance(obj, dict):
        obj = {}
    ctx = CommandContext(actor_id="stripe", actor_type="system", actor_role="system",
                         source="webhook", correlation_id=correlation_id(request))
    if event_type.startswith(DISPUTE_EVENTS) or event_type in REFUND_EVENTS:
        return await _money_back_event(request, ctx, raw, event_id, event_type, obj)
    metadata = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    try:
        payment_session_id = UUID(str(metadata.get("payment_session_id")
                                      or obj.get("client_reference_id")))
    except ValueError:
        payment_session_id = None
    amount = None
    if event_type == "checkout.session.completed":
        try:
            amount = provider_amount(obj.get("amount_total"), obj.get("currency"))
        except DomainError as error:
            raise ApiError(400, "invalid_request", error.message, **error.details) from None
    intent = obj.get("payment_intent") if isinstance(obj.get("payment_intent"), str) else None
    command = checkout_event(
        ctx, provider_event_id=event_id, event_type=event_type,
        payload_sha256=hashlib.sha256(raw).hexdigest(), payment_session_id=payment_session_id,
        amount=amount, payment_intent_id=intent,
        render=renderer(request, 200, lambda result: {"ok": True}))
    return await run(request, command)


async def _money_back_event(request: Request, ctx: CommandContext, raw: bytes, event_id: str,
                            event_type: str, obj: dict[str, Any]) -> JSONResponse:
    """Disputes (``charge.dispute.*``) and provider refund outcomes: parsed here (a
    malformed object is 400 with nothing recorded), applied once by event id."""
    try:
        if event_type.startswith(DISPUTE_EVENTS):
            apply = dispute_update(event_id, parse_provider_dispute(obj))
        else:
            apply = refund_outcome(event_id, parse_provider_refund(obj))
    except DomainError as error:
        raise ApiError(400, "invalid_request", error.message, **error.details) from None
    command = provider_event(ctx, provider_event_id=event_id, event_type=event_type,
                             payload_sha256=hashlib.sha256(raw).hexdigest(), apply=apply,
                             render=renderer(request, 200, lambda result: {"ok": True}))
    return await run(request, command)


@router.post("/api/v1/admin/payments/sessions/{payment_session_id}/reconcile",
             operation_id="adminReconcilePaymentSession")
@router.post("/api/v1/platform/finance/payment-sessions/{payment_session_id}/reconcile",
             operation_id="reconcileV3PlatformFinancePaymentSession")
@router.post("/api/v1/v3/platform/finance/payment-sessions/{payment_session_id}/reconcile",
             operation_id="reconcileV3PlatformFinancePaymentSessionCompat")
async def admin_reconcile_payment_session(
        payment_session_id: UUID, body: AdminReconcilePaymentSessionRequest, request: Request,
        principal: Principal = Depends(admin)) -> JSONResponse:
    claim = idempotency.claim(request, principal, "adminReconcilePaymentSession",
                              body.model_dump())
    command = reconcile_payment_session(
        context(request, principal, "admin", claim), payment_session_id=payment_session_id,
        action=body.action, amount_minor=body.amount_minor, reason=body.reason,
        failure_reason=body.failure_reason, render=renderer(request, 200, _as_is))
    return await run(request, command)


def _as_is(result: dict[str, Any]) -> dict[str, Any]:
    return result
