"""The load generator: one process of its own, N concurrent tasks each on its own
keep-alive connection (``bench.rawhttp``: a minimal HTTP/1.1 client, so the generator
costs the machine little beside the server it measures). The same generator drives ledgercore and the HTTP
ceiling, so their figures compare.

``python -m bench.loadgen SPEC.json RESULT.json``. The spec (see ``suite``):

- ``kind``: ``adjust`` (POST adminAdjustBalance: credits, and debits the generator
  knows are covered), ``balance`` (GET getBillingBalance as each user), ``launch``
  (POST submitV3ComputeLaunch) or ``release`` (POST releaseAllocation);
- ``concurrency``, ``duration`` (s), ``warmup`` (s, not counted in rates or
  latencies), optionally ``rate`` (commands/s offered, open loop; else closed loop);
- ``adjust``: ``admin_token``, ``users``, ``hot_user``, ``hot_share``, ``balances``
  (what earlier runs acknowledged per user);
- ``balance``: ``jwt_secret``, ``users``, ``pattern`` (``same`` user every time or
  each user once, ``distinct``);
- ``launch``: ``jwt_secret``, ``users`` (``[user_id, project_id]`` pairs), ``sku``,
  ``count``: exactly that many launches, the i-th as user i mod len(users), then stop
  (``duration`` is only a bound);
- ``release``: ``jwt_secret``, ``users``, ``leases`` (``[user_index, allocation_id]``
  pairs): each released once, then stop.

Every request carries a fresh ``X-Request-Id``, which ledgercore stores as the events'
correlation id: the integrity check finds each acknowledged command in the event store
by it, and resolves requests that got no answer (``unknown``) the same way.
"""

from __future__ import annotations

import asyncio
import json
import random
import resource
import sys
import time
import uuid
from collections import Counter, defaultdict
from typing import Any

from bench.cpu import CpuAccount
from bench.rawhttp import Client, HttpError, Response
from bench.stats import summary_ms

ADJUST_PATH = "/api/v1/admin/users/{user}/balance"
BALANCE_PATH = "/api/v1/billing/balance"
LAUNCH_PATH = "/api/v1/launch/compute"
RELEASE_PATH = "/api/v1/allocations/{allocation_id}/release"
#: the statuses that count as done (``ok_per_second``)
OK = ("200", "202")


class Adjustments:
    """Chooses each command and records what the server answered."""

    def __init__(self, spec: dict[str, Any], rng: random.Random):
        self.rng = rng
        self.users: list[str] = spec["users"]
        self.hot: str | None = spec.get("hot_user")
        self.hot_share: float = spec.get("hot_share", 0.0)
        self.debit_share: float = spec.get("debit_share", 0.35)
        self.headers = {"Authorization": f"Bearer {spec['admin_token']}",
                        "Content-Type": "application/json"}
        #: acknowledged balance per user (earlier runs included), and debits in flight
        self.known: dict[str, int] = defaultdict(int, spec.get("balances", {}))
        self.reserved: dict[str, int] = defaultdict(int)
        self.acked: dict[str, int] = defaultdict(int)
        self.acked_ids: dict[str, list[str]] = defaultdict(list)
        self.refused: list[list[Any]] = []
        self.unknown: list[dict[str, Any]] = []
        self.positions: list[list[float]] = []

    def choose(self) -> tuple[str, str, int]:
        user = self.hot if self.hot and self.rng.random() < self.hot_share else self.rng.choice(self.users)
        available = self.known[user] - self.reserved[user]
        if available >= 100 and self.rng.random() < self.debit_share:
            amount = self.rng.randint(1, min(available, 5000))
            self.reserved[user] += amount
            return user, "debit", amount
        return user, "credit", self.rng.randint(100, 10_000)

    async def one(self, client: Client) -> tuple[str, float, float]:
        user, direction, amount = self.choose()
        signed = amount if direction == "credit" else -amount
        request_id = uuid.uuid4().hex
        body = json.dumps({"direction": direction, "amount_minor": amount, "currency": "USD",
                           "reason": "bench"}).encode()
        started = time.monotonic()
        try:
            response = await client.post(ADJUST_PATH.format(user=user), content=body,
                                         headers={**self.headers, "X-Request-Id": request_id})
        except HttpError as error:
            ended = time.monotonic()
            self.unknown.append({"request_id": request_id, "user": user, "signed": signed,
                                 "error": str(error)})
            status = f"error {error}"
        else:
            ended = time.monotonic()
            if response.status_code == 200:
                self.known[user] += signed
                self.acked[user] += signed
                self.acked_ids[user].append(request_id)
                position = response.headers.get("x-ledger-position")
                if position is not None:
                    self.positions.append([ended, int(position)])
                status = "200"
            else:
                status = describe(response)
                self.refused.append([request_id, user, status])
        finally:
            if direction == "debit":
                self.reserved[user] -= amount
        return status, started, ended

    def exhausted(self) -> bool:
        return False

    def result(self) -> dict[str, Any]:
        return {"acked": dict(self.acked), "acked_ids": dict(self.acked_ids),
                "refused": self.refused, "unknown": self.unknown, "positions": self.positions}


