"""The outer optimizer step on one slice: SGD with (Nesterov) momentum on the averaged pseudo-gradient (DiLoCo)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field


class OuterConfig(BaseModel):
    """Outer optimizer hyper-parameters; DiLoCo's defaults (lr 0.7, Nesterov momentum 0.9).

    lr=1, momentum=0 is plain averaging: theta_start - mean(theta_start - theta_end_i) = mean(theta_end_i).
    """

    model_config = ConfigDict(frozen=True)

    lr: float = Field(default=0.7, gt=0, allow_inf_nan=False)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    nesterov: bool = True
    # The outer lr ramps linearly over the first warmup_epochs epochs: early pseudo-gradients are large and noisy.
    warmup_epochs: int = Field(default=0, ge=0)


def outer_lr(config: OuterConfig, epoch: int) -> float:
    """The outer lr for `epoch` (0-based): lr * (epoch + 1) / W during the first W epochs, then lr."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if epoch < config.warmup_epochs:
        return config.lr * (epoch + 1) / config.warmup_epochs
    return config.lr


def outer_step(
    theta: torch.Tensor,
    momentum: torch.Tensor | None,
    grad: torch.Tensor,
    *,
    lr: float,
    mu: float,
    nesterov: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step with PyTorch's momentum semantics; returns (new theta, new momentum), inputs untouched.

        m = mu * m + g;  update = g + mu * m if nesterov else m;  theta = theta - lr * update

    `grad` is the aggregated pseudo-gradient (theta_start - theta_end), `momentum` None means zeros (first merge).
    Every arithmetic step is one plain elementwise fp32 op on the CPU, never a fused one (addcmul, lerp, FMA
    contraction), so two machines computing the same step get the same bits.
    """
    for name, t in (("theta", theta), ("grad", grad), ("momentum", momentum)):
        if t is not None and (t.dtype != torch.float32 or t.shape != theta.shape or t.dim() != 1):
            raise ValueError(f"{name} must be a 1-D fp32 tensor of shape {tuple(theta.shape)}")
    lr_t = torch.tensor(lr, dtype=torch.float32)
    mu_t = torch.tensor(mu, dtype=torch.float32)
    previous = momentum if momentum is not None else torch.zeros_like(theta)
    decayed = previous * mu_t
    new_momentum = decayed + grad
    if nesterov:
        look_ahead = new_momentum * mu_t
        update = grad + look_ahead
    else:
        update = new_momentum
    step = update * lr_t
    new_theta = theta - step
    return new_theta, new_momentum
