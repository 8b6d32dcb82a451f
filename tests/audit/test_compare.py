"""The audit metric: relative error of a stage's change, why raw outputs would not do, and the thresholds."""

import math

import pytest
import torch

from iota.audit import (
    BF16,
    FP32,
    Thresholds,
    compare_change,
    compare_loss,
    compare_sketch,
    relative_error,
    thresholds,
)
from iota.train.worker import StageWorker
from tests.audit import initial_weights, make_setups


def test_relative_error_edge_cases():
    b = torch.tensor([3.0, 4.0])
    assert relative_error(b, b) == 0.0
    assert relative_error(torch.zeros(2), b) == 1.0
    assert relative_error(torch.tensor([3.0, 4.5]), b) == pytest.approx(0.1)
    assert relative_error(torch.zeros(2), torch.zeros(2)) == 0.0
    assert relative_error(torch.ones(2), torch.zeros(2)) == math.inf
    with pytest.raises(ValueError, match="shapes"):
        relative_error(torch.zeros(3), b)


def test_identity_looks_honest_raw_but_scores_one_on_the_change():
    """The issue's trap: on a fresh model a body stage that returns its input is nearly its honest output."""
    setup = make_setups()[1]
    worker = setup.worker(initial_weights(make_setups())[1], StageWorker)
    x = torch.randn(1, setup.config.seq_len, setup.config.hidden, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        honest = worker.model(x)
    cosine = torch.nn.functional.cosine_similarity(x.flatten(), honest.flatten(), dim=0)
    assert cosine > 0.99  # raw outputs cannot tell them apart
    assert relative_error(x, honest) < 0.15
    verdict = compare_change("activation", x, honest, x, FP32.activation)
    assert verdict.error == pytest.approx(1.0)
    assert not verdict.passed and "activation relative error" in verdict.reason
    assert compare_change("activation", honest, honest, x, FP32.activation).passed


def test_change_scale_comes_from_the_carried_part():
    carried = torch.full((4,), 10.0)
    replayed = carried + torch.tensor([1.0, 0.0, 0.0, 0.0])
    off_by_a_tenth_of_the_change = replayed + torch.tensor([0.0, 0.1, 0.0, 0.0])
    verdict = compare_change("activation", off_by_a_tenth_of_the_change, replayed, carried, 0.2)
    assert verdict.error == pytest.approx(0.1, rel=1e-5) and verdict.passed
    raw = compare_change("gradient", off_by_a_tenth_of_the_change, replayed, None, 0.2)
    assert raw.error == pytest.approx(0.1 / replayed.norm().item(), rel=1e-5)  # no carried part: raw tensors


def test_refusals():
    good = torch.ones(2, 3)
    assert not compare_change("activation", torch.ones(3, 2), good, None, 0.1).passed
    nan = good.clone()
    nan[0, 0] = math.nan
    verdict = compare_change("activation", nan, good, None, 0.1)
    assert not verdict.passed and verdict.reason == "non-finite values" and verdict.error == math.inf
    assert not compare_loss(None, 2.0, 0.1).passed
    assert not compare_loss(math.nan, 2.0, 0.1).passed
    assert compare_loss(2.0001, 2.0, 1e-4).passed
    assert not compare_loss(1.8, 2.0, 1e-4).passed


def test_sketch_tolerance():
    values = [1.0, 2.0, -3.0]
    assert compare_sketch(values, values).passed
    assert not compare_sketch([1.0, 2.0, -3.001], values).passed
    assert not compare_sketch(values[:2], values).passed


def test_thresholds_are_ordered_and_validated():
    assert thresholds(False) is FP32 and thresholds(True) is BF16
    for kind in ("activation", "gradient", "loss", "weights"):
        # bf16 is never held to a tighter bar than fp32, and every threshold is well below the identity's 1.
        assert FP32.for_kind(kind) <= BF16.for_kind(kind) < 0.1
    assert FP32.depth >= BF16.depth >= 1
    with pytest.raises(ValueError, match="identity"):
        Thresholds(activation=1.0, gradient=0.1, loss=0.1, weights=0.1, depth=2)
    with pytest.raises(ValueError):
        FP32.for_kind("sketch")
