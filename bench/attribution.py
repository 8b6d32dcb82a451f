"""Pathway attribution on a real pipeline: how many samples until a noise-injecting miner is flagged, and how often
an honest miner is.

    python -m bench.attribution [--seeds 5] [--samples 640] [--check-every 32] [--json FILE]

A swarm in one process: the `test` preset in 3 stages x 3 miners, each miner a StageWorker holding its own replica
of its stage, trained for real (forward, backward, AdamW inner steps at the run's schedule, k = 2) on the KJV
data plan. Every sample goes through one miner per stage picked at random, as the orchestrator's queue hands
forward work to whichever miner asks next, and its backward returns along the same path. Every
`samples_per_epoch` samples the replicas of each stage are averaged and reloaded (a merge with outer step 1 and no
momentum; the inner optimizer resets, as at APPLY).

Miner 0 of stage 1 (a body stage) is `NoisyOutput` from iota/audit/adversaries.py at each level:

  honest     no noise: every miner honest, the false-flag population
  audit      1.25x the fp32 audit thresholds (activation 1.1e-3, gradient 3.1e-3 of the stage's change): noise the
             audit catches (tests/audit/test_adversaries.py)
  x1, x3, x10  noise of 1, 3 and 10 times the norm of the stage's change, on outputs and input gradients alike

Every `check_every` samples `iota.audit.attribution.attribute` runs on all samples so far (windows of 64); the
bench records the first check at which the noisy miner is flagged (z > 4), where the trial stops (unless
--keep-going), and every honest miner's flags at every check.

What the noise costs: for each of the noisy miner's samples the rest of the path also runs on the honest output of
the same weights (no grad), so `direct` = mean(noisy loss - honest loss) is the noise's own loss cost, free of the
routing and of the stopping rule. With sigma, the residual spread of one sample's loss in the fit, the samples at
which the expected z reaches 4 are 4.5 (4 sigma / direct)^2 (3 miners a stage, equal shares: the noisy miner has
n/3 samples, the mean of its 2 mates' effects a variance of sigma^2 (3/n) / 2, so Var = sigma^2 * 4.5 / n), given
where the direct cost is measurable (its mean over 2 standard errors). The fit's own effect and z are shown at
the trial's last check; a trial that stopped at its first flag stopped because they were high, so they overstate
the effect (run --keep-going to see them unselected).

A seed changes the initialisation, the data order, the routing and the noise. Threads: 1 by default (the model
is small enough that one thread is the fastest).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from iota.audit.adversaries import Honest, NoisyOutput
from iota.audit.attribution import MinerAttribution, attribute
from iota.audit.compare import FP32
from iota.config import RunSettings
from iota.model import wire
from iota.model.llama import loss_fn
from iota.train.run import Run, build_run
from iota.train.schedule import inner_step_lr
from iota.train.worker import StageWorker, TrainFlags

MINERS_PER_STAGE = 3
NOISY = (1, 0)  # (stage, miner): a body stage, so its noise reaches the loss through the tail
SETTINGS: dict[str, Any] = {  # bench/convergence.py's `test` settings: known to train
    "preset": "test",
    "stages": 3,
    "micro_batch": 4,
    "accumulate": 2,
    "lr": 1e-2,
    "samples_per_epoch": 32,
}
SEQ_LEN = 32  # the `test` preset's
WINDOW = 64
Z_THRESHOLD = 4.0


@dataclass(frozen=True)
class Level:
    name: str
    scale: float  # noise on outputs, relative to the norm of the stage's change
    grad_scale: float  # noise on input gradients, relative to the norm of their change


LEVELS = {
    "honest": Level("honest", 0.0, 0.0),
    "audit": Level("audit", 1.25 * FP32.activation, 1.25 * FP32.gradient),
    "x1": Level("x1", 1.0, 1.0),
    "x3": Level("x3", 3.0, 3.0),
    "x10": Level("x10", 10.0, 10.0),
}


def hotkey(stage: int, miner: int) -> str:
    return f"s{stage}m{miner}"


@dataclass
class Trial:
    """One seed at one level: what the checks saw, and the true loss cost of the noise."""

    level: str
    seed: int
    samples: int  # samples trained (fewer than asked when the trial stopped at a flag)
    flagged_at: int | None = None  # samples at the first check that flagged the noisy miner
    honest_checks: int = 0  # (honest miner, check) pairs
    honest_flags: int = 0
    honest_ever_flagged: set[str] = field(default_factory=set)
    deltas: list[float] = field(default_factory=list)  # noisy loss - honest loss, per noisy sample
    sigma: float = math.nan  # residual spread of the last fit
    final: list[MinerAttribution] = field(default_factory=list)
    seconds: float = 0.0


class Swarm:
    """3 stages x M miners trained in one process, samples routed at random; records paths and losses."""

    def __init__(self, run: Run, level: Level, seed: int):
        self.run = run
        s = run.settings
        self.flags = TrainFlags(
            s.micro_batch, s.accumulate, s.optimizer, s.weight_decay, s.clip, torch.bfloat16
        )
        noisy: Callable[..., StageWorker] = functools.partial(
            NoisyOutput, scale=level.scale, grad_scale=level.grad_scale
        )
        self.workers = [
            [
                (noisy if (stage, m) == NOISY and level.scale > 0 else Honest)(
                    run.model, spec, s.seed, self.flags, run.batch, torch.device("cpu"), False, 4
                )
                for m in range(MINERS_PER_STAGE)
            ]
            for stage, spec in enumerate(run.stages)
        ]
        self.rng = random.Random(seed)
        self.tokens_at_start = 0
        self.paths: dict[int, tuple[str, ...]] = {}
        self.losses: dict[int, float] = {}
        self.deltas: list[float] = []

    def lr(self, step: int) -> float:
        s = self.run.settings
        return inner_step_lr(
            self.run.schedule,
            self.tokens_at_start,
            step,
            s.accumulate,
            self.run.micro_batch_tokens,
            MINERS_PER_STAGE,
        )

    def sample(self, sample_id: int) -> None:
        route = [self.rng.randrange(MINERS_PER_STAGE) for _ in self.workers]
        data: bytes | None = None
        loss: float | None = None
        honest_loss: float | None = None
        for stage, m in enumerate(route):
            worker = self.workers[stage][m]
            if isinstance(worker, NoisyOutput):
                honest_loss = self.counterfactual(sample_id, stage, route, data)
            data, loss = worker.forward(sample_id, data)
            self.maybe_step(worker)
        assert loss is not None
        for stage in range(len(self.workers) - 2, -1, -1):
            worker = self.workers[stage][route[stage]]
            assert data is not None
            data = worker.backward(sample_id, data)
            self.maybe_step(worker)
        self.paths[sample_id] = tuple(hotkey(stage, m) for stage, m in enumerate(route))
        self.losses[sample_id] = loss
        if honest_loss is not None:
            self.deltas.append(loss - honest_loss)

    def maybe_step(self, worker: StageWorker) -> None:
        if worker.step_due():
            worker.step(self.lr(worker.inner_step))

    @torch.no_grad()
    def counterfactual(self, sample_id: int, stage: int, route: list[int], data: bytes | None) -> float:
        """The loss the sample would have had, had the noisy miner been honest (same weights, same wire)."""
        x: torch.Tensor = (
            self.run.batch(sample_id)[0] if data is None else self.workers[stage][route[stage]]._decode(data)
        )
        for s in range(stage, len(self.workers) - 1):
            out = self.workers[s][route[s]].model(x if s == 0 else x.float())
            x = self.workers[s + 1][route[s + 1]]._decode(wire.encode(out, self.flags.wire_dtype))
        _, targets = self.run.batch(sample_id)
        return float(loss_fn(self.workers[-1][route[-1]].model(x.float()), targets))

    def merge(self) -> None:
        """Average each stage's replicas and reload them: the merge with an outer step of 1, then APPLY."""
        for replicas in self.workers:
            mean = torch.stack([w.flat_weights() for w in replicas]).mean(dim=0)
            for worker in replicas:
                worker.load_flat(mean)
        self.tokens_at_start += self.run.settings.samples_per_epoch * self.run.micro_batch_tokens


