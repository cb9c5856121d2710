"""Outcomes handed from the batch writer's thread to the event loop (``api.commands.Answers``)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from types import SimpleNamespace
from typing import Any

import pytest

from api.commands import Answers, answers
from domain.app import Ledgercore
from domain.billing import adjust_balance
from domain.errors import DomainError
from domain.money import Money
from domain.provenance import CommandContext


def command(user: uuid.UUID, direction: str, amount: int) -> Any:
    def render(result: Any) -> dict[str, Any]:
        return {"answer": result.code if isinstance(result, DomainError) else "ok"}

    return adjust_balance(CommandContext(actor_id="t"), user_id=user, direction=direction,
                          amount=Money(amount, "USD"), reason="t", render=render)


def test_every_command_gets_its_own_outcome_from_the_writer_thread() -> None:
    app = Ledgercore(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    app.start_batching()
    users = [uuid.uuid4() for _ in range(20)]

    async def main() -> list[Any]:
        box = Answers(asyncio.get_running_loop())
        waiting = []
        for round_ in range(25):
            for user in users:
                future, ticket = box.ticket()
                # every fifth debit is more than the account holds: refused alone
                direction = "debit" if round_ % 5 == 4 else "credit"
                app.submit(command(user, direction, 10_000 if direction == "debit" else 3), ticket)
                waiting.append((user, direction, future))
        return [(user, direction, await future) for user, direction, future in waiting]

    try:
        results = asyncio.run(main())
    finally:
        app.stop_batching()
    assert len(results) == 500
    for user, direction, outcome in results:
        assert outcome.response["answer"] == ("ok" if direction == "credit" else "insufficient_balance")
    for user in users:
        assert app.billing_account(user).balances == {"USD": 3 * 20}
    assert app.batches < 500  # the writer took several commands per transaction


def test_an_error_is_raised_by_its_own_future_and_a_cancelled_one_is_skipped() -> None:
    async def main() -> tuple[Any, Any]:
        box = Answers(asyncio.get_running_loop())
        failing, failing_ticket = box.ticket()
        gone, gone_ticket = box.ticket()
        fine, fine_ticket = box.ticket()
        gone.cancel()
        assert not (failing_ticket.done() or gone_ticket.done() or fine_ticket.done())

        def writer() -> None:
            failing_ticket.set_exception(RuntimeError("refused"))
            gone_ticket.set_result("late")
            fine_ticket.set_result("answer")

        threading.Thread(target=writer).start()
        with pytest.raises(RuntimeError, match="refused"):
            await failing
        answer = await fine
        assert failing_ticket.done() and gone_ticket.done() and fine_ticket.done()
        return gone.cancelled(), answer

    assert asyncio.run(main()) == (True, "answer")


def test_an_app_keeps_one_answers_per_event_loop() -> None:
    app = SimpleNamespace(state=SimpleNamespace())

    async def one() -> Answers:
        first = answers(app)
        assert answers(app) is first
        return first

    assert asyncio.run(one()) is not asyncio.run(one())
