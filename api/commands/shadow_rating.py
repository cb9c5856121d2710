"""``adminDryRunShadowRating``: what the selected usage would have cost at a candidate
price, beside what was charged. A dry run: it reads the usage records (aggregates, so
the answer is never behind the ledger) and appends nothing, so it takes no
``Idempotency-Key`` and answers no ``X-Ledger-Position``.
"""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from api.auth import Principal, admin
from api.errors import ApiError
from api.fields import JsonObject
from domain.money import INT64_MAX, Money, is_known_currency
from domain.usage_views import shadow_rate

router = APIRouter()


class MoneyBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    amount_minor: int = Field(ge=0, le=INT64_MAX)
    currency: str = Field(pattern=r"^[A-Z]{3}$")


class BillingShadowRatingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    org_id: UUID = Field(strict=False)
    usage_record_ids: list[Annotated[UUID, Field(strict=False)]] = Field(min_length=1,
                                                                         max_length=100)
    candidate_unit_price: MoneyBody
    pricing_source: str = Field(default="shadow_rating", min_length=1)
    pricing_plan_id: UUID | None = Field(default=None, strict=False)
    pricing_plan_version: str | None = None
    pricing_snapshot: JsonObject | None = None


@router.post("/api/v1/admin/billing/shadow-rating", operation_id="adminDryRunShadowRating")
def admin_dry_run_shadow_rating(body: BillingShadowRatingRequest, request: Request,
                                principal: Principal = Depends(admin)) -> JSONResponse:
    price = body.candidate_unit_price
    if not is_known_currency(price.currency):
        raise ApiError(400, "invalid_request", f"unknown currency {price.currency}",
                       field="candidate_unit_price.currency", reason="unsupported_currency")
    app = request.app.state.stores.app
    records = {record_id: app.get_or_none(record_id)
               for record_id in dict.fromkeys(body.usage_record_ids)}
    result = shadow_rate(records, org_id=body.org_id,
                         candidate=Money(price.amount_minor, price.currency),
                         pricing_source=body.pricing_source, pricing_plan_id=body.pricing_plan_id,
                         pricing_plan_version=body.pricing_plan_version,
                         pricing_snapshot=body.pricing_snapshot)
    return JSONResponse(result)
