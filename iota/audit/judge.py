"""From a run's published settings and an audit's evidence to a verdict: what a validator's audit and the
orchestrator's recomputation of a failing verdict share, so both judge with exactly the same code.

An audit replays a window of the miner's epoch; once the epoch has ended it also checks what the miner committed
at its end: the pseudo-gradient it uploaded (against the sketch of its last step, and against the replay's end
of epoch when the window reaches it), and the partitions it merged as an owner, recomputed from the same uploads
with the merge's own code (iota.merge).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from loguru import logger

from iota.audit.compare import Verdict, compare_change
from iota.audit.records import HopRecord
from iota.audit.replay import (
    ReplayResult,
    ReplaySetup,
    check_pseudo_gradient,
    check_pseudo_gradient_sketch,
    check_snapshot,
    replay,
)
from iota.merge import (
    BlobStore,
    MergePlan,
    merge_partition,
    partition_digest,
    read_previous,
)
from iota.model import wire
from iota.model.config import ModelConfig
from iota.model.flat import decode_f32, size
from iota.model.stages import StageSpec, build_stage
from iota.protocol import EpochPlan, RunInfo, WeightSketch
from iota.protocol.bounds import MAX_TEXT
from iota.train.schedule import LRSchedule
from iota.train.snapshot import Snapshot, snapshot_from_f32, snapshot_size
from iota.train.worker import Batch, TrainFlags, sketch_seed, stage_clip

MERGE_TOLERANCE = 1e-6
"""Largest relative error of a merged slice whose digest differs from the recomputation's. The merge is one plain
fp32 op per element in a fixed order (iota.merge.outer), so an honest owner's slices are bit-identical: owners'
digests are compared exactly. The tolerance only keeps a one-ulp difference of a scale factor (a clip factor
from a float64 sum) from failing an honest owner: that moves a slice by ~1.2e-7 of itself; any poisoning worth
doing moves it by far more."""


@dataclass(frozen=True)
class Outcome:
    passed: bool
    hops: int  # records replayed
    depth: int  # inner steps replayed
    reason: str = ""
    errors: dict[str, float] = field(default_factory=dict)  # largest finite relative error per claim kind

    def __post_init__(self) -> None:
        # A verdict's reason is bounded on the wire: a long list of failed partitions is cut here, not refused there.
        if len(self.reason) > MAX_TEXT:
            object.__setattr__(self, "reason", self.reason[: MAX_TEXT - 3] + "...")


@dataclass(frozen=True)
class FinalClaim:
    """The end of the miner's epoch as it committed it: its uploaded pseudo-gradient (flat fp32), its last inner
    step (0: it took none) and the sketch it committed with that step, in its last session of the epoch."""

    pseudo_gradient: torch.Tensor
    step: int
    sketch: WeightSketch | None
    session: int = 0


@dataclass(frozen=True)
class MergeClaim:
    """The miner's merge of its partitions as an owner: the plan, the digest it reported per partition, and a
    store that reads the uploads, the previous weights and momentum, and the slices it uploaded."""

    plan: MergePlan
    owner: str
    digests: Mapping[int, str]
    store: BlobStore
    upload_shas: Mapping[str, str]  # upload key -> the sha256 its submitter reported


@dataclass(frozen=True)
class Evidence:
    """What an audit replays: the stage's setup, the epoch's checkpoint, the miner's records in commit order with
    the session each was committed in (empty: all one session), and, for a window that starts at a challenged step, that snapshot with the sketch committed for it and the
    weights of later snapshots the window reaches (step -> flat fp32); once the epoch has ended, the claims the
    miner made at its end (its pseudo-gradient, and its merge if it owned partitions)."""

    setup: ReplaySetup
    checkpoint: torch.Tensor
    records: Sequence[HopRecord]
    start: Snapshot | None = None
    start_sketch: WeightSketch | None = None
    later: dict[int, torch.Tensor] = field(default_factory=dict)
    final: FinalClaim | None = None
    merge: MergeClaim | None = None
    sessions: Sequence[int] = ()


def stage_size(setup: ReplaySetup) -> tuple[int, int]:
    """(parameters, tensors) of the stage: what a snapshot's layout depends on."""
    with torch.device("meta"):
        model = build_stage(setup.config, setup.spec, seed=0, device="meta")
    return size(model)


