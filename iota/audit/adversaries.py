"""Cheating miners, each a StageWorker that fakes one thing, and the in-process pipeline that drives them.

They exist to prove the audit catches them (tests/validator) and to let `iota local` run a cheater for a demo.
Each overrides only what it fakes and keeps the rest honest, so the audit has to find the one lie. Extra
arguments are keyword-only; build one with `functools.partial(Cheat, extra=...)` as a ReplaySetup factory.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from iota.audit.compare import FP32
from iota.audit.records import Direction, HopRecord
from iota.model import wire
from iota.model.llama import autocast, loss_fn
from iota.train.snapshot import Snapshot, take_snapshot
from iota.train.worker import Batch, Cached, StageWorker

# -- the harness ---------------------------------------------------------------------------------------------


def synthetic_batch(vocab: int, micro_batch: int, seq_len: int, seed: int = 0) -> Batch:
    """Sample id -> (tokens, targets) from a fixed random Markov chain over Zipf-weighted tokens.

    Text-like statistics (a skewed unigram distribution, predictable successors) without a corpus, so tests and
    the calibration run anywhere in milliseconds; a sample's tokens depend only on (seed, sample id).
    """
    gen = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, 4), generator=gen)  # each token has 4 likely successors
    zipf = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)

    @functools.lru_cache(maxsize=1024)  # head and tail of every replay ask again; nobody writes to them
    def batch(sample_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + sample_id)
        seq = torch.empty(micro_batch, seq_len + 1, dtype=torch.long)
        seq[:, 0] = torch.multinomial(zipf, micro_batch, replacement=True, generator=g)
        for t in range(1, seq_len + 1):
            follow = successors[seq[:, t - 1], torch.randint(0, 4, (micro_batch,), generator=g)]
            jump = torch.multinomial(zipf, micro_batch, replacement=True, generator=g)
            seq[:, t] = torch.where(torch.rand(micro_batch, generator=g) < 0.75, follow, jump)
        return seq[:, :-1], seq[:, 1:]  # (B, T) each

    return batch


class WorkerPipeline:
    """One worker per stage, driven as the miner daemons drive them: each hop, then the inner step if due, then
    the report. Every hop is recorded per stage in commit order, as a validator later reads it."""

    def __init__(
        self,
        workers: Sequence[StageWorker],
        lr: Callable[[int], float],
        epoch: int = 0,
        on_step: Callable[[int, StageWorker], None] | None = None,
    ):
        """`on_step(stage, worker)` runs right after each inner step: where a challenged miner snapshots."""
        self.workers, self.lr, self.epoch, self.on_step = list(workers), lr, epoch, on_step
        self.records: list[list[HopRecord]] = [[] for _ in self.workers]

    def run(self, sample_ids: Sequence[int], in_flight: int = 1) -> None:
        """Forward `in_flight` samples through every stage, then their backwards. The daemon takes at most k
        forwards per accumulation window (`StageWorker.wants_forward`); more than k here makes a backward run
        after a step and recompute its forward, the worker path a replay must also follow."""
        ids = list(sample_ids)
        for first in range(0, len(ids), in_flight):
            group = ids[first : first + in_flight]
            grads = {}
            for sample_id in group:
                data: bytes | None = None
                for stage in range(len(self.workers)):
                    data = self._hop(stage, "forward", sample_id, data)
                grads[sample_id] = data
            for sample_id in group:
                grad = grads[sample_id]
                for stage in range(len(self.workers) - 2, -1, -1):
                    grad = self._hop(stage, "backward", sample_id, grad)

    def _hop(self, stage: int, direction: Direction, sample_id: int, data: bytes | None) -> bytes | None:
        worker = self.workers[stage]
        out: bytes | None
        loss: float | None = None
        if direction == "forward":
            out, loss = worker.forward(sample_id, data)
        else:
            assert data is not None
            out = worker.backward(sample_id, data)
        if worker.step_due():
            worker.step(self.lr(worker.inner_step))
            if self.on_step is not None:
                self.on_step(stage, worker)
        self.records[stage].append(
            HopRecord(self.epoch, stage, direction, sample_id, worker.inner_step, data, out, loss)
        )
        return out


# -- the miners --------------------------------------------------------------------------------------------


class Honest(StageWorker):
    """The honest miner; every cheat below changes one thing."""

    def snapshot(self) -> Snapshot:
        return take_snapshot(self)

    def _carried(self, sample_id: int, data: bytes | None) -> torch.Tensor | None:
        """What passes through the stage untouched (see compare): the input, or the head's embedding."""
        if self.spec.is_tail:
            return None
        if self.spec.is_head:
            assert self.model.embed is not None
            with torch.no_grad():
                tokens = self.batch(sample_id)[0].to(self.device)
                return self.model.embed(tokens)[..., : self.config.wire_width].float().cpu()
        return self._decode(data).float()

    def _encode(self, tensor: torch.Tensor) -> bytes:
        return wire.encode(tensor, self.flags.wire_dtype)