class Leases:
    """Launches (each as the next user in turn) or releases of given leases: a fixed
    number of commands, each with a fresh Idempotency-Key and X-Request-Id."""

    def __init__(self, spec: dict[str, Any], rng: random.Random):
        from api.auth import mint_token

        self.kind: str = spec["kind"]
        self.users: list[list[str]] = spec["users"]
        self.headers = [{"Authorization": "Bearer " + mint_token(
            spec["jwt_secret"], user_id=user, project_ids=[project], ttl_seconds=7200),
            "X-Project-ID": project, "Content-Type": "application/json"}
            for user, project in self.users]
        self.body = json.dumps({"sku": spec.get("sku")}).encode()
        self.leases: list[list[Any]] = spec.get("leases", [])
        self.count = int(spec["count"]) if self.kind == "launch" else len(self.leases)
        self.next_index = 0
        #: ``[request_id, user_index, allocation_id]`` of each 202
        self.done: list[list[Any]] = []
        self.refused: list[list[Any]] = []
        self.unknown: list[dict[str, Any]] = []
        self.positions: list[list[float]] = []

    def exhausted(self) -> bool:
        return self.next_index >= self.count

    async def one(self, client: Client) -> tuple[str, float, float]:
        index = self.next_index
        self.next_index += 1
        if self.kind == "launch":
            user, allocation_id = index % len(self.users), None
            path, body = LAUNCH_PATH, self.body
        else:
            user, allocation_id = self.leases[index]
            path, body = RELEASE_PATH.format(allocation_id=allocation_id), None
        request_id = uuid.uuid4().hex
        headers = {**self.headers[user], "Idempotency-Key": uuid.uuid4().hex,
                   "X-Request-Id": request_id}
        started = time.monotonic()
        try:
            response = await client.post(path, content=body, headers=headers)
        except HttpError as error:
            self.unknown.append({"request_id": request_id, "user": user,
                                 "allocation_id": allocation_id, "error": str(error)})
            return f"error {error}", started, time.monotonic()
        ended = time.monotonic()
        if response.status_code != 202:
            status = describe(response)
            self.refused.append([request_id, user, status])
            return status, started, ended
        if self.kind == "launch":
            allocation_id = response.json()["workload_id"]
        self.done.append([request_id, user, allocation_id])
        position = response.headers.get("x-ledger-position")
        if position is not None:
            self.positions.append([ended, int(position)])
        return "202", started, ended

    def result(self) -> dict[str, Any]:
        return {"leases": self.done, "refused": self.refused, "unknown": self.unknown,
                "positions": self.positions}


class Balances:
    """getBillingBalance as each user; counts X-Read-Model-Cache answers."""

    def __init__(self, spec: dict[str, Any], rng: random.Random):
        from api.auth import mint_token

        users = list(spec["users"])
        rng.shuffle(users)
        self.distinct = spec.get("pattern", "same") == "distinct"
        self.tokens = [mint_token(spec["jwt_secret"], user_id=user, ttl_seconds=7200)
                       for user in (users if self.distinct else users[:1])]
        self.next_index = 0
        self.cache: Counter[str] = Counter()

    def exhausted(self) -> bool:
        return self.distinct and self.next_index >= len(self.tokens)

    async def one(self, client: Client) -> tuple[str, float, float]:
        token = self.tokens[self.next_index if self.distinct else 0]
        self.next_index += 1
        started = time.monotonic()
        try:
            response = await client.get(BALANCE_PATH, headers={"Authorization": f"Bearer {token}"})
        except HttpError as error:
            return f"error {error}", started, time.monotonic()
        ended = time.monotonic()
        self.cache[response.headers.get("x-read-model-cache", "-")] += 1
        return (str(response.status_code) if response.status_code == 200 else describe(response),
                started, ended)

    def result(self) -> dict[str, Any]:
        return {"cache": dict(self.cache)}


