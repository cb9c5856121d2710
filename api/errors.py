"""The contract's ``ErrorResponse`` for every error, FastAPI's included (400, never 422)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from eventsourcing.persistence import InterfaceError as StoreInterfaceError
from eventsourcing.persistence import OperationalError as StoreOperationalError

from domain.errors import DomainError

log = logging.getLogger("ledgercore.api")

#: HTTP status for each kind of domain refusal (api-conventions §5.3, billing §6)
KIND_STATUS = {"invalid": 400, "conflict": 409, "not_found": 404, "forbidden": 403}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, **details: Any):
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details


def correlation_id(request: Request) -> str:
    return request.scope.get("state", {}).get("correlation_id") or "unknown"


def error_body(code: str, message: str, details: dict[str, Any] | None,
               correlation: str) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message, "correlation_id": correlation}
    if details:
        body["details"] = details
    return body


def domain_error_status(error: DomainError) -> int:
    return KIND_STATUS[error.kind]


def render_domain_error(error: DomainError, correlation: str) -> dict[str, Any]:
    return {"status": domain_error_status(error),
            "body": error_body(error.code, error.message, error.details, correlation)}


def _json(status: int, body: dict[str, Any],
          headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=body, headers=headers)


def _location(loc: tuple[Any, ...]) -> tuple[str, str]:
    where = str(loc[0]) if loc else "body"
    field = ".".join(str(part) for part in loc[1:]) or where
    return where, field


def allowed_methods(request: Request) -> str:
    """Every method some route serves at this path, for a 405's ``Allow`` (RFC 9110
    §15.5.6). Starlette names only the first route that matched the path, and a path
    here is often served by two routes (``GET`` and ``POST`` of one collection)."""
    methods: set[str] = set()
    for route in _routes(request.app.router.routes):
        if isinstance(route, Route) and route.methods:
            match, _ = route.matches(request.scope)
            if match is not Match.NONE:
                methods |= route.methods
    return ", ".join(sorted(methods))


def _routes(routes: list[Any]) -> Iterator[Any]:
    """The routes, with included routers opened (FastAPI ≥ 0.16x keeps an included router
    as one entry holding the ``original_router``; ours are included without a prefix)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _routes(inner.routes)
        else:
            yield route


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _json(exc.status, error_body(exc.code, exc.message, exc.details,
                                            correlation_id(request)))

    @app.exception_handler(DomainError)
    async def domain_error(request: Request, exc: DomainError) -> JSONResponse:
        rendered = render_domain_error(exc, correlation_id(request))
        return _json(rendered["status"], rendered["body"])

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = []
        for err in exc.errors():
            where, field = _location(tuple(err.get("loc", ())))
            fields.append({"location": where, "field": field,
                           "reason": err.get("type", "invalid"), "message": err.get("msg", "")})
        return _json(400, error_body("validation_error", "request validation failed",
                                     {"fields": fields}, correlation_id(request)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        reason = {404: "route_not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = allowed_methods(request) or headers.get("Allow", "")
        return _json(exc.status_code, error_body("invalid_request", str(exc.detail),
                                                 {"reason": reason}, correlation_id(request)),
                     headers=headers or None)

    @app.exception_handler(StoreOperationalError)
    @app.exception_handler(StoreInterfaceError)
    async def store_unavailable(request: Request, exc: Exception) -> JSONResponse:
        log.warning("event store unavailable: %s", exc)
        return _json(503, error_body("service_unavailable", "the event store is unavailable",
                                     None, correlation_id(request)))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error (correlation_id=%s)", correlation_id(request))
        return _json(500, error_body("internal_error", "internal error", None,
                                     correlation_id(request)))
