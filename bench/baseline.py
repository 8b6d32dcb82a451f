"""Baseline training throughput on this machine: tokens/s of the whole model in one process, fp32 and bf16.

    python -m bench.baseline [--preset tiny] [--tokens 40960] [--device cpu] [--threads 0] [--json FILE]

bf16 is autocast over fp32 master weights (what a CUDA miner runs); on a CPU without native bf16 matrix units it
is usually slower than fp32, which the figures show rather than assume. The first step is a warm-up and is not
timed (train_baseline's clock includes it, so the bench times a second run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import torch

from iota.config import RunSettings
from iota.train.baseline import train_baseline
from iota.train.run import build_run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--tokens", type=int, default=40_960)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--data-dir", default="runs/data")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    run = build_run(
        RunSettings(
            preset=args.preset, micro_batch=args.micro_batch, data_dir=args.data_dir, total_tokens=args.tokens
        )
    )
    train_baseline(
        run,
        4 * args.micro_batch * run.model.seq_len,
        device=args.device,
        progress=False,
        threads=args.threads,
    )  # warm-up: allocator, kernels, data
    rows = []
    for bf16 in (False, True):
        report = train_baseline(
            run, args.tokens, device=args.device, bf16=bf16, progress=False, threads=args.threads
        )
        rows.append(
            {
                "precision": "bf16 autocast" if bf16 else "fp32",
                "tokens": report["tokens_trained"],
                "seconds": round(report["wall_seconds"], 2),
                "tokens_per_s": round(report["tokens_per_second"]),
                "final_loss": round(report["final_loss"], 3),
            }
        )
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": args.device,
        "torch": torch.__version__,
    }
    print(f"preset {args.preset}, micro-batch {args.micro_batch} x {run.model.seq_len}, {machine}")
    print(f"{'precision':<14} {'tokens':>8} {'seconds':>8} {'tokens/s':>9} {'loss':>6}")
    for r in rows:
        print(
            f"{r['precision']:<14} {r['tokens']:>8} {r['seconds']:>8} {r['tokens_per_s']:>9} {r['final_loss']:>6}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
