"""The run as every client sees it, its status, and the operator's controls."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse

from iota.auth import Operator, check_protocol_version
from iota.orchestrator.routes.deps import Orch, refusals
from iota.protocol import Ack, RunInfo, Status

router = APIRouter(tags=["run"])
control = APIRouter(tags=["operator"], dependencies=[Depends(check_protocol_version)])


@router.get("/run")
def run_info(orch: Orch) -> RunInfo:
    """Model config, stage plan, data plan, schedule and flags: clients never guess them."""
    return orch.run


@router.get("/status")
def status(orch: Orch) -> Status:
    """Epoch, phase, stages with their miners and queues, tokens trained, latest loss."""
    return orch.status()


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(orch: Orch) -> str:
    """Prometheus text format."""
    return orch.metrics()


@router.get("/events")
def events(orch: Orch, limit: int = 100) -> list[dict]:
    """The operator's log, newest first: registrations, requeues, phases, bans."""
    return orch.state.events(min(max(limit, 1), 1000))


@control.post("/operator/{action}")
def operator(action: str, caller: Operator, orch: Orch, target: str = "", value: str = "") -> Ack:
    """pause, resume, close-epoch, ban (target=hotkey, value=reason), unban (target=hotkey), set-flag."""
    with refusals():
        return orch.operate(caller.hotkey, action, target, value)
