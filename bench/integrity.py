"""Integrity: nothing acknowledged is lost, nothing is applied twice.

For one database, after its ledgercore processes have stopped with the read model
caught up, and for every user the load generator touched or the store knows:

1. the read model's balance (``readmodels.balances``) and the sum and count of its
   ledger entries,
2. the sum the load generator recorded from its acknowledged (200) commands,
3. the aggregate's balance (``app.repository.get``),
4. the event store itself: every event decoded from the notification log; each
   acknowledged command's ``X-Request-Id`` must be the correlation id of exactly one
   entry, no refused command's may appear, and no entry may carry an id the load
   generator never sent (requests that got no answer are resolved here: applied
   once or not at all),
5. the read model again after ``consumers.rebuild.rebuild`` replayed the store,

must all agree. Any disagreement fails the run.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_LISTED = 25


@dataclass
class Expectations:
    """What the load generator recorded against one database, over all its runs."""

    acked: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    acked_ids: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    refused: list[list[Any]] = field(default_factory=list)
    unknown: list[dict[str, Any]] = field(default_factory=list)

    def add(self, result: dict[str, Any]) -> None:
        for user, amount in result.get("acked", {}).items():
            self.acked[user] += amount
        for user, ids in result.get("acked_ids", {}).items():
            self.acked_ids[user].extend(ids)
        self.refused.extend(result.get("refused", []))
        self.unknown.extend(result.get("unknown", []))

    def balances(self) -> dict[str, int]:
        return dict(self.acked)

    def commands(self) -> int:
        return sum(len(ids) for ids in self.acked_ids.values())


def _scan_event_store(stores: Any, tick: Callable[[int], None] | None) -> tuple[dict[str, Any], int, Counter[str]]:
    """Decode the whole notification log: per owner user, the USD sum, the entry count
    and the correlation ids of its entries."""
    from domain.billing import BillingAccount

    owners: dict[Any, str] = {}
    pending: dict[Any, list[Any]] = defaultdict(list)  # entries seen before their account
    per_user: dict[str, Any] = defaultdict(lambda: {"sum": 0, "entries": 0, "ids": Counter()})
    others: Counter[str] = Counter()
    scanned = 0
    position = 0
    recorder, mapper = stores.app.recorder, stores.app.mapper

    def add(user: str, event: Any) -> None:
        record = per_user[user]
        if event.currency == "USD":
            record["sum"] += event.amount_minor
        record["entries"] += 1
        record["ids"][(event.provenance or {}).get("correlation_id")] += 1

    while True:
        notifications = recorder.select_notifications(start=position, limit=1000,
                                                      inclusive_of_start=False)
        if not notifications:
            break
        for notification in notifications:
            event = mapper.to_domain_event(notification)
            scanned += 1
            if isinstance(event, BillingAccount.Created):
                user = str(event.owner_user_id)
                owners[event.originator_id] = user
                per_user[user]  # noqa: B018 - an account with no entries still counts
                for early in pending.pop(event.originator_id, []):
                    add(user, early)
            elif isinstance(event, BillingAccount.LedgerEntryPosted):
                user = owners.get(event.originator_id)
                if user is None:
                    pending[event.originator_id].append(event)
                else:
                    add(user, event)
            else:
                others[type(event).__qualname__] += 1
        position = notifications[-1].id
        if tick is not None:
            tick(position)
    for account_id, events in pending.items():
        others[f"entries of account {account_id} with no opening event"] += len(events)
    return per_user, scanned, others


def _read_model(stores: Any) -> tuple[dict[str, int], dict[str, tuple[int, int]], int]:
    with stores.query_pool.connection() as conn:
        balances = {str(r["owner_user_id"]): int(r["amount_minor"]) for r in conn.execute(
            "SELECT owner_user_id, amount_minor FROM readmodels.balances WHERE currency = 'USD'")}
        entries = {str(r["owner_user_id"]): (int(r["n"]), int(r["s"])) for r in conn.execute(
            "SELECT owner_user_id, count(*) AS n, sum(amount_minor) AS s"
            " FROM readmodels.ledger_entries WHERE currency = 'USD' GROUP BY owner_user_id")}
        position = conn.execute("SELECT coalesce(min(position), 0) AS p FROM readmodels.read_positions"
                                " WHERE projection = 'billing_ledger'").fetchone()["p"]
    return balances, entries, int(position)


def _aggregate_balance(stores: Any, account_id: Any) -> int | None:
    from eventsourcing.application import AggregateNotFoundError

    try:
        account = stores.app.repository.get(account_id)
    except AggregateNotFoundError:
        return None
    balance = getattr(account, "balance", None)
    return int(balance("USD")) if callable(balance) else int(account.balances.get("USD", 0))


def check(stores: Any, expect: Expectations, label: str,
          tick: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    """Run every check on ``stores``'s database; return a summary with ``ok`` and
    ``problems``. Rebuilds the read model (timed) as step 5."""
    import projections
    from consumers.rebuild import rebuild
    from domain.billing import account_id_for

    problems: list[str] = []

    def problem(text: str) -> None:
        problems.append(f"[{label}] {text}")

    max_id = stores.app.recorder.max_notification_id() or 0
    live, live_entries, live_position = _read_model(stores)
    if live_position < max_id:
        problem(f"read model at position {live_position}, event store at {max_id}: not caught up")
    per_user, scanned, others = _scan_event_store(
        stores, (lambda n: tick("scan", n)) if tick else None)
    for kind, count in others.items():
        problem(f"{count} unexpected events: {kind}")

    started = time.monotonic()
    replayed = rebuild(stores.app, stores.read_models, projections.BY_NAME["billing_ledger"])
    rebuild_seconds = time.monotonic() - started
    rebuilt, rebuilt_entries, _ = _read_model(stores)

    issued_acked = {rid: user for user, ids in expect.acked_ids.items() for rid in ids}
    issued_refused = {row[0]: row[1] for row in expect.refused}
    issued_unknown = {row["request_id"]: row for row in expect.unknown}
    if len(issued_acked) != expect.commands():
        problem("the load generator recorded one request id twice")
    unknown_applied: dict[str, int] = defaultdict(int)
    resolved: Counter[str] = Counter()
    users = set(expect.acked) | set(per_user) | set(live) | set(rebuilt)
    for user in sorted(users):
        record = per_user.get(user, {"sum": 0, "entries": 0, "ids": Counter()})
        for rid, count in record["ids"].items():
            if rid in issued_acked:
                if issued_acked[rid] != user:
                    problem(f"request {rid} for user {issued_acked[rid]} applied to user {user}")
                if count != 1:
                    problem(f"acknowledged request {rid} (user {user}) applied {count} times")
            elif rid in issued_refused:
                problem(f"refused request {rid} (user {user}, {issued_refused[rid]}) was applied {count}x")
            elif rid in issued_unknown:
                if count != 1:
                    problem(f"unanswered request {rid} (user {user}) applied {count} times")
                else:
                    unknown_applied[user] += issued_unknown[rid]["signed"]
                    resolved["applied"] += 1
            else:
                problem(f"user {user}: {count} entries with correlation id {rid!r} nobody sent")
        for rid in expect.acked_ids.get(user, []):
            if record["ids"].get(rid, 0) == 0:
                problem(f"acknowledged request {rid} (user {user}) is not in the event store: lost")
        expected = expect.acked.get(user, 0) + unknown_applied.get(user, 0)
        figures = {
            "load generator (acknowledged)": expected,
            "event store entries": record["sum"],
            "aggregate": _aggregate_balance(stores, account_id_for(uuid.UUID(user))),
            "read model balance": live.get(user),
            "read model entries": live_entries.get(user, (0, 0))[1],
            "rebuilt read model": rebuilt.get(user),
        }
        if expected == 0 and record["entries"] == 0:
            figures["read model balance"] = live.get(user, 0)
            figures["rebuilt read model"] = rebuilt.get(user, 0)
            if figures["aggregate"] is None:
                figures["aggregate"] = 0
        if len(set(figures.values())) != 1:
            problem(f"user {user}: " + ", ".join(f"{k} {v}" for k, v in figures.items()))
        if live_entries.get(user, (0, 0))[0] != record["entries"]:
            problem(f"user {user}: {live_entries.get(user, (0, 0))[0]} read-model entries,"
                    f" {record['entries']} in the event store")
        if rebuilt_entries.get(user, (0, 0)) != live_entries.get(user, (0, 0)):
            problem(f"user {user}: rebuilt entries {rebuilt_entries.get(user)} != live"
                    f" {live_entries.get(user)}")
    resolved["not applied"] = len(issued_unknown) - resolved["applied"]
    return {
        "label": label, "ok": not problems, "users": len(users),
        "acknowledged_commands": expect.commands(), "refused_commands": len(expect.refused),
        "unanswered_commands": len(issued_unknown), "unanswered_resolved": dict(resolved),
        "events_scanned": scanned, "max_notification_id": max_id,
        "rebuild_events": replayed, "rebuild_seconds": rebuild_seconds,
        "problems": problems[:MAX_LISTED], "problem_count": len(problems),
    }
