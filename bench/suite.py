"""The whole suite in one invocation: parameters, the order of the phases, the
deadline, the clean-up, and what is written and printed.

Phases (one at a time, so they do not share the two cores):

1. machine limits: psycopg inserts, the eventsourcing library used naively, the
   broker, the HTTP ceiling (async and sync handlers) at every concurrency level;
2. ledgercore, direct transport: the command ladder, projection lag under a steady
   load, balance queries (cache hit and miss), then the integrity check;
2b. projector apart: the command ladder with no projector process beside the server,
   then ``project-log`` applies the whole log and the integrity check;
3. ledgercore, Kafka transport (server, ``relay`` and ``project`` processes):
   projection lag under the same load, then the integrity check;
4. placement: launches racing for the last nodes of a SKU, through one and two
   writers (``bench/placement.py``): claims per second under contention;
5. admissions: allocation launches through HTTP against ample capacity, at a few
   client concurrencies, with the allocations read model's lag, then the phase's own
   integrity check (``bench/admissions.py``);
6. replay: a history of ``--events`` events, ``catch_up``, ``rebuild`` and audit replay rates.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil
import psycopg
import redis
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from bench import (admissions, integrity, machine_limits, naive_eventsourcing, placement, replay,
                   report)
from bench.cpu import CpuAccount
from bench.harness import ROOT, BenchError, Run, Server, peak_rss_mib, wait_until
from bench.projection_lag import PositionPoller, read_position, source_count

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
ADMIN_ID = "00000000-0000-4000-8000-00000000be9c"


class Deadline(Exception):
    """The run's time limit (``--timeout``) passed."""


@dataclass
class Params:
    quick: bool
    events: int
    catch_up_events: int
    concurrency: list[int]
    duration: float
    warmup: float
    ceiling_duration: float
    ceiling_warmup: float
    users: int
    hot_share: float
    lag_rate: float
    lag_duration: float
    lag_concurrency: int
    query_duration: float
    insert_duration: float
    naive_duration: float
    naive_aggregates: int
    broker_messages: int
    generator_workers: int
    events_per_account: int
    admissions: int
    admission_concurrency: list[int]
    timeout: float
    seed: int
    pg_admin_dsn: str = field(repr=False, default=DEFAULT_PG)
    redis_url: str | None = field(repr=False, default=DEFAULT_REDIS)


def parse_args(argv: list[str] | None = None) -> tuple[Params, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="scripts/bench", description="ledgercore benchmark suite: ledgercore figures beside "
        "same-run references, refused unless every acknowledged command is accounted for.")
    parser.add_argument("--quick", action="store_true", help="small sizes (about 3 minutes)")
    parser.add_argument("--events", type=int, help="history size for replay/rebuild "
                        "(default 1,000,000; --quick 20,000)")
    parser.add_argument("--catch-up-events", type=int, help="the part of that history replayed "
                        "by catch_up (default 100,000; --quick 5,000)")
    parser.add_argument("--concurrency", default="1,8,32,64", help="load generator concurrency "
                        "levels, comma-separated (default 1,8,32,64)")
    parser.add_argument("--duration", type=float, help="seconds measured per level "
                        "(default 15; --quick 2)")
    parser.add_argument("--users", type=int, help="users the commands spread over "
                        "(default 2000; --quick 200)")
    parser.add_argument("--lag-rate", type=float, default=500.0,
                        help="commands/s offered while measuring projection lag (default 500)")
    parser.add_argument("--admissions", type=int, help="allocation launches per concurrency "
                        "level in the admissions phase (default 1000; --quick 100)")
    parser.add_argument("--admission-concurrency", default="1,8,32", help="client concurrency "
                        "levels of the admissions phase, comma-separated (default 1,8,32)")
    parser.add_argument("--pg-admin-dsn", default=os.environ.get("LEDGERCORE_BENCH_PG_ADMIN_DSN", DEFAULT_PG),
                        help="Postgres to create the run's databases on")
    parser.add_argument("--redis-url", default=os.environ.get("LEDGERCORE_BENCH_REDIS_URL", DEFAULT_REDIS))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results.json"))
    parser.add_argument("--timeout", type=float, help="give up after this many seconds "
                        "(default 3600; --quick 600)")
    parser.add_argument("--seed", type=int, default=20261123)
    parser.add_argument("--keep", action="store_true",
                        help="keep the run's databases and logs (for inspection)")
    args = parser.parse_args(argv)
    quick = args.quick

    def pick(value: Any, full: Any, small: Any) -> Any:
        return value if value is not None else (small if quick else full)

    events = pick(args.events, 1_000_000, 20_000)
    params = Params(
        quick=quick, events=events,
        catch_up_events=min(events, pick(args.catch_up_events, 100_000, 5_000)),
        concurrency=[int(c) for c in args.concurrency.split(",") if c.strip()],
        duration=pick(args.duration, 15.0, 2.0), warmup=1.5 if not quick else 0.5,
        ceiling_duration=8.0 if not quick else 1.0, ceiling_warmup=1.0 if not quick else 0.3,
        users=pick(args.users, 2000, 200), hot_share=0.05,
        lag_rate=args.lag_rate, lag_duration=20.0 if not quick else 2.5, lag_concurrency=64,
        query_duration=8.0 if not quick else 1.0,
        insert_duration=8.0 if not quick else 1.0,
        naive_duration=10.0 if not quick else 1.5,
        naive_aggregates=pick(args.users, 2000, 200),
        broker_messages=100_000 if not quick else 5_000,
        generator_workers=2, events_per_account=100,
        admissions=pick(args.admissions, 1000, 100),
        admission_concurrency=[int(c) for c in args.admission_concurrency.split(",") if c.strip()],
        timeout=pick(args.timeout, 3600.0, 600.0), seed=args.seed,
        pg_admin_dsn=args.pg_admin_dsn, redis_url=args.redis_url)
    return params, args


