"""Operator repair of the event pipeline: outbox and DLQ requeue and discard.

``adminRequeueOutboxEvent``, ``adminDiscardOutboxEvent``, ``adminRequeueDLQMessage``,
``adminDiscardDLQMessage`` and their V3 twins. They change the pipeline's own
bookkeeping (``projections.dead_letters``: what the relay and the projectors could
not do), not the event store and not a read model: a requeue hands the event back to
the relay or the projector, which applies it once. Each action, allowed or refused,
is recorded in ``pipeline_actions`` (actor, correlation id, result) in the same
transaction, and an Idempotency-Key replays the first answer from that record.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from uuid import UUID

import psycopg
from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse

from api import idempotency
from api.auth import Principal, requires
from api.errors import ApiError, correlation_id
from api.queries import read_model_errors
from projections import dead_letters as dl
from projections.store import SCHEMA

router = APIRouter()
OPS_WRITE = requires("platform.ops.write")
PREFIXES = ("/api/v1/admin", "/api/v1/platform/ops", "/api/v1/v3/platform/ops")
INT64_MAX = 2**63 - 1
#: the contract's discard/requeue take no body; the reason recorded for API actions
API_REASON = "operator action through the API"

#: (action, target, cursor) -> (status code, body, result) ; runs in the transaction
Action = Callable[[Any], tuple[int, dict[str, Any], str]]


def _act(request: Request, principal: Principal, operation: str, action: str, target: str,
         decide: Action) -> JSONResponse:
    claim = idempotency.claim(request, principal, operation, None)
    pool = request.app.state.stores.query_pool
    for attempt in range(2):
        try:
            with pool.connection() as conn, conn.transaction():
                cur = conn.cursor()
                if claim is not None:
                    stored = dl.recorded_action(cur, SCHEMA, claim.scope)
                    if stored is not None:
                        return _replay(request, stored, claim.fingerprint)
                status, body, result = decide(cur)
                keep = claim is not None and status == 200
                dl.record_action(cur, SCHEMA, action=action, target=target,
                                 actor_id=str(principal.user_id), actor_type=principal.actor_type,
                                 reason=API_REASON, correlation_id=correlation_id(request),
                                 result=result, scope=claim.scope if keep and claim else None,
                                 response={"fingerprint": claim.fingerprint, "body": body}
                                 if keep and claim else None)
        except psycopg.errors.UniqueViolation:
            if attempt:
                raise ApiError(409, "invalid_request", "a request with this Idempotency-Key "
                               "is in progress", reason="idempotency_key_in_use") from None
            continue  # the same key raced in: answer from its record
        except psycopg.Error as error:
            with read_model_errors():
                raise error
        if status != 200:
            raise ApiError(status, "invalid_request", body["message"], **body["details"])
        return JSONResponse(body)
    raise AssertionError("unreachable")


def _replay(request: Request, stored: dict[str, Any] | str, fingerprint: str) -> JSONResponse:
    record = json.loads(stored) if isinstance(stored, str) else stored
    if record["fingerprint"] != fingerprint:
        raise ApiError(409, "invalid_request",
                       "this Idempotency-Key was used for a different request",
                       reason="idempotency_key_reused")
    response = JSONResponse(record["body"])
    response.headers["Idempotent-Replayed"] = "true"
    return response


def _refused(status: int, message: str, **details: Any) -> tuple[int, dict[str, Any], str]:
    return status, {"message": message, "details": details}, "failure"


# ---- the failed outbox ----------------------------------------------------------------
def _outbox(request: Request, principal: Principal, event_id: UUID, operation: str,
            to: str) -> JSONResponse:
    verb = "requeue" if to == "pending" else "discard"

    def decide(cur: Any) -> tuple[int, dict[str, Any], str]:
        found = dl.change_outbox(cur, SCHEMA, event_id, to, str(principal.user_id), API_REASON)
        if found == "not_found":
            return _refused(404, "no failed outbox event with this id", event_id=str(event_id))
        if found == "conflict":
            return _refused(409, "only a failed outbox event can be requeued or discarded",
                            event_id=str(event_id), reason="outbox_event_not_failed")
        return 200, {"ok": True, "outbox_event_id": str(event_id), "status": to}, "success"

    return _act(request, principal, operation, f"ops.outbox.{verb}", f"outbox:{event_id}",
                decide)


@router.post(f"{PREFIXES[0]}/outbox/{{event_id}}/requeue", operation_id="adminRequeueOutboxEvent")
@router.post(f"{PREFIXES[1]}/outbox/{{event_id}}/requeue",
             operation_id="requeueV3PlatformOpsOutboxEvent")
@router.post(f"{PREFIXES[2]}/outbox/{{event_id}}/requeue",
             operation_id="requeueV3PlatformOpsOutboxEventCompat")
def requeue_outbox_event(event_id: UUID, request: Request,
                         principal: Principal = Depends(OPS_WRITE)) -> JSONResponse:
    """Back to pending: the relay publishes it again (marked late; applied once)."""
    return _outbox(request, principal, event_id, "adminRequeueOutboxEvent", "pending")


@router.post(f"{PREFIXES[0]}/outbox/{{event_id}}/discard", operation_id="adminDiscardOutboxEvent")
@router.post(f"{PREFIXES[1]}/outbox/{{event_id}}/discard",
             operation_id="discardV3PlatformOpsOutboxEvent")
@router.post(f"{PREFIXES[2]}/outbox/{{event_id}}/discard",
             operation_id="discardV3PlatformOpsOutboxEventCompat")
def discard_outbox_event(event_id: UUID, request: Request,
                         principal: Principal = Depends(OPS_WRITE)) -> JSONResponse:
    """Terminal: the event stays in the store but is never published to Kafka."""
    return _outbox(request, principal, event_id, "adminDiscardOutboxEvent", "discarded")


# ---- the DLQ --------------------------------------------------------------------------
StreamSeq = Path(ge=1, le=INT64_MAX)


@router.post(f"{PREFIXES[0]}/dlq/messages/{{stream_seq}}/requeue",
             operation_id="adminRequeueDLQMessage")
@router.post(f"{PREFIXES[1]}/dlq/messages/{{stream_seq}}/requeue",
             operation_id="requeueV3PlatformOpsDLQMessage")
@router.post(f"{PREFIXES[2]}/dlq/messages/{{stream_seq}}/requeue",
             operation_id="requeueV3PlatformOpsDLQMessageCompat")
def requeue_dlq_message(request: Request, stream_seq: int = StreamSeq,
                        principal: Principal = Depends(OPS_WRITE)) -> JSONResponse:
    """The projector applies the event again (and then what was parked behind it)."""
    def decide(cur: Any) -> tuple[int, dict[str, Any], str]:
        found, row = dl.requeue_dead_letter(cur, SCHEMA, stream_seq, str(principal.user_id),
                                            API_REASON)
        if found == "not_found" or row is None:
            return _refused(404, "no DLQ message with this stream_seq", stream_seq=stream_seq)
        if found == "conflict":
            return _refused(409, f"the DLQ message is {row['status']}, not pending",
                            stream_seq=stream_seq, reason="dlq_message_not_pending")
        return 200, {"ok": True, "stream_seq": stream_seq, "status": "requeued",
                     "target_subject": dl.original_topic(row)}, "success"

    return _act(request, principal, "adminRequeueDLQMessage", "ops.dlq.requeue",
                f"dlq:{stream_seq}", decide)


@router.post(f"{PREFIXES[0]}/dlq/messages/{{stream_seq}}/discard",
             operation_id="adminDiscardDLQMessage")
@router.post(f"{PREFIXES[1]}/dlq/messages/{{stream_seq}}/discard",
             operation_id="discardV3PlatformOpsDLQMessage")
@router.post(f"{PREFIXES[2]}/dlq/messages/{{stream_seq}}/discard",
             operation_id="discardV3PlatformOpsDLQMessageCompat")
def discard_dlq_message(request: Request, stream_seq: int = StreamSeq,
                        principal: Principal = Depends(OPS_WRITE)) -> JSONResponse:
    """The read model never gets this event; the events parked behind it go on.
    Discarding a discarded message answers the same again; one already requeued or
    applied is a 409 (404 on the V3 routes, which declare no 409)."""
    conflict_status = 409 if request.url.path.startswith(PREFIXES[0]) else 404

    def decide(cur: Any) -> tuple[int, dict[str, Any], str]:
        found, row = dl.discard_dead_letter(cur, SCHEMA, stream_seq, str(principal.user_id),
                                            API_REASON)
        if found == "not_found" or row is None:
            return _refused(404, "no DLQ message with this stream_seq", stream_seq=stream_seq)
        if found == "conflict":
            return _refused(conflict_status, f"the DLQ message is {row['status']}: it can no "
                            "longer be discarded", stream_seq=stream_seq,
                            reason="dlq_message_not_pending")
        return 200, {"ok": True, "stream_seq": stream_seq, "status": "discarded",
                     "target_subject": None}, "success"

    return _act(request, principal, "adminDiscardDLQMessage", "ops.dlq.discard",
                f"dlq:{stream_seq}", decide)
