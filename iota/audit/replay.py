"""Replay a miner's committed hops with the miner's own code, and compare every claim against the replay.

The inner optimizer resets at every APPLY, so a miner's weights at any point of an epoch follow from the epoch's
checkpoint and the hops it committed, in commit order: rebuilding a StageWorker from the checkpoint (or from a
challenged snapshot) and feeding it the same inputs, stepping at the same points with the published learning
rate, reproduces every output, input gradient, loss and pseudo-gradient the miner should have produced. The
replay runs in the miner's declared precision and device type; how close "the same" is, is calibrated in
bench/calibrate_audit.py and judged in `compare`.

Pure: the caller fetches the records and objects (the bucket keeps a hop's tensors for the audit window) and
passes them in; nothing here touches the network.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from iota.audit.compare import (
    Drift,
    Thresholds,
    Verdict,
    compare_change,
    compare_loss,
    compare_sketch,
    thresholds,
)
from iota.audit.records import HopRecord
from iota.model import codecs, wire
from iota.model.config import ModelConfig
from iota.model.stages import StageSpec
from iota.protocol import WeightSketch
from iota.train.schedule import LRSchedule, inner_step_lr
from iota.train.snapshot import Snapshot, restore_snapshot
from iota.train.worker import Batch, Cached, StageWorker, TrainFlags

WorkerFactory = Callable[..., StageWorker]  # StageWorker's constructor signature
REPLAY_CACHE = (
    1 << 30
)  # the replay never evicts: a forward the miner evicted has no backward record to replay


@dataclass(frozen=True)
class ReplaySetup:
    """What fixes one stage's computation in one epoch: the run's published values and the miner's precision."""

    config: ModelConfig
    spec: StageSpec
    seed: int
    flags: TrainFlags
    batch: Batch  # sample id -> (tokens, targets), from the run's data plan
    schedule: LRSchedule
    tokens_at_start: int  # the epoch plan's
    replicas: int  # the epoch plan's, for this stage
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    bf16: bool = False  # the miner's declared precision: bf16 autocast (else fp32)

    def lr(self, step: int) -> float:
        """Inner step `step`'s learning rate, by the rule every stage and the baseline use."""
        micro_batch_tokens = self.flags.micro_batch * self.config.seq_len
        return inner_step_lr(
            self.schedule,
            self.tokens_at_start,
            step,
            self.flags.accumulate,
            micro_batch_tokens,
            self.replicas,
        )

    @property
    def thresholds(self) -> Thresholds:
        return thresholds(self.bf16)

    @property
    def codec(self) -> codecs.Codec:
        """The run's activation codec at this stage's boundaries: the replay decodes and encodes as miners do."""
        shape = (self.flags.micro_batch, self.config.seq_len, self.config.wire_width)
        return codecs.build(self.flags.codec, shape, self.flags.wire_dtype, self.seed)

    def worker(
        self, weights: torch.Tensor, factory: WorkerFactory = StageWorker, cache_size: int = REPLAY_CACHE
    ) -> StageWorker:
        """A worker holding `weights` (flat fp32) in this precision, as a miner holds them after APPLY.

        StageWorker only autocasts on CUDA; a CPU miner or validator that declares bf16 gets CPU autocast by
        setting `use_autocast` after construction, so the same forward code runs in bf16 on either device.
        """
        worker = factory(
            self.config, self.spec, self.seed, self.flags, self.batch, self.device, self.bf16, cache_size
        )
        worker.use_autocast = self.bf16
        worker.load_flat(weights)
        return worker


# -- replay ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HopCheck:
    """The verdict on one claim of one hop (or on the weights at a step boundary)."""

    index: int  # position in the records (-1 for weights)
    sample_id: int
    direction: str  # forward, backward, or "step" for weights
    depth: int  # inner steps replayed before this hop ran
    verdict: Verdict


