"""Command routers: validate, authorise, call ``domain.app.Ledgercore``. They never
read read-model tables. Every response carries ``X-Ledger-Position`` when it appended."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from api.auth import Principal
from api.consistency import HEADER as POSITION_HEADER
from api.errors import correlation_id, error_body, render_domain_error
from domain.commands import Command, Outcome
from domain.errors import DomainError
from domain.provenance import CommandContext, IdempotencyClaim


def context(request: Request, principal: Principal, source: str,
            idempotency: IdempotencyClaim | None) -> CommandContext:
    if principal.actor_type in ("service_account", "node"):
        role = principal.actor_type
    else:
        role = "admin" if principal.can("platform.admin") else "user"
    return CommandContext(actor_id=str(principal.user_id), actor_type=principal.actor_type,
                          actor_role=role, source=source,
                          correlation_id=correlation_id(request), idempotency=idempotency)


def renderer(request: Request, success_status: int, shape: Any):
    """The response a command's result (or final error) is stored and answered as."""
    def render(result: dict[str, Any] | DomainError) -> dict[str, Any]:
        if isinstance(result, DomainError):
            return render_domain_error(result, correlation_id(request))
        return {"status": success_status, "body": shape(result)}
    return render


async def run(request: Request, command: Command) -> JSONResponse:
    """Hand the command to the batch writer and answer its outcome."""
    outcome = await asyncio.wrap_future(request.app.state.stores.app.submit(command))
    return respond(request, outcome)


def respond(request: Request, outcome: Outcome) -> JSONResponse:
    response = JSONResponse(status_code=outcome.response["status"], content=outcome.response["body"])
    if outcome.position is not None:
        response.headers[POSITION_HEADER] = str(outcome.position)
        projector = getattr(request.app.state, "projector", None)
        if projector is not None and not outcome.replayed:
            projector.poke()
    if outcome.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


__all__ = ["context", "renderer", "respond", "run", "error_body"]
