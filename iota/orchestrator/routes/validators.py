"""Validator routes: draw an audit, report its verdict; and the score log every validator computes weights from."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Response

from iota.auth import Validator, check_protocol_version
from iota.orchestrator.routes.deps import Orch
from iota.protocol import Ack, AuditTask, AuditVerdict

router = APIRouter(tags=["validators"], dependencies=[Depends(check_protocol_version)])
public = APIRouter(tags=["validators"])


@router.post(
    "/validators/audit", response_model=AuditTask, responses={204: {"description": "nothing to audit"}}
)
async def audit(caller: Validator, orch: Orch) -> Any:
    """A miner's committed work to replay, drawn where the miner cannot predict it; 204 when there is none."""
    task = await orch.serve(caller.hotkey, orch.orchestrator.auditor.task, caller.hotkey)
    return Response(status_code=204) if task is None else task


@router.post("/validators/verdict")
async def verdict(body: AuditVerdict, caller: Validator, orch: Orch) -> Ack:
    """The outcome of an audit this validator was issued, with its evidence."""
    return await orch.serve(caller.hotkey, orch.orchestrator.auditor.verdict, caller.hotkey, body)  # type: ignore[no-any-return]


@public.get("/scores")
async def scores(orch: Orch) -> dict[str, Any]:
    """The append-only score log (work per miner and epoch, every verdict) that weights are computed from."""
    return await orch.run(orch.orchestrator.auditor.score_log)  # type: ignore[no-any-return]
