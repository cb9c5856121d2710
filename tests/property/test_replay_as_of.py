"""``replay --as-of``: at any instant, the state folded from the event store equals the
state the reference models had at that instant.

A random history (Hypothesis) of balance adjustments, usage meters opened, rated and
closed, and placement claims reserved, advanced and released, each command at its own
instant on a clock that moves forward by random steps (often zero: several commands
at one instant), runs on the real domain (in-memory event store) beside the kit's
reference models (``domain.testing.billing.ReferenceLedger``,
``domain.testing.usage.ReferenceUsage``, and a claim table). The models' state after
every command is kept with the command's instant. Then, at random instants (each
command's instant, a microsecond either side, before the history, after it, anywhere
between), ``infra.audit.replay.replay`` must give exactly the state after the last
command at or before that instant: every balance, every usage record (start, end,
billed-to, cost) and every live claim (node, allocation, status).

``History`` is also the integration tests' history (``tests/integration/
test_audit_cli.py`` runs one on Postgres and replays it through the command line).
"""

from __future__ import annotations

import copy
import random
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain import placement
from domain.app import Ledgercore
from domain.billing import adjust_balance
from domain.commands import Command
from domain.errors import DomainError
from domain.money import Money
from domain.nodes import register_node
from domain.provenance import CommandContext
from domain.skus import create_sku, set_sku_active
from domain.testing.billing import ReferenceLedger
from domain.testing.usage import ModelRecord, ReferenceUsage
from domain.usage import Meter, close_usage, open_usage, rate_usage, usage_id_for_allocation
from infra.audit.log import as_of_position
from infra.audit.replay import AsOf, replay

T0 = datetime(2026, 3, 1, 12, tzinfo=timezone.utc)
SKU = "bm-audit"
PRICE = 250  # USD minor units per node hour
NODES = 3
US = timedelta(microseconds=1)
NS = uuid.UUID("6d3f1f5e-8a43-4a0e-9d3b-6a7a3c2f0a11")


def render(result: Any) -> dict[str, Any]:
    if isinstance(result, DomainError):
        reason = result.details.get("reason")
        if reason == "balance_out_of_range":
            return {"answer": "out_of_range"}
        return {"answer": result.code, "reason": reason}
    return {"answer": "ok", "result": result}


