"""The run as every client sees it, its status, and the operator's controls."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse

from iota.auth import Operator, check_protocol_version
from iota.orchestrator.routes.deps import Orch
from iota.protocol import Ack, RunInfo, Status

router = APIRouter(tags=["run"])
control = APIRouter(tags=["operator"], dependencies=[Depends(check_protocol_version)])


@router.get("/run")
async def run_info(orch: Orch) -> RunInfo:
    """Model config, stage plan, data plan, schedule and flags: clients never guess them."""
    return orch.orchestrator.run


@router.get("/status")
async def status(orch: Orch) -> Status:
    """Epoch, phase, stages with their miners and queues, tokens trained, latest loss."""
    return await orch.run(orch.orchestrator.status)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(orch: Orch, request: Request) -> str:
    """Prometheus text format."""
    text = await orch.run(orch.orchestrator.metrics)
    admission = request.app.state.admission  # requests in progress and refused under load, when bounded
    return text if admission is None else text + admission.metrics()


@router.get("/events")
async def events(orch: Orch, limit: int = 100) -> list[dict]:
    """The operator's log, newest first: registrations, requeues, phases, bans."""
    return await orch.run(orch.orchestrator.state.events, min(max(limit, 1), 1000))


@control.post("/operator/{action}")
async def operator(action: str, caller: Operator, orch: Orch, target: str = "", value: str = "") -> Ack:
    """pause, resume, close-epoch, ban (target=hotkey, value=reason), unban (target=hotkey), set-flag."""
    return await orch.serve(None, orch.orchestrator.operate, caller.hotkey, action, target, value)
