"""Miner registration and the work loop: get work, report it, release it."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from iota.auth import Miner, check_protocol_version
from iota.orchestrator.routes.deps import EpochNumber, ItemId, Orch
from iota.protocol import Ack, RegisterRequest, Registration, Report, Work, WorkRequest

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
async def work(body: WorkRequest, caller: Miner, orch: Orch) -> Work:
    """The next unit of work for this miner (backward first), or how long to wait and why."""
    return await orch.serve(caller.hotkey, orch.orchestrator.work, caller.hotkey, body.forward)


@router.post("/work/{hop_id}/report")
async def report(hop_id: ItemId, body: Report, caller: Miner, orch: Orch) -> Ack:
    """Report a finished item with its commitments; the orchestrator checks the uploaded object first."""
    return await orch.serve(caller.hotkey, orch.orchestrator.report, caller.hotkey, hop_id, body)


@router.post("/work/{hop_id}/release")
async def release(hop_id: ItemId, epoch: EpochNumber, caller: Miner, orch: Orch) -> Ack:
    """Hand an item back unfinished (the miner is stopping): it is requeued at once."""
    return await orch.serve(caller.hotkey, orch.orchestrator.release, caller.hotkey, hop_id, epoch)


@router.post("/phase/report")
async def phase_report(body: Report, caller: Miner, orch: Orch) -> Ack:
    """Report end-of-epoch work: an uploaded pseudo-gradient, merged partitions, or applied weights."""
    return await orch.serve(caller.hotkey, orch.orchestrator.phase_report, caller.hotkey, body)
