"""Read models: one module per read model holding its tables, its projector (event →
rows) and its query functions, plus ``store`` which applies batches of events to
them with the tracking position in the same transaction.

May import: ``domain`` (events and value types only), ``eventsourcing`` and
``psycopg``. Never ``api``, ``consumers`` or ``infra``.
"""

from projections.billing_ledger import BillingLedger
from projections.inventory import Inventory
from projections.payments import Payments
from projections.restrictions import Restrictions

#: every read model, in the order a batch applies them
ALL = (BillingLedger(), Payments(), Restrictions(), Inventory())
BY_NAME = {projection.name: projection for projection in ALL}
