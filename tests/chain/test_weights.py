"""Weight normalisation: u16 max-upscaling as bittensor does it, and every refusal."""

import math

import numpy as np
import pytest

from iota.chain.base import ChainError
from iota.chain.weights import U16_MAX, normalize_weights


def test_largest_weight_becomes_u16_max_and_ratios_survive():
    uids, values = normalize_weights([3, 1, 7], [1.0, 2.0, 4.0])
    assert uids == [3, 1, 7]
    # round() is Python's (half to even): 0.25 * 65535 = 16383.75 -> 16384, 0.5 * 65535 = 32767.5 -> 32768.
    assert values == [16384, 32768, U16_MAX]


def test_scale_does_not_matter():
    assert normalize_weights([0, 1], [0.001, 0.002]) == normalize_weights([0, 1], [1000.0, 2000.0])


def test_zero_weights_and_weights_rounding_to_zero_are_dropped():
    uids, values = normalize_weights([0, 1, 2, 3], [0.0, 1.0, 1e-6, 0.5])
    assert uids == [1, 3]
    assert values == [U16_MAX, 32768]


def test_all_zero_and_empty_give_nothing():
    assert normalize_weights([0, 1], [0.0, 0.0]) == ([], [])
    assert normalize_weights([], []) == ([], [])


def test_random_vectors_keep_proportions_within_half_a_step():
    rng = np.random.default_rng(0)
    for _ in range(50):
        weights = rng.random(rng.integers(1, 64))
        uids, values = normalize_weights(list(range(len(weights))), weights.tolist())
        assert max(values) == U16_MAX
        top = float(weights.max())
        for uid, value in zip(uids, values, strict=True):
            assert abs(value - weights[uid] / top * U16_MAX) <= 0.5
        dropped = set(range(len(weights))) - set(uids)
        assert all(round(weights[uid] / top * U16_MAX) == 0 for uid in dropped)


def test_numpy_inputs_are_accepted():
    uids, values = normalize_weights(np.array([5, 6]), np.array([0.5, 1.0], dtype=np.float32))
    assert uids == [5, 6]
    assert values == [32768, U16_MAX]
    assert all(type(v) is int for v in uids + values)


@pytest.mark.parametrize(
    ("uids", "weights", "message"),
    [
        ([0, 1], [1.0], "differ in length"),
        ([0, 1, 1], [1.0, 1.0, 1.0], "duplicate uids in weights: [1]"),
        ([0, 1], [1.0, math.nan], "finite and non-negative"),
        ([0, 1], [1.0, math.inf], "finite and non-negative"),
        ([0, 1], [1.0, -0.1], "finite and non-negative"),
        ([0, 70000], [1.0, 1.0], "outside 0..65535"),
        ([-1, 0], [1.0, 1.0], "outside 0..65535"),
    ],
)
def test_refusals(uids, weights, message):
    with pytest.raises(ChainError) as refused:
        normalize_weights(uids, weights)
    assert message in str(refused.value)
