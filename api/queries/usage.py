"""Usage queries: ``listBillingUsage``, ``exportBillingUsageCsv``,
``listBillingRatedUsage`` and ``getBillingRatedUsage``.

Scoped by the token: a caller sees the usage charged to their own ledger (no
``X-Project-ID``). The CSV export takes the list's filters and sort, has no paging and
is streamed from a server-side cursor; its columns are ``CSV_COLUMNS``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from api.auth import Principal, authenticate
from api.consistency import current_position, requested_position, wait_for
from api.errors import ApiError
from api.fields import Instant
from api.pagination import encode_cursor, page_request, pagination_block
from api.queries import cached_query, read_model_errors
from domain.usage_views import rated_line_json, usage_record_json
from projections.store import SCHEMA
from projections.usage import (UsageFilter, get_line, list_lines, list_usage, sort_value,
                               stream_usage)

router = APIRouter()
Source = Literal["allocation", "app_runtime"]
Sort = Literal["start_time_desc", "start_time_asc", "cost_desc", "cost_asc"]
#: the export's columns, in order: the UsageRecord fields with ``cost`` split in two,
#: then ``units`` (the metered resource count)
CSV_COLUMNS = ("id", "usage_source", "usage_unit", "allocation_id", "app_instance_id",
               "requested_by_user_id", "sku", "control_plane_component", "operating_mode",
               "control_plane_scope", "runtime_backend", "start_time", "end_time",
               "last_billed_at", "cost_amount_minor", "cost_currency", "units")


def _filters(principal: Principal, allocation_id: UUID | None, app_instance_id: UUID | None,
             usage_source: str | None, from_: datetime | None, to: datetime | None) -> UsageFilter:
    if from_ and to and from_ > to:
        raise ApiError(400, "invalid_request", "from must not be after to", reason="range_inverted")
    return UsageFilter(owner=principal.user_id, allocation_id=allocation_id,
                       app_instance_id=app_instance_id, usage_source=usage_source,
                       since=from_, until=to)


def _binding(filters: UsageFilter) -> dict[str, str]:
    return {k: str(v) for k, v in vars(filters).items() if k != "owner"}


@router.get("/api/v1/billing/usage", operation_id="listBillingUsage")
def list_billing_usage(
        request: Request, principal: Principal = Depends(authenticate),
        cursor: str | None = None, page_size: int | None = Query(default=None),
        allocation_id: UUID | None = None, app_instance_id: UUID | None = None,
        usage_source: Source | None = None,
        from_: Instant | None = Query(default=None, alias="from"), to: Instant | None = None,
        sort: Sort = "start_time_desc") -> JSONResponse:
    filters = _filters(principal, allocation_id, app_instance_id, usage_source, from_, to)
    secret = request.app.state.settings.jwt_secret
    binding = dict(operation_id="listBillingUsage", sort=sort, filters=_binding(filters),
                   scope=principal.scope_key)
    page = page_request(secret, cursor=cursor, page_size=page_size, **binding)
    after = None
    if page.after is not None:
        value = page.after[0]
        after = (datetime.fromisoformat(value) if sort.startswith("start_time") else int(value),
                 UUID(page.after[1]))

    def compute(cur: Any) -> dict[str, Any]:
        rows = list_usage(cur, SCHEMA, filters, sort=sort, after=after, limit=page.page_size + 1)
        next_cursor = None
        if len(rows) > page.page_size:
            rows = rows[:page.page_size]
            last = sort_value(rows[-1], sort)
            next_cursor = encode_cursor(secret, **binding, last_key=[
                last.isoformat() if isinstance(last, datetime) else last, str(rows[-1]["id"])])
        return {"items": [usage_record_json(r) for r in rows],
                "pagination": pagination_block(next_cursor, page.page_size)}

    return cached_query(request, principal, operation_id="listBillingUsage", projection="usage",
                        query={**_binding(filters), "sort": sort, "cursor": cursor,
                               "page_size": page.page_size}, compute=compute)


def csv_row(row: dict[str, Any]) -> list[str]:
    """One export line: the record's contract JSON, flattened; null is empty."""
    record = usage_record_json(row)
    cost = record.pop("cost")
    values = {**record, "cost_amount_minor": cost["amount_minor"],
              "cost_currency": cost["currency"], "units": row["units"]}
    return ["" if values[c] is None else
            str(values[c]).lower() if isinstance(values[c], bool) else str(values[c])
            for c in CSV_COLUMNS]


