"""Finance evidence read model and the cross-read-model queries of the finance views.

``finance_audit`` holds one row per finance event (``BillingAuditEvidence``), made from
the event's provenance: who (actor, role), what (action), on what (target), when, and
under which correlation id. A ledger event's target is its entry (``ledger_entry``), any
other event's its aggregate. Refusals append nothing, so every row's ``result`` is
``succeeded``. Internal bookkeeping aggregates (open-usage index, refundable funds,
payment links, idempotency records) and non-finance domains are left out.

The queries below also read the ``payments``, ``refunds``, ``usage``,
``billing_ledger``, ``disputes``, ``restrictions`` and ``reconciliation`` tables: the
billing diagnostics by correlation id and the V3 platform finance views join them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from psycopg import Cursor
from psycopg.sql import SQL, Composed, Identifier

from domain.audit_actions import actor_user_id
from domain.audit_actions import snake as _snake

NAMESPACE = uuid5(NAMESPACE_URL, "https://ledgercore.invalid/finance-audit")
#: aggregate class name -> the target type its events name
TARGET_TYPES = {"BillingAccount": "billing_account", "PaymentSession": "payment_session",
                "ProviderEventInbox": "provider_event", "Refund": "refund",
                "PaymentDispute": "payment_dispute", "UsageRecord": "usage_record",
                "FinancialRestriction": "financial_restriction",
                "ReconciliationRun": "reconciliation_run"}
#: modules whose every aggregate with provenance is finance evidence too
FINANCE_MODULES = ("domain.invoices", "domain.budgets")
#: activity ``source`` of each target type (anything else is ``audit``)
ACTIVITY_SOURCES = {"ledger_entry": "ledger", "payment_session": "payment_session",
                    "refund": "refund"}
#: payment sessions an operator must look at, and why
ATTENTION = {"failed_reconcile": "credit_failed_reconcile",
             "checkout_completed": "checkout_completed_not_credited"}
#: V3 raw session list: sort field -> SQL expression (a session never credited sorts as
#: credited_amount -1, below every amount)
SESSION_SORTS = {"id": "id", "created_at": "created_at", "initiated_at": "initiated_at",
                 "status": "status", "requested_amount": "requested_amount_minor",
                 "credited_amount": "COALESCE(credited_amount_minor, -1)"}


def _target(event: Any) -> tuple[str, UUID] | None:
    """(target type, target id) when ``event`` is finance evidence, else None."""
    if not isinstance(getattr(event, "provenance", None), dict):
        return None
    root = type(event).__qualname__.split(".")[0]
    target_type = TARGET_TYPES.get(root)
    if target_type is None and type(event).__module__ in FINANCE_MODULES:
        target_type = _snake(root)
    if target_type is None:
        return None
    if target_type == "billing_account" and hasattr(event, "entry_id"):
        return "ledger_entry", event.entry_id
    return target_type, event.originator_id


def audit_row(event: Any, notification_id: int) -> tuple[Any, ...] | None:
    target = _target(event)
    if target is None:
        return None
    provenance = event.provenance
    actor = actor_user_id(provenance)
    if target[0] == "ledger_entry":
        action = event.entry_type
    else:
        action = _snake(getattr(type(event), "TOPIC", type(event).__name__).rpartition(".")[2])
    return (uuid5(NAMESPACE, f"{event.originator_id}:{event.originator_version}"),
            provenance.get("correlation_id") or "", actor,
            provenance.get("actor_role") or "system", action, target[0], target[1],
            "succeeded", event.timestamp, notification_id)


class FinanceAudit:
    name = "finance"
    tables = ("finance_audit",)

    def ddl(self, schema: str) -> list[str]:
        s = f'"{schema}"'
        return [
            f"CREATE TABLE IF NOT EXISTS {s}.finance_audit ("
            " id uuid PRIMARY KEY, correlation_id text NOT NULL, actor_user_id uuid,"
            " actor_role text NOT NULL, action text NOT NULL, target_type text NOT NULL,"
            " target_id uuid NOT NULL, result text NOT NULL, occurred_at timestamptz NOT NULL,"
            " notification_id bigint NOT NULL)",
            f"CREATE INDEX IF NOT EXISTS finance_audit_correlation ON {s}.finance_audit"
            " (correlation_id, occurred_at, id)",
            f"CREATE INDEX IF NOT EXISTS finance_audit_target ON {s}.finance_audit (target_id)",
            f"CREATE INDEX IF NOT EXISTS finance_audit_recent ON {s}.finance_audit"
            " (occurred_at DESC, id DESC)",
            # diagnostics look other read models' rows up by correlation id (their
            # tables exist by now: this read model comes after them in ``ALL``)
            f"CREATE INDEX IF NOT EXISTS ledger_entries_correlation ON {s}.ledger_entries"
            " (correlation_id)",
            f"CREATE INDEX IF NOT EXISTS payment_sessions_correlation ON {s}.payment_sessions"
            " (correlation_id)",
            f"CREATE INDEX IF NOT EXISTS refunds_correlation ON {s}.refunds (correlation_id)",
        ]

    def apply(self, cur: Cursor[Any], schema: str, event: Any, notification_id: int) -> None:
        row = audit_row(event, notification_id)
        if row is not None:
            self._insert(cur, schema, [row])

    def apply_many(self, cur: Cursor[Any], schema: str, items: Any) -> None:
        rows = [row for item in items
                if (row := audit_row(item.event, item.notification_id)) is not None]
        if rows:
            self._insert(cur, schema, rows)

    @staticmethod
    def _insert(cur: Cursor[Any], schema: str, rows: list[tuple[Any, ...]]) -> None:
        """One ``COPY`` per batch (a batch is applied once: its tracking position is
        written in the same transaction)."""
        with cur.copy(SQL("COPY {0}.finance_audit FROM STDIN").format(Identifier(schema))) as copy:
            for row in rows:
                copy.write_row(row)


# ---- rows as the contract's JSON -------------------------------------------------------
def iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def audit_json(row: dict[str, Any]) -> dict[str, Any]:
    """A ``finance_audit`` row as the contract's ``BillingAuditEvidence``."""
    return {"id": str(row["id"]),
            "actor_user_id": None if row["actor_user_id"] is None else str(row["actor_user_id"]),
            "actor_role": row["actor_role"], "action": row["action"],
            "target_type": row["target_type"], "target_id": str(row["target_id"]),
            "result": row["result"], "correlation_id": row["correlation_id"],
            "occurred_at": iso(row["occurred_at"])}


