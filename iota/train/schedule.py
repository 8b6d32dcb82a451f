"""The learning-rate schedule, indexed by tokens trained so every stage, validator and the baseline agree on it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class LRSchedule:
    """Linear warmup from 0 to `peak_lr` over `warmup_tokens`, then cosine decay to `peak_lr * min_lr_ratio`
    at `total_tokens`, flat after. Indexed by tokens rather than steps because the number of replicas, and so
    the tokens per inner step, changes from epoch to epoch.

    `rewarm_steps`: every epoch after the first begins with a fresh inner optimizer (APPLY resets it), whose
    first AdamW steps are as large as lr * sign(g); its learning rate ramps back up linearly over this many
    inner steps (0: no ramp). See `inner_step_lr`."""

    peak_lr: float
    warmup_tokens: int
    total_tokens: int
    min_lr_ratio: float = 0.1
    rewarm_steps: int = 0

    def __post_init__(self) -> None:
        if self.peak_lr <= 0:
            raise ValueError(f"peak_lr must be > 0, got {self.peak_lr}")
        if not 0 <= self.warmup_tokens <= self.total_tokens or self.total_tokens <= 0:
            raise ValueError(
                f"need 0 <= warmup_tokens <= total_tokens and total_tokens > 0, "
                f"got {self.warmup_tokens}, {self.total_tokens}"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.rewarm_steps < 0:
            raise ValueError(f"rewarm_steps must be >= 0, got {self.rewarm_steps}")

    @property
    def min_lr(self) -> float:
        return self.peak_lr * self.min_lr_ratio

    def lr(self, tokens: int) -> float:
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        if tokens < self.warmup_tokens:
            return self.peak_lr * tokens / self.warmup_tokens
        decay_tokens = self.total_tokens - self.warmup_tokens
        progress = 1.0 if decay_tokens == 0 else min(1.0, (tokens - self.warmup_tokens) / decay_tokens)
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LRSchedule:
        return cls(
            peak_lr=float(d["peak_lr"]),
            warmup_tokens=int(d["warmup_tokens"]),
            total_tokens=int(d["total_tokens"]),
            min_lr_ratio=float(d.get("min_lr_ratio", 0.1)),
            rewarm_steps=int(d.get("rewarm_steps", 0)),
        )


def inner_step_tokens(
    tokens_at_epoch_start: int, step: int, k: int, micro_batch_tokens: int, replicas: int
) -> int:
    """Tokens the whole network had trained when inner step `step` of an epoch began: every one of the
    `replicas` of a stage consumes `k` micro-batches of `micro_batch_tokens` per inner step."""
    if step < 0 or k < 1 or micro_batch_tokens < 1 or replicas < 1:
        raise ValueError(
            f"need step >= 0 and k, micro_batch_tokens, replicas >= 1; got {step}, {k}, {micro_batch_tokens}, {replicas}"
        )
    return tokens_at_epoch_start + step * k * micro_batch_tokens * replicas


def inner_step_lr(
    schedule: LRSchedule,
    tokens_at_epoch_start: int,
    step: int,
    k: int,
    micro_batch_tokens: int,
    replicas: int,
) -> float:
    """DESIGN.md's rule: inner step t of epoch e uses lr(tokens_at_start(e) + t * k * micro_batch_tokens *
    replicas(e)); the baseline is the case replicas = 1 and tokens_at_start 0 (one epoch, never reset).

    An epoch that starts after an APPLY (tokens_at_start > 0) scales that by min(1, (t + 1) / rewarm_steps):
    its inner optimizer starts afresh, and the ramp keeps its first, poorly normalised steps small.
    """
    lr = schedule.lr(inner_step_tokens(tokens_at_epoch_start, step, k, micro_batch_tokens, replicas))
    if tokens_at_epoch_start > 0 and schedule.rewarm_steps > 0:
        lr *= min(1.0, (step + 1) / schedule.rewarm_steps)
    return lr
