"""A run resumed from its bucket alone: a fresh orchestrator with an empty state store picks it up."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from iota.local import LocalNetwork, LocalOptions

pytestmark = pytest.mark.slow


def test_fresh_orchestrator_resumes_from_bucket(tmp_path: Path, net_data_dir: Path) -> None:
    overrides = {
        "preset": "test",
        "stages": 3,
        "epochs": 3,
        "samples_per_epoch": 16,
        "micro_batch": 2,
        "total_tokens": 10_000,
        "data_dir": str(net_data_dir),
    }
    net = LocalNetwork(
        LocalOptions(run_dir=tmp_path / "run", overrides=overrides, miner_timeout_s=8.0, progress=False)
    )
    try:
        net.start_orchestrator()
        for _ in range(3):
            net.add_miner()
        before = net.wait_until(lambda s: s.epoch >= 1 and s.phase == "train", timeout_s=240)
        net.signal("orchestrator", signal.SIGKILL)
        net.procs["orchestrator"].wait()
        state_dir = tmp_path / "run" / "orchestrator"
        for name in ("state.db", "state.db-wal", "state.db-shm"):
            (state_dir / name).unlink(missing_ok=True)  # the state store is gone: only the bucket remains
        net.start_orchestrator()
        resumed = net.status()
        assert resumed is not None
        assert resumed.epoch == before.epoch  # picked up at the last published checkpoint
        assert resumed.tokens_trained >= 16 * 2 * 32 * before.epoch
        assert any(e["kind"] == "resumed" for e in net.events())
        done = net.wait_until(lambda s: s.phase == "done", timeout_s=300)
        assert done.epoch == 3 and done.samples_lost == 0
    finally:
        net.stop()
