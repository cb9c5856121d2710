"""Read models: one module per read model holding its tables, its projector (event →
rows) and its query functions, plus ``store`` which applies batches of events to
them with the tracking position in the same transaction.

May import: ``domain`` (events and value types only), ``eventsourcing`` and
``psycopg``. Never ``api``, ``consumers`` or ``infra``.
"""

from projections.allocations import Allocations
from projections.apps import Apps
from projections.app_instances import AppInstances
from projections.audit_logs import AuditLogs
from projections.billing_ledger import BillingLedger
from projections.budgets import Budgets
from projections.disputes import Disputes
from projections.finance import FinanceAudit
from projections.inventory import Inventory
from projections.invoices import Invoices
from projections.payments import Payments
from projections.reconciliation import ReconciliationRuns
from projections.refunds import Refunds
from projections.restrictions import Restrictions
from projections.usage import Usage
from projections.workloads import Workloads

#: every read model, in the order a batch applies them
ALL = (BillingLedger(), Payments(), Restrictions(), Inventory(), Usage(), Refunds(),
       Disputes(), ReconciliationRuns(), FinanceAudit(), Invoices(), Budgets(), Allocations(),
       Workloads(), AppInstances(), Apps(), AuditLogs())
BY_NAME = {projection.name: projection for projection in ALL}
