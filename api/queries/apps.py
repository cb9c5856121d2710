"""App catalog, versions, entitlements and the V3 apps catalog reads."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
