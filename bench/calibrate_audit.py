"""Calibrate the audit: honest replay error per replay depth and precision, against the int8-weights cheat.

The miner runs here (this CPU's native kernels, 1 thread): an honest pipeline and an int8 one, from a checkpoint
warmed up by a few honest steps, recording every hop and a snapshot of every stage at every step boundary. Then
validators replay windows of MAX depth inner steps from every snapshot, comparing each hop (at depth 0 .. MAX-1:
steps replayed before it) and each later snapshot (the weights, at depth 1 .. MAX):

  threads-2  this process, 2 threads                 (the issue's 1-vs-2-thread emulation)
  avx2       a child process limited to AVX2 kernels (ATEN_CPU_CAPABILITY=avx2), 2 threads: a validator on
             another CPU generation, the honest difference that does show up on CPU

bf16 means bf16 autocast on CPU: StageWorker only autocasts on CUDA, so ReplaySetup.worker switches
`use_autocast` on after construction for miner and validator alike (same code, same kernels as a CPU miner
declaring bf16 would run).

For each precision it prints mean / std / max of the honest error per depth and kind, the int8 miner's smallest
error per depth (replayed from the checkpoint, so every hop is compared with honest weights), then chooses D, the
largest depth at which max + 5 std of honest work stays below int8's minimum for activations and gradients, and
the thresholds: the geometric mean of the honest bound and int8's minimum over depths < D (weights: depths <= D).

Run: python -m bench.calibrate_audit [--presets test tiny] [--steps 10] [--max-depth 6] [--json]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from iota.audit import ReplaySetup, Thresholds, replay
from iota.audit.adversaries import Honest, Int8Weights, WorkerPipeline, synthetic_batch
from iota.audit.compare import DRIFT_FRACTION, DRIFT_MIN_HOPS
from iota.audit.records import HopRecord, decode_records, encode_records
from iota.model.config import ModelConfig, preset
from iota.model.stages import StageSpec, build_stage, plan_stages
from iota.train.schedule import LRSchedule
from iota.train.snapshot import Snapshot, decode_snapshot, encode_snapshot, take_snapshot
from iota.train.worker import StageWorker, TrainFlags

VOCAB = {"test": 512, "tiny": 4096}
N_STAGES = 3
MICRO_BATCH, ACCUMULATE = 2, 2
PEAK_LR = 3e-3  # the run default; the epoch starts past warm-up, so every replayed step is at the peak
KINDS = ("activation", "gradient", "loss", "weights")
SIGMAS = 5.0
SEPARATION = (
    2.0  # int8's smallest error over the honest bound that a depth must keep: the thresholds then sit
)
# at least sqrt(2) from both, room for a validator whose kernels differ more than the ones measured here
MIN_LOSS = 1e-4  # relative: a reported loss this close to the replay's changes no score or curve
MIN_BOUND = 1e-6  # an honest bound of exactly 0 (bitwise replays) would make any other kernel a cheat
# The child validator: a CPU without AVX-512 (ATen's vector kernels fall back to AVX2), on 2 threads that wait
# passively, so they do not spin against this process on a 2-core machine.
CHILD_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "OMP_WAIT_POLICY": "PASSIVE"}
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Job:
    """One calibration case, as JSON for a child validator."""

    preset: str
    bf16: bool
    steps: int  # inner steps the miner runs in the recorded epoch
    max_depth: int
    warmup: int  # honest fp32 steps from the seeded init before the recorded epoch

    def config(self) -> ModelConfig:
        return preset(self.preset, VOCAB[self.preset])

    def setups(self) -> list[ReplaySetup]:
        config = self.config()
        flags = TrainFlags(MICRO_BATCH, ACCUMULATE, "adamw", 0.0, 1.0, torch.bfloat16)
        batch = synthetic_batch(config.vocab_size, MICRO_BATCH, config.seq_len)
        schedule = LRSchedule(PEAK_LR, warmup_tokens=1, total_tokens=1 << 40)
        return [
            ReplaySetup(config, spec, 0, flags, batch, schedule, 1 << 20, 1, bf16=self.bf16)
            for spec in plan_stages(config.n_layers, N_STAGES)
        ]


# -- the miner side ----------------------------------------------------------------------------------------


def flat_of(config: ModelConfig, spec: StageSpec) -> torch.Tensor:
    model = build_stage(config, spec, 0)
    return torch.cat([p.detach().float().reshape(-1) for _, p in sorted(model.named_parameters())])


def run_miner(
    job: Job, checkpoint: list[torch.Tensor], factory: Callable[..., StageWorker], first_sample: int
) -> tuple[list[list[HopRecord]], list[list[Snapshot]]]:
    """One epoch of `job.steps` inner steps; snapshots[stage][s] is the stage's state after step s."""
    setups = job.setups()
    workers = [setup.worker(flat, factory) for setup, flat in zip(setups, checkpoint, strict=True)]
    pipeline = WorkerPipeline(workers, setups[0].lr)
    snapshots = [[take_snapshot(w)] for w in workers]
    per_step = ACCUMULATE
    for step in range(job.steps):
        first = first_sample + step * per_step
        pipeline.run(range(first, first + per_step), in_flight=2)
        for stage, worker in enumerate(workers):
            snapshots[stage].append(take_snapshot(worker))
            assert worker.inner_step == step + 1
    return pipeline.records, snapshots


