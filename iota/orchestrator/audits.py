"""Audits: which miner a validator replays next, the URLs it may read, its verdicts, and the score log.

The draw uses the operating system's randomness (a miner cannot predict it) and is weighted by the work a miner
claims this epoch, so claiming more means being watched more. A validator reads only the objects its task names.

Once an epoch's merge is done, every miner whose pseudo-gradient went into it is audited once more, before any
draw: that audit's window ends at the miner's last inner step where a snapshot (or a short epoch) allows, and it
checks the pseudo-gradient the miner uploaded and the partitions it merged as an owner (iota.audit.judge).
Any audit of an epoch whose uploads or merge reports are in carries them.

A failing verdict is not believed on one validator's word (iota.audit.scoring): it waits for confirmation.
The next validator other than the accuser to ask for work replays the same miner's same epoch; when no other
validator asks within `confirm_wait_s`, the orchestrator recomputes the audit itself (iota.orchestrator.recheck).
The score log is mirrored to the bucket with every checkpoint, so a run resumed from its bucket keeps every
miner's credit and every verdict.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from iota.audit.compare import thresholds
from iota.audit.scoring import ORCHESTRATOR, standing
from iota.merge import MergePlan
from iota.orchestrator.challenges import Challenges
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
    WeightSketch,
)
from iota.storage import keys
from iota.storage.base import ObjectStore, StoreError

MAX_AUDIT_HOPS = 512  # the replay stops at its calibrated depth long before this
CONFIRMATIONS = "confirmations"  # kv: audit id of a failing verdict -> what confirming it needs
# kv: end-of-epoch audits still to serve, {"through": last merged epoch queued, "pending": [[epoch, hotkey, stage]]}
END_AUDITS = "end_audits"


@dataclass(frozen=True)
class EpochEnd:
    """What a miner committed at the end of an epoch, as the orchestrator's state holds it (keys, not URLs): its
    upload and the last step it committed before it; the stage's merge plan and the partitions it reported
    merging. What a validator is sent URLs for, and what the orchestrator's recomputation reads from its store."""

    upload_key: str | None = None
    upload_sha: str | None = None
    final_step: int = 0
    final_sketch: WeightSketch | None = None
    plan: dict[str, Any] | None = None
    # partition -> the digest the miner reported for it (partitions it owns only)
    digests: dict[int, str] = field(default_factory=dict)
    # every upload of the plan -> the sha256 its submitter reported
    upload_shas: dict[str, str] = field(default_factory=dict)

    def merge_reads(self, owner: str) -> list[str]:
        """Every object a recomputation of the owner's reported partitions reads."""
        if self.plan is None or not self.digests:
            return []
        plan = MergePlan.model_validate(self.plan)
        reads = {s.upload_key for s in plan.submitters}
        for index in self.digests:
            partition = plan.partitions[index]
            reads.add(partition.prev_weights.key)
            if partition.prev_momentum is not None:
                reads.add(partition.prev_momentum.key)
            reads |= {plan.output_key(index, owner, kind) for kind in ("weights", "momentum")}
        return sorted(reads)


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
    ):
        self.run, self.state, self.scheduler, self.store = run, state, scheduler, store
        self.plan, self.data_urls, self.url_ttl_s, self.clock = plan, data_urls, url_ttl_s, clock
        self.confirm_wait_s, self.challenges = confirm_wait_s, challenges
        self.random = secrets.SystemRandom()
        self._restore()

    # -- tasks --------------------------------------------------------------------------------------------

    def task(self, validator: str) -> AuditTask | None:
        """The next audit for this validator: a failing verdict of another validator to confirm, else an
        end-of-epoch audit of a merged epoch, else a draw; None when no miner has committed work this epoch."""
        lost = standing(self.state.verdicts())
        if validator in lost:
            raise SchedulingError(
                403, f"you lost your standing: {lost[validator]} of your failing verdicts were refuted"
            )
        now = self.clock()
        with self.state.transaction():
            pending = self.state.get(CONFIRMATIONS, {})
            for audit_id, claim in sorted(pending.items(), key=lambda item: item[1]["at"]):
                taken = claim.get("assigned_at", 0.0) > now - self.confirm_wait_s
                if claim["accuser"] != validator and not taken:
                    pending[audit_id] = {**claim, "assigned_at": now}
                    self.state.put(CONFIRMATIONS, pending)
                    plan = EpochPlan.model_validate(claim["plan"])
                    return self._issue(
                        validator,
                        claim["miner"],
                        claim["epoch"],
                        int(claim["stage"]),
                        plan,
                        claim["bf16"],
                        audit_id,
                        claim.get("start_step", 0),
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
        rows = self.state.db.execute(
            "SELECT miner, COUNT(*) FROM hops WHERE epoch = ? AND status = 'done' GROUP BY miner ORDER BY miner",
            (epoch,),
        )
        if not rows or self.state.get(f"checkpoint_shas/{epoch}") is None:
            return None
        chosen = self.random.choices([str(r[0]) for r in rows], weights=[int(r[1]) for r in rows])[0]
        miner = self.state.miner(chosen)
        assert miner is not None
        return self._issue(
            validator, chosen, epoch, miner.stage, self.plan(miner.stage), miner.device == "cuda", None, None
        )

    def _next_end_audit(self) -> tuple[int, str, int] | None:
        """The next (epoch, miner, stage) of the end-of-epoch audits: one per submitter of each merged epoch,
        queued when its merge is done (the checkpoint after it is published). Call it inside a transaction."""
        queue = self.state.get(END_AUDITS) or {"through": -1, "pending": []}
        checkpoint = self.state.get("checkpoint")
        merged = int(checkpoint["epoch"]) - 1 if checkpoint is not None else -1
        through = int(queue["through"])
        pending = [(int(e), str(h), int(s)) for e, h, s in queue["pending"]]
        for epoch in range(through + 1, merged + 1):
            for stage in range(len(self.run.stages)):
                plan = self.state.get(f"plan/{epoch}/{stage}")
                if plan is not None:
                    pending += [(epoch, str(sub["hotkey"]), stage) for sub in plan["submitters"]]
        while pending and self.state.miner(pending[0][1]) is None:
            pending.pop(0)
        chosen = pending.pop(0) if pending else None
        if chosen is not None or merged > through:
            self.state.put(END_AUDITS, {"through": max(through, merged), "pending": pending})
        return chosen

    def _final_window(self, hotkey: str, epoch: int, depth: int) -> int | None:
        """Where a replay of `depth` steps that ends at the miner's last step starts: its earliest snapshot that
        close to the end, or the checkpoint when the epoch is that short; None (drawn) when none reaches."""
        final = int(self.state.get(f"step/{epoch}/{hotkey}", 0))
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
            tokens_at_start=int(self.state.get(f"tokens_at_start/{epoch}", 0)),
            replicas=int(self.state.get(f"replicas/{epoch}/{stage}", 1)),
        )

    def epoch_end(self, hotkey: str, epoch: int, stage: int) -> EpochEnd:
        """What `hotkey` committed at the end of `epoch` so far (empty while the epoch is training), from the
        records the epoch driver (upload/, plan/, merged/) and the challenges (step/, sketch/) keep."""
        upload = self.state.get(f"upload/{epoch}/{stage}/{hotkey}")
        final = int(self.state.get(f"step/{epoch}/{hotkey}", 0))  # the last step whose report was accepted
        sketch = self.state.get(f"sketch/{epoch}/{hotkey}/{final}") if final else None
        plan = self.state.get(f"plan/{epoch}/{stage}")
        digests: dict[int, str] = {}
        shas: dict[str, str] = {}
        if plan is not None:
            owned = set(MergePlan.model_validate(plan).partitions_of(hotkey))
            reported = self.state.get(f"merged/{epoch}/{stage}/{hotkey}")
            # The report is the miner's JSON: only well-formed digests of partitions it owns are claims.
            for index, claim in reported.items() if isinstance(reported, dict) else []:
                digest = claim.get("digest") if isinstance(claim, dict) else None
                if str(index).isdigit() and int(index) in owned and isinstance(digest, str) and digest:
                    digests[int(index)] = digest
            for submitter in plan["submitters"]:
                up = self.state.get(f"upload/{epoch}/{stage}/{submitter['hotkey']}")
                if up is not None and up.get("sha"):
                    shas[str(up["key"])] = str(up["sha"])
        return EpochEnd(
            upload_key=None if upload is None else str(upload["key"]),
            upload_sha=None if upload is None else upload.get("sha"),
            final_step=final,
            final_sketch=None if sketch is None else WeightSketch.model_validate(sketch),
            plan=plan,
            digests=digests,
            upload_shas=shas,
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
        shas = self.state.get(f"checkpoint_shas/{epoch}")
        assert shas is not None
        depth = thresholds(bf16).depth
        start, snapshots = 0, list[AuditSnapshot]()
        if self.challenges is not None:
            start, snapshots = self.challenges.for_audit(hotkey, epoch, depth, start_step)
        audit_id = uuid.uuid4().hex
        record = {
            "validator": validator,
            "miner": hotkey,
            "epoch": epoch,
            "stage": stage,
            "issued": self.clock(),
            "plan": plan.model_dump(mode="json"),
            "bf16": bf16,
            "confirms": confirms,
            "start_step": start,
        }
        with self.state.transaction():
            self.state.put(f"audit/{audit_id}", record)
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
            )
            for _, direction, sample, step, in_key, in_sha, out_key, out_sha, loss in self.state.done_hops(
                hotkey, epoch, MAX_AUDIT_HOPS
            )
        ]
        end = self.epoch_end(hotkey, epoch, stage)
        pseudo_gradient = None
        if end.upload_key is not None:
            pseudo_gradient = AuditPseudoGradient(
                url=self.store.presign_get(end.upload_key, ttl),
                sha256=end.upload_sha,
                step=end.final_step,
                sketch=end.final_sketch,
            )
        merge = None
        if end.plan is not None and end.digests:
            merge = AuditMerge(
                plan=end.plan,
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
            checkpoint_sha256=str(shas[stage]),
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
            issued = self.state.get(f"audit/{verdict.audit_id}")
            if issued is None or issued["validator"] != validator:
                raise SchedulingError(404, f"no audit {verdict.audit_id} was issued to you")
            if issued.get("answered"):
                raise SchedulingError(409, f"audit {verdict.audit_id} was already answered")
            if (issued["miner"], issued["epoch"], issued["stage"]) != (
                verdict.miner,
                verdict.epoch,
                verdict.stage,
            ):
                raise SchedulingError(400, "the verdict names another miner, epoch or stage than its audit")
            self.state.put(f"audit/{verdict.audit_id}", {**issued, "answered": now})
            self._record(now, validator, verdict, issued)
        return Ack(detail="verdict recorded")

    def _record(self, now: float, source: str, verdict: AuditVerdict, issued: dict[str, Any]) -> None:
        """Append a verdict to the log; a failing one waits for confirmation, a confirmation settles its claim."""
        confirms = issued.get("confirms")
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
        pending = self.state.get(CONFIRMATIONS, {})
        if confirms is not None:
            pending.pop(confirms, None)
        elif not verdict.passed:
            pending[verdict.audit_id] = {
                "miner": verdict.miner,
                "epoch": verdict.epoch,
                "stage": verdict.stage,
                "accuser": source,
                "at": now,
                "plan": issued["plan"],
                "bf16": issued["bf16"],
                "start_step": issued.get("start_step", 0),
            }
        self.state.put(CONFIRMATIONS, pending)
        self.state.bump("audits_passed" if verdict.passed else "audits_failed")
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
        elif confirms:
            logger.warning("{} refuted by {}'s recomputation", confirms, source[:12])

    def unconfirmed(self, now: float) -> list[tuple[str, dict[str, Any]]]:
        """Failing verdicts no other validator took up within `confirm_wait_s`: the orchestrator's to recompute."""
        pending = self.state.get(CONFIRMATIONS, {})
        due = now - self.confirm_wait_s
        return [
            (audit_id, claim)
            for audit_id, claim in sorted(pending.items(), key=lambda item: item[1]["at"])
            if claim["at"] <= due and claim.get("assigned_at", 0.0) <= due
        ]

    def record_recomputation(self, audit_id: str, claim: dict[str, Any], verdict: AuditVerdict) -> None:
        """The orchestrator's own verdict on a claim it recomputed."""
        now = self.clock()
        with self.state.transaction():
            if audit_id in self.state.get(CONFIRMATIONS, {}):  # a validator may have settled it meanwhile
                self._record(now, ORCHESTRATOR, verdict, {**claim, "confirms": audit_id})

    # -- the score log ------------------------------------------------------------------------------------

    def score_log(self) -> dict[str, Any]:
        """Everything the weights follow from: per-epoch work per miner, stage sizes, and every verdict; what a
        resumed run carried over from its bucket comes first."""
        archive = self.state.get("score_archive") or {"work": {}, "verdicts": []}
        rows = self.state.db.execute(
            "SELECT epoch, miner, stage, COUNT(*) FROM hops WHERE status = 'done' GROUP BY epoch, miner, stage "
            "ORDER BY epoch, miner, stage"
        )
        work: dict[str, list[dict[str, Any]]] = {}
        for epoch, miner, stage, hops in rows:
            work.setdefault(str(epoch), []).append({"miner": miner, "stage": int(stage), "hops": int(hops)})
        uids = {m.hotkey: m.uid for m in self.state.miners()}
        return {
            "run_id": self.run.run_id,
            "epoch": self.scheduler.epoch,
            "stage_params": [s.n_params for s in self.run.stages],
            "work": {**archive["work"], **work},
            "verdicts": archive["verdicts"] + self.state.verdicts(),
            "uids": {**archive.get("uids", {}), **uids},
        }

    def mirror_due(self) -> None:
        """Mirror the score log once per checkpoint after the first (cheap to call on every sweep): the log kept
        with checkpoint e holds every epoch before e, which is what a run resumed from checkpoint e keeps."""
        checkpoint = self.state.get("checkpoint")
        if checkpoint is not None and self.state.get("scores_mirrored", 0) < int(checkpoint["epoch"]):
            self.mirror(int(checkpoint["epoch"]))

    def mirror(self, epoch: int) -> None:
        """Write the score log as it stands to the bucket under `epoch`; a store failure is retried later."""
        try:
            self.store.put(keys.scores(self.run.run_id, epoch), json.dumps(self.score_log()).encode())
        except StoreError as error:
            logger.warning("score log not mirrored to the bucket yet: {}", error)
            return
        self.state.put("scores_mirrored", epoch)

    def _restore(self) -> None:
        """A fresh state store over a run resumed from its bucket starts from the newest mirrored score log."""
        checkpoint = self.state.get("checkpoint")
        if checkpoint is None or self.state.get("score_archive") is not None or self.state.verdicts():
            return
        found = [
            keys.parse_scores_epoch(k, self.run.run_id)
            for k in self.store.list(keys.scores_prefix(self.run.run_id))
        ]
        usable = [e for e in found if e is not None and e <= int(checkpoint["epoch"])]
        if not usable:
            return
        epoch = max(usable)
        log = json.loads(self.store.get(keys.scores(self.run.run_id, epoch)))
        with self.state.transaction():
            self.state.put("score_archive", {k: log[k] for k in ("work", "verdicts", "uids")})
            self.state.put("scores_mirrored", epoch)
        logger.info("score log restored from the bucket's copy of epoch {}", epoch)
