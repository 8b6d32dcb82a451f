"""`iota baseline`: the whole model in one process, on the run's samples in order: what every network run is
compared with. Same data plan, same schedule, same optimizer code as the miners."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm

from iota.model.llama import autocast, loss_fn
from iota.model.stages import build_full, build_pipeline
from iota.train import optim
from iota.train.run import Run, heldout_loss
from iota.train.schedule import inner_step_lr


def train_baseline(
    run: Run,
    tokens: int,
    *,
    replicas: int = 1,
    device: str = "cpu",
    bf16: bool = False,
    threads: int = 0,
    progress: bool = True,
    on_step: Callable[[int, int, float], None] | None = None,
) -> dict[str, Any]:
    """Train on samples 0, 1, 2, ... and return the report of DESIGN.md.

    `replicas` > 1 reproduces the global batch of a stage with that many replicas: every inner step then
    averages replicas x k micro-batches, at the learning rate the network would use. `on_step(done, steps,
    loss)` is called after every inner step (a caller's own progress line, where tqdm's bar is off).
    """
    if threads:
        torch.set_num_threads(threads)
    s = run.settings
    torch.manual_seed(s.seed)
    # With a bottleneck the model is its stages chained (each boundary has its own projections).
    if run.model.bottleneck:
        model: torch.nn.Module = build_pipeline(run.model, run.stages, s.seed, device=device)
    else:
        model = build_full(run.model, s.seed, device=device)
    optimizer = optim.make_optimizer(model.parameters(), s.optimizer, s.weight_decay)
    per_step = s.accumulate * replicas
    steps = max(1, tokens // (per_step * run.micro_batch_tokens))
    curve: list[tuple[int, float]] = []
    dev = torch.device(device)
    start = time.perf_counter()
    sample_id = 0
    bar = tqdm(range(steps), desc="baseline", unit="step", disable=None if progress else True)
    for step in bar:
        for _ in range(per_step):
            tokens_in, targets = run.batch(sample_id)
            with autocast(dev.type, bf16):
                logits = model(tokens_in.to(dev))
            loss = loss_fn(logits, targets.to(dev))
            (loss / per_step).backward()
            sample_id += 1
            curve.append((sample_id * run.micro_batch_tokens, float(loss.detach())))
        lr = inner_step_lr(run.schedule, 0, step, s.accumulate, run.micro_batch_tokens, replicas)
        optim.step(optimizer, lr, s.clip)
        bar.set_postfix(loss=f"{curve[-1][1]:.3f}", lr=f"{lr:.2e}")
        if on_step is not None:
            on_step(step + 1, steps, curve[-1][1])
    wall = time.perf_counter() - start
    model.eval()
    eval_loss = heldout_loss(lambda t: model(t.to(dev)).float().cpu(), run.data, s.heldout_samples)
    trained = sample_id * run.micro_batch_tokens
    return {
        "preset": s.preset,
        "tokens_trained": trained,
        "wall_seconds": wall,
        "tokens_per_second": trained / wall,
        "loss_curve": curve,
        "final_loss": sum(v for _, v in curve[-per_step:]) / per_step,
        "eval_loss": eval_loss,
        "epochs_completed": 1,
        "unigram_entropy": run.data.unigram_entropy(),
        "replicas": replicas,
        "device": device,
        "bf16": bf16,
        "model": run.model.to_dict(),
    }
