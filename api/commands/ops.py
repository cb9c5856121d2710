"""Operator repair of the event pipeline: outbox and DLQ requeue and discard."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
