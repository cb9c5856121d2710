"""Connection pools and schema bootstrap: the one place that opens Postgres."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import psycopg
from eventsourcing.postgres import PostgresDatastore
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row
from psycopg.sql import SQL, Identifier
from psycopg_pool import ConnectionPool

import projections
from domain.app import Ledgercore
from infra.settings import Settings
from projections.store import SCHEMA, ReadModelStore

EVENT_SCHEMA = "eventstore"
BOOTSTRAP_LOCK = 0x1ED6E5C0


def create_database(admin_dsn: str, name: str) -> str:
    """Create database ``name`` on the server of ``admin_dsn``; return its DSN."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(SQL("CREATE DATABASE {0}").format(Identifier(name)))
    return make_conninfo(admin_dsn, dbname=name)


def drop_database(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(SQL("DROP DATABASE IF EXISTS {0} WITH (FORCE)").format(Identifier(name)))


def ensure_schemas(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for schema in (EVENT_SCHEMA, SCHEMA):
            conn.execute(SQL("CREATE SCHEMA IF NOT EXISTS {0}").format(Identifier(schema)))


def read_model_datastore(settings: Settings, pool_size: int = 2) -> PostgresDatastore:
    info = conninfo_to_dict(settings.pg_dsn or "")
    return PostgresDatastore(
        dbname=str(info.get("dbname", "postgres")), host=str(info.get("host", "127.0.0.1")),
        port=str(info.get("port", "5432")), user=str(info.get("user", "postgres")),
        password=str(info.get("password", "")), schema=SCHEMA, pool_size=pool_size,
        max_overflow=pool_size, pre_ping=True,
    )


@dataclass
class Stores:
    """The write-side application, the read-model store and a pool for queries."""

    settings: Settings
    app: Ledgercore
    read_models: ReadModelStore
    query_pool: ConnectionPool[Any]
    _closed: bool = field(default=False, repr=False)

    @classmethod
    def open(cls, settings: Settings) -> Stores:
        assert settings.pg_dsn, "no Postgres DSN"
        # Processes starting together (api, relay, projectors) create the tables one
        # at a time: concurrent CREATE TABLE IF NOT EXISTS can fail on the catalog.
        with psycopg.connect(settings.pg_dsn, autocommit=True) as lock:
            lock.execute("SELECT pg_advisory_lock(%s)", (BOOTSTRAP_LOCK,))
            ensure_schemas(settings.pg_dsn)
            app = Ledgercore(env=settings.eventstore_env(),
                             default_currency=settings.default_currency)
            read_models = ReadModelStore(read_model_datastore(settings), projections.ALL)
            read_models.create_table()
        pool: ConnectionPool[Any] = ConnectionPool(
            settings.pg_dsn, min_size=1, max_size=settings.pg_pool_size, open=True,
            kwargs={"autocommit": True, "row_factory": dict_row}, check=ConnectionPool.check_connection)
        return cls(settings, app, read_models, pool)

    def position_source_prefix(self) -> str:
        return "log" if self.settings.transport == "direct" else f"kafka:{self.settings.kafka_topic}/"

    def originators(self, topic: str) -> list[UUID]:
        """Ids of the streams whose events include ``topic`` (e.g. every allocation),
        read from the event store itself, never a read model."""
        recorder = self.app.recorder
        with self.query_pool.connection() as conn:
            rows = conn.execute(SQL("SELECT DISTINCT originator_id FROM {0}.{1} WHERE topic = %s")
                                .format(Identifier(recorder.datastore.schema),
                                        Identifier(recorder.events_table_name)), (topic,)).fetchall()
        return sorted(row["originator_id"] if isinstance(row, dict) else row[0] for row in rows)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.query_pool.close()
        self.read_models.datastore.close()
        self.app.close()
