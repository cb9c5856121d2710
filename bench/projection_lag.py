"""Projection lag: from a command's response (its ``X-Ledger-Position``) until the
read model's position reaches it.

A thread polls the read model's position (``readmodels.read_positions``: the lowest
watermark over the transport's sources, as ``projections.store.position`` computes
it) every ``interval`` seconds and records each change with the monotonic time it was
seen. The load generator records the monotonic time of each response and its
position (CLOCK_MONOTONIC is shared by the processes of one machine). A command's lag
is the first time a poll saw a position at or past it minus its response time, 0 if
that poll came first. Resolution: the poll interval plus one query.
"""

from __future__ import annotations

import bisect
import threading
import time
from typing import Any

import psycopg

from bench.stats import summary_ms

POSITION_SQL = ("SELECT coalesce(min(position), 0) FROM readmodels.read_positions"
                " WHERE projection = %s AND source LIKE %s")


def read_position(dsn: str, source_prefix: str, projection: str = "billing_ledger") -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return int(conn.execute(POSITION_SQL, (projection, source_prefix + "%")).fetchone()[0])


def source_count(dsn: str, source_prefix: str, projection: str = "billing_ledger") -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return int(conn.execute("SELECT count(*) FROM readmodels.read_positions"
                                " WHERE projection = %s AND source LIKE %s",
                                (projection, source_prefix + "%")).fetchone()[0])


class PositionPoller(threading.Thread):
    def __init__(self, dsn: str, source_prefix: str, interval: float = 0.002,
                 projection: str = "billing_ledger"):
        super().__init__(name="position-poller", daemon=True)
        self.dsn, self.prefix, self.interval, self.projection = dsn, source_prefix, interval, projection
        self.samples: list[tuple[float, int]] = []
        self.polls = 0
        self.query_seconds = 0.0
        self.error: str | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn, conn.cursor() as cur:
                last = -1
                params = (self.projection, self.prefix + "%")
                while not self._stop_event.is_set():
                    asked = time.monotonic()
                    cur.execute(POSITION_SQL, params, prepare=True)
                    position = int(cur.fetchone()[0])
                    seen = time.monotonic()
                    self.polls += 1
                    self.query_seconds += seen - asked
                    if position != last:
                        self.samples.append((seen, position))
                        last = position
                    self._stop_event.wait(self.interval)
        except Exception as error:  # noqa: BLE001 - reported with the lag figures
            self.error = f"{type(error).__name__}: {error}"

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)

    def lags(self, positions: list[list[float]]) -> dict[str, Any]:
        """Lag summary for ``[response_time, position]`` pairs; positions never seen
        reached count as ``unreached``."""
        times = [t for t, _ in self.samples]
        reached = [p for _, p in self.samples]
        # samples only grow in position (a watermark never moves back) but keep it safe
        best: list[int] = []
        high = -1
        for p in reached:
            high = max(high, p)
            best.append(high)
        lags: list[float] = []
        unreached = 0
        for responded, wanted in positions:
            index = bisect.bisect_left(best, int(wanted))
            if index == len(best):
                unreached += 1
                continue
            lags.append(max(0.0, times[index] - responded))
        return {**summary_ms(lags), "unreached": unreached, "polls": self.polls,
                "poll_query_ms": round(self.query_seconds / max(self.polls, 1) * 1000, 3),
                "poll_interval_ms": self.interval * 1000, "poller_error": self.error}
