"""App catalog, versions, entitlements and the V3 apps catalog reads, from the ``apps``
read model (app-instances §1.2, §1.3).

Who sees what (docs/decisions.md):
- ``listAppCatalog`` and ``listAppCatalogVersions`` show published apps and versions
  (``active|deprecated``) to every caller; an operator (``platform.admin``) also sees
  the unpublished (``disabled``) ones, which is how a version registered with the
  operator CLI is found before it is published. An app a caller may not see is 404
  ``app_not_found``, exactly like a missing one.
- ``listProjectAppEntitlements``: members of the project and operators; no row means
  not entitled (the list holds the rows that exist).
- ``listV3Apps``/``getV3AppDetail`` (and their ``…Compat`` twins) show published apps
  for the ``X-Project-ID`` project, with that project's entitlement;
  ``running_workloads`` are the project's instances of the app that are not gone, as
  their rows in the V3 workloads read model (the same JSON as ``listV3Workloads``). The slugs
  ``catalog``, ``registry``, ``artifacts`` and ``instances`` are reserved: the literal
  routes are registered first, and a detail read of one of them is 404.

Lists page by slug with signed keyset cursors.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse

from api.auth import Principal, authenticate, project_scope, require_member
from api.errors import ApiError
from api.pagination import encode_cursor, page_request, pagination_block
from api.queries import cached_query
from api.queries.inventory import v3_meta, with_meta_cache
from domain.app_catalog_views import (PUBLISHED, v3_app_item,
                                      v3_examples, v3_permissions, v3_versions)
from domain.apps import VERSION_STATUSES, catalog_item_json, catalog_version_json, entitlement_json
from api.queries.workloads import workload_json
from projections.apps import categories, get_app, list_apps, project_entitlements
from projections.workloads import app_workloads
from projections.store import SCHEMA

router = APIRouter()
READ_MODELS = ("apps",)
#: the detail also lists the app's instances from the V3 workloads read model
DETAIL_READ_MODELS = ("apps", "workloads")
SLUG = r"^[a-z0-9][a-z0-9-]{1,62}$"
RESERVED_SLUGS = ("catalog", "registry", "artifacts", "instances")
FEATURED_LIMIT = 6
Slug = Path(pattern=SLUG)


def _visible(principal: Principal) -> tuple[str, ...]:
    return VERSION_STATUSES if principal.can("platform.admin") else PUBLISHED


def app_not_found(slug: str) -> ApiError:
    return ApiError(404, "app_not_found", f"app {slug!r} not found", app_slug=slug)


def _page(request: Request, principal: Principal, operation_id: str, *, cursor: str | None,
          page_size: int | None, filters: dict[str, Any]) -> Any:
    return page_request(request.app.state.settings.jwt_secret, cursor=cursor,
                        page_size=page_size, operation_id=operation_id, sort="slug_asc",
                        filters=filters, scope=principal.scope_key)


def _next(request: Request, principal: Principal, operation_id: str, filters: dict[str, Any],
          rows: list[Any], size: int, last: Any) -> str | None:
    if len(rows) <= size:
        return None
    return encode_cursor(request.app.state.settings.jwt_secret, operation_id=operation_id,
                         sort="slug_asc", filters=filters, scope=principal.scope_key,
                         last_key=[last])


# ---- the catalog (reference data) -------------------------------------------------------------
@router.get("/api/v1/apps/catalog", operation_id="listAppCatalog")
def list_app_catalog(request: Request, principal: Principal = Depends(authenticate),
                     cursor: str | None = None, page_size: int | None = Query(default=None),
                     category: str | None = None,
                     status: Literal["active", "deprecated", "disabled"] | None = None
                     ) -> JSONResponse:
    visible = _visible(principal)
    filters = {"category": category, "status": status, "visible": ",".join(visible)}
    page = _page(request, principal, "listAppCatalog", cursor=cursor, page_size=page_size,
                 filters=filters)
    statuses = [s for s in visible if status is None or s == status]

    def compute(cur: Any) -> dict[str, Any]:
        rows = list_apps(cur, SCHEMA, statuses=statuses, category=category,
                         after=page.after[0] if page.after else None, limit=page.page_size + 1)
        following = _next(request, principal, "listAppCatalog", filters, rows, page.page_size,
                          rows[page.page_size - 1].slug if len(rows) > page.page_size else None)
        return {"items": [catalog_item_json(app) for app in rows[:page.page_size]],
                "pagination": pagination_block(following, page.page_size)}

    return cached_query(request, principal, operation_id="listAppCatalog",
                        projection=READ_MODELS,
                        query={**filters, "after": page.after, "page_size": page.page_size},
                        compute=compute)


@router.get("/api/v1/apps/catalog/{app_slug}/versions", operation_id="listAppCatalogVersions")
def list_app_catalog_versions(request: Request, app_slug: str = Slug,
                              principal: Principal = Depends(authenticate),
                              cursor: str | None = None,
                              page_size: int | None = Query(default=None)) -> JSONResponse:
    """Versions newest first: published ones by publication, then unpublished ones
    (operators only) by registration."""
    visible = _visible(principal)
    filters = {"app_slug": app_slug, "visible": ",".join(visible)}
    page = _page(request, principal, "listAppCatalogVersions", cursor=cursor,
                 page_size=page_size, filters=filters)

    def compute(cur: Any) -> dict[str, Any]:
        app = get_app(cur, SCHEMA, app_slug)
        if app is None or app.status not in visible:
            raise app_not_found(app_slug)
        ordered = sorted((v for v in app.versions.values() if v["status"] in visible),
                         key=lambda v: (v["published_seq"] is None,
                                        -(v["published_seq"] or 0), -v["registered_seq"]))
        names = [v["version"] for v in ordered]
        start = names.index(page.after[0]) + 1 if page.after and page.after[0] in names else 0
        chunk = ordered[start:start + page.page_size + 1]
        following = _next(request, principal, "listAppCatalogVersions", filters, chunk,
                          page.page_size, chunk[page.page_size - 1]["version"]
                          if len(chunk) > page.page_size else None)
        return {"items": [catalog_version_json(app.slug, v) for v in chunk[:page.page_size]],
                "pagination": pagination_block(following, page.page_size)}

    return cached_query(request, principal, operation_id="listAppCatalogVersions",
                        projection=READ_MODELS,
                        query={**filters, "after": page.after, "page_size": page.page_size},
                        compute=compute)


@router.get("/api/v1/projects/{project_id}/apps/entitlements",
            operation_id="listProjectAppEntitlements")
def list_project_app_entitlements(project_id: UUID, request: Request,
                                  principal: Principal = Depends(authenticate)) -> JSONResponse:
    if not principal.can("platform.admin"):
        require_member(principal, project_id)

    def compute(cur: Any) -> dict[str, Any]:
        found = project_entitlements(cur, SCHEMA, project_id)
        return {"items": [entitlement_json(project_id, slug, enabled, overrides)
                          for slug, (enabled, overrides) in found.items()]}

    return cached_query(request, principal, operation_id="listProjectAppEntitlements",
                        projection=READ_MODELS, query={"project_id": str(project_id)},
                        compute=compute)


# ---- V3 (the project's view) -------------------------------------------------------------------
@router.get("/api/v1/apps", operation_id="listV3Apps")
@router.get("/api/v1/v3/apps", operation_id="listV3AppsCompat")
def list_v3_apps(request: Request, principal: Principal = Depends(authenticate),
                 cursor: str | None = None, page_size: int | None = Query(default=None),
                 category: str | None = Query(default=None, max_length=80),
                 search: str | None = Query(default=None, max_length=120)) -> JSONResponse:
    project = project_scope(request, principal)
    filters = {"category": category, "search": search, "project": str(project)}
    page = _page(request, principal, "listV3Apps", cursor=cursor, page_size=page_size,
                 filters=filters)

    def compute(cur: Any) -> dict[str, Any]:
        rows = list_apps(cur, SCHEMA, statuses=PUBLISHED, category=category, search=search,
                         after=page.after[0] if page.after else None, limit=page.page_size + 1)
        featured = list_apps(cur, SCHEMA, statuses=PUBLISHED, category=category, search=search,
                             featured=True, limit=FEATURED_LIMIT)
        slugs = [a.slug for a in rows + featured]
        entitlements = project_entitlements(cur, SCHEMA, project, slugs)
        following = _next(request, principal, "listV3Apps", filters, rows, page.page_size,
                          rows[page.page_size - 1].slug if len(rows) > page.page_size else None)
        return {"items": [v3_app_item(a, entitlements.get(a.slug)) for a in rows[:page.page_size]],
                "featured": [v3_app_item(a, entitlements.get(a.slug)) for a in featured],
                "categories": categories(cur, SCHEMA, PUBLISHED),
                "pagination": pagination_block(following, page.page_size), "meta": v3_meta()}

    return with_meta_cache(cached_query(
        request, principal, operation_id="listV3Apps", projection=READ_MODELS,
        query={**filters, "after": page.after, "page_size": page.page_size}, compute=compute))


@router.get("/api/v1/apps/{app_slug}", operation_id="getV3AppDetail")
@router.get("/api/v1/v3/apps/{app_slug}", operation_id="getV3AppDetailCompat")
def get_v3_app_detail(request: Request, app_slug: str = Slug,
                      principal: Principal = Depends(authenticate)) -> JSONResponse:
    project = project_scope(request, principal)
    if app_slug in RESERVED_SLUGS:
        raise app_not_found(app_slug)

    def compute(cur: Any) -> dict[str, Any]:
        app = get_app(cur, SCHEMA, app_slug)
        if app is None or app.status not in PUBLISHED:
            raise app_not_found(app_slug)
        entitlement = project_entitlements(cur, SCHEMA, project, [app_slug]).get(app_slug)
        now, funds = datetime.now(timezone.utc), {}
        return {"app": v3_app_item(app, entitlement), "versions": v3_versions(app, entitlement),
                "permissions": v3_permissions(app, entitlement), "examples": v3_examples(app),
                "running_workloads": [
                    workload_json(cur, row, principal.user_id, now, funds)
                    for row in app_workloads(cur, SCHEMA, project, app_slug)],
                "meta": v3_meta()}

    return with_meta_cache(cached_query(
        request, principal, operation_id="getV3AppDetail", projection=DETAIL_READ_MODELS,
        query={"app_slug": app_slug, "project": str(project)}, compute=compute))
