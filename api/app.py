"""The FastAPI application factory."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.telemetry import TelemetryConfig

from api import errors
from api.cache import ReadCache
from api.commands import allocations
from api.commands import app_instances as app_instance_commands
from api.commands import apps as app_commands
from api.commands import billing as billing_commands
from api.commands import inventory as inventory_commands
from api.commands import node_tasks
from api.commands import ops as ops_commands
from api.commands import payments as payment_commands
from api.commands import reconciliation as reconciliation_commands
from api.commands import refunds as refund_commands
from api.commands import restrictions as restriction_commands
from api.commands import shadow_rating
from api.contract import served_document
from api.hot_routes import HotRoutes
from api.middleware import RequestContext
from api.queries import allocations as allocation_queries
from api.queries import app_instances as app_instance_queries
from api.queries import apps as app_queries
from api.queries import audit_logs
from api.queries import billing as billing_queries
from api.queries import billing_account, budgets, invoices
from api.queries import diagnostics as diagnostics_queries
from api.queries import disputes as dispute_queries
from api.queries import finance as finance_queries
from api.queries import health
from api.queries import inventory as inventory_queries
from api.queries import ops as ops_queries
from api.queries import payments as payment_queries
from api.queries import posture, precheck
from api.queries import reconciliation as reconciliation_queries
from api.queries import refunds as refund_queries
from api.queries import usage as usage_queries
from api.queries import workloads as workload_queries
from consumers.direct import DirectProjector
from infra.db import Stores
from infra.settings import Settings

ROUTERS = (health.router, billing_commands.router, billing_queries.router,
           payment_commands.router, payment_queries.router, restriction_commands.router,
           posture.router, inventory_commands.router,
           allocations.router, node_tasks.router, inventory_queries.router,
           allocation_queries.router, precheck.router,
           usage_queries.router, shadow_rating.router,
           refund_commands.router, refund_queries.router, dispute_queries.router,
           reconciliation_commands.router, reconciliation_queries.router,
           finance_queries.router, diagnostics_queries.router,
           invoices.router, budgets.router, billing_account.router, workload_queries.router,
           app_commands.router, app_queries.router,
           app_instance_commands.router, app_instance_queries.router,
           ops_commands.router, ops_queries.router, audit_logs.router)

#: the busiest commands, served by ``api.hot_routes`` (FastAPI answers what they refuse)
HOT_ENDPOINTS = (billing_commands.admin_adjust_balance,)


def telemetry() -> TelemetryConfig | None:
    """FastAPI's OpenTelemetry settings: its own (on, so that providers set up through
    the ``OTEL_*`` environment are used) when OpenTelemetry is configured there at
    start, else off. FastAPI asks OpenTelemetry for its providers on every request,
    and that lookup alone was a twentieth of the event loop's time."""
    if any(name.startswith("OTEL_") for name in os.environ) or os.getenv("FASTAPI_OTEL_AUTO_CONFIGURE"):
        return None
    return {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}


def implemented_routes() -> dict[str, tuple[str, str]]:
    """operationId -> (METHOD, path) for every route we serve."""
    found = {}
    for router in ROUTERS:
        for route in router.routes:
            if isinstance(route, APIRoute) and route.operation_id:
                for method in route.methods:
                    found[route.operation_id] = (method, route.path)
    return found


def create_app(settings: Settings, stores: Stores | None = None) -> FastAPI:
    """``stores`` may be passed in (tests share one); otherwise it is opened and closed
    with the app. With the direct transport the app also runs the projector."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = stores is None
        app.state.stores = stores or Stores.open(settings)
        app.state.cache = ReadCache(settings.redis_url, settings.redis_prefix,
                                    settings.cache_ttl_seconds)
        app.state.stores.app.start_batching()
        app.state.projector = None
        if settings.transport == "direct" and settings.run_projector:
            app.state.projector = DirectProjector(
                app.state.stores.app, app.state.stores.read_models, settings.pg_dsn or "").start()
        try:
            yield
        finally:
            app.state.stores.app.stop_batching()
            if app.state.projector is not None:
                app.state.projector.stop()
            app.state.cache.close()
            if owned:
                app.state.stores.close()

    app = FastAPI(title="ledgercore", lifespan=lifespan, docs_url="/docs", redoc_url=None,
                  telemetry=telemetry())
    app.state.settings = settings
    for router in ROUTERS:
        app.include_router(router)
    errors.install(app)
    document = served_document(set(implemented_routes()))

    def openapi() -> dict[str, Any]:
        return document

    app.openapi = openapi  # type: ignore[method-assign]
    hot = [route for router in ROUTERS for route in router.routes
           if getattr(route, "endpoint", None) in HOT_ENDPOINTS] if settings.hot_routes else []
    app.state.hot_routes = HotRoutes(app, hot) if hot else None
    inner = app.build_middleware_stack

    def build_middleware_stack() -> Any:
        # RequestContext outermost, around Starlette's own error middleware: a hot route
        # is answered without passing through that stack (it uses the app's exception
        # handlers itself), and every answer, a 500 included, carries X-Request-Id.
        return RequestContext(inner(), max_body_bytes=settings.max_body_bytes,
                              hot=app.state.hot_routes)

    app.build_middleware_stack = build_middleware_stack  # type: ignore[method-assign]
    return app