def describe(response: Response) -> str:
    try:
        body = response.json()
        reason = (body.get("details") or {}).get("reason")
        return f"{response.status_code} {body.get('code')}" + (f"/{reason}" if reason else "")
    except (ValueError, AttributeError):
        return str(response.status_code)


async def drive(spec: dict[str, Any]) -> dict[str, Any]:
    rng = random.Random(spec.get("seed"))
    kinds = {"adjust": Adjustments, "balance": Balances, "launch": Leases, "release": Leases}
    workload: Adjustments | Balances | Leases = kinds[spec["kind"]](spec, rng)
    concurrency = int(spec["concurrency"])
    rate = spec.get("rate")
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    in_window = 0
    ok_in_window = 0
    missed = 0
    clients = [Client(spec["base_url"], timeout=spec.get("timeout", 60.0))
               for _ in range(concurrency)]
    before = resource.getrusage(resource.RUSAGE_SELF)
    cpu = CpuAccount(spec.get("watch", {}), bench_pid=spec.get("bench_pid"))
    try:
        start = time.monotonic()
        window_start = start + spec.get("warmup", 0.0)
        end = window_start + spec["duration"]

        async def one(client: Client) -> None:
            nonlocal in_window, ok_in_window
            status, started, ended = await workload.one(client)
            statuses[status] += 1
            if window_start <= ended <= end:  # rates: answers within the window
                in_window += 1
                ok_in_window += status in OK
            if window_start <= started <= end:  # latencies: requests sent within it
                latencies.append(ended - started)

        if rate:
            queue: asyncio.Queue[float | None] = asyncio.Queue()

            async def offer() -> None:
                nonlocal missed
                interval, due = 1.0 / rate, start
                while due < end:
                    delay = due - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    if queue.qsize() < concurrency:
                        queue.put_nowait(due)
                    else:
                        missed += 1  # the system is slower than the offered rate
                    due += interval
                for _ in range(concurrency):
                    queue.put_nowait(None)

            async def worker(client: Client) -> None:
                while await queue.get() is not None:
                    await one(client)

            await asyncio.gather(offer(), *(worker(client) for client in clients))
        else:
            async def loop(client: Client) -> None:
                while time.monotonic() < end and not workload.exhausted():
                    await one(client)

            await asyncio.gather(*(loop(client) for client in clients))
        finished = time.monotonic()
        cpu_share = cpu.shares("load generator")
    finally:
        for client in clients:
            await client.aclose()
    window = max(min(finished, end) - window_start, 1e-9)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "kind": spec["kind"], "concurrency": concurrency, "rate_offered": rate,
        "started": start, "window_start": window_start, "end": end, "finished": finished,
        "requests": sum(statuses.values()), "in_window": in_window,
        "window_seconds": window, "per_second": in_window / window,
        "ok_per_second": ok_in_window / window, "missed_offers": missed,
        "statuses": dict(statuses), "latency_ms": summary_ms(latencies),
        "cpu_share": cpu_share, "max_rss_mib": peak_rss_mib(),
        "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0], "cpu_seconds": (usage.ru_utime + usage.ru_stime) - (before.ru_utime + before.ru_stime),
        **workload.result(),
    }


def peak_rss_mib() -> float:
    """This process's peak resident set since its exec (VmHWM; ``ru_maxrss`` would
    carry over the forking parent's peak)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(coroutine: Any) -> Any:
    """uvloop when installed (the project's servers use it too), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def main() -> None:
    spec_path, result_path = sys.argv[1], sys.argv[2]
    spec = json.loads(open(spec_path).read())
    result = run(drive(spec))
    with open(result_path, "w") as out:
        json.dump(result, out)


if __name__ == "__main__":
    main()
