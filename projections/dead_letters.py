"""The event pipeline's own bookkeeping, beside the read models: dead letters, parked
outbox events, worker heartbeats and the operator actions taken on them.

These tables are not read models (nothing here is derived from the events alone):
they record what the transports could not do, so it is never skipped silently.

- ``dead_letters``: one row per (read model, event) that read model could not apply.
  ``pending`` is a poison event waiting for an operator; ``parked`` is a later event of
  the same aggregate held back behind it (order within an aggregate is kept);
  ``requeued`` is released for the projector to apply again; ``applied`` and
  ``discarded`` are final. ``late`` rows (status ``applied``) record events applied
  outside the normal order (an outbox event published again), so they apply once.
- ``outbox_failed``: events the Kafka relay could not publish (too large for the
  broker, not serializable): ``failed`` → ``pending`` (requeued, the relay publishes
  it again) → ``published``; or ``discarded``.
- ``pipeline_status``: the relay's and projectors' heartbeats.
- ``pipeline_actions``: every operator requeue/discard (actor, reason, correlation id,
  result), also the record its Idempotency-Key is answered from.

May import: ``eventsourcing`` and ``psycopg`` (as the rest of ``projections``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

import psycopg
from eventsourcing.persistence import PersistenceError
from psycopg import Cursor
from psycopg.sql import SQL, Identifier

EVENT_NAMESPACE = uuid5(NAMESPACE_URL, "https://ledgercore/events")
#: statuses of a dead letter that keep its aggregate's later events parked
UNRESOLVED = ("pending", "parked", "requeued")
SUBJECT_PREFIX = "dlq.ledgercore."
#: keys whose values never leave the event store in a payload summary
SECRET_WORDS = ("secret", "token", "password", "signature", "authorization", "api_key",
                "private", "credential")


class Undecodable:
    """An event the transport could not turn into a domain event (an unknown topic
    written by a newer version, a payload that does not upcast). Every read model
    fails on it, so it is dead-lettered for each rather than skipped."""

    def __init__(self, stored: Any, error: BaseException):
        self.stored, self.error = stored, error
        self.originator_id = stored.originator_id
        self.originator_version = stored.originator_version

    def __repr__(self) -> str:
        return f"Undecodable({self.stored.topic!r}: {self.error})"


def is_infrastructure(error: BaseException) -> bool:
    """Errors that say nothing about the event (database unreachable, lock timeout,
    deadlock, a lost tracking race): the whole batch is retried, nothing is parked."""
    return isinstance(error, (psycopg.OperationalError, psycopg.InterfaceError,
                              PersistenceError, MemoryError))


def event_id(originator_id: UUID, version: int) -> UUID:
    """The stable id of a stored event (the store has none of its own)."""
    return uuid5(EVENT_NAMESPACE, f"{originator_id}:{version}")


def summary(state: bytes | None) -> dict[str, Any]:
    """What an operator may see of a stored event: top-level fields, long values cut,
    secret-looking ones redacted, nested objects only counted."""
    try:
        decoded = json.loads(state or b"")
    except (ValueError, UnicodeDecodeError):
        return {"undecodable_bytes": len(state or b"")}
    if not isinstance(decoded, dict):
        return {"value": str(decoded)[:200]}
    out: dict[str, Any] = {}
    for key, value in list(decoded.items())[:40]:
        if any(word in key.lower() for word in SECRET_WORDS):
            out[key] = "[redacted]"
        elif key == "provenance" and isinstance(value, dict):
            out[key] = {k: v for k, v in value.items() if k in (
                "actor_type", "actor_role", "source", "correlation_id", "causation_id")}
        elif isinstance(value, dict):
            out[key] = {"_keys": len(value)}
        elif isinstance(value, list):
            out[key] = {"_items": len(value)}
        elif isinstance(value, str):
            out[key] = value[:200]
        else:
            out[key] = value
    return out


def correlation_of(state: bytes | None) -> str | None:
    try:
        decoded = json.loads(state or b"")
        value = decoded.get("provenance", {}).get("correlation_id")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    return str(value) if value else None


def event_name(topic: str) -> str:
    return topic.rpartition(":")[2].rpartition(".")[2] or topic


def ddl(schema: str) -> list[str]:
    s = schema
    return [
        f"CREATE TABLE IF NOT EXISTS {s}.dead_letters ("
        " seq bigserial PRIMARY KEY, projection text NOT NULL, source text NOT NULL,"
        " notification_id bigint NOT NULL, originator_id uuid NOT NULL,"
        " originator_version bigint NOT NULL, event_topic text NOT NULL, state bytea,"
        " kafka_topic text, kafka_partition integer, kafka_offset bigint,"
        " error text, payload jsonb NOT NULL, correlation_id text,"
        " first_seen timestamptz NOT NULL, last_seen timestamptz NOT NULL,"
        " attempts integer NOT NULL, status text NOT NULL, late boolean NOT NULL DEFAULT false,"
        " resolved_by text, resolved_reason text, resolved_at timestamptz,"
        " UNIQUE (projection, notification_id))",
        f"CREATE INDEX IF NOT EXISTS dead_letters_unresolved ON {s}.dead_letters"
        " (projection, originator_id, notification_id)"
        " WHERE status IN ('pending', 'parked', 'requeued')",
        f"CREATE TABLE IF NOT EXISTS {s}.outbox_failed ("
        " event_id uuid PRIMARY KEY, notification_id bigint NOT NULL UNIQUE,"
        " originator_id uuid NOT NULL, originator_version bigint NOT NULL,"
        " event_topic text NOT NULL, aggregate_type text NOT NULL, payload jsonb NOT NULL,"
        " correlation_id text, error text NOT NULL, status text NOT NULL,"
        " retry_count integer NOT NULL, occurred_at timestamptz NOT NULL,"
        " last_attempted_at timestamptz, resolved_by text, resolved_reason text,"
        " resolved_at timestamptz)",
        f"CREATE TABLE IF NOT EXISTS {s}.read_model_repairs ("
        " projection text PRIMARY KEY, generation bigint NOT NULL)",
        f"CREATE TABLE IF NOT EXISTS {s}.pipeline_status ("
        " component text PRIMARY KEY, heartbeat_at timestamptz NOT NULL,"
        " caught_up_at timestamptz, position bigint, head bigint, last_error text)",
        f"CREATE TABLE IF NOT EXISTS {s}.pipeline_actions ("
        " id bigserial PRIMARY KEY, at timestamptz NOT NULL, action text NOT NULL,"
        " target text NOT NULL, actor_id text NOT NULL, actor_type text NOT NULL,"
        " reason text, correlation_id text NOT NULL, result text NOT NULL,"
        " idempotency_scope text UNIQUE, response jsonb)",
    ]


def _t(schema: str, table: str) -> Any:
    return SQL("{0}.{1}").format(Identifier(schema), Identifier(table))


def now() -> datetime:
    return datetime.now(timezone.utc)


# ---- dead letters: written by ReadModelStore ----------------------------------------
@dataclass(frozen=True)
class DeadLetter:
    seq: int
    projection: str
    status: str
    notification_id: int
    error: str | None


def blocked(cur: Cursor[Any], schema: str) -> dict[str, set[UUID]]:
    """projection -> aggregates whose later events must be parked."""
    cur.execute(SQL("SELECT DISTINCT projection, originator_id FROM {0}"
                    " WHERE status IN ('pending', 'parked', 'requeued')").format(
        _t(schema, "dead_letters")))
    found: dict[str, set[UUID]] = {}
    for row in cur.fetchall():
        found.setdefault(row["projection"], set()).add(row["originator_id"])
    return found


def _stored_fields(item: Any) -> tuple[str, bytes | None, int]:
    stored = getattr(item, "stored", None)
    event = item.event
    if stored is None and isinstance(event, Undecodable):
        stored = event.stored
    if stored is not None:
        return stored.topic, bytes(stored.state), int(stored.originator_version)
    topic = getattr(type(event), "TOPIC", None) or type(event).__qualname__
    return topic, None, int(getattr(event, "originator_version", 0) or 0)


def error_text(error: BaseException | None) -> str | None:
    if error is None:
        return None
    return f"{type(error).__name__}: {error}"[:2000]


def record(cur: Cursor[Any], schema: str, projection: str, source: str, item: Any,
           error: BaseException | None, status: str) -> DeadLetter:
    """Record that ``projection`` could not apply ``item`` (``pending``) or held it
    back behind an unresolved event of its aggregate (``parked``)."""
    topic, state, version = _stored_fields(item)
    origin = getattr(item, "origin", None) or {}
    moment = now()
    cur.execute(SQL(
        "INSERT INTO {0} (projection, source, notification_id, originator_id,"
        " originator_version, event_topic, state, kafka_topic, kafka_partition, kafka_offset,"
        " error, payload, correlation_id, first_seen, last_seen, attempts, status)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (projection, notification_id) DO UPDATE SET last_seen = EXCLUDED.last_seen,"
        " attempts = {0}.attempts + 1, error = coalesce(EXCLUDED.error, {0}.error),"
        " status = EXCLUDED.status RETURNING seq").format(_t(schema, "dead_letters")),
        (projection, source, item.notification_id, item.event.originator_id, version, topic,
         state, origin.get("topic"), origin.get("partition"), origin.get("offset"),
         error_text(error), json.dumps(summary(state)), correlation_of(state), moment, moment,
         1 if status == "pending" else 0, status))
    seq = cur.fetchone()["seq"]
    return DeadLetter(seq, projection, status, item.notification_id, error_text(error))


def claim_late(cur: Cursor[Any], schema: str, projection: str, source: str, item: Any) -> bool:
    """Claim an event delivered out of order (an outbox event published again) for
    ``projection``: True once, False for every later delivery."""
    topic, state, version = _stored_fields(item)
    moment = now()
    cur.execute(SQL(
        "INSERT INTO {0} (projection, source, notification_id, originator_id,"
        " originator_version, event_topic, state, payload, correlation_id, first_seen,"
        " last_seen, attempts, status, late)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 1, 'applied', true)"
        " ON CONFLICT (projection, notification_id) DO NOTHING RETURNING seq").format(
        _t(schema, "dead_letters")),
        (projection, source, item.notification_id, item.event.originator_id, version, topic,
         state, json.dumps(summary(state)), correlation_of(state), moment, moment))
    return cur.fetchone() is not None


def skipped_by_rebuild(cur: Cursor[Any], schema: str, projection: str) -> set[int]:
    """Notification ids a rebuild of ``projection`` leaves out: the ones it holds in
    the dead-letter queue or an operator discarded."""
    cur.execute(SQL("SELECT notification_id FROM {0} WHERE projection = %s AND status IN"
                    " ('pending', 'parked', 'requeued', 'discarded')").format(
        _t(schema, "dead_letters")), (projection,))
    return {row["notification_id"] for row in cur.fetchall()}


#: a parked event (``p``) whose aggregate has no unresolved head before it any more
_ORPHAN = ("p.status = 'parked' AND NOT EXISTS ("
           " SELECT 1 FROM {0} h WHERE h.projection = p.projection"
           " AND h.originator_id = p.originator_id AND h.status IN ('pending', 'requeued')"
           " AND h.notification_id < p.notification_id)")


def requeue_due(cur: Cursor[Any], schema: str) -> bool:
    """Whether ``release_orphans`` would release something or an event is requeued: the
    projectors ask at every catch-up, and the answer is nearly always no."""
    cur.execute(SQL("SELECT EXISTS (SELECT 1 FROM {0} WHERE status = 'requeued')"
                    " OR EXISTS (SELECT 1 FROM {0} p WHERE " + _ORPHAN + ") AS due").format(
        _t(schema, "dead_letters")))
    row = cur.fetchone()
    return bool(row and row["due"])


def release_orphans(cur: Cursor[Any], schema: str) -> None:
    """Parked events whose aggregate has no unresolved head any more (it was applied
    or discarded while they were being parked) are released for the projector."""
    cur.execute(SQL("UPDATE {0} p SET status = 'requeued' WHERE " + _ORPHAN).format(
        _t(schema, "dead_letters")))


def requeued_projections(cur: Cursor[Any], schema: str) -> list[str]:
    cur.execute(SQL("SELECT DISTINCT projection FROM {0} WHERE status = 'requeued'").format(
        _t(schema, "dead_letters")))
    return [row["projection"] for row in cur.fetchall()]


def requeued_chains(cur: Cursor[Any], schema: str, projection: str) -> list[list[dict[str, Any]]]:
    """For each aggregate of ``projection`` with a requeued event: that event and the
    events parked behind it, in log order, locked (skipped if another projector holds
    them)."""
    cur.execute(SQL(
        "SELECT * FROM {0} WHERE projection = %s AND status IN ('requeued', 'parked')"
        " AND originator_id IN (SELECT originator_id FROM {0} WHERE projection = %s"
        " AND status = 'requeued') ORDER BY originator_id, notification_id"
        " FOR UPDATE SKIP LOCKED").format(_t(schema, "dead_letters")), (projection, projection))
    chains: dict[UUID, list[dict[str, Any]]] = {}
    for row in cur.fetchall():
        chains.setdefault(row["originator_id"], []).append(row)
    # a chain starts at its requeued event; parked rows before it belong to another head
    result = []
    for rows in chains.values():
        start = next((i for i, r in enumerate(rows) if r["status"] == "requeued"), None)
        if start is not None:
            result.append(rows[start:])
    return result


def mark_applied(cur: Cursor[Any], schema: str, seq: int) -> None:
    cur.execute(SQL("UPDATE {0} SET status = 'applied', last_seen = %s WHERE seq = %s").format(
        _t(schema, "dead_letters")), (now(), seq))


def mark_failed_again(cur: Cursor[Any], schema: str, seq: int, error: BaseException) -> None:
    cur.execute(SQL("UPDATE {0} SET status = 'pending', attempts = attempts + 1,"
                    " last_seen = %s, error = %s WHERE seq = %s").format(
        _t(schema, "dead_letters")), (now(), error_text(error), seq))


def bump_repairs(cur: Cursor[Any], schema: str, projection: str) -> None:
    """A read model changed without its position moving (a requeued or late event, a
    rebuild): cached answers keyed by position alone must not be served again."""
    cur.execute(SQL("INSERT INTO {0} VALUES (%s, 1) ON CONFLICT (projection) DO UPDATE"
                    " SET generation = {0}.generation + 1").format(
        _t(schema, "read_model_repairs")), (projection,))


def repairs(cur: Cursor[Any], schema: str, projections: Sequence[str]) -> int:
    cur.execute(SQL("SELECT coalesce(sum(generation), 0) AS g FROM {0}"
                    " WHERE projection = ANY(%s)").format(_t(schema, "read_model_repairs")),
                (list(projections),))
    row = cur.fetchone()
    return int(row["g"] if isinstance(row, dict) else row[0])


# ---- dead letters: the operator's view and actions ---------------------------------
def subject(projection: str) -> str:
    return SUBJECT_PREFIX + projection


def original_topic(row: dict[str, Any]) -> str:
    return row["kafka_topic"] or "ledgercore.notification_log"


def dlq_message_json(row: dict[str, Any], parked: int = 0) -> dict[str, Any]:
    payload = dict(row["payload"] or {})
    payload["_dead_letter"] = {
        "projection": row["projection"], "source": row["source"],
        "notification_id": row["notification_id"],
        "event_id": str(event_id(row["originator_id"], row["originator_version"])),
        "aggregate_id": str(row["originator_id"]),
        "aggregate_version": row["originator_version"], "event_topic": row["event_topic"],
        "kafka_partition": row["kafka_partition"], "kafka_offset": row["kafka_offset"],
        "error": row["error"], "attempts": row["attempts"], "status": row["status"],
        "first_seen": row["first_seen"].isoformat(), "last_seen": row["last_seen"].isoformat(),
        "parked_events": parked}
    return {"stream_seq": row["seq"], "subject": subject(row["projection"]),
            "original_topic": original_topic(row), "event_type": event_name(row["event_topic"]),
            "correlation_id": row["correlation_id"], "occurred_at": row["first_seen"].isoformat(),
            "payload": payload, "requeue_enabled": row["status"] == "pending"}


def list_dead_letters(cur: Cursor[Any], schema: str, *, after: int | None, limit: int,
                      subject_prefix: str | None) -> list[dict[str, Any]]:
    """Pending dead letters, oldest first (by ``seq``), with how many events each holds
    parked behind it."""
    t = _t(schema, "dead_letters")
    cur.execute(SQL(
        "SELECT h.*, (SELECT count(*) FROM {0} p WHERE p.projection = h.projection"
        " AND p.originator_id = h.originator_id AND p.status = 'parked'"
        " AND p.notification_id > h.notification_id) AS parked"
        " FROM {0} h WHERE h.status = 'pending' AND h.seq > %s"
        " AND starts_with(%s || h.projection, %s) ORDER BY h.seq LIMIT %s").format(t),
        (after or 0, SUBJECT_PREFIX, subject_prefix or "", limit))
    return [dlq_message_json(row, row["parked"]) for row in cur.fetchall()]


def _dead_letter_for_update(cur: Cursor[Any], schema: str, seq: int) -> dict[str, Any] | None:
    cur.execute(SQL("SELECT * FROM {0} WHERE seq = %s AND NOT late FOR UPDATE").format(
        _t(schema, "dead_letters")), (seq,))
    return cur.fetchone()


def requeue_dead_letter(cur: Cursor[Any], schema: str, seq: int, actor: str,
                        reason: str | None) -> tuple[str, dict[str, Any] | None]:
    """('ok', row) | ('not_found', None) | ('conflict', row): only a pending dead
    letter is requeued; the projector then applies it and what is parked behind it."""
    row = _dead_letter_for_update(cur, schema, seq)
    if row is None:
        return "not_found", None
    if row["status"] != "pending":
        return "conflict", row
    cur.execute(SQL("UPDATE {0} SET status = 'requeued', resolved_by = %s, resolved_reason = %s,"
                    " resolved_at = %s WHERE seq = %s").format(_t(schema, "dead_letters")),
                (actor, reason, now(), seq))
    return "ok", row


def discard_dead_letter(cur: Cursor[Any], schema: str, seq: int, actor: str,
                        reason: str | None) -> tuple[str, dict[str, Any] | None]:
    """('ok'|'already', row) | ('not_found', None) | ('conflict', row). Discarding
    releases the events parked behind it (the next one is requeued)."""
    row = _dead_letter_for_update(cur, schema, seq)
    if row is None:
        return "not_found", None
    if row["status"] == "discarded":
        return "already", row
    if row["status"] not in ("pending", "parked"):
        return "conflict", row
    t = _t(schema, "dead_letters")
    cur.execute(SQL("UPDATE {0} SET status = 'discarded', resolved_by = %s, resolved_reason = %s,"
                    " resolved_at = %s WHERE seq = %s").format(t), (actor, reason, now(), seq))
    cur.execute(SQL(
        "UPDATE {0} SET status = 'requeued' WHERE seq = (SELECT seq FROM {0}"
        " WHERE projection = %s AND originator_id = %s AND status = 'parked'"
        " AND notification_id > %s ORDER BY notification_id LIMIT 1)"
        " AND NOT EXISTS (SELECT 1 FROM {0} WHERE projection = %s AND originator_id = %s"
        " AND status IN ('pending', 'requeued'))").format(t),
        (row["projection"], row["originator_id"], row["notification_id"],
         row["projection"], row["originator_id"]))
    return "ok", row


# ---- the relay's failed outbox --------------------------------------------------------
def outbox_blocked(cur: Cursor[Any], schema: str) -> set[UUID]:
    """Aggregates with an event the relay has not published yet: their later events
    are parked behind it, so projectors see each aggregate's events in order."""
    cur.execute(SQL("SELECT DISTINCT originator_id FROM {0}"
                    " WHERE status IN ('failed', 'pending', 'parked')").format(
        _t(schema, "outbox_failed")))
    return {row["originator_id"] for row in cur.fetchall()}


