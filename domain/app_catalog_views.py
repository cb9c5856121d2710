"""The JSON of the app catalog as users see it (app-instances §1.2, §1.3, §2 "Catalog",
§4.3): the V3 catalog card and detail of an app for one project. Pure: the ``apps``
read model and its queries call these with the state it keeps
(``domain.inventory.state_of`` of the aggregates). The V3 workload rows of an app's
instances are ``domain.app_workload_views``'.

The V3 card reads an optional ``presentation`` object in the manifest of the app's
latest version (any other manifest key is ignored here):

- ``kind`` (``V3AppKind``), ``featured`` (bool), ``short_description``,
  ``long_description``, ``primary_surface``, ``pricing_hint`` (strings);
- ``publisher_tone`` (``core42|project|community``), ``support_tier`` {``level``
  ``demo_ready|preview``, ``label``, ``summary``};
- ``runtime_presentation``: the contract's ``V3AppRuntimePresentation`` keys, each
  taken when well formed (``config_defaults`` loses every key that names a secret);
- ``examples`` {``language``, ``code``}.

A value of the wrong shape is replaced by its default, so an operator's typo never
breaks a read. Nothing here carries an instance's ``config`` or any secret.

May import: ``domain`` only.
"""

from __future__ import annotations

from typing import Any

from domain.apps import DEFAULT_LAUNCH_ROLES, AppCatalogEntry, newest_entitled_version

V3_KINDS = ("jupyter", "vllm", "training", "vector_db", "labeling", "tgi", "scheduler",
            "kubernetes", "app")
#: V3 app kinds that are V3 workload kinds of their own; the rest are ``app`` (§4.3)
TONES = ("core42", "project", "community")
SUPPORT_LEVELS = {"demo_ready": "Demo ready", "preview": "Preview"}
RUNTIME_LABELS = {"k8s": "Kubernetes", "rke2": "RKE2 (self-managed Kubernetes)",
                  "slurm": "Slurm", "ray": "Ray", "bare_metal": "Bare metal"}
#: a ``config_defaults`` key containing one of these is never shown
SECRET_WORDS = ("secret", "password", "passwd", "token", "credential", "private", "key")
#: §4.3 status map (``failed`` depends on ``failed_during``)
V3_STATUS = {"requested": "requested", "deploying": "provisioning", "starting": "provisioning",
             "running": "active", "stopping": "stopped", "stopped": "stopped",
             "restarting": "restarting", "upgrading": "restarting", "rolling_back": "restarting",
             "decommissioning": "releasing", "deleting": "releasing",
             "decommissioned": "released", "deleted": "released"}
#: published statuses: what users see of the catalog
PUBLISHED = ("active", "deprecated")


# ---- small sanitizers ------------------------------------------------------------------
def _text(value: Any, default: str) -> str:
    return value if isinstance(value, str) and value else default


