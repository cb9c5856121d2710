"""The write-side application: one eventsourcing ``Application`` for every aggregate.

Commands decide only from aggregates loaded here. A command that touches several
aggregates saves them with one ``save`` (one transaction). Optimistic-concurrency
conflicts are retried with fresh state, then reported as ``ConcurrentUpdate``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar
from uuid import UUID, uuid4

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.persistence import IntegrityError

from domain.billing import BillingAccount, account_id_for
from domain.errors import ConcurrentUpdate, DomainError, IdempotencyKeyReused
from domain.idempotency import IdempotencyRecord, record_id_for
from domain.money import Money
from domain.provenance import CommandContext

A = TypeVar("A")
MAX_ATTEMPTS = 8

#: maps a command's result (a dict) or its DomainError to the response to store
Render = Callable[[dict[str, Any] | DomainError], dict[str, Any]]


@dataclass(frozen=True)
class Outcome:
    """What a command answered. ``response`` is whatever ``render`` made of it;
    ``position`` is the notification id of the last event it appended (or, for a
    replay, a position at least that high); ``replayed`` is true for an idempotent
    replay."""

    response: dict[str, Any]
    position: int | None
    replayed: bool = False


class Ledgercore(Application[UUID]):
    name = "ledgercore"
    snapshotting_intervals = {BillingAccount: 200}

    def __init__(self, env: dict[str, str] | None = None,
                 default_currency: str = "USD") -> None:
        super().__init__(env)
        if self.env.get("POSTGRES_ENABLE_DB_FUNCTIONS", "").lower() in ("y", "yes", "1", "true", "on"):
            # With DB functions the library writes no tracking records and skips the
            # table lock that keeps notification order. Never.
            raise RuntimeError("POSTGRES_ENABLE_DB_FUNCTIONS must not be enabled")
        self.default_currency = default_currency

    # ---- loading -----------------------------------------------------------------
    def get_or_none(self, aggregate_id: UUID) -> Any | None:
        try:
            return self.repository.get(aggregate_id)
        except AggregateNotFoundError:
            return None

    def billing_account(self, owner_user_id: UUID) -> BillingAccount | None:
        return self.get_or_none(account_id_for(owner_user_id))

    # ---- the command runner ------------------------------------------------------
    def execute(
        self,
        ctx: CommandContext,
        decide: Callable[[CommandContext], tuple[Sequence[Any], dict[str, Any]]],
        render: Render,
    ) -> Outcome:
        """Run ``decide`` against fresh aggregates and save what it changed, atomically
        with the idempotency record when the request carries a key.

        ``decide`` returns the aggregates it changed and a result dict, or raises a
        ``DomainError``. Final errors are stored under the key like successes are.
        """
        claim = ctx.idempotency
        record_id = record_id_for(claim.scope) if claim else None
        ctx = replace(ctx, causation_id=str(record_id or uuid4()))
        for attempt in range(1, MAX_ATTEMPTS + 1):
            if record_id is not None:
                replay = self._replay(record_id, claim.fingerprint)
                if replay is not None:
                    return replay
            try:
                aggregates, result = decide(ctx)
                response = render(result)
            except DomainError as error:
                if not (claim and error.final):
                    return Outcome(render(error), None)
                aggregates, response = (), render(error)
            pending: list[Any] = list(aggregates)
            if claim is not None:
                pending.append(IdempotencyRecord.record(
                    claim.scope, claim.fingerprint, response, ctx.provenance(), ctx.now))
            try:
                recordings = self.save(*pending)
            except IntegrityError:
                # Someone else appended first: back off, reload, decide again.
                time.sleep(random.uniform(0, 0.002 * 2**attempt))
                continue
            position = recordings[-1].notification.id if recordings else None
            return Outcome(response, position)
        return Outcome(render(ConcurrentUpdate(MAX_ATTEMPTS)), None)

    def _replay(self, record_id: UUID, fingerprint: str) -> Outcome | None:
        record = self.get_or_none(record_id)
        if record is None:
            return None
        if record.fingerprint != fingerprint:
            raise IdempotencyKeyReused()
        return Outcome(record.response, self.recorder.max_notification_id(), replayed=True)

    # ---- billing commands --------------------------------------------------------
    def adjust_balance(self, ctx: CommandContext, *, user_id: UUID, direction: str,
                       amount: Money, reason: str, render: Render) -> Outcome:
        def decide(ctx: CommandContext) -> tuple[Sequence[Any], dict[str, Any]]:
            account = self.billing_account(user_id)
            if account is None:
                account = BillingAccount.open(user_id, self.default_currency,
                                              ctx.provenance(), ctx.now)
            entry_id = account.adjust(direction=direction, amount=amount, reason=reason,
                                      adjustment_id=UUID(ctx.causation_id),
                                      provenance=ctx.provenance(), at=ctx.now)
            return [account], {"ok": True, "entry_id": str(entry_id)}

        return self.execute(ctx, decide, render)
