"""ledgercore's property-based testing kit, for suites that build on ledgercore.

- ``strategies``: Hypothesis strategies for valid and deliberately invalid commands of
  every area (``domain.testing.strategies``);
- reference models and ``check_invariants(model, live)`` per aggregate family
  (``billing``, ``payments``, ``refunds``, ``usage``, ``invoices``, ``inventory``,
  ``allocations``, ``app_instances``) and for the whole system (``system``): the very
  modules ledgercore's own property suites use (``domain.testing``);
- ``LedgercoreMachine``: a ready ``RuleBasedStateMachine`` to subclass;
- ``InProcessLedgercore`` / ``ServedLedgercore`` and ``Tokens``: a running ledgercore;
  the pytest plugin (``ledgercore_testing.plugin``, registered as the ``pytest11``
  entry point ``ledgercore``) hands them out as fixtures.

This package is the stable import name; ``docs/testing-kit.md`` is its manual.
May import: ``domain``, ``api``, ``infra`` (the service's edge) and ``hypothesis``.
"""

from __future__ import annotations

from domain.testing import (allocations, app_instances, billing, inventory, invoices, payments,
                            refunds, strategies, system, usage)
from ledgercore_testing.machine import LedgercoreMachine
from ledgercore_testing.running import (InProcessLedgercore, RunningLedgercore, ServedLedgercore,
                                        Tokens)

__all__ = ["allocations", "app_instances", "billing", "inventory", "invoices", "payments",
           "refunds", "strategies", "system", "usage", "LedgercoreMachine",
           "InProcessLedgercore", "RunningLedgercore", "ServedLedgercore", "Tokens"]
