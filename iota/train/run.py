"""A run built from its settings: data, tokenizer, model config, stage plan and schedule.

The orchestrator builds it to publish; `iota baseline` and `iota eval` build the very same one, so they train and
evaluate on the same samples, in the same order, with the same learning rate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from iota.config import RunSettings
from iota.data import DataPlan, Prepared, TokenData, load_prepared, prepare_command
from iota.model import codecs
from iota.model.config import ModelConfig, preset
from iota.model.stages import StageSpec, plan_stages
from iota.train.schedule import LRSchedule

DEFAULT_VOCAB = {"test": 512, "tiny": 4096}  # BPE vocabularies for the small presets; larger ones use 8192
HELDOUT_FRACTION = 0.02


@dataclass(frozen=True)
class Run:
    settings: RunSettings
    model: ModelConfig
    stages: list[StageSpec]
    prepared: Prepared
    plan: DataPlan
    data: TokenData
    schedule: LRSchedule

    @property
    def micro_batch_tokens(self) -> int:
        return self.settings.micro_batch * self.model.seq_len

    def batch(self, sample_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return sample_batch(self.data, self.settings.micro_batch, sample_id)


def sample_batch(data: TokenData, micro_batch: int, sample_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A sample is one micro-batch: sequences sample_id * B .. sample_id * B + B - 1 of the data plan."""
    first = sample_id * micro_batch
    return data.batch(range(first, first + micro_batch))


def batch_fn(data: TokenData, micro_batch: int) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    return lambda sample_id: sample_batch(data, micro_batch, sample_id)


def prepared_dir(settings: RunSettings) -> Path:
    """Prepared data is cached per corpus, tokenizer and vocabulary, so runs that share them share the work."""
    corpus = settings.corpus.replace("/", "_").replace(",", "+") or "kjv"
    vocab = settings.vocab_size or DEFAULT_VOCAB.get(settings.preset, 8192)
    name = f"{corpus}-{settings.tokenizer}" + (f"{vocab}" if settings.tokenizer == "bpe" else "")
    return Path(settings.data_dir) / name


def load_data(settings: RunSettings) -> Prepared:
    directory = prepared_dir(settings)
    if not (directory / "manifest.json").is_file():
        vocab = settings.vocab_size or DEFAULT_VOCAB.get(settings.preset, 8192)
        paths = [Path(p) for p in settings.corpus.split(",") if p]
        prepare_command(paths, settings.tokenizer, vocab, directory)
    return load_prepared(directory)


def build_run(settings: RunSettings) -> Run:
    prepared = load_data(settings)
    overrides = {"seq_len": settings.seq_len} if settings.seq_len else {}
    model = preset(
        settings.preset, prepared.manifest.vocab_size, bottleneck=settings.bottleneck or None, **overrides
    )
    codecs.parse(settings.codec).check(model.wire_width)  # a rank wider than the wire stops the run here
    split = [int(n) for n in settings.layers_per_stage.split(",") if n] or None
    stages = plan_stages(model.n_layers, settings.stages, split, tail_cost=model.lm_head_cost())
    plan = prepared.plan(model.seq_len, settings.seed, HELDOUT_FRACTION)
    data = TokenData(plan, prepared.tokens)
    schedule = LRSchedule(
        peak_lr=settings.lr,
        warmup_tokens=min(settings.warmup_tokens, settings.total_tokens),
        total_tokens=settings.total_tokens,
        min_lr_ratio=settings.min_lr_ratio,
        rewarm_steps=settings.rewarm_steps,
    )
    return Run(settings, model, stages, prepared, plan, data, schedule)


@torch.no_grad()
def heldout_loss(forward: Callable[[torch.Tensor], torch.Tensor], data: TokenData, n_samples: int) -> float:
    """Mean cross-entropy per token on the first n held-out sequences (the data training never touches)."""
    from iota.model.llama import loss_fn

    total, count = 0.0, 0
    for tokens, targets in data.heldout_batches(n_samples, batch_size=8):
        logits = forward(tokens)
        total += float(loss_fn(logits, targets, reduction="sum"))
        count += targets.numel()
    return total / max(count, 1)
