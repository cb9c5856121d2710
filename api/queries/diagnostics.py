"""Billing diagnostics by correlation id: ``adminGetBillingDiagnostics`` and its V3 twins
``getV3PlatformFinanceDiagnostics`` (+``Compat``).

Everything tagged with the correlation id (billing-ledger §4.20): payment sessions and
refunds created under it or changed by an event carrying it, usage records changed by
such an event, ledger entries posted under it, and the audit evidence of every finance
event carrying it (``projections.finance``). Each list is oldest first and holds at most
``DIAGNOSTICS_LIMIT`` rows.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from api.auth import Principal, requires
from api.queries import cached_query
from api.queries.finance import BASE, COMPAT, DIAGNOSTICS_LIMIT
from domain.payments import session_json
from domain.refunds import refund_json
from domain.usage_views import usage_record_json
from projections import finance
from projections.store import SCHEMA

router = APIRouter()
OPS_READ = requires("platform.ops.read")
#: the read models an answer reads (its position is the least of theirs)
MODELS = ("payments", "refunds", "usage", "billing_ledger", "finance")


@router.get("/api/v1/admin/billing/diagnostics", operation_id="adminGetBillingDiagnostics")
@router.get(f"{BASE}/diagnostics", operation_id="getV3PlatformFinanceDiagnostics")
@router.get(f"{COMPAT}/diagnostics", operation_id="getV3PlatformFinanceDiagnosticsCompat")
def get_billing_diagnostics(request: Request, principal: Principal = Depends(OPS_READ),
                            correlation_id: str = Query(min_length=1, max_length=128)
                            ) -> JSONResponse:

    def compute(cur: Any) -> dict[str, Any]:
        found = finance.diagnostics(cur, SCHEMA, correlation_id, DIAGNOSTICS_LIMIT)
        return {"correlation_id": correlation_id,
                "payment_sessions": [session_json(r) for r in found["payment_sessions"]],
                "refunds": [refund_json(r) for r in found["refunds"]],
                "usage_records": [usage_record_json(r) for r in found["usage_records"]],
                "ledger_entries": [finance.ledger_entry_json(r) for r in found["ledger_entries"]],
                "audit_logs": [finance.audit_json(r) for r in found["audit_logs"]]}

    return cached_query(request, principal, operation_id="adminGetBillingDiagnostics",
                        projection=MODELS, query={"correlation_id": correlation_id},
                        compute=compute)
