"""The ledgers write their values under the keys, and in the formats, the state held before they existed, and read
what an older iota wrote (an existing state database reads unchanged)."""

from __future__ import annotations

import math

from iota.merge import FlatRef, OuterConfig, Submitter, make_plan
from iota.orchestrator.ledgers import (
    AuditRecord,
    ChallengeRecord,
    CheckpointInfo,
    Claim,
    EndAuditQueue,
    ScoreArchive,
    SnapshotRecord,
    UploadRecord,
)
from iota.orchestrator.state import StateStore
from iota.protocol import EpochPlan, MergeDone, PartitionDone, WeightSketch
from iota.state import Database

PLAN = EpochPlan(epoch=2, tokens_at_start=4096, replicas=3)
DIGEST = "d" * 64  # as a digest must look on the wire
HOTKEY = "5" * 48  # as a hotkey must look on the wire: ss58


def test_run_values_counters_and_epoch_values(db: Database) -> None:
    state = StateStore(db)
    run = state.run
    assert (run.epoch, run.phase, run.paused, run.checkpoint) == (0, None, False, None)
    state.run.set_state_id("abc")
    state.run.set_epoch(2)
    state.run.set_phase("merge")
    state.run.set_paused(True)
    state.run.set_flags({"x": "1"})
    state.run.set_data_shards(["a.bin"])
    state.run.set_checkpoint(CheckpointInfo(epoch=2, shas=["s0", "s1"], momentum={"0": {"1": "m"}}))
    assert [state.get(k) for k in ("state_id", "epoch", "phase", "paused", "flags", "data_shards")] == [
        "abc",
        2,
        "merge",
        True,
        {"x": "1"},
        ["a.bin"],
    ]
    assert state.get("checkpoint") == {"epoch": 2, "shas": ["s0", "s1"], "momentum": {"0": {"1": "m"}}}
    state.put("checkpoint", {"epoch": 1, "shas": ["t"]})  # written before momentum was kept
    assert state.run.checkpoint == CheckpointInfo(epoch=1, shas=["t"], momentum={})

    assert state.counters.bump("cursor") == 1 and state.counters.bump("tokens_trained", 512) == 512
    state.counters.set("samples_completed", 7)
    assert [state.get(k) for k in ("cursor", "tokens_trained", "samples_completed")] == [1, 512, 7]
    assert state.counters.get("merges") == 0

    state.epochs.set_allocated(2, 10)
    state.epochs.set_tokens_at_start(2, 4096)
    state.epochs.set_checkpoint_shas(2, ["s0", "s1"])
    state.epochs.set_replicas(2, 1, 3)
    state.epochs.set_phase_started(2, "upload", 12.5)
    names = (
        "allocated/2",
        "tokens_at_start/2",
        "checkpoint_shas/2",
        "replicas/2/1",
        "phase_started/2/upload",
    )
    assert [state.get(k) for k in names] == [10, 4096, ["s0", "s1"], 3, 12.5]
    assert state.epochs.replicas(2, 0) is None and state.epochs.phase_started(2, "merge") is None


def test_uploads_and_merges(db: Database) -> None:
    state = StateStore(db)
    state.uploads.record(2, 1, "hk", UploadRecord(key="k", sha=None, norm=math.nan, weight=5))
    stored = state.get("upload/2/1/hk")
    assert math.isnan(stored.pop("norm")) and stored == {"key": "k", "sha": None, "weight": 5}
    state.uploads.leases.grant(2, 1, "hk", 99.0)
    assert state.get("upload_lease/2/1/hk") == 99.0 and state.uploads.leases.until(2, 1, "other") is None
    state.merges.apply_leases.grant(2, 1, "hk", 98.0)
    assert state.get("apply_lease/2/1/hk") == 98.0 == state.merges.apply_leases.until(2, 1, "hk")
    # A lapse is noted once per phase: the first note is the one that strikes.
    assert state.uploads.leases.lapse(2, "hk") and not state.uploads.leases.lapse(2, "hk")
    assert state.get("lapsed/2/upload/hk") is True and state.merges.apply_leases.lapse(2, "hk")

    submitter = Submitter(hotkey="hk", upload_key="k", weight=5.0, claimed_norm=1.0)
    plan = make_plan(
        run="r",
        epoch=2,
        stage=1,
        n_params=10,
        n_partitions=2,
        submitters=[submitter],
        prev_weights=[FlatRef(key="w")] * 2,
        outer=OuterConfig(lr=0.7, momentum=0.9),
    )
    state.merges.set_plan(plan)
    assert state.get("plan/2/1") == plan.model_dump(mode="json") and state.merges.plan(2, 1) == plan
    done = MergeDone(partitions={0: PartitionDone(digest=DIGEST, sq_norms={HOTKEY: 1.0})})
    state.merges.record_report(2, 1, "hk", done)
    assert state.get("merged/2/1/hk") == {"0": {"digest": DIGEST, "sq_norms": {HOTKEY: 1.0}}}
    assert state.merges.report(2, 1, "hk") == done.partitions and state.merges.report(2, 1, "other") is None
    state.put(
        "merged/2/1/old", {"0": "not a report"}
    )  # written as the miner sent it, before reports were typed
    assert state.merges.report(2, 1, "old") == {}
    state.merges.accept(2, 1, {0: "hk", 1: "orchestrator"})
    assert state.get("accepted/2/1") == {"0": "hk", "1": "orchestrator"}
    state.merges.record_applied(2, "hk", "sha")
    assert state.get("applied/2/hk") == "sha" == state.merges.applied(2, "hk")


