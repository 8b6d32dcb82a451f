"""Snapshot challenges, chosen after the fact: a miner cannot know which of its steps an audit may start at until
every hop of that audit's window is committed.

Every report that completes an inner step carries a sketch of the weights after that step (a commitment made
before the miner can know whether it will be challenged). With probability `rate` per step the orchestrator then
challenges that step, and keeps the challenge to itself until the miner has committed `delay` more steps (the
replay depth D of its precision, iota.audit.compare: the window an audit replays from the snapshot): only then is
it served, as the miner's next work item before any other. By then the window's hops and sketches are all in, so
being honest only where a window may start is no strategy: a window may start at any step, and the miner learns
which only once it can no longer change what that window replays. Challenges of the epoch's last steps, which
never get `delay` more, are served once training ends. Challenges are drawn at every step whatever is waiting
(queued, oldest served first), so nothing a miner sees (an order, or none when it asks) says which steps are not
covered.

So every miner keeps its exact state (weights and inner optimizer state) for each of its last steps
(iota.train.snapshot.StateRing: D plus a margin). Challenged, it copies the state of the named step from there,
says it took it (`snapshot_taken`) and uploads it (a flat fp32 object, iota.audit.replay.snapshot_to_f32) beside
its work; validators check it against the sketch committed for that step before they replay from it. Uploading
takes seconds to minutes, so the miner does not stall for it; but a report that goes past the step it had
reached when it took the snapshot is refused until the snapshot is answered (and the order served again, so a
failed upload is redone): a miner cannot put an answer off for ever, nor keep later challenges waiting.

A miner that restarts (a crash, PM2) registers a new session and starts again from the epoch's checkpoint at inner
step 0. Its first accepted report opens the session here: the epoch's step commitments and answered snapshots
start afresh (those of the session before are of weights nobody holds any more), its waiting challenges are
dropped, and where its hops begin among the miner's done hops is kept, so an audit replays each session as a
stream of its own (`audit_window`). A session that ended with a challenge unanswered forfeits the credit of its
hops in the epoch (`forfeited`, read by the score log): restarting is otherwise a way out of an audit of the
challenged steps. It is not a failure and costs nothing more, so an honest crash loses only that session's work.
"""

from __future__ import annotations

import bisect
import secrets
from typing import Any

from iota.audit.compare import thresholds
from iota.audit.replay import window
from iota.orchestrator.ledgers import ChallengeRecord, Claim, SnapshotRecord
from iota.orchestrator.scheduler import SchedulingError
from iota.orchestrator.state import MinerRecord, StateStore
from iota.protocol import (
    AuditSnapshot,
    EpochPlan,
    PhaseReport,
    SnapshotDone,
    SnapshotTaken,
    WeightSketch,
    Work,
)
from iota.protocol.bounds import MAX_HOPS, SNAPSHOT_LEAD
from iota.storage import keys
from iota.storage.base import ObjectStore

# Challenges waiting per miner at most (more are not issued): at 1 in 10 steps and a delay of 6, about 1.
MAX_QUEUED = 8


