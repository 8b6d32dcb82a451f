"""Validator routes: draw an audit, report its verdict; and the score log every validator computes weights from."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Response

from iota.auth import Validator, check_protocol_version
from iota.orchestrator.routes.deps import Orch, refusals
from iota.protocol import Ack, AuditTask, AuditVerdict

router = APIRouter(tags=["validators"], dependencies=[Depends(check_protocol_version)])
public = APIRouter(tags=["validators"])


@router.post(
    "/validators/audit", response_model=AuditTask, responses={204: {"description": "nothing to audit"}}
)
def audit(caller: Validator, orch: Orch) -> Any:
    """A miner's committed work to replay, drawn where the miner cannot predict it; 204 when there is none."""
    with refusals(orch, caller.hotkey):
        task = orch.auditor.task(caller.hotkey)
    return Response(status_code=204) if task is None else task


@router.post("/validators/verdict")
def verdict(body: AuditVerdict, caller: Validator, orch: Orch) -> Ack:
    """The outcome of an audit this validator was issued, with its evidence."""
    with refusals(orch, caller.hotkey):
        return orch.auditor.verdict(caller.hotkey, body)


@public.get("/scores")
def scores(orch: Orch) -> dict[str, Any]:
    """The append-only score log (work per miner and epoch, every verdict) that weights are computed from."""
    return orch.auditor.score_log()