@dataclass
class ReplayResult:
    checks: list[HopCheck]
    epoch_start: torch.Tensor  # the checkpoint's weights
    start: torch.Tensor  # the weights the replay started from (checkpoint or snapshot)
    end: torch.Tensor  # the replay's weights after its last hop
    start_step: int
    end_step: int
    hops: int  # records replayed
    complete: bool  # the replay reached the end of the records (so `end` is the miner's end of epoch)
    stopped: str = ""  # why the replay stopped early on a protocol failure
    session: int = 0  # the session (of the miner's epoch) whose weights `end` is

    @property
    def passed(self) -> bool:
        return not self.stopped and all(check.verdict.passed for check in self.checks)

    @property
    def failures(self) -> list[HopCheck]:
        return [check for check in self.checks if not check.verdict.passed]


def replay(
    setup: ReplaySetup,
    records: Sequence[HopRecord],
    epoch_start: torch.Tensor,
    *,
    snapshot: Snapshot | None = None,
    max_steps: int | None = None,
    claimed_weights: Mapping[int, torch.Tensor] | None = None,
    limits: Thresholds | None = None,
    sessions: Sequence[int] = (),
) -> ReplayResult:
    """Replay at most `max_steps` inner steps (default: the calibrated depth D for the miner's precision) of each
    session of one miner's epoch in `records`, and judge each hop in that window against `limits` (default: the
    calibrated thresholds).

    `records` are the miner's hops of the epoch in commit order, and `sessions[i]` the session records[i] was
    committed in (empty: all one session). A miner that restarts registers a new session and starts again from
    the epoch's checkpoint at inner step 0, so each session is a stream of its own: the replay restarts from
    `epoch_start` wherever the session changes, and replays at most `max_steps` steps of each.

    A window starts at the beginning (from `epoch_start`, the checkpoint) or, in the last session, right after the
    hop that completed `snapshot.inner_step`. Hops whose forward came before the window have their input restored
    as a miner's cache holds it, with the graph marked stale, so their backward recomputes the forward with the
    window's weights exactly as the miner's did. `claimed_weights` maps an inner step to the flat weights the
    miner committed at that step boundary in the snapshot's session (from later snapshots); each one reached in the
    window is compared with the replay. Across the window's hops, the errors of each kind must not add up in one
    direction (`Drift`): a bias every hop keeps under its threshold fails the window.
    """
    limits = limits or setup.thresholds
    max_steps = limits.depth if max_steps is None else max_steps
    session_of = list(sessions) or [0] * len(records)
    if len(session_of) != len(records):
        raise ValueError(f"{len(session_of)} sessions for {len(records)} records")
    worker = setup.worker(epoch_start)
    first = 0
    if snapshot is not None and snapshot.inner_step > 0:
        restore_snapshot(worker, snapshot, epoch_start)
        first = _window_start(records, session_of, snapshot.inner_step)
        last = session_of[-1]
        before = zip(records[:first], session_of[:first], strict=True)
        _restore_in_flight(worker, setup, [record for record, session in before if session == last])
    start_step, start = worker.inner_step, worker.flat_weights()
    checks: list[HopCheck] = []
    session = session_of[first] if first < len(records) else (session_of[-1] if records else 0)
    result = ReplayResult(checks, epoch_start, start, start, start_step, start_step, 0, True, session=session)
    pending_weights = dict(claimed_weights or {})
    drifts = {kind: Drift(kind) for kind in ("activation", "gradient")}
    for index in range(first, len(records)):
        record = records[index]
        if session_of[index] != session:  # a restart: the next session begins at the checkpoint
            session, pending_weights = session_of[index], {}
            worker = setup.worker(epoch_start)
            start_step, start = 0, epoch_start
        depth = worker.inner_step - start_step
        if depth >= max_steps:
            result.complete = False
            continue  # this session's window is done; a later session's begins at its first hop
        problem = _protocol_problem(setup, worker, record, records[0].epoch)
        if not problem:
            try:
                # drift adds up over the hops the thresholds were calibrated for (all of them unless a caller
                # replays past D, as the calibration does)
                within = drifts if depth < limits.depth else {}
                checks.extend(_replay_hop(setup, worker, record, index, depth, limits, within))
            except wire.WireError as error:
                problem = f"input does not decode: {error}"
        if not problem and worker.step_due():
            worker.step(setup.lr(worker.inner_step))
            claimed = pending_weights.pop(worker.inner_step, None)
            if claimed is not None:
                verdict = compare_change("weights", claimed, worker.flat_weights(), start, limits.weights)
                checks.append(HopCheck(-1, -1, "step", worker.inner_step - start_step, verdict))
        if not problem and record.inner_step != worker.inner_step:
            problem = f"reported inner step {record.inner_step}, the replay is at {worker.inner_step}"
        if problem:
            refused = Verdict.refuse("protocol", problem)
            checks.append(HopCheck(index, record.sample_id, record.direction, depth, refused))
            result.stopped, result.complete = problem, False
            break
        result.hops += 1
    deepest = max((check.depth for check in checks), default=0)
    for kind, drift in drifts.items():
        judged = drift.verdict(limits.for_kind(kind))
        if judged is not None:
            checks.append(HopCheck(-1, -1, "window", deepest, judged))
    return _ended(result, worker, start, start_step, session)


