"""The inner optimizer shared by the baseline and every miner: AdamW or SGD, optional clipping, set per step."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def make_optimizer(
    params: Iterable[torch.nn.Parameter], kind: str, weight_decay: float
) -> torch.optim.Optimizer:
    """lr is set before every step from the published schedule, so it starts at 0 here."""
    params = list(params)
    if kind == "adamw":
        # foreach=False: the same per-tensor kernels everywhere, so a validator replays a miner's step exactly.
        return torch.optim.AdamW(params, lr=0.0, betas=(0.9, 0.95), weight_decay=weight_decay, foreach=False)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.0, weight_decay=weight_decay, foreach=False)
    raise ValueError(f"unknown optimizer {kind!r}: expected adamw or sgd")


def step(optimizer: torch.optim.Optimizer, lr: float, clip: float, grad_scale: float = 1.0) -> float:
    """Scale the accumulated gradients, clip, step at `lr`, zero them; returns the gradient norm before clipping."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if grad_scale != 1.0:
        for p in params:
            p.grad.mul_(grad_scale)  # type: ignore[union-attr]
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"), foreach=False)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def reset(optimizer: torch.optim.Optimizer) -> None:
    """Forget moments and step counts (done at every APPLY, so a miner's weights follow from public data)."""
    optimizer.state.clear()
