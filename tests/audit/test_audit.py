"""An audit as the validator daemon and the orchestrator's recomputation run it (iota.audit.judge): from the
checkpoint or from a challenged snapshot, which must match the sketch committed for its step; and, once the epoch
has ended, the miner's uploaded pseudo-gradient and the partitions it merged as an owner."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from iota.audit.compare import FP32
from iota.audit.judge import (
    Evidence,
    FinalClaim,
    MergeClaim,
    check_merge,
    decode_challenged,
    judge,
    stage_size,
)
from iota.audit.replay import check_pseudo_gradient, check_pseudo_gradient_sketch, replay
from iota.merge import DictStore, FlatRef, Submitter, make_plan, partition_bounds, run_owner, sha256_hex
from iota.model.flat import decode_f32, encode_f32
from iota.train.snapshot import snapshot_from_f32, snapshot_to_f32
from iota.train.worker import sketch_seed
from tests.audit import initial_weights, make_setups, run_epoch

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


# -- the end of the epoch: the uploaded pseudo-gradient and the merged partitions ----------------------------


@pytest.fixture(scope="module")
def other(epoch):
    """Another replica of the same stage, trained on other samples: whose upload a copier would hand in."""
    setup, checkpoint, ran = epoch
    setups = make_setups()
    return run_epoch(setups, initial_weights(setups), list(range(8, 16))).workers[STAGE].pseudo_gradient()


def ended(epoch, pseudo: torch.Tensor, snapshot=None) -> Evidence:
    """The evidence of an ended epoch: the window, and the upload with the sketch of the miner's last step."""
    setup, _, ran = epoch
    final = max(ran.snapshots[STAGE])
    sketch = setup.worker(ran.snapshots[STAGE][final].weights).sketch(sketch_seed(setup.seed, 0, final))
    return dataclasses.replace(evidence(epoch, snapshot), final=FinalClaim(pseudo, final, sketch))


def forgeries(honest: torch.Tensor, other: torch.Tensor) -> dict[str, torch.Tensor]:
    noise = torch.randn(honest.shape, generator=torch.Generator().manual_seed(3)) * honest.std()
    return {"scaled": honest * 2, "zeros": torch.zeros_like(honest), "noise": noise, "another's": other}


def test_an_honest_upload_passes_against_its_sketch_and_the_replays_end(epoch) -> None:
    _, _, ran = epoch
    honest = ran.workers[STAGE].pseudo_gradient()
    assert max(ran.snapshots[STAGE]) > FP32.depth  # from the checkpoint the window does not reach the end...
    short = judge(lambda: ended(epoch, honest), "test", "miner", 0)
    assert short.passed, short.reason
    assert "pseudo_gradient_sketch" in short.errors and "pseudo_gradient" not in short.errors
    snapshot = ran.snapshots[STAGE][STEP]  # ...from this snapshot it does
    full = judge(lambda: ended(epoch, honest, snapshot), "test", "miner", 0)
    assert full.passed, full.reason
    assert full.errors["pseudo_gradient_sketch"] < 1e-6 and full.errors["pseudo_gradient"] < 1e-4


@pytest.mark.parametrize("forgery", ["scaled", "zeros", "noise", "another's"])
def test_a_forged_upload_fails_with_its_reason(epoch, other, forgery: str) -> None:
    _, _, ran = epoch
    forged = forgeries(ran.workers[STAGE].pseudo_gradient(), other)[forgery]
    sketch_only = judge(lambda: ended(epoch, forged), "test", "miner", 0)
    assert not sketch_only.passed and "pseudo_gradient_sketch: sketch relative error" in sketch_only.reason
    assert f"against its last step {max(ran.snapshots[STAGE])}" in sketch_only.reason
    snapshot = ran.snapshots[STAGE][STEP]
    replayed = judge(lambda: ended(epoch, forged, snapshot), "test", "miner", 0)
    assert not replayed.passed and "pseudo_gradient: relative error" in replayed.reason
    assert replayed.errors["pseudo_gradient"] > 0.3  # the replay's hops are honest: only the upload fails