def _ended(
    result: ReplayResult, worker: StageWorker, start: torch.Tensor, start_step: int, session: int
) -> ReplayResult:
    """The result as of where the replay stands: in `session`, whose window began at `start_step`."""
    result.start, result.start_step, result.session = start, start_step, session
    result.end, result.end_step = worker.flat_weights(), worker.inner_step
    return result


def _window_start(records: Sequence[HopRecord], sessions: Sequence[int], step: int) -> int:
    """Right after the first hop of the last session that reached `step`: a snapshot is of the miner's state
    as it stands, so of its last session (a restart forgets the earlier sessions' snapshots)."""
    last = sessions[-1] if sessions else 0
    for index, record in enumerate(records):
        if sessions[index] == last and record.inner_step >= step:
            return index + 1
    raise ValueError(f"no committed hop reached inner step {step}: the snapshot is not from these records")


def _restore_in_flight(worker: StageWorker, setup: ReplaySetup, before: Sequence[HopRecord]) -> None:
    pending: dict[int, HopRecord] = {}
    for record in before:
        if record.direction == "forward" and not setup.spec.is_tail:
            pending[record.sample_id] = record
        elif record.direction == "backward":
            pending.pop(record.sample_id, None)
    for sample_id, record in pending.items():
        if setup.spec.is_head:
            x = setup.batch(sample_id)[0].to(setup.device)
        else:
            x = _decode(setup, record.input).to(setup.device)
        # step -1: whatever the miner kept, it ran at an earlier step, so its backward recomputes the forward.
        worker.cache[sample_id] = Cached(x, None, -1)


def _protocol_problem(setup: ReplaySetup, worker: StageWorker, record: HopRecord, epoch: int) -> str:
    if record.stage != setup.spec.index:
        return f"a hop of stage {record.stage} in stage {setup.spec.index}'s records"
    if record.epoch != epoch:
        return f"a hop of epoch {record.epoch} among epoch {epoch}'s records"
    if record.direction == "forward":
        # A sample already in the cache is a restarted sample coming back: the orchestrator assigns every hop,
        # and the worker replaces the orphaned graph of the earlier attempt (StageWorker.forward), as the replay's.
        if not setup.spec.is_head and record.input is None:
            return "a forward without an input object"
        return ""
    if record.direction != "backward":
        return f"unknown direction {record.direction!r}"
    if setup.spec.is_tail:
        return "the tail runs its backward with its forward"
    if record.sample_id not in worker.cache:
        return f"backward of sample {record.sample_id} without its forward"
    if record.input is None:
        return "a backward without a gradient object"
    return ""