class History:
    """Commands at chosen instants on ``app``, beside the reference models; ``expected``
    lists (instant, state) after each command."""

    def __init__(self, app: Ledgercore, seed: int = 0):
        self.app, self.clock = app, T0
        self.ids = iter(uuid.uuid5(NS, f"{seed}:{n}") for n in range(10**9))
        self.payers = [next(self.ids) for _ in range(2)]  # admin credits and debits
        self.meterers = [next(self.ids) for _ in range(2)]  # usage charges
        self.ledger, self.usage = ReferenceLedger(), ReferenceUsage()
        self.records: list[uuid.UUID] = []
        self.claims: dict[tuple[str, str], str] = {}  # (node, allocation) -> status
        self.claim_users: dict[str, uuid.UUID] = {}
        self.nodes: list[str] = []
        spec = {"vendor": "nv", "display_name": "audit", "resource_class": "gpu_baremetal",
                "billing_unit": "node_hour", "scheduling_unit": "node",
                "resources": {"allowed_accelerator_counts": [8]},
                "unit_price": {"amount_minor": PRICE, "currency": "USD"}}
        assert self.run(create_sku(self.ctx(), sku=SKU, spec=spec, render=render)) == "ok"
        assert self.run(set_sku_active(self.ctx(), sku=SKU, active=True, render=render)) == "ok"
        for n in range(NODES):
            identity = {"host": f"10.9.0.{n}", "hostname": None, "port": 22,
                        "ssh_username": "ubuntu", "sku": SKU, "gpus_total": 8,
                        "region_code": "r1", "onboarding_mode": "manual"}
            node_id = next(self.ids)
            assert self.run(register_node(self.ctx(), identity=identity, online=True,
                                          node_id=node_id, render=render)) == "ok"
            self.nodes.append(str(node_id))
        self.expected: list[tuple[datetime, dict[str, Any]]] = [(self.clock, self.state())]

    # ---- plumbing ----------------------------------------------------------------------
    def ctx(self) -> CommandContext:
        return CommandContext(actor_id="audit-property", actor_type="system",
                              actor_role="operator", source="admin", now=self.clock)

    def run(self, command: Command) -> str:
        return self.app.execute(command).response["answer"]

    def state(self) -> dict[str, Any]:
        """What the models say now, shaped as ``observed`` gives a replay."""
        balances = {k: v for k, v in self.ledger.balances.items() if v}
        for record in self.usage.records.values():
            key = (record.owner, record.amount_currency)
            balances[key] = balances.get(key, 0) - record.cost
        return {"balances": {k: v for k, v in balances.items() if v},
                "usage": {rid: (r.start, r.end, r.billed_to, r.cost)
                          for rid, r in self.usage.records.items()},
                "claims": dict(self.claims)}

    def placement(self, decide: Any) -> str:
        def run(ctx: CommandContext, session: Any) -> tuple[list[Any], dict[str, Any]]:
            return [decide(session, ctx)], {}
        return self.run(Command(self.ctx(), run, render))

    # ---- steps -------------------------------------------------------------------------
    def step(self, kind: str, a: int, b: int, c: int) -> None:
        getattr(self, kind)(a, b, c)
        self.expected.append((self.clock, self.state()))

    def advance(self, micros: int, _b: int, _c: int) -> None:
        self.clock += timedelta(microseconds=micros)

    def adjust(self, user: int, amount: int, how: int) -> None:
        direction, currency = ("credit", "debit")[how % 2], ("USD", "EUR")[how // 2 % 2]
        owner = self.payers[user % 2]
        got = self.run(adjust_balance(self.ctx(), user_id=owner, direction=direction,
                                      amount=Money(amount, currency), reason="audit",
                                      render=render))
        assert got == self.ledger.adjust(str(owner), direction, amount, currency)

    def open(self, user: int, units: int, back: int) -> None:
        allocation = next(self.ids)
        start = max(T0, self.clock - timedelta(microseconds=back))
        owner = self.meterers[user % 2]
        meter = Meter(usage_source="allocation", allocation_id=allocation,
                      requested_by_user_id=owner, units=units, sku=SKU)
        assert self.run(open_usage(self.ctx(), meter=meter, start_time=start,
                                   render=render)) == "ok"
        record_id = str(usage_id_for_allocation(allocation))
        self.usage.open(record_id, ModelRecord(owner=str(owner), start=start, units=units,
                                               price_minor=PRICE, price_currency="USD",
                                               amount_currency="USD", fx_rate=None))
        self.records.append(uuid.UUID(record_id))

    def rate(self, which: int, back: int, _c: int) -> None:
        if not self.records:
            return
        record = self.records[which % len(self.records)]
        until = max(T0, self.clock - timedelta(microseconds=back))
        assert self.run(rate_usage(self.ctx(), record_id=record, until=until,
                                   render=render)) == "ok"
        self.usage.rate(str(record), until)

    def close(self, which: int, back: int, _c: int) -> None:
        if not self.records:
            return
        record = self.records[which % len(self.records)]
        end = max(self.usage.records[str(record)].start, self.clock - timedelta(microseconds=back))
        assert self.run(close_usage(self.ctx(), record_id=record, end_time=end,
                                    render=render)) == "ok"
        self.usage.close(str(record), end)

    def reserve(self, node: int, user: int, _c: int) -> None:
        node_id, allocation = self.nodes[node % NODES], next(self.ids)
        owner = self.payers[user % 2]
        got = self.placement(lambda session, ctx: placement.reserve(
            session, ctx, allocation_id=allocation, user_id=owner, project_id=owner, sku=SKU,
            node_id=uuid.UUID(node_id)))
        free = not any(node == node_id for node, _ in self.claims)
        assert (got == "ok") == free, (got, free)
        if free:
            self.claims[(node_id, str(allocation))] = "reserved"

    def move(self, which: int, release: int, _c: int) -> None:
        if not self.claims:
            return
        node_id, allocation = sorted(self.claims)[which % len(self.claims)]
        if release % 3 == 0:
            assert self.placement(lambda session, ctx: placement.release(
                session, ctx, node_id=node_id, allocation_id=uuid.UUID(allocation))) == "ok"
            del self.claims[(node_id, allocation)]
            return
        to = {"reserved": "provisioning", "provisioning": "active"}.get(
            self.claims[(node_id, allocation)])
        if to is not None:
            assert self.placement(lambda session, ctx: placement.advance(
                session, ctx, node_id=node_id, allocation_id=uuid.UUID(allocation), to=to)) == "ok"
            self.claims[(node_id, allocation)] = to

    # ---- what the models said at an instant -------------------------------------------
    def at(self, instant: datetime) -> dict[str, Any]:
        state = {"balances": {}, "usage": {}, "claims": {}}
        for when, then in self.expected:
            if when <= instant:
                state = then
        return copy.deepcopy(state)


def observed(state: AsOf) -> dict[str, Any]:
    """A replay's state, shaped as ``History.state``."""
    return {"balances": {k: v for k, v in state.balances().items() if v},
            "usage": {str(r.id): (r.start_time, r.end_time, r.last_billed_at, r.cost_minor)
                      for r in state.records.values()},
            "claims": {(c["node_id"], c["allocation_id"]): c["status"]
                       for c in state.open_claims()}}


STEP_KINDS = ["advance", "advance", "adjust", "adjust", "open", "rate", "close", "reserve",
              "move", "move"]
#: microseconds: zero (commands at one instant), tiny, or up to two hours
MICROS = st.sampled_from([0, 0, 1]) | st.integers(0, 2 * 3600 * 10**6)
steps = st.lists(st.tuples(st.sampled_from(STEP_KINDS), st.integers(0, 10**6), MICROS,
                           st.integers(0, 3)), min_size=1, max_size=25)


def random_steps(rng: random.Random, count: int) -> list[tuple[str, int, int, int]]:
    """``count`` steps drawn like ``steps`` draws them, for a fixed history."""
    return [(rng.choice(STEP_KINDS), rng.randint(0, 10**6),
             rng.choice([0, 1, rng.randint(0, 2 * 3600 * 10**6)]), rng.randint(0, 3))
            for _ in range(count)]


def build(history_steps: list[tuple[str, int, int, int]], seed: int = 0,
          app: Ledgercore | None = None) -> History:
    history = History(app or Ledgercore(env={"PERSISTENCE_MODULE": "eventsourcing.popo"}), seed)
    for kind, a, b, c in history_steps:
        if kind == "advance":
            history.step(kind, b, 0, 0)
        elif kind == "adjust":
            history.step(kind, a, a % 100_000 + 1, c)
        elif kind == "open":
            history.step(kind, c, a % 8 + 1, b)
        else:
            history.step(kind, a, b, c)
    return history


@st.composite
def instants(draw: Any, history: History) -> datetime:
    moments = [when for when, _ in history.expected]
    pick = draw(st.sampled_from(["exact", "exact", "around", "between", "before", "after"]))
    if pick in ("exact", "around"):
        moment = draw(st.sampled_from(moments))
        return moment + (draw(st.sampled_from([-US, US])) if pick == "around" else timedelta())
    if pick == "before":
        return T0 - draw(st.integers(1, 10**9)) * US
    if pick == "after":
        return moments[-1] + draw(st.integers(1, 10**9)) * US
    span = int((moments[-1] - T0) / US)
    return T0 + draw(st.integers(0, max(span, 0))) * US


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history_steps=steps, data=st.data())
def test_replay_at_any_instant_equals_the_reference_models_then(
        history_steps: list[tuple[str, int, int, int]], data: Any) -> None:
    history = build(history_steps)
    for _ in range(4):
        instant = data.draw(instants(history), label="instant")
        got = observed(replay(history.app, instant))
        assert got == history.at(instant), f"as of {instant.isoformat()}"


