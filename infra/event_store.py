"""The event store's recorder: the eventsourcing library's Postgres application recorder,
with a batch's events inserted as four plain arrays, in one statement.

The library builds one composite value per event, which psycopg writes out as text in
Python (a quarter of the time of an in-process append was spent there); plain arrays of
uuid, bigint, text and bytea are dumped by psycopg's C code.

The library sends a save as a pipelined transaction: the lock timeout, the table lock,
the NOTIFY, the insert, a sync, then the commit. Here the same statements run inside
one function, ``ledgercore_insert_events``, called as a single autocommit statement:
one round trip, and none of psycopg's pipeline and transaction bookkeeping, which was
most of a small save's CPU. The lock (``EXCLUSIVE``, held to the commit, so
notification ids are committed in order), the NOTIFY, the returned notification ids and
the errors (a version conflict is the library's ``IntegrityError``) are the library's.
A save that carries anything more (a tracking record, which only the library's process
applications write) goes the library's way.
Selected with the library's ``APPLICATION_RECORDER_TOPIC`` (``Settings.eventstore_env``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eventsourcing.persistence import InterfaceError, OperationalError, StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder
from eventsourcing.utils import retry
from psycopg import Cursor
from psycopg.rows import DictRow, tuple_row
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
        function = Identifier(self.datastore.schema, "ledgercore_insert_events")
        self.sql_create_statements.append(SQL(
            "CREATE OR REPLACE FUNCTION {function}("
            " ids {id_type}[], versions bigint[], topics text[], states bytea[])"
            " RETURNS SETOF bigint LANGUAGE plpgsql AS $BODY$"
            " BEGIN"
            "  SET LOCAL lock_timeout = '{lock_timeout}s';"
            "  LOCK TABLE {schema}.{table} IN EXCLUSIVE MODE;"
            "  NOTIFY {channel};"
            "  RETURN QUERY INSERT INTO {schema}.{table}"
            "   (originator_id, originator_version, topic, state)"
            "   SELECT * FROM unnest(ids, versions, topics, states) RETURNING notification_id;"
            " END; $BODY$"
        ).format(function=function, id_type=Identifier(self.datastore.originator_id_type),
                 lock_timeout=self.datastore.lock_timeout,
                 schema=Identifier(self.datastore.schema),
                 table=Identifier(self.events_table_name),
                 channel=Identifier(self.channel_name)))
        self.insert_function_call = SQL(
            "SELECT n AS notification_id FROM {0}(%b, %b, %b, %b) AS n").format(function)

    def insert_events(self, stored_events: Sequence[StoredEvent],
                      **kwargs: Any) -> Sequence[int] | None:
        if not stored_events or any(value is not None for value in kwargs.values()):
            return super().insert_events(stored_events, **kwargs)
        return self._insert_in_one_statement(stored_events)

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def _insert_in_one_statement(self, stored_events: Sequence[StoredEvent]) -> list[int]:
        """The library's ``insert_events`` (its retries included) as one statement."""
        with self.datastore.get_connection() as conn, \
                conn.cursor(row_factory=tuple_row) as curs:  # a dict per row cost 5% of a save
            curs.execute(self.insert_function_call, _arrays(stored_events), prepare=True)
            return [row[0] for row in curs.fetchall()]

    def _insert_stored_events(self, curs: Cursor[DictRow], stored_events: Sequence[StoredEvent],
                              **kwargs: Any) -> None:
        self._lock_table(curs)
        self._notify_channel(curs)
        curs.execute(self.insert_arrays_statement, _arrays(stored_events))


def _arrays(stored_events: Sequence[StoredEvent]) -> tuple[list[Any], ...]:
    return ([event.originator_id for event in stored_events],
            [event.originator_version for event in stored_events],
            [event.topic for event in stored_events],
            [event.state for event in stored_events])
