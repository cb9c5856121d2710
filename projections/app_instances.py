"""App-instances read model (app-instances §6.4): instances, members, member operations
and repair operations, each row holding the contract's JSON as the commands answer it.

- ``app_instance_view``: one row per instance. ``state`` is a copy of the ``AppInstance``
  aggregate (``state_of``) moved with the aggregate's own code (``fold``); ``body`` is
  ``instance_json`` of it (``AppInstance``), beside the columns lists filter and sort on
  (``project_id``, ``status``, ``created_at``).
- ``app_member_view``, ``app_member_operation_view``, ``app_repair_operation_view``: one
  row per member / operation, ``body`` = ``member_json`` / ``member_operation_json`` /
  ``repair_operation_json``, with ``app_instance_id``, ``project_id``, ``status``,
  ``component_key`` (not on repairs) and ``created_at``. A batch writes only the rows
  whose JSON changed; nothing in a row depends on how the log was cut into batches, so
  a rebuild reproduces it exactly.

Fed by ``AppInstance`` events only (quota and allocation-use aggregates serve no read
here). Queries scope every read by ``project_id``: a row of another project is not
found, exactly like a missing one.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg import Cursor
from psycopg.sql import SQL, Identifier
from psycopg.types.json import Jsonb

from domain.app_instance_views import (instance_json, member_json, member_operation_json,
                                       repair_operation_json)
from domain.app_instances import AppInstance
from domain.inventory import fold, state_of
from projections.store import Item

INSTANCES = "app_instance_view"
MEMBERS = "app_member_view"
MEMBER_OPERATIONS = "app_member_operation_view"
REPAIR_OPERATIONS = "app_repair_operation_view"
#: child table -> (the aggregate's dict holding its items, the JSON builder)
CHILDREN = {MEMBERS: ("members", member_json),
            MEMBER_OPERATIONS: ("member_ops", member_operation_json),
            REPAIR_OPERATIONS: ("repair_ops", repair_operation_json)}


def _children(state: dict[str, Any] | None, table: str) -> dict[str, dict[str, Any]]:
    if state is None:
        return {}
    key, build = CHILDREN[table]
    return {item_id: build(item) for item_id, item in state[key].items()}


class AppInstances:
    name = "app_instances"
    tables = (INSTANCES, MEMBERS, MEMBER_OPERATIONS, REPAIR_OPERATIONS)

    def ddl(self, schema: str) -> list[str]:
        s = f'"{schema}"'
        statements = [
            f"CREATE TABLE IF NOT EXISTS {s}.{INSTANCES} ("
            " id uuid PRIMARY KEY, project_id uuid NOT NULL, status text NOT NULL,"
            " created_at timestamptz NOT NULL, state jsonb NOT NULL, body jsonb NOT NULL,"
            " notification_id bigint NOT NULL)",
            f"CREATE INDEX IF NOT EXISTS {INSTANCES}_project ON {s}.{INSTANCES}"
            " (project_id, created_at DESC, id DESC)",
        ]
        for table in CHILDREN:
            statements += [
                f"CREATE TABLE IF NOT EXISTS {s}.{table} ("
                " id uuid PRIMARY KEY, app_instance_id uuid NOT NULL, project_id uuid NOT NULL,"
                " status text NOT NULL, component_key text, created_at timestamptz NOT NULL,"
                " body jsonb NOT NULL)",
                f"CREATE INDEX IF NOT EXISTS {table}_instance ON {s}.{table}"
                " (app_instance_id, created_at, id)",
            ]
        return statements

    def apply(self, cur: Cursor[Any], schema: str, event: Any, notification_id: int) -> None:
        self.apply_many(cur, schema, [Item(notification_id, event)])

    def apply_many(self, cur: Cursor[Any], schema: str, items: Sequence[Item]) -> None:
        """Fold the batch in memory (each touched instance loaded once), then write each
        touched instance once and the child rows whose JSON changed."""
        mine = [item for item in items if isinstance(item.event, AppInstance.Event)]
        if not mine:
            return
        stored = _load(cur, schema, list({item.event.originator_id for item in mine}))
        # the JSON before the batch (folding moves the stored state's own dicts)
        before = copy.deepcopy({key: {table: _children(state, table) for table in CHILDREN}
                                for key, state in stored.items()})
        folded: dict[UUID, Any] = {}
        last: dict[UUID, int] = {}
        for item in mine:
            event = item.event
            key = event.originator_id
            if key in folded:
                event.mutate(folded[key])
            else:
                folded[key] = fold(AppInstance, stored.get(key), event)
            last[key] = item.notification_id
        for key, instance in folded.items():
            state = state_of(instance)
            _upsert_instance(cur, schema, instance, state, last[key])
            for table in CHILDREN:
                was = before.get(key, {}).get(table, {})
                for item_id, body in _children(state, table).items():
                    if was.get(item_id) != body:
                        _upsert_child(cur, schema, table, instance, body)


def _load(cur: Cursor[Any], schema: str, ids: list[UUID]) -> dict[UUID, dict[str, Any]]:
    cur.execute(SQL("SELECT id, state FROM {0}.{1} WHERE id = ANY(%s)").format(
        Identifier(schema), Identifier(INSTANCES)), (ids,))
    return {row["id"]: row["state"] for row in cur.fetchall()}


def _upsert(cur: Cursor[Any], schema: str, table: str, values: dict[str, Any]) -> None:
    names = [Identifier(name) for name in values]
    cur.execute(SQL("INSERT INTO {0}.{1} ({2}) VALUES ({3}) ON CONFLICT (id) DO UPDATE"
                    " SET {4}").format(Identifier(schema), Identifier(table),
                                       SQL(", ").join(names),
                                       SQL(", ").join(SQL("%s") for _ in names),
                                       SQL(", ").join(SQL("{0} = EXCLUDED.{0}").format(n)
                                                      for n in names[1:])),
                list(values.values()))


def _upsert_instance(cur: Cursor[Any], schema: str, instance: AppInstance,
                     state: dict[str, Any], notification_id: int) -> None:
    _upsert(cur, schema, INSTANCES, {
        "id": instance.id, "project_id": UUID(instance.spec["project_id"]),
        "status": instance.status, "created_at": instance.created_on, "state": Jsonb(state),
        "body": Jsonb(instance_json(instance)), "notification_id": notification_id})


def _upsert_child(cur: Cursor[Any], schema: str, table: str, instance: AppInstance,
                  body: dict[str, Any]) -> None:
    _upsert(cur, schema, table, {
        "id": UUID(body["id"]), "app_instance_id": instance.id,
        "project_id": UUID(instance.spec["project_id"]), "status": body["status"],
        "component_key": body.get("component_key"),
        "created_at": datetime.fromisoformat(body["created_at"]), "body": Jsonb(body)})


# ---- queries ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    created_at: datetime
    id: UUID
    body: dict[str, Any]


def get_instance(cur: Cursor[Any], schema: str, project_id: UUID,
                 app_instance_id: UUID) -> dict[str, Any] | None:
    """The instance's ``AppInstance`` if it belongs to ``project_id``."""
    cur.execute(SQL("SELECT body FROM {0}.{1} WHERE id = %s AND project_id = %s").format(
        Identifier(schema), Identifier(INSTANCES)), (app_instance_id, project_id))
    row = cur.fetchone()
    return row["body"] if row else None


