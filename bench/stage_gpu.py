"""One miner's stage on a GPU: tokens/s and peak memory of forward + backward + inner step, bf16 autocast vs fp32.

Runs the real StageWorker (the code a miner runs) on synthetic inputs of the right shapes, so it measures the
compute a miner contributes, without the network. Also checks that the merge's elementwise arithmetic gives the
same bits on CUDA as on the CPU (so a CUDA owner and a CPU owner agree).

    python -m bench.stage_gpu --presets 1b --steps 10 [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from iota.merge import outer_step
from iota.model import wire
from iota.model.config import default_stages, preset
from iota.model.stages import plan_stages
from iota.train.worker import StageWorker, TrainFlags

VOCAB = 128256


def bench_stage(
    name: str, stage: int, autocast: bool, steps: int, micro_batch: int
) -> dict[str, float | str]:
    config = preset(name, VOCAB, bottleneck=preset(name, VOCAB).hidden // 64)
    spec = plan_stages(config.n_layers, default_stages(name))[stage]
    flags = TrainFlags(micro_batch, 1, "adamw", 0.0, 1.0, torch.bfloat16)
    T = config.seq_len
    tokens = torch.randint(0, VOCAB, (micro_batch, T))

    def batch(_: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tokens, tokens

    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats()
    worker = StageWorker(config, spec, 0, flags, batch, device, autocast, cache_size=1)
    act = wire.encode(torch.randn(micro_batch, T, config.wire_width) * 0.1, torch.bfloat16)
    grad = wire.encode(torch.randn(micro_batch, T, config.wire_width) * 1e-3, torch.bfloat16)
    data = None if spec.is_head else act

    def one(i: int) -> None:
        worker.forward(i, data)
        if not spec.is_tail:
            worker.backward(i, grad)
        worker.step(1e-4)

    one(0)  # warm-up: kernels, optimizer state
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(1, steps + 1):
        one(i)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    return {
        "preset": name,
        "stage": stage,
        "precision": "bf16 autocast" if autocast else "fp32",
        "params_M": sum(p.numel() for p in worker.model.parameters()) / 1e6,
        "ms_per_microbatch": 1000 * seconds,
        "tokens_per_s": micro_batch * T / seconds,
        "peak_GiB": torch.cuda.max_memory_allocated() / 2**30,
    }


def merge_bits_agree(n: int = 1 << 22) -> bool:
    """The outer step's elementwise ops on CUDA give the CPU's bits (no fused multiply-add across ops)."""
    gen = torch.Generator().manual_seed(0)
    theta, m, g = (torch.randn(n, generator=gen) for _ in range(3))
    cpu = outer_step(theta, m, g, lr=0.7, mu=0.9, nesterov=True)
    gpu = outer_step(theta.cuda(), m.cuda(), g.cuda(), lr=0.7, mu=0.9, nesterov=True)
    return all(torch.equal(a, b.cpu()) for a, b in zip(cpu, gpu, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--presets", default="1b")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name in args.presets.split(","):
        for stage in range(default_stages(name)):
            for autocast in (True, False):
                row = bench_stage(name, stage, autocast, args.steps, args.micro_batch)
                rows.append(row)
                print(
                    " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                    flush=True,
                )
                torch.cuda.empty_cache()
    agree = merge_bits_agree()
    print(f"merge outer step, CUDA vs CPU bit-identical: {agree}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "merge_cuda_cpu_identical": agree}, f, indent=1)


if __name__ == "__main__":
    main()
