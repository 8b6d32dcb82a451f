"""One stage's compute on a miner: forward, backward, inner optimizer steps, and commitments to its weights.

Bytes in, bytes out: the worker decodes what it downloaded (checked against the shape and dtype it expects) and
encodes what it uploads, so the daemon around it only moves bytes and talks to the orchestrator.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from iota.model import codecs, wire
from iota.model.config import ModelConfig
from iota.model.flat import flatten, parameters, unflatten_into
from iota.model.llama import Llama, autocast, loss_fn
from iota.model.stages import StageSpec, build_stage
from iota.protocol import RunInfo, WeightSketch
from iota.train import optim

Batch = Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # sample id -> (tokens (B, T), targets (B, T))
SKETCH_SIZE = 8  # seeded projections in a weight sketch


def rounding_seed(run_seed: int, stage: int, sample_id: int) -> int:
    """The seed of the stochastic rounding of the input gradient a stage sends for a sample (iota.model.wire): public,
    so a replay rounds the same way, and new for every sample and stage."""
    return ((run_seed * 1_000_003 + stage) * 1_000_003 + sample_id) % (1 << 62)


def sketch_seed(run_seed: int, epoch: int, step: int) -> int:
    """The seed of the sketch a miner commits for inner step `step` of `epoch`: public, and new at every step."""
    return ((run_seed * 1_000_003 + epoch) * 1_000_003 + step) % (1 << 62)


class InputRefused(wire.WireError):
    """The input (a peer's activation or gradient) does not decode: the fault is its producer's, which a release
    may name (the orchestrator checks the claim). Other errors of a hop, decoding ones included, are this
    miner's own."""


class NonFiniteOutput(ValueError):
    """This stage computed a non-finite output; it is not sent."""


@dataclass(frozen=True)
class TrainFlags:
    micro_batch: int
    accumulate: int  # micro-batches per inner step (k)
    optimizer: str
    weight_decay: float
    clip: float
    wire_dtype: torch.dtype
    codec: str = ""  # the run's activation codec (iota.model.codecs); "" sends activations dense


@dataclass
class Cached:
    input: torch.Tensor  # token ids on the head, else the activation received
    output: torch.Tensor | None  # the graph's output; None when graphs are not kept
    step: int  # inner step the forward ran at: a later step changed the weights, so the graph is recomputed


class StageWorker:
    def __init__(
        self,
        config: ModelConfig,
        spec: StageSpec,
        seed: int,
        flags: TrainFlags,
        batch: Batch,
        device: torch.device,
        use_autocast: bool,
        cache_size: int,
        keep_graphs: bool = True,
    ):
        self.config, self.spec, self.seed, self.flags, self.batch = config, spec, seed, flags, batch
        self.device = device
        self.use_autocast = use_autocast and device.type == "cuda"
        self.model: Llama = build_stage(config, spec, seed, device=device)
        self.optimizer = optim.make_optimizer(self.model.parameters(), flags.optimizer, flags.weight_decay)
        self.cache: OrderedDict[int, Cached] = OrderedDict()
        self.cache_size = max(cache_size, flags.accumulate)  # a window's graphs must all fit
        self.keep_graphs = keep_graphs
        self.micro_batches = 0  # backward passes accumulated since the last inner step
        self.window_forwards = 0  # forwards started in this accumulation window
        self.inner_step = 0  # inner steps this epoch
        self.epoch_start = self.flat_weights()
        width = config.wire_width
        self.act_shape = (flags.micro_batch, config.seq_len, width)
        self.codec = codecs.build(flags.codec, self.act_shape, flags.wire_dtype, seed)

    # -- compute ----------------------------------------------------------------------------------------

    @property
    def max_bytes(self) -> int:
        return self.codec.size

    def forward(self, sample_id: int, data: bytes | None) -> tuple[bytes, float | None]:
        """Run the stage on a sample. Returns what to upload and, on the tail, the loss.

        The tail runs its backward at once and returns the gradient for its input; other stages keep the graph
        until the sample's backward arrives.
        """
        self.forget([sample_id])  # a restarted sample replaces its orphaned graph from the earlier attempt
        tokens, targets = self.batch(sample_id) if (self.spec.is_head or self.spec.is_tail) else (None, None)
        if self.spec.is_head:
            assert tokens is not None
            x = tokens.to(self.device)
        else:
            x = self._decode(data).to(self.device).float()
        self.window_forwards += 1  # once the input is accepted: a refused one takes no slot of the window
        if self.spec.is_tail:
            assert targets is not None
            x.requires_grad_(True)
            with autocast(self.device.type, self.use_autocast):
                loss = loss_fn(self.model(x), targets.to(self.device))
            (loss / self.flags.accumulate).backward()
            self.micro_batches += 1
            return self._encode_gradient(x.grad, sample_id), float(loss.detach())
        with torch.set_grad_enabled(self.keep_graphs), autocast(self.device.type, self.use_autocast):
            out = self.model(x.requires_grad_(True) if self.keep_graphs and x.is_floating_point() else x)
        self.cache[sample_id] = Cached(x, out if self.keep_graphs else None, self.inner_step)
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)  # its backward will fail and the sample restarts at the head
        return self.codec.encode(self._checked(out.detach()).cpu()), None

    def backward(self, sample_id: int, data: bytes) -> bytes | None:
        """Backpropagate the gradient of this stage's output; returns the gradient of its input (None on the head).

        The graph kept from the forward is used while the weights are those it was built with; once an inner step
        has changed them (several samples in flight), the forward is recomputed from the cached input with the
        current weights, so backward never reads weights modified in place.
        """
        if sample_id not in self.cache:
            raise KeyError(f"no cached forward for sample {sample_id}")
        incoming = self._decode(data)  # a refused gradient leaves the graph for an honest one
        cached = self.cache.pop(sample_id)
        x, out = cached.input, cached.output
        if out is None or cached.step != self.inner_step:
            x = x.detach().requires_grad_(True) if x.is_floating_point() else x
            with autocast(self.device.type, self.use_autocast):
                out = self.model(x)
        grad = incoming.to(self.device, dtype=out.dtype)
        out.backward(grad)
        self.micro_batches += 1
        if not x.is_floating_point():
            return None
        return self._encode_gradient(x.grad, sample_id)

    def _encode_gradient(self, grad: torch.Tensor | None, sample_id: int) -> bytes:
        """An input gradient on the wire, stochastically rounded to bf16 or int8 (round-to-nearest biases what
        crosses a bottleneck: iota.model.wire.round_bf16_stochastic)."""
        assert grad is not None
        seed = rounding_seed(self.seed, self.spec.index, sample_id)
        return self.codec.encode(self._checked(grad.detach()).cpu(), seed)

    def _decode(self, data: bytes | None) -> torch.Tensor:
        if data is None:
            raise ValueError("this stage needs an input tensor")
        try:
            return self.codec.decode(data)
        except wire.WireError as error:
            raise InputRefused(str(error)) from error

    @staticmethod
    def _checked(out: torch.Tensor) -> torch.Tensor:
        """This stage's output, refused before it is sent if it is not finite: whatever drove it there (an input
        within the wire's bounds, these weights) it must not reach the next stage as if it were honest work."""
        if not bool(torch.isfinite(out).all()):
            raise NonFiniteOutput("this stage's output is not finite; the hop is not sent")
        return out

    def forget(self, sample_ids: list[int]) -> None:
        """Drop cached forwards whose backward will never come (their sample restarted elsewhere, or their report
        was refused); they no longer count against the window. The weights and step count are untouched."""
        for sample_id in sample_ids:
            if self.cache.pop(sample_id, None) is not None:
                self.window_forwards = max(0, self.window_forwards - 1)

    def wants_forward(self) -> bool:
        """At most k forwards per accumulation window: the window's backward passes all use the weights its
        forwards used (no inner step between them), so gradients are exact and the step count follows the data."""
        return self.window_forwards < self.flags.accumulate

    def step_due(self) -> bool:
        return self.micro_batches >= self.flags.accumulate

    def step(self, lr: float) -> float:
        """One inner step over the accumulated micro-batches (the tail already divided its loss by k)."""
        norm = optim.step(self.optimizer, lr, self.flags.clip)
        self.micro_batches = 0
        self.window_forwards = 0
        self.inner_step += 1
        return norm

    def challenged(self, step: int) -> None:
        """A snapshot challenge of `step` was served (an honest worker does nothing with it; the adversaries
        that would use it to tell when they are watched override it)."""

    # -- weights ----------------------------------------------------------------------------------------

    def state(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().float().cpu() for name, p in self.model.named_parameters()}

    @torch.no_grad()
    def load_flat(self, flat: torch.Tensor) -> None:
        """New epoch weights (flat fp32, sorted-name order): load them, forget the inner optimizer and graphs."""
        unflatten_into(self.model, flat)
        optim.reset(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        self.cache.clear()
        self.micro_batches = 0
        self.window_forwards = 0
        self.inner_step = 0
        self.epoch_start = self.flat_weights()

    def flat_weights(self) -> torch.Tensor:
        """fp32 weights flattened in name order: the layout the merge partitions."""
        return flatten(self.model)

    def pseudo_gradient(self) -> torch.Tensor:
        """The change of the stage over the epoch, start minus end (the outer optimizer's gradient)."""
        return self.epoch_start - self.flat_weights()

    @torch.no_grad()
    def sketch(self, seed: int) -> WeightSketch:
        """Per-tensor norms and a seeded projection of a strided sample: cheap, and hard to fake without the weights."""
        gen = torch.Generator().manual_seed(seed)
        norms, projection = [], [0.0] * SKETCH_SIZE
        for p in parameters(self.model):
            flat = p.detach().float().cpu().reshape(-1)
            norms.append(float(flat.norm()))
            picked = flat[torch.randint(0, flat.numel(), (64,), generator=gen)]
            signs = torch.randn(SKETCH_SIZE, 64, generator=gen)
            for i, v in enumerate((signs @ picked).tolist()):
                projection[i] += v
        return WeightSketch(norms=norms, projection=projection)


def stage_clip(run: RunInfo, stage: int) -> float:
    """The run clips the whole model's gradient norm at C; a stage sees only its share, C * sqrt(n_stage / n)."""
    total = sum(s.n_params for s in run.stages)
    return run.clip * math.sqrt(run.stages[stage].n_params / total)