def test_a_miner_that_took_no_step_must_upload_zeros(epoch) -> None:
    setup, checkpoint, _ = epoch
    zeros = torch.zeros_like(checkpoint)
    assert check_pseudo_gradient_sketch(setup, checkpoint, zeros, 0, None, 1).passed
    moved = zeros.clone()
    moved[5] = 1e-3
    verdict = check_pseudo_gradient_sketch(setup, checkpoint, moved, 0, None, 1)
    assert not verdict.passed and "no inner step" in verdict.reason
    short = check_pseudo_gradient_sketch(setup, checkpoint, zeros[:-1], 0, None, 1)
    assert not short.passed and "values" in short.reason


def test_the_replays_end_must_be_the_miners_last_step(epoch) -> None:
    setup, checkpoint, ran = epoch
    result = replay(setup, ran.records[STAGE], checkpoint, max_steps=2)
    with pytest.raises(ValueError, match="last step"):
        check_pseudo_gradient(result, ran.workers[STAGE].pseudo_gradient(), FP32, max(ran.snapshots[STAGE]))


class Merged:
    """One stage's merge from two replicas' uploads in a DictStore, as an owner computes and uploads it."""

    def __init__(self, epoch, other: torch.Tensor):
        setup, checkpoint, ran = epoch
        self.store = DictStore()
        self.store.put("start", encode_f32(checkpoint))
        uploads = {"alice": ran.workers[STAGE].pseudo_gradient(), "bob": other}
        submitters = []
        for hotkey, pseudo in uploads.items():
            self.store.put(f"pg/{hotkey}", encode_f32(pseudo))
            submitters.append(
                Submitter(hotkey=hotkey, upload_key=f"pg/{hotkey}", weight=1.0, claimed_norm=0.0)
            )
        self.shas = {f"pg/{h}": sha256_hex(encode_f32(p)) for h, p in uploads.items()}
        n = checkpoint.numel()
        self.plan = make_plan(
            run="r",
            epoch=0,
            stage=STAGE,
            n_params=n,
            n_partitions=4,
            submitters=submitters,
            prev_weights=[FlatRef(key="start")] * len(partition_bounds(n, 4)),
        )
        self.owner = self.plan.partitions[0].owners[0]
        self.digests = {i: r.digest for i, r in run_owner(self.store, self.plan, self.owner).results.items()}

    def claim(self) -> MergeClaim:
        return MergeClaim(self.plan, self.owner, self.digests, self.store, self.shas)

    def poison(self, index: int, own_digest: bool) -> None:
        """The owner's weights slice of `index` replaced by noise; its report names the new digest, or keeps the
        honest one."""
        key = self.plan.output_key(index, self.owner, "weights")
        weights = decode_f32(self.store.get(key))
        weights += torch.randn(weights.shape, generator=torch.Generator().manual_seed(1)) * 1e-3
        self.store.put(key, encode_f32(weights))
        if own_digest:
            momentum = self.store.get(self.plan.output_key(index, self.owner, "momentum"))
            self.digests[index] = sha256_hex(
                f"{sha256_hex(encode_f32(weights))}:{sha256_hex(momentum)}".encode()
            )


def test_an_honest_owners_partitions_pass(epoch, other) -> None:
    merged = Merged(epoch, other)
    verdicts, notes = check_merge(merged.claim())
    assert len(verdicts) == len(merged.plan.partitions_of(merged.owner)) >= 1 and not notes
    assert all(v.passed and v.error == 0.0 for v in verdicts)


@pytest.mark.parametrize("own_digest", [True, False], ids=["its own digest", "the honest digest"])
def test_a_poisoned_partition_fails_its_owner(epoch, other, own_digest: bool) -> None:
    merged = Merged(epoch, other)
    index = merged.plan.partitions_of(merged.owner)[0]
    merged.poison(index, own_digest)
    verdicts, notes = check_merge(merged.claim())
    (failed,) = [v for v in verdicts if not v.passed]
    expected = "is not the merge of the uploads" if own_digest else "not the result it reported"
    assert f"partition {index}" in failed.reason and expected in failed.reason and not notes
    outcome = judge(lambda: dataclasses.replace(evidence(epoch), merge=merged.claim()), "test", "miner", 0)
    assert not outcome.passed and outcome.reason.startswith("merge: partition")


def test_an_upload_changed_after_the_merge_fails_no_owner(epoch, other) -> None:
    merged = Merged(epoch, other)
    merged.store.put("pg/bob", encode_f32(other * 3))  # its submitter rewrote it through a still-valid URL
    verdicts, notes = check_merge(merged.claim())
    assert all(v.passed for v in verdicts) and notes
    assert all("no longer matches its digest" in note for note in notes)
