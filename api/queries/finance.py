"""V3 platform finance read models: ``getV3PlatformFinance``,
``getV3PlatformFinanceSessions`` and ``getV3PlatformFinanceSessionDetail`` (each with its
``…Compat`` twin under ``/api/v1/v3``), plus the helpers the finance lists share
(``time_range`` windows, CSV pages, payment-session rows).

Every answer reads read models through the cache and says how in ``X-Read-Model-Cache``
and ``meta.cache`` (the same value). There is no acknowledgement store yet, so every
``ack_state`` is ``none`` and the ``ack_*`` fields are null; ``user_label`` is null (no
user directory here). What each row, KPI and card is made of is in docs/decisions.md.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from typing import Any, Literal
from urllib.parse import quote
from uuid import UUID

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from api.auth import Principal, requires
from api.errors import ApiError
from api.pagination import encode_cursor, page_request, pagination_block
from api.queries import CACHE_HEADER, cached_query
from projections import finance
from projections.reconciliation import latest_completed
from projections.store import SCHEMA

router = APIRouter()
OPS_READ = requires("platform.ops.read")
BASE = "/api/v1/platform/finance"
COMPAT = "/api/v1/v3/platform/finance"
#: what the overview reads (its position is the least of theirs)
OVERVIEW_MODELS = ("payments", "refunds", "disputes", "restrictions", "billing_ledger",
                   "finance", "reconciliation")
#: rows of the overview's action queue, interventions and activity
PANEL_LIMIT = 50
#: rows per list in a diagnostics answer
DIAGNOSTICS_LIMIT = 1000
TimeRange = Literal["6h", "12h", "24h", "7d", "custom"]
RANGES = {"6h": timedelta(hours=6), "12h": timedelta(hours=12), "24h": timedelta(hours=24),
          "7d": timedelta(days=7)}
RESTRICTION_SEVERITY = {"at_risk": "warn", "restricted": "error", "suspended": "error",
                        "collections_hold": "error"}


# ---- helpers the finance lists share -----------------------------------------------------
def time_window(time_range: str | None, from_: datetime | None, to: datetime | None
                ) -> tuple[datetime | None, datetime | None]:
    """(since, until) on ``created_at``: a relative range runs back from now;
    ``custom`` (or no range) uses ``from``/``to``, both inclusive."""
    if time_range in RANGES and (from_ or to):
        raise ApiError(400, "invalid_request", "from and to go with time_range=custom only",
                       reason="time_range_conflict")
    if from_ and to and from_ > to:
        raise ApiError(400, "invalid_request", "from must not be after to",
                       reason="range_inverted")
    if time_range in RANGES:
        return datetime.now(timezone.utc).replace(microsecond=0) - RANGES[time_range], to
    return from_, to


def cursor_value(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else \
        value if isinstance(value, int) else str(value)


def csv_text(columns: Iterable[str], rows: Iterable[dict[str, Any]]) -> str:
    """A header row, then one row per dict; null is empty."""
    columns = list(columns)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else
                         finance.iso(row[c]) if isinstance(row[c], datetime) else row[c]
                         for c in columns])
    return out.getvalue()


def csv_response(answer: JSONResponse, filename: str) -> Response:
    """A cached ``{"csv", "next_cursor"}`` answer as text/csv; the next page's cursor goes
    in ``X-Next-Cursor``."""
    body = json.loads(answer.body)
    headers = {name: answer.headers[name] for name in (CACHE_HEADER, "X-Ledger-Read-Position")
               if name in answer.headers}
    headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    if body["next_cursor"]:
        headers["X-Next-Cursor"] = body["next_cursor"]
    return Response(body["csv"], media_type="text/csv", headers=headers)


def stamped(answer: JSONResponse) -> JSONResponse:
    """Copy the answer's cache state into ``meta.cache`` (a cached body keeps the state
    it was computed with)."""
    body = json.loads(answer.body)
    body["meta"]["cache"] = answer.headers[CACHE_HEADER]
    response = JSONResponse(body)
    for name in (CACHE_HEADER, "X-Ledger-Read-Position"):
        response.headers[name] = answer.headers[name]
    return response


def meta() -> dict[str, Any]:
    return {"generated_at": finance.iso(datetime.now(timezone.utc)), "cache": "miss"}


def diagnostics_href(correlation_id: str | None) -> str | None:
    return f"{BASE}/diagnostics?correlation_id={quote(correlation_id, safe='')}" \
        if correlation_id else None


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256("|".join("" if p is None else str(p) for p in parts).encode()
                          ).hexdigest()[:32]


def _ack(signal_key: str, fingerprint: str) -> dict[str, Any]:
    return {"signal_key": signal_key, "ack_fingerprint": fingerprint, "ack_state": "none",
            "ack_reason": None, "ack_expires_at": None, "ack_actor": None, "ack_updated_at": None}


def session_row(row: dict[str, Any]) -> dict[str, Any]:
    """A ``payment_sessions`` row as the contract's ``V3PlatformPaymentSessionRow``."""
    session_id = str(row["id"])
    return {"id": session_id, "user_id": str(row["initiated_by_user_id"]), "user_label": None,
            "amount_minor": row["requested_amount_minor"],
            "credited_amount_minor": row["credited_amount_minor"],
            "currency": row["requested_currency"], "status": row["status"],
            "created_at": finance.iso(row["created_at"]),
            "initiated_at": finance.iso(row["initiated_at"]),
            "checkout_completed_at": finance.iso(row["checkout_completed_at"]),
            "credited_at": finance.iso(row["credited_at"]),
            "failed_at": finance.iso(row["failed_at"]), "reason_hint": row["failure_reason"],
            "ledger_entry_id": None if row["ledger_entry_id"] is None
            else str(row["ledger_entry_id"]),
            "correlation_id": row["correlation_id"] or None,
            "attention_reason": finance.ATTENTION.get(row["status"]),
            "detail_href": f"{BASE}/sessions/{session_id}",
            "diagnostics_href": diagnostics_href(row["correlation_id"]),
            "target_type": "payment_session", "target_id": session_id,
            **_ack(f"finance.payment_session:{session_id}",
                   _fingerprint(session_id, row["status"], row["failure_reason"]))}


