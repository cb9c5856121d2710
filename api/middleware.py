"""Pure ASGI middleware: correlation ids, the request-body size limit, and no NUL
characters anywhere in a request."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

Scope = dict[str, Any]
MAX_REQUEST_ID = 128
#: a JSON ``\u0000`` escape (a NUL character), not an escaped backslash before ``u0000``
JSON_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


def nul_in(scope: Scope, body: bytes) -> str | None:
    """Where the request carries a NUL character (``path``, ``query``, ``body``), or None.
    Postgres text and jsonb cannot hold one: a NUL that reached a read model would stop
    its projection for good, and one in a filter would fail the query."""
    if "\x00" in scope.get("path", ""):
        return "path"
    query = scope.get("query_string", b"")
    if b"%00" in query or b"\x00" in query:
        return "query"
    if b"\x00" in body or JSON_NUL.search(body):
        return "body"
    return None


class RequestContext:
    """Takes ``X-Request-Id`` as the correlation id or makes one, echoes it on the
    response, and refuses an ``X-Request-Id`` over 128 characters, bodies over
    ``max_body_bytes`` and a NUL character in the path, query or body with a 400
    ``ErrorResponse`` before any handler runs."""

    def __init__(self, app: Any, max_body_bytes: int, hot: Any = None):
        #: ``api.hot_routes.HotRoutes``: tried before the request goes on to FastAPI
        self.app, self.max_body_bytes, self.hot = app, max_body_bytes, hot

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # the two headers read here (ASGI servers give names in lowercase)
        given, declared = "", None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                given = value.decode("latin-1")
            elif name == b"content-length":
                declared = value.decode("latin-1")
        correlation = given if 0 < len(given) <= MAX_REQUEST_ID else str(uuid.uuid4())
        scope.setdefault("state", {})["correlation_id"] = correlation
        if len(given) > MAX_REQUEST_ID:
            await self._refuse(send, correlation, f"X-Request-Id must be at most "
                               f"{MAX_REQUEST_ID} characters",
                               {"fields": [{"location": "header", "field": "X-Request-Id",
                                            "reason": "too_long", "message": "at most 128"}]})
            return

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [
                    (b"x-request-id", correlation.encode("latin-1"))]
            await send(message)

        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large(send_with_id, correlation)
            return
        body = b""
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                await self._too_large(send_with_id, correlation)
                return
        where = nul_in(scope, body)
        if where is not None:
            await self._refuse(send_with_id, correlation,
                               f"the request {where} contains a NUL character",
                               {"fields": [{"location": where, "field": where,
                                            "reason": "nul_character",
                                            "message": "NUL (U+0000) is not accepted"}]})
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        if self.hot is not None and await self.hot.serve(scope, body, replay, send_with_id):
            return
        await self.app(scope, replay, send_with_id)

    async def _too_large(self, send: Any, correlation: str) -> None:
        await self._refuse(send, correlation, "request body too large",
                           {"reason": "body_too_large", "limit_bytes": self.max_body_bytes})

    @staticmethod
    async def _refuse(send: Any, correlation: str, message: str, details: dict[str, Any]) -> None:
        """A 400 ``validation_error`` answered before any handler runs."""
        payload = json.dumps({"code": "validation_error", "message": message,
                              "details": details, "correlation_id": correlation}).encode()
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})
