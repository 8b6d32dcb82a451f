"""What honest miners do that a replay must not call a lie: crash and restart mid-epoch (a new session, from the
checkpoint at inner step 0), get a restarted sample back, run an epoch longer than the hops one audit names. And a
cheat gains nothing from them: a lie in either session, or an upload of another session's weights, still fails."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch

from iota.audit.adversaries import Honest, Identity, WorkerPipeline
from iota.audit.judge import Evidence, FinalClaim, judge
from iota.audit.records import HopRecord
from iota.audit.replay import ReplaySetup, WorkerFactory, replay, window
from iota.train.snapshot import Snapshot, take_snapshot
from iota.train.worker import StageWorker, sketch_seed
from tests.audit import initial_weights, make_setups, run_epoch

BODY = 1


@dataclass
class Restarted:
    """An epoch in which the body miner crashed with a sample in flight and came back as a new session."""

    setups: list[ReplaySetup]
    checkpoint: list[torch.Tensor]
    pipeline: WorkerPipeline
    sessions: list[int]  # per body record
    before: StageWorker  # the body's first session, as the crash left it
    snapshots: dict[int, Snapshot]  # the body's last session at each of its steps

    def records(self, stage: int = BODY) -> list[HopRecord]:
        return self.pipeline.records[stage]

    def final(self, worker: StageWorker | None = None, session: int = 1) -> FinalClaim:
        """The body's upload at the epoch's end: the last session's weights unless `worker` says otherwise."""
        last = self.pipeline.workers[BODY]
        sketch = last.sketch(sketch_seed(self.setups[BODY].seed, 0, last.inner_step))
        return FinalClaim((worker or last).pseudo_gradient(), last.inner_step, sketch, session)


def restarted_epoch(after: WorkerFactory = Honest, before: WorkerFactory = Honest) -> Restarted:
    setups = make_setups(accumulate=2)
    checkpoint = initial_weights(setups)
    factories = [Honest, before, Honest]
    workers = [s.worker(flat, f) for s, flat, f in zip(setups, checkpoint, factories, strict=True)]
    pipeline = WorkerPipeline(workers, setups[0].lr)
    pipeline.run(range(6), in_flight=3)
    # Sample 6 reaches the body, which is killed before its backward: the orchestrator restarts the sample.
    activation = pipeline._hop(0, "forward", 6, None)
    pipeline._hop(BODY, "forward", 6, activation)
    crashed = pipeline.workers[BODY]
    first_session = len(pipeline.records[BODY])
    # The body comes back as a new session, from the checkpoint; sample 6 comes back to the same head.
    pipeline.workers[BODY] = setups[BODY].worker(checkpoint[BODY], after)
    snapshots: dict[int, Snapshot] = {}

    def on_step(stage: int, worker: StageWorker) -> None:
        if stage == BODY:
            snapshots[worker.inner_step] = take_snapshot(worker)

    pipeline.on_step = on_step
    pipeline.run(range(6, 14), in_flight=3)
    sessions = [0] * first_session + [1] * (len(pipeline.records[BODY]) - first_session)
    return Restarted(setups, checkpoint, pipeline, sessions, crashed, snapshots)


@pytest.fixture(scope="module")
def honest() -> Restarted:
    return restarted_epoch()


def audit(run: Restarted, final: FinalClaim | None = None, sessions: Sequence[int] | None = None):
    records = run.records()
    evidence = Evidence(
        run.setups[BODY],
        run.checkpoint[BODY],
        records,
        final=final,
        sessions=run.sessions if sessions is None else sessions,
    )
    return judge(lambda: evidence, "test", "miner", 0)


def test_a_restarted_miner_passes_each_session_and_its_upload(honest: Restarted) -> None:
    assert honest.before.inner_step >= 3 and honest.sessions.count(1) > 0
    outcome = audit(honest, honest.final())
    assert outcome.passed, outcome.reason
    assert outcome.errors["pseudo_gradient"] < 1e-6 and "pseudo_gradient_sketch" in outcome.errors
    # Each session was replayed from the checkpoint: hops of both, not only the first's.
    replayed = replay(
        honest.setups[BODY], honest.records(), honest.checkpoint[BODY], sessions=honest.sessions
    )
    assert replayed.passed and replayed.session == 1 and replayed.start_step == 0
    assert {check.index for check in replayed.checks} & {honest.sessions.index(1)}
    # What the audit did before sessions: one stream, so the restart read as a lie.
    assert "reported inner step" in audit(honest, sessions=()).reason


def test_the_upload_must_be_the_last_sessions(honest: Restarted) -> None:
    """A restart voids what came before: the first session's progress is nobody's weights any more."""
    outcome = audit(honest, honest.final(worker=honest.before))
    assert not outcome.passed and "pseudo_gradient" in outcome.reason
    # Claimed as of the first session, the replay's end is not the upload's: it is not compared, the sketch is.
    earlier = dataclasses.replace(honest.final(), session=0)
    assert "pseudo_gradient" not in audit(honest, earlier).errors