class Challenges:
    def __init__(
        self,
        run_id: str,
        state: StateStore,
        store: ObjectStore,
        sizes: list[int],
        rate: float,
        url_ttl_s: int,
        delay: int | None = None,
    ):
        """`sizes`: the exact bytes of a snapshot of each stage. `delay`: steps a challenge waits before it is
        served (None: the replay depth of the miner's precision)."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"snapshot challenge rate must be in [0, 1], got {rate}")
        self.run_id, self.state, self.store, self.sizes = run_id, state, store, sizes
        self.rate, self.url_ttl_s, self.delay = rate, url_ttl_s, delay
        self.random = secrets.SystemRandom()

    def on_report(
        self, hotkey: str, stage: int, epoch: int, inner_step: int, sketch: WeightSketch | None, now: float
    ) -> None:
        """Record the sketch of a report that completes a step, and perhaps challenge that step. Call it inside
        the report's transaction, after the hop is accepted."""
        self._open_session(hotkey, epoch, now)
        if inner_step <= self.state.steps.last(epoch, hotkey):
            return
        if sketch is None:
            raise SchedulingError(
                400,
                f"a report that reaches inner step {inner_step} must carry the sketch of the weights",
                fault=True,
            )
        self.state.steps.commit(epoch, hotkey, inner_step, sketch)
        if self.random.random() < self.rate:
            key = keys.snapshot(self.run_id, epoch, stage, hotkey, inner_step)
            challenge = ChallengeRecord(epoch=epoch, step=inner_step, key=key, at=now)
            issued = self.state.snapshots.add(hotkey, challenge, MAX_QUEUED)
            self.state.counters.bump("challenges_issued" if issued else "challenges_missed")

    def _open_session(self, hotkey: str, epoch: int, now: float) -> None:
        """Note where the miner's session begins among its done hops of the epoch, at its first accepted hop (this
        one, the last done); a restart's session starts the epoch's commitments afresh."""
        miner = self.state.miner(hotkey)
        known = self.state.steps.sessions(epoch, hotkey)
        if miner is None or (known and known[-1][0] == miner.session):
            return
        first = len(self.state.done_hops(hotkey, epoch, MAX_HOPS)) - 1
        self.state.steps.new_session(epoch, hotkey, miner.session, first)
        if known:
            self.state.snapshots.forget(epoch, hotkey)
            self.state.log(now, "session_restarted", hotkey, epoch=epoch, session=len(known), first_hop=first)
            previous, previous_first = known[-1]
            if self.state.snapshots.unanswered_by(epoch, hotkey) == previous:
                # Restarting drops a challenge a miner could not answer honestly, and with it any audit of those
                # steps: the session's hops then earn nothing (no failure, no penalty: honest crashes do this too).
                self._forfeit(hotkey, epoch, first - previous_first, now)

    def _closed_unanswered(self, miner: MinerRecord, epoch: int, now: float) -> None:
        """`epoch` closed with a challenge of the miner's session unanswered: the session's hops of it earn nothing
        (once, however many of its challenges were left)."""
        if self.state.snapshots.unanswered_by(epoch, miner.hotkey) == miner.session:
            return
        self.state.snapshots.left_unanswered(epoch, miner.hotkey, miner.session)
        sessions = self.state.steps.sessions(epoch, miner.hotkey)
        first = sessions[-1][1] if sessions else 0
        done = len(self.state.done_hops(miner.hotkey, epoch, MAX_HOPS))
        self._forfeit(miner.hotkey, epoch, done - first, now)

    def _forfeit(self, hotkey: str, epoch: int, hops: int, now: float) -> None:
        self.state.snapshots.forfeit(epoch, hotkey, hops)
        self.state.log(now, "credit_forfeited", hotkey, epoch=epoch, hops=hops)

    def pending(self, hotkey: str) -> bool:
        return self.state.snapshots.pending(hotkey) is not None

    def delay_of(self, miner: MinerRecord) -> int:
        """Steps a challenge of this miner waits before it is served: the depth an audit replays from it."""
        return self.delay if self.delay is not None else thresholds(miner.device == "cuda").depth

    def work(
        self, miner: MinerRecord, epoch: int, plan: EpochPlan, run_id: str, training: bool, now: float
    ) -> Work | None:
        """The miner's oldest challenge once it is due (`delay_of` steps committed after it, or training over),
        which then comes before any other work until the miner says it has taken the snapshot (this session);
        challenges of an epoch that closed unanswered are dropped (counted as missed), and the session's hops of
        that epoch earn nothing, as when it ends with one unanswered."""
        challenge = self.state.snapshots.pending(miner.hotkey)
        while challenge is not None and challenge.epoch != epoch:
            with self.state.transaction():
                self.state.snapshots.set_pending(miner.hotkey, None)
                self.state.counters.bump("challenges_missed")
                self._closed_unanswered(miner, challenge.epoch, now)
            challenge = self.state.snapshots.pending(miner.hotkey)
        if challenge is None or challenge.session == miner.session:
            return None  # none, or taken: it is being uploaded (see `blocks`)
        due = challenge.step + self.delay_of(miner)
        if training and self.state.steps.last(epoch, miner.hotkey) < due:
            return None  # its window's hops are not all committed: the miner must not know of it yet
        return Work(
            kind="snapshot",
            run_id=run_id,
            epoch=epoch,
            stage=miner.stage,
            plan=plan,
            output_url=self.store.presign_put(challenge.key, self.url_ttl_s, self.sizes[miner.stage]),
            output_size=self.sizes[miner.stage],
            challenged_step=challenge.step,
        )

    def take(self, miner: MinerRecord, report: PhaseReport, taken: SnapshotTaken, now: float) -> str:
        """The miner copied the challenged step's state, and uploads it next: other work may go to it meanwhile,
        up to the step it is at (the report's inner step; at most SNAPSHOT_LEAD past its last committed one). Call it
        inside a transaction."""
        challenge = self._pending(miner, report.epoch, taken.step)
        last = self.state.steps.last(challenge.epoch, miner.hotkey)
        until = max(challenge.step, min(report.inner_step, last + SNAPSHOT_LEAD))
        self.state.snapshots.set_pending(
            miner.hotkey, challenge.model_copy(update={"taken": until, "session": miner.session})
        )
        self.state.log(
            now, "snapshot_taken", miner.hotkey, epoch=challenge.epoch, step=challenge.step, until=until
        )
        return f"snapshot of step {challenge.step} taken: answer it before reporting past step {until}"

    def blocks(self, hotkey: str, epoch: int, inner_step: int) -> str | None:
        """Why a report reaching `inner_step` must be refused: the miner took a snapshot at an earlier step and has
        not answered it. The order is then served again (its own transaction), so a failed upload is redone."""

        def blocking(challenge: ChallengeRecord | None) -> int | None:
            """The step the miner had reached when it took the snapshot, if the report must wait for its answer."""
            taken = None if challenge is None or challenge.epoch != epoch else challenge.taken
            return taken if taken is not None and inner_step > taken else None

        if blocking(self.state.snapshots.pending(hotkey)) is None:
            return None  # the common case, read without a transaction
        with self.state.transaction():
            challenge = self.state.snapshots.pending(hotkey)
            taken = blocking(challenge)
            if challenge is None or taken is None:
                return None  # answered meanwhile
            self.state.snapshots.set_pending(
                hotkey, challenge.model_copy(update={"taken": None, "session": None})
            )
        return (
            f"answer the snapshot challenge first: you took it at inner step {taken} and report step "
            f"{inner_step}; it is your next order again"
        )

    def answer(self, miner: MinerRecord, report: PhaseReport, done: SnapshotDone, now: float) -> str:
        """A miner's snapshot of the challenged step (checked for size and digest). Call it inside a transaction."""
        challenge = self._pending(miner, report.epoch, done.step)
        info = self.store.head(challenge.key)
        size = self.sizes[miner.stage]
        if info is None or info.size != size:
            raise SchedulingError(400, f"snapshot missing or not {size} bytes", fault=True)
        if not report.output_sha256 or (info.sha256 and info.sha256 != report.output_sha256):
            raise SchedulingError(400, "snapshot does not match the reported sha256", fault=True)
        epoch, step = challenge.epoch, challenge.step
        self.state.snapshots.set_pending(miner.hotkey, None)
        answered = SnapshotRecord(key=challenge.key, sha256=report.output_sha256)
        self.state.snapshots.record(epoch, miner.hotkey, step, answered)
        self.state.counters.bump("challenges_answered")
        self.state.log(now, "snapshot", miner.hotkey, epoch=epoch, step=step)
        return "snapshot recorded"

    def snapshots(self, hotkey: str, epoch: int) -> dict[int, dict[str, Any]]:
        """step -> {key, sha256, sketch} of every answered challenge of this miner in this epoch whose sketch is
        still committed (a restart drops the sketches of the session before)."""
        found = {}
        for step in self.state.snapshots.steps(epoch, hotkey):
            sketch = self.state.steps.sketch(epoch, hotkey, step)
            snapshot = self.state.snapshots.get(epoch, hotkey, step)
            if sketch is not None and snapshot is not None:
                found[step] = {**snapshot.model_dump(), "sketch": sketch.model_dump()}
        return found

    def lapsed(self, claim: Claim) -> bool:
        """Whether a failing verdict's window can no longer be rebuilt: it started at a snapshot that a restart of
        the miner dropped since. Judged anew, it would be confirmed or refuted on other evidence than the
        accuser's, so it lapses: an unconfirmed failure counts for nothing, and costs its accuser nothing."""
        return bool(claim.start_step) and claim.start_step not in self.snapshots(claim.miner, claim.epoch)

    def for_audit(
        self, hotkey: str, epoch: int, depth: int, start: int | None = None
    ) -> tuple[int, list[AuditSnapshot]]:
        """A window start (given, or drawn among the checkpoint, 0, and the answered snapshots: `_draw_start`), and
        the snapshots a replay of `depth` steps from there needs: its start's and the later ones it reaches."""
        found = self.snapshots(hotkey, epoch)
        if start is None:
            start = self._draw_start(hotkey, epoch, depth, [0, *found])
            with self.state.transaction():
                self.state.snapshots.add_drawn(epoch, hotkey, start)
        chosen = [
            AuditSnapshot(
                step=step,
                url=self.store.presign_get(snap["key"], self.url_ttl_s),
                sha256=snap["sha256"],
                sketch=WeightSketch.model_validate(snap["sketch"]),
            )
            for step, snap in sorted(found.items())
            if start <= step <= start + depth
        ]
        return start, chosen

    def _draw_start(self, hotkey: str, epoch: int, depth: int, starts: list[int]) -> int:
        """A window start whose window replays a step drawn at random among those no earlier window of this epoch
        replayed (and that some start reaches): the epoch is covered in as few audits as the snapshots allow, in
        an order the miner cannot foresee, with no step the rule skips (a greedy choice of the most new steps kept
        leaving the step just after the checkpoint's window for last). Every step covered: any start."""
        covered = {s + i for s in self.state.snapshots.drawn(epoch, hotkey) for i in range(depth)}
        uncovered = [u for u in range(self.state.steps.last(epoch, hotkey) + 1) if u not in covered]
        self.random.shuffle(uncovered)
        for step in uncovered:
            reaching = [s for s in starts if s <= step < s + depth]
            if reaching:
                return self.random.choice(reaching)
        return self.random.choice(starts)

    def _pending(self, miner: MinerRecord, epoch: int, step: int) -> ChallengeRecord:
        """The challenge a snapshot report answers: it must be of the challenged step."""
        challenge = self.state.snapshots.pending(miner.hotkey)
        if challenge is None or challenge.epoch != epoch:
            raise SchedulingError(409, "no snapshot challenge is pending for you")
        if step != challenge.step:
            raise SchedulingError(
                400, f"a snapshot answers for step {challenge.step}, not {step!r}", fault=True
            )
        return challenge


def audit_window(
    state: StateStore, hotkey: str, epoch: int, start: int, depth: int, cap: int
) -> list[tuple[int, tuple[Any, ...]]]:
    """(session, done hop as `StateStore.done_hops` gives it) of each hop a replay of `depth` steps from `start`
    needs (iota.audit.replay.window), at most `cap`: what an audit task names, and what a recomputation of it
    replays."""
    rows = state.done_hops(hotkey, epoch, MAX_HOPS)
    firsts = [first for _, first in state.steps.sessions(epoch, hotkey)]
    sessions = [max(0, bisect.bisect_right(firsts, index) - 1) for index in range(len(rows))]
    hops = [
        (session, row[1], int(row[2]), int(row[3] or 0)) for session, row in zip(sessions, rows, strict=True)
    ]
    return [(sessions[index], rows[index]) for index in window(hops, start, depth, cap)]


def last_session(state: StateStore, hotkey: str, epoch: int) -> int:
    """The miner's last session of the epoch (0: its first, or it committed nothing)."""
    return max(0, len(state.steps.sessions(epoch, hotkey)) - 1)
