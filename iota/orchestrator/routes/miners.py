"""Miner registration and the work loop: get work, report it, release it."""

from __future__ import annotations

import random
import time

from fastapi import APIRouter, Depends, Request, Response

from iota.auth import Miner, check_protocol_version
from iota.orchestrator.doorbell import NOW, STAGE
from iota.orchestrator.routes.deps import EpochNumber, ItemId, Orch
from iota.protocol import Ack, PhaseReport, RegisterRequest, Registration, Release, Report, Work, WorkRequest

HELD_HEADER = "X-Iota-Held-Ms"  # how long POST /work held the request before answering

router = APIRouter(tags=["miners"], dependencies=[Depends(check_protocol_version)])


@router.post("/miners/register")
async def register(body: RegisterRequest, caller: Miner, orch: Orch) -> Registration:
    """Join the run: the answer names the miner's stage, its weights and the data it needs."""
    return await orch.serve(caller.hotkey, orch.orchestrator.register, caller.hotkey, body)


@router.post("/miners/heartbeat")
async def heartbeat(caller: Miner, orch: Orch) -> Ack:
    """I am alive (sent on a timer, also while loading weights or computing a long item)."""
    return await orch.serve(caller.hotkey, orch.orchestrator.heartbeat, caller.hotkey)


@router.post("/miners/leave")
async def leave(caller: Miner, orch: Orch) -> Ack:
    """The miner is stopping: everything it holds is requeued now, not when its leases expire."""
    return await orch.serve(caller.hotkey, orch.orchestrator.leave, caller.hotkey)


@router.post("/work")
async def work(body: WorkRequest, caller: Miner, orch: Orch, request: Request, response: Response) -> Work:
    """The next unit of work for this miner (backward first), or how long to wait and why.

    With ``hold_s``, a `wait` in training is not answered at once: the request is held until work for this miner
    may be there (iota.orchestrator.doorbell) or for a random 50-100% of ``hold_s`` (at most the orchestrator's
    max_hold_s), and a `wait` then says to ask again at once. The answer's X-Iota-Held-Ms header says how long it
    was held."""
    o, hotkey = orch.orchestrator, caller.hotkey
    hold_s = min(body.hold_s, o.limits.max_hold_s)
    if hold_s <= 0:
        return await orch.serve(hotkey, o.work, hotkey, body.forward)
    # Holds taken together (miners that registered together) would otherwise end together, and come back together.
    deadline = time.monotonic() + hold_s * random.uniform(0.5, 1.0)
    woken_by_stage, held_s = False, 0.0
    while True:
        answer, ticket = await orch.serve(hotkey, o.work_or_ticket, hotkey, body.forward, woken_by_stage)
        if ticket is None:
            return answer
        since = time.monotonic()
        why = await orch.hold(ticket, deadline - since)
        held_s += time.monotonic() - since
        response.headers[HELD_HEADER] = str(round(1000 * held_s))
        if await request.is_disconnected():
            if why == STAGE:  # the work that woke it is for another miner
                o.scheduler.doorbell.ring_stage(ticket.stage)
            return answer
        if why == NOW:
            # The miner reported meanwhile: what it asks for may differ; answer as things now stand.
            answer = await orch.serve(hotkey, o.work, hotkey, body.forward)
        if why in (None, NOW):
            return answer.model_copy(update={"wait_s": 0.0}) if answer.kind == "wait" else answer
        woken_by_stage = why == STAGE


@router.post("/work/{hop_id}/report")
async def report(hop_id: ItemId, body: Report, caller: Miner, orch: Orch) -> Ack:
    """Report a finished item with its commitments; the orchestrator checks the uploaded object first."""
    return await orch.serve(caller.hotkey, orch.orchestrator.report, caller.hotkey, hop_id, body)


@router.post("/work/{hop_id}/release")
async def release(
    hop_id: ItemId, epoch: EpochNumber, caller: Miner, orch: Orch, body: Release | None = None
) -> Ack:
    """Hand an item back unfinished: it is requeued at once. A bad input (the body's reason) is a claim against
    the miner that produced it, checked before anyone is struck (Orchestrator.release); no body: stopping."""
    reason = body.reason if body is not None else "stopping"
    return await orch.serve(caller.hotkey, orch.orchestrator.release, caller.hotkey, hop_id, epoch, reason)


@router.post("/phase/report")
async def phase_report(body: PhaseReport, caller: Miner, orch: Orch) -> Ack:
    """Report end-of-epoch work: an uploaded pseudo-gradient, merged partitions, or applied weights."""
    return await orch.serve(caller.hotkey, orch.orchestrator.phase_report, caller.hotkey, body)
