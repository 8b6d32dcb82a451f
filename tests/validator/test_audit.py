"""An audit as the validator daemon and the orchestrator's recomputation run it (iota.validator.audit): from the
checkpoint or from a challenged snapshot, which must match the sketch committed for its step."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from iota.merge import encode_f32
from iota.miner.worker import sketch_seed
from iota.validator.audit import Evidence, decode_challenged, judge, stage_size
from iota.validator.replay import snapshot_from_f32, snapshot_to_f32
from tests.validator import initial_weights, make_setups, run_epoch

STAGE, STEP = 1, 2


@pytest.fixture(scope="module")
def epoch():
    setups = make_setups()
    checkpoint = initial_weights(setups)
    return setups[STAGE], checkpoint[STAGE], run_epoch(setups, checkpoint, list(range(8)))


def evidence(epoch, snapshot=None) -> Evidence:
    setup, checkpoint, ran = epoch
    records = ran.records[STAGE]
    if snapshot is None:
        return Evidence(setup, checkpoint, records)
    honest = ran.snapshots[STAGE][STEP]
    seed = sketch_seed(setup.seed, records[0].epoch, STEP)
    sketch = setup.worker(honest.weights).sketch(seed)  # what the miner committed for the step
    later = {s: snap.weights for s, snap in ran.snapshots[STAGE].items() if s > STEP}
    return Evidence(setup, checkpoint, records, snapshot, sketch, later)


def test_an_honest_epoch_passes_from_the_checkpoint_and_from_a_snapshot(epoch) -> None:
    _, _, ran = epoch
    from_start = judge(lambda: evidence(epoch), "test", "miner", 0)
    assert from_start.passed and from_start.depth >= 1, from_start.reason
    snapshot = ran.snapshots[STAGE][STEP]
    from_snapshot = judge(lambda: evidence(epoch, snapshot), "test", "miner", 0)
    assert from_snapshot.passed and from_snapshot.depth >= 1, from_snapshot.reason


def test_a_snapshot_that_is_not_the_committed_state_fails(epoch) -> None:
    _, _, ran = epoch
    honest = ran.snapshots[STAGE][STEP]
    weights = honest.weights.clone()
    weights[:1000] += 0.05  # not the weights the sketch was committed for
    forged = dataclasses.replace(honest, weights=weights)
    outcome = judge(lambda: evidence(epoch, forged), "test", "miner", 0)
    assert not outcome.passed and "does not match its sketch" in outcome.reason


def test_the_flat_snapshot_round_trips_and_its_size_is_checked(epoch) -> None:
    setup, _, ran = epoch
    snapshot = ran.snapshots[STAGE][STEP]
    data = encode_f32(snapshot_to_f32(snapshot))
    n_params, n_tensors = stage_size(setup)
    back = snapshot_from_f32(snapshot_to_f32(snapshot), n_params, n_tensors, "adamw")
    assert back.inner_step == STEP and torch.equal(back.weights, snapshot.weights)
    assert torch.equal(back.steps, snapshot.steps)
    assert all(torch.equal(back.moments[k], snapshot.moments[k]) for k in snapshot.moments)
    assert torch.equal(decode_challenged(setup, data).weights, snapshot.weights)
    with pytest.raises(ValueError, match="bytes"):
        decode_challenged(setup, data[:-4])
    unusable = judge(lambda: evidence(epoch, decode_challenged(setup, data[:-4])), "test", "miner", 0)
    assert not unusable.passed and "unusable" in unusable.reason
