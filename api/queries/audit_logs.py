"""Audit logs: caller, project, org and admin lists, exports and V3 evidence."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
