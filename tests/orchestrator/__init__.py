"""Tests of the orchestrator: the scheduler on both database engines, and the real app over HTTP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from iota.config import OrchestratorSettings


def run_settings(data_dir: Path, run_dir: Path, **overrides: Any) -> OrchestratorSettings:
    """A 3-stage run of the test preset, two sequences per sample, four samples per epoch; no .env is read."""
    fields: dict[str, Any] = {
        "preset": "test",
        "data_dir": data_dir,
        "run_dir": run_dir,
        "run_id": "run-test",
        "stages": 3,
        "micro_batch": 2,
        "samples_per_epoch": 4,
        "epochs": 1,
        "wire_dtype": "fp32",  # activations travel exactly, so the pipeline's loss equals the unsplit model's
        "lease_s": 60.0,
        "miner_timeout_s": 600.0,  # the tests move the orchestrator's clock past leases, never past this
        "recheck": False,  # tests that recompute verdicts drive a Rechecker themselves
        "snapshot_rate": 0.0,  # tests of snapshot challenges ask for them
        **overrides,
    }
    return OrchestratorSettings(_env_file=None, **fields)
