"""App catalog publishing, project entitlements and V3 app launch (submit, precheck)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