def warm_checkpoint(job: Job) -> list[torch.Tensor]:
    """The recorded epoch starts from a model trained a little (fp32), not from the seeded init."""
    setups = job.setups()
    config = job.config()
    init = [flat_of(config, setup.spec) for setup in setups]
    if job.warmup == 0:
        return init
    warm = Job(job.preset, False, job.warmup, job.max_depth, 0)
    _, snapshots = run_miner(warm, init, Honest, first_sample=1 << 16)
    return [stage[-1].weights for stage in snapshots]


def write_case(directory: Path, job: Job, checkpoint: list[torch.Tensor], label: str, factory: Any) -> None:
    records, snapshots = run_miner(job, checkpoint, factory, first_sample=0)
    case = directory / label
    case.mkdir(parents=True)
    for stage in range(N_STAGES):
        (case / f"records-{stage}.st").write_bytes(encode_records(records[stage]))
        for step, snapshot in enumerate(snapshots[stage]):
            (case / f"snapshot-{stage}-{step}.st").write_bytes(encode_snapshot(snapshot))


# -- the validator side ------------------------------------------------------------------------------------


def validate(directory: Path, job: Job, label: str, from_checkpoint_only: bool) -> list[dict[str, Any]]:
    """Replay windows of the recorded case; one row per comparison: kind, depth, error."""
    setups = job.setups()
    rows: list[dict[str, Any]] = []
    case = directory / label
    for stage, setup in enumerate(setups):
        records = decode_records((case / f"records-{stage}.st").read_bytes())
        probe = setup.worker(flat_of(setup.config, setup.spec))
        snapshots = [
            decode_snapshot((case / f"snapshot-{stage}-{s}.st").read_bytes(), probe)
            for s in range(job.steps + 1)
        ]
        # The checkpoint is the honest case's: an int8 miner's own first snapshot is already quantised.
        checkpoint = decode_snapshot(
            (directory / "honest" / f"snapshot-{stage}-0.st").read_bytes(), probe
        ).weights
        starts = [0] if from_checkpoint_only else range(job.steps - job.max_depth + 1)
        for start in starts:
            later = {s.inner_step: s.weights for s in snapshots[start + 1 : start + job.max_depth + 1]}
            result = replay(
                setup,
                records,
                checkpoint,
                snapshot=snapshots[start] if start else None,
                max_steps=job.max_depth,
                claimed_weights=later,
            )
            if result.stopped:
                raise RuntimeError(f"{label} stage {stage}: replay stopped: {result.stopped}")
            for check in result.checks:
                drift = (
                    check.verdict.kind == "drift"
                )  # kept as a fraction of its bar: one row per kind and window
                rows.append(
                    {
                        "stage": stage,
                        "kind": check.verdict.kind,
                        "depth": check.depth,
                        "error": check.verdict.error / check.verdict.threshold
                        if drift
                        else check.verdict.error,
                    }
                )
    return rows


def start_child(
    directory: Path, job: Job, label: str, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], Path]:
    """The same validation in a fresh interpreter whose environment picks other kernels (read at start-up);
    it runs beside this process's own validations, one per core."""
    out = directory / f"{label}-child.json"
    (directory / "job.json").write_text(json.dumps(job.__dict__))
    command = [sys.executable, "-m", "bench.calibrate_audit", "--child", str(directory), label, str(out)]
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env}), out


def finish_child(child: tuple[subprocess.Popen[bytes], Path]) -> list[dict[str, Any]]:
    process, out = child
    if process.wait() != 0:
        raise RuntimeError(f"the child validator failed with exit status {process.returncode}")
    return list(json.loads(out.read_text()))


