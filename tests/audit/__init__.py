"""Shared builders for the validator tests: the `test` preset in 3 stages on synthetic data, driven as a pipeline
whose miners snapshot (and commit a sketch) at every inner step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from iota.audit import ReplaySetup
from iota.audit.adversaries import Honest, WorkerPipeline, synthetic_batch
from iota.audit.records import HopRecord
from iota.audit.replay import WorkerFactory
from iota.model import build_stage, plan_stages, preset
from iota.protocol import WeightSketch
from iota.train.schedule import LRSchedule
from iota.train.snapshot import Snapshot, take_snapshot
from iota.train.worker import StageWorker, TrainFlags

VOCAB = 512
SKETCH_SEED = 7


def make_setups(
    bf16: bool = False,
    *,
    micro_batch: int = 1,
    accumulate: int = 1,
    seed: int = 0,
    lr: float = 3e-3,
    wire: torch.dtype = torch.bfloat16,
    bottleneck: int | None = None,
) -> list[ReplaySetup]:
    config = preset("test", VOCAB, bottleneck=bottleneck)
    flags = TrainFlags(micro_batch, accumulate, "adamw", 0.0, 1.0, wire)
    batch = synthetic_batch(config.vocab_size, micro_batch, config.seq_len, seed=seed)
    schedule = LRSchedule(lr, warmup_tokens=1, total_tokens=1 << 40)  # past warm-up: every step at the peak
    return [
        ReplaySetup(config, spec, seed, flags, batch, schedule, 1 << 20, 1, bf16=bf16)
        for spec in plan_stages(config.n_layers, 3)
    ]


def initial_weights(setups: Sequence[ReplaySetup]) -> list[torch.Tensor]:
    """The seeded init of every stage, flat: checkpoint 0."""
    flats = []
    for setup in setups:
        model = build_stage(setup.config, setup.spec, setup.seed)
        flats.append(torch.cat([p.detach().float().reshape(-1) for _, p in sorted(model.named_parameters())]))
    return flats


@dataclass
class Epoch:
    """What one epoch of a pipeline left behind: per stage, the records, and a snapshot and the committed sketch
    at every step boundary (index 0: the checkpoint)."""

    checkpoint: list[torch.Tensor]
    workers: list[StageWorker]
    records: list[list[HopRecord]]
    snapshots: list[dict[int, Snapshot]] = field(default_factory=list)
    sketches: list[dict[int, WeightSketch]] = field(default_factory=list)


def run_epoch(
    setups: Sequence[ReplaySetup],
    checkpoint: Sequence[torch.Tensor],
    samples: Sequence[int],
    *,
    cheats: Mapping[int, WorkerFactory] | None = None,
    in_flight: int = 2,
) -> Epoch:
    """Honest miners on every stage except those in `cheats` (stage -> factory)."""
    factories = [(cheats or {}).get(setup.spec.index, Honest) for setup in setups]
    workers = [
        setup.worker(flat, factory)
        for setup, flat, factory in zip(setups, checkpoint, factories, strict=True)
    ]
    snapshots: list[dict[int, Snapshot]] = [{0: take_snapshot(w)} for w in workers]
    sketches: list[dict[int, WeightSketch]] = [{0: w.sketch(SKETCH_SEED)} for w in workers]

    def on_step(stage: int, worker: StageWorker) -> None:
        snapshot = worker.snapshot() if isinstance(worker, Honest) else take_snapshot(worker)
        snapshots[stage][worker.inner_step] = snapshot
        sketches[stage][worker.inner_step] = worker.sketch(SKETCH_SEED)

    pipeline = WorkerPipeline(workers, setups[0].lr, on_step=on_step)
    pipeline.run(samples, in_flight=in_flight)
    return Epoch(list(checkpoint), workers, pipeline.records, snapshots, sketches)