def test_steps_and_snapshot_challenges(db: Database) -> None:
    state = StateStore(db)
    sketch = WeightSketch(norms=[1.0], projection=[0.5, -0.5])
    state.steps.commit(0, "hk", 3, sketch)
    assert state.get("step/0/hk") == 3 and state.get("sketch/0/hk/3") == sketch.model_dump()
    assert state.steps.last(0, "hk") == 3 and state.steps.sketch(0, "hk", 3) == sketch

    state.put("challenge/hk", {"epoch": 0, "step": 2, "key": "old", "at": 0.5})  # as kept before they queued
    assert state.snapshots.pending("hk") == ChallengeRecord(epoch=0, step=2, key="old", at=0.5)
    state.snapshots.set_pending("hk", None)
    assert state.snapshots.add("hk", ChallengeRecord(epoch=0, step=3, key="snap", at=1.0), limit=2)
    assert state.snapshots.add("hk", ChallengeRecord(epoch=0, step=5, key="snap5", at=2.0), limit=2)
    assert not state.snapshots.add("hk", ChallengeRecord(epoch=0, step=6, key="snap6", at=3.0), limit=2)
    challenge = state.snapshots.pending("hk")  # the oldest
    assert challenge == ChallengeRecord(epoch=0, step=3, key="snap", at=1.0)
    state.snapshots.set_pending("hk", challenge.model_copy(update={"taken": 4, "session": "s"}))
    assert state.get("challenge/hk") == [
        {"epoch": 0, "step": 3, "key": "snap", "at": 1.0, "taken": 4, "session": "s"},
        {"epoch": 0, "step": 5, "key": "snap5", "at": 2.0, "taken": None, "session": None},
    ]
    state.snapshots.set_pending("hk", None)  # answered: the next moves up
    assert [c.step for c in state.snapshots.queued("hk")] == [5]
    assert [c.step for c in state.snapshots.clear("hk")] == [5]
    assert state.snapshots.pending("hk") is None and state.get("challenge/hk") is None

    state.snapshots.record(0, "hk", 4, SnapshotRecord(key="snap", sha256="h"))
    state.snapshots.record(0, "hk", 2, SnapshotRecord(key="snap2", sha256="h2"))
    assert state.get("snapshot/0/hk/4") == {"key": "snap", "sha256": "h"}
    assert state.get("snapshots/0/hk") == [2, 4] == state.snapshots.steps(0, "hk")


def test_audits(db: Database) -> None:
    state = StateStore(db)
    issued = {"validator": "v", "miner": "m", "epoch": 2, "stage": 1, "issued": 5.0}
    record = AuditRecord(**issued, plan=PLAN, bf16=False, confirms=None, start_step=0)
    state.audits.record("a1", record)
    assert state.get("audit/a1") == {
        **issued,
        "plan": PLAN.model_dump(mode="json"),
        "bf16": False,
        "confirms": None,
        "start_step": 0,
        "answered": None,
    }
    assert state.audits.get("a1") == record

    # A claim as audits.py wrote it before the ledgers: no assigned_at until another validator takes it.
    old = {"miner": "m", "epoch": 2, "stage": 1, "accuser": "v", "at": 6.0, "plan": PLAN.model_dump()}
    state.put("confirmations", {"a1": {**old, "bf16": True, "start_step": 4}})
    claim = Claim(miner="m", epoch=2, stage=1, accuser="v", at=6.0, plan=PLAN, bf16=True, start_step=4)
    assert state.audits.claims() == {"a1": claim}
    state.audits.put_claim("a2", claim.model_copy(update={"assigned_at": 7.0}))
    assert state.get("confirmations")["a2"]["assigned_at"] == 7.0
    state.audits.drop_claim("a1")
    state.audits.drop_claim("gone")
    assert list(state.audits.claims()) == ["a2"]

    assert state.audits.end_audits() == EndAuditQueue(through=-1, pending=[])
    state.audits.set_end_audits(EndAuditQueue(through=1, pending=[(1, "m", 0)]))
    assert state.get("end_audits") == {"through": 1, "pending": [[1, "m", 0]]}
    assert state.audits.end_audits().pending == [(1, "m", 0)]

    assert state.audits.score_archive() is None and state.audits.scores_mirrored() == 0
    state.audits.set_score_archive(ScoreArchive(work={"0": []}, verdicts=[{"id": 1}], uids={"m": 3}))
    state.audits.set_scores_mirrored(1)
    assert state.get("score_archive") == {"work": {"0": []}, "verdicts": [{"id": 1}], "uids": {"m": 3}}
    assert state.get("scores_mirrored") == 1


def test_abuse_ledger(db: Database) -> None:
    state = StateStore(db)  # the migrations make the abuse tables: no policy needs to exist
    state.abuse.strike("hk", 10.0, "claim")
    state.abuse.strike("hk", 20.0, "forged")
    state.abuse.forget_strikes("hk", through=10.0)
    assert state.abuse.strike_times("hk") == [20.0]
    state.abuse.ban("hk", 21.0, "too many")
    assert state.abuse.bans() == {"hk": "too many"}
    state.abuse.forgive("hk")
    assert state.abuse.bans() == {} and state.abuse.strike_times("hk") == []
