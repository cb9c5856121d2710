"""The app catalog and project entitlements (app-instances §1.3, §2 "Catalog", §4.2).

``AppCatalogEntry`` (one per slug) holds an app's public description and its versions.
A version is registered with its runtime backend and manifest, unpublished (the
contract's ``disabled``: it has no draft status); ``publish`` makes it ``active``,
``deprecate`` ``deprecated``, and a deprecated version may be published again. A
version's backend and manifest never change. The app's ``status`` and
``latest_version`` are derived from its versions (the contract has no app-level
command): ``active`` while some version is active, ``deprecated`` when every published
version is deprecated, else ``disabled``; ``latest_version`` is the active version
published last, else the deprecated one published last, else the one registered last.

``ProjectAppEntitlement`` (one per project and slug) says whether a project may run an
app, with ``policy_overrides``. No entitlement means not entitled (deny by default).

The manifest is open in the contract; these keys mean something here (anything else is
kept as given):

- ``operating_modes``: the modes the version runs in, the first being the default
  (default ``["tenant_dedicated"]``);
- ``components``: capacity the platform claims for the app itself, one member per unit:
  ``[{component_key, member_role?, sku, gpu_count?, count?}]``;
- ``pricing``: the ``app_runtime`` price of platform-run components (metered only for a
  ``platform_managed`` instance): ``[{component, unit_price: Money, usage_unit}]``;
- ``dependencies``: the launch dependencies it declares (``ssh|storage|network|
  service_account|api_key``).
"""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate

from domain.commands import Command, Render, Session
from domain.money import is_known_currency
from domain.provenance import CommandContext
from domain.skus import NAMESPACE, iso, refusal

CATEGORIES = ("model_serving", "inference", "training", "orchestration", "observability", "other")
RUNTIME_BACKENDS = ("k8s", "rke2", "slurm", "ray", "bare_metal")
VERSION_STATUSES = ("active", "deprecated", "disabled")
OPERATING_MODES = ("tenant_dedicated", "platform_managed")
DEPENDENCIES = ("ssh", "storage", "network", "service_account", "api_key")
#: the policy override keys that mean something (others are kept as given)
DEFAULT_LAUNCH_ROLES = ("owner", "admin", "member")
MAX_COMPONENT_COUNT = 16


def app_id_for(slug: str) -> UUID:
    return uuid5(NAMESPACE, f"app:{slug}")


def entitlement_id_for(project_id: UUID | str, slug: str) -> UUID:
    return uuid5(NAMESPACE, f"ent:{project_id}:{slug}")


def _invalid(message: str, reason: str, **details: Any) -> Exception:
    return refusal("invalid_request", "invalid", message, reason=reason, **details)


