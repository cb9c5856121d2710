"""Applies events to read models, each batch in ONE transaction with its tracking.

Tracking follows the eventsourcing library's ``PostgresTrackingRecorder``: one row per
(projection, source) holding the highest notification id applied; the upsert refuses
to move backwards or stand still, so a batch that two runners race to apply commits
once and the loser rolls back whole. ``source`` is ``log`` for the direct transport
and ``kafka:<topic>/<partition>`` for the Kafka one. A batch locks the tracking rows of
every read model for its source in one statement (in name order) and writes them, and
the watermarks, in one statement each: the projector wakes at every commit of the
writers, so per-read-model round trips would cost more than the read models' writes.

``read_positions`` holds each projection's watermark per source: every notification
at or below it has been applied. A read model's position is the lowest watermark
over the sources of the transport in use; queries compare it with the position a
command returned (read-your-writes) and put it in cache keys.

An event a read model cannot apply does not stop the others (``projections.dead_letters``):
a batch that fails is applied again event by event under savepoints, bisecting to the
failing event, which is recorded as a dead letter for that read model; later events of
the same aggregate are parked behind it (that read model keeps each aggregate's order)
and everything else goes on. An operator requeues it (applied once, then what was
parked) or discards it (what was parked is applied). Infrastructure errors (database
unreachable, lock timeouts) fail the whole batch, which the transport retries.

The direct transport commits its batches without waiting for the WAL flush
(``synchronous=False``: ``synchronous_commit`` off for that transaction only). Its
source is the event store's own log and its position is the tracking committed with
the rows, so a Postgres crash that loses the last batches loses their tracking with
them, and they are applied again from the log. The event store's commits stay
synchronous, and so do the Kafka transport's, whose Kafka offsets are committed after
the batch (a lost batch would not be redelivered).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from eventsourcing.persistence import IntegrityError, InterfaceError, OperationalError, Tracking
from eventsourcing.postgres import PostgresDatastore, PostgresTrackingRecorder
from eventsourcing.utils import retry
from psycopg import Cursor
from psycopg.sql import SQL, Identifier

from projections import dead_letters as dl

SCHEMA = "readmodels"
log = logging.getLogger("ledgercore.projections")


class Projection(Protocol):
    name: str
    tables: tuple[str, ...]

    def ddl(self, schema: str) -> list[str]: ...

    def apply(self, cur: Cursor[Any], schema: str, event: Any, notification_id: int) -> None:
        """Write what ``event`` changes. Must not commit; raise to abort the batch."""


def apply_items(projection: Projection, cur: Cursor[Any], schema: str,
                items: Sequence[Item]) -> None:
    """Apply events in order: through the projection's set-based ``apply_many`` when it
    has one, otherwise one ``apply`` per event."""
    if not items:
        return
    for item in items:
        if isinstance(item.event, dl.Undecodable):
            raise item.event.error
    many = getattr(projection, "apply_many", None)
    if many is not None:
        many(cur, schema, items)
        return
    for item in items:
        projection.apply(cur, schema, item.event, item.notification_id)


@dataclass(frozen=True)
class Item:
    notification_id: int
    event: Any
    #: the stored event as the transport received it (kept in a dead letter)
    stored: Any = None
    #: where the transport read it: Kafka topic, partition and offset
    origin: dict[str, Any] | None = None
    #: delivered out of order (an outbox event published again): applied once,
    #: whatever the tracking position
    late: bool = False


def typed_arrays(types: Sequence[str]) -> SQL:
    """One typed array parameter per column, for ``INSERT ... SELECT * FROM unnest(...)``:
    ``%b::uuid[], %b::text[], ...``. Binary (``%b``): psycopg quotes a text-format array
    element by element in Python, which costs more than an ``executemany``."""
    return SQL(", ".join(f"%b::{t}[]" for t in types))


def columns(rows: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """Rows as one list per column (the arrays ``unnest`` turns back into rows)."""
    return [list(column) for column in zip(*rows)]


def tracking_name(projection: str, source: str) -> str:
    return f"{projection}|{source}"


class ReadModelStore(PostgresTrackingRecorder):
    def __init__(self, datastore: PostgresDatastore, projections: Sequence[Projection]):
        super().__init__(datastore, tracking_table_name="projection_tracking")
        self.projections = list(projections)
        schema = Identifier(self.datastore.schema)
        self.sql_create_statements.append(SQL(
            "CREATE TABLE IF NOT EXISTS {0}.read_positions ("
            " projection text NOT NULL, source text NOT NULL, position bigint NOT NULL,"
            " PRIMARY KEY (projection, source))").format(schema))
        for statement in dl.ddl(self.datastore.schema):
            self.sql_create_statements.append(SQL(statement))  # type: ignore[arg-type]
        for projection in self.projections:
            for statement in projection.ddl(self.datastore.schema):
                self.sql_create_statements.append(SQL(statement))  # type: ignore[arg-type]

    # ---- writing -------------------------------------------------------------------
    def apply_batch(self, source: str, items: Sequence[Item], watermark: int | None,
                    dead_letters: list[dl.DeadLetter] | None = None,
                    synchronous: bool = True) -> int:
        """Apply ``items`` (ascending notification ids of one source) to every read
        model, skipping what each has already applied; record tracking and the
        watermark. Returns how many (projection, event) applications were made.

        If an event fails a read model, the batch is applied again carefully (see the
        module docstring); the dead letters it recorded are appended to
        ``dead_letters`` when given. ``synchronous=False`` commits without waiting for
        the WAL flush: only for a source that is read again from its tracking after a
        crash (see the module docstring)."""
        if not any(isinstance(i.event, dl.Undecodable) for i in items):
            try:
                return self._apply_batch(source, items, watermark, None, synchronous)
            except _Careful:
                pass
            except Exception as error:
                if dl.is_infrastructure(error):
                    raise
                log.warning("batch from %s failed (%s: %s); bisecting to the failing event",
                            source, type(error).__name__, error)
        recorded: list[dl.DeadLetter] = []
        applied = self._apply_batch(source, items, watermark, recorded, synchronous)
        for letter in recorded:
            log.error("dead letter %s: %s could not apply notification %s (%s)", letter.seq,
                      letter.projection, letter.notification_id, letter.status)
        if dead_letters is not None:
            dead_letters.extend(recorded)
        return applied

    def _apply_batch(self, source: str, items: Sequence[Item], watermark: int | None,
                     recorded: list[dl.DeadLetter] | None, synchronous: bool) -> int:
        """One transaction. ``recorded is None``: the fast path (any failure aborts);
        otherwise each read model's events go under savepoints and failures become
        dead letters appended to ``recorded``. Either way every read model's tracking
        row is locked first and written last, all of them in one statement each."""
        applied = 0
        schema = self.datastore.schema
        names = {p.name: tracking_name(p.name, source) for p in self.projections}
        with self.datastore.transaction(commit=True) as cur:
            if not synchronous:
                cur.execute("SET LOCAL synchronous_commit = off")
            blocked = dl.blocked(cur, schema)
            positions = self._locked_positions(cur, list(names.values()))
            reached: list[Tracking] = []
            for projection in self.projections:
                name = names[projection.name]
                done = positions.get(name, 0)
                last = None
                fresh, late, parked = [], [], []
                held = blocked.get(projection.name, set())
                for item in items:
                    if item.late:
                        late.append(item)
                        continue
                    if item.notification_id <= done:
                        continue  # applied before (a republished or replayed event)
                    done = last = item.notification_id
                    (parked if item.event.originator_id in held else fresh).append(item)
                if (parked or late) and recorded is None:
                    raise _Careful()
                for item in parked:
                    recorded.append(dl.record(cur, schema, projection.name, source, item,  # type: ignore[union-attr]
                                              None, "parked"))
                if recorded is None:
                    apply_items(projection, cur, schema, fresh)
                    applied += len(fresh)
                else:
                    applied += self._guarded(cur, projection, source, fresh, set(held), recorded)
                    claimed = [i for i in late if dl.claim_late(cur, schema, projection.name,
                                                                source, i)]
                    if claimed:
                        dl.bump_repairs(cur, schema, projection.name)
                    applied += self._guarded(cur, projection, source, claimed, set(held),
                                             recorded)
                if last is not None:
                    reached.append(Tracking(name, last))
            self._record_tracking(cur, reached)
            if watermark is not None:
                self._raise_watermarks(cur, list(names), source, watermark)
        return applied

    def _guarded(self, cur: Cursor[Any], projection: Projection, source: str,
                 items: Sequence[Item], held: set[Any], recorded: list[dl.DeadLetter]) -> int:
        """Apply ``items`` under a savepoint; on failure bisect: the failing event
        becomes a pending dead letter and later events of its aggregate are parked."""
        runnable = []
        for item in items:
            if item.event.originator_id in held:
                recorded.append(dl.record(cur, self.datastore.schema, projection.name, source,
                                          item, None, "parked"))
            else:
                runnable.append(item)
        if not runnable:
            return 0
        try:
            with cur.connection.transaction():
                apply_items(projection, cur, self.datastore.schema, runnable)
            return len(runnable)
        except Exception as error:
            if dl.is_infrastructure(error):
                raise
            if len(runnable) == 1:
                recorded.append(dl.record(cur, self.datastore.schema, projection.name, source,
                                          runnable[0], error, "pending"))
                held.add(runnable[0].event.originator_id)
                return 0
        middle = len(runnable) // 2
        left = self._guarded(cur, projection, source, runnable[:middle], held, recorded)
        return left + self._guarded(cur, projection, source, runnable[middle:], held, recorded)

    def _locked_positions(self, cur: Cursor[Any], names: Sequence[str]) -> dict[str, int]:
        """The tracking positions of ``names`` (a name without a row is at 0), locked
        until this transaction ends: a rebuild (or another runner) holding one makes
        this wait, then read what it committed. One statement, locking in name order,
        so two runners of a source never deadlock (a rebuild locks one name of it)."""
        cur.execute(SQL("SELECT application_name, notification_id FROM {0}.{1}"
                        " WHERE application_name = ANY(%b) ORDER BY application_name"
                        " FOR UPDATE").format(Identifier(self.datastore.schema),
                                              Identifier(self.tracking_table_name)),
                    (list(names),))
        return {row["application_name"]: int(row["notification_id"]) for row in cur.fetchall()}

    def _record_tracking(self, cur: Cursor[Any], reached: Sequence[Tracking]) -> None:
        """Move every tracking position of ``reached`` forward in one statement, with
        the library's rule (``_insert_tracking``): one that would stand still or move
        back was recorded by another runner first, so raise ``IntegrityError`` as the
        library does and the whole batch rolls back."""
        if not reached:
            return
        rows = sorted(reached, key=lambda t: t.application_name)
        cur.execute(SQL(
            "INSERT INTO {0}.{1} (application_name, notification_id)"
            " SELECT * FROM unnest(%b::text[], %b::bigint[])"
            " ON CONFLICT (application_name) DO UPDATE"
            " SET notification_id = EXCLUDED.notification_id"
            " WHERE {0}.{1}.notification_id < EXCLUDED.notification_id"
            " RETURNING application_name").format(Identifier(self.datastore.schema),
                                                  Identifier(self.tracking_table_name)),
            ([t.application_name for t in rows], [t.notification_id for t in rows]))
        recorded = {row["application_name"] for row in cur.fetchall()}
        for tracking in rows:
            if tracking.application_name not in recorded:
                raise IntegrityError(f"Failed to record tracking for"
                                     f" {tracking.application_name} {tracking.notification_id}")

    def apply_requeued(self, decode: Callable[[Any], Any]) -> int:
        """Apply what operators requeued (and what was parked behind it), each read
        model in its own transaction, once: the dead letter's status moves with the
        rows. ``decode`` turns a stored event back into a domain event (the fix may
        be a new version that can read it). Returns how many events were applied."""
        schema = self.datastore.schema
        with self.datastore.cursor() as cur:
            if not dl.requeue_due(cur, schema):
                return 0  # the common case: one query
        with self.datastore.transaction(commit=True) as cur:
            dl.release_orphans(cur, schema)
            names = dl.requeued_projections(cur, schema)
        applied = 0
        for projection in self.projections:
            if projection.name not in names:
                continue
            with self.datastore.transaction(commit=True) as cur:
                # wait for a rebuild of this read model, as a batch would
                cur.execute(SQL("SELECT 1 FROM {0}.{1} WHERE application_name LIKE %s"
                                " FOR UPDATE").format(Identifier(schema),
                                                      Identifier(self.tracking_table_name)),
                            (projection.name + "|%",))
                for chain in dl.requeued_chains(cur, schema, projection.name):
                    for row in chain:
                        try:
                            with cur.connection.transaction():
                                stored = _StoredEvent(row)
                                item = Item(row["notification_id"], decode(stored), stored)
                                apply_items(projection, cur, schema, [item])
                        except Exception as error:
                            if dl.is_infrastructure(error):
                                raise
                            dl.mark_failed_again(cur, schema, row["seq"], error)
                            log.error("requeued dead letter %s failed again: %s", row["seq"], error)
                            break
                        dl.mark_applied(cur, schema, row["seq"])
                        applied += 1
                dl.bump_repairs(cur, schema, projection.name)
        return applied

    def register_sources(self, sources: Iterable[str]) -> None:
        """Make ``sources`` count towards positions before they have seen a message."""
        with self.datastore.transaction(commit=True) as cur:
            for projection in self.projections:
                for source in sources:
                    cur.execute(SQL(
                        "INSERT INTO {0}.read_positions VALUES (%s, %s, 0)"
                        " ON CONFLICT DO NOTHING").format(Identifier(self.datastore.schema)),
                        (projection.name, source))

    def _raise_watermarks(self, cur: Cursor[Any], projections: Sequence[str], source: str,
                          position: int) -> None:
        """Raise the watermark of each of ``projections`` for ``source`` to ``position``
        (never lower one), in one statement. Rows are written in the order given: the
        projections' order, as ``register_sources`` inserts them."""
        cur.execute(SQL(
            "INSERT INTO {0}.read_positions (projection, source, position)"
            " SELECT n.projection, %s::text, %s::bigint FROM unnest(%b::text[]) AS n(projection)"
            " ON CONFLICT (projection, source) DO UPDATE"
            " SET position = GREATEST({0}.read_positions.position, EXCLUDED.position)"
        ).format(Identifier(self.datastore.schema)), (source, position, list(projections)))

    def tracked(self, projection: str, source: str) -> int:
        return self.max_tracking_id(tracking_name(projection, source)) or 0

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def lowest_tracked(self, source: str) -> int:
        """The lowest tracking position for ``source`` over every read model (0 while
        one has none), in one query: where a catch-up of them all starts."""
        with self.datastore.cursor() as cur:
            cur.execute(SQL("SELECT min(coalesce(t.notification_id, 0)) AS p"
                            " FROM unnest(%b::text[]) AS n(name) LEFT JOIN {0}.{1} t"
                            " ON t.application_name = n.name").format(
                Identifier(self.datastore.schema), Identifier(self.tracking_table_name)),
                ([tracking_name(p.name, source) for p in self.projections],))
            row = cur.fetchone()
        return int(row["p"] or 0) if row else 0

    # ---- rebuilding ----------------------------------------------------------------
    def rebuild(self, projection: Projection, batches: Iterable[Sequence[Item]]) -> int:
        """Rebuild one read model from the event store in a single transaction.

        Readers keep seeing the old rows until the commit swaps in the new ones; live
        projectors wait on the locked tracking rows. Afterwards every source this
        projection tracks is positioned at the last event replayed."""
        schema = Identifier(self.datastore.schema)
        count = 0
        last = 0
        with self.datastore.transaction(commit=True) as cur:
            cur.execute(SQL("SELECT application_name, notification_id FROM {0}.{1}"
                            " WHERE application_name LIKE %s FOR UPDATE").format(
                schema, Identifier(self.tracking_table_name)), (projection.name + "|%",))
            sources = {row["application_name"].split("|", 1)[1] for row in cur.fetchall()}
            cur.execute(SQL("SELECT source FROM {0}.read_positions WHERE projection = %s"
                            " FOR UPDATE").format(schema), (projection.name,))
            sources |= {row["source"] for row in cur.fetchall()}
            skipped = dl.skipped_by_rebuild(cur, self.datastore.schema, projection.name)
            dl.bump_repairs(cur, self.datastore.schema, projection.name)
            for table in projection.tables:
                cur.execute(SQL("DELETE FROM {0}.{1}").format(schema, Identifier(table)))
            for batch in batches:
                apply_items(projection, cur, self.datastore.schema,
                            [i for i in batch if i.notification_id not in skipped])
                if batch:
                    last = batch[-1].notification_id
                count += len(batch)
            for source in sources or {"log"}:
                # updated in place (never deleted and inserted again): a batch waiting
                # on the row lock then reads the new position
                cur.execute(SQL("INSERT INTO {0}.{1} VALUES (%s, %s) ON CONFLICT"
                                " (application_name) DO UPDATE SET notification_id ="
                                " EXCLUDED.notification_id").format(
                    schema, Identifier(self.tracking_table_name)),
                    (tracking_name(projection.name, source), last))
                cur.execute(SQL("DELETE FROM {0}.read_positions WHERE projection = %s"
                                " AND source = %s").format(schema), (projection.name, source))
                self._raise_watermarks(cur, [projection.name], source, last)
        return count


class _Careful(Exception):
    """The fast path met parked or late events: apply the batch carefully."""


class _StoredEvent:
    """A dead letter's stored event, shaped as the library's mapper reads one."""

    def __init__(self, row: dict[str, Any]):
        self.originator_id = row["originator_id"]
        self.originator_version = row["originator_version"]
        self.topic = row["event_topic"]
        self.state = bytes(row["state"] or b"")


def repair_generation(cur: Cursor[Any], projections: str | Sequence[str],
                      schema: str = SCHEMA) -> int:
    """Changes to the read models that did not move their position (a cache key needs
    it beside the position)."""
    return dl.repairs(cur, schema, [projections] if isinstance(projections, str)
                      else list(projections))


def position(cur: Cursor[Any], projection: str, source_prefix: str,
             schema: str = SCHEMA) -> int:
    """The read model's position: every notification at or below it is applied."""
    cur.execute(SQL("SELECT min(position) AS p FROM {0}.read_positions"
                    " WHERE projection = %s AND source LIKE %s").format(Identifier(schema)),
                (projection, source_prefix + "%"))
    row = cur.fetchone()
    value = row["p"] if isinstance(row, dict) else (row[0] if row else None)
    return int(value or 0)
