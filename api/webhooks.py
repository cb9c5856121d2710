"""Provider webhook signatures: the ``Stripe-Signature`` scheme.

Header ``Stripe-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>``;
a signature older or newer than five minutes is refused, so a captured request cannot
be replayed later (a replay inside the window changes nothing: events dedupe by id).
"""

from __future__ import annotations

import hashlib
import hmac
import time

HEADER = "Stripe-Signature"
TOLERANCE_SECONDS = 300


def sign(secret: str, body: bytes, at: int | None = None) -> str:
    timestamp = int(time.time()) if at is None else at
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, body: bytes, header: str | None,
           now_epoch_seconds: float | None = None) -> bool:
    """True when ``header`` signs ``body`` with ``secret`` within the tolerance window
    (``now_epoch_seconds`` is a clock reading, for tests; money never passes here)."""
    if not header:
        return False
    parts: dict[str, list[str]] = {}
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        parts.setdefault(key, []).append(value)
    try:
        timestamp = int(parts["t"][0])
    except (KeyError, ValueError):
        return False
    now = time.time() if now_epoch_seconds is None else now_epoch_seconds
    if abs(now - timestamp) > TOLERANCE_SECONDS:
        return False
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body,
                        hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, given) for given in parts.get("v1", []))