def _maybe_text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _strings(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _port(value: Any) -> int | None:
    return value if type(value) is int else None


def secret_free(value: dict[str, Any]) -> dict[str, Any]:
    """``value`` without the keys (at any depth) that name a secret."""
    clean: dict[str, Any] = {}
    for key, item in value.items():
        if any(word in key.lower() for word in SECRET_WORDS):
            continue
        clean[key] = secret_free(item) if isinstance(item, dict) else item
    return clean


def presentation_of(app: AppCatalogEntry) -> dict[str, Any]:
    """The ``presentation`` object of the latest version's manifest (``{}`` if none)."""
    version = app.versions.get(app.latest_version) or {}
    return _object((version.get("manifest") or {}).get("presentation"))


def manifest_of(app: AppCatalogEntry) -> dict[str, Any]:
    version = app.versions.get(app.latest_version) or {}
    return dict(version.get("manifest") or {})


def app_kind(app: AppCatalogEntry) -> str:
    kind = presentation_of(app).get("kind")
    return kind if kind in V3_KINDS else "app"


def runtime_presentation(app: AppCatalogEntry) -> dict[str, Any]:
    """``V3AppRuntimePresentation``."""
    version = app.versions.get(app.latest_version) or {}
    backend = version.get("runtime_backend") or "k8s"
    given = _object(presentation_of(app).get("runtime_presentation"))
    fields = [{"name": f["name"], "type": _text(f.get("type"), "string"),
               "description": _maybe_text(f.get("description")),
               "default": f.get("default") if not isinstance(f.get("default"), (dict, list))
               else None, "enum": _strings(f.get("enum"))}
              for f in given.get("config_fields") or [] if isinstance(f, dict)
              and isinstance(f.get("name"), str)
              and not any(word in f["name"].lower() for word in SECRET_WORDS)]
    groups = [{"id": g["id"], "title": _text(g.get("title"), g["id"]),
               "fields": _strings(g.get("fields"))}
              for g in given.get("config_groups") or [] if isinstance(g, dict)
              and isinstance(g.get("id"), str)]
    endpoints = [{"name": e["name"], "label": _text(e.get("label"), e["name"]),
                  "port": _port(e.get("port")), "protocol": _text(e.get("protocol"), "http"),
                  "default_open_path": _maybe_text(e.get("default_open_path")),
                  "readiness_path": _maybe_text(e.get("readiness_path"))}
                 for e in given.get("endpoints") or [] if isinstance(e, dict)
                 and isinstance(e.get("name"), str)]
    requirements = _object(given.get("target_requirements"))
    disk = requirements.get("min_root_disk_mib")
    surface = _text(presentation_of(app).get("primary_surface"), "web")
    return {"family": _text(given.get("family"), backend),
            "runtime_label": _text(given.get("runtime_label"), RUNTIME_LABELS.get(backend, backend)),
            "primary_surface": _text(given.get("primary_surface"), surface),
            "target_label": _text(given.get("target_label"), "Target allocation"),
            **{key: _maybe_text(given.get(key)) for key in (
                "member_label", "member_plural_label", "add_member_label", "controller_label",
                "worker_label")},
            "config_defaults": secret_free(_object(given.get("config_defaults"))),
            "config_fields": fields, "config_groups": groups, "endpoints": endpoints,
            "target_requirements": {
                "min_root_disk_mib": disk if type(disk) is int and disk >= 0 else 0,
                "reason": _maybe_text(requirements.get("reason"))}}


def min_root_disk_mib(app: AppCatalogEntry) -> int:
    return runtime_presentation(app)["target_requirements"]["min_root_disk_mib"]


# ---- the project's view of an entitlement ------------------------------------------------
def entitlement_summary(entitlement: tuple[bool, dict[str, Any]] | None) -> dict[str, Any]:
    """``V3AppEntitlementSummary``: no entitlement is not entitled (deny by default)."""
    if entitlement is None:
        return {"enabled": False, "reason": "entitlement_missing"}
    return {"enabled": entitlement[0], "reason": None if entitlement[0] else "entitlement_disabled"}


def version_entitled(entitlement: tuple[bool, dict[str, Any]] | None, version: str) -> bool:
    if entitlement is None or not entitlement[0]:
        return False
    allowed = entitlement[1].get("allowed_versions")
    return allowed is None or version in allowed


def _published(app: AppCatalogEntry) -> list[dict[str, Any]]:
    """Published versions, newest publication first."""
    found = [v for v in app.versions.values() if v["status"] in PUBLISHED]
    return sorted(found, key=lambda v: -(v["published_seq"] or 0))


def v3_app_item(app: AppCatalogEntry,
                entitlement: tuple[bool, dict[str, Any]] | None) -> dict[str, Any]:
    """``V3AppCatalogItem`` of ``app`` for a project with ``entitlement`` ((enabled,
    policy_overrides), or None when the project has none)."""
    p, details = presentation_of(app), app.details
    overrides = entitlement[1] if entitlement else {}
    version = (newest_entitled_version(app, overrides) if entitlement and entitlement[0]
               else None) or app.latest_version
    description = details.get("description") or ""
    level = p.get("support_tier", {}).get("level") if isinstance(p.get("support_tier"), dict) \
        else None
    level = level if level in SUPPORT_LEVELS else "preview"
    tier = _object(p.get("support_tier"))
    pricing = manifest_of(app).get("pricing") or []
    hint = ("Platform runtime billed per " + ", ".join(sorted({x["usage_unit"] for x in pricing}))
            if pricing else "Billed through the allocations it runs on")
    runtime = runtime_presentation(app)
    return {"slug": app.slug, "name": details["display_name"], "category": details["category"],
            "kind": app_kind(app),
            "publisher": {"name": details["publisher"],
                          "tone": p.get("publisher_tone") if p.get("publisher_tone") in TONES
                          else "core42"},
            "short_description": _text(p.get("short_description"), description.split("\n")[0]),
            "long_description": _text(p.get("long_description"), description),
            "status": app.status, "version": version,
            "versions_available": [v["version"] for v in _published(app)
                                   if v["status"] == "active"],
            "primary_surface": runtime["primary_surface"], "runtime_presentation": runtime,
            "dependencies": list(manifest_of(app).get("dependencies") or []),
            "pricing_hint": _text(p.get("pricing_hint"), hint),
            "support_tier": {"level": level,
                             "label": _text(tier.get("label"), SUPPORT_LEVELS[level]),
                             "summary": _text(tier.get("summary"), f"{SUPPORT_LEVELS[level]} app")},
            "featured": p.get("featured") is True,
            "entitlement": entitlement_summary(entitlement),
            "launch_href": f"/api/v1/launch/apps/{app.slug}",
            "detail_href": f"/api/v1/apps/{app.slug}"}


def v3_versions(app: AppCatalogEntry,
                entitlement: tuple[bool, dict[str, Any]] | None) -> list[dict[str, Any]]:
    """``V3AppVersionSummary`` of every published version, newest first."""
    return [{"version": v["version"], "runtime_backend": v["runtime_backend"],
             "status": v["status"], "latest": v["version"] == app.latest_version,
             "entitled": version_entitled(entitlement, v["version"])}
            for v in _published(app)]


def v3_permissions(app: AppCatalogEntry,
                   entitlement: tuple[bool, dict[str, Any]] | None) -> dict[str, Any]:
    overrides = entitlement[1] if entitlement else {}
    enabled = bool(entitlement and entitlement[0])
    allowed = [v["version"] for v in _published(app)
               if v["status"] == "active" and version_entitled(entitlement, v["version"])]
    return {"project_enabled": enabled, "allowed_versions": allowed if enabled else [],
            "launch_roles": list(overrides.get("launch_roles") or DEFAULT_LAUNCH_ROLES)}


def v3_examples(app: AppCatalogEntry) -> dict[str, Any]:
    examples = _object(presentation_of(app).get("examples"))
    return {"language": _maybe_text(examples.get("language")),
            "code": _maybe_text(examples.get("code"))}


# ---- an app instance as a V3 workload row ---------------------------------------------------
__all__ = ["v3_app_item", "v3_versions", "v3_permissions", "v3_examples",
           "app_kind", "min_root_disk_mib", "entitlement_summary", "secret_free", "PUBLISHED"]
