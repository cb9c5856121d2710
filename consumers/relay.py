"""The Kafka relay: follow the notification log, publish every event with ``acks=all``
(key = aggregate id), then a watermark to every partition, and only after the broker
acknowledged all of it record the relay's position. A crash before that record means
a republish, which projectors skip by their per-partition tracking."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from eventsourcing.application import Application
from eventsourcing.persistence import Tracking
from kafka import KafkaProducer

from consumers.wire import ensure_topic, event_message, watermark_message
from projections.store import ReadModelStore

log = logging.getLogger("ledgercore.relay")


class Relay:
    def __init__(self, app: Application[Any], store: ReadModelStore, bootstrap: str, topic: str,
                 partitions: int, batch_size: int = 500, crash_at: str | None = None):
        self.app, self.store, self.topic = app, store, topic
        self.batch_size, self.crash_at = batch_size, crash_at
        ensure_topic(bootstrap, topic, partitions)
        self.producer = KafkaProducer(
            bootstrap_servers=bootstrap, acks="all", retries=10, linger_ms=2,
            max_in_flight_requests_per_connection=1, client_id="ledgercore-relay")
        self.partitions = sorted(self.producer.partitions_for(topic))
        self.tracking_name = f"relay|{topic}"
        self._stop = threading.Event()

    def position(self) -> int:
        return self.store.max_tracking_id(self.tracking_name) or 0

    def run_once(self) -> int:
        """Publish the next batch; return how many events it held."""
        notifications = self.app.recorder.select_notifications(
            start=self.position(), limit=self.batch_size, inclusive_of_start=False)
        if not notifications:
            return 0
        futures = []
        for notification in notifications:
            key, value, headers = event_message(notification)
            futures.append(self.producer.send(self.topic, key=key, value=value, headers=headers))
        last = notifications[-1].id
        for partition in self.partitions:
            futures.append(self.producer.send(self.topic, value=b"", partition=partition,
                                              headers=watermark_message(last)))
        self.producer.flush()
        for future in futures:
            future.get(timeout=30)  # raises unless the broker acknowledged
        if self.crash_at == "relay_after_publish":
            os._exit(137)
        self.store.insert_tracking(Tracking(self.tracking_name, last))
        return len(notifications)

    def run_forever(self, idle_seconds: float = 0.05) -> None:
        """Publish until stopped. A failed batch (broker or database unreachable) is
        logged and published again after a back-off: its position was not recorded."""
        backoff = 0.1
        while not self._stop.is_set():
            try:
                published = self.run_once()
                backoff = 0.1
            except Exception:  # noqa: BLE001 - retried, never skipped
                log.exception("relay batch failed; retrying in %.1fs", backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            if published == 0:
                self._stop.wait(idle_seconds)

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.producer.close(timeout=10)
