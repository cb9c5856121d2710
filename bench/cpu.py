"""Who used the CPU during a measured step: named processes (the server, relay,
projector), every Postgres server process, the measuring process itself, the whole
machine, and ``other``: processes that are not the bench's (not the bench process nor
any of its descendants) and not Postgres, i.e. somebody else's work on the machine.

``other`` counts the processes alive at the end of the step (from 0 for those started
during it); Postgres backends that exit during the step are missed by the
``postgres`` figure, which is why ``other`` is not ``machine`` minus the rest.
"""

from __future__ import annotations

import os
import resource
import time
from typing import Any

import psutil

POSTGRES = ("postgres", "postmaster")


def _cpu(times: Any) -> float:
    return float(times.user + times.system)


class CpuAccount:
    def __init__(self, watch: dict[str, int] | None = None, bench_pid: int | None = None,
                 include_children: bool = False):
        self.watch = dict(watch or {})
        self.bench_pid = bench_pid or os.getpid()
        self.include_children = include_children
        self.before = self._sample()

    def _ours(self) -> set[int]:
        ours = {self.bench_pid, os.getpid()}
        try:
            ours |= {p.pid for p in psutil.Process(self.bench_pid).children(recursive=True)}
        except psutil.Error:
            pass
        return ours

    def _sample(self) -> dict[str, Any]:
        ours = self._ours()
        watched = {pid: name for name, pid in self.watch.items()}
        named = {name: 0.0 for name in self.watch}
        postgres = 0.0
        foreign: dict[int, tuple[float, float]] = {}
        for process in psutil.process_iter(["pid", "name", "cpu_times", "create_time"]):
            info = process.info
            if not info["cpu_times"]:
                continue
            cpu = _cpu(info["cpu_times"])
            if info["pid"] in watched:
                named[watched[info["pid"]]] = cpu
            elif info["name"] in POSTGRES:
                postgres += cpu
            elif info["pid"] not in ours:
                foreign[info["pid"]] = (info["create_time"] or 0.0, cpu)
        own = _cpu_rusage(resource.RUSAGE_SELF)
        if self.include_children:
            own += _cpu_rusage(resource.RUSAGE_CHILDREN)
        machine = psutil.cpu_times()
        return {"time": time.monotonic(), "named": named, "postgres": postgres, "own": own,
                "foreign": foreign,
                "machine": sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)}

    def shares(self, own_name: str) -> dict[str, float]:
        """Cores used since construction; ``own_name`` labels the measuring process."""
        after = self._sample()
        before = self.before
        wall = max(after["time"] - before["time"], 1e-9)
        shares = {name: (cpu - before["named"].get(name, 0.0)) / wall
                  for name, cpu in after["named"].items()}
        shares["postgres"] = (after["postgres"] - before["postgres"]) / wall
        shares[own_name] = (after["own"] - before["own"]) / wall
        shares["machine"] = (after["machine"] - before["machine"]) / wall
        other = 0.0
        for pid, (created, cpu) in after["foreign"].items():
            started, earlier = before["foreign"].get(pid, (None, 0.0))
            other += cpu - (earlier if started == created else 0.0)
        shares["other"] = other / wall
        return {name: round(value, 3) for name, value in shares.items()}


def _cpu_rusage(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime
