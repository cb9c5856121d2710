"""Invoice queries: ``listBillingInvoices`` and ``getBillingInvoice``.

Scoped by the token: a caller sees the invoices of their own ledger (the payer of the
lines, ``requested_by_user_id`` of the usage), like usage and rated usage; anyone
else's invoice is ``404``. Also the contract JSON of invoices and their lines.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from api.auth import Principal, authenticate
from api.errors import ApiError
from api.pagination import encode_cursor, page_request, pagination_block
from api.queries import cached_query
from projections.invoices import get_invoice, list_invoices
from projections.store import SCHEMA

router = APIRouter()
Status = Literal["draft", "issued", "due", "paid", "partially_paid", "void", "write_off"]


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def invoice_summary_json(row: dict[str, Any]) -> dict[str, Any]:
    """The contract's ``BillingInvoiceSummary`` from an ``invoices`` row."""
    currency = row["currency"]
    return {"id": str(row["id"]), "org_id": str(row["org_id"]),
            "period_start": _iso(row["period_start"]), "period_end": _iso(row["period_end"]),
            "status": row["status"],
            "total": {"amount_minor": row["total_minor"], "currency": currency},
            "tax_total": {"amount_minor": row["tax_total_minor"], "currency": currency},
            "tax_jurisdiction": None, "tax_treatment": row["tax_treatment"],
            "seller_tax_registration": None, "customer_tax_registration": None,
            "tax_snapshot": row["tax_snapshot"], "issued_at": _iso(row["issued_at"]),
            "due_at": _iso(row["due_at"]), "finalized_at": _iso(row["finalized_at"]),
            "voided_at": _iso(row["voided_at"]), "created_at": _iso(row["created_at"])}


def invoice_line_json(row: dict[str, Any]) -> dict[str, Any]:
    """The contract's ``BillingInvoiceLine`` from an ``invoice_lines`` row (no tax)."""
    return {"id": str(row["id"]), "line_type": row["line_type"],
            "description": row["description"],
            "amount": {"amount_minor": row["amount_minor"], "currency": row["currency"]},
            "rated_usage_line_id": _str(row["rated_usage_line_id"]),
            "ledger_entry_id": _str(row["ledger_entry_id"]), "payment_session_id": None,
            "tax_category": None, "tax_rate_bps": None, "tax_jurisdiction": None,
            "tax_subject_line_id": None, "tax_exempt_reason": None,
            "reverse_charge_reason": None, "tax_evidence": {},
            "created_at": _iso(row["created_at"])}


@router.get("/api/v1/billing/invoices", operation_id="listBillingInvoices")
def list_billing_invoices(
        request: Request, principal: Principal = Depends(authenticate),
        cursor: str | None = None, page_size: int | None = Query(default=None),
        status: Status | None = None) -> JSONResponse:
    secret = request.app.state.settings.jwt_secret
    binding = dict(operation_id="listBillingInvoices", sort="period_start_desc",
                   filters={"status": status}, scope=principal.scope_key)
    page = page_request(secret, cursor=cursor, page_size=page_size, **binding)
    after = None
    if page.after is not None:
        after = (datetime.fromisoformat(page.after[0]), UUID(page.after[1]))

    def compute(cur: Any) -> dict[str, Any]:
        rows = list_invoices(cur, SCHEMA, owner=principal.user_id, status=status, after=after,
                             limit=page.page_size + 1)
        next_cursor = None
        if len(rows) > page.page_size:
            rows = rows[:page.page_size]
            next_cursor = encode_cursor(secret, **binding, last_key=[
                rows[-1]["period_start"].isoformat(), str(rows[-1]["id"])])
        return {"items": [invoice_summary_json(r) for r in rows],
                "pagination": pagination_block(next_cursor, page.page_size)}

    return cached_query(request, principal, operation_id="listBillingInvoices",
                        projection="invoices",
                        query={"status": status, "cursor": cursor, "page_size": page.page_size},
                        compute=compute)


@router.get("/api/v1/billing/invoices/{invoice_id}", operation_id="getBillingInvoice")
def get_billing_invoice(invoice_id: UUID, request: Request,
                        principal: Principal = Depends(authenticate)) -> JSONResponse:
    def compute(cur: Any) -> dict[str, Any]:
        found = get_invoice(cur, SCHEMA, owner=principal.user_id, invoice_id=invoice_id)
        if found is None:
            raise ApiError(404, "invalid_request", "invoice not found",
                           reason="invoice_not_found")
        row, lines = found
        return {**invoice_summary_json(row), "lines": [invoice_line_json(l) for l in lines]}

    return cached_query(request, principal, operation_id="getBillingInvoice",
                        projection="invoices", query={"id": str(invoice_id)}, compute=compute)