def _replay_hop(
    setup: ReplaySetup,
    worker: StageWorker,
    record: HopRecord,
    index: int,
    depth: int,
    limits: Thresholds,
    drifts: Mapping[str, Drift],
) -> list[HopCheck]:
    def check(verdict: Verdict) -> HopCheck:
        return HopCheck(index, record.sample_id, record.direction, depth, verdict)

    if record.direction == "forward":
        carried = _carried_forward(setup, worker, record)
        out, loss = worker.forward(record.sample_id, record.input)
        if setup.spec.is_tail:
            assert loss is not None
            return [
                check(_compare_bytes(setup, "gradient", record.output, out, None, limits.gradient, drifts)),
                check(compare_loss(record.loss, loss, limits.loss)),
            ]
        activation = _compare_bytes(
            setup, "activation", record.output, out, carried, limits.activation, drifts
        )
        return [check(activation)]
    assert record.input is not None
    grad_out = _decode(setup, record.input)
    grad_in = worker.backward(record.sample_id, record.input)
    if grad_in is None:  # the head: its backward only changes its weights, checked by the hops after the step
        return []
    return [
        check(_compare_bytes(setup, "gradient", record.output, grad_in, grad_out, limits.gradient, drifts))
    ]


@torch.no_grad()
def _carried_forward(setup: ReplaySetup, worker: StageWorker, record: HopRecord) -> torch.Tensor | None:
    """What a forward passes through untouched: the input on a body stage, the token embedding on the head."""
    if setup.spec.is_tail:
        return None
    if setup.spec.is_head:
        assert worker.model.embed is not None
        tokens = setup.batch(record.sample_id)[0].to(setup.device)
        # What the codec can carry of it: a low-rank codec passes on only the embedding's part in its subspace.
        return setup.codec.project(worker.model.embed(tokens)[..., : setup.config.wire_width].float().cpu())
    return _decode(setup, record.input)


def _decode(setup: ReplaySetup, data: bytes | None) -> torch.Tensor:
    """An activation or gradient object as fp32 on the CPU, as the run's codec decodes it: one packed by another
    codec (a dense output in a compressed run, or the reverse) is a WireError, so it fails its check."""
    if data is None:
        raise wire.WireError("no object")
    return setup.codec.decode(data)


def _compare_bytes(
    setup: ReplaySetup,
    kind: str,
    claimed: bytes | None,
    replayed: bytes | None,
    carried: torch.Tensor | None,
    threshold: float,
    drifts: Mapping[str, Drift] | None = None,
) -> Verdict:
    assert replayed is not None
    if claimed is None:
        return Verdict.refuse(kind, "no output object")
    try:
        claimed_t = _decode(setup, claimed)
    except wire.WireError as error:
        return Verdict.refuse(kind, f"output does not decode: {error}")
    drift = drifts.get(kind) if drifts is not None else None
    return compare_change(kind, claimed_t, _decode(setup, replayed), carried, threshold, drift)


# -- single checks -----------------------------------------------------------------------------------------


def check_tokens(
    setup: ReplaySetup, weights: torch.Tensor, sample_id: int, output: bytes, limits: Thresholds | None = None
) -> Verdict:
    """The head's output for a sample, at weights it held (checkpoint or snapshot), against the tokens the
    data plan assigns to that sample id: the output is the only trace of which tokens the head embedded."""
    if not setup.spec.is_head:
        raise ValueError("only the head reads tokens")
    limits = limits or setup.thresholds
    worker = setup.worker(weights)
    record = HopRecord(0, setup.spec.index, "forward", sample_id, 0, None, output)
    carried = _carried_forward(setup, worker, record)
    replayed, _ = worker.forward(sample_id, None)
    return _compare_bytes(setup, "activation", output, replayed, carried, limits.activation)


