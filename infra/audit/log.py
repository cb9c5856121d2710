"""Reading the notification log, and which prefix of it is "as of" an instant.

(See the package's docstring for why as-of is a log position.) ``as_of_position``
asks Postgres directly when the event store is ``eventsourcing.postgres`` with its
JSON transcoding (the stored state's ``timestamp``), which reads no event into Python;
any other store, or a state it cannot read, is scanned event by event.

``read_part`` reads one part of the log (the events of the aggregates whose id's last
byte is ``part`` modulo ``parts``; Postgres only), so that several processes can share
the reading: each aggregate's events all fall in one part, in log order.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

from eventsourcing.persistence import Notification
from eventsourcing.postgres import PostgresDatastore
from psycopg.rows import tuple_row
from psycopg.sql import SQL, Identifier

#: notifications read per query
PAGE = 1000
Tick = Callable[[int], None]


def parse_instant(text: str) -> datetime:
    """An ISO-8601 instant (``2026-11-23T10:00:00Z``, ``…+01:00``, or a date: its
    midnight); without an offset it is UTC. ``ValueError`` when it is not one."""
    value = datetime.fromisoformat(text.strip())
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def read_pages(app: Any, after: int, stop: int, topics: Sequence[str] = (), page: int = PAGE,
               tick: Tick | None = None) -> Iterator[Sequence[Notification]]:
    """The notifications with ``after`` < id ≤ ``stop`` (of ``topics`` when given), in
    log order, a page at a time. ``tick(position)`` after each page."""
    while after < stop:
        batch = app.recorder.select_notifications(start=after, limit=page, stop=stop,
                                                  topics=list(topics),
                                                  inclusive_of_start=False)
        if batch:
            yield batch
        after = stop if len(batch) < page else batch[-1].id
        if tick is not None:
            tick(after)


def prefetched(pages: Iterator[Sequence[Notification]]) -> Iterator[Sequence[Notification]]:
    """``pages``, with the next one read by a helper thread while the caller works on
    the current one (Postgres's time and Python's overlap: about a third faster)."""
    from concurrent.futures import ThreadPoolExecutor

    done = object()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-read") as pool:
        pending = pool.submit(next, pages, done)
        while True:
            batch = pending.result()
            if batch is done:
                return
            pending = pool.submit(next, pages, done)
            yield batch


def read_log(app: Any, after: int, stop: int, topics: Sequence[str] = (), page: int = PAGE,
             tick: Tick | None = None) -> Iterator[Notification]:
    """``read_pages`` (prefetched), one notification at a time."""
    for batch in prefetched(read_pages(app, after, stop, topics, page, tick)):
        yield from batch


def partitioned(app: Any) -> bool:
    """Can ``read_part`` read this app's log (Postgres, uuid originator ids)?"""
    recorder = app.recorder
    datastore = getattr(recorder, "datastore", None)
    return isinstance(datastore, PostgresDatastore) and hasattr(recorder, "events_table_name") \
        and datastore.originator_id_type == "uuid"


def read_part(app: Any, after: int, stop: int, topics: Sequence[str], part: int, parts: int,
              page: int = PAGE, tick: Tick | None = None) -> Iterator[Sequence[Notification]]:
    """``read_pages``, but only the events whose originator id's last byte is ``part``
    modulo ``parts``. Each query reads a range of ``page * parts`` positions through the
    notification id index (about ``page`` of its rows are this part's): the predicate
    on the originator id only filters that range's rows, so it needs no index."""
    recorder = app.recorder
    datastore = recorder.datastore
    statement = SQL("SELECT notification_id, originator_id, originator_version, topic, state"
                    " FROM {0}.{1} WHERE notification_id > %s AND notification_id <= %s").format(
        Identifier(datastore.schema), Identifier(recorder.events_table_name))
    if topics:
        statement += SQL(" AND topic = ANY(%s)")
    statement += SQL(" AND get_byte(uuid_send(originator_id), 15) %% %s = %s"
                     " ORDER BY notification_id")
    span = page * parts
    while after < stop:
        upto = min(after + span, stop)
        params: list[Any] = [after, upto] + ([list(topics)] if topics else []) + [parts, part]
        with datastore.get_connection() as conn, conn.cursor(row_factory=tuple_row) as cursor:
            cursor.execute(statement, params, prepare=True)
            rows = cursor.fetchall()
        if rows:
            yield [Notification(id=id_, originator_id=originator_id,
                                originator_version=version, topic=topic, state=bytes(state))
                   for id_, originator_id, version, topic, state in rows]
        after = upto
        if tick is not None:
            tick(after)


def head(app: Any) -> int:
    """The position of the last event in the log (0 when empty)."""
    return app.recorder.max_notification_id() or 0


def _sql_as_of(app: Any, instant: datetime) -> int | None:
    recorder = app.recorder
    datastore = getattr(recorder, "datastore", None)
    if datastore is None or not hasattr(recorder, "events_table_name"):
        return None
    if getattr(app.mapper, "cipher", None) is not None or \
            getattr(app.mapper, "compressor", None) is not None:
        return None
    statement = SQL(
        "SELECT max(notification_id) AS p FROM {0}.{1} WHERE (convert_from(state, 'UTF8')"
        "::jsonb -> 'timestamp' ->> '_data_')::timestamptz <= %s").format(
        Identifier(datastore.schema), Identifier(recorder.events_table_name))
    try:
        with datastore.transaction(commit=False) as cur:
            cur.execute(statement, (instant,))
            row = cur.fetchone()
    except Exception:  # noqa: BLE001 - a state it cannot read: scan instead
        return None
    value = row["p"] if isinstance(row, dict) else row[0]
    return int(value or 0)


def _scanned_as_of(app: Any, instant: datetime, tick: Tick | None = None) -> int:
    found = 0
    for notification in read_log(app, 0, head(app), tick=tick):
        if app.mapper.to_domain_event(notification).timestamp <= instant:
            found = notification.id
    return found


def as_of_position(app: Any, instant: datetime, *, scan: bool = False,
                   tick: Tick | None = None) -> int:
    """The position of the last event in the log stamped at or before ``instant`` (0
    when none is). ``scan``: decode every event instead of asking Postgres."""
    if instant.tzinfo is None:
        raise ValueError("the instant needs a time zone")
    found = None if scan else _sql_as_of(app, instant)
    return _scanned_as_of(app, instant, tick) if found is None else found


def position_before(app: Any, instant: datetime) -> int:
    """The as-of position of the moment just before ``instant`` (so that an export
    ``--from T`` starts exactly where one ``--to`` the moment before ended)."""
    return as_of_position(app, instant - timedelta(microseconds=1))


@contextmanager
def progress(label: str, total: int | None, enabled: bool | None = None) -> Iterator[Tick]:
    """A progress bar on stderr (a terminal only, unless ``enabled``) for work over log
    positions up to ``total`` (None: of unknown length); yields ``tick(position)``."""
    from rich.console import Console

    console = Console(stderr=True)
    if enabled is None:
        enabled = console.is_terminal and sys.stderr.isatty()
    if not enabled or (total is not None and total <= 0):
        yield lambda position: None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                  transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda position: bar.update(task, completed=min(position, total or position))
