"""/status's loss curve stays small however long the run: past its limit, runs of points are averaged."""

from __future__ import annotations

import pytest

from iota.orchestrator.service import thin_curve


def test_a_short_curve_is_every_point_in_tokens() -> None:
    assert thin_curve([(1, 3.0), (8, 2.0), (1, 1.0)], 100, 2048) == [(100, 3.0), (900, 2.0), (1000, 1.0)]
    assert thin_curve([], 100, 2048) == []


def test_a_long_curve_is_thinned_to_weighted_means() -> None:
    points = [
        (1 + i % 3, float(i % 7)) for i in range(10_000)
    ]  # folded epochs' points stand for several samples
    curve = thin_curve(points, 64, 2048)
    samples = sum(n for n, _ in points)
    assert len(curve) <= 2048 and curve[-1][0] == 64 * samples
    assert [t for t, _ in curve] == sorted({t for t, _ in curve})  # tokens only grow
    # Each point is its run's mean weighted by samples, so the whole curve's weighted mean is kept.
    mean = sum(n * loss for n, loss in points) / samples
    ends = [0] + [t // 64 for t, _ in curve]
    widths = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    kept = sum(w * loss for w, (_, loss) in zip(widths, curve, strict=True)) / samples
    assert kept == pytest.approx(mean)
