"""Budgets read model: ``budget_policies`` (each policy's current terms) and the spend
they are measured against: ``budget_spend_lines`` (every rated usage line with the org
and project of its usage record, kept in ``budget_usage_records``).

Fed by ``BudgetPolicy`` and ``UsageRecord`` events; read by ``listBillingBudgetPosture``
and ``evaluateBillingBudgetDecision``. A line counts towards a window
``[start, end)`` when its last billed millisecond falls in it
(``start < bill_to ≤ end``), the rule invoices use for months.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg import Cursor
from psycopg.sql import SQL, Identifier

from domain.budgets import BudgetPolicy
from domain.usage import UsageRecord

POLICY_TERMS = ("name", "period", "threshold_percent", "enforcement_mode", "active",
                "starts_at", "ends_at")


class Budgets:
    name = "budgets"
    tables = ("budget_policies", "budget_usage_records", "budget_spend_lines")

    def ddl(self, schema: str) -> list[str]:
        s = f'"{schema}"'
        return [
            f"CREATE TABLE IF NOT EXISTS {s}.budget_policies ("
            " id uuid PRIMARY KEY, org_id uuid NOT NULL, scope_type text NOT NULL,"
            " project_id uuid, department_id uuid NOT NULL, name text NOT NULL,"
            " period text NOT NULL, amount_minor bigint NOT NULL, currency text NOT NULL,"
            " threshold_percent integer NOT NULL, enforcement_mode text NOT NULL,"
            " active boolean NOT NULL, starts_at timestamptz NOT NULL, ends_at timestamptz,"
            " created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL,"
            " notification_id bigint NOT NULL)",
            f"CREATE INDEX IF NOT EXISTS budget_policies_by_org ON {s}.budget_policies"
            " (org_id, scope_type, project_id)",
            f"CREATE TABLE IF NOT EXISTS {s}.budget_usage_records ("
            " id uuid PRIMARY KEY, org_id uuid, project_id uuid, notification_id bigint NOT NULL)",
            f"CREATE TABLE IF NOT EXISTS {s}.budget_spend_lines ("
            " id uuid PRIMARY KEY, org_id uuid NOT NULL, project_id uuid,"
            " currency text NOT NULL, bill_to timestamptz NOT NULL,"
            " amount_minor bigint NOT NULL, rated_at timestamptz NOT NULL,"
            " notification_id bigint NOT NULL)",
            f"CREATE INDEX IF NOT EXISTS budget_spend_by_org ON {s}.budget_spend_lines"
            " (org_id, currency, bill_to)",
            f"CREATE INDEX IF NOT EXISTS budget_spend_by_project ON {s}.budget_spend_lines"
            " (project_id, currency, bill_to)",
        ]

    def apply(self, cur: Cursor[Any], schema: str, event: Any, notification_id: int) -> None:
        s = Identifier(schema)
        if isinstance(event, BudgetPolicy.Created):
            # the terms follow in a Set event of the same command; placeholders until then
            cur.execute(SQL(
                "INSERT INTO {0}.budget_policies VALUES (%s, %s, %s, %s, %s, '', 'monthly',"
                " 1, 'USD', 100, 'notify_only', false, %s, NULL, %s, %s, %s)").format(s),
                (event.originator_id, event.org_id, event.scope_type, event.project_id,
                 event.department_id, event.timestamp, event.timestamp, event.timestamp,
                 notification_id))
        elif isinstance(event, BudgetPolicy.Set):
            cur.execute(SQL(
                "UPDATE {0}.budget_policies SET name = %s, period = %s, amount_minor = %s,"
                " currency = %s, threshold_percent = %s, enforcement_mode = %s, active = %s,"
                " starts_at = %s, ends_at = %s, updated_at = %s, notification_id = %s"
                " WHERE id = %s").format(s),
                (event.name, event.period, event.amount["amount_minor"],
                 event.amount["currency"], event.threshold_percent, event.enforcement_mode,
                 event.active, event.starts_at, event.ends_at, event.timestamp,
                 notification_id, event.originator_id))
            if cur.rowcount != 1:
                raise LookupError(f"budget policy {event.originator_id} is not in the read model")
        elif isinstance(event, UsageRecord.Created):
            cur.execute(SQL("INSERT INTO {0}.budget_usage_records VALUES (%s, %s, %s, %s)")
                        .format(s), (event.originator_id, event.meter.get("org_id"),
                                     event.meter.get("project_id"), notification_id))
        elif isinstance(event, UsageRecord.SliceRated):
            # usage without an org belongs to no tenant and counts against no budget
            cur.execute(SQL(
                "INSERT INTO {0}.budget_spend_lines SELECT %s, r.org_id, r.project_id, %s, %s,"
                " %s, %s, %s FROM {0}.budget_usage_records r"
                " WHERE r.id = %s AND r.org_id IS NOT NULL").format(s),
                (event.rated_usage_line_id, event.amount["currency"], event.bill_to,
                 event.amount["amount_minor"], event.timestamp, notification_id,
                 event.originator_id))


# ---- queries ------------------------------------------------------------------------
def org_policies(cur: Cursor[Any], schema: str, *, org_id: UUID) -> list[dict[str, Any]]:
    """Every policy of the tenant: tenant scope first, then by project, name and id."""
    cur.execute(SQL("SELECT * FROM {0}.budget_policies WHERE org_id = %s ORDER BY"
                    " scope_type DESC, project_id NULLS FIRST, name, id").format(
        Identifier(schema)), (org_id,))
    return [dict(row) for row in cur.fetchall()]


def _scope(policy: dict[str, Any], period: tuple[datetime, datetime]) -> tuple[Any, list[Any]]:
    if policy["scope_type"] == "project":
        clause, params = "org_id = %s AND project_id = %s", [policy["org_id"], policy["project_id"]]
    else:
        clause, params = "org_id = %s", [policy["org_id"]]
    return (SQL(clause + " AND currency = %s AND bill_to > %s AND bill_to <= %s"),
            params + [policy["currency"], period[0], period[1]])


def spend_lines(cur: Cursor[Any], schema: str, policy: dict[str, Any],
                period: tuple[datetime, datetime]) -> list[tuple[datetime, int]]:
    """(rated at, amount) of the lines counting towards the policy in ``period``, in
    rating order: the tenant's (or the project's) usage in the policy's currency."""
    where, params = _scope(policy, period)
    cur.execute(SQL("SELECT rated_at, amount_minor FROM {0}.budget_spend_lines WHERE {1}"
                    " ORDER BY rated_at, notification_id, id").format(Identifier(schema), where),
                params)
    return [(row["rated_at"], row["amount_minor"]) for row in cur.fetchall()]


def spent(cur: Cursor[Any], schema: str, policy: dict[str, Any],
          period: tuple[datetime, datetime]) -> int:
    """What counts towards the policy in ``period``, summed (minor units)."""
    where, params = _scope(policy, period)
    cur.execute(SQL("SELECT coalesce(sum(amount_minor), 0) AS spent"
                    " FROM {0}.budget_spend_lines WHERE {1}").format(Identifier(schema), where),
                params)
    return int(cur.fetchone()["spent"])