def park_outbox(cur: Cursor[Any], schema: str, notification: Any, aggregate_type: str,
                error: BaseException | None, status: str = "failed") -> None:
    """Record an event the relay could not publish (``failed``) or held back behind
    one (``parked``)."""
    state = bytes(notification.state)
    moment = now()
    cur.execute(SQL(
        "INSERT INTO {0} (event_id, notification_id, originator_id, originator_version,"
        " event_topic, aggregate_type, payload, correlation_id, error, status, retry_count,"
        " occurred_at, last_attempted_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s,"
        " %s, %s, %s, %s) ON CONFLICT (event_id) DO UPDATE SET status = EXCLUDED.status,"
        " retry_count = {0}.retry_count + EXCLUDED.retry_count, error = EXCLUDED.error,"
        " last_attempted_at = EXCLUDED.last_attempted_at").format(_t(schema, "outbox_failed")),
        (event_id(notification.originator_id, notification.originator_version),
         notification.id, notification.originator_id, notification.originator_version,
         notification.topic, aggregate_type, json.dumps(summary(state)), correlation_of(state),
         error_text(error) or "parked behind an earlier event of its aggregate", status,
         1 if status == "failed" else 0, moment, moment))


#: a parked outbox event (``p``) whose aggregate has nothing failed or requeued before it
#: (the events ``outbox_to_republish`` releases)
_OUTBOX_ORPHAN = ("p.status = 'parked' AND NOT EXISTS ("
                  " SELECT 1 FROM {0} h WHERE h.originator_id = p.originator_id"
                  " AND h.status IN ('failed', 'pending')"
                  " AND h.notification_id < p.notification_id)")


