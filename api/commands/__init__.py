"""Command routers: validate, authorise, call ``domain.app.Ledgercore``. They never
read read-model tables. Every response carries ``X-Ledger-Position`` when it appended."""

from __future__ import annotations

import asyncio
import threading
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
    return respond(request, await outcome_of(request, command))


async def outcome_of(request: Request, command: Command) -> Outcome:
    """The command's outcome from the batch writer."""
    future, ticket = answers(request.app).ticket()
    request.app.state.stores.app.submit(command, ticket)
    return await future


def answers(app: Any) -> Answers:
    """The app's ``Answers`` for the running event loop."""
    loop = asyncio.get_running_loop()
    found = getattr(app.state, "answers", None)
    if found is None or found.loop is not loop:
        found = app.state.answers = Answers(loop)
    return found


class Answers:
    """Outcomes the batch writer settles in its own thread, handed to the event loop in
    one wake-up for all that are ready, instead of one thread-safe call, lock and
    future chain per command (``asyncio.wrap_future``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._ready: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []

    def ticket(self) -> tuple[asyncio.Future[Any], Ticket]:
        future = self.loop.create_future()
        return future, Ticket(self, future)

    def settle(self, future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
        with self._lock:
            self._ready.append((future, value, error))
            first = len(self._ready) == 1
        if first:
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
        for future, value, error in ready:
            if future.done():  # the request was cancelled (the client went away)
                continue
            if error is None:
                future.set_result(value)
            else:
                future.set_exception(error)


class Ticket:
    """What the batch writer settles (``set_result``, ``set_exception``, ``done``)."""

    __slots__ = ("answers", "future", "settled")

    def __init__(self, answers: Answers, future: asyncio.Future[Any]):
        self.answers, self.future, self.settled = answers, future, False

    def set_result(self, value: Any) -> None:
        self.settled = True
        self.answers.settle(self.future, value, None)

    def set_exception(self, error: BaseException) -> None:
        self.settled = True
        self.answers.settle(self.future, None, error)

    def done(self) -> bool:
        return self.settled


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


__all__ = ["context", "renderer", "respond", "run", "outcome_of", "error_body"]
