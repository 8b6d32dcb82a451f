"""The audit metric: relative error of what a stage changed, against a replay, judged by calibrated thresholds.

Why the change and not the raw tensor: a body stage's output is its input plus a residual update that is small
next to it, so a stage that returns its input scores cosine 0.997 against an honest one on a fresh model. What a
stage computed is `output - input` (on the head, `output - embedding`; for a body stage's backward,
`input grad - output grad`), and the metric is ||claimed - replayed|| / ||replayed - carried||: the error of the
claimed tensor in units of that change. The identity scores exactly 1; zeros, noise and stale or quantised
weights score what their error is worth next to the stage's work.

The thresholds come from `bench/calibrate_audit.py` (docs/validation.md holds the distributions): honest replays
on another CPU kernel set and thread count, int8-weight miners, at replay depths 0 .. D - 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SKETCH_TOLERANCE = 1e-5
"""A snapshot is the miner's own weights, so its sketch is recomputed from the same fp32 values: only the order
of a float sum may differ between machines."""


@dataclass(frozen=True)
class Thresholds:
    """Largest relative error that passes, per kind of tensor compared, and the replay depth they hold for."""

    activation: float  # a forward output's change (head: over the embedding; body: over the input)
    gradient: float  # an input gradient (tail) or its change over the output gradient (body)
    loss: float  # the tail's reported loss
    weights: float  # the change of the weights since the replay's start (snapshots, pseudo-gradients)
    depth: (
        int  # D: most inner steps one audit replays; honest error grows with depth, an int8 miner's does not
    )

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        for name in ("activation", "gradient", "loss", "weights"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(
                    f"threshold {name} must be in (0, 1): 1 is what the identity scores, got {value}"
                )

    def for_kind(self, kind: str) -> float:
        if kind not in ("activation", "gradient", "loss", "weights"):
            raise ValueError(f"no threshold for {kind!r}")
        return float(getattr(self, kind))


# Calibrated by bench/calibrate_audit.py (docs/validation.md): each threshold is the geometric mean of the honest
# bound (max + 5 std over depths < D, bf16 floored at fp32's) and the int8-weights miner's smallest error, and D
# the deepest replay at which int8's smallest error is still 2x the honest bound. bf16 replays diverge from the
# first inner step on (Adam's first step after its reset is nearly sign(g), and bf16 kernels flip the sign of
# near-zero gradients), so bf16 audits replay one step from each snapshot.
FP32 = Thresholds(activation=8.6e-4, gradient=2.5e-3, loss=1e-4, weights=2.1e-3, depth=6)
BF16 = Thresholds(activation=9.4e-4, gradient=2.6e-3, loss=1e-4, weights=2.4e-2, depth=1)


def thresholds(bf16: bool) -> Thresholds:
    """The calibrated thresholds for a miner's declared precision."""
    return BF16 if bf16 else FP32


@dataclass(frozen=True)
class Verdict:
    """One comparison: passed or not, the metric, the bar it was held to, and why it failed."""

    passed: bool
    kind: str  # activation, gradient, loss, weights, sketch, drift, protocol
    error: float  # relative error; inf when the claim could not be compared at all
    threshold: float
    reason: str = ""

    @classmethod
    def refuse(cls, kind: str, reason: str) -> Verdict:
        """A claim that cannot be compared (wrong shape, undecodable, out of order) fails outright."""
        return cls(False, kind, math.inf, 0.0, reason)


def relative_error(claimed: torch.Tensor, reference: torch.Tensor) -> float:
    """||claimed - reference|| / ||reference|| in float64; 0 when both are zero, inf when only the reference is."""
    a = claimed.detach().to(torch.float64).cpu()
    b = reference.detach().to(torch.float64).cpu()
    if a.shape != b.shape:
        raise ValueError(f"cannot compare shapes {tuple(a.shape)} and {tuple(b.shape)}")
    diff = float(torch.linalg.vector_norm(a - b))
    scale = float(torch.linalg.vector_norm(b))
    if scale == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / scale