def decode_challenged(setup: ReplaySetup, data: bytes) -> Snapshot:
    """A challenged snapshot's bytes (flat fp32, `snapshot_to_f32`'s layout), size checked before decoding; any
    other bytes are a DecodeError."""
    n_params, n_tensors = stage_size(setup)
    count = snapshot_size(n_params, n_tensors, setup.flags.optimizer) // 4
    return snapshot_from_f32(decode_f32(data, count), n_params, n_tensors, setup.flags.optimizer)


def decode_pseudo_gradient(setup: ReplaySetup, data: bytes) -> torch.Tensor:
    """An uploaded pseudo-gradient's bytes (flat fp32 of the whole stage), size checked before decoding; any other
    bytes are a DecodeError."""
    n_params, _ = stage_size(setup)
    return decode_f32(data, n_params)


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
        run.codec,
    )
    return ReplaySetup(
        config=ModelConfig.from_dict(run.model.model_dump()),
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
    shape = (run.micro_batch, run.model.seq_len, setup.config.wire_width)
    return wire.encoded_size(shape, setup.flags.wire_dtype)


def judge(load: Callable[[], Evidence], who: str, miner: str, epoch: int) -> Outcome:
    """Replay what `load` fetches and judge it. Evidence that cannot be fetched or decoded is a failure with its
    reason: committing to unusable objects is the miner's doing. A window from a snapshot first checks the
    snapshot against the sketch the miner committed for that step. Then the claims of the epoch's end, when the
    evidence holds them (`end_of_epoch`)."""
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
            setup,
            evidence.records,
            evidence.checkpoint,
            snapshot=start,
            claimed_weights=evidence.later,
            sessions=evidence.sessions,
        )
        end, notes = end_of_epoch(evidence, result, epoch)
    except (ValueError, KeyError, OSError, RuntimeError) as error:
        return Outcome(False, 0, 0, f"committed objects unusable: {type(error).__name__}: {error}")
    errors: dict[str, float] = {}
    named = [(check.verdict.kind, check.verdict) for check in result.checks] + end
    for name, verdict in named:
        # A claim that could not be compared at all scores inf, which JSON cannot carry: its reason says why.
        if math.isfinite(verdict.error):
            errors[name] = max(errors.get(name, 0.0), float(verdict.error))
    failed = [f"{name}: {verdict.reason}" for name, verdict in end if not verdict.passed]
    replayed = result.stopped or "; ".join(
        f"{c.direction} of sample {c.sample_id}: {c.verdict.reason}" if c.sample_id >= 0 else c.verdict.reason
        for c in result.failures[:3]
    )
    passed = result.passed and not failed
    # A passing verdict still says what could not be judged, so an operator can see why.
    reason = "; ".join([part for part in (replayed, *failed) if part]) if not passed else "; ".join(notes)
    logger.info(
        "{}: audit of {} (stage {}, from step {}): {} after {} hops, {} steps; end of epoch: {}",
        who,
        miner[:10],
        setup.spec.index,
        result.start_step,
        "passed" if passed else f"FAILED ({reason})",
        result.hops,
        result.end_step - result.start_step,
        _summary(end),
    )
    return Outcome(passed, result.hops, result.end_step - result.start_step, reason, errors)


def end_of_epoch(
    evidence: Evidence, result: ReplayResult, epoch: int
) -> tuple[list[tuple[str, Verdict]], list[str]]:
    """The checks of what the miner committed at the end of the epoch, named by what they check, and notes on
    what could not be judged (through no fault of the miner's).

    - `pseudo_gradient_sketch`: checkpoint minus the upload against the sketch of the miner's last step: cheap,
      no replay, in every audit of an ended epoch.
    - `pseudo_gradient`: the upload against the replay's end of epoch, when the window reached the last step of
      the miner's last session (the one whose weights it uploaded: a restart voids what came before).
    - `merge`: each partition the miner merged as an owner, recomputed from the same uploads.
    """
    checks: list[tuple[str, Verdict]] = []
    notes: list[str] = []
    final, setup = evidence.final, evidence.setup
    if final is not None:
        seed = sketch_seed(setup.seed, epoch, final.step)
        bound = check_pseudo_gradient_sketch(
            setup, evidence.checkpoint, final.pseudo_gradient, final.step, final.sketch, seed
        )
        checks.append(("pseudo_gradient_sketch", _explained(bound, f"against its last step {final.step}")))
        if result.end_step == final.step and result.session == final.session and not result.stopped:
            limits = setup.thresholds
            checks.append(
                ("pseudo_gradient", check_pseudo_gradient(result, final.pseudo_gradient, limits, final.step))
            )
    if evidence.merge is not None:
        verdicts, skipped = check_merge(evidence.merge)
        checks += [("merge", verdict) for verdict in verdicts]
        notes += skipped
    return checks, notes