class RandomOutput(Honest):
    """Uploads noise with the scale of an honest output (the tail: of an honest input gradient)."""

    def forward(self, sample_id: int, data: bytes | None) -> tuple[bytes, float | None]:
        out, loss = super().forward(sample_id, data)
        honest = self._decode(out).float()
        gen = torch.Generator().manual_seed(sample_id)
        return self._encode(torch.randn(honest.shape, generator=gen) * honest.std()), loss


class Identity(Honest):
    """A body stage that computes nothing: its output is its input, its input gradient the output gradient."""

    def forward(self, sample_id: int, data: bytes | None) -> tuple[bytes, float | None]:
        if self.spec.is_head or self.spec.is_tail or data is None:
            raise ValueError("the identity cheat is a body stage's")
        self.cache[sample_id] = Cached(torch.empty(0), None, self.inner_step)
        return data, None

    def backward(self, sample_id: int, data: bytes) -> bytes | None:
        self.cache.pop(sample_id)
        self.micro_batches += 1
        return data


class SkippedLayers(Honest):
    """Runs its stage without its last `skip` blocks, forward and backward."""

    def __init__(self, *args: Any, skip: int = 1, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.skip = skip

    @contextmanager
    def _fewer_blocks(self) -> Iterator[None]:
        layers = self.model.layers
        kept = list(layers.items())[: max(0, len(layers) - self.skip)]
        self.model.layers = nn.ModuleDict(dict(kept))
        try:
            yield
        finally:
            self.model.layers = layers

    def forward(self, sample_id: int, data: bytes | None) -> tuple[bytes, float | None]:
        with self._fewer_blocks():
            return super().forward(sample_id, data)

    def backward(self, sample_id: int, data: bytes) -> bytes | None:
        with self._fewer_blocks():
            return super().backward(sample_id, data)


class ZeroBackward(Honest):
    """Learns from its gradients but sends zeros upstream (the tail: zeros for its input gradient)."""

    def forward(self, sample_id: int, data: bytes | None) -> tuple[bytes, float | None]:
        out, loss = super().forward(sample_id, data)
        if self.spec.is_tail:
            return self._encode(torch.zeros_like(self._decode(out))), loss
        return out, loss

    def backward(self, sample_id: int, data: bytes) -> bytes | None:
        grad = super().backward(sample_id, data)
        return None if grad is None else self._encode(torch.zeros_like(self._decode(grad)))


class SkippedBackward(Honest):
    """Never backpropagates: a body stage hands the output gradient back as its input gradient, and no stage's
    weights learn (the tail sends zeros). The step counts still advance, so the reports look in order."""

    def forward(self, sample_id: int, data: bytes | None) -> tuple[bytes, float | None]:
        if not self.spec.is_tail:
            return super().forward(sample_id, data)
        with torch.no_grad():
            _, targets = self.batch(sample_id)
            x = self._decode(data).to(self.device).float()
            with autocast(self.device.type, self.use_autocast):
                loss = loss_fn(self.model(x), targets.to(self.device))
        self.micro_batches += 1
        return self._encode(torch.zeros_like(x)), float(loss)

    def backward(self, sample_id: int, data: bytes) -> bytes | None:
        self.cache.pop(sample_id)
        self.micro_batches += 1
        return None if self.spec.is_head else data


class StaleWeights(Honest):
    """Keeps computing with an older epoch's weights, whatever APPLY hands it."""

    def __init__(self, *args: Any, stale: torch.Tensor, **kwargs: Any):
        self.stale = stale
        super().__init__(*args, **kwargs)

    def load_flat(self, flat: torch.Tensor) -> None:
        super().load_flat(self.stale)


class Int8Weights(Honest):
    """Holds its weights as int8 (symmetric, one scale per output row) to save memory: quantised at every load
    and after every step. The error is about 0.5% of each weight: the smallest cheat the thresholds must catch."""

    def __init__(self, *args: Any, per_row: bool = True, **kwargs: Any):
        self.per_row = per_row
        super().__init__(*args, **kwargs)

    def load_flat(self, flat: torch.Tensor) -> None:
        super().load_flat(flat)
        self._quantise()
        self.epoch_start = self.flat_weights()

    def step(self, lr: float) -> float:
        norm = super().step(lr)
        self._quantise()
        return norm

    @torch.no_grad()
    def _quantise(self) -> None:
        for p in self.model.parameters():
            rows = p.reshape(p.shape[0], -1) if (self.per_row and p.dim() > 1) else p.reshape(1, -1)
            scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
            p.copy_((torch.round(rows / scale).clamp(-127, 127) * scale).view_as(p))


class NoisyOutput(Honest):
    """Adds Gaussian noise of `scale` times the stage's change to its outputs, and of `grad_scale` times it to
    its input gradients (the tail's output is one): a cheat tuned to sit just past the thresholds (or, below
    them, to show that they are where they say)."""

    def __init__(self, *args: Any, scale: float, grad_scale: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.scale, self.grad_scale = scale, grad_scale

    def _noisy(self, sample_id: int, out: bytes, carried: torch.Tensor | None, scale: float) -> bytes:
        honest = self._decode(out).float()
        change = honest if carried is None else honest - carried
        noise = self._noise(sample_id, honest.shape)
        noise *= scale * change.norm() / noise.norm()
        return self._encode(honest + noise)

    def _noise(self, sample_id: int, shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=torch.Generator().manual_seed(sample_id))  # new on every sample

    def forward(self, sample_id: int, data: bytes | None) -> tuple[bytes, float | None]:
        carried = self._carried(sample_id, data)
        out, loss = super().forward(sample_id, data)
        scale = self.grad_scale if self.spec.is_tail else self.scale
        return self._noisy(sample_id, out, carried, scale), loss

    def backward(self, sample_id: int, data: bytes) -> bytes | None:
        grad = super().backward(sample_id, data)
        if grad is None:
            return None
        return self._noisy(sample_id, grad, self._decode(data).float(), self.grad_scale)


class ConsistentBias(NoisyOutput):
    """NoisyOutput with one fixed direction for every sample: the same tensor, scaled to each hop's change under
    the threshold (by default half of fp32's), so no hop fails on its own while the bias accumulates in what the
    next stage learns."""

    def __init__(
        self,
        *args: Any,
        scale: float = 0.5 * FP32.activation,
        grad_scale: float = 0.5 * FP32.gradient,
        **kwargs: Any,
    ):
        super().__init__(*args, scale=scale, grad_scale=grad_scale, **kwargs)

    def _noise(self, sample_id: int, shape: torch.Size) -> torch.Tensor:
        # On 1 value in 64, so that each moves by several of the wire's rounding steps instead of vanishing in them.
        gen = torch.Generator().manual_seed(0)
        return torch.randn(shape, generator=gen) * (torch.rand(shape, generator=gen) < 1 / 64)


class CopiedOutput(Honest):
    """Uploads objects another miner of its stage uploaded (for other samples) instead of its own."""

    def __init__(self, *args: Any, pool: Sequence[bytes], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.pool = itertools.cycle(list(pool))

    def forward(self, sample_id: int, data: bytes | None) -> tuple[bytes, float | None]:
        _, loss = super().forward(sample_id, data)
        return next(self.pool), loss


class WrongTokens(Honest):
    """A head that embeds other tokens than its sample's (a cached batch, another sample, its own data)."""

    def __init__(self, *args: Any, offset: int = 1, **kwargs: Any):
        super().__init__(*args, **kwargs)
        plan_batch = self.batch
        self.batch = lambda sample_id: plan_batch(sample_id + offset)


class FakeLoss(Honest):
    """A tail that reports a lower loss than it computed."""

    def __init__(self, *args: Any, factor: float = 0.9, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.factor = factor

    def forward(self, sample_id: int, data: bytes | None) -> tuple[bytes, float | None]:
        out, loss = super().forward(sample_id, data)
        return out, None if loss is None else loss * self.factor


class ForgedPseudoGradient(Honest):
    """Uploads its pseudo-gradient scaled up, to weigh more in the merge."""

    def __init__(self, *args: Any, factor: float = 2.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.factor = factor

    def pseudo_gradient(self) -> torch.Tensor:
        return super().pseudo_gradient() * self.factor


class ForgedSnapshot(Honest):
    """Hands over other weights than it holds when challenged (here: the epoch's start, as if it never moved)."""

    def snapshot(self) -> Snapshot:
        honest = take_snapshot(self)
        return Snapshot(honest.inner_step, self.epoch_start.clone(), honest.steps, honest.moments)


class Watchful(Honest):
    """Honest only on the samples it guesses are watched; on the rest a body stage returns its input."""

    def __init__(self, *args: Any, watched: Callable[[int], bool] = lambda s: s % 4 == 0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.watched = watched

    def forward(self, sample_id: int, data: bytes | None) -> tuple[bytes, float | None]:
        out, loss = super().forward(sample_id, data)
        if self.watched(sample_id) or data is None or self.spec.is_tail:
            return out, loss
        return data, loss


class WindowWatcher(Honest):
    """Believes an audit replays only the first D steps of its session (a window from the checkpoint) and the D
    steps after each snapshot challenge it is served (a window from the snapshot, when challenges came at once):
    `watched` says whether its current step is one. The cheats below are honest there and nowhere else;
    challenges chosen after the fact (iota.orchestrator.challenges) name a step whose window it has already sent."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.watched_until = FP32.depth

    @property
    def watched(self) -> bool:
        return self.inner_step < self.watched_until

    def challenged(self, step: int) -> None:
        self.watched_until = max(self.watched_until, self.inner_step + FP32.depth)

    def load_flat(self, flat: torch.Tensor) -> None:
        super().load_flat(flat)  # a new epoch, from its checkpoint
        self.watched_until = FP32.depth


class WindowHonest(WindowWatcher, NoisyOutput):
    """Where it believes it is not watched, its outputs and gradients carry noise well past the thresholds."""

    def __init__(
        self,
        *args: Any,
        scale: float = 10 * FP32.activation,
        grad_scale: float = 10 * FP32.gradient,
        **kwargs: Any,
    ):
        super().__init__(*args, scale=scale, grad_scale=grad_scale, **kwargs)

    def _noisy(self, sample_id: int, out: bytes, carried: torch.Tensor | None, scale: float) -> bytes:
        return out if self.watched else super()._noisy(sample_id, out, carried, scale)


class SelectiveTail(WindowWatcher):
    """A tail that, where it believes it is not watched, sends zero gradients upstream and reports 0.8 x its loss:
    no upstream stage learns from those samples, and the loss curve looks better than the model is."""

    def forward(self, sample_id: int, data: bytes | None) -> tuple[bytes, float | None]:
        out, loss = super().forward(sample_id, data)
        if self.watched or not self.spec.is_tail or loss is None:
            return out, loss
        return self._encode(torch.zeros_like(self._decode(out).float())), 0.8 * loss


class WeightPoison(WindowWatcher):
    """Once an epoch, at the first step it believes no audit reaches, moves its own weights by random noise of
    `scale` times their norm; every later sketch, snapshot and upload agrees with the poisoned weights."""

    def __init__(self, *args: Any, scale: float = 0.05, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.scale, self.poisoned = scale, False

    def step(self, lr: float) -> float:
        norm = super().step(lr)
        if not self.watched and not self.poisoned:
            gen = torch.Generator().manual_seed(self.inner_step)
            with torch.no_grad():
                for p in self.model.parameters():
                    noise = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)
                    p.add_(noise * (self.scale * p.norm() / noise.norm()))
            self.poisoned = True
        return norm

    def load_flat(self, flat: torch.Tensor) -> None:
        super().load_flat(flat)
        self.poisoned = False
