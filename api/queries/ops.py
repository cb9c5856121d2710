"""Operator views of the event pipeline: failed outbox events, DLQ messages, ops overview.

``adminListFailedOutboxEvents`` / ``adminListDLQMessages`` and their V3 twins
(``listV3PlatformOps…`` and ``…Compat``), and ``adminGetOpsOverview``. They read the
pipeline's bookkeeping tables (``projections.dead_letters``) and read-model tables,
never the event store. Nothing here is cached: the dead-letter tables have no
tracking position to key a cache entry by, and an operator needs them as they are
(``X-Read-Model-Cache: bypass``).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from api.auth import Principal, requires
from api.pagination import encode_cursor, page_request, pagination_block
from api.queries import CACHE_HEADER, read_model_errors
from projections import dead_letters as dl
from projections.store import SCHEMA

router = APIRouter()
OPS_READ = requires("platform.ops.read")
#: a worker whose heartbeat is older than this is reported down
HEARTBEAT_STALE = timedelta(seconds=30)
#: read models of the billing and of the provisioning side (overview health)
BILLING_MODELS = ("billing_ledger", "payments", "restrictions", "usage", "refunds", "disputes",
                  "reconciliation", "finance", "invoices", "budgets")
PROVISIONING_MODELS = ("inventory", "allocations", "workloads")
OUTBOX_FAILED = "/outbox/failed"
DLQ_MESSAGES = "/dlq/messages"
PREFIXES = ("/api/v1/platform/ops", "/api/v1/v3/platform/ops")


def _answer(request: Request, compute: Callable[[Any], dict[str, Any]]) -> JSONResponse:
    with read_model_errors():
        with request.app.state.stores.query_pool.connection() as conn, conn.cursor() as cur:
            body = compute(cur)
    response = JSONResponse(body)
    response.headers[CACHE_HEADER] = "bypass"
    return response


@router.get(f"/api/v1/admin{OUTBOX_FAILED}", operation_id="adminListFailedOutboxEvents")
@router.get(f"{PREFIXES[0]}{OUTBOX_FAILED}", operation_id="listV3PlatformOpsFailedOutboxEvents")
@router.get(f"{PREFIXES[1]}{OUTBOX_FAILED}",
            operation_id="listV3PlatformOpsFailedOutboxEventsCompat")
def list_failed_outbox_events(request: Request, principal: Principal = Depends(OPS_READ),
                              cursor: str | None = None,
                              page_size: int | None = Query(default=None)) -> JSONResponse:
    secret = request.app.state.settings.jwt_secret
    binding = dict(operation_id="adminListFailedOutboxEvents", sort="occurred_at_asc",
                   filters={}, scope=principal.scope_key)
    page = page_request(secret, cursor=cursor, page_size=page_size, **binding)

    def compute(cur: Any) -> dict[str, Any]:
        after = (page.after[0], page.after[1]) if page.after else None
        rows = dl.list_failed_outbox(cur, SCHEMA, after=after, limit=page.page_size + 1)
        next_cursor = None
        if len(rows) > page.page_size:
            rows = rows[:page.page_size]
            next_cursor = encode_cursor(secret, **binding, last_key=[
                rows[-1]["occurred_at"], rows[-1]["id"]])
        return {"items": rows, "pagination": pagination_block(next_cursor, page.page_size)}

    return _answer(request, compute)


@router.get(f"/api/v1/admin{DLQ_MESSAGES}", operation_id="adminListDLQMessages")
@router.get(f"{PREFIXES[0]}{DLQ_MESSAGES}", operation_id="listV3PlatformOpsDLQMessages")
@router.get(f"{PREFIXES[1]}{DLQ_MESSAGES}", operation_id="listV3PlatformOpsDLQMessagesCompat")
def list_dlq_messages(request: Request, principal: Principal = Depends(OPS_READ),
                      cursor: str | None = None, page_size: int | None = Query(default=None),
                      subject_prefix: str | None = Query(default=None, max_length=256)
                      ) -> JSONResponse:
    """Pending dead letters, oldest first; ``subject`` is ``dlq.ledgercore.<read model>``."""
    secret = request.app.state.settings.jwt_secret
    binding = dict(operation_id="adminListDLQMessages", sort="stream_seq_asc",
                   filters={"subject_prefix": subject_prefix}, scope=principal.scope_key)
    page = page_request(secret, cursor=cursor, page_size=page_size, **binding)

    def compute(cur: Any) -> dict[str, Any]:
        after = int(page.after[0]) if page.after else None
        rows = dl.list_dead_letters(cur, SCHEMA, after=after, limit=page.page_size + 1,
                                    subject_prefix=subject_prefix)
        next_cursor = None
        if len(rows) > page.page_size:
            rows = rows[:page.page_size]
            next_cursor = encode_cursor(secret, **binding, last_key=[rows[-1]["stream_seq"]])
        return {"items": rows, "pagination": pagination_block(next_cursor, page.page_size)}

    return _answer(request, compute)


def _fresh(row: dict[str, Any] | None, moment: datetime) -> bool:
    return row is not None and moment - row["heartbeat_at"] <= HEARTBEAT_STALE


def _healthy(projectors: list[dict[str, Any]], degraded: set[str], models: tuple[str, ...],
             moment: datetime) -> bool:
    return (any(_fresh(p, moment) and not p["last_error"] for p in projectors)
            and not degraded.intersection(models))


def _throughput(cur: Any, since: datetime) -> dict[str, int]:
    s = SCHEMA
    cur.execute(
        f"SELECT (SELECT count(*) FROM {s}.allocations WHERE"
        f"  (state->'timestamps'->>'active_at')::timestamptz >= %(since)s) AS activated,"
        f" (SELECT count(*) FROM {s}.allocations WHERE"
        f"  (state->'timestamps'->>'released_at')::timestamptz >= %(since)s) AS released,"
        f" (SELECT count(*) FROM {s}.payment_sessions WHERE credited_at >= %(since)s) AS credited",
        {"since": since})
    row = cur.fetchone()
    return {"allocations_activated": row["activated"], "allocations_released": row["released"],
            "payments_credited": row["credited"]}


def _nodes(cur: Any) -> dict[str, Any]:
    cur.execute(f"SELECT count(*) FILTER (WHERE listed) AS total,"
                f" count(*) FILTER (WHERE listed AND status = 'active') AS active"
                f" FROM {SCHEMA}.inventory_nodes")
    row = cur.fetchone()
    return {"summary": {"total_nodes": row["total"], "active_nodes": row["active"],
                        "sampled_nodes": 0, "netdata_reachable_nodes": 0,
                        "gpu_reporting_nodes": 0},
            "sample": []}


def overview(cur: Any, transport: str, moment: datetime) -> dict[str, Any]:
    """The overview's fields, each from what ledgercore actually measures
    (docs/decisions.md lists what the fields about subsystems it lacks say)."""
    window = moment - timedelta(minutes=5)
    counts = dl.pipeline_counts(cur, SCHEMA, window)
    components = counts["components"]
    degraded = set(counts["degraded"] or ())
    kind = "projector:direct" if transport == "direct" else "projector:kafka:"
    projectors = [row for name, row in components.items() if name.startswith(kind)]
    relays = [row for name, row in components.items() if name.startswith("relay:")]
    if transport == "direct":
        relay_ok, outbox_pending = True, 0  # no relay and no outbox: the log is read directly
    else:
        relay_ok = any(_fresh(r, moment) and not r["last_error"] for r in relays)
        behind = max((max(0, (r["head"] or 0) - (r["position"] or 0)) for r in relays), default=0)
        outbox_pending = behind + counts["outbox_requeued"]
    caught_up = [p["caught_up_at"] for p in projectors if p["caught_up_at"] is not None]
    if not caught_up:
        stale = 0
    else:
        stale = max(0, int((moment - max(caught_up)).total_seconds()))
        stale = 0 if stale <= 5 else stale  # heartbeats are written every ~2 s
    return {
        "generated_at": moment.isoformat(),
        "stale_seconds": stale,
        "service_health": {
            "api_ok": True,
            "billing_worker_ok": _healthy(projectors, degraded, BILLING_MODELS, moment),
            "provisioning_worker_ok": _healthy(projectors, degraded, PROVISIONING_MODELS, moment),
            "outbox_relay_ok": relay_ok,
            "outbox_relay_runbook_id": None,
        },
        "queue_depth": {"outbox_pending": outbox_pending,
                        "dlq_pending": counts["dlq_unresolved"], "dlq_runbook_id": None},
        "throughput_5m": _throughput(cur, window),
        "error_rate_5m": {"api_5xx_per_min": 0.0,
                          "worker_failures_per_min": round(counts["recent_failures"] / 5, 3),
                          "api_5xx_runbook_id": None, "worker_failures_runbook_id": None},
        "control_plane": {"nats_connected": False, **{name: 0 for name in (
            "api_ratelimit_fail_open_total", "api_idempotency_replays_served_total",
            "terminal_token_consumed_ok_total", "terminal_token_replay_rejected_total",
            "ws_notifications_active_connections", "ws_notifications_write_errors_total",
            "platform_role_list_requests_total", "platform_role_bind_requests_total",
            "platform_role_revoke_requests_total", "platform_role_mutation_success_total",
            "platform_role_mutation_failure_total", "platform_role_admin_denied_total",
            "platform_role_service_unavailable_total")}},
        "node_metrics": _nodes(cur),
    }


@router.get("/api/v1/admin/ops/overview", operation_id="adminGetOpsOverview")
def get_ops_overview(request: Request, principal: Principal = Depends(OPS_READ)) -> JSONResponse:
    transport = request.app.state.settings.transport
    return _answer(request, lambda cur: overview(cur, transport, datetime.now(timezone.utc)))
