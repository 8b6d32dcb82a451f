"""Activation codecs against the dense baseline: held-out loss at equal tokens, and wire bytes per hop.

Each configuration trains the stages in one process, chained as the network computes them
(iota.model.stages.build_pipeline), with every stage boundary passed through the run's codec exactly as a miner's
StageWorker packs it (iota.model.codecs): the activation forward (rounded to the nearest code), its gradient
backward (rounded stochastically with the worker's seed, iota.train.worker.rounding_seed). The reference is the
one-process dense baseline (`train_baseline`: fp32, nothing rounded) of the same seed, trained on the same samples
in the same order with the same schedule; gap = (codec - dense) / dense in held-out loss, which is also measured
through the codec (a low-rank codec is part of the function the stages learned).

A configuration is a codec name (iota.model.codecs: "" is the dense bf16 wire itself), optionally after a
bottleneck width: "bottleneck:64" or "bottleneck:64+int8" (the bottleneck is a layer of the model, so its
configuration is a model of its own; the codec then acts on its 64 channels). Bytes per hop are what a miner
uploads for one micro-batch (`Codec.size`), and `ratio` is the dense bf16 hop's size over it.

    python -m bench.codecs --preset test --tokens 512 --seeds 0 --configs int8 lowrank:8+int8   # smoke
    python -m bench.codecs --seeds 0 1 --json codecs.json          # the study: preset w512, 2,048,000 tokens

Prints one line per configuration and seed as it finishes, then each configuration's mean gap over the seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import torch

from iota.config import RunSettings
from iota.model import codecs, stages
from iota.model.stages import Pipeline
from iota.train import baseline
from iota.train.run import Run, build_run
from iota.train.worker import rounding_seed

CONFIGS = (
    "",
    "int8",
    "lowrank:64",
    "lowrank:32",
    "lowrank:16",
    "lowrank:64+int8",
    "lowrank:32+int8",
    "lowrank:16+int8",
    "bottleneck:64",
    "bottleneck:64+int8",
    "bottleneck:32+int8",
    "bottleneck:64+lowrank:16+int8",
)
# One sample per inner step, as tests/integration/test_pipeline.py's CONVERGE and bench/wire_rounding.py train.
SETTINGS: dict[str, Any] = {"stages": 3, "micro_batch": 8, "accumulate": 1, "clip": 1.0, "lr": 3e-3}


def split_config(config: str) -> tuple[int, str]:
    """ "bottleneck:64+int8" -> (64, "int8"); "lowrank:32" -> (0, "lowrank:32")."""
    if not config.startswith("bottleneck:"):
        return 0, codecs.parse(config).name
    width, _, codec = config.removeprefix("bottleneck:").partition("+")
    return int(width), codecs.parse(codec).name


class _Boundary(torch.autograd.Function):
    """What crosses a stage boundary: the codec's round trip of the activation forward, of its gradient backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, codec: codecs.Codec, gradient_seed: int) -> torch.Tensor:  # type: ignore[override]
        ctx.codec, ctx.gradient_seed = codec, gradient_seed
        return codec.roundtrip(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        return ctx.codec.roundtrip(grad, ctx.gradient_seed), None, None


@contextlib.contextmanager
def through_codec(run: Run, codec: codecs.Codec, sample: list[int]) -> Iterator[None]:
    """train_baseline on the stages chained with `codec` at each boundary; `sample[0]` is the sample computed."""

    def forward(self: Pipeline, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens
        for index, stage in enumerate(self.stages):
            if index > 0:  # stage `index` receives x and sends back its gradient: the seed of its rounding
                x = _Boundary.apply(x, codec, rounding_seed(run.settings.seed, index, sample[0]))
            x = stage(x)
        return x

    def chained(config: Any, seed: int, device: Any = "cpu") -> Pipeline:
        return stages.build_pipeline(config, run.stages, seed, device=device)

    original_forward, original_full = Pipeline.forward, baseline.build_full
    Pipeline.forward = forward  # type: ignore[method-assign]
    baseline.build_full = chained  # type: ignore[assignment]  # the stages chained even without a bottleneck
    try:
        yield
    finally:
        Pipeline.forward = original_forward  # type: ignore[method-assign]
        baseline.build_full = original_full


def train(settings: dict[str, Any], config: str | None, tokens: int, device: str = "cpu") -> dict[str, Any]:
    """Held-out loss after `tokens` tokens and bytes per hop; `config` None is the one-process dense baseline."""
    width, name = split_config(config) if config is not None else (0, "")
    run = build_run(RunSettings(**settings, bottleneck=width))
    shape = (run.settings.micro_batch, run.model.seq_len, run.model.wire_width)
    codec = codecs.build(name, shape, torch.bfloat16, run.settings.seed)
    dense = codecs.build(
        "", (*shape[:-1], run.model.hidden), torch.bfloat16, 0
    )  # what every ratio is against
    started = time.perf_counter()
    if config is None:
        report = baseline.train_baseline(run, tokens, device=device, progress=False)
    else:
        sample = [0]
        original_batch = run.batch

        def batch(sample_id: int) -> tuple[torch.Tensor, torch.Tensor]:
            sample[0] = sample_id  # train_baseline asks for each sample just before its forward
            return original_batch(sample_id)

        object.__setattr__(run, "batch", batch)  # Run is frozen; this copy of it serves only this bench
        with through_codec(run, codec, sample):
            report = baseline.train_baseline(run, tokens, device=device, progress=False)
    return {
        "eval_loss": float(report["eval_loss"]),
        "tokens": int(report["tokens_trained"]),
        "bytes_per_hop": codec.size,
        "ratio": dense.size / codec.size,
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="w512")
    parser.add_argument("--tokens", type=int, default=2_048_000, help="tokens each configuration trains on")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--configs", nargs="+", default=list(CONFIGS), help='codec names; "" is the bf16 wire'
    )
    parser.add_argument("--lr", type=float, default=SETTINGS["lr"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the codecs themselves run on the CPU)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--data-dir", default="", help="prepared data (default: a fresh temporary directory)")
    parser.add_argument("--json", default="", help="also write the figures to this file")
    args = parser.parse_args()
    for config in args.configs:
        split_config(config)  # a misspelt configuration stops here, not after an hour of training
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="codecs-")
    rows: list[dict[str, Any]] = []
    print(
        f"{'config':<30} {'seed':>4} {'eval':>7} {'gap':>8} {'bytes/hop':>10} {'ratio':>7} {'s':>6}",
        flush=True,
    )
    for seed in args.seeds:
        settings = {
            **SETTINGS,
            "preset": args.preset,
            "lr": args.lr,
            "total_tokens": args.tokens,
            "warmup_tokens": max(1, args.tokens // 10),
            "seed": seed,
            "data_dir": data_dir,
        }
        base = train(settings, None, args.tokens, args.device)
        print(f"{'(one-process dense)':<30} {seed:>4} {base['eval_loss']:>7.3f}", flush=True)
        for config in args.configs:
            row = {"config": config, "seed": seed, **train(settings, config, args.tokens, args.device)}
            row["baseline_eval"] = base["eval_loss"]
            row["gap"] = (row["eval_loss"] - base["eval_loss"]) / base["eval_loss"]
            rows.append(row)
            print(
                f"{config or '(dense bf16 wire)':<30} {seed:>4} {row['eval_loss']:>7.3f} {row['gap']:>+8.2%} "
                f"{row['bytes_per_hop']:>10} {row['ratio']:>6.1f}x {row['seconds']:>6.0f}",
                flush=True,
            )
    print("\nmean gap over seeds (spread: half-range of two, else sd)")
    summary = []
    for config in args.configs:
        mine = [r for r in rows if r["config"] == config]
        gaps = [r["gap"] for r in mine]
        spread = statistics.stdev(gaps) if len(gaps) > 2 else (max(gaps) - min(gaps)) / 2
        summary.append(
            {
                "config": config,
                "gap_mean": statistics.mean(gaps),
                "gap_spread": spread,
                "ratio": mine[0]["ratio"],
            }
        )
        print(
            f"{config or '(dense bf16 wire)':<30} {statistics.mean(gaps):>+8.2%} ±{spread:.2%}  {mine[0]['ratio']:.1f}x"
        )
    if args.json:
        machine = {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
        }
        with open(args.json, "w") as out:
            json.dump(
                {
                    "args": vars(args),
                    "settings": SETTINGS,
                    "machine": machine,
                    "rows": rows,
                    "summary": summary,
                },
                out,
                indent=1,
            )


if __name__ == "__main__":
    main()
