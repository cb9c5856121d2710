"""Redis cache of query responses.

Keys name the operation, the caller's whole scope and the read model's position, so a
new event makes a new key (invalidation by construction) and no entry is ever served
to another principal. Redis missing or down means ``bypass``, never an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import redis

log = logging.getLogger("ledgercore.cache")


class ReadCache:
    def __init__(self, url: str | None, prefix: str, ttl_seconds: int):
        self.prefix, self.ttl = prefix, ttl_seconds
        self.client = (redis.Redis.from_url(url, socket_timeout=0.2, socket_connect_timeout=0.2)
                       if url else None)

    def key(self, operation_id: str, scope: str, query: dict[str, Any], position: int) -> str:
        digest = hashlib.sha256(json.dumps([scope, query], sort_keys=True).encode()).hexdigest()
        return f"{self.prefix}:rm:{operation_id}:{digest[:32]}:{position}"

    def get(self, key: str) -> tuple[dict[str, Any] | None, str]:
        """(body, 'hit'|'miss'|'bypass')."""
        if self.client is None:
            return None, "bypass"
        try:
            raw = self.client.get(key)
        except redis.RedisError as error:
            log.warning("cache unavailable: %s", error)
            return None, "bypass"
        if raw is None:
            return None, "miss"
        return json.loads(raw), "hit"

    def put(self, key: str, body: dict[str, Any]) -> None:
        if self.client is None:
            return
        try:
            self.client.set(key, json.dumps(body), ex=self.ttl)
        except redis.RedisError as error:
            log.warning("cache unavailable: %s", error)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
