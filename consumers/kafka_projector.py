"""The Kafka transport's projector: a consumer group feeding the same
``ReadModelStore.apply_batch`` as the direct transport.

Per partition and batch: view rows, tracking (highest notification id applied for that
topic-partition) and the watermark commit in one transaction; the Kafka offset is
committed after it. A crash between the two redelivers the batch, and tracking skips
what was applied. A batch that cannot be decoded or applied is rewound and retried
with back-off, loudly: an event is never skipped.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from eventsourcing.persistence import Mapper
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.structs import OffsetAndMetadata

from consumers.wire import decode, ensure_topic
from projections.store import Item, ReadModelStore

log = logging.getLogger("ledgercore.kafka_projector")


def source_name(topic: str, partition: int) -> str:
    return f"kafka:{topic}/{partition}"


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
            max_poll_records=500, metadata_max_age_ms=5000)
        self.consumer.subscribe([topic], listener=_RegisterPartitions(self))
        self._stop = threading.Event()

    def run_once(self, timeout_ms: int = 200) -> int:
        applied = 0
        for partition, messages in self.consumer.poll(timeout_ms=timeout_ms).items():
            applied += self._apply(partition, messages)
        return applied

    def _apply(self, partition: TopicPartition, messages: list[Any]) -> int:
        items: list[Item] = []
        watermark: int | None = None
        try:
            for message in messages:
                kind, value = decode(message)
                if kind == "watermark":
                    watermark = value if watermark is None else max(watermark, value)
                else:
                    items.append(Item(value.id, self.mapper.to_domain_event(value)))
            applied = self.store.apply_batch(source_name(self.topic, partition.partition),
                                             items, watermark)
        except Exception:
            # Rewind so the next poll delivers this batch again: nothing is skipped.
            self.consumer.seek(partition, messages[0].offset)
            raise
        if self.crash_at == "projector_after_view_commit" and items:
            os._exit(137)
        self.consumer.commit({partition: OffsetAndMetadata(messages[-1].offset + 1, "", -1)})
        return applied

    def run_forever(self) -> None:
        """Project until stopped. A batch that fails (database down, an event that
        cannot be decoded or applied) is logged and retried after a back-off; the
        read model waits at that event rather than skipping it."""
        backoff = 0.1
        while not self._stop.is_set():
            try:
                self.run_once()
                backoff = 0.1
            except Exception:  # noqa: BLE001 - retried, never skipped
                log.exception("projector batch failed; retrying in %.1fs", backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.consumer.close()
