"""From a run's published settings and an audit's evidence to a verdict: what a validator's audit and the
orchestrator's recomputation of a failing verdict share, so both judge with exactly the same code."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from loguru import logger

from iota.merge import decode_f32
from iota.miner.main import stage_clip
from iota.miner.worker import Batch, TrainFlags, sketch_seed
from iota.model import wire
from iota.model.config import ModelConfig
from iota.model.stages import StageSpec, build_stage
from iota.protocol import EpochPlan, RunInfo, WeightSketch
from iota.train.schedule import LRSchedule
from iota.validator.replay import (
    HopRecord,
    ReplaySetup,
    Snapshot,
    check_snapshot,
    replay,
    snapshot_from_f32,
    snapshot_size,
)


@dataclass(frozen=True)
class Outcome:
    passed: bool
    hops: int  # records replayed
    depth: int  # inner steps replayed
    reason: str = ""
    errors: dict[str, float] = field(default_factory=dict)  # largest relative error per claim kind


@dataclass(frozen=True)
class Evidence:
    """What an audit replays: the stage's setup, the epoch's checkpoint, the miner's records in commit order,
    and, for a window that starts at a challenged step, that snapshot with the sketch committed for it and the
    weights of later snapshots the window reaches (step -> flat fp32)."""

    setup: ReplaySetup
    checkpoint: torch.Tensor
    records: Sequence[HopRecord]
    start: Snapshot | None = None
    start_sketch: WeightSketch | None = None
    later: dict[int, torch.Tensor] = field(default_factory=dict)


def stage_size(setup: ReplaySetup) -> tuple[int, int]:
    """(parameters, tensors) of the stage: what a snapshot's layout depends on."""
    with torch.device("meta"):
        model = build_stage(setup.config, setup.spec, seed=0, device="meta")
    params = list(model.parameters())
    return sum(p.numel() for p in params), len(params)


def decode_challenged(setup: ReplaySetup, data: bytes) -> Snapshot:
    """A challenged snapshot's bytes (flat fp32, `snapshot_to_f32`'s layout), size checked before decoding."""
    n_params, n_tensors = stage_size(setup)
    expected = snapshot_size(n_params, n_tensors, setup.flags.optimizer)
    if len(data) != expected:
        raise ValueError(f"snapshot is {len(data)} bytes, a snapshot of this stage is {expected}")
    return snapshot_from_f32(decode_f32(data), n_params, n_tensors, setup.flags.optimizer)


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


def judge(load: Callable[[], Evidence], who: str, miner: str, epoch: int) -> Outcome:
    """Replay what `load` fetches and judge it. Evidence that cannot be fetched or decoded is a failure with its
    reason: committing to unusable objects is the miner's doing. A window from a snapshot first checks the
    snapshot against the sketch the miner committed for that step."""
    try:
        evidence = load()
        setup, start = evidence.setup, evidence.start
        if start is not None:
            if evidence.start_sketch is None:
                raise ValueError(f"no sketch was committed for step {start.inner_step}")
            seed = sketch_seed(setup.seed, epoch, start.inner_step)
            bound = check_snapshot(setup, start, evidence.start_sketch, seed)
            if not bound.passed:
                reason = f"snapshot of step {start.inner_step} does not match its sketch: {bound.reason}"
                return Outcome(False, 0, 0, reason, {"sketch": float(bound.error)})
        result = replay(
            setup, evidence.records, evidence.checkpoint, snapshot=start, claimed_weights=evidence.later
        )
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
        "{}: audit of {} (stage {}, from step {}): {} after {} hops, {} steps",
        who,
        miner[:10],
        setup.spec.index,
        result.start_step,
        "passed" if result.passed else f"FAILED ({reason})",
        result.hops,
        result.end_step - result.start_step,
    )
    return Outcome(result.passed, result.hops, result.end_step - result.start_step, reason, errors)