class AppCatalogEntry(Aggregate):
    TOPIC = "ledgercore.AppCatalogEntry"

    class Created(Aggregate.Created):
        TOPIC = "ledgercore.AppRegistered"
        slug: str
        details: dict[str, Any]
        provenance: dict[str, Any]

    class VersionRegistered(Aggregate.Event):
        TOPIC = "ledgercore.AppVersionRegistered"
        version: str
        runtime_backend: str
        manifest: dict[str, Any]
        provenance: dict[str, Any]

        def apply(self, a: AppCatalogEntry) -> None:
            a.registered += 1
            a.versions[self.version] = {
                "version": self.version, "runtime_backend": self.runtime_backend,
                "manifest": dict(self.manifest), "status": "disabled",
                "registered_seq": a.registered, "published_seq": None,
                "published_at": None}

    class VersionPublished(Aggregate.Event):
        TOPIC = "ledgercore.AppVersionPublished"
        version: str
        from_status: str
        provenance: dict[str, Any]

        def apply(self, a: AppCatalogEntry) -> None:
            a.published += 1
            a.versions[self.version].update(status="active", published_seq=a.published,
                                            published_at=iso(self.timestamp))

    class VersionDeprecated(Aggregate.Event):
        TOPIC = "ledgercore.AppVersionDeprecated"
        version: str
        provenance: dict[str, Any]

        def apply(self, a: AppCatalogEntry) -> None:
            a.versions[self.version]["status"] = "deprecated"

    def __init__(self, slug: str, details: dict[str, Any], provenance: dict[str, Any]):
        self.slug, self.details = slug, dict(details)
        self.versions: dict[str, dict[str, Any]] = {}
        self.registered = self.published = 0

    @property
    def status(self) -> str:
        statuses = {v["status"] for v in self.versions.values()}
        if "active" in statuses:
            return "active"
        return "deprecated" if "deprecated" in statuses else "disabled"

    @property
    def latest_version(self) -> str:
        def newest(status: str) -> str | None:
            found = [v for v in self.versions.values() if v["status"] == status]
            return max(found, key=lambda v: v["published_seq"])["version"] if found else None

        registered = max(self.versions.values(), key=lambda v: v["registered_seq"],
                         default=None)
        return newest("active") or newest("deprecated") or (
            registered["version"] if registered else "")

    def version_of(self, version: str) -> dict[str, Any]:
        """The version, or 404 ``app_version_not_found``."""
        found = self.versions.get(version)
        if found is None:
            raise refusal("app_version_not_found", "not_found",
                          f"app {self.slug!r} has no version {version!r}",
                          app_slug=self.slug, app_version=version)
        return found


class ProjectAppEntitlement(Aggregate):
    TOPIC = "ledgercore.ProjectAppEntitlement"

    class Created(Aggregate.Created):
        TOPIC = "ledgercore.AppEntitlementOpened"
        project_id: str
        app_slug: str

    class Upserted(Aggregate.Event):
        TOPIC = "ledgercore.AppEntitlementUpserted"
        enabled: bool
        policy_overrides: dict[str, Any]
        provenance: dict[str, Any]

        def apply(self, e: ProjectAppEntitlement) -> None:
            e.enabled, e.policy_overrides = self.enabled, dict(self.policy_overrides)

    def __init__(self, project_id: str, app_slug: str):
        self.project_id, self.app_slug = project_id, app_slug
        self.enabled = False
        self.policy_overrides: dict[str, Any] = {}


# ---- JSON (the contract's schemas) ----------------------------------------------------
def catalog_item_json(app: AppCatalogEntry) -> dict[str, Any]:
    """``AppCatalogItem``."""
    d = app.details
    return {"slug": app.slug, "display_name": d["display_name"], "category": d["category"],
            "publisher": d["publisher"], "latest_version": app.latest_version,
            "status": app.status, "description": d.get("description"),
            "logo_url": d.get("logo_url"), "tags": d.get("tags")}


def catalog_version_json(slug: str, version: dict[str, Any]) -> dict[str, Any]:
    """``AppCatalogVersion``."""
    return {"app_slug": slug, "version": version["version"],
            "runtime_backend": version["runtime_backend"],
            "manifest": dict(version["manifest"]), "status": version["status"]}


def entitlement_json(project_id: UUID | str, slug: str, enabled: bool,
                     policy_overrides: dict[str, Any]) -> dict[str, Any]:
    """``AppEntitlement``."""
    return {"app_slug": slug, "project_id": str(project_id), "enabled": enabled,
            "policy_overrides": dict(policy_overrides)}


# ---- validation -----------------------------------------------------------------------
def _strings(value: Any, *, allowed: tuple[str, ...] | None = None) -> bool:
    return (isinstance(value, list) and all(isinstance(v, str) and v for v in value)
            and (allowed is None or set(value) <= set(allowed)))


