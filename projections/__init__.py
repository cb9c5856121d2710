"""Read models: one module per read model holding its tables, its projector (event →
rows) and its query functions, plus ``store`` which applies batches of events to
them with the tracking position in the same transaction.

May import: ``domain`` (events and value types only), ``eventsourcing`` and
``psycopg``. Never ``api``, ``consumers`` or ``infra``.
"""

from projections.billing_ledger import BillingLedger
from projections.disputes import Disputes
from projections.inventory import Inventory
from projections.payments import Payments
from projections.refunds import Refunds
from projections.restrictions import Restrictions
from projections.usage import Usage

#: every read model, in the order a batch applies them
ALL = (BillingLedger(), Payments(), Restrictions(), Inventory(), Usage(), Refunds(),
       Disputes())
BY_NAME = {projection.name: projection for projection in ALL}
