"""Percentiles and small summaries (no numpy on the machine, none needed)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of ``values`` (q in 0..100); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summary_ms(seconds: Sequence[float]) -> dict[str, Any]:
    """p50/p90/p99/max/mean in milliseconds, plus the sample count."""
    if not seconds:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    ordered = sorted(seconds)

    def pick(q: float) -> float:
        rank = max(1, math.ceil(q / 100 * len(ordered)))
        return round(ordered[min(rank, len(ordered)) - 1] * 1000, 3)

    return {"n": len(ordered), "p50": pick(50), "p90": pick(90), "p99": pick(99),
            "max": round(ordered[-1] * 1000, 3),
            "mean": round(sum(ordered) / len(ordered) * 1000, 3)}


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference in (None, 0):
        return None
    return value / reference