@settings(max_examples=15, deadline=None)
@given(history_steps=steps, data=st.data())
def test_replay_of_one_account_is_that_account_of_the_whole_replay(
        history_steps: list[tuple[str, int, int, int]], data: Any) -> None:
    history = build(history_steps)
    instant = data.draw(instants(history), label="instant")
    whole = replay(history.app, instant)
    for owner in history.payers + history.meterers:
        mine = replay(history.app, instant, account=owner)
        assert mine.balances() == {k: v for k, v in whole.balances().items()
                                   if k[0] == str(owner)}
        assert set(mine.records) == {k for k, r in whole.records.items() if r.owner == owner}
        assert mine.open_claims() == [c for c in whole.open_claims()
                                      if c["user_id"] == str(owner)]


def test_as_of_is_a_log_position_when_timestamps_are_not_monotonic() -> None:
    """A command decided at t1 but committed after one decided at t2 > t1 (a retried
    command keeps its ``now``): as of t1 the state is the log prefix up to it, which
    holds the t2 command's events too (they were committed first)."""
    app = Ledgercore(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    first, second = uuid.uuid4(), uuid.uuid4()
    t1, t2 = T0, T0 + timedelta(seconds=5)
    for user, at in ((second, t2), (first, t1)):  # t2's command commits first
        ctx = CommandContext(actor_id="x", source="admin", now=at)
        app.execute(adjust_balance(ctx, user_id=user, direction="credit",
                                   amount=Money(10, "USD"), reason="r", render=render))
    assert as_of_position(app, t1 - US) == 0
    assert as_of_position(app, t1) == as_of_position(app, t2) == 4
    assert set(replay(app, t1).balances()) == {(str(first), "USD"), (str(second), "USD")}
    assert replay(app, t1 - US).balances() == {}
