"""The Idempotency-Key gate (api-conventions §4.2) at the HTTP edge.

The key is scoped to (principal, operation, key); the fingerprint covers the
validated body, the path parameters and ``X-Project-ID``. The record itself is a
domain aggregate saved with the command's events (``domain.idempotency``), so there is
no window in which a key exists without its outcome, and keys do not expire.
"""

from __future__ import annotations

import hashlib
from typing import Any

from fastapi import Request
from pydantic import BaseModel

from api.auth import Principal
from api.errors import ApiError
from domain.canonical import canonical_json
from domain.provenance import IdempotencyClaim

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 128


def checked_key(request: Request) -> str | None:
    """The request's Idempotency-Key, or None; 400 if it is malformed. Also for an
    operation that declares the header but has nothing to replay (a precheck)."""
    key = request.headers.get(HEADER)
    if key is not None and (not key or len(key) > MAX_KEY_LENGTH or not key.isprintable()):
        raise ApiError(400, "validation_error",
                       f"{HEADER} must be 1 to {MAX_KEY_LENGTH} printable characters",
                       header=HEADER)
    return key


def claim(request: Request, principal: Principal, operation_id: str,
          body: dict[str, Any] | BaseModel | None) -> IdempotencyClaim | None:
    """The request's claim, or None without a key. ``body``: the validated body, or its
    model (dumped only when there is a key to fingerprint)."""
    key = checked_key(request)
    if key is None:
        return None
    if isinstance(body, BaseModel):
        body = body.model_dump()
    fingerprint = hashlib.sha256(canonical_json({
        "body": body,
        "path": {k: str(v) for k, v in request.path_params.items()},
        "project": request.headers.get("x-project-id"),
    })).hexdigest()
    scope = f"{principal.actor_type}:{principal.user_id}:{operation_id}:{key}"
    return IdempotencyClaim(scope=scope, fingerprint=fingerprint)


def required_claim(request: Request, principal: Principal, operation_id: str,
                   body: dict[str, Any] | None) -> IdempotencyClaim:
    """``claim`` for an operation whose contract says the key is mandatory: without
    one, 400."""
    found = claim(request, principal, operation_id, body)
    if found is None:
        raise ApiError(400, "validation_error", f"this operation requires an {HEADER}",
                       fields=[{"location": "header", "field": HEADER, "reason": "missing",
                                "message": "required"}])
    return found