# -- statistics --------------------------------------------------------------------------------------------


def stats(values: Sequence[float]) -> dict[str, float]:
    n = len(values)
    mean = sum(values) / n if n else 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return {
        "n": n,
        "mean": mean,
        "std": math.sqrt(var),
        "max": max(values, default=0.0),
        "min": min(values, default=0.0),
    }


def by_kind_depth(rows: Sequence[dict[str, Any]]) -> dict[str, dict[int, list[float]]]:
    table: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        table[row["kind"]][row["depth"]].append(row["error"])
    return table


def choose(
    honest: dict[str, dict[int, list[float]]], int8: dict[str, dict[int, list[float]]], max_depth: int
) -> dict[str, Any]:
    """D: the largest depth at which, for activations, gradients (hops at depths < D) and weights (steps <= D),
    int8's smallest error is at least SEPARATION x the honest bound (max + 5 std over those depths)."""

    def depths(kind: str, d: int) -> range:
        return range(1, d + 1) if kind == "weights" else range(d)

    def bound(kind: str, d: int) -> float:
        s = stats([v for depth in depths(kind, d) for v in honest[kind].get(depth, [])])
        return s["max"] + SIGMAS * s["std"]

    def floor(kind: str, d: int) -> float:
        return min((v for depth in depths(kind, d) for v in int8[kind].get(depth, [])), default=math.inf)

    depth = 0
    for d in range(1, max_depth + 1):
        if not all(floor(k, d) >= SEPARATION * bound(k, d) for k in ("activation", "gradient", "weights")):
            break
        depth = d
    chosen: dict[str, Any] = {"depth": depth}
    for kind in KINDS:
        d = max(depth, 1)
        chosen[kind] = {"honest_bound": bound(kind, d), "int8_min": floor(kind, d)}
    return chosen


def thresholds_from(chosen: dict[str, Any], floor: dict[str, float] | None = None) -> Thresholds:
    """The geometric mean of the honest bound and int8's minimum: a factor >= sqrt(SEPARATION) from each.

    The loss is not where an int8 tail shows (its loss is off by less than honest noise; its gradients give it
    away), so its threshold is 10 x the honest bound, and at least MIN_LOSS: a lie that small changes nothing.
    `floor`: lower bounds on the honest bound (bf16 is never held to a tighter bar than fp32).
    """
    values = {}
    for kind in KINDS:
        lo = max(chosen[kind]["honest_bound"], (floor or {}).get(kind, 0.0), MIN_BOUND)
        hi = chosen[kind]["int8_min"]
        values[kind] = max(10.0 * lo, MIN_LOSS) if kind == "loss" else math.sqrt(lo * hi)
    rounded = {k: float(f"{min(v, 0.5):.2g}") for k, v in values.items()}
    return Thresholds(**rounded, depth=max(chosen["depth"], 1))


# -- main --------------------------------------------------------------------------------------------------


