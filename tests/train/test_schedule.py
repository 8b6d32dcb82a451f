"""Learning-rate schedule: warmup and cosine values by tokens, JSON round trip, DESIGN.md's inner-step rule."""

import json
import math

import pytest

from iota.train.schedule import LRSchedule, inner_step_lr, inner_step_tokens

SCHEDULE = LRSchedule(peak_lr=1e-3, warmup_tokens=1_000, total_tokens=11_000, min_lr_ratio=0.1)


def test_linear_warmup_then_cosine_to_the_floor() -> None:
    s = SCHEDULE
    assert s.lr(0) == 0.0
    assert s.lr(250) == pytest.approx(2.5e-4)
    assert s.lr(500) == pytest.approx(5e-4)
    assert s.lr(1_000) == pytest.approx(1e-3)
    assert s.lr(6_000) == pytest.approx((1e-3 + 1e-4) / 2)  # half way through the decay
    quarter = 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi / 4))
    assert s.lr(3_500) == pytest.approx(quarter)
    assert s.lr(11_000) == pytest.approx(1e-4) == s.min_lr
    assert s.lr(50_000) == pytest.approx(1e-4)  # flat past the end
    decay = [s.lr(t) for t in range(1_000, 11_001, 500)]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))
    assert LRSchedule(1.0, 0, 10, 0.0).lr(0) == 1.0  # no warmup: peak at once
    with pytest.raises(ValueError):
        s.lr(-1)


def test_json_round_trip_and_validation() -> None:
    restored = LRSchedule.from_dict(json.loads(json.dumps(SCHEDULE.to_dict())))
    assert restored == SCHEDULE
    assert restored.lr(4_321) == SCHEDULE.lr(4_321)
    with pytest.raises(ValueError, match="peak_lr"):
        LRSchedule(0.0, 0, 10)
    with pytest.raises(ValueError, match="warmup_tokens"):
        LRSchedule(1e-3, 20, 10)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        LRSchedule(1e-3, 0, 10, 1.5)


def test_inner_step_lr_follows_design_formula() -> None:
    # Epoch starting at 2,000 tokens; inner step 3; k = 2 micro-batches of 64 tokens; 4 replicas.
    assert inner_step_tokens(2_000, 3, 2, 64, 4) == 2_000 + 3 * 2 * 64 * 4
    assert inner_step_lr(SCHEDULE, 2_000, 3, 2, 64, 4) == SCHEDULE.lr(3_536)
    # Step t with R replicas sits where the one-replica baseline is at step t * R.
    assert inner_step_lr(SCHEDULE, 0, 5, 2, 64, 4) == inner_step_lr(SCHEDULE, 0, 20, 2, 64, 1)
    assert inner_step_lr(SCHEDULE, 0, 0, 2, 64, 4) == 0.0
    with pytest.raises(ValueError):
        inner_step_tokens(0, 0, 0, 64, 1)


def test_epochs_after_an_apply_ramp_back_up_over_rewarm_steps() -> None:
    ramped = LRSchedule(1e-3, 1_000, 11_000, 0.1, rewarm_steps=4)
    plain = [inner_step_lr(SCHEDULE, 2_000, t, 2, 64, 4) for t in range(6)]
    after_apply = [inner_step_lr(ramped, 2_000, t, 2, 64, 4) for t in range(6)]
    assert after_apply == pytest.approx([plain[t] * min(1.0, (t + 1) / 4) for t in range(6)])
    assert after_apply[3:] == plain[3:]  # full rate from the 4th step on
    # the first epoch (and the baseline, one epoch from token 0) has no optimizer reset behind it: no ramp
    assert [inner_step_lr(ramped, 0, t, 2, 64, 4) for t in range(6)] == [
        inner_step_lr(SCHEDULE, 0, t, 2, 64, 4) for t in range(6)
    ]
    assert LRSchedule.from_dict(ramped.to_dict()) == ramped
    with pytest.raises(ValueError, match="rewarm_steps"):
        LRSchedule(1e-3, 0, 10, rewarm_steps=-1)
