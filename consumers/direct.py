"""The direct transport: follow the notification log, apply it in batches.

An event a read model cannot apply (or that cannot be decoded at all) becomes a dead
letter for that read model (``projections.store``); the projector goes on with the
rest. What operators requeue is applied at the start of every catch-up.

The projector wakes at every commit of the writers, so batches are small: the
bookkeeping around them (requeued events, the start position, every read model's
tracking and watermark) takes a few statements, whatever the number of read models."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import psycopg
from eventsourcing.application import Application
from psycopg.conninfo import make_conninfo

from consumers.pipeline import Heartbeat, decode, retry_requeued
from projections.store import Item, ReadModelStore

log = logging.getLogger("ledgercore.direct")
SOURCE = "log"


def read_items(app: Application[Any], after: int, limit: int) -> list[Item]:
    notifications = app.recorder.select_notifications(start=after, limit=limit,
                                                      inclusive_of_start=False)
    return [Item(n.id, decode(app.mapper, n), n) for n in notifications]


def catch_up(app: Application[Any], store: ReadModelStore, batch_size: int = 500) -> int:
    """Apply what operators requeued, then everything the log holds now; return the
    position reached."""
    retry_requeued(store, app.mapper)
    position = store.lowest_tracked(SOURCE)
    while True:
        items = read_items(app, position, batch_size)
        if not items:
            return position
        # the log is read again from the tracking after a crash: no need to wait for
        # the WAL flush (see ``projections.store``)
        store.apply_batch(SOURCE, items, watermark=items[-1].notification_id, synchronous=False)
        position = items[-1].notification_id


class DirectProjector:
    """Runs ``catch_up`` in a thread whenever the log may have grown.

    Wakes on Postgres NOTIFY from the event store (any process's writes), on
    ``poke()`` (this process's writes) and every ``idle_seconds`` regardless. An
    event a read model cannot apply is dead-lettered and the rest go on; a batch
    that fails for another reason (the database is unreachable) is retried with
    backoff and never skipped: the error is logged, exposed as ``last_error`` and in
    the ``projector:direct`` heartbeat the ops overview reads.
    """

    def __init__(self, app: Application[Any], store: ReadModelStore, dsn: str,
                 channel: str | None = None, idle_seconds: float = 1.0):
        self.app, self.store, self.dsn = app, store, dsn
        #: the channel the event store's insert NOTIFYs (the library names it after its table)
        self.channel = channel or getattr(app.recorder, "channel_name", "stored_events")
        self.idle_seconds = idle_seconds
        self.last_error: str | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.heartbeat = Heartbeat(store, "projector:direct")

    def poke(self) -> None:
        self._wake.set()

    def start(self) -> DirectProjector:
        for target in (self._run, self._listen):
            thread = threading.Thread(target=target, name=f"direct-{target.__name__}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=5)

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            self._wake.clear()
            try:
                position = catch_up(self.app, self.store)
                self.last_error = None
                backoff = 0.05
                self.heartbeat.beat(caught_up=True, position=position, head=position)
            except Exception as error:  # noqa: BLE001 - reported, retried, never skipped
                self.last_error = f"{type(error).__name__}: {error}"
                log.exception("direct projector batch failed; retrying")
                self.heartbeat.beat(caught_up=False, error=self.last_error[:2000])
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            self._wake.wait(self.idle_seconds)

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(make_conninfo(self.dsn), autocommit=True) as conn:
                    conn.execute(f'LISTEN "{self.channel}"')
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=0.5, stop_after=1):
                            self._wake.set()
            except psycopg.Error:
                log.warning("LISTEN connection lost; reconnecting")
                time.sleep(0.5)
