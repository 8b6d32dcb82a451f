"""Every cheat is caught by the audit of its own stage, for the reason it cheats, while the honest miners around
it (who replayed its bad tensors faithfully) pass."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import pytest
import torch

from iota.audit import ReplayResult, ReplaySetup, check_pseudo_gradient, check_snapshot, check_tokens, replay
from iota.audit.adversaries import (
    ConsistentBias,
    CopiedOutput,
    FakeLoss,
    ForgedPseudoGradient,
    ForgedSnapshot,
    Identity,
    Int8Weights,
    NoisyOutput,
    RandomOutput,
    SkippedBackward,
    SkippedLayers,
    StaleWeights,
    Watchful,
    WrongTokens,
    ZeroBackward,
)
from iota.audit.compare import DRIFT_FRACTION
from iota.audit.replay import WorkerFactory
from tests.audit import SKETCH_SEED, Epoch, initial_weights, make_setups, run_epoch

SAMPLES = range(8)  # 4 inner steps at k = 2, with 2 samples in flight


@pytest.fixture(scope="module")
def setups() -> list[ReplaySetup]:
    return make_setups(accumulate=2)


@pytest.fixture(scope="module")
def checkpoint(setups) -> list[torch.Tensor]:
    return initial_weights(setups)


def audit(
    setups: Sequence[ReplaySetup], run: Epoch, stage: int, max_steps: int | None = None
) -> ReplayResult:
    return replay(setups[stage], run.records[stage], run.checkpoint[stage], max_steps=max_steps)


def caught(
    setups: Sequence[ReplaySetup], run: Epoch, stage: int, *kinds: str, exact: bool = True
) -> ReplayResult:
    """The cheat's stage fails with failures of `kinds` (exactly those, or at least those); the others pass. A
    window's drift (its errors adding up) comes with every gross cheat and is left out unless asked for."""
    for other in range(len(setups)):
        if other != stage:
            assert audit(setups, run, other).passed, (other, audit(setups, run, other).failures)
    result = audit(setups, run, stage)
    assert not result.passed and not result.stopped
    found = {failure.verdict.kind for failure in result.failures} - ({"drift"} - set(kinds))
    assert found == set(kinds) if exact else found >= set(kinds), result.failures
    return result


def cheat(setups, checkpoint, stage: int, factory: WorkerFactory, samples=SAMPLES) -> Epoch:
    return run_epoch(setups, checkpoint, samples, cheats={stage: factory})


def test_random_output(setups, checkpoint):
    caught(setups, cheat(setups, checkpoint, 1, RandomOutput), 1, "activation")
    caught(setups, cheat(setups, checkpoint, 2, RandomOutput), 2, "gradient")


def test_identity_scores_exactly_one(setups, checkpoint):
    result = caught(setups, cheat(setups, checkpoint, 1, Identity), 1, "activation", "gradient")
    hops = [check for check in result.checks if check.sample_id >= 0]
    assert all(not check.verdict.passed for check in hops)  # every hop, not a lucky one
    assert all(check.verdict.error == pytest.approx(1.0, abs=1e-6) for check in hops)


def test_skipped_layers(setups, checkpoint):
    assert len(setups[1].spec.layers) == 2
    caught(setups, cheat(setups, checkpoint, 1, SkippedLayers), 1, "activation", "gradient")


def test_zero_backward(setups, checkpoint):
    result = caught(setups, cheat(setups, checkpoint, 1, ZeroBackward), 1, "gradient")
    assert all(failure.direction == "backward" for failure in result.failures if failure.sample_id >= 0)
    caught(setups, cheat(setups, checkpoint, 2, ZeroBackward), 2, "gradient")


def test_skipped_backward(setups, checkpoint):
    caught(setups, cheat(setups, checkpoint, 1, SkippedBackward), 1, "activation", "gradient")
    # The head sends no gradient: what gives it away is that its weights never learn, seen after the first step.
    result = caught(setups, cheat(setups, checkpoint, 0, SkippedBackward), 0, "activation")
    assert min(failure.depth for failure in result.failures) == 1


def test_stale_weights(setups, checkpoint):
    """The previous epoch's weights, where this epoch's checkpoint is that epoch trained for 3 steps."""
    previous = checkpoint
    current = [w.flat_weights() for w in run_epoch(setups, previous, range(100, 106)).workers]
    expected = {0: ["activation"], 1: ["activation", "gradient"], 2: ["gradient"]}
    for stage in range(3):
        stale = functools.partial(StaleWeights, stale=previous[stage])
        result = caught(setups, cheat(setups, current, stage, stale), stage, *expected[stage], exact=False)
        assert result.failures[0].depth == 0


@pytest.mark.parametrize("bf16", [False, True])
def test_int8_weights_fail_every_hop(bf16):
    setups = make_setups(bf16, accumulate=2)
    run = run_epoch(setups, initial_weights(setups), SAMPLES, cheats=dict.fromkeys(range(3), Int8Weights))
    for stage in range(3):
        result = audit(setups, run, stage)
        compared = [c for c in result.checks if c.verdict.kind in ("activation", "gradient")]
        assert compared and all(not c.verdict.passed for c in compared), (stage, bf16)


