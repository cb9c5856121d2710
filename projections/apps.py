"""Apps read model: the app catalog and project entitlements (app-instances §6.4).

- ``app_catalog``: one row per app. ``state`` is a copy of the ``AppCatalogEntry``
  aggregate (``state_of``) moved with the aggregate's own code (``fold``), beside the
  columns lists filter and page on (``status``, ``category``, ``featured``,
  ``search_text``). The contract's ``AppCatalogItem``/``AppCatalogVersion`` and the
  V3 card are built at query time from it (``domain.apps``,
  ``domain.app_catalog_views``), so a rebuild reproduces every answer.
- ``app_entitlements``: one row per (project, app): ``enabled`` and
  ``policy_overrides`` (and the folded ``state``).

Fed by ``AppCatalogEntry`` and ``ProjectAppEntitlement`` events. ``getV3AppDetail``'s
``running_workloads`` are the app's rows in the V3 workloads read model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

from psycopg import Cursor
from psycopg.sql import SQL, Identifier
from psycopg.types.json import Jsonb

from domain.apps import AppCatalogEntry, ProjectAppEntitlement
from domain.inventory import fold, restore, state_of
from projections.store import Item

_MINE = (AppCatalogEntry.Event, ProjectAppEntitlement.Event)


def _search_text(app: AppCatalogEntry) -> str:
    d = app.details
    return " ".join(str(x) for x in (app.slug, d.get("display_name"), d.get("publisher"),
                                     d.get("description") or "", *(d.get("tags") or []))).lower()


def _featured(app: AppCatalogEntry) -> bool:
    manifest = (app.versions.get(app.latest_version) or {}).get("manifest") or {}
    presentation = manifest.get("presentation")
    return isinstance(presentation, dict) and presentation.get("featured") is True


class Apps:
    name = "apps"
    tables = ("app_catalog", "app_entitlements")

    def ddl(self, schema: str) -> list[str]:
        s = f'"{schema}"'
        return [
            f"CREATE TABLE IF NOT EXISTS {s}.app_catalog ("
            " slug text PRIMARY KEY, id uuid NOT NULL, category text NOT NULL,"
            " status text NOT NULL, featured boolean NOT NULL, search_text text NOT NULL,"
            " state jsonb NOT NULL, notification_id bigint NOT NULL)",
            f"CREATE TABLE IF NOT EXISTS {s}.app_entitlements ("
            " project_id uuid NOT NULL, app_slug text NOT NULL, id uuid NOT NULL,"
            " enabled boolean NOT NULL, policy_overrides jsonb NOT NULL, state jsonb NOT NULL,"
            " notification_id bigint NOT NULL, PRIMARY KEY (project_id, app_slug))",
            f"CREATE UNIQUE INDEX IF NOT EXISTS app_entitlements_id ON {s}.app_entitlements (id)",
        ]

    def apply(self, cur: Cursor[Any], schema: str, event: Any, notification_id: int) -> None:
        self.apply_many(cur, schema, [Item(notification_id, event)])

    def apply_many(self, cur: Cursor[Any], schema: str, items: Sequence[Item]) -> None:
        """Fold the batch in memory (each touched aggregate loaded once), then write
        each touched row once."""
        mine = [item for item in items if isinstance(item.event, _MINE)]
        if not mine:
            return
        by_kind: dict[type, list[Item]] = {}
        for item in mine:
            kind = next(k for k in (AppCatalogEntry, ProjectAppEntitlement)
                        if isinstance(item.event, k.Event))
            by_kind.setdefault(kind, []).append(item)
        for kind, table, write in ((AppCatalogEntry, "app_catalog", _write_app),
                                   (ProjectAppEntitlement, "app_entitlements", _write_entitlement)):
            found = by_kind.get(kind)
            if not found:
                continue
            stored = _load(cur, schema, table, list({i.event.originator_id for i in found}))
            folded: dict[UUID, Any] = {}
            last: dict[UUID, int] = {}
            for item in found:
                key = item.event.originator_id
                if key in folded:
                    item.event.mutate(folded[key])
                else:
                    folded[key] = fold(kind, stored.get(key), item.event)
                last[key] = item.notification_id
            for key, aggregate in folded.items():
                write(cur, schema, aggregate, last[key])


def _load(cur: Cursor[Any], schema: str, table: str, ids: list[UUID]) -> dict[UUID, Any]:
    cur.execute(SQL("SELECT id, state FROM {0}.{1} WHERE id = ANY(%s)").format(
        Identifier(schema), Identifier(table)), (ids,))
    return {row["id"]: row["state"] for row in cur.fetchall()}


def _upsert(cur: Cursor[Any], schema: str, table: str, key: tuple[str, ...],
            values: dict[str, Any]) -> None:
    names = [Identifier(name) for name in values]
    cur.execute(SQL("INSERT INTO {0}.{1} ({2}) VALUES ({3}) ON CONFLICT ({4}) DO UPDATE"
                    " SET {5}").format(
        Identifier(schema), Identifier(table), SQL(", ").join(names),
        SQL(", ").join(SQL("%s") for _ in names), SQL(", ").join(Identifier(k) for k in key),
        SQL(", ").join(SQL("{0} = EXCLUDED.{0}").format(Identifier(name)) for name in values
                       if name not in key)),
        list(values.values()))


def _write_app(cur: Cursor[Any], schema: str, app: AppCatalogEntry, notification_id: int) -> None:
    _upsert(cur, schema, "app_catalog", ("slug",), {
        "slug": app.slug, "id": app.id, "category": app.details["category"],
        "status": app.status, "featured": _featured(app), "search_text": _search_text(app),
        "state": Jsonb(state_of(app)), "notification_id": notification_id})


def _write_entitlement(cur: Cursor[Any], schema: str, entitlement: ProjectAppEntitlement,
                       notification_id: int) -> None:
    _upsert(cur, schema, "app_entitlements", ("project_id", "app_slug"), {
        "project_id": UUID(entitlement.project_id), "app_slug": entitlement.app_slug,
        "id": entitlement.id, "enabled": entitlement.enabled,
        "policy_overrides": Jsonb(entitlement.policy_overrides),
        "state": Jsonb(state_of(entitlement)), "notification_id": notification_id})


# ---- queries ----------------------------------------------------------------------------------
def list_apps(cur: Cursor[Any], schema: str, *, statuses: Sequence[str],
              category: str | None = None, search: str | None = None,
              featured: bool | None = None, after: str | None = None,
              limit: int) -> list[AppCatalogEntry]:
    """Apps in ``statuses`` (and ``category``, ``search`` in their text, ``featured``),
    by slug, after the slug ``after``."""
    where, params = [SQL("status = ANY(%s)")], [list(statuses)]
    if category is not None:
        where.append(SQL("category = %s"))
        params.append(category)
    if search:
        where.append(SQL("strpos(search_text, %s) > 0"))
        params.append(search.lower())
    if featured is not None:
        where.append(SQL("featured = %s"))
        params.append(featured)
    if after is not None:
        where.append(SQL("slug > %s"))
        params.append(after)
    cur.execute(SQL("SELECT state FROM {0}.app_catalog WHERE {1} ORDER BY slug LIMIT %s").format(
        Identifier(schema), SQL(" AND ").join(where)), (*params, limit))
    return [restore(AppCatalogEntry, row["state"]) for row in cur.fetchall()]


def categories(cur: Cursor[Any], schema: str, statuses: Sequence[str]) -> list[str]:
    cur.execute(SQL("SELECT DISTINCT category FROM {0}.app_catalog WHERE status = ANY(%s)"
                    " ORDER BY category").format(Identifier(schema)), (list(statuses),))
    return [row["category"] for row in cur.fetchall()]


def get_app(cur: Cursor[Any], schema: str, slug: str) -> AppCatalogEntry | None:
    cur.execute(SQL("SELECT state FROM {0}.app_catalog WHERE slug = %s").format(
        Identifier(schema)), (slug,))
    row = cur.fetchone()
    return None if row is None else restore(AppCatalogEntry, row["state"])


def project_entitlements(cur: Cursor[Any], schema: str, project_id: UUID,
                         slugs: Sequence[str] | None = None
                         ) -> dict[str, tuple[bool, dict[str, Any]]]:
    """slug -> (enabled, policy_overrides) of the project's entitlements (of ``slugs``
    when given)."""
    cur.execute(SQL("SELECT app_slug, enabled, policy_overrides FROM {0}.app_entitlements"
                    " WHERE project_id = %s AND (%s::text[] IS NULL OR app_slug = ANY(%s))"
                    " ORDER BY app_slug").format(Identifier(schema)),
                (project_id, None if slugs is None else list(slugs),
                 None if slugs is None else list(slugs)))
    return {row["app_slug"]: (row["enabled"], dict(row["policy_overrides"]))
            for row in cur.fetchall()}


