"""App-instance reads: instances, members, member and repair operations."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
