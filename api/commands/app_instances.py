"""App-instance commands: the project path, its reports, and the V3 twins."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