def list_instances(cur: Cursor[Any], schema: str, project_id: UUID, *, status: str | None,
                   after: tuple[datetime, UUID] | None, limit: int) -> list[Row]:
    """The project's instances, newest first (``created_at desc, id desc``)."""
    where, params = [SQL("project_id = %s")], [project_id]
    if status is not None:
        where.append(SQL("status = %s"))
        params.append(status)
    if after is not None:
        where.append(SQL("(created_at, id) < (%s, %s)"))
        params += list(after)
    cur.execute(SQL("SELECT created_at, id, body FROM {0}.{1} WHERE {2}"
                    " ORDER BY created_at DESC, id DESC LIMIT %s").format(
        Identifier(schema), Identifier(INSTANCES), SQL(" AND ").join(where)), [*params, limit])
    return [Row(r["created_at"], r["id"], r["body"]) for r in cur.fetchall()]


def get_child(cur: Cursor[Any], schema: str, table: str, project_id: UUID,
              app_instance_id: UUID, item_id: UUID) -> dict[str, Any] | None:
    cur.execute(SQL("SELECT body FROM {0}.{1} WHERE id = %s AND app_instance_id = %s"
                    " AND project_id = %s").format(Identifier(schema), Identifier(table)),
                (item_id, app_instance_id, project_id))
    row = cur.fetchone()
    return row["body"] if row else None


def list_children(cur: Cursor[Any], schema: str, table: str, project_id: UUID,
                  app_instance_id: UUID, *, status: str | None, component_key: str | None,
                  after: tuple[datetime, UUID] | None, limit: int) -> list[Row]:
    """An instance's members or operations, oldest first (``created_at, id``): the
    adapter works through its queue in the order it was asked."""
    where = [SQL("app_instance_id = %s"), SQL("project_id = %s")]
    params: list[Any] = [app_instance_id, project_id]
    for column, value in (("status", status), ("component_key", component_key)):
        if value is not None:
            where.append(SQL("{0} = %s").format(Identifier(column)))
            params.append(value)
    if after is not None:
        where.append(SQL("(created_at, id) > (%s, %s)"))
        params += list(after)
    cur.execute(SQL("SELECT created_at, id, body FROM {0}.{1} WHERE {2}"
                    " ORDER BY created_at, id LIMIT %s").format(
        Identifier(schema), Identifier(table), SQL(" AND ").join(where)), [*params, limit])
    return [Row(r["created_at"], r["id"], r["body"]) for r in cur.fetchall()]
