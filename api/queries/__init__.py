"""Query routers: read only read-model tables, through the Redis cache. They never load
aggregates. A read model that cannot be read answers 503, never an empty answer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from fastapi import Request
from fastapi.responses import JSONResponse

from api.auth import Principal
from api.consistency import current_state, requested_position, wait_for
from api.errors import ApiError

CACHE_HEADER = "X-Read-Model-Cache"


@contextmanager
def read_model_errors() -> Iterator[None]:
    try:
        yield
    except psycopg.Error as error:
        raise ApiError(503, "service_unavailable", "the read model is unavailable",
                       reason=type(error).__name__) from None


def cached_query(request: Request, principal: Principal, *, operation_id: str,
                 projection: str | tuple[str, ...], query: dict[str, Any],
                 compute: Callable[[Any], dict[str, Any]]) -> JSONResponse:
    """Answer from the cache or the read model, honouring ``X-Ledger-Position``."""
    stores, cache, settings = (request.app.state.stores, request.app.state.cache,
                               request.app.state.settings)
    wanted = requested_position(request)
    with read_model_errors():
        cached = cache.client is not None  # requeued events and rebuilds move no position
        if wanted is not None:
            reached, position = wait_for(stores, projection, wanted, settings.read_wait_seconds)
            repairs = current_state(stores, projection, repairs=True)[1] if cached else 0
        else:
            reached = True
            position, repairs = current_state(stores, projection, repairs=cached)
        if cached:
            query = {**query, "_repairs": repairs}
        key = cache.key(operation_id, principal.scope_key, query, position)
        body, state = cache.get(key)
        if body is None:
            with stores.query_pool.connection() as conn, conn.cursor() as cur:
                body = compute(cur)
            if state == "miss":
                cache.put(key, body)
    response = JSONResponse(body)
    response.headers[CACHE_HEADER] = state if reached else "stale"
    response.headers["X-Ledger-Read-Position"] = str(position)
    return response
