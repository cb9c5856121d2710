"""Hot routes: the busiest commands served without FastAPI's routing and dependency
solving, by the very endpoint function FastAPI would call.

FastAPI's per-request machinery (matching the path against every route, solving the
dependency graph, reading and checking the body) cost about twice what our handler
does for ``adminAdjustBalance``. A hot route does the same steps directly for one
operation: it takes the method and path from the operation's ``APIRoute``, matches a
canonical lowercase UUID in each path parameter, parses a JSON body (``Content-Type:
application/json``) and validates it with the endpoint's own body model, runs the
endpoint's own dependency, then awaits the endpoint and sends its response.

It never decides anything FastAPI would decide differently: whatever it does not take
as well-formed (another spelling of an id, a body that does not parse or validate, a
dependency that refuses, another content type) is handed to FastAPI untouched, which
answers as it always does. Nothing before the endpoint has side effects, so that hand-
over is safe. An exception from the endpoint itself is answered by the app's own
exception handlers, never retried.

Imports: FastAPI/Starlette and pydantic only; the endpoints are given by ``api.app``.
"""

from __future__ import annotations

import inspect
import json
import re
import typing
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from fastapi import FastAPI, Request
from fastapi.params import Depends
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.responses import Response

Scope = dict[str, Any]
Send = Callable[[dict[str, Any]], Awaitable[None]]
CANONICAL_UUID = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


class Refused(Exception):
    """The request is not one a hot route takes; FastAPI answers it."""


@dataclass(frozen=True)
class HotRoute:
    method: str
    pattern: re.Pattern[str]
    endpoint: Callable[..., Awaitable[Response]]
    #: the endpoint's parameters: path ids (UUIDs), the body (name, model), the
    #: request's name, and each dependency (name, async function of the request)
    path_params: tuple[str, ...]
    body: tuple[str, type[BaseModel]] | None
    request_param: str | None
    dependencies: tuple[tuple[str, Callable[[Request], Awaitable[Any]]], ...]

    @classmethod
    def of(cls, route: APIRoute) -> HotRoute:
        """The hot route of an ``APIRoute`` whose endpoint takes only UUID path
        parameters, one pydantic body, the ``Request`` and async dependencies of the
        request alone."""
        if len(route.methods) != 1:
            raise ValueError(f"{route.path}: a hot route serves one method")
        hints = typing.get_type_hints(route.endpoint)
        names = re.findall(r"{(\w+)}", route.path)
        body = None
        request_param = None
        dependencies = []
        for name, parameter in inspect.signature(route.endpoint).parameters.items():
            hint = hints.get(name)
            if isinstance(parameter.default, Depends):
                dependencies.append((name, parameter.default.dependency))
            elif hint is Request:
                request_param = name
            elif hint is UUID and name in names:
                continue
            elif inspect.isclass(hint) and issubclass(hint, BaseModel) and body is None:
                body = (name, hint)
            else:
                raise ValueError(f"{route.path}: parameter {name} cannot be served hot")
        for _, dependency in dependencies:
            if not inspect.iscoroutinefunction(dependency):
                raise ValueError(f"{route.path}: a hot route's dependencies are async")
        regex = "".join(f"(?P<{part}>{CANONICAL_UUID})" if index % 2 else re.escape(part)
                        for index, part in enumerate(re.split(r"{(\w+)}", route.path)))
        return cls(next(iter(route.methods)), re.compile(regex), route.endpoint, tuple(names),
                   body, request_param, tuple(dependencies))

    async def arguments(self, match: re.Match[str], request: Request,
                        body: bytes) -> dict[str, Any]:
        """The endpoint's arguments, or ``Refused``."""
        values: dict[str, Any] = {name: UUID(match[name]) for name in self.path_params}
        if self.body is not None:
            if request.headers.get("content-type", "").lower() != "application/json":
                raise Refused()
            try:
                values[self.body[0]] = self.body[1].model_validate(json.loads(body))
            except (ValueError, ValidationError):  # JSONDecodeError is a ValueError
                raise Refused() from None
        if self.request_param is not None:
            values[self.request_param] = request
        for name, dependency in self.dependencies:
            try:
                values[name] = await dependency(request)
            except Exception:  # noqa: BLE001 - FastAPI runs it again and answers the refusal
                raise Refused() from None
        return values


class HotRoutes:
    """The hot routes of an app, tried by ``api.middleware.RequestContext`` before the
    request goes to FastAPI."""

    def __init__(self, app: FastAPI, routes: Sequence[APIRoute]):
        self.app = app
        self.routes = [HotRoute.of(route) for route in routes]
        #: requests answered here, and handed on to FastAPI after matching a hot route
        self.served = self.handed_on = 0

    async def serve(self, scope: Scope, body: bytes, receive: Any, send: Send) -> bool:
        """Answer the request if a hot route takes it; False hands it to FastAPI."""
        for route in self.routes:
            if scope["method"] != route.method:
                continue
            match = route.pattern.fullmatch(scope["path"])
            if match is None:
                continue
            scope["path_params"] = match.groupdict()
            request = Request(scope, receive)
            try:
                arguments = await route.arguments(match, request, body)
            except Refused:
                del scope["path_params"]
                self.handed_on += 1
                return False
            try:
                response = await route.endpoint(**arguments)
            except Exception as error:  # noqa: BLE001 - answered as FastAPI would
                response = await self._handled(request, error)
            await response(scope, receive, send)
            self.served += 1
            return True
        return False

    async def _handled(self, request: Request, error: Exception) -> Response:
        """The app's exception handler for ``error`` (by its class's MRO)."""
        for kind in type(error).__mro__:
            handler = self.app.exception_handlers.get(kind)
            if handler is not None:
                response = handler(request, error)
                return await response if inspect.isawaitable(response) else response
        raise error
