"""The public contract, and the OpenAPI document this service serves from it.

``gpuaas-openapi.json`` is ``shared/contract/gpuaas-openapi.yaml`` converted to JSON
(a test keeps them equal). The served document is the contract itself, cut down to the
operations this service implements and the components they reference, so served
OpenAPI and contract cannot drift apart.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

CONTRACT_JSON = Path(__file__).with_name("gpuaas-openapi.json")
METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")


@lru_cache(maxsize=1)
def contract() -> dict[str, Any]:
    return json.loads(CONTRACT_JSON.read_text())


def operations(doc: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """operationId -> (METHOD, path)."""
    found = {}
    for path, item in doc["paths"].items():
        for method in METHODS:
            if method in item:
                found[item[method]["operationId"]] = (method.upper(), path)
    return found


def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        refs = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        for value in node.values():
            refs |= _refs(value)
        return refs
    if isinstance(node, list):
        return set().union(*(_refs(v) for v in node)) if node else set()
    return set()


def served_document(operation_ids: set[str]) -> dict[str, Any]:
    full = contract()
    known = operations(full)
    missing = operation_ids - known.keys()
    if missing:
        raise ValueError(f"operations not in the contract: {sorted(missing)}")
    paths: dict[str, Any] = {}
    for operation_id in sorted(operation_ids):
        method, path = known[operation_id]
        item = full["paths"][path]
        target = paths.setdefault(path, {k: v for k, v in item.items() if k not in METHODS})
        target[method.lower()] = item[method.lower()]
    components: dict[str, dict[str, Any]] = {}
    pending = _refs(paths) | {"#/components/securitySchemes/" + name
                              for name in full["components"].get("securitySchemes", {})}
    seen: set[str] = set()
    while pending:
        ref = pending.pop()
        if ref in seen:
            continue
        seen.add(ref)
        _, _, kind, name = ref.split("/", 3)
        value = full["components"][kind][name]
        components.setdefault(kind, {})[name] = value
        pending |= _refs(value)
    used_tags = {t for item in paths.values() for m in METHODS if m in item
                 for t in item[m].get("tags", [])}
    return {
        "openapi": full["openapi"],
        "info": full["info"],
        "servers": full.get("servers", []),
        "security": full.get("security", []),
        "tags": [t for t in full.get("tags", []) if t["name"] in used_tags],
        "paths": paths,
        "components": {kind: dict(sorted(v.items())) for kind, v in sorted(components.items())},
    }
