"""What both transports share around ``ReadModelStore.apply_batch``: decoding an event
without letting one unreadable event stop the rest, applying what operators requeued,
and the heartbeats the ops overview reads (``projections.dead_letters``)."""

from __future__ import annotations

import logging
import time
from typing import Any

from projections import dead_letters as dl
from projections.store import ReadModelStore

log = logging.getLogger("ledgercore.pipeline")


def decode(mapper: Any, stored: Any) -> Any:
    """The domain event, or ``Undecodable`` (an unknown topic, a payload no upcaster
    reads): the store dead-letters that for every read model instead of stopping."""
    try:
        return mapper.to_domain_event(stored)
    except Exception as error:  # noqa: BLE001 - becomes a dead letter, loudly
        log.error("cannot decode notification %s (%s): %s", getattr(stored, "id", "?"),
                  stored.topic, error)
        return dl.Undecodable(stored, error)


def retry_requeued(store: ReadModelStore, mapper: Any) -> int:
    return store.apply_requeued(lambda stored: mapper.to_domain_event(stored))


class Heartbeat:
    """Writes a component's ``pipeline_status`` row at most every ``every`` seconds (or
    at once when its error changes)."""

    def __init__(self, store: ReadModelStore, component: str, every: float = 2.0):
        self.store, self.component, self.every = store, component, every
        self._last = 0.0
        self._error: str | None = None

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.every

    def beat(self, *, caught_up: bool, position: int | None = None, head: int | None = None,
             error: str | None = None) -> None:
        moment = time.monotonic()
        if moment - self._last < self.every and error == self._error:
            return
        try:
            with self.store.datastore.transaction(commit=True) as cur:
                dl.heartbeat(cur, self.store.datastore.schema, self.component,
                             caught_up=caught_up, position=position, head=head, error=error)
        except Exception:  # noqa: BLE001 - a heartbeat never stops the work it reports
            log.warning("cannot record the %s heartbeat", self.component, exc_info=True)
            return
        self._last, self._error = moment, error