def compare_change(
    kind: str,
    claimed: torch.Tensor,
    replayed: torch.Tensor,
    carried: torch.Tensor | None,
    threshold: float,
    drift: Drift | None = None,
) -> Verdict:
    """Relative error of the claimed tensor's change over `carried` (what passes through the stage untouched),
    added to `drift` where the two could be compared.

    `carried` is None where nothing passes through (the tail's input gradient): the tensors themselves are
    compared. The carried part cancels in the difference, so only the scale, ||replayed - carried||, depends on it.
    """
    if claimed.shape != replayed.shape:
        return Verdict.refuse(kind, f"shape {tuple(claimed.shape)}, expected {tuple(replayed.shape)}")
    if not bool(torch.isfinite(claimed).all()):
        return Verdict.refuse(kind, "non-finite values")
    base = torch.zeros((), dtype=torch.float64) if carried is None else carried.to(torch.float64)
    claimed64, replayed64 = claimed.to(torch.float64), replayed.to(torch.float64)
    error = relative_error(claimed64 - base, replayed64 - base)
    if drift is not None:
        drift.add((claimed64 - replayed64).cpu(), (replayed64 - base).cpu())
    return _judge(kind, error, threshold)


# A window's drift: a bias in one direction, added to every output or gradient just under its threshold, passes
# every hop, yet adds up where honest rounding does not (it points elsewhere on every hop). bench/calibrate_audit.py
# prints honest windows' drift as a fraction of its bar, DRIFT_FRACTION of the per-hop threshold (docs/validation.md,
# "Drift"): at most 6.3%, max + 5 std 17%. Fewer hops than DRIFT_MIN_HOPS average too little (bf16 windows of one
# step at small k): the check is then not made.
DRIFT_FRACTION = 0.25
DRIFT_MIN_HOPS = 6


class Drift:
    """Sums over one kind of a window's compared hops: the errors (claimed - replayed, in fp64), the changes' norms,
    and the errors' components along their own change. A fixed direction adds up in the first, a fixed scale
    (claimed = (1 + e) x change) in the second; honest rounding in neither."""

    def __init__(self, kind: str):
        self.kind, self.hops = kind, 0
        self.error: torch.Tensor | None = None
        self.scale = self.along = self.square = 0.0

    def add(self, error: torch.Tensor, change: torch.Tensor) -> None:
        if self.error is not None and self.error.shape != error.shape:
            return  # another shape cannot be summed; its hop is judged on its own
        self.error = error.clone() if self.error is None else self.error + error
        norm = float(torch.linalg.vector_norm(change))
        self.scale += norm
        self.square += norm * norm
        self.along += float((error * change).sum())
        self.hops += 1

    def verdict(self, threshold: float) -> Verdict | None:
        """The window's drift against DRIFT_FRACTION of the per-hop threshold; None when too few hops to judge."""
        if self.error is None or self.hops < DRIFT_MIN_HOPS or self.square == 0.0:
            return None
        drift = max(float(torch.linalg.vector_norm(self.error)) / self.scale, abs(self.along) / self.square)
        bar = DRIFT_FRACTION * threshold
        why = f"{self.kind}s of {self.hops} hops err in one direction: drift {drift:.3g} > {bar:.3g}"
        return Verdict(drift <= bar, "drift", drift, bar, "" if drift <= bar else why)


def compare_loss(claimed: float | None, replayed: float, threshold: float) -> Verdict:
    """Relative error of the tail's reported loss."""
    if claimed is None or not math.isfinite(claimed):
        return Verdict.refuse("loss", f"reported loss {claimed!r}")
    error = (
        abs(claimed - replayed) / abs(replayed) if replayed != 0.0 else (0.0 if claimed == 0.0 else math.inf)
    )
    return _judge("loss", error, threshold)


def compare_sketch(
    claimed: list[float], recomputed: list[float], tolerance: float = SKETCH_TOLERANCE
) -> Verdict:
    """A reported sketch against the one recomputed from the weights the miner handed over."""
    if len(claimed) != len(recomputed):
        return Verdict.refuse("sketch", f"{len(claimed)} values, expected {len(recomputed)}")
    error = relative_error(
        torch.tensor(claimed, dtype=torch.float64), torch.tensor(recomputed, dtype=torch.float64)
    )
    return _judge("sketch", error, tolerance)


def _judge(kind: str, error: float, threshold: float) -> Verdict:
    # NaN compares false, so a NaN error fails like an infinite one.
    if error <= threshold:
        return Verdict(True, kind, error, threshold)
    return Verdict(False, kind, error, threshold, f"{kind} relative error {error:.3g} > {threshold:.3g}")
