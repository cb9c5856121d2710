"""Canonical JSON and tagged SHA-256: the one hashing rule for ledger chains and keys.

Canonical JSON: sorted keys, no insignificant whitespace, UTF-8, integers only for
money, and fields whose value is ``None`` left out, so that adding an optional field
to a schema never changes the hash of an old record. Floats are refused outright.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any
from uuid import UUID

GENESIS_HASH = "0" * 64
LEDGER_ENTRY_TAG = "ledgercore.ledger_entry.v1"


def _normalise(value: Any) -> Any:
    kind = type(value)  # the common exact types first; subclasses take the checks below
    if kind is str or kind is int or kind is bool:
        return value
    if kind is dict:
        return {str(k): v if type(v) is str or type(v) is int else _normalise(v)
                for k, v in value.items() if v is not None}
    if isinstance(value, dict):
        return {str(k): _normalise(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        raise TypeError("floats are not allowed in canonical JSON")
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot canonicalise {type(value).__name__}")


def first_float(value: Any, path: str = "") -> str | None:
    """The path (``a.0.b``) of the first float in parsed JSON ``value``, or None: what
    the API refuses in a free-form object, since canonical JSON (idempotency
    fingerprints, task signatures) has no floats."""
    if isinstance(value, float):
        return path
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = first_float(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def canonical_json(value: Any) -> bytes:
    return json.dumps(
        _normalise(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")


def tagged_hash(tag: str, value: Any, prev_hash: str = "") -> str:
    digest = hashlib.sha256()
    digest.update(tag.encode("utf-8") + b"\n")
    digest.update(canonical_json(value))
    digest.update(prev_hash.encode("ascii"))
    return digest.hexdigest()


def ledger_entry_hash(entry: dict[str, Any], prev_hash: str) -> str:
    """``entry`` is the hashed body of a ledger entry (see ``billing.entry_body``)."""
    return tagged_hash(LEDGER_ENTRY_TAG, entry, prev_hash)
