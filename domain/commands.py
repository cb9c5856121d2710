"""Commands and the session they decide in.

A ``Command`` is what a caller wants done: its context, a ``decide`` function and a
``render`` function. ``decide(ctx, session)`` loads aggregates through the ``Session``,
changes them (or raises ``DomainError``) and returns the aggregates it changed and a
result dict; ``render`` turns that result (or the error) into the response stored
under an idempotency key and answered to the caller.

A ``Session`` is the set of aggregates one batch of commands works on. Each command in
it runs as a little transaction: if it raises, every aggregate it touched is put back
as it was before it started, so a refused command never leaks into its neighbours.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from threading import Lock
from typing import Any, Protocol
from uuid import UUID

from domain.errors import DomainError
from domain.provenance import CommandContext

#: maps a command's result (a dict) or its DomainError to the response to store
Render = Callable[[dict[str, Any] | DomainError], dict[str, Any]]
Decide = Callable[[CommandContext, "Session"], tuple[Sequence[Any], dict[str, Any]]]


@dataclass(frozen=True)
class Command:
    ctx: CommandContext
    decide: Decide
    render: Render
    #: aggregates ``decide`` is known to read (often ones that do not exist yet): the
    #: batch writer asks the store which of them exist in one query for the whole batch
    reads: tuple[UUID, ...] = ()


@dataclass(frozen=True)
class Outcome:
    """What a command answered. ``response`` is whatever ``render`` made of it;
    ``position`` is the notification id of the last event it appended (for a replay,
    a position at least that high); ``replayed`` is true for an idempotent replay."""

    response: dict[str, Any]
    position: int | None
    replayed: bool = False


class Loader(Protocol):
    default_currency: str

    def get_or_none(self, aggregate_id: UUID) -> Any | None: ...

    def get_at(self, aggregate_id: UUID, version: int) -> Any: ...


class AggregateCache:
    """Aggregates as last saved by this process, most recently used kept.

    Safe because every save is checked by version: an entry made stale by another
    process makes the next save conflict, and the batch is then decided again from
    the store (with the cache cleared)."""

    def __init__(self, maxsize: int = 20_000):
        self.maxsize = maxsize
        self._items: OrderedDict[UUID, Any] = OrderedDict()
        self._lock = Lock()

    def get(self, aggregate_id: UUID) -> Any | None:
        with self._lock:
            aggregate = self._items.get(aggregate_id)
            if aggregate is not None:
                self._items.move_to_end(aggregate_id)
            return aggregate

    def put(self, aggregate: Any) -> None:
        with self._lock:
            self._items[aggregate.id] = aggregate
            self._items.move_to_end(aggregate.id)
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)

    def discard(self, aggregate_ids: Sequence[UUID]) -> None:
        with self._lock:
            for aggregate_id in aggregate_ids:
                self._items.pop(aggregate_id, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class Session:
    def __init__(self, loader: Loader, cache: AggregateCache | None = None):
        self.loader = loader
        self.default_currency = loader.default_currency
        self.cache = cache
        self.loaded: dict[UUID, Any | None] = {}
        #: id -> version of state that came from the cache and is not yet proven fresh
        self.from_cache: dict[UUID, int] = {}
        #: ids the last command touched
        self.touched: set[UUID] = set()
        self._undo: dict[UUID, tuple[Any | None, int]] | None = None

    def get(self, aggregate_id: UUID) -> Any | None:
        if aggregate_id not in self.loaded:
            aggregate = self.cache.get(aggregate_id) if self.cache else None
            if aggregate is None:
                aggregate = self.loader.get_or_none(aggregate_id)
            else:
                self.from_cache[aggregate_id] = aggregate.version
            self.loaded[aggregate_id] = aggregate
        self._remember(aggregate_id)
        return self.loaded[aggregate_id]

    def known_absent(self, aggregate_ids: Sequence[UUID]) -> None:
        """The store has just said these have no events: ``get`` answers None without
        asking again (a later create still saves at version 1, checked by the store)."""
        for aggregate_id in aggregate_ids:
            self.loaded.setdefault(aggregate_id, None)

    # ---- per-command transactions ------------------------------------------------
    def begin(self) -> None:
        self._undo = {}

    def _remember(self, aggregate_id: UUID) -> None:
        """Note what the command found, to undo it by: the aggregate (or None) and how
        many of its events were pending. Nothing is copied: an aggregate changes only by
        its events, so one the command left at its version needs no undoing."""
        if self._undo is not None and aggregate_id not in self._undo:
            aggregate = self.loaded.get(aggregate_id)
            self._undo[aggregate_id] = (aggregate, 0 if aggregate is None
                                        else len(aggregate.pending_events))

    def commit(self, changed: Sequence[Any]) -> list[tuple[UUID, int]]:
        """Keep what the command did; return (id, version) of each event it appended."""
        appended = []
        for aggregate in changed:
            before = (self._undo or {}).get(aggregate.id, (None, 0))[1]
            appended += [(e.originator_id, e.originator_version)
                         for e in aggregate.pending_events[before:]]
            self.loaded[aggregate.id] = aggregate
        self.touched = set(self._undo or ())
        self._undo = None
        return appended

    def rollback(self) -> None:
        """Put back what the command found. An aggregate the command appended events to
        is rebuilt as it was: its stored version (read from the store) plus the events
        earlier commands of the batch left pending."""
        for aggregate_id, (found, pending) in (self._undo or {}).items():
            if found is not None and len(found.pending_events) != pending:
                found = self._rebuilt(found, pending)
            self.loaded[aggregate_id] = found
        self.touched = set(self._undo or ())
        self._undo = None

    def _rebuilt(self, aggregate: Any, pending: int) -> Any:
        kept = aggregate.pending_events[:pending]
        stored = aggregate.version - len(aggregate.pending_events)
        rebuilt = self.loader.get_at(aggregate.id, stored) if stored else None
        for event in kept:
            rebuilt = event.mutate(rebuilt)
        rebuilt._pending_events = list(kept)
        return rebuilt

    def unproven(self) -> dict[UUID, int]:
        """Cached state the last command read that no save has checked yet."""
        return {i: v for i, v in self.from_cache.items() if i in self.touched}

    def changed(self) -> list[Any]:
        return [a for a in self.loaded.values() if a is not None and a.pending_events]


def run_decision(command: Command, ctx: CommandContext, session: Session
                 ) -> tuple[dict[str, Any], list[tuple[UUID, int]], DomainError | None]:
    """Run one command's decision inside ``session``: (response, appended, error).

    A ``DomainError`` rolls the command back; a final one still yields a response (to
    be stored under the key), a non-final one is returned for the caller to raise."""
    session.begin()
    try:
        changed, result = command.decide(ctx, session)
        response = command.render(result)
    except DomainError as error:
        session.rollback()
        return command.render(error), [], error
    except BaseException:
        session.rollback()
        raise
    return response, session.commit(changed), None
