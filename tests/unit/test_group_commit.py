"""The batch writer: one transaction per batch, each command answered on its own."""

from __future__ import annotations

import uuid
from concurrent.futures import Future
from typing import Any

import pytest

from domain.app import Ledgercore
from domain.billing import adjust_balance
from domain.errors import DomainError, IdempotencyKeyReused
from domain.money import Money
from domain.provenance import CommandContext, IdempotencyClaim


def render(result: Any) -> dict[str, Any]:
    return {"answer": result.code if isinstance(result, DomainError) else "ok"}


def command(user: uuid.UUID, direction: str, amount: int, key: str | None = None,
            fingerprint: str = "f") -> Any:
    claim = IdempotencyClaim(key, fingerprint) if key else None
    ctx = CommandContext(actor_id="t", idempotency=claim)
    return adjust_balance(ctx, user_id=user, direction=direction, amount=Money(amount, "USD"),
                          reason="t", render=render)


def run_batch(app: Ledgercore, commands: list[Any]) -> list[Future]:
    pending = [(c, Future()) for c in commands]
    app._write_batch(pending)
    return [future for _, future in pending]


@pytest.fixture
def app() -> Ledgercore:
    return Ledgercore(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})


def test_a_batch_is_one_transaction_and_refusals_do_not_fail_neighbours(app: Ledgercore) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    futures = run_batch(app, [
        command(a, "credit", 100), command(a, "debit", 500), command(a, "debit", 60),
        command(b, "debit", 1), command(b, "credit", 7), command(a, "credit", 1, key="k"),
        command(a, "credit", 1, key="k"), command(a, "credit", 2, key="k", fingerprint="g"),
    ])
    answers = []
    for future in futures:
        try:
            answers.append(future.result().response["answer"])
        except IdempotencyKeyReused:
            answers.append("reused")
    assert answers == ["ok", "insufficient_balance", "ok", "insufficient_balance", "ok",
                       "ok", "ok", "reused"]
    assert futures[6].result().replayed and futures[6].result().position == futures[5].result().position
    assert app.billing_account(a).balances == {"USD": 41}
    assert app.billing_account(b).balances == {"USD": 7}
    assert app.batches == 1
    # every appended event was written by that single save: positions are dense
    positions = sorted(f.result().position for f in futures[:7] if f.result().position)
    assert positions[-1] == app.recorder.max_notification_id()


def test_a_stale_cache_conflicts_and_the_batch_is_decided_again(app: Ledgercore) -> None:
    user = uuid.uuid4()
    run_batch(app, [command(user, "credit", 10)])  # warms the writer's cache
    behind_its_back = app.billing_account(user)
    behind_its_back.adjust(direction="debit", amount=Money(10, "USD"), reason="other",
                           adjustment_id=uuid.uuid4(), provenance={},
                           at=behind_its_back.modified_on)
    app.save(behind_its_back)
    [future] = run_batch(app, [command(user, "debit", 5)])
    assert future.result().response == {"answer": "insufficient_balance"}
    assert app.conflicted_batches == 1
    assert app.billing_account(user).balances == {"USD": 0}


def test_submit_goes_through_the_writer_thread(app: Ledgercore) -> None:
    app.start_batching()
    try:
        user = uuid.uuid4()
        futures = [app.submit(command(user, "credit", 1)) for _ in range(200)]
        assert all(f.result(timeout=30).response == {"answer": "ok"} for f in futures)
        assert app.billing_account(user).balances == {"USD": 200}
        assert app.batches <= 200 and app.batched_commands == 200
    finally:
        app.stop_batching()


def test_a_refusal_is_never_decided_from_a_stale_cache(app: Ledgercore) -> None:
    user = uuid.uuid4()
    run_batch(app, [command(user, "credit", 10)])  # warms the writer's cache at 10
    behind_its_back = app.billing_account(user)
    behind_its_back.adjust(direction="credit", amount=Money(5, "USD"), reason="other",
                           adjustment_id=uuid.uuid4(), provenance={},
                           at=behind_its_back.modified_on)
    app.save(behind_its_back)  # the store says 15, the cache still 10
    [future] = run_batch(app, [command(user, "debit", 15)])
    assert future.result().response == {"answer": "ok"}
    assert app.billing_account(user).balances == {"USD": 0}


def test_a_batch_that_fails_before_its_save_leaves_nothing_behind(
        app: Ledgercore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store fails while a batch is being decided (here: the freshness check behind
    a refusal), after an earlier command of the batch changed the cached account. That
    change was never saved and must not be saved by a later batch: the client retries
    the command with its key and it is applied exactly once."""
    from eventsourcing.persistence import OperationalError

    user = uuid.uuid4()
    run_batch(app, [command(user, "credit", 100)])[0].result()

    def store_down(session: Any) -> bool:
        raise OperationalError("the event store went away")

    monkeypatch.setattr(app, "_still_current", store_down)
    with pytest.raises(OperationalError):
        run_batch(app, [command(user, "credit", 10, key="a"), command(user, "debit", 10**9)])
    monkeypatch.undo()

    assert run_batch(app, [command(user, "credit", 1)])[0].result().response == {"answer": "ok"}
    retried = run_batch(app, [command(user, "credit", 10, key="a")])[0].result()
    assert retried.response == {"answer": "ok"} and not retried.replayed
    assert app.billing_account(user).balances == {"USD": 111}
    stored = app.recorder.select_events(app.billing_account(user).id)
    assert [e.originator_version for e in stored] == list(range(1, len(stored) + 1))


def credit_then_refuse(user: uuid.UUID, other: uuid.UUID) -> Any:
    """A command that changes two accounts (one it opens) and then refuses."""
    from domain.billing import BillingAccount, account_id_for
    from domain.commands import Command

    def decide(ctx: CommandContext, session: Any) -> tuple[list[Any], dict[str, Any]]:
        account = session.get(account_id_for(user))
        account.adjust(direction="credit", amount=Money(1_000, "USD"), reason="half-done",
                       adjustment_id=uuid.uuid4(), provenance=ctx.provenance(), at=ctx.now)
        assert session.get(account_id_for(other)) is None
        opened = BillingAccount.open(other, "USD", ctx.provenance(), ctx.now)
        session.loaded[opened.id] = opened
        raise DomainError("refused after changing two accounts")

    return Command(ctx=CommandContext(actor_id="t"), decide=decide, render=render,
                   reads=(account_id_for(other),))


@pytest.mark.parametrize("warm", [False, True])
def test_a_refused_command_leaves_no_trace_beside_earlier_commands_of_its_batch(
        app: Ledgercore, warm: bool) -> None:
    user, other = uuid.uuid4(), uuid.uuid4()
    run_batch(app, [command(user, "credit", 10)] + ([command(user, "credit", 1)] if warm else []))
    futures = run_batch(app, [command(user, "credit", 5), credit_then_refuse(user, other),
                              command(user, "debit", 7), command(user, "credit", 2)])
    assert [f.result().response["answer"] for f in futures] == [
        "ok", "invalid_request", "ok", "ok"]
    expected = 10 + (1 if warm else 0) + 5 - 7 + 2
    assert app.billing_account(user).balances == {"USD": expected}
    assert app.billing_account(other) is None
    # and what the writer keeps warm is what the store holds
    assert app.cache.get(app.billing_account(user).id).balances == {"USD": expected}
    [after] = run_batch(app, [command(user, "debit", expected)])
    assert after.result().response == {"answer": "ok"}
    assert app.billing_account(user).balances == {"USD": 0}
