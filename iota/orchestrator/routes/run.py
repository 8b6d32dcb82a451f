"""The run as every client sees it, its status, and the operator's controls."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response

from iota.auth import Operator, check_protocol_version
from iota.orchestrator.metrics import Figures, Metrics
from iota.orchestrator.routes.cache import PublicCache
from iota.orchestrator.routes.deps import Orch
from iota.orchestrator.routes.validators import cached_score_log
from iota.protocol import Ack, RunInfo, Status

router = APIRouter(tags=["run"])
control = APIRouter(tags=["operator"], dependencies=[Depends(check_protocol_version)])

MAX_EVENTS = 1000
# Comma-separated event kinds: a few names of letters, digits and underscores.
EventKinds = Annotated[
    str, Query(max_length=512, pattern=r"^[A-Za-z0-9_,]*$", description="comma-separated event kinds")
]


async def read_figures(orch: Orch, cache: PublicCache, request: Request) -> Figures:
    """The run's figures for GET /metrics and the dashboard: read at most once per the public cache's TTL."""
    metrics: Metrics = request.app.state.metrics
    log = (await cached_score_log(orch, cache)).log  # the one GET /scores serves: built once for both
    return await cache.get("figures", lambda: orch.run(metrics.read, log))


RunFigures = Annotated[Figures, Depends(read_figures)]


@router.get("/run")
async def run_info(orch: Orch) -> RunInfo:
    """Model config, stage plan, data plan, schedule and flags: clients never guess them."""
    return orch.orchestrator.run


@router.get("/status")
async def status(orch: Orch) -> Status:
    """Epoch, phase, stages with their miners and queues, tokens trained, latest loss."""
    return await orch.run(orch.orchestrator.status)


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(figures: RunFigures, request: Request) -> Response:
    """Prometheus text format, or OpenMetrics when the Accept header asks for it (iota.orchestrator.metrics)."""
    metrics: Metrics = request.app.state.metrics
    body, content_type = metrics.page(figures, request.headers.get("accept", ""))
    return Response(body, media_type=content_type)


@router.get("/events")
async def events(orch: Orch, limit: int = 100, kind: EventKinds = "", exclude: EventKinds = "") -> list[dict]:
    """The operator's log, newest first: registrations, requeues, phases, bans. ``kind``: only these kinds;
    ``exclude``: none of these (``exclude=snapshot,snapshot_taken`` leaves out the snapshot challenges' rows)."""
    kinds, excluded = _names(kind), _names(exclude)
    return await orch.run(orch.orchestrator.state.events, min(max(limit, 1), MAX_EVENTS), kinds, excluded)


def _names(text: str) -> tuple[str, ...]:
    return tuple(name for name in text.split(",") if name)


@control.post("/operator/{action}")
async def operator(action: str, caller: Operator, orch: Orch, target: str = "", value: str = "") -> Ack:
    """pause, resume, close-epoch, ban (target=hotkey, value=reason), unban (target=hotkey), set-flag."""
    return await orch.serve(None, orch.orchestrator.operate, caller.hotkey, action, target, value)