def activity_item(row: dict[str, Any]) -> dict[str, Any]:
    """A ``finance.activity`` row as the contract's ``V3PlatformFinanceActivityItem``."""
    source = finance.ACTIVITY_SOURCES.get(row["target_type"], "audit")
    warn = row["action"].endswith("_failed") or row["action"] == "chargeback"
    href = f"{BASE}/sessions/{row['target_id']}" if row["target_type"] == "payment_session" \
        else diagnostics_href(row["correlation_id"])
    return {"id": str(row["id"]), "occurred_at": finance.iso(row["occurred_at"]),
            "source": source, "action": row["action"], "status": row["result"],
            "severity": "warn" if warn else "info",
            "summary": f"{row['action']} on {row['target_type']} {row['target_id']}",
            "actor": str(row["actor_user_id"]) if row["actor_user_id"] else row["actor_role"],
            "user_id": None if row["user_id"] is None else str(row["user_id"]),
            "amount_minor": row["amount_minor"], "currency": row["currency"],
            "correlation_id": row["correlation_id"] or None, "href": href}


# ---- the overview --------------------------------------------------------------------------
def _kpis(figures: dict[str, int], run: dict[str, Any] | None) -> list[dict[str, Any]]:
    def kpi(key: str, label: str, value: Any, summary: str | None, severity: str
            ) -> dict[str, Any]:
        return {"key": key, "label": label, "value": str(value), "summary": summary,
                "severity": severity}

    def flag(count: int, level: str = "warn") -> str:
        return level if count else "ok"

    if run is None:
        reconciliation = kpi("reconciliation", "Usage-ledger reconciliation", "never_run",
                             "no reconciliation run has completed", "info")
    else:
        s = run["summary"]
        reconciliation = kpi(
            "reconciliation", "Usage-ledger reconciliation", s["severity"],
            f"checked {s['checked_at']}: {s['missing_open_usage_count']} missing open,"
            f" {s['orphan_open_usage_count']} orphan open,"
            f" {s['unbilled_closed_usage_count']} unbilled closed usage records;"
            f" {run['ledger_problem_count']} ledger problems", s["severity"])
    return [
        kpi("payment_sessions", "Payment sessions", figures["sessions"],
            f"{figures['sessions_open']} awaiting checkout or credit", "ok"),
        kpi("payment_sessions_attention", "Sessions needing attention",
            figures["sessions_attention"], "failed to reconcile, or paid and not credited",
            flag(figures["sessions_attention"])),
        kpi("refunds_pending", "Provider refunds pending", figures["refunds_pending"],
            "accepted, waiting for the provider's outcome",
            flag(figures["refunds_pending"], "info")),
        kpi("disputes_open", "Open disputes", figures["disputes_open"], None,
            flag(figures["disputes_open"])),
        kpi("financial_restrictions", "Financial restrictions", figures["restrictions_active"],
            "scopes not healthy", flag(figures["restrictions_active"])),
        reconciliation,
    ]


