"""From a run's published settings and an audit's evidence to a verdict: what a validator's audit and the
orchestrator's recomputation of a failing verdict share, so both judge with exactly the same code."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from loguru import logger

from iota.miner.main import stage_clip
from iota.miner.worker import Batch, TrainFlags
from iota.model import wire
from iota.model.config import ModelConfig
from iota.model.stages import StageSpec
from iota.protocol import EpochPlan, RunInfo
from iota.train.schedule import LRSchedule
from iota.validator.replay import HopRecord, ReplaySetup, replay


@dataclass(frozen=True)
class Outcome:
    passed: bool
    hops: int  # records replayed
    depth: int  # inner steps replayed
    reason: str = ""
    errors: dict[str, float] = field(default_factory=dict)  # largest relative error per claim kind


def replay_setup(
    run: RunInfo, stage: int, plan: EpochPlan, bf16: bool, batch: Batch, device: torch.device
) -> ReplaySetup:
    """The ReplaySetup of one stage in the epoch `plan` describes, for a miner of the declared precision."""
    info = run.stages[stage]
    flags = TrainFlags(
        run.micro_batch,
        run.accumulate,
        run.optimizer,
        run.weight_decay,
        stage_clip(run, stage),
        wire.wire_dtype(run.wire_dtype),
    )
    return ReplaySetup(
        config=ModelConfig.from_dict(run.model),
        spec=StageSpec(info.index, len(run.stages), info.first_layer, info.last_layer),
        seed=run.seed,
        flags=flags,
        batch=batch,
        schedule=LRSchedule.from_dict(run.schedule),
        tokens_at_start=plan.tokens_at_start,
        replicas=plan.replicas,
        device=device,
        bf16=bf16,
    )


def activation_limit(run: RunInfo, setup: ReplaySetup) -> int:
    """The largest object a hop may name: one micro-batch of wire activations."""
    shape = (run.micro_batch, int(run.model["seq_len"]), setup.config.wire_width)
    return wire.encoded_size(shape, setup.flags.wire_dtype)


def judge(
    load: Callable[[], tuple[ReplaySetup, torch.Tensor, Sequence[HopRecord]]], who: str, miner: str
) -> Outcome:
    """Replay what `load` fetches (setup, checkpoint weights, the miner's records) and judge it. Evidence that
    cannot be fetched or decoded is a failure with its reason: committing to unusable objects is the miner's."""
    try:
        setup, start, records = load()
        result = replay(setup, records, start)
    except (ValueError, KeyError, OSError, RuntimeError) as error:
        return Outcome(False, 0, 0, f"committed objects unusable: {type(error).__name__}: {error}")
    errors: dict[str, float] = {}
    for check in result.checks:
        kind = check.verdict.kind
        errors[kind] = max(errors.get(kind, 0.0), float(check.verdict.error))
    reason = result.stopped or "; ".join(
        f"{c.direction} of sample {c.sample_id}: {c.verdict.reason}" for c in result.failures[:3]
    )
    logger.info(
        "{}: audit of {} (stage {}): {} after {} hops, {} steps",
        who,
        miner[:10],
        setup.spec.index,
        "passed" if result.passed else f"FAILED ({reason})",
        result.hops,
        result.end_step - result.start_step,
    )
    return Outcome(result.passed, result.hops, result.end_step - result.start_step, reason, errors)
