"""How rounding activations and gradients to the bf16 wire between stages changes what a bottlenecked model learns.

The stages are trained in one process, as the network computes them (iota.model.stages.build_pipeline), with each
stage boundary rounded the way iota.train.worker rounds what a miner uploads: the activation to the nearest bf16,
the input gradient to bf16 either to the nearest value or stochastically with the worker's own seed
(iota.model.wire.round_bf16_stochastic, iota.train.worker.rounding_seed). `fp32` leaves both alone: it is the
network with `IOTA_WIRE_DTYPE=fp32`, and the one-process baseline.

    python -m bench.wire_rounding --seeds 0 1 2 3          # preset test, bottleneck 16, 61,440 tokens

Prints the held-out loss of each mode and seed, and each mode's mean gap to fp32 (`--json FILE` writes them too).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from typing import Any

import torch

from iota.config import RunSettings
from iota.model.stages import Pipeline
from iota.model.wire import round_bf16_stochastic
from iota.train import baseline
from iota.train.run import build_run
from iota.train.worker import rounding_seed

MODES = ("fp32", "nearest", "stochastic")
# tests/integration/test_pipeline.py's CONVERGE: one sample per inner step, so the order of samples is the
# network's, and its learning rate and length.
SETTINGS: dict[str, Any] = {
    "preset": "test",
    "stages": 3,
    "bottleneck": 16,
    "micro_batch": 8,
    "accumulate": 1,
    "clip": 0.0,
    "lr": 1e-2,
    "warmup_tokens": 2000,
    "total_tokens": 61_440,
}


class _Boundary(torch.autograd.Function):
    """Identity, except that what crosses is rounded to the wire: the activation forward, its gradient backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, gradient_seed: int | None) -> torch.Tensor:  # type: ignore[override]
        ctx.gradient_seed = gradient_seed
        return x.to(torch.bfloat16).float()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        if ctx.gradient_seed is None:
            return grad.to(torch.bfloat16).float(), None
        return round_bf16_stochastic(grad, ctx.gradient_seed).float(), None


def rounded_forward(mode: str, run_seed: int, samples: list[int]) -> Any:
    """Pipeline.forward with the stage boundaries rounded; `samples[0]` names the sample being computed."""

    def forward(self: Pipeline, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens
        for index, stage in enumerate(self.stages):
            if index > 0 and mode != "fp32":
                # The gradient crossing into stage index-1 is the one stage `index` sends: its seed.
                seed = rounding_seed(run_seed, index, samples[0]) if mode == "stochastic" else None
                x = _Boundary.apply(x, seed)
            x = stage(x)
        return x

    return forward


def held_out_loss(mode: str, seed: int, data_dir: str) -> float:
    run = build_run(RunSettings(**SETTINGS, seed=seed, data_dir=data_dir))
    samples = [0]
    original_batch, original_forward = run.batch, Pipeline.forward

    def batch(sample_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        samples[0] = sample_id  # train_baseline asks for each sample just before its forward
        return original_batch(sample_id)

    object.__setattr__(run, "batch", batch)  # Run is frozen; this copy of it only serves this bench
    Pipeline.forward = rounded_forward(mode, seed, samples)  # type: ignore[method-assign]
    try:
        report = baseline.train_baseline(run, SETTINGS["total_tokens"], progress=False)
    finally:
        Pipeline.forward = original_forward  # type: ignore[method-assign]
    return float(report["eval_loss"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--data-dir", default="", help="prepared data (default: a fresh temporary directory)")
    parser.add_argument("--json", default="", help="also write the figures to this file")
    args = parser.parse_args()
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="wire-rounding-")
    losses: dict[str, list[float]] = {mode: [] for mode in MODES}
    print(f"{'seed':>4}  " + "  ".join(f"{mode:>10}" for mode in MODES), flush=True)
    for seed in args.seeds:
        row = {mode: held_out_loss(mode, seed, data_dir) for mode in MODES}
        for mode, loss in row.items():
            losses[mode].append(loss)
        print(f"{seed:>4}  " + "  ".join(f"{row[mode]:>10.3f}" for mode in MODES), flush=True)
    base = losses["fp32"]
    gaps = {mode: [a - b for a, b in zip(losses[mode], base, strict=True)] for mode in MODES[1:]}
    for mode, gap in gaps.items():
        spread = statistics.stdev(gap) if len(gap) > 1 else 0.0
        print(
            f"{mode}: held-out gap to fp32 {statistics.mean(gap):+.3f} nats (sd {spread:.3f}, n={len(gap)})"
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {"settings": SETTINGS, "seeds": args.seeds, "eval_loss": losses, "gap_to_fp32": gaps}, out
            )


if __name__ == "__main__":
    main()
