"""The Kafka relay: follow the notification log, publish every event with ``acks=all``
(key = aggregate id), then a watermark to every partition, and only after the broker
acknowledged all of it record the relay's position. A crash before that record means
a republish, which projectors skip by their per-partition tracking.

An event that can never be published (larger than the broker accepts, not
serializable) is parked in ``outbox_failed`` in the same transaction as the position,
and the relay goes on: it never blocks the log behind it. An operator requeues it (the
relay publishes it again, marked ``late``: projectors apply it once, outside the
tracking order) or discards it. Any other failure (broker or database unreachable)
fails the whole batch, which is published again after a back-off.

A batch costs few database round trips: the failed outbox is read once (what is
requeued is looked for only when it holds something), and the relay's position is
kept in memory between batches. Only this relay writes it; a relay started twice by
mistake fails to record a batch the other recorded first (the tracking upsert never
stands still or moves back), and every failed batch forgets the position, so the
batch after it starts from the recorded one."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.persistence import Tracking
from kafka import KafkaProducer
from kafka.errors import (CorruptRecordError, InvalidRecordError, KafkaError,
                          MessageSizeTooLargeError, RecordListTooLargeError)

from consumers.pipeline import Heartbeat
from consumers.wire import ensure_topic, event_message, watermark_message
from projections import dead_letters as dl
from projections.store import ReadModelStore

log = logging.getLogger("ledgercore.relay")
#: broker answers that no retry can change
UNPUBLISHABLE = (MessageSizeTooLargeError, RecordListTooLargeError, InvalidRecordError,
                 CorruptRecordError)


#: The producer's settings (the bench's broker reference uses them too): acks from every
#: replica, one request in flight, and kafka-python's idempotent producer (its default).
#: Without it, the Kafka fault test (broker paused and restarted under load) found
#: events missing from the read models.
PRODUCER: dict[str, Any] = {"acks": "all", "retries": 10, "linger_ms": 2,
                            "max_in_flight_requests_per_connection": 1,
                            "allow_auto_create_topics": False}
#: How long a batch may take to be acknowledged, flush included, before it fails and is
#: published again from the recorded position by a new producer. A producer can wait
#: without end for a broker that restarted empty to give it a producer id.
PUBLISH_SECONDS = 30


def unpublishable(error: BaseException) -> bool:
    """The event itself cannot be published (as opposed to the broker being away)."""
    if isinstance(error, UNPUBLISHABLE):
        return True
    return not isinstance(error, (KafkaError, OSError))


class Relay:
    def __init__(self, app: Application[Any], store: ReadModelStore, bootstrap: str, topic: str,
                 partitions: int, batch_size: int = 500, crash_at: str | None = None,
                 max_request_size: int | None = None, publish_seconds: float = PUBLISH_SECONDS):
        self.app, self.store, self.topic = app, store, topic
        self.publish_seconds = publish_seconds
        self.batch_size, self.crash_at = batch_size, crash_at
        self.bootstrap, self.partition_count = bootstrap, partitions
        self.max_request_size = max_request_size or 1048576
        self._connect()
        self.tracking_name = f"relay|{topic}"
        #: the recorded position, once read (None: read it from the tracking table)
        self._position: int | None = None
        self.heartbeat = Heartbeat(store, f"relay:{topic}")
        self._stop = threading.Event()

    def _connect(self) -> None:
        """Ensure the topic and open a producer. Also after a broker failure: a broker
        that restarted without the producer's id answers it with a fatal error, after
        which that producer fails every send, and an emptied broker has no topic."""
        ensure_topic(self.bootstrap, self.topic, self.partition_count)
        self.producer = KafkaProducer(**PRODUCER, bootstrap_servers=self.bootstrap,
                                      client_id="ledgercore-relay",
                                      max_request_size=self.max_request_size)
        self.partitions = sorted(self.producer.partitions_for(self.topic))

    def _reconnect(self) -> None:
        try:
            self.producer.close(timeout=0)
        except Exception:  # noqa: BLE001 - it is replaced either way
            pass
        try:
            self._connect()
        except Exception:  # noqa: BLE001 - the broker is still away: the next retry tries again
            log.warning("cannot reach the broker yet", exc_info=True)

    def position(self) -> int:
        if self._position is None:
            self._position = self.store.max_tracking_id(self.tracking_name) or 0
        return self._position

    def run_once(self) -> int:
        """Publish what operators requeued, then the next batch; return how many
        events the batch held. If it fails, the position is read again next time."""
        try:
            return self._run_once()
        except BaseException:
            self._position = None
            raise

    def _run_once(self) -> int:
        # only an aggregate with an unpublished event can have one requeued
        blocked = self._outbox_blocked()
        if blocked and self.republish_requeued():
            blocked = self._outbox_blocked()  # what it republished blocks no more
        position = self.position()
        notifications = self.app.recorder.select_notifications(
            start=position, limit=self.batch_size, inclusive_of_start=False)
        if not notifications:
            self.heartbeat.beat(caught_up=True, position=position, head=position)
            return 0
        parked: list[tuple[Any, BaseException | None]] = []
        futures = []
        for notification in notifications:
            if notification.originator_id in blocked:
                parked.append((notification, None))  # behind an unpublished event
                continue
            try:
                key, value, headers = event_message(notification)
                futures.append((notification, self.producer.send(
                    self.topic, key=key, value=value, headers=headers)))
            except Exception as error:
                if not unpublishable(error):
                    raise
                parked.append((notification, error))
                blocked.add(notification.originator_id)
        last = notifications[-1].id
        marks = [self.producer.send(self.topic, value=b"", partition=partition,
                                    headers=watermark_message(last))
                 for partition in self.partitions]
        self.producer.flush(timeout=self.publish_seconds)  # a KafkaTimeoutError fails the batch
        for notification, future in futures:
            try:
                future.get(timeout=self.publish_seconds)  # raises unless the broker acknowledged
            except Exception as error:
                if not unpublishable(error):
                    raise
                parked.append((notification, error))
        # an event of the same aggregate published after one that failed in flight
        # is a known gap: it is logged with the failure, and the requeue comes late
        for future in marks:
            future.get(timeout=self.publish_seconds)
        if self.crash_at == "relay_after_publish":
            os._exit(137)
        self._record(parked, last)
        self._position = last
        if self.heartbeat.due():
            self.heartbeat.beat(caught_up=False, position=last,
                                head=self.app.recorder.max_notification_id())
        return len(notifications)

    def _outbox_blocked(self) -> set[UUID]:
        with self.store.datastore.cursor() as cur:
            return dl.outbox_blocked(cur, self.store.datastore.schema)

    def _record(self, parked: list[tuple[Any, BaseException | None]], last: int) -> None:
        """Park what was not published and record the position ``last``, in one
        transaction (a single autocommit statement when nothing is parked)."""
        schema = self.store.datastore.schema
        tracking = Tracking(self.tracking_name, last)
        if not parked:
            with self.store.datastore.cursor() as cur:
                self.store._insert_tracking(cur, tracking)
            return
        with self.store.datastore.transaction(commit=True) as cur:
            for notification, error in sorted(parked, key=lambda p: p[0].id):
                if error is not None:
                    log.error("cannot publish notification %s (%s): %s; parked in the "
                              "failed outbox", notification.id, notification.topic, error)
                dl.park_outbox(cur, schema, notification, self._aggregate_type(notification),
                               error, "failed" if error is not None else "parked")
            self.store._insert_tracking(cur, tracking)

    def republish_requeued(self) -> int:
        """Publish the failed outbox events an operator requeued, marked ``late``."""
        schema = self.store.datastore.schema
        with self.store.datastore.cursor() as cur:
            if not dl.outbox_republish_due(cur, schema):
                return 0
        with self.store.datastore.transaction(commit=True) as cur:
            ids = dl.outbox_to_republish(cur, schema)
        for notification_id in ids:
            found = self.app.recorder.select_notifications(start=notification_id, limit=1)
            notification = found[0]
            try:
                key, value, headers = event_message(notification)
                self.producer.send(self.topic, key=key, value=value, headers=[
                    *headers, ("late", b"1")]).get(timeout=self.publish_seconds)
            except Exception as error:
                if not unpublishable(error):
                    raise
                with self.store.datastore.transaction(commit=True) as cur:
                    dl.park_outbox(cur, schema, notification, self._aggregate_type(notification),
                                   error)
                    dl.repark_followers(cur, schema, notification)
                break  # what follows it stays pending, behind it
            with self.store.datastore.transaction(commit=True) as cur:
                dl.mark_outbox_published(cur, schema, notification_id)
        return len(ids)

    def _aggregate_type(self, notification: Any) -> str:
        try:
            event = self.app.mapper.to_domain_event(notification)
        except Exception:  # noqa: BLE001 - described as unknown; the topic is kept
            return "unknown"
        return type(event).__qualname__.split(".")[0]

    def run_forever(self, idle_seconds: float = 0.05) -> None:
        """Publish until stopped. A failed batch (broker or database unreachable) is
        logged and published again after a back-off: its position was not recorded."""
        backoff = 0.1
        while not self._stop.is_set():
            try:
                published = self.run_once()
                backoff = 0.1
            except Exception as error:  # noqa: BLE001 - retried, never skipped
                log.exception("relay batch failed; retrying in %.1fs", backoff)
                self.heartbeat.beat(caught_up=False,
                                    error=f"{type(error).__name__}: {error}"[:2000])
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
                if isinstance(error, KafkaError):
                    self._reconnect()
                continue
            if published == 0:
                self._stop.wait(idle_seconds)

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.producer.close(timeout=10)
