"""Replay: an honest miner's window reproduces bit for bit, from the checkpoint or a snapshot with work in flight;
protocol lies stop it; the single checks and the on-disk forms round-trip."""

import dataclasses

import pytest
import torch

from iota.audit import check_loss, check_pseudo_gradient, check_snapshot, check_tokens, check_weights, replay
from iota.audit.records import decode_records, encode_records
from iota.train.snapshot import decode_snapshot, encode_snapshot
from iota.train.worker import StageWorker
from tests.audit import SKETCH_SEED, initial_weights, make_setups, run_epoch


@pytest.fixture(scope="module")
def epoch():
    setups = make_setups(accumulate=2)
    return setups, run_epoch(setups, initial_weights(setups), range(12), in_flight=3)


def test_honest_epoch_replays_exactly_at_every_stage(epoch):
    setups, run = epoch
    for stage, setup in enumerate(setups):
        result = replay(setup, run.records[stage], run.checkpoint[stage], max_steps=100)
        assert result.passed and result.complete and not result.stopped, result.failures
        assert result.hops == len(run.records[stage])
        assert result.end_step == run.workers[stage].inner_step == 6
        assert torch.equal(result.end, run.workers[stage].flat_weights())
        assert all(check.verdict.error == 0.0 for check in result.checks)
        kinds = {check.verdict.kind for check in result.checks}
        expected = {0: {"activation"}, 1: {"activation", "gradient"}, 2: {"gradient", "loss"}}[stage] | {
            "drift"
        }
        assert kinds == expected
        assert check_pseudo_gradient(result, run.workers[stage].pseudo_gradient(), setup.thresholds).passed


def test_bottleneck_stages_replay_and_the_identity_still_scores_one():
    setups = make_setups(bottleneck=16)
    run = run_epoch(setups, initial_weights(setups), range(4))
    for stage, setup in enumerate(setups):
        assert replay(setup, run.records[stage], run.checkpoint[stage], max_steps=100).passed
    body = run.records[1][0]
    identity = dataclasses.replace(body, output=body.input)
    result = replay(setups[1], [identity], run.checkpoint[1])
    assert result.failures[0].verdict.error == pytest.approx(1.0, abs=1e-6)


def test_window_depth_and_snapshot_start_with_samples_in_flight(epoch):
    setups, run = epoch
    body = setups[1]
    records = run.records[1]
    # Three samples in flight with k = 2: the third sample's backward follows a step and recomputes its forward.
    window = replay(body, records, run.checkpoint[1], max_steps=2)
    assert window.passed and not window.complete and window.end_step == 2
    assert max(check.depth for check in window.checks) == 1
    assert torch.equal(window.end, run.snapshots[1][2].weights)
    for start in range(1, 6):
        snapshot = run.snapshots[1][start]
        later = {s: run.snapshots[1][s].weights for s in range(start + 1, 7)}
        result = replay(
            body, records, run.checkpoint[1], snapshot=snapshot, max_steps=2, claimed_weights=later
        )
        assert result.passed, (start, result.failures)
        assert result.start_step == start and result.end_step == min(start + 2, 6)
        assert any(check.direction == "step" for check in result.checks)  # a later snapshot was compared
        assert torch.equal(result.end, run.snapshots[1][result.end_step].weights)
        assert check_snapshot(body, snapshot, run.sketches[1][start], SKETCH_SEED).passed


def test_protocol_lies_stop_the_replay(epoch):
    setups, run = epoch
    body, records = setups[1], run.records[1]

    def replayed(changed):
        return replay(body, changed, run.checkpoint[1], max_steps=100)

    wrong_step = list(records)
    wrong_step[3] = dataclasses.replace(records[3], inner_step=records[3].inner_step + 1)
    result = replayed(wrong_step)
    assert result.stopped.startswith("reported inner step") and not result.passed
    orphan = [r for r in records if not (r.direction == "forward" and r.sample_id == 0)]
    assert "without its forward" in replayed(orphan).stopped
    # The same forward again is a restarted sample coming back to this miner: replayed, not refused.
    again = replayed([records[0], records[0]])
    assert again.passed and again.hops == 2, again.stopped
    foreign = [dataclasses.replace(records[0], stage=2)]
    assert "stage 2" in replayed(foreign).stopped
    garbled = [dataclasses.replace(records[0], input=b"not a tensor")]
    assert "does not decode" in replayed(garbled).stopped
    bad_output = [dataclasses.replace(records[0], output=b"\x80\x04pickle")] + list(records[1:])
    result = replayed(bad_output)
    assert not result.stopped and not result.passed  # a bad claim is judged, and the replay goes on
    assert result.failures[0].index == 0 and "does not decode" in result.failures[0].verdict.reason
    assert result.hops == len(records)


def test_single_checks(epoch):
    setups, run = epoch
    head, tail = setups[0], setups[2]
    first_head = run.records[0][0]
    assert first_head.output is not None
    assert check_tokens(head, run.checkpoint[0], first_head.sample_id, first_head.output).passed
    assert not check_tokens(head, run.checkpoint[0], first_head.sample_id + 1, first_head.output).passed
    first_tail = run.records[2][0]
    assert first_tail.input is not None
    assert check_loss(tail, run.checkpoint[2], first_tail.sample_id, first_tail.input, first_tail.loss).passed
    verdict = check_loss(
        tail, run.checkpoint[2], first_tail.sample_id, first_tail.input, first_tail.loss * 0.97
    )
    assert not verdict.passed and verdict.kind == "loss"
    with pytest.raises(ValueError):
        check_tokens(tail, run.checkpoint[2], 0, first_head.output)
    result = replay(setups[1], run.records[1], run.checkpoint[1], max_steps=3)
    assert check_weights(result, run.snapshots[1][3].weights, setups[1].thresholds).passed
    assert not check_weights(result, run.snapshots[1][2].weights, setups[1].thresholds).passed
    with pytest.raises(ValueError, match="end of the epoch"):
        check_pseudo_gradient(result, run.workers[1].pseudo_gradient(), setups[1].thresholds)


def test_records_and_snapshots_round_trip(epoch):
    setups, run = epoch
    for stage in range(3):
        records = run.records[stage]
        assert decode_records(encode_records(records)) == records
    probe = setups[1].worker(run.checkpoint[1], StageWorker)
    snapshot = run.snapshots[1][3]
    back = decode_snapshot(encode_snapshot(snapshot), probe)
    assert back.inner_step == 3 and torch.equal(back.weights, snapshot.weights)
    assert back.moments.keys() == {"exp_avg", "exp_avg_sq"} and torch.equal(back.steps, snapshot.steps)
    assert all(torch.equal(back.moments[k], snapshot.moments[k]) for k in back.moments)
    with pytest.raises(ValueError):
        decode_snapshot(encode_snapshot(run.snapshots[0][3]), probe)  # another stage's snapshot
