"""Cursor pagination (api-conventions §6): opaque, HMAC-signed cursors bound to their
operation, sort, filters and caller scope; keyset order with an ``id`` tie-break."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from api.errors import ApiError

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200


@dataclass(frozen=True)
class PageRequest:
    page_size: int
    after: list[Any] | None  # the last row's sort key and id, or None for page one


def _binding(operation_id: str, sort: str, filters: dict[str, Any], scope: str) -> str:
    raw = json.dumps([operation_id, sort, filters, scope], sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def _sign(secret: str, payload: bytes) -> bytes:
    return hmac.new(secret.encode(), payload, hashlib.sha256).digest()[:16]


def encode_cursor(secret: str, *, operation_id: str, sort: str, filters: dict[str, Any],
                  scope: str, last_key: list[Any]) -> str:
    payload = json.dumps({"v": 1, "b": _binding(operation_id, sort, filters, scope),
                          "k": last_key}, separators=(",", ":"), default=str).encode()
    return base64.urlsafe_b64encode(_sign(secret, payload) + payload).decode().rstrip("=")


def page_request(secret: str, *, cursor: str | None, page_size: int | None,
                 operation_id: str, sort: str, filters: dict[str, Any], scope: str,
                 max_page_size: int = MAX_PAGE_SIZE,
                 default_page_size: int = DEFAULT_PAGE_SIZE) -> PageRequest:
    size = default_page_size if page_size is None else page_size
    if not 1 <= size <= max_page_size:
        raise ApiError(400, "validation_error", f"page_size must be 1 to {max_page_size}",
                       fields=[{"location": "query", "field": "page_size",
                                "reason": "out_of_range"}])
    if cursor is None:
        return PageRequest(size, None)
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        signature, payload = raw[:16], raw[16:]
        if not hmac.compare_digest(signature, _sign(secret, payload)):
            raise ValueError("bad signature")
        decoded = json.loads(payload)
    except (ValueError, TypeError):
        raise ApiError(400, "invalid_request", "the cursor is not valid",
                       reason="cursor_invalid") from None
    if decoded.get("b") != _binding(operation_id, sort, filters, scope):
        raise ApiError(400, "invalid_request",
                       "the cursor was issued for another sort, filter or caller",
                       reason="cursor_mismatch")
    return PageRequest(size, list(decoded["k"]))


def pagination_block(next_cursor: str | None, page_size: int) -> dict[str, Any]:
    return {"next_cursor": next_cursor, "page_size": page_size}


def resume_sorted(after: list[Any] | None, sort: str, time_fields: Collection[str],
                  since: datetime | None) -> tuple[tuple[Any, UUID] | None, datetime | None]:
    """Where a sorted, time-windowed list resumes: the keyset position ``(value, id)``
    and the window's start the cursor carries (a relative ``time_range`` stays the
    window it resolved to on the first page). ``value`` is a datetime when the sort
    field is one of ``time_fields``."""
    if after is None:
        return None, since
    value, last_id, window = after
    if sort.rpartition("_")[0] in time_fields:
        value = datetime.fromisoformat(value)
    return (value, UUID(last_id)), (None if window is None else datetime.fromisoformat(window))
