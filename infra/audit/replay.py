"""``replay --as-of T [--account ID]``: balances, usage and open placement claims as they
stood at an instant, folded from the event store alone.

The log prefix up to ``log.as_of_position(T)`` is read once, in order, and every billing
account, usage record and node inventory in it is folded from its first event with the
domain's own event classes (no snapshot, no read model). With ``--account`` (an owner
user id or a billing account id) the other accounts' events are not even decoded, nor
the events of usage records another user owns; node inventories are always folded
whole (any claim may be the account's).

A whole replay of a long log (at least ``PARALLEL_MIN`` positions) is shared by
``WORKERS`` processes (``spawn``ed, each with an application of its own built from the
app's ``env``): each reads and folds one part of the log prefix (``log.read_part``: the
events of the aggregates whose id's last byte, modulo the number of workers, is the
worker's number; so every aggregate is folded whole, in log order, by one worker) and
sends its aggregates back (pickled); they are merged in the order of their first
events, so the result is the single process's. A worker that fails makes the replay
fail (``ReplayWorkerError``). ``--account`` replays, short logs and stores other than
Postgres are folded in the calling process.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from multiprocessing import connection, current_process, get_context
from typing import Any
from uuid import UUID

from domain.billing import BillingAccount, account_id_for
from domain.inventory import LIVE, NodeInventory
from domain.rating import iso
from domain.reconciliation import event_topics
from domain.usage import UsageRecord
from infra.audit.log import Tick, as_of_position, partitioned, prefetched, read_log, read_part

FOLDED = (BillingAccount, UsageRecord, NodeInventory)
TOPICS = event_topics(*FOLDED)
ACCOUNT_TOPICS = frozenset(event_topics(BillingAccount))
USAGE_TOPICS = frozenset(event_topics(UsageRecord))
#: processes sharing a whole replay of a long log
WORKERS = max(1, min(2, os.cpu_count() or 1))
#: log positions from which a whole replay is shared (below it, starting the processes
#: would cost about what they save)
PARALLEL_MIN = 100_000


class ReplayWorkerError(RuntimeError):
    """A process folding part of the log failed (its traceback is the message)."""


@dataclass
class AsOf:
    """What the log prefix up to ``position`` folds to."""

    instant: datetime | None
    position: int
    account: UUID | None = None
    read: int = 0  # notifications read from the log
    events: int = 0  # of which decoded and folded (all of them without ``account``)
    seconds: float = 0.0
    workers: int = 1  # processes that folded the log
    accounts: dict[UUID, BillingAccount] = field(default_factory=dict)
    records: dict[UUID, UsageRecord] = field(default_factory=dict)
    nodes: dict[UUID, NodeInventory] = field(default_factory=dict)

    @property
    def owner(self) -> UUID | None:
        """The owner the replay was asked about (``--account``), if any."""
        if self.account is None:
            return None
        for account in self.accounts.values():
            return account.owner_user_id
        return self.account

    def balances(self) -> dict[tuple[str, str], int]:
        """(owner user id, currency) → balance in minor units."""
        return {(str(a.owner_user_id), currency): amount for a in self.accounts.values()
                for currency, amount in a.balances.items()}

    def open_claims(self) -> list[dict[str, Any]]:
        owner = self.owner
        return sorted(({**claim, "node_id": str(node.id)} for node in self.nodes.values()
                       for claim in node.claims.values() if claim["status"] in LIVE
                       and (owner is None or claim.get("user_id") == str(owner))),
                      key=lambda c: (c["node_id"], c["id"]))

    def as_json(self) -> dict[str, Any]:
        accounts = [{"account_id": str(a.id), "owner_user_id": str(a.owner_user_id),
                     "primary_currency": a.primary_currency,
                     "balances": dict(sorted(a.balances.items())), "entries": a.entry_count,
                     "last_hash": a.last_hash}
                    for a in sorted(self.accounts.values(), key=lambda a: str(a.owner_user_id))]
        usage = [{"id": str(r.id), "usage_source": r.meter["usage_source"],
                  "owner_user_id": r.meter["requested_by_user_id"],
                  "allocation_id": r.meter.get("allocation_id"),
                  "app_instance_id": r.meter.get("app_instance_id"), "sku": r.meter.get("sku"),
                  "units": r.meter["units"], "start_time": iso(r.start_time),
                  "end_time": r.end_time and iso(r.end_time),
                  "billed_to": r.last_billed_at and iso(r.last_billed_at),
                  "cost_minor": r.cost_minor, "currency": r.currency,
                  "status": "open" if r.end_time is None else "closed"}
                 for r in sorted(self.records.values(), key=lambda r: str(r.id))]
        claims = [{key: claim.get(key) for key in (
            "id", "node_id", "allocation_id", "user_id", "project_id", "sku", "claim_kind",
            "slot_id", "status", "created_at")} for claim in self.open_claims()]
        return {"as_of": self.instant and self.instant.isoformat(), "position": self.position,
                "account": self.account and str(self.account), "events_read": self.read,
                "events_folded": self.events, "seconds": round(self.seconds, 3),
                "events_per_second": round(self.read / self.seconds) if self.seconds else None,
                "accounts": accounts, "usage": usage, "open_claims": claims}


def fold(app: Any, position: int, *, account: UUID | None = None,
         tick: Tick | None = None, workers: int | None = None) -> AsOf:
    """Fold the log up to ``position`` (inclusive); ``account``: only that account (an
    owner user id or a billing account id), its usage records and its claims.
    ``workers``: processes sharing the fold (default: ``WORKERS`` from ``PARALLEL_MIN``
    positions on, else one); always one with ``account``, for a store ``read_part``
    cannot read, or in a daemonic process."""
    if workers is None:
        workers = WORKERS if position >= PARALLEL_MIN else 1
    if account is not None or position <= 0 or not partitioned(app) or \
            current_process().daemon:  # a daemonic process may not start processes
        workers = 1
    state = AsOf(None, position, account, workers=max(1, workers))
    started = time.perf_counter()
    if state.workers > 1:
        folded, state.read, state.events = _fold_shared(app, position, state.workers, tick)
    else:
        folded, state.read, state.events = _fold_here(app, position, account, tick)
    state.seconds = time.perf_counter() - started
    for aggregate_id, aggregate in folded.items():
        if isinstance(aggregate, BillingAccount):
            state.accounts[aggregate_id] = aggregate
        elif isinstance(aggregate, UsageRecord):
            state.records[aggregate_id] = aggregate
        elif isinstance(aggregate, NodeInventory):
            state.nodes[aggregate_id] = aggregate
    if account is not None and state.accounts:
        owner = next(iter(state.accounts.values())).owner_user_id
        state.records = {k: r for k, r in state.records.items() if r.owner == owner}
    return state


def _fold_here(app: Any, position: int, account: UUID | None,
               tick: Tick | None) -> tuple[dict[UUID, Any], int, int]:
    """The fold in this process: (aggregates in the order of their first events,
    notifications read, events folded)."""
    wanted = None if account is None else {account, account_id_for(account)}
    foreign: set[UUID] = set()  # usage records another user owns
    folded: dict[UUID, Any] = {}
    decode, count, read = app.mapper.to_domain_event, 0, 0
    for notification in read_log(app, 0, position, TOPICS, tick=tick):
        read += 1
        if wanted is not None:
            if notification.topic in ACCOUNT_TOPICS and notification.originator_id not in wanted:
                continue
            if notification.originator_id in foreign:
                continue
        event = decode(notification)
        count += 1
        if wanted is not None and isinstance(event, UsageRecord.Created) and \
                UUID(event.meter["requested_by_user_id"]) not in wanted:
            foreign.add(event.originator_id)
            continue
        folded[event.originator_id] = event.mutate(folded.get(event.originator_id))
    return folded, read, count


def _fold_shared(app: Any, position: int, workers: int,
                 tick: Tick | None) -> tuple[dict[UUID, Any], int, int]:
    """``_fold_here`` (whole) shared by ``workers`` processes, one part of the log each.

    Each sends ``("at", position)`` after each page it reads (``tick`` gets the least
    position all have reached), then ``("done", (read, firsts, aggregates))`` or
    ``("failed", traceback)``. A worker that ends without a result, or fails, stops the
    others and raises ``ReplayWorkerError``."""
    context = get_context("spawn")
    env = {**app.env, "CREATE_TABLE": "n", "POSTGRES_POOL_SIZE": "1",
           "POSTGRES_MAX_OVERFLOW": "1"}
    processes, readers = [], {}
    finished = False
    try:
        for part in range(workers):
            reader, writer = context.Pipe(duplex=False)
            process = context.Process(target=_fold_part, name=f"audit-replay-{part}",
                                      args=(type(app), env, position, part, workers, writer),
                                      daemon=True)
            process.start()
            writer.close()
            processes.append(process)
            readers[reader] = part
        reached = [0] * workers
        results: dict[int, tuple[int, list[int], list[tuple[UUID, Any]]]] = {}
        while len(results) < workers:
            for reader in connection.wait(list(readers)):
                part = readers[reader]
                try:
                    kind, value = reader.recv()
                except EOFError:
                    processes[part].join(timeout=5)
                    raise ReplayWorkerError(
                        f"replay worker {part + 1} of {workers} ended without a result"
                        f" (exit code {processes[part].exitcode})") from None
                if kind == "at":
                    reached[part] = value
                    if tick is not None:
                        tick(min(reached))
                elif kind == "done":
                    results[part] = value
                    del readers[reader]
                    reader.close()
                else:
                    raise ReplayWorkerError(f"replay worker {part + 1} of {workers} failed:\n"
                                            f"{value}")
        finished = True
    finally:
        for process in processes:
            if finished:
                process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join(timeout=10)
        for reader in readers:
            reader.close()
    read = count = 0
    firsts: list[tuple[int, UUID, Any]] = []
    for part_read, part_firsts, part_folded in results.values():
        read += part_read
        count += part_read
        firsts.extend((first, aggregate_id, aggregate) for first, (aggregate_id, aggregate)
                      in zip(part_firsts, part_folded))
    firsts.sort(key=lambda entry: entry[0])
    return {aggregate_id: aggregate for _, aggregate_id, aggregate in firsts}, read, count


def _fold_part(app_class: type[Any], env: dict[str, str], position: int, part: int,
               parts: int, out: Any) -> None:
    """Worker process: fold part ``part`` of ``parts`` of the log up to ``position`` with
    an application of its own; report to ``out`` (see ``_fold_shared``)."""
    lock = threading.Lock()

    def send(message: tuple[str, Any]) -> None:
        with lock:
            out.send(message)

    try:
        app = app_class(env=env)
        try:
            decode, read = app.mapper.to_domain_event, 0
            folded: dict[UUID, Any] = {}
            firsts: list[int] = []  # the position of each aggregate's first event
            pages = read_part(app, 0, position, TOPICS, part, parts,
                              tick=lambda at: send(("at", at)))
            for batch in prefetched(pages):
                read += len(batch)
                for notification in batch:
                    event = decode(notification)
                    aggregate_id = event.originator_id
                    if aggregate_id not in folded:
                        firsts.append(notification.id)
                    folded[aggregate_id] = event.mutate(folded.get(aggregate_id))
        finally:
            app.close()
        send(("done", (read, firsts, list(folded.items()))))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        send(("failed", traceback.format_exc()))
        raise SystemExit(1) from None
    finally:
        out.close()


def replay(app: Any, instant: datetime, *, account: UUID | None = None,
           tick: Tick | None = None, workers: int | None = None) -> AsOf:
    """The state as of ``instant`` (see the package's docstring); ``workers``: see
    ``fold``."""
    position = as_of_position(app, instant)
    state = fold(app, position, account=account, tick=tick, workers=workers)
    state.instant = instant
    return state
