"""The write side of ledgercore: aggregates, their events and the command handlers.

May import: the standard library and ``eventsourcing`` (``app.py`` also uses
``psycopg.sql`` for two batched queries on the library's event table). Nothing of ours:
``projections``, ``consumers``, ``api`` and ``infra`` depend on this package, never
the other way round. Importing the package registers every event class under its
stable topic, so stored events always resolve.
"""

from domain import (allocations, billing, disputes, idempotency, inventory, payments,  # noqa: F401
                    refunds, restrictions, skus, usage)  # (importing them registers their stable topics)
from domain import reconciliation  # noqa: F401,E402
from domain import budgets, invoices  # noqa: F401,E402
from domain import app_instances, apps  # noqa: F401,E402
