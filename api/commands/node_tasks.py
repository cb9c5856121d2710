"""The node agent's task channel: ``internalNodeWaitTask`` (long-poll for the next
task) and ``internalNodeTaskResult`` (report how it went). Authenticated with a node
token for the path's node (``api.auth.node_agent``)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from api.auth import Principal, node_agent
from api.commands import context, outcome_of, renderer, respond
from api.errors import ApiError
from api.fields import Instant
from domain.canonical import canonical_json
from domain.leases import dispatch_node_tasks, report_node_task

router = APIRouter()
#: how often a waiting long-poll looks for a task again
POLL_SECONDS = 0.25


def _node_uuid(node_id: str) -> UUID:
    try:
        return UUID(node_id)
    except ValueError:
        raise ApiError(404, "node_not_found", "node not found", node_id=node_id) from None


def sign(task: dict[str, Any], secret: str) -> str:
    """HMAC-SHA256 over the task's canonical JSON: the agent checks a task came from us."""
    return hmac.new(secret.encode(), canonical_json(task), hashlib.sha256).hexdigest()


@router.get("/internal/v1/nodes/{node_id}/tasks/wait", operation_id="internalNodeWaitTask",
            responses={204: {"description": "No task currently available"}})
async def internal_node_wait_task(node_id: str, request: Request,
                                  principal: Principal = Depends(node_agent)) -> Response:
    node = _node_uuid(node_id)
    settings = request.app.state.settings
    deadline = time.monotonic() + settings.node_wait_seconds
    while True:
        command = dispatch_node_tasks(context(request, principal, "api", None), node_id=node,
                                      render=renderer(request, 200, lambda result: result))
        outcome = await outcome_of(request, command)
        task = outcome.response["body"].get("task") if outcome.response["status"] == 200 else None
        if task is not None:
            outcome.response["body"] = {**task, "signature": sign(task, settings.jwt_secret)}
            return respond(request, outcome)
        if outcome.response["status"] == 404:  # the wait declares no 404: the token names no node
            raise ApiError(403, "insufficient_permissions", "the token's node is not registered")
        if outcome.response["status"] != 200:
            return respond(request, outcome)
        if time.monotonic() >= deadline or await request.is_disconnected():
            return Response(status_code=204)
        await asyncio.sleep(POLL_SECONDS)


class InternalNodeTaskResultRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    status: Literal["success", "failed", "rejected"]
    error: str | None = Field(default=None, max_length=4000)
    completed_at: Instant = Field(strict=False)
    output: dict[str, Any]


@router.post("/internal/v1/nodes/{node_id}/tasks/{task_id}/result",
             operation_id="internalNodeTaskResult")
async def internal_node_task_result(node_id: str, task_id: UUID,
                                    body: InternalNodeTaskResultRequest, request: Request,
                                    principal: Principal = Depends(node_agent)) -> JSONResponse:
    completed_at: datetime = body.completed_at
    command = report_node_task(context(request, principal, "api", None), node_id=_node_uuid(node_id),
                               task_id=task_id, status=body.status, error=body.error,
                               completed_at=completed_at, output=body.output,
                               render=renderer(request, 200, lambda result: {"ok": True}))
    outcome = await outcome_of(request, command)
    return respond(request, outcome)