def test_noise_just_past_the_threshold():
    """Noise at 1.25 x the threshold is caught, at half of it passes: the bar is where compare says. An fp32
    wire, so that bf16 rounding of the noisy tensor does not add to the noise."""
    setups = make_setups(accumulate=2, wire=torch.float32)
    checkpoint = initial_weights(setups)
    limits = setups[1].thresholds

    def noisy(factor: float) -> WorkerFactory:
        return functools.partial(
            NoisyOutput, scale=factor * limits.activation, grad_scale=factor * limits.gradient
        )

    result = caught(setups, cheat(setups, checkpoint, 1, noisy(1.25)), 1, "activation", "gradient")
    hops = [f for f in result.failures if f.sample_id >= 0]  # (its drift adds up too, past its own bar)
    assert all(f.verdict.error < 1.5 * f.verdict.threshold for f in hops)  # just past, not far
    assert audit(setups, cheat(setups, checkpoint, 1, noisy(0.5)), 1).passed


def test_a_bias_under_the_threshold_adds_up_and_fails_the_window():
    """One fixed direction at half the threshold passes every hop, and fails the window on its drift; the same
    size of noise, new on every hop, does not add up (above) and neither does honest rounding (every honest
    audit here). A bias under DRIFT_FRACTION of the threshold still passes: that is the band left."""
    setups = make_setups(accumulate=2, wire=torch.float32)
    checkpoint = initial_weights(setups)
    limits = setups[1].thresholds

    def biased(factor: float) -> WorkerFactory:
        return functools.partial(
            ConsistentBias, scale=factor * limits.activation, grad_scale=factor * limits.gradient
        )

    result = caught(setups, cheat(setups, checkpoint, 1, biased(0.5)), 1, "drift")
    assert {f.direction for f in result.failures} == {"window"} and len(result.failures) == 2  # both kinds
    assert all(
        f.verdict.error == pytest.approx(0.5 * f.verdict.threshold / DRIFT_FRACTION, rel=0.1)
        for f in result.failures
    )
    tail = caught(setups, cheat(setups, checkpoint, 2, biased(0.5)), 2, "drift")
    assert "gradients of" in tail.failures[0].verdict.reason
    assert audit(setups, cheat(setups, checkpoint, 1, biased(0.2)), 1).passed


def test_noise_past_the_threshold_on_a_bf16_wire(setups, checkpoint):
    limits = setups[1].thresholds
    noisy = functools.partial(NoisyOutput, scale=1.25 * limits.activation, grad_scale=1.25 * limits.gradient)
    caught(setups, cheat(setups, checkpoint, 1, noisy), 1, "activation", "gradient")


def test_output_copied_from_another_miner(setups, checkpoint):
    donor = run_epoch(setups, checkpoint, range(200, 208))
    pool = [r.output for r in donor.records[1] if r.direction == "forward" and r.output is not None]
    result = caught(
        setups, cheat(setups, checkpoint, 1, functools.partial(CopiedOutput, pool=pool)), 1, "activation"
    )
    assert all(f.verdict.error > 1.0 for f in result.failures)


def test_wrong_tokens_at_the_head(setups, checkpoint):
    run = cheat(setups, checkpoint, 0, WrongTokens)
    caught(setups, run, 0, "activation")
    first = run.records[0][0]
    assert first.output is not None
    assert not check_tokens(setups[0], checkpoint[0], first.sample_id, first.output).passed
    assert check_tokens(
        setups[0], checkpoint[0], first.sample_id + 1, first.output
    ).passed  # what it embedded


def test_fake_loss_at_the_tail(setups, checkpoint):
    result = caught(setups, cheat(setups, checkpoint, 2, FakeLoss), 2, "loss")
    assert all(f.verdict.error == pytest.approx(0.1, rel=1e-3) for f in result.failures)
    slight = cheat(setups, checkpoint, 2, functools.partial(FakeLoss, factor=0.999))
    caught(setups, slight, 2, "loss")


def test_forged_pseudo_gradient(setups, checkpoint):
    run = cheat(setups, checkpoint, 1, ForgedPseudoGradient)
    result = audit(setups, run, 1, max_steps=100)
    assert result.passed and result.complete  # its hops are honest...
    limits = setups[1].thresholds
    verdict = check_pseudo_gradient(result, run.workers[1].pseudo_gradient(), limits)
    assert not verdict.passed and verdict.error == pytest.approx(1.0, rel=1e-4)  # ...its upload is not
    honest = run_epoch(setups, checkpoint, SAMPLES)
    honest_result = audit(setups, honest, 1, max_steps=100)
    assert check_pseudo_gradient(honest_result, honest.workers[1].pseudo_gradient(), limits).passed


def test_snapshot_that_does_not_match_its_sketch(setups, checkpoint):
    run = cheat(setups, checkpoint, 1, ForgedSnapshot)
    forged, sketch = run.snapshots[1][2], run.sketches[1][2]
    verdict = check_snapshot(setups[1], forged, sketch, SKETCH_SEED)
    assert not verdict.passed and verdict.kind == "sketch"
    # And had it forged the sketch too, the replay of the window before the snapshot refuses its weights.
    result = replay(
        setups[1], run.records[1], checkpoint[1], max_steps=2, claimed_weights={2: forged.weights}
    )
    assert [f.verdict.kind for f in result.failures] == ["weights"]
    honest = run_epoch(setups, checkpoint, SAMPLES)
    assert check_snapshot(setups[1], honest.snapshots[1][2], honest.sketches[1][2], SKETCH_SEED).passed


def test_honest_only_when_it_guesses_it_is_watched(setups, checkpoint):
    def watched(sample_id: int) -> bool:
        return sample_id % 4 == 0

    run = cheat(setups, checkpoint, 1, functools.partial(Watchful, watched=watched))
    result = caught(setups, run, 1, "activation")
    assert {f.sample_id for f in result.failures} - {-1} == {s for s in SAMPLES if not watched(s)}
