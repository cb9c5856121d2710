"""The HTTP ceiling: the same HTTP stack as ledgercore's server, doing nothing.

uvicorn started exactly as ``infra.cli run`` starts ledgercore (``uvicorn.run(app,
host, port, log_level="info", access_log=False)``, one process), FastAPI with
ledgercore's telemetry settings (``api.app.telemetry``)
serving a FastAPI app with one POST handler on adminAdjustBalance's path that only
validates the very ``AdminAdjustBalanceRequest`` model (strict, extra=forbid),
and one GET handler on getBillingBalance's path returning a constant. ``--variant
async`` makes both handlers ``async def``; ``sync`` makes them ``def`` (run in the
thread pool, as ledgercore's handlers are).

``python -m bench.ceiling_app --port P --variant sync|async``
"""

from __future__ import annotations

import argparse
from uuid import UUID

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from api.app import telemetry
from api.commands.billing import AdminAdjustBalanceRequest as AdjustBody

ADJUST = "/api/v1/admin/users/{user_id}/balance"
BALANCE = "/api/v1/billing/balance"
BALANCE_BODY = {"balance": {"amount_minor": 0, "currency": "USD"},
                "balances": [{"amount_minor": 0, "currency": "USD"}]}


def create_app(variant: str) -> FastAPI:
    app = FastAPI(title=f"ceiling-{variant}", telemetry=telemetry())

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse({"ok": True})

    if variant == "async":
        @app.post(ADJUST)
        async def adjust_async(user_id: UUID, body: AdjustBody) -> JSONResponse:
            return JSONResponse({"ok": True})

        @app.get(BALANCE)
        async def balance_async() -> JSONResponse:
            return JSONResponse(BALANCE_BODY)
    else:
        @app.post(ADJUST)
        def adjust_sync(user_id: UUID, body: AdjustBody) -> JSONResponse:
            return JSONResponse({"ok": True})

        @app.get(BALANCE)
        def balance_sync() -> JSONResponse:
            return JSONResponse(BALANCE_BODY)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--variant", choices=("sync", "async"), required=True)
    args = parser.parse_args()
    uvicorn.run(create_app(args.variant), host="127.0.0.1", port=args.port, log_level="info",
                access_log=False)


if __name__ == "__main__":
    main()