def ledger_entry_json(row: dict[str, Any]) -> dict[str, Any]:
    """A ``ledger_entries`` row as the contract's ``BillingLedgerEntry`` (signed amount)."""
    return {"id": str(row["entry_id"]), "user_id": str(row["owner_user_id"]),
            "entry_type": row["entry_type"],
            "amount": {"amount_minor": row["amount_minor"], "currency": row["currency"]},
            "reference_type": row["reference_type"], "reference_id": row["reference_id"],
            "created_at": iso(row["occurred_at"])}


# ---- diagnostics -----------------------------------------------------------------------
def _select(cur: Cursor[Any], query: Composed, params: tuple[Any, ...]) -> list[dict[str, Any]]:
    cur.execute(query, params)
    return [dict(row) for row in cur.fetchall()]


def diagnostics(cur: Cursor[Any], schema: str, correlation_id: str, limit: int
                ) -> dict[str, list[dict[str, Any]]]:
    """Rows tagged with ``correlation_id``: created under it, or changed by an event
    carrying it (payment sessions, refunds, usage records); ledger entries and audit
    evidence carrying it. Each list oldest first, at most ``limit`` rows."""
    s = Identifier(schema)
    targets = SQL("SELECT target_id FROM {0}.finance_audit WHERE correlation_id = %s"
                  " AND target_type = %s").format(s)
    found = {}
    for key, table, order in (("payment_sessions", "payment_sessions", "created_at"),
                              ("refunds", "refunds", "created_at"),
                              ("usage_records", "usage_records", "start_time")):
        own = SQL("correlation_id = %s OR ") if table != "usage_records" else SQL("")
        params = (correlation_id,) if table != "usage_records" else ()
        found[key] = _select(cur, SQL(
            "SELECT * FROM {0}.{1} WHERE {2}id IN ({3}) ORDER BY {4}, id LIMIT %s").format(
            s, Identifier(table), own, targets, Identifier(order)),
            (*params, correlation_id, {"payment_sessions": "payment_session", "refunds": "refund",
                                       "usage_records": "usage_record"}[key], limit))
    found["ledger_entries"] = _select(cur, SQL(
        "SELECT * FROM {0}.ledger_entries WHERE correlation_id = %s"
        " ORDER BY occurred_at, entry_id LIMIT %s").format(s), (correlation_id, limit))
    found["audit_logs"] = _select(cur, SQL(
        "SELECT * FROM {0}.finance_audit WHERE correlation_id = %s"
        " ORDER BY occurred_at, id LIMIT %s").format(s), (correlation_id, limit))
    return found


