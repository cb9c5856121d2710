"""The write-side application: one eventsourcing ``Application`` for every aggregate.

Commands decide only from aggregates (never from read models). Two ways to run one:

- ``execute(command)``: alone, in the caller's thread; an optimistic-concurrency
  conflict is retried with fresh aggregates, then reported as ``ConcurrentUpdate``.
- ``submit(command)`` (after ``start_batching()``): queued for the batch writer, a
  thread that takes every command waiting, decides them one after another against
  shared in-memory aggregates (each command rolled back alone if it is refused) and
  saves all their events in ONE transaction (group commit). If that save conflicts
  with another writer, nothing was written: the batch is decided again from the
  store (up to ``BATCH_ATTEMPTS`` times), then each command alone through
  ``execute``; if the database refuses the save for another reason (reachable, but a
  trigger or constraint rejects one command's events), each command is decided again
  alone, so only that one fails. The writer keeps saved aggregates warm in a cache; a
  save's version check catches a stale one, and before a refusal decided from cached
  state (which saves nothing, so no save checks it) is answered, the cached versions
  are checked against the store; if one moved, the whole batch is decided again.

Either way a command's events, and its idempotency record, are saved atomically.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import replace
from typing import Any
from uuid import UUID, uuid4

from eventsourcing.application import AggregateNotFoundError, Application, ProcessingEvent
from eventsourcing.domain import BaseAggregate
from eventsourcing.persistence import IntegrityError, InterfaceError, OperationalError
from eventsourcing.postgres import PostgresDatastore
from psycopg.sql import SQL, Identifier

from domain.app_instances import AppInstance
from domain.billing import BillingAccount, account_id_for
from domain.inventory import NodeInventory
from domain.invoices import Invoice
from domain.commands import AggregateCache, Command, Outcome, Session, run_decision
from domain.errors import ConcurrentUpdate, IdempotencyKeyReused
from domain.faults import double_apply, double_apply_flag
from domain.idempotency import IdempotencyRecord, record_id_for

log = logging.getLogger("ledgercore.commands")
MAX_ATTEMPTS = 8
MAX_BATCH = 256
#: times a batch is decided again as a whole after losing a race to another writer
BATCH_ATTEMPTS = 3
_STOP = object()


class Ledgercore(Application[UUID]):
    name = "ledgercore"
    snapshotting_intervals = {BillingAccount: 200, Invoice: 200, NodeInventory: 200,
                              AppInstance: 200}

    def __init__(self, env: dict[str, str] | None = None, default_currency: str = "USD") -> None:
        super().__init__(env)
        if self.env.get("POSTGRES_ENABLE_DB_FUNCTIONS", "").lower() in ("y", "yes", "1", "true", "on"):
            # With DB functions the library writes no tracking records and skips the
            # table lock that keeps notification order. Never.
            raise RuntimeError("POSTGRES_ENABLE_DB_FUNCTIONS must not be enabled")
        self.default_currency = default_currency
        self.cache = AggregateCache()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self.batches = 0
        self.batched_commands = 0
        self.conflicted_batches = 0
        #: test-only (domain/faults.py); None unless LEDGERCORE_FAULT_DOUBLE_APPLY is set
        self.fault_double_apply = double_apply_flag(self.env)

    def save(self, *objs: Any, **kwargs: Any) -> Any:
        """The library's ``save``, but an aggregate's events are collected after one
        class check: the library asks two runtime protocols first, and those
        ``isinstance`` checks cost a tenth of the batch writer's time."""
        if self.fault_double_apply:
            double_apply(objs, self.fault_double_apply)
        processing = ProcessingEvent[UUID]()
        for obj in objs:
            if isinstance(obj, BaseAggregate):
                processing.events.extend(obj.collect_events())
                processing.aggregates[obj.id] = obj
            else:
                processing.collect_events(obj)
        processing.saved_kwargs.update(kwargs)
        recordings = self._record(processing)
        self._take_snapshots(processing)
        self._notify(recordings)
        return recordings

    def get_or_none(self, aggregate_id: UUID) -> Any | None:
        try:
            return self.repository.get(aggregate_id)
        except AggregateNotFoundError:
            return None

    def get_at(self, aggregate_id: UUID, version: int) -> Any:
        """The aggregate as it was at ``version`` (which the store holds)."""
        return self.repository.get(aggregate_id, version=version)

    def absent(self, aggregate_ids: Sequence[UUID]) -> list[UUID]:
        """Which of these aggregates have no event in the store (one query)."""
        if not isinstance(getattr(self.recorder, "datastore", None), PostgresDatastore):
            return []
        present = self._latest_versions(list(aggregate_ids))
        return [i for i in aggregate_ids if i not in present]

    def billing_account(self, owner_user_id: UUID) -> BillingAccount | None:
        return self.get_or_none(account_id_for(owner_user_id))

    # ---- one command at a time -------------------------------------------------------
    def execute(self, command: Command) -> Outcome:
        claim = command.ctx.idempotency
        record_id = record_id_for(claim.scope) if claim else None
        ctx = replace(command.ctx, causation_id=str(record_id or uuid4()))
        for attempt in range(1, MAX_ATTEMPTS + 1):
            session = Session(self)
            if record_id is not None:
                replay = self._replay(session.get(record_id), claim.fingerprint, None)
                if replay is not None:
                    return replay
            response, _, error = run_decision(command, ctx, session)
            if error is not None and not (claim and error.final):
                if not error.final:
                    raise error
                return Outcome(response, None)
            if claim is not None:
                session.loaded[record_id] = IdempotencyRecord.record(
                    claim.scope, claim.fingerprint, response, ctx.provenance(), ctx.now)
            changed = session.changed()
            try:
                recordings = self.save(*changed)
            except IntegrityError:
                # Someone else appended first: back off, reload, decide again.
                time.sleep(random.uniform(0, 0.002 * 2**attempt))
                continue
            finally:
                self.cache.discard([a.id for a in changed])
            return Outcome(response, recordings[-1].notification.id if recordings else None)
        return Outcome(command.render(ConcurrentUpdate(MAX_ATTEMPTS)), None)

    def _replay(self, record: IdempotencyRecord | None, fingerprint: str,
                position: int | None) -> Outcome | None:
        if record is None:
            return None
        if record.fingerprint != fingerprint:
            raise IdempotencyKeyReused()
        if position is None:
            position = self.recorder.max_notification_id()
        return Outcome(record.response, position, replayed=True)

    # ---- group commit ------------------------------------------------------------------
    def start_batching(self) -> None:
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="batch-writer",
                                            daemon=True)
            self._writer.start()

    def stop_batching(self) -> None:
        if self._writer is not None:
            self._queue.put(_STOP)
            self._writer.join(timeout=30)
            self._writer = None

    def submit(self, command: Command, future: Any = None) -> Any:
        """Queue ``command`` for the batch writer; return ``future``, which its thread
        settles. ``future``: anything with ``set_result``, ``set_exception`` and
        ``done`` (``api.commands.answers`` hands results to an event loop that way);
        by default a new ``concurrent.futures.Future``."""
        if future is None:
            future = Future()
        if self._writer is None:
            try:
                future.set_result(self.execute(command))
            except BaseException as error:  # noqa: BLE001 - handed to the caller
                future.set_exception(error)
        else:
            self._queue.put((command, future))
        return future

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            batch = [item]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            try:
                self._write_batch(batch)
            except BaseException as error:  # noqa: BLE001 - every caller gets told
                log.exception("batch of %d commands failed", len(batch))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
            if stop:
                return

    def _write_batch(self, batch: list[tuple[Command, Future[Outcome]]], attempt: int = 1) -> None:
        try:
            self._decide_and_save(batch, attempt)
        except BaseException:
            # The batch's decisions changed cached aggregates in place; unsaved, they
            # must never reach a later batch (which would save them with its own events).
            self.cache.clear()
            raise

    def _decide_and_save(self, batch: list[tuple[Command, Future[Outcome]]], attempt: int) -> None:
        session = Session(self, self.cache)
        reads = {i for command, _ in batch for i in command.reads}
        reads |= {record_id_for(c.ctx.idempotency.scope) for c, _ in batch if c.ctx.idempotency}
        session.known_absent(self.absent([i for i in reads if self.cache.get(i) is None]))
        # per command: ("done", Outcome) | ("error", exc) | ("saved", response, keys)
        #              | ("replay", response): a record made earlier in this batch
        answers: list[tuple[Any, ...]] = []
        made_here: set[UUID] = set()
        for command, _ in batch:
            claim = command.ctx.idempotency
            record_id = record_id_for(claim.scope) if claim else None
            ctx = replace(command.ctx, causation_id=str(record_id or uuid4()))
            if record_id is not None:
                record = session.get(record_id)
                if record is not None:
                    if record.fingerprint != claim.fingerprint:
                        answers.append(("error", IdempotencyKeyReused()))
                    elif record_id in made_here:
                        answers.append(("replay", record.response))
                    else:
                        answers.append(("done", Outcome(record.response, None, replayed=True)))
                    continue
            try:
                response, keys, error = run_decision(command, ctx, session)
            except Exception as unexpected:  # noqa: BLE001 - this command alone fails
                answers.append(("error", unexpected))
                continue
            if error is not None and session.unproven():
                # A refusal appends nothing, so no version check would catch a stale
                # cached aggregate behind it: check the store's versions now.
                if not self._still_current(session):
                    self._decide_again(batch, session, attempt)
                    return
            if error is not None and not (claim and error.final):
                answers.append(("error", error) if not error.final
                               else ("done", Outcome(response, None)))
                continue
            if claim is not None:
                record = IdempotencyRecord.record(claim.scope, claim.fingerprint, response,
                                                  ctx.provenance(), ctx.now)
                session.loaded[record_id] = record
                made_here.add(record_id)
                keys = keys + [(record_id, 1)]
            answers.append(("saved", response, keys))

        changed = session.changed()
        positions: dict[tuple[UUID, int], int] = {}
        last = None
        if changed:
            try:
                recordings = self.save(*changed)
            except IntegrityError:
                # Another writer got there first. Nothing of this batch was written.
                self._decide_again(batch, session, attempt)
                return
            except Exception as error:
                self.cache.clear()
                if len(batch) == 1 or isinstance(error, (OperationalError, InterfaceError)):
                    raise
                # The database refused the transaction (a constraint, a trigger, a value
                # it cannot store): nothing of the batch was written. Decide each command
                # again alone, so only the one it refuses fails.
                self._decide_one_by_one(batch)
                return
            except BaseException:
                self.cache.clear()
                raise
            for recording in recordings:
                event = recording.domain_event
                positions[(event.originator_id, event.originator_version)] = recording.notification.id
            last = recordings[-1].notification.id
        for aggregate in session.loaded.values():  # as saved, or as before a refused command
            if aggregate is not None:
                self.cache.put(aggregate)
        self.batches += 1
        self.batched_commands += len(batch)
        stored_position = None
        for (command, future), answer in zip(batch, answers):
            kind = answer[0]
            if kind == "error":
                future.set_exception(answer[1])
            elif kind == "done":
                outcome = answer[1]
                if outcome.replayed:
                    if stored_position is None:
                        stored_position = last or self.recorder.max_notification_id()
                    outcome = replace(outcome, position=stored_position)
                future.set_result(outcome)
            elif kind == "replay":
                future.set_result(Outcome(answer[1], last, replayed=True))
            else:
                _, response, keys = answer
                position = max((positions[k] for k in keys), default=None)
                future.set_result(Outcome(response, position))

    def _still_current(self, session: Session) -> bool:
        """Are the cached aggregates the last command read still the stored ones?"""
        unproven = session.unproven()
        if self._latest_versions(list(unproven)) != unproven:
            return False
        for aggregate_id in unproven:
            del session.from_cache[aggregate_id]
        return True

    def _latest_versions(self, aggregate_ids: list[UUID]) -> dict[UUID, int]:
        """The stored version of each aggregate that has events (one query on Postgres)."""
        datastore = getattr(self.recorder, "datastore", None)
        if not isinstance(datastore, PostgresDatastore):
            latest = {i: self.recorder.select_events(i, desc=True, limit=1) for i in aggregate_ids}
            return {i: events[0].originator_version for i, events in latest.items() if events}
        if not aggregate_ids:
            return {}
        with datastore.transaction(commit=False) as cursor:
            cursor.execute(SQL("SELECT originator_id, max(originator_version) AS version FROM {0}.{1}"
                               " WHERE originator_id = ANY(%s) GROUP BY originator_id").format(
                Identifier(datastore.schema), Identifier(self.recorder.events_table_name)),
                (aggregate_ids,))
            return {row["originator_id"]: row["version"] for row in cursor.fetchall()}

    def _decide_again(self, batch: list[tuple[Command, Future[Outcome]]], session: Session,
                      attempt: int) -> None:
        """Another writer moved an aggregate this batch read: nothing of it is written
        yet. Forget what the batch read from the cache and decide the batch again from
        the store; after ``BATCH_ATTEMPTS`` lost races, one command at a time."""
        self.conflicted_batches += 1
        if attempt < BATCH_ATTEMPTS:
            self.cache.discard(list(session.loaded))
            self._write_batch(batch, attempt + 1)
        else:
            self._decide_one_by_one(batch)

    def _decide_one_by_one(self, batch: list[tuple[Command, Future[Outcome]]]) -> None:
        """Another writer moved an aggregate under the cache: nothing of this batch is
        written yet, so decide every command again, in order, from the store."""
        self.cache.clear()
        for command, future in batch:
            self._settle(future, lambda c=command: self.execute(c))

    @staticmethod
    def _settle(future: Future[Outcome], run: Any) -> None:
        try:
            future.set_result(run())
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            future.set_exception(error)
