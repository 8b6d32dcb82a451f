"""bench/calibrate_audit.py's choice of D and thresholds, on made-up error tables."""

import math

import pytest

from bench.calibrate_audit import choose, stats, thresholds_from


def table(per_depth: dict[str, list[list[float]]]) -> dict[str, dict[int, list[float]]]:
    out: dict[str, dict[int, list[float]]] = {}
    for kind, depths in per_depth.items():
        first = 1 if kind == "weights" else 0
        out[kind] = {first + i: values for i, values in enumerate(depths)}
    return out


def test_depth_stops_where_honest_error_comes_within_half_of_int8():
    honest = table(
        {
            "activation": [[1e-5, 2e-5], [1e-5, 3e-5], [1e-3, 2e-3]],  # depth 2 grows past half of int8
            "gradient": [[1e-5], [1e-5], [1e-5]],
            "loss": [[0.0], [0.0], [0.0]],
            "weights": [[1e-6], [1e-6], [1e-6]],
        }
    )
    int8 = table(
        {
            "activation": [[5e-3], [6e-3], [6e-3]],
            "gradient": [[5e-3], [5e-3], [5e-3]],
            "loss": [[1e-6], [1e-6], [1e-6]],
            "weights": [[1e-1], [1e-1], [1e-1]],
        }
    )
    chosen = choose(honest, int8, max_depth=3)
    assert chosen["depth"] == 2
    bound = stats([1e-5, 2e-5, 1e-5, 3e-5])
    assert chosen["activation"]["honest_bound"] == pytest.approx(bound["max"] + 5 * bound["std"])
    limits = thresholds_from(chosen)
    assert limits.depth == 2
    assert limits.activation == pytest.approx(
        math.sqrt(chosen["activation"]["honest_bound"] * 5e-3), rel=0.01
    )
    assert chosen["activation"]["honest_bound"] < limits.activation < 5e-3
    assert limits.loss == 1e-4  # not set against int8: 10 x honest, at least MIN_LOSS
    floored = thresholds_from(chosen, floor={"activation": 1e-3})
    assert floored.activation == pytest.approx(math.sqrt(1e-3 * 5e-3), rel=0.03)  # rounded to 2 digits