def strip(result: dict[str, Any]) -> dict[str, Any]:
    """A load generator result without its per-request records."""
    return {k: v for k, v in result.items()
            if k not in ("acked", "acked_ids", "refused", "unknown", "positions", "leases")}


class Suite:
    def __init__(self, run: Run, params: Params, progress: Progress, console: Console):
        self.run, self.p, self.progress, self.console = run, params, progress, console
        self.results: dict[str, Any] = {"reference": {}, "ledgercore": {}, "integrity": {}}
        self.memory: dict[str, float | None] = {}
        self.phase_seconds: dict[str, float] = {}
        self.workers: dict[str, Any] = {}
        self.warnings: list[str] = []
        self.admin_token = self._token(ADMIN_ID, admin=True)
        self.broker: Any = None

    # ---- helpers ---------------------------------------------------------------------
    def _token(self, user_id: str, admin: bool = False) -> str:
        from api.auth import mint_token

        return mint_token(self.run.jwt_secret, user_id=user_id, role="admin" if admin else "user",
                          platform_roles=["platform_superadmin"] if admin else [],
                          ttl_seconds=6 * 3600)

    def task(self, label: str, total: float | None) -> Any:
        return self.progress.add_task(label, total=total)

    def done(self, task: Any) -> None:
        found = next(t for t in self.progress.tasks if t.id == task)
        total = found.total or 1
        self.progress.update(task, completed=total, total=total)
        if self.progress.disable:  # not a terminal: one line per finished step instead
            self.console.print(f"done: {found.description} ({found.elapsed or 0:.1f}s)")

    def loadgen(self, label: str, spec: dict[str, Any], role: str = "ledgercore") -> dict[str, Any]:
        seconds = spec.get("warmup", 0.0) + spec["duration"]
        counted = "count" in spec or "leases" in spec  # stops after its commands, not a time
        task = self.task(label, None if counted else seconds)
        spec = {"seed": self.p.seed + len(self.run.children), "timeout": 60.0,
                "bench_pid": os.getpid(), **spec}
        result, child = self.run.run_json(
            "loadgen", "bench.loadgen", spec, timeout=seconds + 120,
            tick=None if counted else
            lambda elapsed: self.progress.update(task, completed=min(elapsed, seconds)))
        self.done(task)
        other = result.get("cpu_share", {}).get("other", 0.0)
        if other > 0.25:
            self.warnings.append(f"{label}: {other:.2f} cores busy outside the bench")
        name = f"load generator ({role} runs)"
        self.memory[name] = max(self.memory.get(name) or 0, result["max_rss_mib"])
        return result

    def adjust_spec(self, server: Server, users: list[str], concurrency: int, duration: float,
                    warmup: float, balances: dict[str, int] | None = None,
                    rate: float | None = None) -> dict[str, Any]:
        spec = {"kind": "adjust", "base_url": server.url, "admin_token": self.admin_token,
                "watch": self.watch(server),
                "users": users, "hot_user": users[0], "hot_share": self.p.hot_share,
                "concurrency": concurrency, "duration": duration, "warmup": warmup,
                "balances": balances or {}}
        if rate:
            spec["rate"] = rate
        return spec

    def balance_spec(self, server: Server, users: list[str], pattern: str,
                     warmup: float) -> dict[str, Any]:
        return {"kind": "balance", "base_url": server.url, "jwt_secret": self.run.jwt_secret,
                "watch": self.watch(server),
                "users": users, "pattern": pattern, "concurrency": 1,
                "duration": self.p.query_duration, "warmup": warmup}

    def watch(self, server: Server) -> dict[str, int]:
        """The processes whose CPU a load generator run reports: the server, plus the
        relay and projector while the Kafka transport runs."""
        watch = {"server": server.child.pid, **{name: child.pid for name, child in self.workers.items()
                                                if child.alive()}}
        for child in psutil.Process(server.child.pid).children():
            if "project-log" in child.cmdline():
                watch["server's projector"] = child.pid
        if self.broker is not None and self.broker.process is not None:
            watch["broker"] = self.broker.process.pid
        return watch

    def stop(self, name: str, *children: Any) -> None:
        for child in children:
            projectors = [p for p in psutil.Process(child.pid).children()
                          if "project-log" in p.cmdline()] if child.alive() else []
            for projector in projectors:  # ``run`` keeps the direct projector in a child
                self.memory[f"{name}: its projector process"] = peak_rss_mib(projector.pid)
            child.stop()
        self.memory[name] = max((c.peak_rss or 0) for c in children) if children else None

    # ---- 1. machine limits -------------------------------------------------------------
    def machine_limits(self) -> None:
        ref = self.results["reference"]
        dsn = self.run.database("reference")
        ref["psycopg"] = {}
        for rows in (1, 100):
            task = self.task(f"psycopg inserts, {rows} row(s) per commit", self.p.insert_duration)
            ref["psycopg"][str(rows)] = machine_limits.psycopg_inserts(
                dsn, rows, self.p.insert_duration,
                tick=lambda elapsed, t=task: self.progress.update(t, completed=elapsed))
            self.done(task)

        task = self.task("eventsourcing used naively (sequential saves)", self.p.naive_duration)
        ref["naive_eventsourcing"] = naive_eventsourcing.measure(
            dsn, self.p.naive_duration, self.p.naive_aggregates, seed=self.p.seed,
            tick=lambda elapsed: self.progress.update(task, completed=elapsed))
        self.done(task)
        if ref["naive_eventsourcing"]["mismatched_aggregates"]:
            raise BenchError("the naive eventsourcing reference lost events")

        from infra.services import Broker

        task = self.task("broker: produce, then group-consume", 2 * self.p.broker_messages)
        self.broker = Broker().start()
        self.run.on_close(self.broker.stop)
        ref["broker"] = machine_limits.broker_rates(
            self.broker.bootstrap, self.p.broker_messages, timeout=300,
            tick=lambda phase, n: self.progress.update(
                task, completed=n + (self.p.broker_messages if phase == "consume" else 0)))
        self.done(task)

        ref["http_ceiling"] = {}
        users = [str(uuid.uuid4()) for _ in range(self.p.users)]
        for variant in ("async", "sync"):
            server = self.run.start_ceiling(variant)
            levels = {}
            for concurrency in self.p.concurrency:
                result = self.loadgen(
                    f"HTTP ceiling ({variant} handler), {concurrency} concurrent",
                    self.adjust_spec(server, users, concurrency, self.p.ceiling_duration,
                                     self.p.ceiling_warmup), role="ceiling")
                levels[str(concurrency)] = strip(result)
            get = self.loadgen(f"HTTP ceiling ({variant} handler), GET, 1 concurrent",
                               {**self.balance_spec(server, users, "same", self.p.ceiling_warmup),
                                "duration": self.p.ceiling_duration}, role="ceiling")
            self.stop(f"HTTP ceiling server ({variant})", server.child)
            ref["http_ceiling"][variant] = {"levels": levels, "get": strip(get),
                                            "peak_rss_mib": server.child.peak_rss}

    # ---- 2. ledgercore, direct transport ---------------------------------------------------
    def ledgercore_direct(self) -> None:
        from infra.db import Stores

        out = self.results["ledgercore"]
        dsn = self.run.database("direct")
        server = self.run.start_ledgercore("server-direct", dsn)
        stores = Stores.open(self.run.settings(dsn, pg_pool_size=2))
        self.run.on_close(stores.close)
        expect = integrity.Expectations()
        users = [str(uuid.uuid4()) for _ in range(self.p.users)]
        out["commands"] = self.ladder(server, stores, users, expect, "ledgercore commands")
        out["event_bytes"] = replay.event_bytes(stores)

        out["lag"] = {"direct": self.lag(server, dsn, "log", users, expect, stores)}

        hit = self.loadgen("balance queries, cache hit (same user)",
                           self.balance_spec(server, [users[0]], "same", 0.5))
        miss = self.loadgen("balance queries, cache miss (each user once)",
                            self.balance_spec(server, users[1:], "distinct", 0.0))
        out["queries"] = {"hit": strip(hit), "miss": strip(miss)}

        self.caught_up(stores, dsn, "log", "direct read model")
        self.stop("server (direct transport)", server.child)
        self.results["integrity"]["direct"] = self.check(stores, expect, "direct")

    def ladder(self, server: Server, stores: Any, users: list[str],
               expect: integrity.Expectations, label: str) -> dict[str, Any]:
        """``adminAdjustBalance`` at each concurrency level, one after another."""
        levels: dict[str, Any] = {}
        for concurrency in self.p.concurrency:
            before = stores.app.recorder.max_notification_id() or 0
            result = self.loadgen(
                f"{label}, {concurrency} concurrent",
                self.adjust_spec(server, users, concurrency, self.p.duration, self.p.warmup,
                                 balances=expect.balances()))
            after = stores.app.recorder.max_notification_id() or 0
            expect.add(result)
            busy = result["finished"] - result["started"]
            levels[str(concurrency)] = {
                **strip(result),
                "events_appended": after - before,
                "events_per_second": (after - before) / busy,
            }
        return levels

    # ---- 2b. ledgercore, projector apart ----------------------------------------------------
    def ledgercore_projector_apart(self) -> None:
        """The same command ladder with the read models projected afterwards: the server
        runs without its projector process (``LEDGERCORE_RUN_PROJECTOR=off``), as when
        the projectors have cores of their own, then ``project-log`` applies the whole
        log and the integrity check holds the read models to it as in phase 2."""
        from infra.db import Stores

        dsn = self.run.database("apart")
        server = self.run.start_ledgercore("server-projector-apart", dsn, run_projector="off")
        stores = Stores.open(self.run.settings(dsn, pg_pool_size=2))
        self.run.on_close(stores.close)
        expect = integrity.Expectations()
        users = [str(uuid.uuid4()) for _ in range(self.p.users)]
        levels = self.ladder(server, stores, users, expect, "ledgercore commands, projector apart")
        self.stop("server (projector apart)", server.child)
        task = self.task("projector apart: project-log applies the ladder's events", None)
        projector = self.run.start_cli("projector-apart", "project-log", dsn)
        started = time.monotonic()
        self.caught_up(stores, dsn, "log", "projector apart")
        events = stores.app.recorder.max_notification_id() or 0
        projected = time.monotonic() - started
        self.done(task)
        self.stop("projector apart (project-log)", projector)
        self.results["ledgercore"]["commands_projector_apart"] = {
            "levels": levels, "projected_events": events, "projected_seconds": projected,
            "projected_events_per_second": events / projected if projected else None}
        self.results["integrity"]["projector_apart"] = self.check(stores, expect, "projector apart")

    def lag(self, server: Server, dsn: str, prefix: str, users: list[str],
            expect: integrity.Expectations, stores: Any) -> dict[str, Any]:
        poller = PositionPoller(dsn, prefix)
        poller.start()
        try:
            result = self.loadgen(
                f"projection lag at {self.p.lag_rate:.0f} commands/s offered ({prefix.split(':')[0]})",
                self.adjust_spec(server, users, self.p.lag_concurrency, self.p.lag_duration,
                                 self.p.warmup, balances=expect.balances(), rate=self.p.lag_rate))
            expect.add(result)
            highest = max((int(p) for _, p in result["positions"]), default=0)
            wait_until(lambda: (bool(poller.samples) and poller.samples[-1][1] >= highest)
                       or poller.error is not None, 120, "the read model to reach the last command")
        finally:
            poller.stop()
        measured = [p for p in result["positions"] if p[0] >= result["window_start"]]
        return {**poller.lags(measured), "offered_per_second": self.p.lag_rate,
                "achieved_per_second": result["ok_per_second"], "load": strip(result)}

    def check_meter(self, meter: CpuAccount, label: str, out: dict[str, Any]) -> None:
        shares = meter.shares("bench (and its workers)")
        out.setdefault("cpu_share", {})[label] = shares
        if shares["other"] > 0.25:
            self.warnings.append(f"{label}: {shares['other']:.2f} cores busy outside the bench")

    def caught_up(self, stores: Any, dsn: str, prefix: str, what: str) -> None:
        target = stores.app.recorder.max_notification_id() or 0
        wait_until(lambda: read_position(dsn, prefix) >= target, 300, f"the {what} to catch up")

    def check(self, stores: Any, expect: integrity.Expectations, label: str) -> dict[str, Any]:
        total = stores.app.recorder.max_notification_id() or 0
        task = self.task(f"integrity ({label}): scan the event store, compare, rebuild", total)
        summary = integrity.check(stores, expect, label,
                                  tick=lambda _, n: self.progress.update(task, completed=n))
        self.done(task)
        return summary

    # ---- 3. ledgercore, Kafka transport ------------------------------------------------------
    def ledgercore_kafka(self) -> None:
        from infra.db import Stores

        dsn = self.run.database("kafka")
        topic = f"lcbench.{self.run.tag}.events"
        kafka = {"transport": "kafka", "kafka_bootstrap": self.broker.bootstrap,
                 "kafka_topic": topic, "kafka_partitions": "3",
                 "kafka_group": f"lcbench-{self.run.tag}"}
        task = self.task("Kafka transport: server, relay, projector group", None)
        server = self.run.start_ledgercore("server-kafka", dsn, **kafka)
        relay = self.run.start_cli("relay", "relay", dsn, **kafka)
        projector = self.run.start_cli("projector", "project", dsn, **kafka)
        self.workers = {"relay": relay, "projector": projector}
        prefix = f"kafka:{topic}/"

        def registered() -> bool:
            for child in (relay, projector):
                if not child.alive():
                    raise BenchError(f"{child.name} exited\n{child.tail()}")
            return source_count(dsn, prefix) >= 3

        joined = wait_until(registered, 120, "the projector to join its group")
        self.done(task)
        stores = Stores.open(self.run.settings(dsn, pg_pool_size=2, transport="kafka",
                                               kafka_topic=topic))
        self.run.on_close(stores.close)
        expect = integrity.Expectations()
        users = [str(uuid.uuid4()) for _ in range(self.p.users)]
        warm = self.loadgen("Kafka transport warm-up", self.adjust_spec(
            server, users, 8, 1.0, 0.0, rate=50))
        expect.add(warm)
        self.caught_up(stores, dsn, prefix, "Kafka read model")
        lag = self.lag(server, dsn, prefix, users, expect, stores)
        lag["group_join_seconds"] = joined
        self.results["ledgercore"]["lag"]["kafka"] = lag
        self.caught_up(stores, dsn, prefix, "Kafka read model")
        self.stop("server (Kafka transport)", server.child)
        self.stop("relay", relay)
        self.stop("projector", projector)
        self.workers = {}
        self.results["integrity"]["kafka"] = self.check(stores, expect, "kafka")

    # ---- 4. placement ----------------------------------------------------------------------
    def placement(self) -> None:
        nodes, contenders, rounds = (20, 16, 3) if self.p.quick else (50, 32, 10)
        out: dict[str, Any] = {}
        for writers in (1, 2):
            dsn = self.run.database(f"placement{writers}")
            task = self.task(f"placement: {contenders} contenders, {writers} writer(s), "
                             f"{nodes} nodes x {rounds} rounds", rounds)
            meter = CpuAccount(include_children=True)
            result = placement.measure(self.run.settings(dsn, pg_pool_size=4), nodes=nodes,
                                       contenders=contenders, rounds=rounds, writers_count=writers,
                                       tick=lambda n, t=task: self.progress.update(t, completed=n))
            self.done(task)
            self.check_meter(meter, f"placement ({writers} writers)", out)
            out[f"writers_{writers}"] = result
            self.results["integrity"][f"placement_{writers}"] = {
                "label": f"placement ({writers} writers)", "ok": result["ok"],
                "problems": [f"[placement] {p}" for p in result["problems"]],
                "problem_count": len(result["problems"])}
        self.results["ledgercore"]["placement"] = out

    # ---- 5. admissions ----------------------------------------------------------------------
    def admissions(self) -> None:
        """Allocation launches through HTTP at each client concurrency (fixed counts),
        each level's leases released before the next; see ``bench/admissions.py``."""
        import httpx

        from domain.skus import DEFAULT_MAX_CONCURRENT
        from infra.db import Stores

        per_level, levels = self.p.admissions, self.p.admission_concurrency
        nodes, users = 2 * per_level, per_level
        projection = admissions.lag_projection()
        dsn = self.run.database("admissions")
        task = self.task(f"admissions: {nodes} nodes, {users} funded users (in process)",
                         nodes + users)
        setup = admissions.prepare(self.run.settings(dsn, pg_pool_size=4), nodes=nodes, users=users,
                                   tick=lambda n: self.progress.update(task, completed=n))
        self.done(task)
        server = self.run.start_ledgercore("server-admissions", dsn)
        stores = Stores.open(self.run.settings(dsn, pg_pool_size=2))
        self.run.on_close(stores.close)
        expect = admissions.Expectations()
        people = setup["users"]
        bound = 120.0 + per_level  # a bound only: the runs stop after their commands

        def spec(kind: str, concurrency: int, **extra: Any) -> dict[str, Any]:
            return {"kind": kind, "base_url": server.url, "jwt_secret": self.run.jwt_secret,
                    "watch": self.watch(server), "users": people, "sku": setup["sku"],
                    "concurrency": concurrency, "duration": bound, "warmup": 0.0, **extra}

        def release(result: dict[str, Any], label: str) -> dict[str, Any]:
            leases = [[user, allocation_id] for _, user, allocation_id in result["leases"]]
            released = self.loadgen(label, spec("release", 32, leases=leases))
            expect.add_releases(released)
            return released

        out: dict[str, Any] = {"nodes": nodes, "users": users, "admissions_per_level": per_level,
                               "lag_projection": projection, "levels": {}}
        warm = self.loadgen(f"admissions warm-up: fill all {nodes} nodes, 32 concurrent",
                            spec("launch", 32, count=nodes))
        expect.add_launches(warm, people)
        request_id = uuid.uuid4().hex
        user, project = people[0]
        from api.auth import mint_token

        token = mint_token(self.run.jwt_secret, user_id=user, project_ids=[project])
        extra = httpx.post(server.url + "/api/v1/launch/compute", json={"sku": setup["sku"]},
                           timeout=60, headers={
                               "Authorization": f"Bearer {token}", "X-Project-ID": project,
                               "Idempotency-Key": uuid.uuid4().hex, "X-Request-Id": request_id})
        if extra.status_code == 202:
            expect.launched[request_id] = extra.json()["workload_id"]
            warm["leases"].append([request_id, 0, extra.json()["workload_id"]])
        else:
            expect.launch_refused[request_id] = f"{extra.status_code} {extra.json().get('code')}"
        out["full"] = {"admitted": len(warm["leases"]), "extra_launch": expect.launch_refused.get(
            request_id, "202 (admitted beyond capacity)")}
        out["warmup"] = {**strip(warm), "release": strip(release(warm, "admissions warm-up: "
                                                                       "release every lease"))}
        for concurrency in levels:
            # the lag measured is this level's: what the warm-up or the last release left
            # for the projector is applied first
            self.caught_up(stores, dsn, "log", "direct read model (before an admissions level)")
            poller = PositionPoller(dsn, "log", projection=projection)
            poller.start()
            try:
                result = self.loadgen(f"admissions: {per_level} launches, {concurrency} concurrent",
                                      spec("launch", concurrency, count=per_level))
                expect.add_launches(result, people)
                highest = max((int(p) for _, p in result["positions"]), default=0)
                wait_until(lambda: (bool(poller.samples) and poller.samples[-1][1] >= highest)
                           or poller.error is not None, 120,
                           f"the {projection} read model to reach the last launch")
            finally:
                poller.stop()
            released = release(result, f"admissions: release {len(result['leases'])} leases, "
                                        "32 concurrent")
            out["levels"][str(concurrency)] = {
                **strip(result), "admitted": len(result["leases"]),
                "admissions_per_second": result["ok_per_second"],
                "lag": poller.lags(result["positions"]), "release": strip(released)}
        target = stores.app.recorder.max_notification_id() or 0
        wait_until(lambda: all(read_position(dsn, "log", name) >= target
                               for name in (projection, "inventory", "billing_ledger")),
                   300, "the admissions read models to catch up")
        self.stop("server (admissions)", server.child)
        task = self.task("integrity (admissions): scan the event store, compare, rebuild", target)
        summary = admissions.check(stores, expect, users=people, node_ids=setup["node_ids"],
                                   cap=DEFAULT_MAX_CONCURRENT,
                                   tick=lambda n: self.progress.update(task, completed=n))
        self.done(task)
        if out["full"]["extra_launch"] != "409 sku_unavailable":
            summary["ok"] = False
            summary["problems"].append(f"[admissions] a launch beyond the {nodes} full nodes "
                                       f"answered {out['full']['extra_launch']}")
            summary["problem_count"] += 1
        self.results["integrity"]["admissions"] = summary
        self.results["ledgercore"]["admissions"] = out

    # ---- 6. replay -------------------------------------------------------------------------
    def replay(self) -> None:
        from infra.db import Stores

        out: dict[str, Any] = {"events": self.p.events, "catch_up_events": self.p.catch_up_events,
                               "events_per_account": self.p.events_per_account,
                               "generator_workers": self.p.generator_workers}
        dsn = self.run.database("replay")
        settings = self.run.settings(dsn, pg_pool_size=2)
        stores = Stores.open(settings)
        self.run.on_close(stores.close)
        expected: dict[str, int] = {}
        generated = saving = 0.0
        for stage, size in (("catch-up part", self.p.catch_up_events),
                            ("rest", self.p.events - self.p.catch_up_events)):
            if size <= 0:
                continue
            task = self.task(f"history: append {size:,} events ({stage})", size)
            meter = CpuAccount(include_children=True)
            part, seconds, saved = replay.generate(
                settings, size, self.run.tmp, seed=self.p.seed + len(expected),
                workers=self.p.generator_workers, per_account=self.p.events_per_account,
                tick=lambda n, t=task: self.progress.update(t, completed=n))
            self.done(task)
            self.check_meter(meter, f"history ({stage})", out)
            expected.update(part)
            generated += seconds
            saving += saved
            if stage == "catch-up part":
                task = self.task(f"catch_up (direct transport) over {size:,} events", size)
                meter = CpuAccount(include_children=True)
                with observe_batches(stores, lambda n, t=task: self.progress.update(t, completed=n)):
                    position, seconds = replay.timed_catch_up(stores)
                self.done(task)
                self.check_meter(meter, "catch_up", out)
                out["catch_up"] = {"events": replay.event_count(stores), "seconds": seconds,
                                   "position": position}
                out["catch_up"]["events_per_second"] = out["catch_up"]["events"] / seconds
        total = replay.event_count(stores)
        out["generation"] = {"events": total, "seconds": generated, "events_per_second": total / generated}
        out["append"] = {"events": total, "seconds": saving, "events_per_second": total / saving}
        task = self.task(f"rebuild billing_ledger from {total:,} events", total)
        meter = CpuAccount(include_children=True)
        with observe_batches(stores, lambda n: self.progress.update(task, completed=n)):
            count, seconds = replay.timed_rebuild(stores, progress=False)
        self.done(task)
        self.check_meter(meter, "rebuild", out)
        out["rebuild"] = {"events": count, "seconds": seconds, "events_per_second": count / seconds}
        out["event_bytes"] = replay.event_bytes(stores)
        task = self.task(f"audit replay (ledgercore replay --as-of now) of {total:,} events", total)
        meter = CpuAccount(include_children=True)
        state, seconds = replay.timed_audit_replay(
            stores, tick=lambda n: self.progress.update(task, completed=n))
        self.done(task)
        self.check_meter(meter, "audit replay", out)
        out["audit_replay"] = {"events": state.events, "seconds": seconds,
                               "events_per_second": state.events / seconds}
        folded = {owner: amount for (owner, currency), amount in state.balances().items()
                  if currency == "USD"}
        balances = replay.read_model_balances(stores)
        wrong = [user for user in set(expected) | set(balances) if expected.get(user) != balances.get(user)]
        unfolded = [user for user in set(expected) | set(folded) if expected.get(user) != folded.get(user)]
        self.results["integrity"]["replay"] = {
            "label": "replay", "ok": not wrong and not unfolded and count == total == state.events,
            "accounts": len(expected), "events": total, "rebuilt_events": count,
            "replayed_events": state.events,
            "problems": ([f"[replay] rebuild replayed {count} of {total} events"] if count != total else [])
            + ([f"[replay] the audit replay folded {state.events} of {total} events"]
               if state.events != total else [])
            + [f"[replay] account of user {u}: expected {expected.get(u)}, rebuilt {balances.get(u)}"
               for u in wrong[:integrity.MAX_LISTED]]
            + [f"[replay] account of user {u}: expected {expected.get(u)}, audit replay "
               f"{folded.get(u)}" for u in unfolded[:integrity.MAX_LISTED]],
            "problem_count": len(wrong) + len(unfolded) + (count != total) + (state.events != total)}
        self.results["ledgercore"]["replay"] = out


