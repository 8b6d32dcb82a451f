"""Honest miners are never flagged: 504 audits over fp32 and bf16, miners and validators on different thread counts,
and a validator on another CPU's kernels (a child process limited to AVX2), where replays are not bitwise equal.

An audit is one window of a miner's epoch: replayed from the snapshot it committed at some inner step (from the
checkpoint at step 0) for up to 2 steps, every hop compared, the snapshot checked against its sketch and the
snapshots at the window's later steps against the replay; a window that reaches the end of the epoch also
checks the uploaded pseudo-gradient. Run as a module, this file is that child validator.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from iota.audit import ReplaySetup, check_pseudo_gradient, check_snapshot, replay
from iota.audit.records import HopRecord, decode_records, encode_records
from iota.protocol import WeightSketch
from iota.train.snapshot import Snapshot, decode_snapshot, encode_snapshot
from iota.train.worker import StageWorker
from tests.audit import SKETCH_SEED, initial_weights, make_setups, run_epoch

STEPS = 28  # inner steps per epoch (k = 1, one sample per window as the daemon takes them): 84 windows
WINDOW = 2  # steps per audit, or the calibrated depth D where that is less
SEED = 11  # not the calibration's seed: these audits are out of sample
ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def audits(
    setups: Sequence[ReplaySetup],
    records: Sequence[Sequence[HopRecord]],
    snapshots: Sequence[dict[int, Snapshot]],
    sketches: Sequence[dict[int, WeightSketch]],
    pseudo: Sequence[torch.Tensor],
) -> list[dict[str, Any]]:
    """Every window of every stage; one row per audit with what failed."""
    rows = []
    for stage, setup in enumerate(setups):
        checkpoint = snapshots[stage][0].weights
        window = min(WINDOW, setup.thresholds.depth)
        for start in range(STEPS):
            later = {
                s: snapshots[stage][s].weights for s in range(start + 1, start + window + 1) if s <= STEPS
            }
            snapshot = snapshots[stage][start]
            result = replay(
                setup, records[stage], checkpoint, snapshot=snapshot, max_steps=window, claimed_weights=later
            )
            verdicts = [check.verdict for check in result.checks]
            verdicts.append(check_snapshot(setup, snapshot, sketches[stage][start], SKETCH_SEED))
            if result.complete:
                verdicts.append(check_pseudo_gradient(result, pseudo[stage], setup.thresholds))
            rows.append(
                {
                    "stage": stage,
                    "start": start,
                    "checks": len(verdicts),
                    "failures": [f"{v.kind}: {v.reason}" for v in verdicts if not v.passed],
                    "max_error": max((v.error for v in verdicts if v.kind != "sketch"), default=0.0),
                }
            )
    return rows


def write_epoch(directory: Path, bf16: bool) -> None:
    """The miner: one honest epoch on 1 thread, everything a validator fetches written as the bucket holds it."""
    setups = make_setups(bf16, seed=SEED)
    with threads(1):
        run = run_epoch(setups, initial_weights(setups), range(STEPS), in_flight=1)
    directory.mkdir(parents=True)
    for stage, worker in enumerate(run.workers):
        (directory / f"records-{stage}.st").write_bytes(encode_records(run.records[stage]))
        (directory / f"pseudo-{stage}.f32").write_bytes(worker.pseudo_gradient().numpy().tobytes())
        (directory / f"sketches-{stage}.json").write_text(
            json.dumps({step: sketch.model_dump() for step, sketch in run.sketches[stage].items()})
        )
        for step, snapshot in run.snapshots[stage].items():
            (directory / f"snapshot-{stage}-{step}.st").write_bytes(encode_snapshot(snapshot))


def audit_directory(directory: Path, bf16: bool) -> list[dict[str, Any]]:
    setups = make_setups(bf16, seed=SEED)
    records, snapshots, sketches, pseudo = [], [], [], []
    for stage, setup in enumerate(setups):
        probe = setup.worker(initial_weights(setups)[stage], StageWorker)
        records.append(decode_records((directory / f"records-{stage}.st").read_bytes()))
        snapshots.append(
            {
                s: decode_snapshot((directory / f"snapshot-{stage}-{s}.st").read_bytes(), probe)
                for s in range(STEPS + 1)
            }
        )
        committed = json.loads((directory / f"sketches-{stage}.json").read_text())
        sketches.append({int(s): WeightSketch.model_validate(v) for s, v in committed.items()})
        raw = bytearray((directory / f"pseudo-{stage}.f32").read_bytes())
        pseudo.append(torch.frombuffer(raw, dtype=torch.float32))
    return audits(setups, records, snapshots, sketches, pseudo)


@pytest.fixture(scope="module")
def epochs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("honest")
    for bf16 in (False, True):
        write_epoch(root / precision(bf16), bf16)
    return root


def precision(bf16: bool) -> str:
    return "bf16" if bf16 else "fp32"


def assert_never_flagged(rows: Sequence[dict[str, Any]]) -> None:
    flagged = [row for row in rows if row["failures"]]
    assert not flagged, flagged[:5]


@pytest.mark.parametrize("bf16", [False, True], ids=precision)
def test_validator_on_two_threads(epochs: Path, bf16: bool) -> None:
    with threads(2):
        rows = audit_directory(epochs / precision(bf16), bf16)
    assert len(rows) == 3 * STEPS
    assert_never_flagged(rows)


@pytest.mark.parametrize("bf16", [False, True], ids=precision)
def test_miner_on_two_threads_validator_on_one(tmp_path: Path, bf16: bool) -> None:
    setups = make_setups(bf16, seed=SEED)
    with threads(2):
        run = run_epoch(setups, initial_weights(setups), range(STEPS), in_flight=1)
    with threads(1):
        pseudo = [w.pseudo_gradient() for w in run.workers]
        rows = audits(setups, run.records, run.snapshots, run.sketches, pseudo)
    assert len(rows) == 3 * STEPS
    assert_never_flagged(rows)


def test_validator_on_another_cpus_kernels(epochs: Path) -> None:
    """The one honest difference CPUs show: ATen's vector kernels for AVX2 instead of AVX-512."""
    out = epochs / "child.json"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "OMP_WAIT_POLICY": "PASSIVE"}
    command = [sys.executable, "-m", "tests.audit.test_honest", str(epochs), str(out)]
    subprocess.run(command, cwd=ROOT, env=env, check=True, timeout=600)
    rows = json.loads(out.read_text())
    assert len(rows) == 2 * 3 * STEPS
    assert_never_flagged(rows)
    # The kernels did differ (else this would only repeat the in-process tests), and stayed well inside.
    assert any(row["max_error"] > 0.0 for row in rows)


def _child(epochs: Path, out: Path) -> None:
    torch.set_num_threads(2)
    rows = [row for bf16 in (False, True) for row in audit_directory(epochs / precision(bf16), bf16)]
    out.write_text(json.dumps(rows))


if __name__ == "__main__":
    _child(Path(sys.argv[1]), Path(sys.argv[2]))
