"""The kit's invariants can fail: with the test-only fault flag
``LEDGERCORE_FAULT_DOUBLE_APPLY`` naming an event type, ledgercore records (and
applies) every event of that type twice, and ``LedgercoreMachine`` must find it, for
each event type the machine's commands produce. Without the flag it finds nothing."""

from __future__ import annotations

import pytest
from hypothesis import Phase

from domain.faults import DOUBLE_APPLY
from ledgercore_testing import InProcessLedgercore, LedgercoreMachine

SETTINGS = {"max_examples": 200, "stateful_step_count": 20, "database": None,
            "phases": (Phase.generate,), "report_multiple_bugs": False}


@pytest.mark.parametrize("event_type", ["BalanceAdjusted", "ledgercore.PaymentCredited"])
def test_a_double_applied_event_type_is_caught(event_type: str) -> None:
    broken = InProcessLedgercore(env={DOUBLE_APPLY: event_type})
    try:
        assert broken.app.fault_double_apply == event_type
        with pytest.raises(AssertionError):
            LedgercoreMachine.run(broken, **SETTINGS)
    finally:
        broken.close()


def test_the_fault_is_off_by_default() -> None:
    sound = InProcessLedgercore()
    try:
        assert sound.app.fault_double_apply is None
        LedgercoreMachine.run(sound, **SETTINGS)
    finally:
        sound.close()


def test_the_served_ledgercore_reads_the_flag_from_its_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The real service's application takes the flag from the process environment."""
    from domain.app import Ledgercore

    monkeypatch.setenv(DOUBLE_APPLY, "BalanceAdjusted")
    app = Ledgercore(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    assert app.fault_double_apply == "BalanceAdjusted"
