"""Applies events to read models, each batch in ONE transaction with its tracking.

Tracking follows the eventsourcing library's ``PostgresTrackingRecorder``: one row per
(projection, source) holding the highest notification id applied; the upsert refuses
to move backwards or stand still, so a batch that two runners race to apply commits
once and the loser rolls back whole. ``source`` is ``log`` for the direct transport
and ``kafka:<topic>/<partition>`` for the Kafka one.

``read_positions`` holds each projection's watermark per source: every notification
at or below it has been applied. A read model's position is the lowest watermark
over the sources of the transport in use; queries compare it with the position a
command returned (read-your-writes) and put it in cache keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from eventsourcing.persistence import Tracking
from eventsourcing.postgres import PostgresDatastore, PostgresTrackingRecorder
from psycopg import Cursor
from psycopg.sql import SQL, Identifier

SCHEMA = "readmodels"


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
        for projection in self.projections:
            for statement in projection.ddl(self.datastore.schema):
                self.sql_create_statements.append(SQL(statement))  # type: ignore[arg-type]

    # ---- writing -------------------------------------------------------------------
    def apply_batch(self, source: str, items: Sequence[Item], watermark: int | None) -> int:
        """Apply ``items`` (ascending notification ids of one source) to every read
        model, skipping what each has already applied; record tracking and the
        watermark. Returns how many (projection, event) applications were made."""
        applied = 0
        with self.datastore.transaction(commit=True) as cur:
            for projection in self.projections:
                name = tracking_name(projection.name, source)
                done = self._max_tracking_id(name, cur) or 0
                last = None
                fresh = []
                for item in items:
                    if item.notification_id <= done:
                        continue  # applied before (a republished or replayed event)
                    fresh.append(item)
                    done = last = item.notification_id
                apply_items(projection, cur, self.datastore.schema, fresh)
                applied += len(fresh)
                if last is not None:
                    self._insert_tracking(cur, Tracking(name, last))
                if watermark is not None:
                    self._raise_watermark(cur, projection.name, source, watermark)
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

    def _raise_watermark(self, cur: Cursor[Any], projection: str, source: str, position: int) -> None:
        cur.execute(SQL(
            "INSERT INTO {0}.read_positions VALUES (%s, %s, %s)"
            " ON CONFLICT (projection, source) DO UPDATE"
            " SET position = GREATEST({0}.read_positions.position, EXCLUDED.position)"
        ).format(Identifier(self.datastore.schema)), (projection, source, position))

    def tracked(self, projection: str, source: str) -> int:
        return self.max_tracking_id(tracking_name(projection, source)) or 0

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
            for table in projection.tables:
                cur.execute(SQL("DELETE FROM {0}.{1}").format(schema, Identifier(table)))
            for batch in batches:
                apply_items(projection, cur, self.datastore.schema, batch)
                if batch:
                    last = batch[-1].notification_id
                count += len(batch)
            for source in sources or {"log"}:
                cur.execute(SQL("DELETE FROM {0}.{1} WHERE application_name = %s").format(
                    schema, Identifier(self.tracking_table_name)),
                    (tracking_name(projection.name, source),))
                if last:
                    self._insert_tracking(cur, Tracking(tracking_name(projection.name, source), last))
                cur.execute(SQL("DELETE FROM {0}.read_positions WHERE projection = %s"
                                " AND source = %s").format(schema), (projection.name, source))
                self._raise_watermark(cur, projection.name, source, last)
        return count


def position(cur: Cursor[Any], projection: str, source_prefix: str,
             schema: str = SCHEMA) -> int:
    """The read model's position: every notification at or below it is applied."""
    cur.execute(SQL("SELECT min(position) AS p FROM {0}.read_positions"
                    " WHERE projection = %s AND source LIKE %s").format(Identifier(schema)),
                (projection, source_prefix + "%"))
    row = cur.fetchone()
    value = row["p"] if isinstance(row, dict) else (row[0] if row else None)
    return int(value or 0)
