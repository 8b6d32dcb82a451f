"""Convergence: held-out loss of the network (`iota local`, 3 stages x R miners) against the one-process baseline.

Each network run trains `epochs` epochs (each ends with a merge: one outer step) and its final checkpoint is
evaluated on held-out data. Its baseline is `train_baseline` on the same run settings (same data plan and sample
order, same LR schedule over the same tokens) with replicas = R, so every baseline step averages R x micro-batch
x k sequences: the global batch of one inner step of the network. Gap = (network - baseline) / baseline.

Configurations (all on the `test` preset, hidden 64, so bottleneck widths 8, 2 and 1 compress 8x, 32x and 64x):

- main: bottleneck off, plain averaging (outer lr 1, momentum 0): the new weights are the replicas' mean, the
  outer step adds no dynamics of its own, so what remains of the gap is local training itself.
- nesterov: the same with the default outer optimizer (lr 0.7, Nesterov momentum 0.9, DiLoCo's values for
  hundreds of inner steps per outer step; here an epoch is only about 8 inner steps per replica).
- bottleneck-8x / -32x / -64x: main with the bottleneck on. Their gap is against the dense baseline of the same
  seed; the one-process model with the same bottleneck (its stages chained) is trained too (`bneck base`), which
  separates what the narrower boundary costs the architecture from what distributing it costs.

Columns `shares` and `unstepped` (from the orchestrator's state database): the fewest and most micro-batches one
replica of a stage trained in one epoch (heads pull work, so replicas need not get equal shares), and how many
micro-batches were backpropagated but never stepped (a share that is not a multiple of k leaves a partial
accumulation window when the epoch closes; APPLY discards it), out of all that every replica of every stage
trained.

Columns `1-proc` and `keepA`: the same algorithm in one process (`local_sgd`: no network, an even split, fp32
activations), with the AdamW state forgotten at each outer step as the miners do, and kept (`keepA`). The first
says whether the network computes what the algorithm says; the second, what forgetting the inner optimizer
state at APPLY costs (DESIGN.md resets it so every miner's weights follow from public data).

Spread: over a configuration's runs, with two the half-range (|a - b| / 2), with more the sample standard
deviation. A seed fixes initialisation, data order and the baseline, not the network run: which replica of
each stage trains which sample follows from timing, so `--repeats N` runs each seed N times.

`--adam-study` runs only `local_sgd` and the baseline, for each way of carrying the AdamW state across outer
steps, over longer epochs (see `adam_study`).

Run:  python -m bench.convergence [--quick] [--configs main nesterov ...] [--seeds 0 1] [--repeats 1]
                                  [--work-dir DIR] [--json FILE]
      python -m bench.convergence --adam-study [--seeds 0 1] [--json FILE]
      python -m bench.convergence --rewarm-study [--seeds 0 1] [--json FILE]
      python -m bench.convergence --merge-study [--seeds 0 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import sqlite3
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPLICAS = 2  # miners per stage

# The tokens trained = epochs x samples_per_epoch x micro_batch x seq_len (32 on `test`); warm-up 10 % of them.
# Held-out loss over 1024 sequences (32k tokens, nearly all 1088 held-out windows of the KJV corpus), not the
# settings' default 16, so that evaluation noise is small beside the gaps measured.
FULL = {"epochs": 10, "samples_per_epoch": 32, "micro_batch": 4, "accumulate": 2, "lr": 1e-2}
QUICK = {"epochs": 2, "samples_per_epoch": 8, "micro_batch": 4, "accumulate": 2, "lr": 1e-2}

HELDOUT_SAMPLES = 1024

PLAIN = {"outer_lr": 1.0, "outer_momentum": 0.0}
NESTEROV = {"outer_lr": 0.7, "outer_momentum": 0.9}


@dataclass(frozen=True)
class Config:
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)


CONFIGS = [
    Config("main", PLAIN),
    Config("nesterov", NESTEROV),
    Config("bottleneck-8x", {**PLAIN, "bottleneck": 8}),
    Config("bottleneck-32x", {**PLAIN, "bottleneck": 2}),
    Config("bottleneck-64x", {**PLAIN, "bottleneck": 1}),
]


def run_settings(base: dict[str, Any], config: Config, seed: int, data_dir: Path) -> dict[str, Any]:
    seq_len = 32  # the `test` preset's
    tokens = base["epochs"] * base["samples_per_epoch"] * base["micro_batch"] * seq_len
    return {
        "preset": "test",
        "stages": 3,
        **base,
        "warmup_tokens": tokens // 10,
        "total_tokens": tokens,
        "seed": seed,
        "data_dir": str(data_dir),
        "heldout_samples": HELDOUT_SAMPLES,
        **config.overrides,
    }


def network(settings: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    from iota.local import LocalOptions, run_local

    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    options = LocalOptions(
        miners_per_stage=REPLICAS,
        overrides=settings,
        baseline=False,
        progress=False,
        run_dir=run_dir,
    )
    # run_local prints a summary; keep it in the run directory so the table stays readable.
    with open(run_dir / "summary.txt", "w") as out, contextlib.redirect_stdout(out):
        report = run_local(options)
    if report["eval_loss"] is None or report["epochs_completed"] < settings["epochs"]:
        raise RuntimeError(f"the network run did not finish; see {run_dir / 'logs'}")
    return report


def work_split(run_dir: Path, stages: int, k: int) -> dict[str, Any]:
    """How the network's samples fell to the replicas, from the orchestrator's state database.

    A replica accumulates one micro-batch per sample it backpropagates (the tail: per forward). The heads pull
    work, so per epoch the replicas of a stage need not get equal shares, and a share that is not a multiple of
    k leaves a partial window whose gradients are never stepped (the miner's optimizer is reset at APPLY).
    """
    query = (
        "SELECT COUNT(*) FROM hops WHERE status = 'done' AND ((stage < ? AND direction = 'backward') "
        "OR (stage = ? AND direction = 'forward')) GROUP BY epoch, stage, miner"
    )
    db = sqlite3.connect(f"file:{run_dir / 'orchestrator' / 'state.db'}?mode=ro", uri=True)
    try:
        shares = [int(n) for (n,) in db.execute(query, (stages - 1, stages - 1))]
    finally:
        db.close()
    return {
        "replica_share_min": min(shares),
        "replica_share_max": max(shares),
        "micro_batches_unstepped": sum(n % k for n in shares),
        "micro_batches_total": sum(shares),
    }


def baseline(settings: dict[str, Any], tokens: int) -> dict[str, Any]:
    from iota.config import RunSettings
    from iota.train.baseline import train_baseline
    from iota.train.run import build_run

    return train_baseline(build_run(RunSettings(**settings)), tokens, replicas=REPLICAS, progress=False)


ADAM_MODES = ("reset", "keep", "average", "second")


def local_sgd(settings: dict[str, Any], adam: str = "reset", compress: str | None = None) -> float:
    """The network's algorithm in one process, without the network: held-out loss of the final weights.

    R replicas of the stages chained (`build_pipeline`, seeded as the miners are, bottleneck included), one
    AdamW per stage clipped at the stage's share of the global clip (as `iota.miner.main.stage_clip`), the same
    learning rate rule; epoch e's samples dealt to the replicas in alternate windows of k (an even split); at the
    end of each epoch the outer step on the mean pseudo-gradient (`iota.merge.outer.outer_step`). Then the AdamW
    state is, by `adam`: "reset", forgotten as the miners do at APPLY; "keep", kept by each replica (DiLoCo's
    workers); "average", replaced by the replicas' mean moments (a state that could be merged and published
    beside the weights, so a replica's next epoch would still follow from public data); "second", the replicas'
    mean second moment and step count kept, the first moment reset. `compress` names a pseudo-gradient codec
    (`iota.merge.codec`), each replica keeping its own error feedback. Activations stay fp32 (the network sends
    bf16).
    """
    if adam not in ADAM_MODES:
        raise ValueError(f"adam must be one of {ADAM_MODES}, got {adam!r}")
    import torch
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    from iota.config import RunSettings
    from iota.merge.outer import outer_step
    from iota.model.llama import loss_fn
    from iota.model.stages import build_pipeline
    from iota.train import optim
    from iota.train.run import build_run, heldout_loss
    from iota.train.schedule import inner_step_lr

    run = build_run(RunSettings(**settings))
    s = run.settings
    k, per_epoch, mbt = s.accumulate, s.samples_per_epoch, run.micro_batch_tokens
    replicas = [build_pipeline(run.model, run.stages, s.seed) for _ in range(REPLICAS)]
    sizes = [sum(p.numel() for p in stage.parameters()) for stage in replicas[0].stages]
    clips = [s.clip * math.sqrt(n / sum(sizes)) for n in sizes]
    optimizers = [
        [optim.make_optimizer(stage.parameters(), s.optimizer, s.weight_decay) for stage in model.stages]
        for model in replicas
    ]
    theta = parameters_to_vector(replicas[0].parameters()).detach().clone()
    momentum: torch.Tensor | None = None
    residuals = [torch.zeros_like(theta) for _ in replicas]
    for epoch in range(s.epochs):
        first = epoch * per_epoch
        deltas = []
        for r, (model, stage_optimizers) in enumerate(zip(replicas, optimizers, strict=True)):
            vector_to_parameters(
                theta.clone(), model.parameters()
            )  # a copy: parameters take the vector's storage
            if adam == "reset":
                for optimizer in stage_optimizers:
                    optim.reset(optimizer)
            windows = range(r, per_epoch // k, REPLICAS)
            for step, window in enumerate(windows):
                for sample_id in range(first + window * k, first + (window + 1) * k):
                    tokens, targets = run.batch(sample_id)
                    (loss_fn(model(tokens), targets) / k).backward()
                lr = inner_step_lr(run.schedule, first * mbt, step, k, mbt, REPLICAS)
                for optimizer, clip in zip(stage_optimizers, clips, strict=True):
                    optim.step(optimizer, lr, clip)
            delta = theta - parameters_to_vector(model.parameters()).detach()
            if compress is not None:
                delta, residuals[r] = _compressed(compress, delta, residuals[r])
            deltas.append(delta)
        if adam in ("average", "second"):
            _average_moments(optimizers, ("exp_avg", "exp_avg_sq") if adam == "average" else ("exp_avg_sq",))
        if adam == "second":
            for model_optimizers in optimizers:
                for optimizer in model_optimizers:
                    for state in optimizer.state.values():
                        state["exp_avg"].zero_()
        grad = torch.stack(deltas).mean(0)
        theta, momentum = outer_step(theta, momentum, grad, lr=s.outer_lr, mu=s.outer_momentum, nesterov=True)
    final = replicas[0]
    vector_to_parameters(theta, final.parameters())
    final.eval()
    return heldout_loss(lambda t: final(t).float(), run.data, s.heldout_samples)


def _compressed(codec: str, delta: Any, residual: Any) -> tuple[Any, Any]:
    """What the merge receives of a replica's pseudo-gradient under `codec`, and the replica's new residual."""
    from iota.merge.codec import decode, encode, parse_codec

    spec = parse_codec(codec)
    if spec is None:
        return delta, residual
    data, left = encode(delta + residual, spec)
    return decode(data, delta.numel(), spec), left


def _average_moments(optimizers: list[list[Any]], keys: tuple[str, ...] = ("exp_avg", "exp_avg_sq")) -> None:
    """Set every replica's AdamW moments (`keys`) of each parameter to their mean over the replicas (per stage)."""
    import torch

    for per_stage in zip(*optimizers, strict=True):
        params = [list(o.param_groups[0]["params"]) for o in per_stage]
        for same_param in zip(*params, strict=True):
            states = [o.state[p] for o, p in zip(per_stage, same_param, strict=True)]
            for key in keys:
                mean = torch.stack([st[key] for st in states]).mean(0)
                for st in states:
                    st[key].copy_(mean)


def spread(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    if len(values) == 2:
        return abs(values[0] - values[1]) / 2
    return statistics.stdev(values)


def measure(
    configs: list[Config], seeds: list[int], base: dict[str, Any], work: Path, repeats: int = 1
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    baselines: dict[tuple[str, int], dict[str, Any]] = {}  # by (settings as JSON, tokens)
    references: dict[tuple[str, str], float] = {}  # local_sgd is deterministic: once per settings

    def cached_local_sgd(settings: dict[str, Any], adam: str) -> float:
        key = (json.dumps(settings, sort_keys=True), adam)
        if key not in references:
            references[key] = local_sgd(settings, adam)
        return references[key]

    def cached_baseline(settings: dict[str, Any], tokens: int) -> dict[str, Any]:
        key = (json.dumps(settings, sort_keys=True), tokens)
        if key not in baselines:
            baselines[key] = baseline(settings, tokens)
        return baselines[key]

    for config in configs:
        for seed, repeat in [(seed, r) for seed in seeds for r in range(repeats)]:
            settings = run_settings(base, config, seed, work / "data")
            started = time.time()
            name = f"{config.name}-seed{seed}" + (f"-{repeat}" if repeats > 1 else "")
            net = network(settings, work / "runs" / name)
            tokens = int(net["tokens_trained"])
            dense = cached_baseline({**settings, **PLAIN, "bottleneck": 0}, tokens)
            same = cached_baseline(settings, tokens) if settings.get("bottleneck") else None
            row = {
                "config": config.name,
                "seed": seed,
                "repeat": repeat,
                "bottleneck": settings.get("bottleneck", 0),
                "outer_lr": settings["outer_lr"],
                "outer_momentum": settings["outer_momentum"],
                **work_split(Path(net["run_dir"]), settings["stages"], settings["accumulate"]),
                "epochs": net["epochs_completed"],
                "tokens": tokens,
                "network_eval": net["eval_loss"],
                "baseline_eval": dense["eval_loss"],
                "baseline_tokens": dense["tokens_trained"],
                "bottleneck_baseline_eval": same["eval_loss"] if same else None,
                "local_sgd_eval": cached_local_sgd(settings, "reset"),
                "local_sgd_keep_adam_eval": cached_local_sgd(settings, "keep"),
                "gap": (net["eval_loss"] - dense["eval_loss"]) / dense["eval_loss"],
                "unigram_entropy": dense["unigram_entropy"],
                "samples_requeued": net["samples_requeued"],
                "samples_lost": net["samples_lost"],
                "network_wall_s": net["wall_seconds"],
                "seconds": time.time() - started,
            }
            rows.append(row)
            print(_row_line(row), flush=True)
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for name in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == name]
        net = [r["network_eval"] for r in mine]
        base = [r["baseline_eval"] for r in mine]
        gaps = [r["gap"] for r in mine]
        one = [(r["local_sgd_eval"] - r["baseline_eval"]) / r["baseline_eval"] for r in mine]
        keep = [(r["local_sgd_keep_adam_eval"] - r["baseline_eval"]) / r["baseline_eval"] for r in mine]
        out.append(
            {
                "config": name,
                "seeds": [r["seed"] for r in mine],
                "network_eval_mean": statistics.mean(net),
                "network_eval_spread": spread(net),
                "baseline_eval_mean": statistics.mean(base),
                "baseline_eval_spread": spread(base),
                "gap_mean": statistics.mean(gaps),
                "gap_spread": spread(gaps),
                "local_sgd_gap_mean": statistics.mean(one),
                "local_sgd_gap_spread": spread(one),
                "local_sgd_keep_adam_gap_mean": statistics.mean(keep),
                "local_sgd_keep_adam_gap_spread": spread(keep),
            }
        )
    return out


HEADER = (
    f"{'config':<15} {'seed':>4} {'bneck':>5} {'outer':>9} {'epochs':>6} {'tokens':>7} "
    f"{'network':>8} {'baseline':>8} {'bneck base':>10} {'gap %':>7} {'1-proc':>6} {'keepA':>6} {'shares':>7} {'unstepped':>9}"
)


def _row_line(r: dict[str, Any]) -> str:
    outer = f"{r['outer_lr']:g}/{r['outer_momentum']:g}"
    shares = f"{r['replica_share_min']}-{r['replica_share_max']}"
    unstepped = f"{r['micro_batches_unstepped']}/{r['micro_batches_total']}"
    same = "-" if r["bottleneck_baseline_eval"] is None else f"{r['bottleneck_baseline_eval']:.3f}"
    return (
        f"{r['config']:<15} {r['seed']:>4} {r['bottleneck'] or '-':>5} {outer:>9} "
        f"{r['epochs']:>6} {r['tokens']:>7} {r['network_eval']:>8.3f} {r['baseline_eval']:>8.3f} "
        f"{same:>10} {100 * r['gap']:>+7.2f} {r['local_sgd_eval']:>6.3f} {r['local_sgd_keep_adam_eval']:>6.3f} {shares:>7} {unstepped:>9}"
    )


def adam_study(seeds: list[int], work: Path) -> list[dict[str, Any]]:
    """In one process only: what each way of carrying AdamW across outer steps costs, as epochs grow longer.

    Main's settings with samples_per_epoch 16, 32, 64, 128 (10 epochs, so 4 to 32 inner steps per replica per
    epoch and 20k to 164k tokens), against the baseline on the same tokens.
    """
    rows = []
    print(
        f"{'samples/ep':>10} {'seed':>4} {'tokens':>7} {'baseline':>8}"
        + "".join(f" {m:>15}" for m in ADAM_MODES)
    )
    for per_epoch in (16, 32, 64, 128):
        for seed in seeds:
            settings = run_settings({**FULL, "samples_per_epoch": per_epoch}, CONFIGS[0], seed, work / "data")
            base = baseline(settings, settings["total_tokens"])["eval_loss"]
            row: dict[str, Any] = {
                "samples_per_epoch": per_epoch,
                "seed": seed,
                "tokens": settings["total_tokens"],
            }
            row["baseline_eval"] = base
            for mode in ADAM_MODES:
                row[f"{mode}_eval"] = local_sgd(settings, mode)
            rows.append(row)
            cells = "".join(
                f" {row[f'{m}_eval']:>7.3f} ({100 * (row[f'{m}_eval'] - base) / base:+5.1f}%)"
                for m in ADAM_MODES
            )
            print(f"{per_epoch:>10} {seed:>4} {row['tokens']:>7} {base:>8.3f}{cells}", flush=True)
    return rows


REWARM_STEPS = (0, 2, 4, 8)


def rewarm_study(
    seeds: list[int], work: Path, per_epochs: tuple[int, ...] = (32, 128)
) -> list[dict[str, Any]]:
    """In one process only: the reset AdamW of each epoch after APPLY with the learning rate ramped back up over
    `rewarm_steps` inner steps (0: no ramp, as before the setting existed), against keeping the state."""
    rows = []
    print(
        f"{'samples/ep':>10} {'seed':>4} {'baseline':>8}"
        + "".join(f" {'rewarm ' + str(w):>15}" for w in REWARM_STEPS)
        + f" {'keep':>15}"
    )
    for per_epoch in per_epochs:
        for seed in seeds:
            settings = run_settings({**FULL, "samples_per_epoch": per_epoch}, CONFIGS[0], seed, work / "data")
            base = baseline(settings, settings["total_tokens"])["eval_loss"]
            row: dict[str, Any] = {"samples_per_epoch": per_epoch, "seed": seed, "baseline_eval": base}
            for steps in REWARM_STEPS:
                row[f"rewarm_{steps}_eval"] = local_sgd({**settings, "rewarm_steps": steps}, "reset")
            row["keep_eval"] = local_sgd({**settings, "rewarm_steps": 0}, "keep")
            rows.append(row)
            cells = "".join(
                f" {row[k]:>7.3f} ({100 * (row[k] - base) / base:+5.1f}%)"
                for k in [*(f"rewarm_{w}_eval" for w in REWARM_STEPS), "keep_eval"]
            )
            print(f"{per_epoch:>10} {seed:>4} {base:>8.3f}{cells}", flush=True)
    return rows


# (inner optimizer state at APPLY, pseudo-gradient codec) pairs of the merge study; "reset" is today's miners.
MERGE_VARIANTS = (
    ("reset", "none"),
    ("keep", "none"),
    ("average", "none"),
    ("second", "none"),
    ("average", "int:8"),
    ("average", "int:4"),
    ("keep", "int:4"),
    ("average", "topk:0.05"),
)


def merge_study(
    seeds: list[int], work: Path, per_epochs: tuple[int, ...] = (32, 128)
) -> list[dict[str, Any]]:
    """In one process only: each way of carrying the AdamW state across APPLY and each pseudo-gradient codec
    (`iota.merge.codec`, error feedback per replica) at 8 and 32 inner steps per replica per epoch, against the
    baseline on the same tokens. `bytes/value`: the codec's upload per fp32 value of the stage (4: dense fp32)."""
    from iota.merge.codec import parse_codec

    rows = []
    print(
        f"{'samples/ep':>10} {'adam':>8} {'codec':>10} {'bytes/value':>11}"
        + "".join(f" {'seed ' + str(s):>15}" for s in seeds)
    )
    for per_epoch in per_epochs:
        settings = {
            seed: run_settings({**FULL, "samples_per_epoch": per_epoch}, CONFIGS[0], seed, work / "data")
            for seed in seeds
        }
        bases = {
            seed: baseline(settings[seed], settings[seed]["total_tokens"])["eval_loss"] for seed in seeds
        }
        print(
            f"{per_epoch:>10} {'baseline':>8} {'':>10} {'':>11}"
            + "".join(f" {bases[s]:>15.3f}" for s in seeds)
        )
        for adam, codec in MERGE_VARIANTS:
            spec = parse_codec(codec)
            per_value = 4.0 if spec is None else spec.encoded_size(1 << 20) / (1 << 20)
            row: dict[str, Any] = {"samples_per_epoch": per_epoch, "adam": adam, "codec": codec}
            row["bytes_per_value"] = per_value
            cells = ""
            for seed in seeds:
                loss = local_sgd(settings[seed], adam, None if codec == "none" else codec)
                row[f"seed_{seed}_eval"], row[f"seed_{seed}_baseline"] = loss, bases[seed]
                cells += f" {loss:>7.3f} ({100 * (loss - bases[seed]) / bases[seed]:+5.1f}%)"
            rows.append(row)
            print(f"{per_epoch:>10} {adam:>8} {codec:>10} {per_value:>11.3f}{cells}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 short epochs, main config, seed 0")
    parser.add_argument("--configs", nargs="+", choices=[c.name for c in CONFIGS], default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 (quick: 0)")
    parser.add_argument(
        "--repeats", type=int, default=1, help="network runs per seed (a seed does not fix the work split)"
    )
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench-convergence"))
    parser.add_argument(
        "--adam-study", action="store_true", help="only the one-process study of the inner optimizer state"
    )
    parser.add_argument(
        "--rewarm-study", action="store_true", help="only the one-process study of the lr re-warm after APPLY"
    )
    parser.add_argument(
        "--merge-study",
        action="store_true",
        help="only the one-process study of the AdamW state at APPLY and the pseudo-gradient codecs",
    )
    parser.add_argument("--json", type=Path, default=None, help="write rows and summary to this file")
    args = parser.parse_args(argv)

    base = QUICK if args.quick else FULL
    names = args.configs or (["main"] if args.quick else [c.name for c in CONFIGS])
    configs = [c for c in CONFIGS if c.name in names]
    seeds = args.seeds or ([0] if args.quick else [0, 1])
    work = args.work_dir.resolve()
    if args.rewarm_study:
        rewarm = rewarm_study(seeds, work)
        if args.json:
            args.json.write_text(json.dumps({"settings": FULL, "rewarm_study": rewarm}, indent=1))
        return 0
    if args.merge_study:
        merge = merge_study(seeds, work)
        if args.json:
            args.json.write_text(json.dumps({"settings": FULL, "merge_study": merge}, indent=1))
        return 0
    if args.adam_study:
        study = adam_study(seeds, work)
        if args.json:
            args.json.write_text(
                json.dumps({"settings": FULL, "replicas": REPLICAS, "adam_study": study}, indent=1)
            )
        return 0
    print(
        f"3 stages x {REPLICAS} miners, preset test, {base}, seeds {seeds}; "
        f"machine: {platform.machine()}, {os.cpu_count()} cores"
    )
    print(HEADER)
    started = time.time()
    rows = measure(configs, seeds, base, work, args.repeats)
    summary = summarize(rows)
    print(
        f"\n{'config':<15} {'network':>15} {'baseline':>15} {'gap %':>15} {'1-proc gap %':>15} "
        f"{'keepA gap %':>15}"
    )
    for s in summary:
        print(
            f"{s['config']:<15} {s['network_eval_mean']:>8.3f} ± {s['network_eval_spread']:.3f} "
            f"{s['baseline_eval_mean']:>8.3f} ± {s['baseline_eval_spread']:.3f} "
            f"{100 * s['gap_mean']:>+8.2f} ± {100 * s['gap_spread']:.2f} "
            f"{100 * s['local_sgd_gap_mean']:>+8.2f} ± {100 * s['local_sgd_gap_spread']:.2f} "
            f"{100 * s['local_sgd_keep_adam_gap_mean']:>+8.2f} ± {100 * s['local_sgd_keep_adam_gap_spread']:.2f}"
        )
    print(
        f"unigram entropy of the corpus: {rows[0]['unigram_entropy']:.3f}; total {time.time() - started:.0f} s"
    )
    if args.json:
        args.json.write_text(
            json.dumps({"settings": base, "replicas": REPLICAS, "rows": rows, "summary": summary}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