def check_loss(
    setup: ReplaySetup,
    weights: torch.Tensor,
    sample_id: int,
    input: bytes,
    loss: float | None,
    limits: Thresholds | None = None,
) -> Verdict:
    """The tail's reported loss for a sample, recomputed from its input activation and the plan's targets."""
    if not setup.spec.is_tail:
        raise ValueError("only the tail reports a loss")
    limits = limits or setup.thresholds
    worker = setup.worker(weights)
    try:
        _, replayed = worker.forward(sample_id, input)
    except wire.WireError as error:
        return Verdict.refuse("loss", f"input does not decode: {error}")
    assert replayed is not None
    return compare_loss(loss, replayed, limits.loss)


def check_weights(result: ReplayResult, claimed: torch.Tensor, limits: Thresholds) -> Verdict:
    """Weights the miner claims to hold where the replay ended (a snapshot), as a change since the replay's start."""
    if claimed.shape != result.end.shape:
        return Verdict.refuse("weights", f"{claimed.numel()} values, the stage has {result.end.numel()}")
    return compare_change("weights", claimed.float(), result.end, result.start, limits.weights)


def check_pseudo_gradient(
    result: ReplayResult, uploaded: torch.Tensor, limits: Thresholds, final_step: int | None = None
) -> Verdict:
    """The miner's uploaded pseudo-gradient (epoch start minus its end weights) against a replay that reached the
    miner's end of epoch: its last committed inner step `final_step` when given (accumulated gradients after it
    never changed the weights), else the end of the records.

        error = ||uploaded - (epoch_start - end)|| / max(||end - start||, ||epoch_start - end||)

    The numerator is a snapshot's at that step (`check_weights`); the scale is the replay's own change over its
    window or over the epoch, whichever is larger. An honest replay's divergence is calibrated against the
    window's change, and the upload's fp32 rounding (half an ulp of each value) is ~6e-8 of the epoch's, so both
    stay inside `limits.weights` even when the window is short or moved nothing (a window from a snapshot of the
    last step, a learning rate at zero); a forgery is measured against the epoch's change it claims to be.
    """
    if final_step is None and not result.complete:
        raise ValueError("the replay stopped before the end of the epoch: replay the last window to check it")
    if final_step is not None and result.end_step != final_step:
        raise ValueError(f"the replay ended at step {result.end_step}, the miner's last step is {final_step}")
    if uploaded.shape != result.end.shape:
        return Verdict.refuse(
            "pseudo_gradient", f"{uploaded.numel()} values, the stage has {result.end.numel()}"
        )
    if not bool(torch.isfinite(uploaded).all()):
        return Verdict.refuse("pseudo_gradient", "non-finite values")
    start, end = result.epoch_start.to(torch.float64), result.end.to(torch.float64)
    replayed = start - end
    diff = float(torch.linalg.vector_norm(uploaded.to(torch.float64) - replayed))
    scale = max(
        float(torch.linalg.vector_norm(end - result.start.to(torch.float64))),
        float(torch.linalg.vector_norm(replayed)),
    )
    error = (0.0 if diff == 0.0 else math.inf) if scale == 0.0 else diff / scale
    threshold = limits.weights
    if error <= threshold:
        return Verdict(True, "pseudo_gradient", error, threshold)
    reason = f"relative error {error:.3g} > {threshold:.3g} against the replay's end of epoch"
    return Verdict(False, "pseudo_gradient", error, threshold, reason)


def check_committed_weights(
    setup: ReplaySetup, weights: torch.Tensor, sketch: WeightSketch, seed: int
) -> Verdict:
    """Flat weights against the sketch a miner committed for them, recomputed here with the same seed."""
    recomputed = setup.worker(weights).sketch(seed)
    return compare_sketch(sketch.norms + sketch.projection, recomputed.norms + recomputed.projection)


