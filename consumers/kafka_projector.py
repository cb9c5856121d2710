"""The Kafka transport's projector: a consumer group feeding the same
``ReadModelStore.apply_batch`` as the direct transport.

Per partition and batch: view rows, tracking (highest notification id applied for that
topic-partition) and the watermark commit in one transaction; the Kafka offset is
committed after it. A crash between the two redelivers the batch, and tracking skips
what was applied.

An event that cannot be decoded, or that a read model cannot apply, becomes a dead
letter for that read model (``projections.store``), with its topic, partition and
offset, and is also published to the DLQ topic ``<topic>.dlq`` (headers: projection,
error, dead-letter seq, original partition and offset); the rest of the batch and
the partition go on. A message that is not ours at all (no notification id) and a
batch that fails for any other reason (database unreachable) are rewound and retried
with back-off, loudly: an event is never skipped. Every poll also applies what
operators requeued.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from eventsourcing.persistence import Mapper
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.structs import OffsetAndMetadata

from consumers.pipeline import Heartbeat, decode as decode_event, retry_requeued
from consumers.wire import decode, ensure_topic
from projections import dead_letters as dl
from projections.store import Item, ReadModelStore

log = logging.getLogger("ledgercore.kafka_projector")
#: how often an idle projector checks that its partitions still hold its offsets
OFFSET_CHECK_SECONDS = 5.0


def source_name(topic: str, partition: int) -> str:
    return f"kafka:{topic}/{partition}"


def dlq_topic(topic: str) -> str:
    return f"{topic}.dlq"


class _RegisterPartitions(ConsumerRebalanceListener):
    def __init__(self, projector: KafkaProjector):
        self.projector = projector

    def on_partitions_revoked(self, revoked: Any) -> None:
        pass

    def on_partitions_assigned(self, assigned: Any) -> None:
        partitions = self.projector.consumer.partitions_for_topic(self.projector.topic) or set()
        self.projector.store.register_sources(
            source_name(self.projector.topic, p) for p in partitions)


class KafkaProjector:
    def __init__(self, mapper: Mapper[Any], store: ReadModelStore, bootstrap: str, topic: str,
                 partitions: int, group_id: str = "ledgercore-projectors",
                 crash_at: str | None = None):
        self.mapper, self.store, self.topic, self.crash_at = mapper, store, topic, crash_at
        ensure_topic(bootstrap, topic, partitions)
        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False,
            auto_offset_reset="earliest", client_id="ledgercore-projector",
            session_timeout_ms=3000, heartbeat_interval_ms=1000, max_poll_interval_ms=60000,
            max_poll_records=500, metadata_max_age_ms=5000,
            # an emptied broker (restarted) must not make the topic with its default
            # partition count: the relay creates it as configured
            allow_auto_create_topics=False)
        self.consumer.subscribe([topic], listener=_RegisterPartitions(self))
        ensure_topic(bootstrap, dlq_topic(topic), 1)
        self.dlq = KafkaProducer(bootstrap_servers=bootstrap, acks="all", retries=5,
                                 client_id="ledgercore-projector-dlq")
        self.heartbeat = Heartbeat(store, f"projector:kafka:{group_id}")
        self._stop = threading.Event()
        self._next_offset_check = 0.0

    def run_once(self, timeout_ms: int = 200) -> int:
        retry_requeued(self.store, self.mapper)
        applied = 0
        polled = self.consumer.poll(timeout_ms=timeout_ms)
        for partition, messages in polled.items():
            applied += self._apply(partition, messages)
        if not polled and time.monotonic() >= self._next_offset_check:
            self._next_offset_check = time.monotonic() + OFFSET_CHECK_SECONDS
            self._rewind_truncated()
        self.heartbeat.beat(caught_up=not polled)
        return applied

    def _rewind_truncated(self) -> None:
        """A partition whose log now ends before our position was replaced under us (a
        broker that lost its log): read it again from its start. Tracking skips what
        was applied already, so nothing is applied twice; waiting at the old offset
        would wait forever."""
        assigned = list(self.consumer.assignment())
        if not assigned:
            return
        try:
            ends = self.consumer.end_offsets(assigned)
            for partition in assigned:
                position = self.consumer.position(partition)
                if position is not None and position > ends.get(partition, position):
                    log.warning("%s ends at %s before our offset %s: reading it again",
                                partition, ends[partition], position)
                    self.consumer.seek_to_beginning(partition)
        except KafkaError:
            log.warning("cannot read the end offsets; trying again later", exc_info=True)

    def _apply(self, partition: TopicPartition, messages: list[Any]) -> int:
        items: list[Item] = []
        watermark: int | None = None
        letters: list[dl.DeadLetter] = []
        raw: dict[int, Any] = {}
        try:
            for message in messages:
                kind, value = decode(message)
                if kind == "watermark":
                    watermark = value if watermark is None else max(watermark, value)
                else:
                    headers = dict(message.headers or [])
                    raw[value.id] = message
                    items.append(Item(value.id, decode_event(self.mapper, value), value,
                                      {"topic": message.topic, "partition": message.partition,
                                       "offset": message.offset},
                                      late=headers.get("late") == b"1"))
            applied = self.store.apply_batch(source_name(self.topic, partition.partition),
                                             items, watermark, letters)
        except Exception:
            # Rewind so the next poll delivers this batch again: nothing is skipped.
            self.consumer.seek(partition, messages[0].offset)
            raise
        self._publish_dead_letters(letters, raw)
        if self.crash_at == "projector_after_view_commit" and items:
            os._exit(137)
        self.consumer.commit({partition: OffsetAndMetadata(messages[-1].offset + 1, "", -1)})
        return applied

    def _publish_dead_letters(self, letters: list[dl.DeadLetter], raw: dict[int, Any]) -> None:
        """A copy of each new poison message on the DLQ topic, for consumers outside
        ledgercore; the dead-letter table is the record, so a failure here is logged."""
        for letter in letters:
            message = raw.get(letter.notification_id)
            if letter.status != "pending" or message is None:
                continue
            headers = list(message.headers or []) + [
                ("dlq_projection", letter.projection.encode()),
                ("dlq_seq", str(letter.seq).encode()),
                ("dlq_error", (letter.error or "")[:1000].encode()),
                ("dlq_original", f"{message.topic}/{message.partition}@{message.offset}".encode())]
            try:
                self.dlq.send(dlq_topic(self.topic), key=message.key, value=message.value,
                              headers=headers).get(timeout=10)
            except Exception:  # noqa: BLE001 - the durable record is the table
                log.exception("cannot publish dead letter %s to %s", letter.seq,
                              dlq_topic(self.topic))

    def run_forever(self) -> None:
        """Project until stopped. A batch that fails (database down, an event that
        cannot be decoded or applied) is logged and retried after a back-off; the
        read model waits at that event rather than skipping it."""
        backoff = 0.1
        while not self._stop.is_set():
            try:
                self.run_once()
                backoff = 0.1
            except Exception as error:  # noqa: BLE001 - retried, never skipped
                log.exception("projector batch failed; retrying in %.1fs", backoff)
                self.heartbeat.beat(caught_up=False, error=f"{type(error).__name__}: {error}"[:2000])
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.consumer.close()
        self.dlq.close(timeout=10)
