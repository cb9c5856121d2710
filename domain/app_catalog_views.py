"""The JSON of the app catalog as users see it (app-instances §1.2, §1.3, §2 "Catalog",
§4.3): the V3 catalog card and detail of an app for one project, and the V3 workload
row of a live app instance. Pure: the ``apps`` read model and its queries call these
with the state it keeps (``domain.inventory.state_of`` of the aggregates).

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

from domain.app_instances import AppInstance, command_allowed, placement_json
from domain.apps import DEFAULT_LAUNCH_ROLES, AppCatalogEntry, newest_entitled_version
from domain.skus import iso

V3_KINDS = ("jupyter", "vllm", "training", "vector_db", "labeling", "tgi", "scheduler",
            "kubernetes", "app")
#: V3 app kinds that are V3 workload kinds of their own; the rest are ``app`` (§4.3)
WORKLOAD_KINDS = ("jupyter", "vllm", "training", "scheduler", "kubernetes")
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
RESTART_PHASES = ("restart", "start", "upgrade", "rollback")
OPEN_ACTION = {"jupyter": "open_notebook", "vllm": "try_endpoint", "training": "open_training_ui"}
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
def v3_status(instance: AppInstance) -> str:
    status = instance.status
    if status == "running":
        return "idle" if instance.runtime.get("health_status") == "idle" else "active"
    if status == "failed":
        if instance.failed_during == "decommission":
            return "release_failed"
        return "restart_failed" if instance.failed_during in RESTART_PHASES else "failed"
    return V3_STATUS[status]


def _readiness(instance: AppInstance, status: str) -> dict[str, Any]:
    def readiness(ready: bool, severity: str, code: str, summary: str) -> dict[str, Any]:
        return {"ready": ready, "severity": severity, "reason_code": code,
                "reason_codes": [code], "summary": summary}

    if instance.status == "failed":
        return readiness(False, "error", "app_runtime_failed",
                         instance.failure_reason or "The app runtime failed.")
    if instance.status == "running":
        health = instance.runtime.get("health_status")
        if health not in (None, "healthy", "idle", "ok"):
            return readiness(False, "warn", "app_runtime_unhealthy",
                             f"The app runtime reports {health}.")
        return readiness(True, "ok", "ready", "The app runtime is running.")
    return readiness(False, "info", "runtime_readiness_unknown",
                     f"The app instance is {status.replace('_', ' ')}.")


def _primary_allocation(instance: AppInstance) -> str | None:
    intent = placement_json(instance.spec.get("placement_intent"))
    return (intent["target_allocation_id"] or intent["server_allocation_id"]
            or intent["controller_allocation_id"])


def _lifecycle_actions(instance: AppInstance) -> list[dict[str, Any]]:
    base = f"/api/v1/apps/instances/{instance.id}"
    refused = f"Not possible while the app instance is {instance.status.replace('_', ' ')}."
    hint = {"task_href": None, "evidence_href": None, "correlation_id": None}

    def post(action: str, label: str, command: str) -> dict[str, Any]:
        allowed = command_allowed(instance, command)
        return {"action": action, "label": label, "enabled": allowed,
                "disabled_reason": None if allowed else refused, "method": "POST",
                "href": f"{base}/{command}", "idempotency_required": True, "result": dict(hint)}

    return [post("stop", "Stop", "stop"), post("start", "Start", "start"),
            post("restart", "Restart", "restart"), post("release", "Release", "decommission"),
            {"action": "open", "label": "Open", "enabled": True, "disabled_reason": None,
             "method": "GET", "href": f"/api/v1/workloads/{instance.id}",
             "idempotency_required": False, "result": dict(hint)}]


def app_workload_json(instance: AppInstance, app_name: str, kind: str) -> dict[str, Any]:
    """``V3WorkloadSummary`` of an app instance (§4.3). Money is left to the V3
    workloads read model: ``hourly_rate``/``accrued_cost`` are null here."""
    spec, status = instance.spec, v3_status(instance)
    required = status in ("failed", "restart_failed", "release_failed")
    reason = instance.failure_reason if required else None
    if instance.status == "running":
        primary = OPEN_ACTION.get(kind, "open")
    else:
        primary = {"failed": "review", "restart_failed": "review",
                   "release_failed": "retry_release"}.get(status, "none")
    identity = str(instance.id)
    return {
        "id": identity, "allocation_id": _primary_allocation(instance),
        "app_instance_id": identity, "name": spec["display_name"],
        "kind": kind if kind in WORKLOAD_KINDS else "app", "status": status,
        "project_id": spec["project_id"], "project_name": spec["project_id"],
        "region_code": None, "sku": None, "node_id": None, "node_name": None,
        "owner_user_id": spec["requested_by_user_id"],
        "owner_username": spec["requested_by_user_id"], "app_slug": spec["app_slug"],
        "app_name": app_name, "created_at": iso(instance.created_on),
        "active_at": instance.active_at, "hourly_rate": None, "accrued_cost": None,
        "cost_projection": {"balance": None, "hourly_rate": None, "accrued_cost": None,
                            "runway_seconds": None, "projected_depletion_at": None,
                            "basis": "rate_unavailable"},
        "needs_action": required, "action_required": required, "is_actionable": required,
        "actionable_until": None, "archived_at": None, "action_reason": reason,
        "runtime_readiness": _readiness(instance, status), "blocking_app_use": None,
        "primary_action": primary,
        "connection_facts": {"hostname": None, "ip_address": None, "ssh_command": None,
                             "terminal_href": None, "app_url": None},
        "lifecycle_actions": _lifecycle_actions(instance),
        "operator_state": {
            "active": required,
            "attention_key": f"app_instance.{status}:{identity}" if required else None,
            "signal_key": None, "target_type": "app_instance", "target_id": identity,
            "action_family": "app_recovery" if required else None,
            "attention_reason": reason, "review_required": required, "review_state": "open",
            "ack_fingerprint": None, "ack_state": "none", "ack_reason": None,
            "ack_expires_at": None, "ack_actor": None, "ack_updated_at": None},
    }


__all__ = ["v3_app_item", "v3_versions", "v3_permissions", "v3_examples", "app_workload_json",
           "app_kind", "min_root_disk_mib", "entitlement_summary", "secret_free", "PUBLISHED"]
