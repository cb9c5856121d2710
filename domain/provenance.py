"""Who and what caused a command, carried by every event it appends."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from uuid import uuid4

SOURCES = ("api", "webhook", "admin", "system", "replay")
ACTOR_TYPES = ("user", "service_account", "node", "system")


@dataclass(frozen=True)
class IdempotencyClaim:
    """A request's claim on an idempotency key.

    ``scope`` names the key within its principal and operation; ``fingerprint`` is a
    digest of everything that makes two requests "the same".
    """

    scope: str
    fingerprint: str


@dataclass(frozen=True)
class CommandContext:
    actor_id: str
    actor_type: str = "user"
    actor_role: str = "user"
    source: str = "api"
    correlation_id: str = field(default_factory=lambda: str(uuid4()))
    causation_id: str | None = None
    idempotency: IdempotencyClaim | None = None
    now: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"unknown source {self.source!r}")
        if self.actor_type not in ACTOR_TYPES:
            raise ValueError(f"unknown actor type {self.actor_type!r}")

    def provenance(self) -> dict[str, Any]:
        return {
            "actor_id": self.actor_id,
            "actor_type": self.actor_type,
            "actor_role": self.actor_role,
            "source": self.source,
            "correlation_id": self.correlation_id,
            "causation_id": self.causation_id,
        }