def outbox_republish_due(cur: Cursor[Any], schema: str) -> bool:
    """Whether ``outbox_to_republish`` would return anything (an event is requeued, or
    a parked one would be released): one read, no writes. The relay asks before a batch
    whenever its failed outbox holds anything, and the answer is nearly always no."""
    cur.execute(SQL("SELECT EXISTS (SELECT 1 FROM {0} WHERE status = 'pending')"
                    " OR EXISTS (SELECT 1 FROM {0} p WHERE " + _OUTBOX_ORPHAN + ") AS due").format(
        _t(schema, "outbox_failed")))
    row = cur.fetchone()
    return bool(row and row["due"])


def outbox_to_republish(cur: Cursor[Any], schema: str, limit: int = 100) -> list[int]:
    """Requeued events, in log order; first, parked events whose aggregate has nothing
    failed or requeued before them any more are released too."""
    t = _t(schema, "outbox_failed")
    cur.execute(SQL(
        "UPDATE {0} p SET status = 'pending' WHERE p.status = 'parked' AND NOT EXISTS ("
        " SELECT 1 FROM {0} h WHERE h.originator_id = p.originator_id"
        " AND h.status IN ('failed', 'pending') AND h.notification_id < p.notification_id)"
    ).format(t))
    cur.execute(SQL("SELECT notification_id FROM {0} WHERE status = 'pending'"
                    " ORDER BY notification_id LIMIT %s").format(t), (limit,))
    return [row["notification_id"] for row in cur.fetchall()]


