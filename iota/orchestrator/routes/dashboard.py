"""The dashboard page at GET /: a live view of /status for people."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["dashboard"])


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def dashboard() -> str:
    return resources.files("iota.orchestrator").joinpath("dashboard.html").read_text(encoding="utf-8")
