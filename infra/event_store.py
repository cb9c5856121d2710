"""The event store's recorder: the eventsourcing library's Postgres application recorder,
with a batch's events inserted as four plain arrays instead of one array of a composite
type.

The library builds one composite value per event, which psycopg writes out as text in
Python (a quarter of the time of an in-process append was spent there); plain arrays of
uuid, bigint, text and bytea are dumped by psycopg's C code. The statement, the table
lock before it, the NOTIFY and the returned notification ids are the library's own.
Selected with the library's ``APPLICATION_RECORDER_TOPIC`` (``Settings.eventstore_env``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder
from psycopg import Cursor
from psycopg.rows import DictRow
from psycopg.sql import SQL, Identifier


class ArrayInsertRecorder(PostgresApplicationRecorder):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.insert_arrays_statement = SQL(
            "INSERT INTO {schema}.{table} (originator_id, originator_version, topic, state)"
            " SELECT * FROM unnest(%b::{id_type}[], %b::bigint[], %b::text[], %b::bytea[])"
            " RETURNING notification_id"
        ).format(schema=Identifier(self.datastore.schema),
                 table=Identifier(self.events_table_name),
                 id_type=Identifier(self.datastore.originator_id_type))

    def _insert_stored_events(self, curs: Cursor[DictRow], stored_events: Sequence[StoredEvent],
                              **kwargs: Any) -> None:
        self._lock_table(curs)
        self._notify_channel(curs)
        curs.execute(self.insert_arrays_statement, (
            [event.originator_id for event in stored_events],
            [event.originator_version for event in stored_events],
            [event.topic for event in stored_events],
            [event.state for event in stored_events],
        ))
