"""Validator routes: draw an audit, report its verdict; and the score log every validator computes weights from."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response

from iota.auth import Validator, check_protocol_version
from iota.orchestrator.routes.cache import Cache, PublicCache
from iota.orchestrator.routes.deps import MAX_ID, Orch, Served
from iota.protocol import Ack, AuditTask, AuditVerdict

router = APIRouter(tags=["validators"], dependencies=[Depends(check_protocol_version)])
public = APIRouter(tags=["validators"])

MAX_VERDICTS_PAGE = 1000


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


@public.get("/scores", response_class=Response, responses={200: {"content": {"application/json": {}}}})
async def scores(orch: Orch, cache: PublicCache) -> Response:
    """The append-only score log (work per miner and epoch, every verdict) that weights are computed from, as it
    stood at most a second ago."""
    log = await cached_score_log(orch, cache)
    return Response(log.body, media_type="application/json")


@public.get("/scores/verdicts")
async def score_verdicts(
    orch: Orch,
    cache: PublicCache,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_VERDICTS_PAGE)] = MAX_VERDICTS_PAGE,
) -> dict[str, Any]:
    """A page of the score log's verdicts, oldest first (they only grow: a reader follows them by offset)."""
    verdicts = (await cached_score_log(orch, cache)).log["verdicts"]
    return {"total": len(verdicts), "offset": offset, "verdicts": verdicts[offset : offset + limit]}


@dataclass(frozen=True)
class ScoreLog:
    log: dict[str, Any]
    body: bytes  # encoded once, however many read it


async def cached_score_log(orch: Served, cache: Cache) -> ScoreLog:
    """The score log is rebuilt from the whole state: at most once a second, whoever asks."""

    def build() -> ScoreLog:
        log = orch.orchestrator.auditor.score_log()
        return ScoreLog(log, json.dumps(log, separators=(",", ":")).encode())

    return await cache.get("scores", lambda: orch.run(build))