def repark_followers(cur: Cursor[Any], schema: str, notification: Any) -> None:
    """A requeued event failed again: its aggregate's later requeued events wait again."""
    cur.execute(SQL("UPDATE {0} SET status = 'parked' WHERE originator_id = %s"
                    " AND status = 'pending' AND notification_id > %s").format(
        _t(schema, "outbox_failed")), (notification.originator_id, notification.id))


def mark_outbox_published(cur: Cursor[Any], schema: str, notification_id: int) -> None:
    cur.execute(SQL("UPDATE {0} SET status = 'published', last_attempted_at = %s"
                    " WHERE notification_id = %s AND status = 'pending'").format(
        _t(schema, "outbox_failed")), (now(), notification_id))


def outbox_event_json(row: dict[str, Any]) -> dict[str, Any]:
    payload = dict(row["payload"] or {})
    payload["_outbox"] = {"notification_id": row["notification_id"],
                          "aggregate_version": row["originator_version"],
                          "event_topic": row["event_topic"], "error": row["error"],
                          "status": row["status"]}
    return {"id": str(row["event_id"]), "aggregate_type": row["aggregate_type"],
            "aggregate_id": str(row["originator_id"]),
            "event_type": event_name(row["event_topic"]), "payload": payload,
            "correlation_id": row["correlation_id"] or "",
            "retry_count": row["retry_count"],
            "last_attempted_at": row["last_attempted_at"] and row["last_attempted_at"].isoformat(),
            "occurred_at": row["occurred_at"].isoformat()}