def validate_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest with the keys we read checked (400 ``invalid_request``,
    ``manifest_invalid``, naming the field)."""

    def bad(field: str, message: str) -> Exception:
        return _invalid(message, "manifest_invalid", field=f"manifest.{field}")

    modes = manifest.get("operating_modes", ["tenant_dedicated"])
    if not _strings(modes, allowed=OPERATING_MODES) or not modes or len(set(modes)) != len(modes):
        raise bad("operating_modes", f"operating_modes must be distinct values of {OPERATING_MODES}")
    components = manifest.get("components", [])
    if not isinstance(components, list):
        raise bad("components", "components must be a list")
    keys = set()
    for index, c in enumerate(components):
        where = f"components[{index}]"
        if not isinstance(c, dict) or not isinstance(c.get("component_key"), str) \
                or not c["component_key"] or not isinstance(c.get("sku"), str) or not c["sku"]:
            raise bad(where, "a component needs a component_key and a sku")
        if c["component_key"] in keys:
            raise bad(where, "component keys must be distinct")
        keys.add(c["component_key"])
        for key, low, high in (("gpu_count", 1, 64), ("count", 1, MAX_COMPONENT_COUNT)):
            value = c.get(key, 1)
            if type(value) is not int or not low <= value <= high:
                raise bad(f"{where}.{key}", f"{key} must be an integer in {low}..{high}")
        if c.get("member_role") is not None and not isinstance(c["member_role"], str):
            raise bad(f"{where}.member_role", "member_role must be a string")
    pricing = manifest.get("pricing", [])
    if not isinstance(pricing, list):
        raise bad("pricing", "pricing must be a list")
    names = set()
    for index, p in enumerate(pricing):
        where = f"pricing[{index}]"
        price = p.get("unit_price") if isinstance(p, dict) else None
        if (not isinstance(p, dict) or not isinstance(p.get("component"), str) or not p["component"]
                or not isinstance(p.get("usage_unit"), str) or not p["usage_unit"]
                or not isinstance(price, dict) or type(price.get("amount_minor")) is not int
                or price["amount_minor"] < 0 or not isinstance(price.get("currency"), str)
                or not is_known_currency(price["currency"])):
            raise bad(where, "a price needs a component, a usage_unit and a unit_price "
                             "(non-negative amount_minor, ISO 4217 currency)")
        if p["component"] in names or p["component"] in keys:
            raise bad(where, "pricing components must be distinct from each other and "
                             "from capacity components")
        names.add(p["component"])
    if not _strings(manifest.get("dependencies", []), allowed=DEPENDENCIES):
        raise bad("dependencies", f"dependencies must be values of {DEPENDENCIES}")
    return manifest


def validate_policy_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """``policy_overrides`` is open; the keys we enforce must be well formed (400
    ``invalid_request``, ``policy_override_invalid``)."""

    def bad(key: str, message: str) -> Exception:
        return _invalid(message, "policy_override_invalid", field=f"policy_overrides.{key}")

    if "allowed_versions" in overrides and not _strings(overrides["allowed_versions"]):
        raise bad("allowed_versions", "allowed_versions must be a list of versions")
    if "max_instances" in overrides:
        value = overrides["max_instances"]
        if type(value) is not int or not 0 <= value <= 10_000:
            raise bad("max_instances", "max_instances must be an integer in 0..10000")
    if "allowed_operating_modes" in overrides and not _strings(
            overrides["allowed_operating_modes"], allowed=OPERATING_MODES):
        raise bad("allowed_operating_modes", f"allowed_operating_modes must be values of "
                                             f"{OPERATING_MODES}")
    if "launch_roles" in overrides and not _strings(overrides["launch_roles"]):
        raise bad("launch_roles", "launch_roles must be a list of role names")
    return overrides


# ---- lookups other commands use -------------------------------------------------------
def get_app(session: Session, slug: str) -> AppCatalogEntry:
    """The app, or 404 ``app_not_found``."""
    app = session.get(app_id_for(slug))
    if not isinstance(app, AppCatalogEntry):
        raise refusal("app_not_found", "not_found", f"app {slug!r} not found", app_slug=slug)
    return app


def entitlement_of(session: Session, project_id: UUID | str,
                   slug: str) -> tuple[bool, dict[str, Any]]:
    """(enabled, policy_overrides); no entitlement is (False, {})."""
    found = session.get(entitlement_id_for(project_id, slug))
    if found is None:
        return False, {}
    return found.enabled, dict(found.policy_overrides)


def require_entitled(session: Session, project_id: UUID | str, slug: str, version: str, *,
                     project_role: str | None = None) -> dict[str, Any]:
    """403 ``app_not_entitled`` unless the project is entitled to ``version`` of the app
    (``allowed_versions``); 403 ``insufficient_permissions`` when ``project_role`` is
    given and not among ``launch_roles``. Answers the policy overrides."""
    enabled, overrides = entitlement_of(session, project_id, slug)
    if not enabled:
        missing = session.get(entitlement_id_for(project_id, slug)) is None
        raise refusal("app_not_entitled", "forbidden", f"the project is not entitled to {slug!r}",
                      app_slug=slug,
                      reason="entitlement_missing" if missing else "entitlement_disabled")
    allowed = overrides.get("allowed_versions")
    if allowed is not None and version not in allowed:
        raise refusal("app_not_entitled", "forbidden",
                      f"version {version!r} of {slug!r} is not allowed for the project",
                      app_slug=slug, app_version=version, reason="version_not_allowed")
    roles = overrides.get("launch_roles", list(DEFAULT_LAUNCH_ROLES))
    if project_role is not None and project_role not in roles:
        raise refusal("insufficient_permissions", "forbidden",
                      f"role {project_role!r} may not launch {slug!r}", app_slug=slug,
                      reason="launch_role_required", launch_roles=roles)
    return overrides


def newest_entitled_version(app: AppCatalogEntry, overrides: dict[str, Any]) -> str | None:
    """The default ``app_version`` of a V3 launch: the newest entitled active version."""
    allowed = overrides.get("allowed_versions")
    found = [v for v in app.versions.values() if v["status"] == "active"
             and (allowed is None or v["version"] in allowed)]
    return max(found, key=lambda v: v["published_seq"])["version"] if found else None


# ---- commands --------------------------------------------------------------------------
def register_app(ctx: CommandContext, *, slug: str, display_name: str, category: str,
                 publisher: str, description: str | None = None, logo_url: str | None = None,
                 tags: list[str] | None = None, render: Render) -> Command:
    """Add an app to the catalog (no contract operation: the catalog is seeded by
    operators). The same description again is a no-op; another one is 409."""
    details = {"display_name": display_name, "category": category, "publisher": publisher,
               "description": description, "logo_url": logo_url, "tags": tags}

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        if category not in CATEGORIES:
            raise _invalid(f"category must be one of {CATEGORIES}", "category_invalid",
                           field="category")
        existing = session.get(app_id_for(slug))
        if existing is not None:
            if existing.details != details:
                raise refusal("invalid_request", "conflict", f"app {slug!r} already exists",
                              reason="app_already_exists", app_slug=slug)
            return [], catalog_item_json(existing)
        app = AppCatalogEntry._create(AppCatalogEntry.Created, id=app_id_for(slug), slug=slug,
                                      details=details, provenance=ctx.provenance(),
                                      timestamp=ctx.now)
        return [app], catalog_item_json(app)

    return Command(ctx, decide, render)


def register_version(ctx: CommandContext, *, slug: str, version: str, runtime_backend: str,
                     manifest: dict[str, Any], render: Render) -> Command:
    """Register an unpublished version (``disabled``). Versions are immutable: the same
    backend and manifest again is a no-op, another is 409 ``app_version_exists``."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        app = get_app(session, slug)
        if not 1 <= len(version) <= 64:
            raise _invalid("version must be 1..64 characters", "version_invalid", field="version")
        if runtime_backend not in RUNTIME_BACKENDS:
            raise _invalid(f"runtime_backend must be one of {RUNTIME_BACKENDS}",
                           "runtime_backend_invalid", field="runtime_backend")
        validate_manifest(manifest)
        existing = app.versions.get(version)
        if existing is not None:
            if (existing["runtime_backend"], existing["manifest"]) != (runtime_backend, manifest):
                raise refusal("invalid_request", "conflict",
                              f"version {version!r} of {slug!r} exists with another definition",
                              reason="app_version_exists", app_slug=slug, app_version=version)
            return [], catalog_version_json(slug, existing)
        app.trigger_event(AppCatalogEntry.VersionRegistered, version=version,
                          runtime_backend=runtime_backend, manifest=manifest,
                          provenance=ctx.provenance(), timestamp=ctx.now)
        return [app], catalog_version_json(slug, app.versions[version])

    return Command(ctx, decide, render)