class observe_batches:
    """Reports the last notification id of each batch the event store hands out (to
    drive a progress bar while ``catch_up``/``rebuild`` run in this thread)."""

    def __init__(self, stores: Any, tick: Any):
        self.recorder, self.tick = stores.app.recorder, tick

    def __enter__(self) -> None:
        original = self.recorder.select_notifications

        def observed(*args: Any, **kwargs: Any) -> Any:
            found = original(*args, **kwargs)
            if found:
                self.tick(found[-1].id)
            return found

        self.recorder.select_notifications = observed

    def __exit__(self, *exc: object) -> None:
        del self.recorder.select_notifications


def handler_kinds() -> dict[str, str]:
    """Whether ledgercore's handlers are ``async def`` or ``def`` right now, so each is
    compared with the ceiling handler of its own kind."""
    import inspect

    from fastapi.routing import APIRoute

    try:
        from api.app import ROUTERS
    except Exception:  # noqa: BLE001 - only labels depend on it
        return {}
    kinds = {}
    for router in ROUTERS:
        for route in router.routes:
            if isinstance(route, APIRoute) and route.operation_id:
                kinds[route.operation_id] = ("async" if inspect.iscoroutinefunction(route.endpoint)
                                             else "sync")
    return {k: v for k, v in kinds.items() if k in ("adminAdjustBalance", "getBillingBalance")}


