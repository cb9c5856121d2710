"""Operator views of the event pipeline: failed outbox events, DLQ messages, ops overview."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
