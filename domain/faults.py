"""Test-only faults: deliberately broken variants of ledgercore, so that a test suite
can prove its invariants are able to fail. Every fault is off unless its environment
variable is set.

``LEDGERCORE_FAULT_DOUBLE_APPLY=<EventType>`` (``BalanceAdjusted`` or its topic
``ledgercore.BalanceAdjusted``): every event of that type a command produces is
applied and recorded twice (the same facts, the next version), as a handler that
retried without deduplication would.

May import: nothing of ours.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

DOUBLE_APPLY = "LEDGERCORE_FAULT_DOUBLE_APPLY"


def double_apply_flag(env: Mapping[str, str]) -> str | None:
    """The event type the double-apply fault names, or None (the default: off)."""
    value = (env.get(DOUBLE_APPLY) or "").strip()
    return value or None


def _named(event: Any, name: str) -> bool:
    topic = getattr(type(event), "TOPIC", "")
    return name in (type(event).__name__, topic, topic.rsplit(".", 1)[-1])


def double_apply(objs: tuple[Any, ...], name: str) -> None:
    """Before a save: each pending event of type ``name`` gets a twin, applied to the
    aggregate and recorded after it."""
    for aggregate in objs:
        pending = getattr(aggregate, "_pending_events", None)
        if not pending:
            continue
        for event in list(pending):
            if _named(event, name):
                twin = dataclasses.replace(event, originator_version=aggregate.version + 1)
                twin.mutate(aggregate)
                pending.append(twin)
