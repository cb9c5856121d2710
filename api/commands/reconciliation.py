"""``adminRunBillingReconciliation`` and its V3 twins ``runV3PlatformFinanceReconciliation``
(+``Compat``): run the usage-ledger checks now and record the run (202, "completed and
recorded").

The checks (``domain.reconciliation.inspect``) fold the event log in a worker thread,
outside the batch writer; the batch writer then only saves the finished run. A check
that breaks (anything but the event store being unreachable, which is 503) is recorded
as a ``failed`` run with its reason. The three routes share one idempotency scope, so a
key replays the same run on any of them without checking again.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone
from uuid import uuid4, uuid5

from eventsourcing.persistence import InterfaceError, OperationalError
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from api import idempotency
from api.auth import Principal, requires
from api.commands import context, renderer, run
from domain.idempotency import record_id_for
from domain.reconciliation import NAMESPACE, Report, inspect, record_run

log = logging.getLogger("ledgercore.reconciliation")
router = APIRouter()
#: running a check appends a run record and moves no money: an operations write
OPS_WRITE = requires("platform.ops.write")
OPERATION = "adminRunBillingReconciliation"


@router.post("/api/v1/admin/billing/reconciliation", operation_id=OPERATION)
@router.post("/api/v1/platform/finance/reconciliation",
             operation_id="runV3PlatformFinanceReconciliation")
@router.post("/api/v1/v3/platform/finance/reconciliation",
             operation_id="runV3PlatformFinanceReconciliationCompat")
async def run_billing_reconciliation(request: Request,
                                     principal: Principal = Depends(OPS_WRITE)) -> JSONResponse:
    claim = idempotency.claim(request, principal, OPERATION, None)
    ctx = context(request, principal, "admin", claim)
    app = request.app.state.stores.app
    report: Report | None = None
    failure: str | None = None
    replay = claim is not None and app.get_or_none(record_id_for(claim.scope)) is not None
    if not replay:  # a replay is answered from its record: nothing to check
        try:
            report = await asyncio.to_thread(inspect, app)
        except (OperationalError, InterfaceError):
            raise
        except Exception as error:  # noqa: BLE001 - recorded as the run's failure
            log.exception("reconciliation checks failed (correlation_id=%s)", ctx.correlation_id)
            failure = f"{type(error).__name__}: {error}"[:500]
    run_id = uuid5(NAMESPACE, claim.scope) if claim else uuid4()
    command = record_run(ctx, run_id=run_id, report=report, failure_reason=failure,
                         completed_at=datetime.now(timezone.utc),
                         render=renderer(request, 202, lambda result: result))
    return await run(request, command)
