"""How an event travels on Kafka: the stored event's bytes as the value, the aggregate
id as the key, and headers naming the event, its notification id and its version.

A watermark message (no key, header ``watermark``) says that every notification at or
below its value has been published to this partition before it."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from eventsourcing.persistence import Notification
from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

Headers = list[tuple[str, bytes]]


def event_message(notification: Notification) -> tuple[bytes, bytes, Headers]:
    return (str(notification.originator_id).encode(), notification.state, [
        ("topic", notification.topic.encode()),
        ("nid", str(notification.id).encode()),
        ("version", str(notification.originator_version).encode()),
    ])


def watermark_message(position: int) -> Headers:
    return [("watermark", str(position).encode())]


def decode(message: Any) -> tuple[str, Any]:
    """('watermark', position) or ('event', Notification)."""
    headers = {k: v.decode() for k, v in (message.headers or [])}
    if "watermark" in headers:
        return "watermark", int(headers["watermark"])
    return "event", Notification(
        id=int(headers["nid"]), originator_id=UUID(message.key.decode()),
        originator_version=int(headers["version"]), topic=headers["topic"],
        state=message.value)


def ensure_topic(bootstrap: str, topic: str, partitions: int) -> None:
    """Create the event topic unless it exists. Relay and projectors both call this
    before using it, so neither subscribes to a topic that is not there yet (a
    consumer would otherwise wait a metadata refresh, or auto-create it differently)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="ledgercore-admin")
    try:
        admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    except TopicAlreadyExistsError:
        pass
    finally:
        admin.close()