def _action_queue(sessions: list[dict[str, Any]], run: dict[str, Any] | None
                  ) -> list[dict[str, Any]]:
    items = []
    if run is not None and run["summary"]["severity"] != "ok":
        s, run_id = run["summary"], str(run["id"])
        items.append({
            "severity": s["severity"], "code": f"billing_reconciliation_{s['severity']}",
            "title": "Usage and ledger disagree",
            "summary": (f"{s['missing_open_usage_count']} missing open,"
                        f" {s['orphan_open_usage_count']} orphan open,"
                        f" {s['unbilled_closed_usage_count']} unbilled closed usage records;"
                        f" {run['ledger_problem_count']} ledger problems"),
            "primary_action_label": "Open the run",
            "primary_action_href": f"{BASE}/reconciliation/{run_id}", "runbook_href": None,
            "target_type": "reconciliation_run", "target_id": run_id,
            **_ack(f"finance.reconciliation:{run_id}", _fingerprint(run_id, s["severity"]))})
    for row in sessions:
        failed = row["status"] == "failed_reconcile"
        items.append({
            "severity": "error" if failed else "warn",
            "code": f"payment_session_{finance.ATTENTION[row['status']]}",
            "title": "Payment failed to reconcile" if failed else "Payment not credited",
            "summary": row["failure_reason"] or (
                f"{row['requested_amount_minor']} {row['requested_currency']} paid at the"
                " provider and not yet credited"),
            "primary_action_label": "Review session",
            "primary_action_href": f"{BASE}/sessions/{row['id']}", "runbook_href": None,
            "target_type": "payment_session", "target_id": str(row["id"]),
            **_ack(f"finance.payment_session:{row['id']}",
                   _fingerprint(row["id"], row["status"], row["failure_reason"]))})
    return items


def _intervention(row: dict[str, Any]) -> dict[str, Any]:
    effects = row["effects"] or {}
    bullets = [f"new launches {'blocked' if effects.get('launch_blocked') else 'allowed'}",
               f"refunds {'blocked' if effects.get('refunds_blocked') else 'allowed'}"]
    bullets += [str(reason) for reason in effects.get("disabled_reasons", [])]
    scope = f"{row['scope_type']}/{row['scope_id']}"
    return {"key": f"financial_restriction:{row['scope_type']}:{row['scope_id']}",
            "title": f"{row['scope_type']} {row['scope_id']} is {row['state']}",
            "summary": row["reason"],
            "href": f"/api/v1/admin/billing/financial-restrictions/{scope}",
            "severity": RESTRICTION_SEVERITY.get(row["state"], "warn"), "metric": row["state"],
            "bullets": bullets, "primary_action_label": "Review restriction",
            "owner_domain": "billing", "review_required": True, "review_state": "open",
            "reviewed_at": None, "reviewed_by": None, "review_note": None,
            "attention_reason": row["reason"],
            "next_action": "set the scope back to healthy once resolved",
            "superseded_by_workflow_id": None}