def _export(pool: Any, filters: UsageFilter, sort: str, chunk: int = 500) -> Iterator[str]:
    """The CSV in chunks of ``chunk`` rows, read through a server-side cursor."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    with pool.connection() as conn:
        for count, row in enumerate(stream_usage(conn, SCHEMA, filters, sort=sort,
                                                 chunk=chunk), 1):
            writer.writerow(csv_row(row))
            if count % chunk == 0:
                yield buffer.getvalue()
                buffer.seek(0)
                buffer.truncate()
        yield buffer.getvalue()


@router.get("/api/v1/billing/usage/csv", operation_id="exportBillingUsageCsv")
def export_billing_usage_csv(
        request: Request, principal: Principal = Depends(authenticate),
        allocation_id: UUID | None = None, app_instance_id: UUID | None = None,
        usage_source: Source | None = None,
        from_: Instant | None = Query(default=None, alias="from"), to: Instant | None = None,
        sort: Sort = "start_time_desc") -> StreamingResponse:
    filters = _filters(principal, allocation_id, app_instance_id, usage_source, from_, to)
    stores, settings = request.app.state.stores, request.app.state.settings
    wanted = requested_position(request)
    chunks = _export(stores.query_pool, filters, sort)
    with read_model_errors():
        if wanted is not None:
            reached, position = wait_for(stores, "usage", wanted, settings.read_wait_seconds)
        else:
            reached, position = True, current_position(stores, "usage")
        # Run the query before answering (a read model that cannot be read is a 503, not a
        # truncated 200); once started, the generator gives its connection back however
        # the stream ends, even if the client leaves before the first byte.
        first = next(chunks)

    def body() -> Iterator[str]:
        yield first
        yield from chunks

    response = StreamingResponse(body(), media_type="text/csv; charset=utf-8")
    response.headers["Content-Disposition"] = 'attachment; filename="usage.csv"'
    response.headers["X-Ledger-Read-Position"] = str(position)
    response.headers["X-Read-Model-Cache"] = "bypass" if reached else "stale"
    return response


@router.get("/api/v1/billing/rated-usage", operation_id="listBillingRatedUsage")
def list_billing_rated_usage(
        request: Request, principal: Principal = Depends(authenticate),
        cursor: str | None = None, page_size: int | None = Query(default=None),
        usage_record_id: UUID | None = None) -> JSONResponse:
    secret = request.app.state.settings.jwt_secret
    binding = dict(operation_id="listBillingRatedUsage", sort="bill_from_desc",
                   filters={"usage_record_id": str(usage_record_id)}, scope=principal.scope_key)
    page = page_request(secret, cursor=cursor, page_size=page_size, **binding)
    after = None
    if page.after is not None:
        after = (datetime.fromisoformat(page.after[0]), UUID(page.after[1]))

    def compute(cur: Any) -> dict[str, Any]:
        rows = list_lines(cur, SCHEMA, owner=principal.user_id, usage_record_id=usage_record_id,
                          after=after, limit=page.page_size + 1)
        next_cursor = None
        if len(rows) > page.page_size:
            rows = rows[:page.page_size]
            next_cursor = encode_cursor(secret, **binding, last_key=[
                rows[-1]["bill_from"].isoformat(), str(rows[-1]["id"])])
        return {"items": [rated_line_json(r) for r in rows],
                "pagination": pagination_block(next_cursor, page.page_size)}

    return cached_query(request, principal, operation_id="listBillingRatedUsage",
                        projection=("usage", "invoices"),
                        query={"usage_record_id": str(usage_record_id), "cursor": cursor,
                               "page_size": page.page_size}, compute=compute)


@router.get("/api/v1/billing/rated-usage/{rated_usage_line_id}",
            operation_id="getBillingRatedUsage")
def get_billing_rated_usage(rated_usage_line_id: UUID, request: Request,
                            principal: Principal = Depends(authenticate)) -> JSONResponse:
    def compute(cur: Any) -> dict[str, Any]:
        found = get_line(cur, SCHEMA, owner=principal.user_id, line_id=rated_usage_line_id)
        if found is None:
            raise ApiError(404, "invalid_request", "rated usage line not found",
                           reason="rated_usage_line_not_found")
        return rated_line_json(found)

    return cached_query(request, principal, operation_id="getBillingRatedUsage",
                        projection=("usage", "invoices"), query={"id": str(rated_usage_line_id)},
                        compute=compute)
