"""The billing account under random credits, debits and idempotent replays, checked
after every step against the kit's reference model (``domain.testing.billing``).

``InMemoryBillingMachine`` runs on the library's in-memory persistence (fast, many
examples); ``PostgresBillingMachine`` runs the same rules on the real event store and
also checks the read model, kept by a direct projector the machine restarts mid-run."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import Future
from datetime import timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from consumers.direct import SOURCE, DirectProjector, catch_up
from domain.app import Ledgercore
from domain.billing import account_id_for, adjust_balance, verify_chain
from domain.canonical import canonical_json
from domain.errors import DomainError, IdempotencyKeyReused
from domain.money import INT64_MAX, Money
from domain.provenance import CommandContext, IdempotencyClaim
from domain.testing.billing import ReferenceLedger, check_invariants, observe
from domain.testing.strategies import amounts, currencies

KEYS = [f"key-{n}" for n in range(4)]
AMOUNTS = st.one_of(amounts(10**6), st.integers(INT64_MAX // 2, INT64_MAX))


def render(result: Any) -> dict[str, Any]:
    if isinstance(result, DomainError):
        if result.details.get("reason") == "balance_out_of_range":
            return {"answer": "out_of_range"}
        return {"answer": result.code}
    return {"answer": "ok"}


class BillingMachine(RuleBasedStateMachine):
    def make_app(self) -> Ledgercore:
        raise NotImplementedError

    def __init__(self) -> None:
        super().__init__()
        self.app = self.make_app()
        self.model = ReferenceLedger()
        self.users = [uuid.uuid4() for _ in range(3)]
        self.sent: dict[str, tuple[Any, ...]] = {}

    def send(self, user: uuid.UUID, direction: str, amount: int, currency: str,
             key: str | None) -> str:
        fingerprint = canonical_json([str(user), direction, amount, currency]).decode()
        claim = IdempotencyClaim(f"{self.users[0]}:{key}", fingerprint) if key else None
        ctx = CommandContext(actor_id="property", actor_role="admin", source="admin",
                             idempotency=claim)
        try:
            outcome = self.app.execute(adjust_balance(
                ctx, user_id=user, direction=direction, amount=Money(amount, currency),
                reason="p", render=render))
            answer = outcome.response["answer"]
        except IdempotencyKeyReused:
            answer = "key_reused"
        expected = self.model.adjust(str(user), direction, amount, currency, key, fingerprint)
        assert answer == expected
        return answer

    @rule(n=st.integers(0, 2), direction=st.sampled_from(["credit", "debit"]),
          amount=AMOUNTS, currency=currencies(), key=st.none() | st.sampled_from(KEYS))
    def adjust(self, n: int, direction: str, amount: int, currency: str, key: str | None) -> None:
        self.send(self.users[n], direction, amount, currency, key)
        if key and key not in self.sent:
            self.sent[key] = (self.users[n], direction, amount, currency)

    @rule(key=st.sampled_from(KEYS))
    def replay(self, key: str) -> None:
        if key in self.sent:
            before = self.app.recorder.max_notification_id()
            self.send(*self.sent[key], key)
            assert self.app.recorder.max_notification_id() == before

    @invariant()
    def aggregates_agree_with_the_model(self) -> None:
        check_invariants(self.model, observe(self.app, self.users))


class InMemoryBillingMachine(BillingMachine):
    def make_app(self) -> Ledgercore:
        return Ledgercore(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})


TestInMemoryBilling = InMemoryBillingMachine.TestCase
TestInMemoryBilling.settings = settings(max_examples=500, stateful_step_count=30, deadline=None)


@pytest.fixture(scope="module")
def pg_stores(shared_database: Any, services: Any) -> Any:
    from infra.db import Stores
    from tests.conftest import make_settings

    stores = Stores.open(make_settings(services, shared_database.dsn, run_projector=False))
    yield stores
    stores.close()


def caught_up(stores: Any, timeout: float = 15.0) -> None:
    """Wait until the running projector has applied everything the log holds now."""
    head = stores.app.recorder.max_notification_id() or 0
    deadline = time.monotonic() + timeout
    while min(stores.read_models.tracked(p.name, SOURCE)
              for p in stores.read_models.projections) < head:
        assert time.monotonic() < deadline, "the projector did not catch up"
        time.sleep(0.02)


def test_postgres_billing_machine_and_read_model(pg_stores: Any, shared_database: Any) -> None:
    """The read model is kept by a real direct projector that the machine stops and
    restarts between (and so around) commands, or by a catch-up while it is stopped:
    after each step it equals the reference model either way."""

    class PostgresBillingMachine(BillingMachine):
        def make_app(self) -> Ledgercore:
            return pg_stores.app

        def __init__(self) -> None:
            super().__init__()
            self.projector: DirectProjector | None = None

        def teardown(self) -> None:
            if self.projector is not None:
                self.projector.stop()

        @rule(run=st.booleans())
        def restart_projector(self, run: bool) -> None:
            if self.projector is not None:
                self.projector.stop()
                self.projector = None
            if run:
                self.projector = DirectProjector(pg_stores.app, pg_stores.read_models,
                                                 shared_database.dsn, idle_seconds=0.05).start()

        @invariant()
        def read_model_agrees_after_catch_up(self) -> None:
            if self.projector is None:
                catch_up(pg_stores.app, pg_stores.read_models)
            else:
                self.projector.poke()
                caught_up(pg_stores)
            users = [u for u in self.users]
            with pg_stores.query_pool.connection() as conn:
                rows = conn.execute(
                    "SELECT * FROM readmodels.ledger_entries WHERE owner_user_id = ANY(%s)"
                    " ORDER BY account_id, seq", (users,)).fetchall()
                balances = {(str(r["owner_user_id"]), r["currency"]): r["amount_minor"]
                            for r in conn.execute(
                                "SELECT * FROM readmodels.balances WHERE owner_user_id = ANY(%s)",
                                (users,))}
            problems = []
            for user in users:
                mine = [dict(r, occurred_at=r["occurred_at"].astimezone(timezone.utc))
                        for r in rows if r["owner_user_id"] == user]
                problems += verify_chain(account_id_for(user), mine)
            check_invariants(self.model, {
                "balances": balances,
                "entries": [(str(r["owner_user_id"]), r["currency"], r["amount_minor"]) for r in rows],
                "chain_problems": problems})

    run = PostgresBillingMachine.TestCase
    run.settings = settings(max_examples=12, stateful_step_count=15, deadline=None,
                            suppress_health_check=list(HealthCheck))
    run().runTest()


class GroupCommitMachine(InMemoryBillingMachine):
    """Batches of commands through the batch writer (one transaction each) must
    answer every command exactly as running them one by one would, whatever refusals,
    key replays or key conflicts share the batch, and even when another writer has
    made the writer's cached aggregates stale."""

    def __init__(self) -> None:
        super().__init__()
        self.app.start_batching()

    def teardown(self) -> None:
        self.app.stop_batching()

    @rule(commands=st.lists(st.tuples(
        st.integers(0, 2), st.sampled_from(["credit", "debit"]), AMOUNTS, currencies(),
        st.none() | st.sampled_from(KEYS)), min_size=1, max_size=12))
    def batch(self, commands: list[tuple[Any, ...]]) -> None:
        futures = []
        expected = []
        for n, direction, amount, currency, key in commands:
            user = self.users[n]
            fingerprint = canonical_json([str(user), direction, amount, currency]).decode()
            claim = IdempotencyClaim(f"{self.users[0]}:{key}", fingerprint) if key else None
            ctx = CommandContext(actor_id="property", actor_role="admin", source="admin",
                                 idempotency=claim)
            futures.append(adjust_balance(ctx, user_id=user, direction=direction,
                                          amount=Money(amount, currency), reason="p",
                                          render=render))
            expected.append(self.model.adjust(str(user), direction, amount, currency, key,
                                              fingerprint))
            if key and key not in self.sent:
                self.sent[key] = (user, direction, amount, currency)
        # queue the whole list before the writer wakes, so it lands in one batch
        pending = [(command, Future()) for command in futures]
        self.app._write_batch(pending)
        for (_, future), want in zip(pending, expected):
            try:
                got = future.result(timeout=10).response["answer"]
            except IdempotencyKeyReused:
                got = "key_reused"
            assert got == want

    @rule(n=st.integers(0, 2), amount=amounts(10**6))
    def foreign_write(self, n: int, amount: int) -> None:
        """Another process credits the account behind the batch writer's back."""
        account = self.app.billing_account(self.users[n])
        if account is None:
            return
        try:
            account.adjust(direction="credit", amount=Money(amount, "USD"), reason="other",
                           adjustment_id=uuid.uuid4(), provenance={}, at=account.modified_on)
        except DomainError:
            return  # would leave the int64 range: the other writer was refused too
        self.app.save(account)
        self.model.adjust(str(self.users[n]), "credit", amount, "USD")


TestGroupCommit = GroupCommitMachine.TestCase
TestGroupCommit.settings = settings(max_examples=500, stateful_step_count=20, deadline=None)
