"""Idempotency records: tiny aggregates whose id is derived from the key's scope.

A record is saved in the same transaction as the events of the command it answers, so
the key and its command either both exist or neither does. A second request with the
same key fails to create version 1 and is answered from the stored record.
"""

from __future__ import annotations

from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate

NAMESPACE = uuid5(NAMESPACE_URL, "https://ledgercore.invalid/idempotency")


def record_id_for(scope: str) -> UUID:
    return uuid5(NAMESPACE, scope)


class IdempotencyRecord(Aggregate):
    TOPIC = "ledgercore.IdempotencyRecord"

    class Created(Aggregate.Created):
        TOPIC = "ledgercore.IdempotencyKeyRecorded"
        scope: str
        fingerprint: str
        response: dict[str, Any]
        provenance: dict[str, Any]

    def __init__(self, scope: str, fingerprint: str, response: dict[str, Any],
                 provenance: dict[str, Any]):
        self.scope = scope
        self.fingerprint = fingerprint
        self.response = response
        self.provenance = provenance

    @classmethod
    def record(cls, scope: str, fingerprint: str, response: dict[str, Any],
               provenance: dict[str, Any], at: Any) -> IdempotencyRecord:
        return cls._create(cls.Created, id=record_id_for(scope), scope=scope,
                           fingerprint=fingerprint, response=response,
                           provenance=provenance, timestamp=at)
