"""``replay --as-of T [--account ID]``: balances, usage and open placement claims as they
stood at an instant, folded from the event store alone.

The log prefix up to ``log.as_of_position(T)`` is read once, in order, and every billing
account, usage record and node inventory in it is folded from its first event with the
domain's own event classes (no snapshot, no read model). With ``--account`` (an owner
user id or a billing account id) the other accounts' events are not even decoded, nor
the events of usage records another user owns; node inventories are always folded
whole (any claim may be the account's).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from domain.billing import BillingAccount, account_id_for
from domain.inventory import LIVE, NodeInventory
from domain.rating import iso
from domain.reconciliation import event_topics
from domain.usage import UsageRecord
from infra.audit.log import Tick, as_of_position, read_log

FOLDED = (BillingAccount, UsageRecord, NodeInventory)
ACCOUNT_TOPICS = frozenset(event_topics(BillingAccount))
USAGE_TOPICS = frozenset(event_topics(UsageRecord))


@dataclass
class AsOf:
    """What the log prefix up to ``position`` folds to."""

    instant: datetime | None
    position: int
    account: UUID | None = None
    read: int = 0  # notifications read from the log
    events: int = 0  # of which decoded and folded (all of them without ``account``)
    seconds: float = 0.0
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
         tick: Tick | None = None) -> AsOf:
    """Fold the log up to ``position`` (inclusive); ``account``: only that account (an
    owner user id or a billing account id), its usage records and its claims."""
    state = AsOf(None, position, account)
    wanted = None if account is None else {account, account_id_for(account)}
    foreign: set[UUID] = set()  # usage records another user owns
    folded: dict[UUID, Any] = {}
    topics = event_topics(*FOLDED)
    started = time.perf_counter()
    decode, count, read = app.mapper.to_domain_event, 0, 0
    for notification in read_log(app, 0, position, topics, tick=tick):
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
    state.seconds = time.perf_counter() - started
    state.events, state.read = count, read
    for aggregate_id, aggregate in folded.items():
        if isinstance(aggregate, BillingAccount):
            state.accounts[aggregate_id] = aggregate
        elif isinstance(aggregate, UsageRecord):
            state.records[aggregate_id] = aggregate
        elif isinstance(aggregate, NodeInventory):
            state.nodes[aggregate_id] = aggregate
    if wanted is not None and state.accounts:
        owner = next(iter(state.accounts.values())).owner_user_id
        state.records = {k: r for k, r in state.records.items() if r.owner == owner}
    return state


def replay(app: Any, instant: datetime, *, account: UUID | None = None,
           tick: Tick | None = None) -> AsOf:
    """The state as of ``instant`` (see the package's docstring)."""
    position = as_of_position(app, instant)
    state = fold(app, position, account=account, tick=tick)
    state.instant = instant
    return state