def trial(
    level: Level, seed: int, samples: int, check_every: int, data_dir: Path, keep_going: bool = False
) -> Trial:
    tokens = samples * SETTINGS["micro_batch"] * SEQ_LEN
    settings = RunSettings(
        **SETTINGS, seed=seed, data_dir=data_dir, total_tokens=tokens, warmup_tokens=tokens // 10
    )
    run = build_run(settings)
    swarm = Swarm(run, level, seed)
    result = Trial(level.name, seed, samples)
    noisy = hotkey(*NOISY) if level.scale > 0 else None
    start = time.perf_counter()
    for sample_id in range(samples):
        swarm.sample(sample_id)
        if (sample_id + 1) % settings.samples_per_epoch == 0:
            swarm.merge()
        if (sample_id + 1) % check_every:
            continue
        fit = attribute(swarm.paths, swarm.losses, window=WINDOW, z_threshold=Z_THRESHOLD)
        for r in fit.miners:
            if r.miner == noisy:
                if r.flagged and result.flagged_at is None:
                    result.flagged_at = sample_id + 1
                continue
            result.honest_checks += 1
            if r.flagged:
                result.honest_flags += 1
                result.honest_ever_flagged.add(r.miner)
        result.final, result.sigma = fit.miners, fit.sigma
        if result.flagged_at is not None and not keep_going:
            break
    result.seconds = time.perf_counter() - start
    result.deltas, result.samples = swarm.deltas, len(swarm.losses)
    return result