def calibrate(
    presets: Sequence[str], steps: int, max_depth: int, warmup: int, emit: Callable[[str], None]
) -> dict[str, Any]:
    results: dict[str, Any] = {"cases": [], "max_depth": max_depth, "steps": steps}
    pooled: dict[bool, dict[str, list[dict[str, Any]]]] = {False: defaultdict(list), True: defaultdict(list)}
    with tempfile.TemporaryDirectory(prefix="calibrate-audit-") as tmp:
        for name in presets:
            for bf16 in (False, True):
                job = Job(name, bf16, steps, max_depth, warmup)
                directory = Path(tmp) / f"{name}-{'bf16' if bf16 else 'fp32'}"
                directory.mkdir()
                started = time.perf_counter()
                torch.set_num_threads(1)
                checkpoint = warm_checkpoint(job)
                write_case(directory, job, checkpoint, "honest", Honest)
                write_case(directory, job, checkpoint, "int8", functools.partial(Int8Weights))
                child = start_child(directory, job, "honest", CHILD_ENV)
                int8 = validate(directory, job, "int8", True)
                torch.set_num_threads(2)
                # Replays on 2 threads are bitwise those on 1 here (measured), so one window is enough to show it.
                validators = {"threads-2": validate(directory, job, "honest", True)}
                torch.set_num_threads(1)
                validators["avx2"] = finish_child(child)
                case = {
                    "preset": name,
                    "bf16": bf16,
                    "seconds": time.perf_counter() - started,
                    "honest": {},
                    "int8": {},
                }
                for label, rows in validators.items():
                    case["honest"][label] = summarise(rows)
                    pooled[bf16]["honest"].extend(rows)
                case["int8"] = summarise(int8)
                pooled[bf16]["int8"].extend(int8)
                results["cases"].append(case)
                print_case(case, emit)
    results["chosen"] = {}
    fp32_bounds: dict[str, float] = {}
    for bf16 in (False, True):
        precision = "bf16" if bf16 else "fp32"
        chosen = choose(by_kind_depth(pooled[bf16]["honest"]), by_kind_depth(pooled[bf16]["int8"]), max_depth)
        limits = thresholds_from(chosen, fp32_bounds if bf16 else None)
        fp32_bounds = {kind: chosen[kind]["honest_bound"] for kind in KINDS}
        chosen["thresholds"] = dict(limits.__dict__)
        results["chosen"][precision] = chosen
        emit(f"\n{precision}: D = {chosen['depth']} (of {max_depth} measured)")
        for kind in KINDS:
            emit(
                f"  {kind:10s} honest max+5std {chosen[kind]['honest_bound']:.2e}   "
                f"int8 min {chosen[kind]['int8_min']:.2e}   threshold {getattr(limits, kind):.2e}"
            )
    for bf16 in (False, True):
        honest = stats([r["error"] for r in pooled[bf16]["honest"] if r["kind"] == "drift"])
        int8 = stats([r["error"] for r in pooled[bf16]["int8"] if r["kind"] == "drift"])
        results["chosen"]["bf16" if bf16 else "fp32"]["drift"] = {"honest": honest, "int8": int8}
        emit(
            f"\n{'bf16' if bf16 else 'fp32'} drift, as a fraction of its bar ({DRIFT_FRACTION:g} x the threshold, "
            f"windows of >= {DRIFT_MIN_HOPS} hops at depths < D): honest {honest['n']} windows mean "
            f"{honest['mean']:.2e} std {honest['std']:.2e} max {honest['max']:.2e} (max + 5 std "
            f"{honest['max'] + SIGMAS * honest['std']:.2e}); int8 {int8['n']} windows min {int8['min']:.2e}"
        )
    emit("\nfor iota/audit/compare.py:")
    for precision in ("fp32", "bf16"):
        values = ", ".join(f"{k}={v:.2g}" for k, v in results["chosen"][precision]["thresholds"].items())
        emit(f"{precision.upper()} = Thresholds({values})")
    return results


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    table = by_kind_depth(rows)
    return {kind: {str(d): stats(v) for d, v in sorted(depths.items())} for kind, depths in table.items()}


def print_case(case: dict[str, Any], emit: Callable[[str], None]) -> None:
    emit(f"\n== {case['preset']} {'bf16' if case['bf16'] else 'fp32'} ({case['seconds']:.0f} s)")
    for kind in KINDS:
        emit(f"  {kind}")
        int8 = case["int8"].get(kind, {})
        depths = sorted({d for v in case["honest"].values() for d in v.get(kind, {})} | set(int8), key=int)
        for d in depths:
            parts = []
            for label, table in case["honest"].items():
                s = table.get(kind, {}).get(d)
                if s:
                    parts.append(f"{label} mean {s['mean']:.2e} std {s['std']:.2e} max {s['max']:.2e}")
            i = int8.get(d)
            if i:
                parts.append(f"int8 min {i['min']:.2e}")
            emit(f"    depth {d}: " + " | ".join(parts))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--presets", nargs="+", default=["test", "tiny"], choices=sorted(VOCAB))
    parser.add_argument("--steps", type=int, default=8, help="inner steps of the recorded epoch")
    parser.add_argument("--max-depth", type=int, default=6, help="longest replay measured")
    parser.add_argument("--warmup", type=int, default=10, help="honest steps before the recorded epoch")
    parser.add_argument("--json", action="store_true", help="print the results as JSON only")
    parser.add_argument("--child", nargs=3, metavar=("DIR", "LABEL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        directory, label, out = Path(args.child[0]), args.child[1], Path(args.child[2])
        job = Job(**json.loads((directory / "job.json").read_text()))
        torch.set_num_threads(2)
        out.write_text(json.dumps(validate(directory, job, label, False)))
        return
    if args.max_depth > args.steps:
        parser.error("--max-depth must not exceed --steps")
    emit: Callable[[str], None] = (lambda _: None) if args.json else print
    results = calibrate(args.presets, args.steps, args.max_depth, args.warmup, emit)
    if args.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