# ---- V3 platform finance -----------------------------------------------------------------
def list_payment_sessions(cur: Cursor[Any], schema: str, *, user_id: UUID | None = None,
                          status: str | None = None, correlation_id: str | None = None,
                          since: datetime | None = None, until: datetime | None = None,
                          sort: str = "created_at_desc", after: tuple[Any, UUID] | None = None,
                          limit: int) -> list[dict[str, Any]]:
    """Payment sessions in ``sort`` order (``<field>_<asc|desc>``, ties by id the same
    way); each row carries its ``sort_value``; ``after`` is the last (value, id) seen."""
    field, _, direction = sort.rpartition("_")
    expression = SQL(SESSION_SORTS[field])  # a constant of this module, never input
    where: list[Composed | SQL] = [SQL("TRUE")]
    params: list[Any] = []
    for name, op, value in (("initiated_by_user_id", "=", user_id), ("status", "=", status),
                            ("correlation_id", "=", correlation_id),
                            ("created_at", ">=", since), ("created_at", "<=", until)):
        if value is not None:
            where.append(SQL("{0} " + op + " %s").format(Identifier(name)))
            params.append(value)
    if after is not None:
        op = "<" if direction == "desc" else ">"
        if field == "id":
            where.append(SQL("id " + op + " %s"))
            params.append(after[1])
        else:
            where.append(SQL("({0}, id) " + op + " (%s, %s)").format(expression))
            params += [after[0], after[1]]
    order = SQL("DESC" if direction == "desc" else "ASC")
    return _select(cur, SQL("SELECT *, {2} AS sort_value FROM {0}.payment_sessions WHERE {1}"
                            " ORDER BY {2} {3}, id {3} LIMIT %s").format(
        Identifier(schema), SQL(" AND ").join(where), expression, order), (*params, limit))


def payment_session_row(cur: Cursor[Any], schema: str, session_id: UUID
                        ) -> dict[str, Any] | None:
    rows = _select(cur, SQL("SELECT * FROM {0}.payment_sessions WHERE id = %s").format(
        Identifier(schema)), (session_id,))
    return rows[0] if rows else None


def counts(cur: Cursor[Any], schema: str) -> dict[str, int]:
    """The figures behind the finance KPIs."""
    s = Identifier(schema)
    cur.execute(SQL(
        "SELECT (SELECT count(*) FROM {0}.payment_sessions) AS sessions,"
        " (SELECT count(*) FROM {0}.payment_sessions WHERE status IN"
        "  ('initiated', 'checkout_completed')) AS sessions_open,"
        " (SELECT count(*) FROM {0}.payment_sessions WHERE status IN"
        "  ('failed_reconcile', 'checkout_completed')) AS sessions_attention,"
        " (SELECT count(*) FROM {0}.refunds WHERE status = 'accepted') AS refunds_pending,"
        " (SELECT count(*) FROM {0}.payment_disputes WHERE status NOT IN"
        "  ('won', 'lost', 'closed')) AS disputes_open,"
        " (SELECT count(*) FROM {0}.financial_restrictions WHERE state <> 'healthy')"
        "  AS restrictions_active").format(s))
    return {k: int(v) for k, v in dict(cur.fetchone()).items()}


def sessions_needing_attention(cur: Cursor[Any], schema: str, limit: int) -> list[dict[str, Any]]:
    return _select(cur, SQL("SELECT * FROM {0}.payment_sessions WHERE status = ANY(%s)"
                            " ORDER BY created_at DESC, id DESC LIMIT %s").format(
        Identifier(schema)), (list(ATTENTION), limit))


def active_restrictions(cur: Cursor[Any], schema: str, limit: int) -> list[dict[str, Any]]:
    return _select(cur, SQL("SELECT * FROM {0}.financial_restrictions WHERE state <> 'healthy'"
                            " ORDER BY updated_at DESC, id DESC LIMIT %s").format(
        Identifier(schema)), (limit,))


def activity(cur: Cursor[Any], schema: str, *, limit: int,
             payment_session: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Recent evidence, newest first, with the user and amount of what it touched
    (ledger entry, payment session or refund). With ``payment_session``: only what
    concerns it (its events, its correlation, its credit entry, refunds naming it)."""
    s = Identifier(schema)
    where, params = SQL("TRUE"), []
    if payment_session is not None:
        where = SQL("(a.target_id = %s OR a.correlation_id = %s OR a.target_id = %s"
                    " OR a.target_id IN (SELECT id FROM {0}.refunds"
                    " WHERE payment_reference = %s))").format(s)
        params = [payment_session["id"], payment_session["correlation_id"],
                  payment_session["ledger_entry_id"], str(payment_session["id"])]
    return _select(cur, SQL(
        "SELECT a.*, COALESCE(e.owner_user_id, p.initiated_by_user_id, r.user_id) AS user_id,"
        " COALESCE(e.amount_minor, p.credited_amount_minor, p.requested_amount_minor,"
        "  r.amount_minor) AS amount_minor,"
        " COALESCE(e.currency, p.credited_currency, p.requested_currency, r.currency) AS currency"
        " FROM {0}.finance_audit a"
        " LEFT JOIN {0}.ledger_entries e ON a.target_type = 'ledger_entry'"
        "  AND e.entry_id = a.target_id"
        " LEFT JOIN {0}.payment_sessions p ON a.target_type = 'payment_session'"
        "  AND p.id = a.target_id"
        " LEFT JOIN {0}.refunds r ON a.target_type = 'refund' AND r.id = a.target_id"
        " WHERE {1} ORDER BY a.occurred_at DESC, a.id DESC LIMIT %s").format(s, where),
        (*params, limit))
