"""The orchestrator's operations, one method per request kind: the routes only translate HTTP to these calls.

It owns the run description (model, stages, data, schedule), the scheduler over the durable state, the object
store whose keys it chooses and presigns, and the checks on every report (lease, epoch, object size and digest).

An accepted output stays what was accepted: a hop's output key is written once (its PUT URL is write-once), and
the report is checked against, and records, the digest the store itself computed (ObjectStore.confirm), never
the miner's word. A consumer that finds its input bad says so when it releases the item; iota.orchestrator.disputes checks that
claim before anyone is struck.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from loguru import logger

from iota.orchestrator import disputes
from iota.orchestrator.challenges import Challenges
from iota.orchestrator.doorbell import Ticket
from iota.orchestrator.epochs import EpochDriver
from iota.orchestrator.scheduler import BACKWARD, FORWARD, TRAIN, Assignment, Scheduler, SchedulingError
from iota.orchestrator.state import Hop, StateStore
from iota.protocol import (
    Ack,
    EpochPlan,
    MinerStatus,
    PhaseReport,
    RegisterRequest,
    Registration,
    ReleaseReason,
    Report,
    RunInfo,
    SnapshotDone,
    SnapshotTaken,
    StageStatus,
    Status,
    Work,
)
from iota.storage.base import ObjectStore
from iota.train.snapshot import snapshot_size

CURVE_POINTS = 2048  # the most points /status's loss curve carries

if TYPE_CHECKING:
    from iota.orchestrator.abuse import AbusePolicy


def thin_curve(points: list[tuple[int, float]], tokens: int, most: int) -> list[tuple[int, float]]:
    """(samples, mean loss) points as (tokens trained by the point's end, mean loss), at most `most` of them: runs
    of consecutive points are averaged, each weighted by its samples."""
    curve, samples = [], 0
    for n, loss in points:
        samples += n
        curve.append((tokens * samples, loss, n))
    size = max(1, -(-len(curve) // most))
    runs = [curve[i : i + size] for i in range(0, len(curve), size)]
    return [(run[-1][0], sum(loss * n for _, loss, n in run) / sum(n for *_, n in run)) for run in runs]


@dataclass(frozen=True)
class Limits:
    activation_bytes: int  # exact size of every activation and gradient object
    url_ttl_s: int
    sweep_interval_s: float = 1.0
    max_hold_s: float = 0.0  # the longest a request for work is held while there is none (long-poll)


class Orchestrator:
    def __init__(
        self,
        run: RunInfo,
        state: StateStore,
        scheduler: Scheduler,
        store: ObjectStore,
        epochs: EpochDriver,
        limits: Limits,
        uid_of: Callable[[str], int | None],
        clock: Callable[[], float] = time.time,
        abuse: AbusePolicy | None = None,
        challenge_rate: float = 0.0,
    ):
        self.run = run
        self.state = state
        self.scheduler = scheduler
        self.store = store
        self.epochs = epochs
        self.limits = limits
        self.uid_of = uid_of
        self.clock = clock
        self.abuse = abuse  # strikes for refusals that are the caller's fault (applied by the routes)
        self.auditor: Any = None  # set by the app: audits and the score log
        sizes = [
            snapshot_size(n, len(tensors), run.optimizer)
            for n, tensors in zip(epochs.n_params, epochs.tensors, strict=True)
        ]
        self.challenges = Challenges(run.run_id, state, store, sizes, challenge_rate, limits.url_ttl_s)
        self._last_sweep = 0.0

    # -- requests ---------------------------------------------------------------------------------------

    def register(self, hotkey: str, request: RegisterRequest) -> Registration:
        now = self.clock()
        # What is stored must fit its column (BIGINT) and stay small: every registration is kept and logged.
        if not 0 <= request.memory_bytes < 2**63:
            raise SchedulingError(400, f"memory_bytes {request.memory_bytes} is out of range", fault=True)
        if len(request.device) > 64 or len(request.session) > 128:
            raise SchedulingError(400, "device (64) or session (128 characters) is too long", fault=True)
        stage = self.scheduler.register(
            hotkey, self.uid_of(hotkey), request.device, request.memory_bytes, request.session, now
        )
        with self.state.transaction():
            checkpoint = self.state.run.checkpoint
            if checkpoint is not None:
                self.state.merges.set_loaded(
                    hotkey, checkpoint.epoch
                )  # what it loads before it asks for work
            registration = Registration(
                hotkey=hotkey,
                stage=stage,
                epoch=self.scheduler.epoch,
                checkpoint_url=self.epochs.checkpoints.weights_url(stage),
                checkpoint_sha256=self.epochs.checkpoints.weights_sha(stage),
                data_urls=self.epochs.data_urls(),
                heartbeat_s=self.scheduler.policy.miner_timeout_s / 4,
                state_id=self.state.run.state_id or "",
                pipeline_depth=self.scheduler.doorbell.per_miner,
            )
        logger.info("miner {} registered on stage {} ({})", hotkey[:10], stage, request.device)
        return registration

    def heartbeat(self, hotkey: str) -> Ack:
        """Liveness apart from work: a miner loading gigabytes of weights is busy, not gone. Its leases are not
        kept alive: they are swept here as on any request, and lapse on their own terms."""
        now = self.clock()
        self.sweep(now)
        with self.state.transaction():
            self.scheduler.live_miner(hotkey, now)
        return Ack(detail="alive")

    def work(self, hotkey: str, forward: bool = True) -> Work:
        return self._work(hotkey, forward)[0]

    def work_or_ticket(
        self, hotkey: str, forward: bool, woken_by_stage: bool = False
    ) -> tuple[Work, Ticket | None]:
        """`work`, and with a `wait` in training a ticket the doorbell rings when work for this miner may be there
        (a held request waits on it). ``woken_by_stage``: a ring for forward work on the miner's stage woke this
        request; if the miner cannot take forward work now, the ring is passed to the next miner waiting there."""
        answer, assignment = self._work(hotkey, forward)
        if assignment is None or assignment.hop is not None:
            return answer, None
        doorbell = self.scheduler.doorbell
        if woken_by_stage and not assignment.takes_forward:
            doorbell.ring_stage(answer.stage)
        return answer, doorbell.ticket(hotkey, answer.stage, assignment.takes_forward)

    def _work(self, hotkey: str, forward: bool) -> tuple[Work, Assignment | None]:
        """The answer, with the scheduler's assignment where it made one (in training, no challenge pending)."""
        now = self.clock()
        self.sweep(now)
        training = self.scheduler.phase == TRAIN
        with self.state.transaction():
            miner = self.scheduler.live_miner(hotkey, now)
            if training and self.epochs.behind(miner):  # it missed an APPLY: no hop from older weights
                return self.epochs.apply_work(miner, None), None
        if self.challenges.pending(hotkey):
            plan = self.epochs.plan(miner.stage)
            epoch = self.scheduler.epoch
            order = self.challenges.work(miner, epoch, plan, self.run.run_id, training, now)
            if order is not None:
                return order, None  # before any other work, while the miner still holds the step's state
        if not training:
            with self.state.transaction():
                return self.epochs.phase_work(miner, now), None
        if forward and self.abuse is not None and self.abuse.throttled(hotkey, now):
            # A miner that keeps breaking the protocol takes no new samples: only the backwards of graphs it
            # holds, so that no sample waits on it. Its forwards go to the stage's other miners.
            forward = False
        assignment = self.scheduler.next_work(hotkey, now, forward)
        current = self.state.miner(hotkey)
        assert current is not None
        miner = current
        plan = self.epochs.plan(miner.stage)
        if assignment.hop is None:
            # Which of its cached forwards still have a backward coming: a sample restarted elsewhere never will,
            # and a miner finishing its window must not wait for it.
            holding = (
                [] if forward else self.state.samples_waiting_on(hotkey, self.scheduler.policy.n_stages - 1)
            )
            wait = Work(
                kind="wait",
                run_id=self.run.run_id,
                epoch=self.scheduler.epoch,
                stage=miner.stage,
                plan=plan,
                wait_s=0.05,
                reason=assignment.wait_reason,
                holding=None if forward else holding,
            )
            return wait, assignment
        return self._work_for(assignment.hop, plan), assignment

    def _work_for(self, hop: Hop, plan: EpochPlan) -> Work:
        ttl = self.limits.url_ttl_s
        shape = [self.run.micro_batch, self.run.model.seq_len, self.run.model.wire_width]
        return Work(
            kind="forward" if hop.direction == FORWARD else "backward",
            run_id=self.run.run_id,
            epoch=hop.epoch,
            stage=hop.stage,
            plan=plan,
            hop_id=hop.id,
            sample_id=hop.sample_id,
            input_url=self.store.presign_get(hop.input_key, ttl) if hop.input_key else None,
            input_sha256=hop.input_sha,
            input_shape=shape if hop.input_key else None,
            output_url=(
                self.store.presign_put(hop.output_key, ttl, self.limits.activation_bytes, once=True)
                if hop.output_key
                else None
            ),
            output_size=self.limits.activation_bytes if hop.output_key else None,
            lease_expires=hop.lease_expires,
        )

    def report(self, hotkey: str, hop_id: int, report: Report) -> Ack:
        now = self.clock()
        try:
            self._record_report(hotkey, hop_id, report, now)
        except SchedulingError as refusal:
            if refusal.fault and not refusal.lease_stands:
                self.forfeit(hotkey, hop_id, refusal.detail)
            raise
        # What the miner asks for next may differ now (its window may be closed): a request it has held answers.
        self.scheduler.doorbell.answer_now(hotkey, stale_only=True)
        return Ack(detail=f"item {hop_id} recorded")

    def forfeit(self, hotkey: str, hop_id: int, why: str) -> None:
        """A report refused as its sender's fault (malformed, or contradicted by the store) gives the item back at
        once if the sender still holds it: left leased, its sample would wait out the lease for nothing."""
        now = self.clock()
        with self.scheduler.transaction():
            hop = self.state.hop(hop_id)
            if hop is not None and hop.miner == hotkey and hop.status == "leased":
                self.scheduler.release(hop, now, f"its report was refused: {why[:200]}")

    def _record_report(self, hotkey: str, hop_id: int, report: Report, now: float) -> None:
        if report.run_id != self.run.run_id:
            raise SchedulingError(
                409, f"report for run {report.run_id!r}, this orchestrator runs {self.run.run_id!r}"
            )
        if report.hop_id != hop_id:
            raise SchedulingError(
                400, f"report names item {report.hop_id} but was sent for item {hop_id}", fault=True
            )
        if (why := self.challenges.blocks(hotkey, report.epoch, report.inner_step)) is not None:
            raise SchedulingError(409, why)
        with self._charging_lapses(now), self.scheduler.transaction():
            hop = self.scheduler.leased_hop(hotkey, hop_id, report.epoch, now)
            if hop.input_sha is not None and report.input_sha256 != hop.input_sha:
                raise SchedulingError(
                    400,
                    f"input digest {report.input_sha256} is not the digest of the input you were given",
                    fault=True,
                )
            size, output_sha = self._check_output(hop, report, now)
            last = self.scheduler.policy.n_stages - 1
            loss = report.loss if hop.stage == last and hop.direction == FORWARD else None
            if hop.stage == last and hop.direction == FORWARD and loss is None:
                raise SchedulingError(400, "the tail must report the sample's loss", fault=True)
            if loss is not None and not math.isfinite(loss):  # JSON admits NaN; /status could not serve it
                raise SchedulingError(400, f"the loss must be a finite number, got {loss}", fault=True)
            tokens = self.run.micro_batch_tokens
            self.scheduler.complete(hop, output_sha, size, loss, tokens, now, report.inner_step)
            self.challenges.on_report(hotkey, hop.stage, hop.epoch, report.inner_step, report.sketch, now)
            if hop.direction == BACKWARD and hop.stage == 0:
                self.state.counters.bump("tokens_trained", tokens)

    def _check_output(self, hop: Hop, report: Report, now: float) -> tuple[int | None, str | None]:
        """The output object's size and sha256 as the store confirms them: it must exist with the exact size and
        match the reported sha256 (and MD5, if reported) as the store computed them."""
        if hop.output_key is None:
            return None, None
        if not report.output_sha256:
            raise SchedulingError(400, "report is missing output_sha256", fault=True)
        key = hop.output_key
        info = disputes.asking_store(lambda: self.store.confirm(key))
        if info is None:
            raise SchedulingError(
                400,
                f"output of item {hop.id} was not uploaded (nothing at its URL)",
                fault=True,
                lease_stands=True,
            )
        if info.size != self.limits.activation_bytes:
            self._contradicted(
                hop,
                now,
                f"output of item {hop.id} is {info.size} bytes, expected {self.limits.activation_bytes}",
            )
        if info.sha256 is None:
            # Not provably the miner's fault: the object was replaced since the upload, or the store cannot hash
            # it. The item goes back to the queue at once: left leased, its lapse would be a strike.
            self.scheduler.release(hop, now, "the store did not confirm its output's sha256")
            raise SchedulingError(
                400, f"the store does not confirm the sha256 of item {hop.id}'s output; requeued", keep=True
            )
        if info.sha256 != report.output_sha256:
            self._contradicted(hop, now, f"output of item {hop.id} does not match the reported sha256")
        if info.md5 and report.output_md5 and info.md5 != report.output_md5:
            self._contradicted(hop, now, f"output of item {hop.id} does not match the reported md5")
        self.state.counters.bump("bytes_transferred", 2 * info.size)  # uploaded once, downloaded once
        return info.size, info.sha256

    def _contradicted(self, hop: Hop, now: float, detail: str) -> NoReturn:
        """Refuse a report whose output, written once at its key, provably is not what it says: that miner will
        not deliver this item, so the item is requeued at once rather than left leased to it until the lease runs
        out (a forged digest held a run for a whole lease). Nothing uploaded is not such proof: the miner may
        still upload, or have leased the item again under a new key."""
        self.scheduler.release(hop, now, f"its report was refused: {detail}")
        raise SchedulingError(400, detail, keep=True, fault=True)

    def release(self, hotkey: str, hop_id: int, epoch: int, reason: ReleaseReason = "stopping") -> Ack:
        """Take back an item the caller leased. A bad input (`input_mismatch`, `input_undecodable`) is a claim
        against the miner that produced it, which iota.orchestrator.disputes checks."""
        now = self.clock()
        with self._charging_lapses(now), self.scheduler.transaction():
            hop = self.scheduler.leased_hop(hotkey, hop_id, epoch, now)
            if reason in ("input_mismatch", "input_undecodable"):
                detail = disputes.bad_input(self, hop, reason, now)
            else:
                why = "released by its miner" if reason == "stopping" else f"released by its miner ({reason})"
                self.scheduler.release(hop, now, why)
                detail = f"item {hop_id} released"
        self.scheduler.doorbell.answer_now(hotkey, stale_only=True)
        return Ack(detail=detail)

    def phase_report(self, hotkey: str, report: PhaseReport) -> Ack:
        now = self.clock()
        if report.run_id != self.run.run_id:
            raise SchedulingError(
                409, f"report for run {report.run_id!r}, this orchestrator runs {self.run.run_id!r}"
            )
        with self.state.transaction():
            miner = self.scheduler.live_miner(hotkey, now)
            if isinstance(report.result, SnapshotDone):
                return Ack(detail=self.challenges.answer(miner, report, report.result, now))
            if isinstance(report.result, SnapshotTaken):
                return Ack(detail=self.challenges.take(miner, report, report.result, now))
            self.epochs.report(miner, report, now)
        return Ack(detail=f"{report.result.kind} recorded")

    def operate(self, hotkey: str, action: str, target: str, value: str) -> Ack:
        """The operator's controls; each is logged with who did it."""
        now = self.clock()
        with self.state.transaction():
            if action in ("pause", "resume"):
                self.state.run.set_paused(action == "pause")
                self.scheduler.doorbell.ring_all()
            elif action == "close-epoch":
                self.scheduler.close_epoch(now)
            elif action in ("ban", "unban"):
                if self.state.miner(target) is None:
                    raise SchedulingError(404, f"no miner {target!r} in this run")
                self.state.set_banned(
                    target, (value or "banned by the operator") if action == "ban" else None
                )
                if action == "unban" and self.abuse is not None:
                    self.abuse.forgive(target)  # else its old strikes would ban it again at once
                if action == "ban":
                    self.scheduler.miner_gone(target, now, "banned")
            elif action == "set-flag":
                if not target:
                    raise SchedulingError(400, "set-flag needs target=NAME and value=VALUE")
                self.run.flags[target] = value
                self.state.run.set_flags(self.run.flags)
            else:
                raise SchedulingError(
                    404, f"unknown action {action!r}: pause, resume, close-epoch, ban, unban, set-flag"
                )
            self.state.log(now, f"operator_{action}", hotkey, target=target, value=value)
        logger.info("operator {}: {} {} {}", hotkey[:10], action, target, value)
        return Ack(detail=f"{action} done")

    def leave(self, hotkey: str) -> Ack:
        now = self.clock()
        with self.state.transaction():
            self.scheduler.live_miner(hotkey, now)
            self.scheduler.miner_gone(hotkey, now, "left (stopped by its operator)")
        logger.info("miner {} left; its open work was requeued", hotkey[:10])
        return Ack(detail="goodbye: your open work was requeued")

    def sweep(self, now: float) -> None:
        if now - self._last_sweep >= self.limits.sweep_interval_s:
            self._last_sweep = now
            with self._charging_lapses(now):
                self.scheduler.sweep(now)
            if self.auditor is not None:
                self.auditor.mirror_due()  # the score log goes to the bucket with each new checkpoint

    @contextmanager
    def _charging_lapses(self, now: float) -> Iterator[None]:
        """Around a call that may requeue lapsed leases: once its transaction is over (committed, or kept by
        a refusal), each lapse is a strike against the miner that let it lapse."""
        try:
            yield
        finally:
            for hotkey, why in self.scheduler.lapses.unpaid():
                if self.abuse is not None:
                    self.abuse.strike(hotkey, why, now)

    # -- views ------------------------------------------------------------------------------------------

    def status(self) -> Status:
        now = self.clock()
        self.sweep(now)
        depths = self.state.queue_depths()
        miners = self.state.miners()
        stages = []
        n_stages = self.scheduler.policy.n_stages
        staffed = {m.stage for m in miners if m.alive}
        for s in range(n_stages):
            stage_miners = [
                MinerStatus(
                    hotkey=m.hotkey,
                    uid=m.uid,
                    stage=m.stage,
                    alive=m.alive,
                    hops_done=m.hops_done,
                    last_seen=m.last_seen,
                    device=m.device,
                )
                for m in miners
                if m.stage == s
            ]
            stages.append(
                StageStatus(
                    index=s,
                    miners=stage_miners,
                    queued_forward=depths.get((s, FORWARD, "queued"), 0),
                    queued_backward=depths.get((s, BACKWARD, "queued"), 0),
                    leased=depths.get((s, FORWARD, "leased"), 0) + depths.get((s, BACKWARD, "leased"), 0),
                    paused="" if s in staffed else "no live miner on this stage: inflow paused",
                )
            )
        curve = self.loss_curve()
        return Status(
            run_id=self.run.run_id,
            epoch=self.scheduler.epoch,
            phase=self.scheduler.phase,
            paused=self.scheduler.paused,
            stages=stages,
            tokens_trained=self.state.counters.get("tokens_trained"),
            samples_completed=self.state.counters.get("samples_completed"),
            samples_in_flight=len(self.state.active_samples()),
            samples_requeued=self.state.counters.get("samples_requeued"),
            samples_lost=self.samples_lost(),
            latest_loss=curve[-1][1] if curve else None,
            loss_curve=curve,
            bytes_transferred=self.state.counters.get("bytes_transferred"),
            checkpoint=self.epochs.checkpoints.latest(),
        )

    def loss_curve(self) -> list[tuple[int, float]]:
        """(tokens trained when the sample completed, its loss), in completion order; past CURVE_POINTS points,
        runs of consecutive points are averaged so that /status stays small however long the run."""
        return thin_curve(self.state.loss_curve(), self.run.micro_batch_tokens, CURVE_POINTS)

    def samples_lost(self) -> int:
        """Allocated samples that are neither completed, dropped (restarted too often: counted, with an event)
        nor still in flight: must always be 0."""
        allocated = self.state.counters.get("cursor")
        done = self.state.counters.get("samples_completed")
        dropped = self.state.counters.get("samples_dropped")
        return allocated - done - dropped - len(self.state.active_samples())