def list_failed_outbox(cur: Cursor[Any], schema: str, *, after: tuple[str, str] | None,
                       limit: int) -> list[dict[str, Any]]:
    """Failed outbox events by ``occurred_at``, then ``id``."""
    t = _t(schema, "outbox_failed")
    if after is None:
        cur.execute(SQL("SELECT * FROM {0} WHERE status = 'failed'"
                        " ORDER BY occurred_at, event_id LIMIT %s").format(t), (limit,))
    else:
        cur.execute(SQL("SELECT * FROM {0} WHERE status = 'failed'"
                        " AND (occurred_at, event_id) > (%s::timestamptz, %s::uuid)"
                        " ORDER BY occurred_at, event_id LIMIT %s").format(t),
                    (after[0], after[1], limit))
    return [outbox_event_json(row) for row in cur.fetchall()]


def change_outbox(cur: Cursor[Any], schema: str, event: UUID, to: str, actor: str,
                  reason: str | None) -> str:
    """Requeue (``to='pending'``) or discard a failed outbox event: 'ok' |
    'not_found' | 'conflict' (it is not ``failed``)."""
    t = _t(schema, "outbox_failed")
    cur.execute(SQL("SELECT status FROM {0} WHERE event_id = %s FOR UPDATE").format(t), (event,))
    row = cur.fetchone()
    if row is None:
        return "not_found"
    if row["status"] != "failed":
        return "conflict"
    cur.execute(SQL("UPDATE {0} SET status = %s, resolved_by = %s, resolved_reason = %s,"
                    " resolved_at = %s WHERE event_id = %s").format(t),
                (to, actor, reason, now(), event))
    return "ok"


