"""What the machine does without ledgercore: plain psycopg inserts of event-sized rows,
and the Kafka-protocol broker driven by kafka-python. (The HTTP ceiling is measured
by ``suite`` with ``ceiling_app`` and the load generator.)"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg

from bench.harness import BenchError

ROW_STATE_BYTES = 240  # + uuid, version, topic: about 300 bytes a row
TOPIC_NAME = "bench.BalanceAdjusted"


def psycopg_inserts(dsn: str, rows_per_commit: int, duration: float,
                    tick: Callable[[float], None] | None = None) -> dict[str, Any]:
    """Insert rows shaped like stored events into a fresh table, ``rows_per_commit``
    per transaction, one connection, for ``duration`` seconds. Returns rows/s."""
    table = f"bench_rows_{rows_per_commit}"
    state = os.urandom(ROW_STATE_BYTES // 2).hex().encode()
    sql = (f"INSERT INTO {table} (originator_id, originator_version, topic, state)"
           " VALUES (%s, %s, %s, %s)")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.execute(f"CREATE TABLE {table} (notification_id bigserial PRIMARY KEY,"
                     " originator_id uuid NOT NULL, originator_version integer NOT NULL,"
                     " topic text NOT NULL, state bytea NOT NULL,"
                     " UNIQUE (originator_id, originator_version))")
        rows = 0
        started = time.monotonic()
        deadline = started + duration
        with conn.cursor() as cur:
            while time.monotonic() < deadline:
                batch = [(uuid.uuid4(), 1, TOPIC_NAME, state) for _ in range(rows_per_commit)]
                if rows_per_commit == 1:
                    cur.execute(sql, batch[0])
                else:
                    with conn.transaction():
                        cur.executemany(sql, batch)
                rows += rows_per_commit
                if tick is not None and rows % (rows_per_commit * 50) == 0:
                    tick(time.monotonic() - started)
        elapsed = time.monotonic() - started
        row_bytes = conn.execute(f"SELECT avg(pg_column_size(t.*)) FROM {table} t").fetchone()[0]
        conn.execute(f"DROP TABLE {table}")
    return {"rows_per_commit": rows_per_commit, "rows": rows, "seconds": elapsed,
            "rows_per_second": rows / elapsed, "row_bytes": float(row_bytes or 0)}


def broker_rates(bootstrap: str, messages: int, timeout: float, size: int = 300,
                 partitions: int = 3, tick: Callable[[str, int], None] | None = None
                 ) -> dict[str, Any]:
    """kafka-python against the broker: produce ``messages`` of ``size`` bytes with the
    relay's producer settings (acks=all, one request in flight, linger 2 ms), then
    consume them as a consumer-group member with the projector's settings, committing
    after each poll. Rates exclude the group join, which is reported apart."""
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
    from kafka.admin import NewTopic

    from consumers.relay import PRODUCER

    topic = f"lcbench.{uuid.uuid4().hex[:8]}.raw"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="lcbench-admin")
    try:
        admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        admin.close()
    payload = os.urandom(size // 2).hex().encode()
    deadline = time.monotonic() + timeout
    producer = KafkaProducer(**PRODUCER, bootstrap_servers=bootstrap, client_id="lcbench-producer")
    try:
        started = time.monotonic()
        futures = []
        for n in range(messages):
            futures.append(producer.send(topic, key=str(n % 1000).encode(), value=payload))
            if tick is not None and n % 5000 == 0:
                tick("produce", n)
            if time.monotonic() > deadline:
                raise BenchError("broker produce did not finish in time")
        producer.flush(timeout=max(1.0, deadline - time.monotonic()))
        for future in futures:
            future.get(timeout=max(1.0, deadline - time.monotonic()))
        produce_seconds = time.monotonic() - started
    finally:
        producer.close()
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"lcbench-{uuid.uuid4().hex[:8]}",
                             enable_auto_commit=False, auto_offset_reset="earliest",
                             session_timeout_ms=3000, heartbeat_interval_ms=1000,
                             max_poll_records=500, client_id="lcbench-consumer")
    try:
        subscribed = time.monotonic()
        received = 0
        first_at = None
        first_batch = 0
        while received < messages:
            if time.monotonic() > deadline:
                raise BenchError(f"broker consume got {received} of {messages} in time")
            batches = consumer.poll(timeout_ms=200, max_records=500)
            count = sum(len(records) for records in batches.values())
            if count and first_at is None:
                first_at, first_batch = time.monotonic(), count
            received += count
            if count:
                consumer.commit()
                if tick is not None:
                    tick("consume", received)
        consume_seconds = time.monotonic() - (first_at or subscribed)
    finally:
        consumer.close()
    return {"messages": messages, "message_bytes": size, "partitions": partitions,
            "produce_per_second": messages / produce_seconds,
            "group_join_seconds": (first_at or subscribed) - subscribed,
            "consume_per_second": (messages - first_batch) / max(consume_seconds, 1e-9)}