@router.get(BASE, operation_id="getV3PlatformFinance")
@router.get(COMPAT, operation_id="getV3PlatformFinanceCompat")
def get_v3_platform_finance(request: Request, principal: Principal = Depends(OPS_READ),
                            cursor: str | None = None,
                            page_size: int | None = Query(default=None)) -> JSONResponse:
    """KPIs, sessions (newest first, paged), action queue, interventions, activity."""
    def panels(cur: Any) -> dict[str, Any]:
        run = latest_completed(cur, SCHEMA)
        return {"kpis": _kpis(finance.counts(cur, SCHEMA), run),
                "action_queue": _action_queue(
                    finance.sessions_needing_attention(cur, SCHEMA, PANEL_LIMIT), run),
                "interventions": [_intervention(r) for r in
                                  finance.active_restrictions(cur, SCHEMA, PANEL_LIMIT)],
                "activity": [activity_item(r) for r in
                             finance.activity(cur, SCHEMA, limit=PANEL_LIMIT)]}

    return stamped(_sessions_page(request, principal, "getV3PlatformFinance", cursor=cursor,
                                  page_size=page_size, filters={}, projection=OVERVIEW_MODELS,
                                  extra=panels))


@router.get(f"{BASE}/sessions", operation_id="getV3PlatformFinanceSessions")
@router.get(f"{COMPAT}/sessions", operation_id="getV3PlatformFinanceSessionsCompat")
def get_v3_platform_finance_sessions(
        request: Request, principal: Principal = Depends(OPS_READ), cursor: str | None = None,
        page_size: int | None = Query(default=None), status: str | None = None,
        user_id: UUID | None = None, correlation_id: str | None = None) -> JSONResponse:
    """Payment sessions newest first; ``status`` is free text matched exactly (an
    unknown status lists nothing)."""
    filters = {"status": status, "user_id": None if user_id is None else str(user_id),
               "correlation_id": correlation_id}
    return stamped(_sessions_page(
        request, principal, "getV3PlatformFinanceSessions", cursor=cursor, page_size=page_size,
        filters=filters, projection="payments", extra=lambda cur: {"filters": filters}))


def _sessions_page(request: Request, principal: Principal, operation_id: str, *,
                   cursor: str | None, page_size: int | None, filters: dict[str, str | None],
                   projection: str | tuple[str, ...],
                   extra: Callable[[Any], dict[str, Any]]) -> JSONResponse:
    secret = request.app.state.settings.jwt_secret
    bound = {k: str(v) for k, v in filters.items()}
    page = page_request(secret, cursor=cursor, page_size=page_size, operation_id=operation_id,
                        sort="created_at_desc", filters=bound, scope=principal.scope_key)
    after = None
    if page.after is not None:
        after = (datetime.fromisoformat(page.after[0]), UUID(page.after[1]))

    def compute(cur: Any) -> dict[str, Any]:
        rows = finance.list_payment_sessions(
            cur, SCHEMA, user_id=UUID(filters["user_id"]) if filters.get("user_id") else None,
            status=filters.get("status"), correlation_id=filters.get("correlation_id"),
            sort="created_at_desc", after=after, limit=page.page_size + 1)
        next_cursor = None
        if len(rows) > page.page_size:
            rows = rows[:page.page_size]
            next_cursor = encode_cursor(secret, operation_id=operation_id, sort="created_at_desc",
                                        filters=bound, scope=principal.scope_key,
                                        last_key=[rows[-1]["created_at"].isoformat(),
                                                  str(rows[-1]["id"])])
        return {"sessions": [session_row(r) for r in rows], **extra(cur),
                "pagination": pagination_block(next_cursor, page.page_size), "meta": meta()}

    return cached_query(request, principal, operation_id=operation_id, projection=projection,
                        query={**bound, "cursor": cursor, "page_size": page.page_size},
                        compute=compute)