# ---- operator actions (audit and idempotency) ----------------------------------------
def recorded_action(cur: Cursor[Any], schema: str, scope: str) -> dict[str, Any] | None:
    cur.execute(SQL("SELECT response FROM {0} WHERE idempotency_scope = %s").format(
        _t(schema, "pipeline_actions")), (scope,))
    row = cur.fetchone()
    return None if row is None else row["response"]


def record_action(cur: Cursor[Any], schema: str, *, action: str, target: str, actor_id: str,
                  actor_type: str, reason: str | None, correlation_id: str, result: str,
                  scope: str | None, response: dict[str, Any] | None) -> None:
    cur.execute(SQL(
        "INSERT INTO {0} (at, action, target, actor_id, actor_type, reason, correlation_id,"
        " result, idempotency_scope, response) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    ).format(_t(schema, "pipeline_actions")),
        (now(), action, target, actor_id, actor_type, reason, correlation_id, result, scope,
         json.dumps(response) if response is not None else None))


# ---- heartbeats and the overview ------------------------------------------------------
def heartbeat(cur: Cursor[Any], schema: str, component: str, *, caught_up: bool,
              position: int | None, head: int | None, error: str | None) -> None:
    moment = now()
    cur.execute(SQL(
        "INSERT INTO {0} VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (component) DO UPDATE SET"
        " heartbeat_at = EXCLUDED.heartbeat_at,"
        " caught_up_at = coalesce(EXCLUDED.caught_up_at, {0}.caught_up_at),"
        " position = coalesce(EXCLUDED.position, {0}.position),"
        " head = coalesce(EXCLUDED.head, {0}.head), last_error = EXCLUDED.last_error").format(
        _t(schema, "pipeline_status")),
        (component, moment, moment if caught_up else None, position, head, error))


def pipeline_counts(cur: Cursor[Any], schema: str, since: datetime) -> dict[str, Any]:
    dl, ob = _t(schema, "dead_letters"), _t(schema, "outbox_failed")
    cur.execute(SQL(
        "SELECT (SELECT count(*) FROM {0} WHERE status IN ('pending', 'parked', 'requeued'))"
        " AS dlq_unresolved,"
        " (SELECT coalesce(array_agg(DISTINCT projection), '{{}}') FROM {0}"
        "  WHERE status IN ('pending', 'parked', 'requeued')) AS degraded,"
        " (SELECT count(*) FROM {0} WHERE status = 'pending' AND last_seen >= %s)"
        " AS recent_failures,"
        " (SELECT count(*) FROM {1} WHERE status IN ('pending', 'parked')) AS outbox_requeued,"
        " (SELECT count(*) FROM {1} WHERE status = 'failed') AS outbox_failed").format(dl, ob),
        (since,))
    row = dict(cur.fetchone())
    cur.execute(SQL("SELECT * FROM {0}").format(_t(schema, "pipeline_status")))
    row["components"] = {r["component"]: r for r in cur.fetchall()}
    return row


def dead_letter_rows(cur: Cursor[Any], schema: str, statuses: Sequence[str]) -> list[dict[str, Any]]:
    cur.execute(SQL("SELECT * FROM {0} WHERE status = ANY(%s) ORDER BY seq").format(
        _t(schema, "dead_letters")), (list(statuses),))
    return list(cur.fetchall())
