"""`iota local --stages 3 --miners-per-stage 2 --epochs 3`: three merges, and after each APPLY both replicas of
every stage hold the published checkpoint's weights, bit for bit, with no sample lost (issue 5, must-show 1, on the
test preset so that it runs in a couple of minutes)."""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from pathlib import Path

import pytest

from iota.local import LocalOptions, run_local
from iota.orchestrator.state import StateStore
from iota.state.db import open_database
from iota.storage import LocalStore, keys

pytestmark = pytest.mark.slow

EPOCHS, STAGES, REPLICAS, SAMPLES = 3, 3, 2, 8
SMALL = {
    "preset": "test",
    "stages": STAGES,
    "epochs": EPOCHS,
    "samples_per_epoch": SAMPLES,
    "micro_batch": 2,
    "accumulate": 1,
    "total_tokens": 10_000,
}
# What each miner logs once it has loaded an epoch's merged weights: the digest it computed of its own weights.
APPLIED = re.compile(r"epoch (\d+) applied: stage (\d+) weights ([0-9a-f]{12})")


def test_three_merges_leave_every_stage_with_identical_replicas(tmp_path: Path, net_data_dir: Path) -> None:
    run_dir = tmp_path / "run"
    report = run_local(
        LocalOptions(
            miners_per_stage=REPLICAS,
            run_dir=run_dir,
            overrides={**SMALL, "data_dir": str(net_data_dir)},
            baseline=False,
            progress=False,
        )
    )
    assert report["epochs_completed"] == EPOCHS
    assert report["samples_lost"] == 0 and report["samples_completed"] == EPOCHS * SAMPLES

    state = StateStore(open_database(f"sqlite:///{run_dir / 'orchestrator' / 'state.db'}"))
    bucket = LocalStore(run_dir / "orchestrator" / "store", "http://unused", b"read-only-secret")
    assert int(state.get("merges", 0)) == EPOCHS
    miners = state.miners()
    assert sorted(m.stage for m in miners) == sorted(list(range(STAGES)) * REPLICAS)

    # The miners' own word, from their logs: (epoch, stage) -> the digests its replicas computed after APPLY.
    logged: defaultdict[tuple[int, int], list[str]] = defaultdict(list)
    for log in sorted((run_dir / "logs").glob("miner*.log")):
        for epoch, stage, digest in APPLIED.findall(log.read_text(errors="replace")):
            logged[int(epoch), int(stage)].append(digest)

    for epoch in range(EPOCHS):
        before, after = state.get(f"checkpoint_shas/{epoch}"), state.get(f"checkpoint_shas/{epoch + 1}")
        for stage in range(STAGES):
            data = bucket.get(keys.checkpoint_stage("local", epoch + 1, stage))
            assert (
                hashlib.sha256(data).hexdigest() == after[stage]
            )  # the checkpoint is what the merge published
            assert after[stage] != before[stage], f"epoch {epoch}: stage {stage} did not move"
            # Every replica's apply report (refused unless it names the checkpoint's digest) was recorded ...
            for m in (m for m in miners if m.stage == stage):
                assert state.get(f"applied/{epoch}/{m.hotkey}") == after[stage], (epoch, stage, m.hotkey)
            # ... and each replica computed that digest of the weights it then trained on.
            assert logged[epoch, stage] == [after[stage][:12]] * REPLICAS, (
                epoch,
                stage,
                logged[epoch, stage],
            )
    state.db.close()
