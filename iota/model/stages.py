"""Pipeline stage plan: which contiguous blocks each stage keeps, and building a stage's model from it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from iota.model.config import ModelConfig
from iota.model.llama import Llama, init_weights


@dataclass(frozen=True)
class StageSpec:
    """Stage `index` of `n_stages` keeps blocks first_layer .. last_layer - 1 (global indices)."""

    index: int
    n_stages: int
    first_layer: int
    last_layer: int  # exclusive

    def __post_init__(self) -> None:
        if self.n_stages < 1:
            raise ValueError(f"n_stages must be >= 1, got {self.n_stages}")
        if not 0 <= self.index < self.n_stages:
            raise ValueError(f"stage index {self.index} out of range for {self.n_stages} stages")
        if not 0 <= self.first_layer < self.last_layer:
            raise ValueError(
                f"a stage needs at least one layer: got layers [{self.first_layer}, {self.last_layer})"
            )

    @property
    def is_head(self) -> bool:
        """Owns the token embedding; its input is token ids."""
        return self.index == 0

    @property
    def is_tail(self) -> bool:
        """Owns the final norm and LM head; its output is logits."""
        return self.index == self.n_stages - 1

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.last_layer)


def plan_stages(
    n_layers: int, n_stages: int, layers_per_stage: list[int] | None = None, tail_cost: float = 0.0
) -> list[StageSpec]:
    """Split n_layers blocks into n_stages contiguous stages.

    Without `layers_per_stage` the split evens out the stages' compute, counting a block as 1 and the tail's LM
    head as `tail_cost` blocks more (`lm_head_cost`; 0: an even split). Each block goes where the stage's cost
    after it is lowest; on a tie to the body stages first (earliest first), then to the head, the tail last: the
    head and tail already carry the embedding and the LM head, and the tail the loss.
    """
    if n_stages < 1:
        raise ValueError(f"n_stages must be >= 1, got {n_stages}")
    if n_layers < n_stages:
        raise ValueError(f"cannot split {n_layers} layers into {n_stages} stages of at least one layer each")
    if layers_per_stage is None:
        counts = [1] * n_stages
        extra = [0.0] * (n_stages - 1) + [tail_cost]
        order = [*range(1, n_stages - 1), 0, n_stages - 1][-n_stages:]
        for _ in range(n_layers - n_stages):
            stage = min(order, key=lambda s: (counts[s] + extra[s], order.index(s)))
            counts[stage] += 1
    else:
        counts = list(layers_per_stage)
        if len(counts) != n_stages:
            raise ValueError(f"layers_per_stage has {len(counts)} entries for {n_stages} stages")
        if any(count < 1 for count in counts):
            raise ValueError(f"every stage needs at least one layer, got {counts}")
        if sum(counts) != n_layers:
            raise ValueError(
                f"layers_per_stage {counts} sums to {sum(counts)}, the model has {n_layers} layers"
            )
    specs = []
    first = 0
    for index, count in enumerate(counts):
        specs.append(StageSpec(index=index, n_stages=n_stages, first_layer=first, last_layer=first + count))
        first += count
    return specs


def build_stage(config: ModelConfig, spec: StageSpec, seed: int, device: torch.device | str = "cpu") -> Llama:
    """The stage's model with seeded weights: identical, name for name, to the same blocks of any other plan."""
    if spec.last_layer > config.n_layers:
        raise ValueError(f"stage keeps layers up to {spec.last_layer}, the model has {config.n_layers}")
    if spec.is_tail and spec.last_layer != config.n_layers:
        raise ValueError(
            f"the tail stage must end at the last layer ({config.n_layers}), got {spec.last_layer}"
        )
    if spec.is_head and spec.first_layer != 0:
        raise ValueError(f"the head stage must start at layer 0, got {spec.first_layer}")
    # Built without memory first: init_weights overwrites everything, so torch's default init would be wasted.
    with torch.device("meta"):
        model = Llama(config, spec)
    model.to_empty(device=device)
    init_weights(model, seed)
    return model


def build_full(config: ModelConfig, seed: int, device: torch.device | str = "cpu") -> Llama:
    """The whole model as a single stage (the baseline, and the reference every split is checked against)."""
    return build_stage(
        config, StageSpec(index=0, n_stages=1, first_layer=0, last_layer=config.n_layers), seed, device
    )


class Pipeline(torch.nn.Module):
    """Stages run one after the other in one process: token ids (B, T) -> logits (B, T, V).

    The whole model as the network computes it, bottleneck boundaries included (without a bottleneck,
    `build_full` is the same function with one module).
    """

    def __init__(self, stages: list[Llama]) -> None:
        super().__init__()
        self.stages = torch.nn.ModuleList(stages)
        self.config = stages[0].config

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens
        for stage in self.stages:
            x = stage(x)
        return x


def build_pipeline(
    config: ModelConfig, specs: list[StageSpec], seed: int, device: torch.device | str = "cpu"
) -> Pipeline:
    """Every stage of a plan, seeded exactly as the miners seed theirs."""
    return Pipeline([build_stage(config, spec, seed, device=device) for spec in specs])
