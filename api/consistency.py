"""Read-your-writes: commands answer the position of their last event in the
``X-Ledger-Position`` header; a query that sends it back waits (bounded) until the read
model has reached it, and otherwise answers what it has, marked ``stale``."""

from __future__ import annotations

import time

from fastapi import Request

from api.errors import ApiError
from infra.db import Stores
from projections.store import position, repair_generation

HEADER = "X-Ledger-Position"


def requested_position(request: Request) -> int | None:
    raw = request.headers.get(HEADER)
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 18:
        raise ApiError(400, "validation_error", f"{HEADER} must be a non-negative integer",
                       header=HEADER)
    return int(raw)


def current_position(stores: Stores, projection: str | tuple[str, ...]) -> int:
    """How far a read model has applied the event log; for several, the least of them
    (an answer that reads them all is as current as the one furthest behind)."""
    return current_state(stores, projection, repairs=False)[0]


def current_state(stores: Stores, projection: str | tuple[str, ...], *,
                  repairs: bool) -> tuple[int, int]:
    """(position, repair generation) on one connection; the generation counts changes
    that moved no position (requeued events, rebuilds), 0 unless ``repairs``."""
    names = (projection,) if isinstance(projection, str) else projection
    with stores.query_pool.connection() as conn, conn.cursor() as cur:
        at = min(position(cur, name, stores.position_source_prefix()) for name in names)
        return at, repair_generation(cur, names) if repairs else 0


def wait_for(stores: Stores, projection: str | tuple[str, ...], wanted: int,
             timeout: float) -> tuple[bool, int]:
    """(reached, position). Polls with a short backoff; never longer than ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        now = current_position(stores, projection)
        if now >= wanted:
            return True, now
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False, now
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.05)