def test_a_restarted_sample_back_at_the_same_head_passes(honest: Restarted) -> None:
    head = honest.records(0)
    forwards = [r.sample_id for r in head if r.direction == "forward"]
    assert forwards.count(6) == 2  # the same head forwarded it again, in the same session
    result = replay(honest.setups[0], head, honest.checkpoint[0], max_steps=100)
    assert result.passed and result.complete, result.stopped


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_cheat_in_either_session_still_fails(when: str) -> None:
    run = restarted_epoch(**{when: Identity})
    outcome = audit(run)
    assert not outcome.passed and "activation" in outcome.reason, outcome.reason


# -- an epoch longer than one audit names -------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_epoch():
    setups = make_setups(accumulate=2)
    return setups, run_epoch(setups, initial_weights(setups), range(24), in_flight=3)


def hops_of(records: Sequence[HopRecord], sessions: Sequence[int] | None = None):
    sessions = sessions or [0] * len(records)
    return [(s, r.direction, r.sample_id, r.inner_step) for s, r in zip(sessions, records, strict=True)]


def test_a_window_late_in_a_long_epoch_names_the_hops_around_it(long_epoch) -> None:
    setups, run = long_epoch
    records, cap, start, depth = run.records[BODY], 16, 8, 2
    assert len(records) > 2 * cap and run.workers[BODY].inner_step == 12
    chosen = window(hops_of(records), start, depth, cap)
    named = [records[i] for i in chosen]
    assert len(named) <= cap and named[-1].inner_step == start + depth + 1
    snapshot = run.snapshots[BODY][start]
    later = {s: run.snapshots[BODY][s].weights for s in range(start + 1, 13)}
    result = replay(
        setups[BODY], named, run.checkpoint[BODY], snapshot=snapshot, max_steps=depth, claimed_weights=later
    )
    assert result.passed and result.end_step == start + depth, result.stopped
    assert any(c.direction == "step" for c in result.checks)
    # A forward before the window whose backward is in it came along (in flight at the snapshot).
    reached = next(n for n, r in enumerate(named) if r.inner_step >= start)
    assert any(r.direction == "forward" for r in named[:reached])
    # The first `cap` hops, as audits named them before, never reach the step.
    with pytest.raises(ValueError, match="no committed hop reached"):
        replay(setups[BODY], records[:cap], run.checkpoint[BODY], snapshot=snapshot)


def test_a_window_from_the_checkpoint_covers_each_session(honest: Restarted) -> None:
    records, sessions = honest.records(), honest.sessions
    chosen = window(hops_of(records, sessions), 0, 1, 100)
    assert {sessions[i] for i in chosen} == {0, 1}
    assert [records[i].inner_step for i in chosen if sessions[i] == 1][
        -1
    ] == 2  # through the first past step 1
    named = [records[i] for i in chosen]
    result = replay(
        honest.setups[BODY],
        named,
        honest.checkpoint[BODY],
        max_steps=1,
        sessions=[sessions[i] for i in chosen],
    )
    assert result.passed and result.session == 1 and not result.complete


def test_reported_steps_cannot_empty_a_window(honest: Restarted) -> None:
    """Steps are the miner's word: one that reports every hop far ahead still has its first hop replayed."""
    far = [dataclasses.replace(r, inner_step=r.inner_step + 1000) for r in honest.records()]
    chosen = window(hops_of(far, honest.sessions), 0, 6, 100)
    assert chosen
    result = replay(
        honest.setups[BODY],
        [far[i] for i in chosen],
        honest.checkpoint[BODY],
        sessions=[honest.sessions[i] for i in chosen],
    )
    assert "reported inner step 1000" in result.stopped


def test_a_snapshot_of_the_last_session_starts_there(honest: Restarted) -> None:
    """After a restart the miner's snapshots are of its new session: the window and the replay are that session's,
    though the first session passed the same step."""
    records, sessions = honest.records(), honest.sessions
    first_session = sessions.index(1)
    assert max(r.inner_step for r in records[:first_session]) >= 2
    chosen = window(hops_of(records, sessions), 2, 6, 100)
    assert min(chosen) >= first_session
    result = replay(
        honest.setups[BODY],
        [records[i] for i in chosen],
        honest.checkpoint[BODY],
        snapshot=honest.snapshots[2],
        sessions=[sessions[i] for i in chosen],
    )
    assert result.passed and result.start_step == 2 and result.session == 1, result.stopped
    assert torch.equal(result.end, honest.pipeline.workers[BODY].flat_weights())