def summarise(trials: list[Trial]) -> list[dict[str, Any]]:
    rows = []
    for name in dict.fromkeys(t.level for t in trials):
        group = [t for t in trials if t.level == name]
        caught = [t.flagged_at for t in group if t.flagged_at is not None]
        deltas = [d for t in group for d in t.deltas]
        ends = [next(r for r in t.final if r.miner == hotkey(*NOISY)) for t in group if name != "honest"]
        direct = statistics.fmean(deltas) if deltas else math.nan
        direct_se = statistics.stdev(deltas) / math.sqrt(len(deltas)) if len(deltas) > 1 else math.nan
        # Extrapolate only from a cost measurably above zero: at the audit's level it is zero within its error,
        # and a ratio of noise predicts nothing.
        measurable = direct > 2 * direct_se
        sigma = statistics.fmean(t.sigma for t in group)
        rows.append(
            {
                "level": name,
                "seeds": len(group),
                "samples_run": [t.samples for t in group],
                "caught": len(caught),
                "median_samples_to_flag": statistics.median(caught) if len(caught) * 2 > len(group) else None,
                "samples_to_flag": [t.flagged_at for t in group],
                "direct_loss_cost": direct if deltas else None,
                "direct_loss_cost_se": direct_se if deltas else None,
                "noisy_samples": len(deltas),
                "effect_at_stop": [round(r.effect, 4) for r in ends],
                "z_at_stop": [round(r.z, 2) for r in ends],
                "predicted_samples": 4.5 * (Z_THRESHOLD * sigma / direct) ** 2 if measurable else None,
                "sigma": sigma,
                "honest_flag_rate": sum(t.honest_flags for t in group)
                / max(sum(t.honest_checks for t in group), 1),
                "honest_checks": sum(t.honest_checks for t in group),
                "honest_ever_flagged": sum(len(t.honest_ever_flagged) for t in group),
                "honest_miners": sum(len(t.final) - (name != "honest") for t in group),
                "seconds": sum(t.seconds for t in group),
            }
        )
    return rows


def table(rows: list[dict[str, Any]], samples: int) -> str:
    lines = [
        "| noise | flagged | samples to flag: median (each seed) | direct cost, nats | effect at stop, nats "
        "| z at stop | samples for E[z] = 4 | sigma | honest flagged: checks, miners |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        noisy = r["level"] != "honest"
        median = r["median_samples_to_flag"]
        each = ", ".join("-" if n is None else str(n) for n in r["samples_to_flag"])
        to_flag = (f"{median:.0f}" if median is not None else f"> {samples}") + f" ({each})"
        flagged = f"{r['caught']} / {r['seeds']}"
        cost = r["direct_loss_cost"]
        cost_text = "-" if cost is None else f"{cost:.1e} (se {r['direct_loss_cost_se']:.0e})"
        effects = ", ".join(f"{e:.3f}" for e in r["effect_at_stop"]) or "-"
        zs = ", ".join(f"{z:.1f}" for z in r["z_at_stop"]) or "-"
        predicted = "-" if r["predicted_samples"] is None else f"{r['predicted_samples']:.2g}"
        if noisy and r["predicted_samples"] is None:
            predicted = "no effect measured"
        honest = (
            f"{r['honest_flag_rate']:.1%} of {r['honest_checks']}, "
            f"{r['honest_ever_flagged']} / {r['honest_miners']}"
        )
        lines.append(
            f"| {r['level']} | {flagged if noisy else '-'} | {to_flag if noisy else '-'} | {cost_text} "
            f"| {effects} | {zs} | {predicted} | {r['sigma']:.3f} | {honest} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--samples", type=int, default=640, help="samples per trial (a sample: 4 x 32 tokens)"
    )
    parser.add_argument("--check-every", type=int, default=32)
    parser.add_argument("--levels", nargs="+", default=list(LEVELS), choices=list(LEVELS))
    parser.add_argument(
        "--keep-going", action="store_true", help="run every trial to --samples, flagged or not"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=Path("runs/data"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    trials = []
    for name in args.levels:
        for seed in range(args.seeds):
            t = trial(LEVELS[name], seed, args.samples, args.check_every, args.data_dir, args.keep_going)
            print(f"{name} seed {seed}: flagged at {t.flagged_at}, {t.seconds:.1f} s", flush=True)
            trials.append(t)
    rows = summarise(trials)
    print(table(rows, args.samples))
    wall = time.perf_counter() - start
    print(f"{wall:.0f} s wall, {args.threads} thread(s), {platform.processor() or platform.machine()}")
    if args.json is not None:
        report = {
            "settings": {**SETTINGS, "miners_per_stage": MINERS_PER_STAGE, "noisy": hotkey(*NOISY)},
            "samples": args.samples,
            "check_every": args.check_every,
            "window": WINDOW,
            "z_threshold": Z_THRESHOLD,
            "wall_seconds": wall,
            "levels": rows,
        }
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
