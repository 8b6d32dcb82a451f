"""Audits: which miner a validator replays next, the URLs it may read, its verdicts, and the score log.

The draw uses the operating system's randomness (a miner cannot predict it) and is weighted by the work a miner
claims this epoch, so claiming more means being watched more. Before it, pathway attribution
(iota.orchestrator.attribution.Screen) aims one audit at each miner whose samples lose more than its stage-mates',
once per epoch. A validator reads only the objects its task names.

Once an epoch's merge is done, every miner whose pseudo-gradient went into it is audited once more, before any
draw: that audit's window ends at the miner's last inner step where a snapshot (or a short epoch) allows, and it
checks the pseudo-gradient the miner uploaded and the partitions it merged as an owner (iota.audit.judge).
Any audit of an epoch whose uploads or merge reports are in carries them.

A failing verdict is not believed on one validator's word (iota.audit.scoring): it waits for confirmation.
The next validator other than the accuser to ask for work replays the same miner's same epoch; when no other
validator asks within `confirm_wait_s`, or the one that did passes what the accuser failed, the orchestrator
recomputes the audit itself (iota.orchestrator.recheck), and its verdict decides which side was wrong.
The score log is mirrored to the bucket with every checkpoint, so a run resumed from its bucket keeps every
miner's credit and every verdict.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Callable
from typing import Any

from loguru import logger

from iota.audit.compare import thresholds
from iota.audit.scoring import ORCHESTRATOR, confirmed_failures, standing
from iota.orchestrator.attribution import Screen
from iota.orchestrator.challenges import Challenges, audit_window, last_session
from iota.orchestrator.commitments import epoch_end
from iota.orchestrator.ledgers import AuditRecord, Claim, EndAuditQueue, ScoreArchive
from iota.orchestrator.scheduler import Scheduler, SchedulingError
from iota.orchestrator.state import StateStore
from iota.protocol import (
    Ack,
    AuditHop,
    AuditMerge,
    AuditPseudoGradient,
    AuditSnapshot,
    AuditTask,
    AuditVerdict,
    EpochPlan,
    RunInfo,
)
from iota.storage import keys
from iota.storage.base import ObjectStore, StoreError

# Hops one audit names: its window, from where it starts (iota.audit.replay.window); the replay stops at its
# calibrated depth long before this.
MAX_AUDIT_HOPS = 512
# Unanswered audits a validator may have open at once: an honest one works on one at a time, and the rest cover
# its restarts. Each draw writes a record and may take a claim to confirm, so drawing without answering is bounded.
MAX_OPEN_AUDITS = 4
# Share of the confirmations (a second validator failing what a first failed) the orchestrator recomputes anyway:
# a pair of validators that confirm false failures loses its standing after about STRIKES / SPOT_CHECK of them.
SPOT_CHECK = 0.25


class Auditor:
    def __init__(
        self,
        run: RunInfo,
        state: StateStore,
        scheduler: Scheduler,
        store: ObjectStore,
        plan: Callable[[int], EpochPlan],
        data_urls: Callable[[], dict[str, str]],
        url_ttl_s: int,
        clock: Callable[[], float] = time.time,
        confirm_wait_s: float = 30.0,
        challenges: Challenges | None = None,
        max_open: int = MAX_OPEN_AUDITS,
        spot_check: float = SPOT_CHECK,
    ):
        self.run, self.state, self.scheduler, self.store = run, state, scheduler, store
        self.plan, self.data_urls, self.url_ttl_s, self.clock = plan, data_urls, url_ttl_s, clock
        self.confirm_wait_s, self.challenges = confirm_wait_s, challenges
        self.random = secrets.SystemRandom()
        self.max_open, self.spot_check = max_open, spot_check
        # validator -> {audit id: issued} of its unanswered audits whose URLs live. Kept in memory, as a rate
        # limit's buckets are: a restart forgets them, so a validator may then open that many more.
        self._open: dict[str, dict[str, float]] = {}
        self.screen = Screen(state, len(run.stages))
        self._restore()

    # -- tasks --------------------------------------------------------------------------------------------

    def task(self, validator: str) -> AuditTask | None:
        """The next audit for this validator: a failing verdict of another validator to confirm, else an
        end-of-epoch audit of a merged epoch, else a draw; None when no miner has committed work this epoch."""
        lost = standing(self.state.verdicts())
        if validator in lost:
            raise SchedulingError(
                403,
                f"you lost your standing: the orchestrator's recomputation proved {lost[validator]} of your "
                "verdicts wrong",
            )
        now = self.clock()
        self._check_open(validator, now)
        with self.state.transaction():
            for audit_id, claim in sorted(self.state.audits.claims().items(), key=lambda item: item[1].at):
                taken = claim.assigned_at > now - self.confirm_wait_s
                if self.challenges is not None and self.challenges.lapsed(claim):
                    self.state.audits.drop_claim(audit_id)  # its window cannot be rebuilt
                    continue
                if claim.accuser != validator and claim.recompute_for is None and not taken:
                    self.state.audits.put_claim(audit_id, claim.model_copy(update={"assigned_at": now}))
                    return self._issue(
                        validator,
                        claim.miner,
                        claim.epoch,
                        claim.stage,
                        claim.plan,
                        claim.bf16,
                        audit_id,
                        claim.start_step,
                    )
            ended = self._next_end_audit()
        if ended is not None:
            epoch, hotkey, stage = ended
            audited = self.state.miner(hotkey)
            assert audited is not None  # the queue skips miners the state does not know
            bf16 = audited.device == "cuda"
            start = self._final_window(hotkey, epoch, thresholds(bf16).depth)
            return self._issue(
                validator, hotkey, epoch, stage, self._epoch_plan(epoch, stage), bf16, None, start
            )
        epoch = self.scheduler.epoch
        work = self.state.work.by_miner(epoch)
        if not work or self.state.epochs.checkpoint_shas(epoch) is None:
            return None
        chosen = (
            self.screen.next(epoch, now)
            or self.random.choices([miner for miner, _ in work], weights=[hops for _, hops in work])[0]
        )
        miner = self.state.miner(chosen)
        assert miner is not None
        return self._issue(
            validator, chosen, epoch, miner.stage, self.plan(miner.stage), miner.device == "cuda", None, None
        )

    def _check_open(self, validator: str, now: float) -> None:
        """Refuse a draw to a validator with ``max_open`` audits open; an audit closes when answered or when its URLs
        expire (its record is then the retention's to forget, iota.orchestrator.retention)."""
        issued = {
            audit_id: at
            for audit_id, at in self._open.get(validator, {}).items()
            if now < at + self.url_ttl_s
        }
        self._open[validator] = issued
        if len(issued) >= self.max_open:
            wait_s = min(issued.values()) + self.url_ttl_s - now
            raise SchedulingError(
                429,
                f"{len(issued)} audits issued to you are unanswered: answer one, or draw again when the oldest "
                f"expires in {wait_s:.0f} s",
            )

    def _next_end_audit(self) -> tuple[int, str, int] | None:
        """The next (epoch, miner, stage) of the end-of-epoch audits: one per submitter of each merged epoch,
        queued when its merge is done (the checkpoint after it is published). Call it inside a transaction."""
        queue = self.state.audits.end_audits()
        checkpoint = self.state.run.checkpoint
        merged = checkpoint.epoch - 1 if checkpoint is not None else -1
        through = queue.through
        pending = list(queue.pending)
        for epoch in range(through + 1, merged + 1):
            for stage in range(len(self.run.stages)):
                plan = self.state.merges.plan(epoch, stage)
                if plan is not None:
                    pending += [(epoch, sub.hotkey, stage) for sub in plan.submitters]
        while pending and self.state.miner(pending[0][1]) is None:
            pending.pop(0)
        chosen = pending.pop(0) if pending else None
        if chosen is not None or merged > through:
            self.state.audits.set_end_audits(EndAuditQueue(through=max(through, merged), pending=pending))
        return chosen

    def _final_window(self, hotkey: str, epoch: int, depth: int) -> int | None:
        """Where a replay of `depth` steps that ends at the miner's last step starts: its earliest snapshot that
        close to the end, or the checkpoint when the epoch is that short; None (drawn) when none reaches."""
        final = self.state.steps.last(epoch, hotkey)
        snapshots = self.challenges.snapshots(hotkey, epoch) if self.challenges is not None else {}
        reaching = [step for step in snapshots if final - depth <= step <= final]
        if reaching:
            return min(reaching)
        return 0 if final <= depth else None

    def _epoch_plan(self, epoch: int, stage: int) -> EpochPlan:
        """The plan a stage trained `epoch` under (the current epoch's is frozen at its first request)."""
        if epoch == self.scheduler.epoch:
            return self.plan(stage)
        return EpochPlan(
            epoch=epoch,
            tokens_at_start=self.state.epochs.tokens_at_start(epoch),
            replicas=self.state.epochs.replicas(epoch, stage) or 1,
        )

    def _issue(
        self,
        validator: str,
        hotkey: str,
        epoch: int,
        stage: int,
        plan: EpochPlan,
        bf16: bool,
        confirms: str | None,
        start_step: int | None,
    ) -> AuditTask:
        """An audit of `hotkey`'s epoch at `stage` whose replay starts at `start_step` (None: drawn here, among the
        checkpoint and the miner's answered snapshot challenges), with what it committed at the epoch's end."""
        shas = self.state.epochs.checkpoint_shas(epoch)
        assert shas is not None
        depth = thresholds(bf16).depth
        start, snapshots = 0, list[AuditSnapshot]()
        if self.challenges is not None:
            start, snapshots = self.challenges.for_audit(hotkey, epoch, depth, start_step)
        audit_id = uuid.uuid4().hex
        record = AuditRecord(
            validator=validator,
            miner=hotkey,
            epoch=epoch,
            stage=stage,
            issued=self.clock(),
            plan=plan,
            bf16=bf16,
            confirms=confirms,
            start_step=start,
        )
        with self.state.transaction():
            self.state.audits.record(audit_id, record)
        self._open.setdefault(validator, {})[audit_id] = record.issued
        ttl = self.url_ttl_s
        hops = [
            AuditHop(
                direction=direction,
                sample_id=int(sample),
                inner_step=int(step or 0),
                input_url=self.store.presign_get(in_key, ttl) if in_key else None,
                input_sha256=in_sha,
                output_url=self.store.presign_get(out_key, ttl) if out_key else None,
                output_sha256=out_sha,
                loss=loss,
                session=session,
            )
            for session, (_, direction, sample, step, in_key, in_sha, out_key, out_sha, loss) in audit_window(
                self.state, hotkey, epoch, start, depth, MAX_AUDIT_HOPS
            )
        ]
        end = epoch_end(self.state, hotkey, epoch, stage)
        pseudo_gradient = None
        if end.upload_key is not None:
            pseudo_gradient = AuditPseudoGradient(
                url=self.store.presign_get(end.upload_key, ttl),
                sha256=end.upload_sha,
                step=end.final_step,
                sketch=end.final_sketch,
                session=last_session(self.state, hotkey, epoch),
            )
        merge = None
        if end.plan is not None and end.digests:
            merge = AuditMerge(
                plan=end.plan.model_dump(mode="json"),
                digests=end.digests,
                urls={key: self.store.presign_get(key, ttl) for key in end.merge_reads(hotkey)},
                upload_shas=end.upload_shas,
            )
        return AuditTask(
            audit_id=audit_id,
            run_id=self.run.run_id,
            miner=hotkey,
            stage=stage,
            epoch=epoch,
            bf16=bf16,
            checkpoint_url=self.store.presign_get(keys.checkpoint_stage(self.run.run_id, epoch, stage), ttl),
            checkpoint_sha256=shas[stage],
            plan=plan,
            hops=hops,
            data_urls=self.data_urls(),
            start_step=start,
            snapshots=snapshots,
            pseudo_gradient=pseudo_gradient,
            merge=merge,
        )

    # -- verdicts -----------------------------------------------------------------------------------------

    def verdict(self, validator: str, verdict: AuditVerdict) -> Ack:
        now = self.clock()
        with self.state.transaction():
            issued = self.state.audits.get(verdict.audit_id)
            if issued is None or issued.validator != validator:
                raise SchedulingError(404, f"no audit {verdict.audit_id} was issued to you")
            if issued.answered:
                raise SchedulingError(409, f"audit {verdict.audit_id} was already answered")
            if (issued.miner, issued.epoch, issued.stage) != (
                verdict.miner,
                verdict.epoch,
                verdict.stage,
            ):
                raise SchedulingError(400, "the verdict names another miner, epoch or stage than its audit")
            self.state.audits.record(verdict.audit_id, issued.model_copy(update={"answered": now}))
            self._record(now, validator, verdict, issued)
        self._open.get(validator, {}).pop(verdict.audit_id, None)
        return Ack(detail="verdict recorded")

    def _record(self, now: float, source: str, verdict: AuditVerdict, issued: AuditRecord) -> None:
        """Append a verdict to the log; a failing one waits for confirmation, a confirmation settles its claim, and a
        contrary one (a pass) leaves it to the orchestrator's recomputation."""
        confirms = issued.confirms
        self.state.add_verdict(
            now,
            source,
            verdict.miner,
            verdict.epoch,
            verdict.stage,
            verdict.passed,
            verdict.hops_replayed,
            verdict.depth,
            {
                "reason": verdict.reason,
                "errors": verdict.errors,
                "audit_id": verdict.audit_id,
                "confirms": confirms,
            },
        )
        if confirms is not None:
            claim = self.state.audits.claims().get(confirms)
            # One replay against another settles nothing: the orchestrator's recomputation decides (recheck). And a
            # share of confirmations is recomputed too, so that two validators agreeing on a false failure are
            # found out in time (iota.audit.scoring: what the recomputation passes stops counting).
            checked = verdict.passed or self.random.random() < self.spot_check
            if claim is not None and source != ORCHESTRATOR and checked:
                self.state.audits.put_claim(confirms, claim.model_copy(update={"recompute_for": source}))
            else:
                self.state.audits.drop_claim(confirms)
        elif not verdict.passed and (verdict.miner, verdict.epoch) not in self._confirmed():
            claim = Claim(
                miner=verdict.miner,
                epoch=verdict.epoch,
                stage=verdict.stage,
                accuser=source,
                at=now,
                plan=issued.plan,
                bf16=issued.bf16,
                start_step=issued.start_step,
            )
            self.state.audits.put_claim(verdict.audit_id, claim)
        self.state.counters.bump("audits_passed" if verdict.passed else "audits_failed")
        outcome = "confirmed" if confirms and not verdict.passed else "passed" if verdict.passed else "failed"
        self.state.log(
            now,
            "audit",
            verdict.miner,
            validator=source,
            passed=verdict.passed,
            epoch=verdict.epoch,
            reason=verdict.reason,
            confirms=confirms,
        )
        if not verdict.passed:
            logger.warning(
                "audit of {} {} by {}: {}", verdict.miner[:10], outcome, source[:12], verdict.reason
            )
        elif confirms and source == ORCHESTRATOR:
            logger.warning("{} refuted by the orchestrator's recomputation", confirms)
        elif confirms:
            logger.warning("{} disputed by {}: the orchestrator recomputes it", confirms, source[:12])

    def unconfirmed(self, now: float) -> list[tuple[str, Claim]]:
        """The orchestrator's to recompute: failing verdicts another validator disputed or a spot check picked
        (first), and those no other validator took up within `confirm_wait_s`. Any other claim on a miner's epoch
        whose failure is confirmed meanwhile is dropped: it can neither confirm more nor be refuted
        (iota.audit.scoring). A disputed or spot-checked one is still decided, for the strike it owes."""
        due = now - self.confirm_wait_s
        claims = self.state.audits.claims()
        confirmed = self._confirmed()
        moot = [
            audit_id
            for audit_id, claim in claims.items()
            if claim.recompute_for is None and (claim.miner, claim.epoch) in confirmed
        ]
        if moot:
            with self.state.transaction():
                for audit_id in moot:
                    self.state.audits.drop_claim(audit_id)
        return sorted(
            (
                (audit_id, claim)
                for audit_id, claim in claims.items()
                if audit_id not in moot
                and (claim.recompute_for is not None or (claim.at <= due and claim.assigned_at <= due))
            ),
            key=lambda item: (item[1].recompute_for is None, item[1].at),
        )

    def _confirmed(self) -> set[tuple[str, int]]:
        return confirmed_failures(self.state.verdicts())

    def record_recomputation(self, audit_id: str, claim: Claim, verdict: AuditVerdict) -> None:
        """The orchestrator's own verdict on a claim it recomputed."""
        now = self.clock()
        with self.state.transaction():
            if audit_id in self.state.audits.claims():  # a validator may have settled it meanwhile
                recheck = AuditRecord(
                    validator=ORCHESTRATOR,
                    miner=claim.miner,
                    epoch=claim.epoch,
                    stage=claim.stage,
                    issued=now,
                    plan=claim.plan,
                    bf16=claim.bf16,
                    confirms=audit_id,
                    start_step=claim.start_step,
                )
                self._record(now, ORCHESTRATOR, verdict, recheck)

    # -- the score log ------------------------------------------------------------------------------------

    def score_log(self) -> dict[str, Any]:
        """Everything the weights follow from: per-epoch work per miner, stage sizes, and every verdict; what a
        resumed run carried over from its bucket comes first."""
        archive = self.state.audits.score_archive() or ScoreArchive(work={}, verdicts=[])
        work: dict[str, list[dict[str, Any]]] = {}
        for epoch, miner, stage, hops in self.state.work.credited():
            # Less what a session that left a challenge unanswered forfeited (iota.orchestrator.challenges).
            earned = max(0, hops - self.state.snapshots.forfeited(epoch, miner))
            work.setdefault(str(epoch), []).append({"miner": miner, "stage": stage, "hops": earned})
        uids = {m.hotkey: m.uid for m in self.state.miners()}
        return {
            "run_id": self.run.run_id,
            "epoch": self.scheduler.epoch,
            "stage_params": [s.n_params for s in self.run.stages],
            "work": {**archive.work, **work},
            "verdicts": archive.verdicts + self.state.verdicts(),
            "uids": {**archive.uids, **uids},
        }

    def mirror_due(self) -> None:
        """Mirror the score log once per checkpoint after the first (cheap to call on every sweep): the log kept
        with checkpoint e holds every epoch before e, which is what a run resumed from checkpoint e keeps."""
        checkpoint = self.state.run.checkpoint
        if checkpoint is not None and self.state.audits.scores_mirrored() < checkpoint.epoch:
            self.mirror(checkpoint.epoch)

    def mirror(self, epoch: int) -> None:
        """Write the score log as it stands to the bucket under `epoch`; a store failure is retried later."""
        try:
            self.store.put(keys.scores(self.run.run_id, epoch), json.dumps(self.score_log()).encode())
        except StoreError as error:
            logger.warning("score log not mirrored to the bucket yet: {}", error)
            return
        self.state.audits.set_scores_mirrored(epoch)

    def _restore(self) -> None:
        """A fresh state store over a run resumed from its bucket starts from the newest mirrored score log."""
        checkpoint = self.state.run.checkpoint
        if checkpoint is None or self.state.audits.score_archive() is not None or self.state.verdicts():
            return
        found = [
            keys.parse_scores_epoch(k, self.run.run_id)
            for k in self.store.list(keys.scores_prefix(self.run.run_id))
        ]
        usable = [e for e in found if e is not None and e <= checkpoint.epoch]
        if not usable:
            return
        epoch = max(usable)
        log = json.loads(self.store.get(keys.scores(self.run.run_id, epoch)))
        with self.state.transaction():
            archive = ScoreArchive(work=log["work"], verdicts=log["verdicts"], uids=log["uids"])
            self.state.audits.set_score_archive(archive)
            self.state.audits.set_scores_mirrored(epoch)
        logger.info("score log restored from the bucket's copy of epoch {}", epoch)