def _summary(end: list[tuple[str, Verdict]]) -> str:
    """What the end-of-epoch checks covered, for the log: each check's name and, if more than one, its count."""
    counts: dict[str, int] = {}
    for name, _ in end:
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{name} x{n}" if n > 1 else name for name, n in counts.items()) or "not yet"


def _explained(verdict: Verdict, context: str) -> Verdict:
    if verdict.passed:
        return verdict
    return Verdict(False, verdict.kind, verdict.error, verdict.threshold, f"{verdict.reason} ({context})")


def check_merge(claim: MergeClaim) -> tuple[list[Verdict], list[str]]:
    """Each partition the owner reported merging, recomputed with `merge_partition` from the same uploads, the
    same previous weights and momentum; and its uploaded slices against its report. Returns a verdict per
    partition, and a note per partition that could not be judged: the objects the owner merged but did not write
    (an upload that no longer matches its submitter's digest, previous state that cannot be read) are not its
    doing, so they fail nobody here (a submitter's own audit answers for its upload)."""
    plan, owner, store = claim.plan, claim.owner, claim.store
    verdicts: list[Verdict] = []
    notes: list[str] = []
    for index in plan.partitions_of(owner):
        claimed = claim.digests.get(index)
        if claimed is None:
            continue  # not reported as merged: nothing was claimed
        partition = plan.partitions[index]
        try:
            weights, momentum = (
                store.get(plan.output_key(index, owner, kind)) for kind in ("weights", "momentum")
            )
        except (KeyError, OSError, RuntimeError) as error:
            verdicts.append(Verdict.refuse("merge", f"partition {index}: its slices cannot be read: {error}"))
            continue
        uploaded = partition_digest(weights, momentum)
        if uploaded != claimed:
            reason = f"partition {index}: its uploaded slices are not the result it reported"
            verdicts.append(Verdict.refuse("merge", reason))
            continue
        if len(weights) != 4 * partition.size or len(momentum) != 4 * partition.size:
            verdicts.append(Verdict.refuse("merge", f"partition {index}: slices of the wrong size"))
            continue
        try:
            previous, prev_momentum = read_previous(store, partition)
            result = merge_partition(store, plan, index, previous, prev_momentum)
        except (KeyError, ValueError, OSError, RuntimeError) as error:
            notes.append(f"partition {index} not judged: previous state unreadable: {error}")
            continue
        if result.digest == claimed:
            verdicts.append(Verdict(True, "merge", 0.0, MERGE_TOLERANCE))
            continue
        verdict = _worst(
            compare_change("merge", decode_f32(weights), result.weights, previous, MERGE_TOLERANCE),
            compare_change("merge", decode_f32(momentum), result.momentum, None, MERGE_TOLERANCE),
        )
        if verdict.passed:
            verdicts.append(verdict)
            continue
        unread = sorted(h[:10] for h, why in result.skipped.items() if why.startswith("unreadable"))
        changed = (
            f"the recomputation could not read the uploads of {', '.join(unread)}"
            if unread
            else _changed_uploads(claim)
        )
        if changed:
            notes.append(f"partition {index} not judged: {changed}")
            continue
        reason = f"partition {index} is not the merge of the uploads: {verdict.reason}"
        verdicts.append(Verdict(False, "merge", verdict.error, verdict.threshold, reason))
    return verdicts, notes


def _worst(*verdicts: Verdict) -> Verdict:
    failing = [v for v in verdicts if not v.passed]
    return max(failing or verdicts, key=lambda v: v.error)


def _changed_uploads(claim: MergeClaim) -> str:
    """Why the uploads may not be what the owner merged: one that is unreadable now, or no longer matches the
    digest its submitter reported (a presigned PUT stays valid for a while); "" when every one is intact."""
    for submitter in claim.plan.submitters:
        key = submitter.upload_key
        committed = claim.upload_shas.get(key)
        try:
            data = claim.store.get(key)
        except (KeyError, OSError, RuntimeError) as error:
            return f"the upload of {submitter.hotkey[:10]} cannot be read: {error}"
        if committed and hashlib.sha256(data).hexdigest() != committed:
            return f"the upload of {submitter.hotkey[:10]} no longer matches its digest"
    return ""
