"""``getHealth``: 200 ``{"ok": true}`` when the process and Postgres answer, else 503."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.queries import read_model_errors

router = APIRouter()


@router.get("/api/v1/healthz", operation_id="getHealth")
def get_health(request: Request) -> JSONResponse:
    with read_model_errors(), request.app.state.stores.query_pool.connection(timeout=2) as conn:
        conn.execute("SELECT 1")
    return JSONResponse({"ok": True})