def machine_facts(params: Params) -> dict[str, Any]:
    from importlib.metadata import version

    with psycopg.connect(params.pg_admin_dsn) as conn:
        pg = conn.execute("SHOW server_version").fetchone()[0]
        settings = {name: conn.execute(f"SHOW {name}").fetchone()[0]
                    for name in ("shared_buffers", "synchronous_commit", "fsync", "max_connections")}
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=5).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True, timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", False
    return {"cpus": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE")
                                                         * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "platform": platform.platform(), "python": platform.python_version(),
            "postgres": pg, "postgres_settings": settings,
            "versions": {name: version(name) for name in (
                "eventsourcing", "fastapi", "uvicorn", "httpx", "kafka-python", "psycopg",
                "pydantic", "redis")},
            "git_commit": commit, "git_dirty_tracked_files": dirty,
            "load_average_at_start": os.getloadavg(), "handler_kinds": handler_kinds()}


def check_services(params: Params, console: Console) -> None:
    try:
        with psycopg.connect(params.pg_admin_dsn, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as error:
        console.print(f"[red]Postgres does not answer at {params.pg_admin_dsn}: {error}[/]")
        raise SystemExit(2) from None
    if params.redis_url:
        try:
            redis.Redis.from_url(params.redis_url, socket_timeout=3).ping()
        except redis.RedisError as error:
            console.print(f"[yellow]Redis does not answer at {params.redis_url} ({error}): "
                          "queries run without the cache[/]")
            params.redis_url = None


def main(argv: list[str] | None = None) -> None:
    params, args = parse_args(argv)
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 150))
    check_services(params, console)
    run = Run(params.pg_admin_dsn, params.redis_url, keep=args.keep)
    out_path = Path(args.out)

    def on_deadline(signum: int, frame: Any) -> None:
        raise Deadline(f"the run took longer than --timeout {params.timeout:.0f}s")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGALRM, on_deadline)
    signal.signal(signal.SIGTERM, on_term)
    signal.alarm(int(params.timeout))
    started_at = datetime.now(timezone.utc)
    started = time.monotonic()
    console.print(f"ledgercore bench {'--quick ' if params.quick else ''}run [bold]{run.tag}[/]: "
                  f"levels {params.concurrency}, {params.duration:g}s each, {params.users} users, "
                  f"history {params.events:,} events; logs in {run.tmp}")
    suite: Suite | None = None
    failure: str | None = None
    try:
        facts = machine_facts(params)
        with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                      TimeElapsedColumn(), console=console,
                      disable=not console.is_terminal) as progress:
            suite = Suite(run, params, progress, console)
            for phase in (suite.machine_limits, suite.ledgercore_direct,
                          suite.ledgercore_projector_apart, suite.ledgercore_kafka,
                          suite.placement, suite.admissions, suite.replay):
                phase_started = time.monotonic()
                phase()
                suite.phase_seconds[phase.__name__] = round(time.monotonic() - phase_started, 1)
    except (BenchError, Deadline, KeyboardInterrupt, Exception) as error:  # noqa: BLE001
        failure = f"{type(error).__name__}: {error}"
        if not isinstance(error, (BenchError, Deadline, KeyboardInterrupt)):
            import traceback

            failure += "\n" + traceback.format_exc()
    finally:
        signal.alarm(0)
        bench_rss = peak_rss_mib(os.getpid())
        problems = run.close()
    for problem in problems:
        console.print(f"[yellow]clean-up: {problem}[/]")
    if failure is not None or suite is None:
        console.print(Panel(f"[bold red]The bench did not complete.[/]\n{failure}",
                            title="ledgercore bench: FAILED", border_style="red"))
        if args.keep:
            console.print(f"kept databases {', '.join(run.databases)} and logs in {run.tmp}")
        else:
            console.print("(run with --keep to keep the databases and the processes' logs)")
        raise SystemExit(1)

    suite.memory["bench process (history generation driver, catch_up, rebuild)"] = bench_rss
    results = {
        "run": run.tag, "started_at": started_at.isoformat(), "seconds": time.monotonic() - started,
        "parameters": asdict(params) | {"pg_admin_dsn": None, "redis_url": params.redis_url},
        "phase_seconds": suite.phase_seconds, "machine": facts, **suite.results,
        "peak_rss_mib": suite.memory, "warnings": suite.warnings,
    }
    results["comparisons"] = report.comparisons(results)
    failed = [check for check in results["integrity"].values() if not check["ok"]]
    if failed:
        rejected = Path("/tmp") / f"{run.tag}-REJECTED.json"
        rejected.write_text(json.dumps(results, indent=2, default=str))
        if out_path.exists():
            out_path.unlink()
        lines = [problem for check in failed for problem in check["problems"]]
        more = sum(check["problem_count"] for check in failed) - len(lines)
        console.print(Panel(
            "[bold red]INTEGRITY CHECK FAILED: something acknowledged was lost, duplicated or "
            "differs between the event store, the aggregates and the read model. No figures "
            "are reported.[/]\n\n" + "\n".join(lines) + (f"\n… and {more} more" if more > 0 else "")
            + f"\n\nraw data (not results): {rejected}",
            title="ledgercore bench: REFUSED", border_style="red"))
        raise SystemExit(3)
    out_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    report.print_report(console, results)
    if suite.warnings:
        shown = "; ".join(suite.warnings[:3]) + (f"; … {len(suite.warnings) - 3} more (results.json)"
                                                  if len(suite.warnings) > 3 else "")
        console.print(f"[yellow]warning: {len(suite.warnings)} measured steps ran beside other work "
                      f"on the machine, their figures may be low: {shown}[/]")
    console.print(f"wrote {out_path} ({results['seconds']:.0f}s)")


if __name__ == "__main__":
    main(sys.argv[1:])