def publish_version(ctx: CommandContext, *, slug: str, version: str, render: Render) -> Command:
    """``adminPublishAppCatalogVersion``: ``disabled`` (unpublished) or ``deprecated`` →
    ``active``; publishing an active version again is a no-op."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        app = get_app(session, slug)
        found = app.version_of(version)
        if found["status"] == "active":
            return [], catalog_version_json(slug, found)
        app.trigger_event(AppCatalogEntry.VersionPublished, version=version,
                          from_status=found["status"], provenance=ctx.provenance(),
                          timestamp=ctx.now)
        return [app], catalog_version_json(slug, app.versions[version])

    return Command(ctx, decide, render)


def deprecate_version(ctx: CommandContext, *, slug: str, version: str,
                      render: Render) -> Command:
    """``adminDeprecateAppCatalogVersion``: ``active`` → ``deprecated``; again is a no-op;
    a version never published is 409 ``app_version_not_published``. Running instances
    of a deprecated version are untouched (they may not upgrade to it)."""

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        app = get_app(session, slug)
        found = app.version_of(version)
        if found["status"] == "deprecated":
            return [], catalog_version_json(slug, found)
        if found["status"] != "active":
            raise refusal("invalid_request", "conflict",
                          f"version {version!r} of {slug!r} was never published",
                          reason="app_version_not_published", app_slug=slug,
                          app_version=version, current_status=found["status"])
        app.trigger_event(AppCatalogEntry.VersionDeprecated, version=version,
                          provenance=ctx.provenance(), timestamp=ctx.now)
        return [app], catalog_version_json(slug, app.versions[version])

    return Command(ctx, decide, render)


def upsert_entitlement(ctx: CommandContext, *, project_id: UUID, slug: str, enabled: bool,
                       policy_overrides: dict[str, Any] | None, render: Render) -> Command:
    """``upsertProjectAppEntitlement`` / ``upsertV3AccessAppEntitlementCompat``: the
    whole entitlement is replaced (``policy_overrides`` omitted = ``{}``); the same one
    again appends nothing. Existing instances are never touched."""
    overrides = dict(policy_overrides or {})

    def decide(ctx: CommandContext, session: Session) -> tuple[list[Any], dict[str, Any]]:
        get_app(session, slug)
        validate_policy_overrides(overrides)
        entitlement_id = entitlement_id_for(project_id, slug)
        found = session.get(entitlement_id)
        if found is None:
            found = ProjectAppEntitlement._create(
                ProjectAppEntitlement.Created, id=entitlement_id, project_id=str(project_id),
                app_slug=slug, timestamp=ctx.now)
            session.loaded[found.id] = found
        elif (found.enabled, found.policy_overrides) == (enabled, overrides):
            return [], entitlement_json(project_id, slug, enabled, overrides)
        found.trigger_event(ProjectAppEntitlement.Upserted, enabled=enabled,
                            policy_overrides=overrides, provenance=ctx.provenance(),
                            timestamp=ctx.now)
        return [found], entitlement_json(project_id, slug, enabled, overrides)

    return Command(ctx, decide, render, reads=(entitlement_id_for(project_id, slug),))


__all__ = ["AppCatalogEntry", "ProjectAppEntitlement", "register_app", "register_version",
           "publish_version", "deprecate_version", "upsert_entitlement", "get_app",
           "require_entitled", "entitlement_of", "newest_entitled_version",
           "catalog_item_json", "catalog_version_json", "entitlement_json"]
