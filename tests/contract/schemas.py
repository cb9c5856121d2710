"""Validate bodies against the contract's schemas (OpenAPI 3.0-style ``nullable``
normalised to JSON Schema 2020-12)."""

from __future__ import annotations

import copy
from functools import lru_cache
from typing import Any

from jsonschema import Draft202012Validator

from api.contract import contract


def _normalise(node: Any) -> Any:
    if isinstance(node, dict):
        node = {k: _normalise(v) for k, v in node.items()}
        if node.pop("nullable", False):
            return {"anyOf": [node, {"type": "null"}]}
        return node
    if isinstance(node, list):
        return [_normalise(v) for v in node]
    return node


@lru_cache(maxsize=1)
def _components() -> dict[str, Any]:
    return _normalise(copy.deepcopy(contract()["components"]))


#: what ``response_schema`` answers for a status declared without a body (a 204)
NO_BODY: dict[str, Any] = {"no_body": True}


def response_schema(method: str, path: str, status: int) -> dict[str, Any] | None:
    """The JSON schema of ``status``'s body for the operation, or None if undeclared."""
    responses = contract()["paths"][path][method.lower()]["responses"]
    declared = responses.get(str(status))
    if declared is None:
        return None
    if "$ref" in declared:
        declared = contract()["components"]["responses"][declared["$ref"].rsplit("/", 1)[1]]
    if "content" not in declared:
        return NO_BODY
    schema = declared["content"]["application/json"]["schema"]
    return {**_normalise(schema), "components": _components()}


def errors_in(body: Any, schema: dict[str, Any]) -> list[str]:
    validator = Draft202012Validator(schema)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(body)]


def error_schema() -> dict[str, Any]:
    return {"$ref": "#/components/schemas/ErrorResponse", "components": _components()}