# ---- one session -----------------------------------------------------------------------------
def _operations(row: dict[str, Any]) -> list[dict[str, Any]]:
    status, session_id = row["status"], str(row["id"])
    reconcile = f"{BASE}/payment-sessions/{session_id}/reconcile"
    credited = "payment_session_already_credited" if status == "credited" else None

    def op(key: str, label: str, href: str, disabled: str | None, danger: str, result: str,
           mode: str) -> dict[str, Any]:
        return {"key": key, "label": label, "method": "POST", "href": href,
                "target_type": "payment_session", "target_id": session_id,
                "enabled": disabled is None, "disabled_reason": disabled, "danger": danger,
                "audit_action": f"payment_session.{key}", "result": result,
                "recovery_mode": mode}

    return [
        op("post_credit", "Post credit", reconcile,
           credited or ("payment_session_not_completed" if status == "initiated" else None),
           "high", "appends one payment_credit ledger entry and marks the session credited",
           "manual_internal_credit"),
        op("mark_expired", "Mark expired", reconcile,
           credited or ("payment_session_already_expired" if status == "expired" else None),
           "medium", "marks the session expired; no ledger entry", "manual_state_update"),
        op("mark_failed", "Mark failed", reconcile,
           credited or ("payment_session_already_failed" if status == "failed_reconcile"
                        else None),
           "medium", "marks the session failed_reconcile; no ledger entry",
           "manual_state_update"),
        op("create_refund", "Create refund",
           f"{BASE}/users/{row['initiated_by_user_id']}/refunds",
           None if status == "credited" else "payment_session_not_credited", "high",
           "creates a refund naming this payment (provider refund or internal credit)",
           "manual_refund_workflow"),
    ]


@router.get(f"{BASE}/sessions/{{payment_session_id}}",
            operation_id="getV3PlatformFinanceSessionDetail")
@router.get(f"{COMPAT}/sessions/{{payment_session_id}}",
            operation_id="getV3PlatformFinanceSessionDetailCompat")
def get_v3_platform_finance_session_detail(
        payment_session_id: UUID, request: Request,
        principal: Principal = Depends(OPS_READ)) -> JSONResponse:
    """One session: its row, evidence counts by its correlation id, the recovery
    operations (enabled as ``adminReconcilePaymentSession`` and refunds would allow them)
    and everything that happened to it."""

    def compute(cur: Any) -> dict[str, Any]:
        row = finance.payment_session_row(cur, SCHEMA, payment_session_id)
        if row is None:
            raise ApiError(404, "invalid_request", "payment session not found",
                           reason="payment_session_not_found")
        correlation = row["correlation_id"] or None
        evidence = finance.diagnostics(cur, SCHEMA, row["correlation_id"], DIAGNOSTICS_LIMIT) \
            if correlation else {}
        return {
            "summary": session_row(row),
            "diagnostics": {
                "payment_session_id": str(row["id"]), "correlation_id": correlation,
                "billing_diagnostics_href": diagnostics_href(correlation),
                "evidence_href": f"{BASE}/payment-sessions/{row['id']}",
                "payment_session_count": len(evidence.get("payment_sessions", [])),
                "ledger_entry_count": len(evidence.get("ledger_entries", [])),
                "refund_count": len(evidence.get("refunds", [])),
                "audit_log_count": len(evidence.get("audit_logs", []))},
            "operations": _operations(row),
            "recovery_policy": {
                "provider_replay_supported": False,
                "provider_replay_reason": ("provider events are applied once by event id;"
                                           " recover with an audited operator action"),
                "supported_modes": ["manual_internal_credit", "manual_state_update",
                                    "manual_refund_workflow"]},
            "activity": [activity_item(r) for r in
                         finance.activity(cur, SCHEMA, limit=PANEL_LIMIT, payment_session=row)],
            "meta": meta()}

    return stamped(cached_query(request, principal,
                                operation_id="getV3PlatformFinanceSessionDetail",
                                projection=OVERVIEW_MODELS, query={"id": str(payment_session_id)},
                                compute=compute))

