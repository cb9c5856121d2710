"""Domain errors. Each carries a stable code from the contract's vocabulary; the API
decides which HTTP status a code maps to."""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    code = "invalid_request"
    #: invalid | conflict | not_found | forbidden: what kind of refusal (the API picks the status)
    kind = "invalid"
    #: a final outcome that an idempotency record may store and replay
    final = True

    def __init__(self, message: str, **details: Any):
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidRequest(DomainError):
    code = "invalid_request"


class InsufficientBalance(DomainError):
    code = "insufficient_balance"


class IdempotencyKeyReused(DomainError):
    """Same key, different request: never stored, never executed."""

    code = "invalid_request"
    kind = "conflict"
    final = False

    def __init__(self) -> None:
        super().__init__(
            "Idempotency-Key was already used with a different request",
            reason="idempotency_key_reused",
        )


class ConcurrentUpdate(DomainError):
    """Optimistic concurrency lost too many times in a row."""

    code = "invalid_request"
    kind = "conflict"
    final = False

    def __init__(self, attempts: int) -> None:
        super().__init__(
            "the resource was changed concurrently; retry the request",
            reason="concurrent_update",
            attempts=attempts,
        )