def check_pseudo_gradient_sketch(
    setup: ReplaySetup,
    epoch_start: torch.Tensor,
    uploaded: torch.Tensor,
    final_step: int,
    sketch: WeightSketch | None,
    seed: int,
) -> Verdict:
    """The uploaded pseudo-gradient without a replay: the weights it implies, epoch start minus it, against the
    sketch the miner committed with its last inner step (`final_step`; 0: it took none, so it must upload zeros).

    In fp32, start - (start - w) is w except where a value moved by more than half of itself, and there within an
    ulp: far inside the sketch's tolerance, which already allows for the order of a float sum between machines.
    The sketch's seed is public, so this binds the upload against any forgery that does not aim at the 64 values
    per tensor the seed samples and their norms; a replay that reaches the last step binds every value.
    """
    if uploaded.shape != epoch_start.shape:
        return Verdict.refuse("sketch", f"{uploaded.numel()} values, the stage has {epoch_start.numel()}")
    if not bool(torch.isfinite(uploaded).all()):
        return Verdict.refuse("sketch", "non-finite values")
    if final_step == 0:
        moved = int(torch.count_nonzero(uploaded))
        if moved:
            return Verdict.refuse("sketch", f"no inner step was committed, yet {moved} values are not zero")
        return Verdict(True, "sketch", 0.0, 0.0)
    if sketch is None:
        return Verdict.refuse("sketch", f"no sketch was committed for its last step {final_step}")
    return check_committed_weights(setup, epoch_start.float() - uploaded.float(), sketch, seed)


def check_snapshot(setup: ReplaySetup, snapshot: Snapshot, sketch: WeightSketch, seed: int) -> Verdict:
    """The snapshot a miner uploaded when challenged against the sketch it had committed in its report.

    This binds the snapshot to the work: a replay from it is only worth as much as the snapshot, and the replay
    of the window before it (`claimed_weights`) checks the snapshot's weights against the committed hops.
    """
    return check_committed_weights(setup, snapshot.weights, sketch, seed)


# -- which hops a window needs ---------------------------------------------------------------------------------


def window(hops: Sequence[tuple[int, str, int, int]], start: int, depth: int, cap: int) -> list[int]:
    """The indices of the hops a replay of `depth` steps from inner step `start` needs, at most `cap` of them.

    `hops` are a miner's done hops of an epoch in commit order, each as (session, direction, sample id, reported
    inner step). From the checkpoint (`start` 0) that is each session's hops from its first through the first one
    past step `depth`; from a snapshot of the last session at `start`, that session's hop that reached `start`
    (where `replay` begins), then its hops through the first one past `start + depth`, and for each backward among
    them whose forward came before, that forward (the replay restores it as in flight). So the window is where it
    starts, however many hops came before it, and the miner's reported steps cannot empty it: the first hop past
    the bound is always in, and a replay that reaches it while not yet that deep stops on the reported step.
    """
    bound = start + depth
    chosen: list[int] = []
    if start == 0:
        session, open_ = None, True
        for index, (hop_session, _, _, step) in enumerate(hops):
            if hop_session != session:
                session, open_ = hop_session, True
            if open_:
                chosen.append(index)
                open_ = step <= bound
        return chosen[:cap]
    last = hops[-1][0] if hops else 0
    own = [index for index, hop in enumerate(hops) if hop[0] == last]
    reached = next((n for n, index in enumerate(own) if hops[index][3] >= start), None)
    if reached is None:
        return []
    in_flight: dict[int, int] = {}  # sample -> its forward before the window, not yet backpropagated
    for index in own[:reached]:
        _, direction, sample, _ = hops[index]
        if direction == "forward":
            in_flight[sample] = index
        else:
            in_flight.pop(sample, None)
    in_flight.pop(hops[own[reached]][2], None)  # the hop that reached `start` is always in
    chosen.append(own[reached])
    for index in own[reached + 1 :]:
        _, direction, sample, step = hops[index]
        forward = in_flight.pop(
            sample, None
        )  # a backward needs it; a restarted sample's new forward replaces it
        needed = [forward] if forward is not None and direction == "backward" else []
        if len(chosen) + len(needed) + 1 > cap:
            break
        chosen += [*needed, index]
        if step > bound:
            break
    return sorted(chosen)
