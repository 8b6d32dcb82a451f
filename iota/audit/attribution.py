"""Pathway attribution: which miner's samples lose more than its stage-mates', from samples' paths and losses.

In the spirit of CLASP (Contribution Loss Assessment via Sampling of Pathways, IOTA primer): every completed sample
went through one miner per stage and ended with a loss at the tail. Because forward work goes to whichever miner of
a stage asks next, each miner meets many different partners at the other stages, so per-miner effects can be told
apart from the paths alone, without recomputing anything.

The fit is ordinary least squares with fixed effects:

    loss_i = w(i) + sum_s a[s, path_i[s]] + e_i

- `w(i)`: one intercept per time window (consecutive samples in `order`): losses fall as the model trains, so
  miners are only compared on samples from the same stretch of training. Windows are absorbed by demeaning
  within each window (Frisch-Waugh-Lovell), so the fit is over miner indicators only.
- `a[s, m]`: miner m's effect at stage s. Every miner at every stage is in the same fit, so a miner whose samples
  happen to go through a bad miner of another stage is not blamed for it (the naive per-miner mean path loss is).

A miner's statistic is its effect minus the mean effect of its stage-mates (an estimable contrast), in nats per
sample, with the classical OLS standard error `sqrt(s^2 c' (X'X)^+ c)` and z = effect / stderr. A miner is flagged
when z > `z_threshold` (one-sided: noise raises the loss; a miner that lowers it is not suspect). The default, 4,
is a one-sided p of 3e-5 per miner and look: with 250 miners (50 per stage, 5 stages) about 0.01 false flags per
look. A contrast the paths cannot identify (a miner always paired with the same miner at another stage) is
reported with `identified=False` and never flagged.

Losses are noisy per sample (micro-batches differ in difficulty), so this is a screen, not a proof: it needs
hundreds of samples for noise that changes the loss visibly and cannot see noise at the audit's thresholds
(docs/benchmarks.md, "Pathway attribution"). A flag is a reason to audit the miner (iota/validator/replay.py),
whose replay is the evidence.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Z_THRESHOLD = 4.0
# Samples per time window: a few dozen per miner at 3 miners per stage, and short next to a loss curve.
WINDOW = 64
MIN_SAMPLES = 8  # a miner with fewer samples than this is reported but never flagged
# Eigenvalues of X'X below this fraction of the largest are round-off of exact zeros (measured: ~1e-15).
_RANK_TOLERANCE = 1e-9
# An estimable contrast is reproduced by the projector to round-off; one that is not misses by O(1).
_IDENTIFIED_TOLERANCE = 1e-6


@dataclass(frozen=True)
class MinerAttribution:
    """One miner's standing at one stage against its stage-mates."""

    miner: str
    stage: int
    samples: int  # samples whose path went through this miner at this stage
    effect: float  # loss (nats) above the mean of its stage-mates, other stages and time controlled for
    stderr: float
    z: float  # effect / stderr; nan when not identified
    identified: bool  # whether the paths separate this miner from its stage-mates and the other stages
    flagged: bool


@dataclass(frozen=True)
class Attribution:
    """One fit: every miner's standing, and the spread of a sample's loss that the miners do not explain."""

    miners: list[MinerAttribution]  # one per (stage, miner), sorted by stage then miner
    samples: int  # samples with a path and a finite loss
    windows: int
    sigma: float  # residual standard deviation of one sample's loss (nats); nan without degrees of freedom

    def flagged(self) -> list[str]:
        """The miners flagged at any stage."""
        return sorted({m.miner for m in self.miners if m.flagged})

    def of(self, miner: str) -> list[MinerAttribution]:
        return [m for m in self.miners if m.miner == miner]


def attribute(
    paths: Mapping[int, Sequence[str]],
    losses: Mapping[int, float],
    order: Mapping[int, float] | None = None,
    *,
    window: int | None = WINDOW,
    z_threshold: float = Z_THRESHOLD,
    min_samples: int = MIN_SAMPLES,
) -> Attribution:
    """Per-miner attribution from sample -> path (miner per stage) and sample -> loss.

    Only samples with both a path and a finite loss count. `order` (sample -> time, e.g. completion time) sorts
    the samples into windows of `window` consecutive samples; without it sample ids are the order (the
    orchestrator allocates them in increasing order). `window=None` compares over the whole span (one intercept).
    """
    if window is not None and window < 2:
        raise ValueError(f"window must be >= 2 samples (or None), got {window}")
    ids = [i for i in paths if i in losses and math.isfinite(losses[i])]
    if not ids:
        return Attribution([], 0, 0, math.nan)
    n_stages = len(paths[ids[0]])
    if any(len(paths[i]) != n_stages for i in ids):
        raise ValueError("every path must name one miner per stage")
    time = order if order is not None else {i: float(i) for i in ids}
    ids.sort(key=lambda i: (time[i], i))

    columns = sorted({(s, paths[i][s]) for i in ids for s in range(n_stages)})
    column = {key: j for j, key in enumerate(columns)}
    x = np.zeros(
        (len(ids), len(columns))
    )  # (samples, miner-stages): 1 where the sample went through the miner
    for row, i in enumerate(ids):
        for s in range(n_stages):
            x[row, column[(s, paths[i][s])]] = 1.0
    counts = x.sum(axis=0)
    y = np.array([float(losses[i]) for i in ids])

    size = window or len(ids)
    windows = [slice(start, start + size) for start in range(0, len(ids), size)]
    for part in windows:  # absorb the window intercepts: compare miners within each stretch of training
        x[part] -= x[part].mean(axis=0)
        y[part] -= y[part].mean()

    # The pseudo-inverse through the eigenvalues of X'X: each stage's indicators sum to a constant, which the
    # windows absorb, so X'X is singular by one dimension per stage; those directions are dropped, not inverted.
    values, vectors = np.linalg.eigh(x.T @ x)
    kept = values > _RANK_TOLERANCE * max(float(values.max()), 1.0)
    basis = vectors[:, kept]
    gram_inv = basis @ np.diag(1.0 / values[kept]) @ basis.T
    projector = basis @ basis.T  # onto the row space of X: a contrast c is estimable iff projector @ c == c
    beta = gram_inv @ (x.T @ y)
    dof = len(ids) - len(windows) - int(kept.sum())
    residual = y - x @ beta
    variance = float(residual @ residual) / dof if dof > 0 else math.nan

    miners = []
    for (stage, miner), j in column.items():
        samples = int(counts[j])
        mates = [k for (s, m), k in column.items() if s == stage and m != miner]
        if not mates:
            miners.append(MinerAttribution(miner, stage, samples, 0.0, math.inf, math.nan, False, False))
            continue
        contrast = np.zeros(len(columns))
        contrast[j] = 1.0
        contrast[mates] = -1.0 / len(mates)
        identified = bool(np.linalg.norm(projector @ contrast - contrast) < _IDENTIFIED_TOLERANCE)
        effect = float(contrast @ beta)
        stderr = math.sqrt(max(variance * float(contrast @ gram_inv @ contrast), 0.0))
        z = effect / stderr if identified and stderr > 0 else math.nan
        flag = identified and samples >= min_samples and z > z_threshold
        miners.append(MinerAttribution(miner, stage, samples, effect, stderr, z, identified, flag))
    return Attribution(miners, len(ids), len(windows), math.sqrt(variance))


@dataclass(frozen=True)
class Paths:
    """What the orchestrator's state holds for attribution: completed samples' paths, losses and completion times."""

    paths: dict[int, tuple[str, ...]]
    losses: dict[int, float]
    order: dict[int, float]
