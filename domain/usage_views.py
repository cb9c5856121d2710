"""The contract's JSON for usage records and rated lines (from aggregate or read-model
rows alike), and ``adminDryRunShadowRating``'s pure re-rating of loaded records."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from domain.money import Money
from domain.rating import iso, ms_between, rating_key, shadow_terms
from domain.skus import refusal
from domain.usage import UsageRecord


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else iso(value)


def usage_record_json(row: dict[str, Any]) -> dict[str, Any]:
    """The contract's ``UsageRecord`` from a record row (aggregate or read model)."""
    return {"id": str(row["id"]), "usage_source": row["usage_source"],
            "usage_unit": row["usage_unit"], "allocation_id": _str(row["allocation_id"]),
            "app_instance_id": _str(row["app_instance_id"]),
            "requested_by_user_id": str(row["requested_by_user_id"]), "sku": row["sku"],
            "control_plane_component": bool(row["control_plane_component"]),
            "operating_mode": row["operating_mode"],
            "control_plane_scope": row["control_plane_scope"],
            "runtime_backend": row["runtime_backend"], "start_time": iso(row["start_time"]),
            "end_time": _iso(row["end_time"]), "last_billed_at": _iso(row["last_billed_at"]),
            "cost": {"amount_minor": row["cost_minor"], "currency": row["currency"]}}


def rated_line_json(row: dict[str, Any]) -> dict[str, Any]:
    """The contract's ``BillingRatedUsageLine`` from a line row."""
    return {"id": str(row["id"]), "usage_record_id": str(row["usage_record_id"]),
            "org_id": _str(row["org_id"]), "project_id": _str(row["project_id"]),
            "requested_by_user_id": str(row["requested_by_user_id"]),
            "usage_source": row["usage_source"], "usage_unit": row["usage_unit"],
            "bill_from": iso(row["bill_from"]), "bill_to": iso(row["bill_to"]),
            "unit_quantity_millis": row["unit_quantity_millis"], "units": row["units"],
            "unit_price": {"amount_minor": row["unit_price_minor"],
                           "currency": row["unit_price_currency"]},
            "amount": {"amount_minor": row["amount_minor"], "currency": row["amount_currency"]},
            "pricing_source": row["pricing_source"],
            "pricing_plan_id": _str(row["pricing_plan_id"]),
            "pricing_plan_version": row["pricing_plan_version"],
            "pricing_snapshot": row["pricing_snapshot"], "fx_snapshot": row["fx_snapshot"],
            "rating_key": row["rating_key"], "ledger_entry_id": _str(row["ledger_entry_id"]),
            "invoice_line_id": _str(row["invoice_line_id"]), "invoice_id": _str(row["invoice_id"]),
            "created_at": iso(row["created_at"])}


def shadow_rate(records: dict[UUID, UsageRecord | None], *, org_id: UUID, candidate: Money,
                pricing_source: str, pricing_plan_id: UUID | None,
                pricing_plan_version: str | None,
                pricing_snapshot: dict[str, Any] | None) -> dict[str, Any]:
    """``adminDryRunShadowRating``: re-rate each record's billed period
    ``[start_time, last_billed_at)`` with ``candidate`` by the same rule and compare
    with what was charged. Reads the records it is given; appends nothing. Only the
    org's historical allocation ``gpu_hour`` records qualify."""
    lines, currencies = [], set()
    for record_id, record in records.items():
        if not isinstance(record, UsageRecord) or record.meter["org_id"] != str(org_id):
            raise refusal("invalid_request", "invalid", "no such usage record in this org",
                          reason="usage_record_not_found", usage_record_id=str(record_id))
        if (record.meter["usage_source"], record.meter["usage_unit"]) != ("allocation", "gpu_hour"):
            raise refusal("invalid_request", "invalid",
                          "shadow rating applies to allocation gpu_hour usage only",
                          reason="not_shadow_ratable", usage_record_id=str(record_id))
        plan_id = _str(pricing_plan_id)
        terms = shadow_terms(record.terms, candidate, pricing_source=pricing_source,
                             pricing_plan_id=plan_id, pricing_plan_version=pricing_plan_version,
                             pricing_snapshot=pricing_snapshot)
        start, end = record.start_time, record.billed_to
        existing, proposed = record.cost_minor, terms.accrued(end)
        currencies.add(record.currency)
        lines.append({
            "usage_record_id": str(record.id),
            "existing_rated_amount": {"amount_minor": existing, "currency": record.currency},
            "candidate_rated_amount": {"amount_minor": proposed, "currency": record.currency},
            "delta_amount": {"amount_minor": proposed - existing, "currency": record.currency},
            "candidate_rating_key": rating_key(terms, start, end),
            "usage_source": record.meter["usage_source"], "usage_unit": record.meter["usage_unit"],
            "bill_from": iso(start), "bill_to": iso(end),
            "unit_quantity_millis": terms.units * ms_between(start, end),
            "unit_price": candidate.as_json(), "units": terms.units,
            "pricing_source": pricing_source, "pricing_plan_id": plan_id,
            "pricing_plan_version": pricing_plan_version,
            "pricing_snapshot": terms.pricing_snapshot})
    if len(currencies) > 1:
        raise refusal("invalid_request", "invalid",
                      "the records were charged in different currencies; totals cannot be summed",
                      reason="currency_mismatch", currencies=sorted(currencies))
    currency = currencies.pop()

    def total(field: str) -> dict[str, Any]:
        return {"amount_minor": sum(line[field]["amount_minor"] for line in lines),
                "currency": currency}

    return {"lines": lines,
            "totals": {"existing_rated_amount": total("existing_rated_amount"),
                       "candidate_rated_amount": total("candidate_rated_amount"),
                       "delta_amount": total("delta_amount")},
            "ledger_writes": False, "rated_usage_writes": False}
