"""The end of an epoch: UPLOAD pseudo-gradients, MERGE partitions (two owners each, compared), APPLY the result.

The orchestrator never trains: it only plans the merge, has it settled (iota.orchestrator.referee: digests compared,
a partition whose owners disagree or vanished recomputed, the merge is cheap and deterministic), and publishes the
next checkpoint from the accepted slices (iota.orchestrator.checkpoints).

The phases wait only for those who owe something: UPLOAD for the miners that completed a hop this epoch (only
they have a pseudo-gradient), MERGE for the owners of its partitions, APPLY for those miners. A miner that did no
work holds up nothing: whenever it asks, it is handed the latest checkpoint first if it holds older weights (it
missed an APPLY, or took it after the phase ended), and no hop until it reports them loaded, so every hop of an
epoch is computed from that epoch's checkpoint.

The merge also waits for every failing verdict on a submitter's epoch that is not yet confirmed or refuted
(iota.orchestrator.audits: another validator's replay, or the orchestrator's recomputation within
`confirm_wait_s`), so that a failure found during the epoch keeps the cheater's pseudo-gradient out of the merge.

Each wait is as long as an honest miner needs, not as long as the phase may last: a miner owing an upload or an
apply must take it within `answer_grace_s` of the phase's start (honest miners hold a request open for their next
item, so they take it at once), and holds it for `answer_grace_s` plus the stage's size over
`min_upload_bytes_per_s` (within the phase's deadline plus that size-time). A lease that lapses with its work
unreported is a strike against the miner (iota.orchestrator.abuse), which is then waited for no longer; one that
never took its work is waited for no longer either. A miner with a few strikes in the abuse policy's window (it
broke the protocol, as by sending outputs the store confirmed bad or malformed reports: AbuseConfig.waited_until)
is not waited for at all: one hostile worker costs a phase at most one grace, and only before its first strikes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loguru import logger

from iota.audit.scoring import confirmed_failures
from iota.checkpoint.manifest import n_params, stage_tensor_lists
from iota.merge import (
    FlatRef,
    MergePlan,
    OuterConfig,
    Submitter,
    check_claimed_norms,
    make_plan,
    partition_bounds,
)
from iota.model.config import ModelConfig
from iota.model.flat import encode_f32
from iota.model.stages import StageSpec
from iota.orchestrator import referee
from iota.orchestrator.checkpoints import Checkpoints
from iota.orchestrator.ledgers import UploadRecord
from iota.orchestrator.ledgers.epoch_end import Leases
from iota.orchestrator.scheduler import APPLY, DONE, MERGE, TRAIN, UPLOAD, Scheduler, SchedulingError
from iota.orchestrator.state import MinerRecord, StateStore
from iota.protocol import ApplyDone, EpochPlan, MergeDone, MergeOrder, PhaseReport, UploadDone, Work
from iota.storage import keys
from iota.storage.base import ObjectStore


@dataclass(frozen=True)
class EpochSettings:
    partitions: int
    outer: OuterConfig
    seed: int
    url_ttl_s: int
    phase_timeout_s: float  # an end-of-epoch phase moves on without miners that have not answered by then
    min_upload_bytes_per_s: float  # a granted upload gets this much extra time for its size (soft deadline)
    answer_grace_s: float = 30.0  # to take an owed upload or apply, and to report it beyond its size-time
    merge_clip: float = 0.0  # global L2 norm C each pseudo-gradient is clipped to at the merge; 0: off


class EpochDriver:
    """Moves the run through the end of each epoch, from the requests and reports of its miners."""

    def __init__(
        self,
        run_id: str,
        model: ModelConfig,
        stages: list[StageSpec],
        state: StateStore,
        scheduler: Scheduler,
        store: ObjectStore,
        settings: EpochSettings,
        manifest_extra: Callable[[], dict[str, Any]],
        micro_batch_tokens: int,
    ):
        self.run_id, self.model, self.stages = run_id, model, stages
        self.state, self.scheduler, self.store, self.settings = state, scheduler, store, settings
        self.micro_batch_tokens = micro_batch_tokens
        # Strikes against a miner whose upload or apply lease lapsed: the abuse policy's, set by the assembly.
        self.strike: Callable[[str, str, float], object] | None = None
        # Whether a miner is on the abuse policy's slow lane (distrusted: not waited for): set by the assembly.
        self.distrusted: Callable[[str, float], bool] = lambda hotkey, now: False
        self._workers: tuple[int, frozenset[str]] | None = None  # (epoch, who completed a hop in it)
        self._merge_held = -1  # the last epoch whose merge was held for unsettled verdicts (logged once)
        self.tensors = stage_tensor_lists(model, stages)
        self.n_params = [n_params(t) for t in self.tensors]
        self.checkpoints = Checkpoints(
            run_id,
            model,
            stages,
            self.tensors,
            state,
            store,
            settings.seed,
            settings.url_ttl_s,
            manifest_extra,
        )

    def initialize(self, now: float) -> None:
        """Resume the run, or start it from the newest checkpoint in the bucket, or from the seeded one."""
        self.checkpoints.initialize(now)

    def data_urls(self) -> dict[str, str]:
        ttl = self.settings.url_ttl_s
        return {
            n: self.store.presign_get(keys.data_shard(self.run_id, n), ttl)
            for n in self.state.run.data_shards
        }

    def plan(self, stage: int) -> EpochPlan:
        """The numbers every replica's learning rate follows this epoch (frozen at the epoch's first request)."""
        epoch = self.scheduler.epoch
        replicas = self.state.epochs.replicas(epoch, stage)
        if replicas is None:
            replicas = max(1, sum(1 for m in self.state.miners(alive_only=True) if m.stage == stage))
            self.state.epochs.set_replicas(epoch, stage, replicas)
        return EpochPlan(
            epoch=epoch, tokens_at_start=self.state.epochs.tokens_at_start(epoch), replicas=replicas
        )

    # -- phase work -------------------------------------------------------------------------------------

    def phase_work(self, miner: MinerRecord, now: float) -> Work:
        self.advance(now)
        phase, epoch = self.scheduler.phase, self.scheduler.epoch
        base = dict(run_id=self.run_id, epoch=epoch, stage=miner.stage, plan=self.plan(miner.stage))
        ttl = self.settings.url_ttl_s
        if phase == DONE:
            return Work(kind="stop", reason="the run is complete", **base)
        if phase == UPLOAD and self.state.uploads.get(epoch, miner.stage, miner.hotkey) is None:
            if miner.hotkey not in self.workers(epoch):
                return Work(
                    kind="wait", wait_s=0.2, reason="no hop done this epoch: nothing to upload", **base
                )
            lease = self._lease(epoch, UPLOAD, miner, now)
            if lease is None or now > lease:
                return Work(kind="wait", wait_s=0.2, reason="the upload deadline has passed", **base)
            key = keys.pseudo_grad(self.run_id, epoch, miner.stage, miner.hotkey)
            size = 4 * self.n_params[miner.stage]
            return Work(
                kind="upload",
                output_url=self.store.presign_put(key, max(ttl, math.ceil(lease - now)), size),
                output_size=size,
                lease_expires=lease,
                **base,
            )
        if phase == MERGE:
            plan = self.state.merges.plan(epoch, miner.stage)
            mine = plan.partitions_of(miner.hotkey) if plan is not None else []
            done = self.state.merges.report(epoch, miner.stage, miner.hotkey) is not None
            if plan is not None and mine and not done:
                return Work(kind="merge", merge=self._merge_order(plan, miner.hotkey, mine), **base)
        if phase == APPLY and self.behind(miner):
            return self.apply_work(miner, self._lease(epoch, APPLY, miner, now))
        if phase != APPLY and self.behind(miner):
            return self.apply_work(miner, None)
        return Work(kind="wait", wait_s=0.2, reason=f"waiting for other miners to finish {phase}", **base)

    def behind(self, miner: MinerRecord) -> bool:
        """Whether the miner holds weights older than the latest checkpoint's (None: it never said which)."""
        info = self.state.run.checkpoint
        loaded = self.state.merges.loaded(miner.hotkey)
        return info is not None and (loaded is None or loaded < info.epoch)

    def apply_work(self, miner: MinerRecord, lease: float | None) -> Work:
        """Load the latest checkpoint: the merge of the epoch before it, in APPLY or, for a miner that missed that,
        before any other work afterwards."""
        info = self.state.run.checkpoint
        assert info is not None
        return Work(
            kind="apply",
            run_id=self.run_id,
            epoch=info.epoch - 1,
            stage=miner.stage,
            plan=self.plan(miner.stage),
            input_url=self.checkpoints.weights_url(miner.stage),
            input_sha256=info.shas[miner.stage],
            lease_expires=lease,
        )

    def workers(self, epoch: int) -> frozenset[str]:
        """The miners that completed a hop in `epoch`: those its end waits for. Asked only once training is over
        (in UPLOAD, MERGE or APPLY), when no more hops of the epoch complete: read once, not on every request."""
        if self._workers is None or self._workers[0] != epoch:
            self._workers = epoch, frozenset(hotkey for hotkey, _ in self.state.work.by_miner(epoch))
        return self._workers[1]

    def _leases(self, phase: str) -> Leases:
        return self.state.uploads.leases if phase == UPLOAD else self.state.merges.apply_leases

    def _lease(self, epoch: int, phase: str, miner: MinerRecord, now: float) -> float | None:
        """Until when `miner`'s upload or apply is waited for: granted once, when the work is first handed to it
        before the phase's deadline, for `answer_grace_s` (no later than the deadline) plus the stage's size over
        the minimum bandwidth (asking again never extends it). None when it was first handed the work after the
        deadline."""
        leases = self._leases(phase)
        lease = leases.until(epoch, miner.stage, miner.hotkey)
        if lease is None:
            deadline = self._phase_started(epoch, phase, now) + self.settings.phase_timeout_s
            if now > deadline:
                return None
            size_s = 4 * self.n_params[miner.stage] / self.settings.min_upload_bytes_per_s
            lease = min(now + self.settings.answer_grace_s, deadline) + size_s
            leases.grant(epoch, miner.stage, miner.hotkey, lease)
        return lease

    def _phase_started(self, epoch: int, phase: str, now: float) -> float:
        """When `phase` of `epoch` began: the first time anyone looked, if it was not set when it began."""
        started = self.state.epochs.phase_started(epoch, phase)
        started = now if started is None else started
        self.state.epochs.set_phase_started(epoch, phase, started)
        return started

    def _merge_order(self, plan: MergePlan, hotkey: str, mine: list[int]) -> MergeOrder:
        ttl = self.settings.url_ttl_s
        reads = {s.upload_key for s in plan.submitters}
        for index in mine:
            p = plan.partitions[index]
            reads.add(p.prev_weights.key)
            if p.prev_momentum is not None:
                reads.add(p.prev_momentum.key)
        writes = {}
        for index in mine:
            size = 4 * plan.partitions[index].size
            for kind in ("weights", "momentum"):
                key = plan.output_key(index, hotkey, kind)  # type: ignore[arg-type]
                writes[key] = self.store.presign_put(key, ttl, size)
        return MergeOrder(
            plan=plan.model_dump(mode="json"),
            get={key: self.store.presign_get(key, ttl) for key in sorted(reads)},
            put=writes,
        )

    def report(self, miner: MinerRecord, report: PhaseReport, now: float) -> None:
        phase, epoch = self.scheduler.phase, self.scheduler.epoch
        result = report.result
        kind = result.kind
        if isinstance(result, ApplyDone):
            self._record_apply(miner, report)
        elif report.epoch != epoch:
            raise SchedulingError(409, f"epoch {report.epoch} is closed (current {epoch})")
        elif isinstance(result, UploadDone) and phase == UPLOAD:
            lease = self.state.uploads.leases.until(epoch, miner.stage, miner.hotkey)
            if lease is None or now > lease:
                why = "no upload was granted" if lease is None else f"its lease ended {now - lease:.1f} s ago"
                raise SchedulingError(
                    409, f"upload of epoch {epoch} refused: {why}; the merge goes on without it"
                )
            self._record_upload(miner, report, result.norm)
        elif isinstance(result, MergeDone) and phase == MERGE:
            self._check_merge_report(epoch, miner, result)
            self.state.merges.record_report(epoch, miner.stage, miner.hotkey, result)
        else:
            raise SchedulingError(409, f"a {kind!r} report does not fit phase {phase} of epoch {epoch}")
        self.advance(now)

    def _record_apply(self, miner: MinerRecord, report: PhaseReport) -> None:
        """An apply is of the latest checkpoint (the merge of the epoch before it), in whichever phase it ends."""
        info = self.state.run.checkpoint
        if info is None or report.epoch != info.epoch - 1:
            latest = "none" if info is None else info.epoch
            raise SchedulingError(
                409, f"an apply of epoch {report.epoch}'s merge is stale: the latest checkpoint is {latest}"
            )
        expected = info.shas[miner.stage]
        if report.output_sha256 != expected:
            raise SchedulingError(
                400, f"applied weights digest {report.output_sha256} != checkpoint {expected}"
            )
        self.state.merges.record_applied(report.epoch, miner.hotkey, report.output_sha256)
        self.state.merges.set_loaded(miner.hotkey, info.epoch)

    def _check_merge_report(self, epoch: int, miner: MinerRecord, done: MergeDone) -> None:
        """A merge report names only partitions its sender owns, and norms of the plan's submitters only: what is
        kept of it is bounded by the plan, not by what the sender chose to put in the body."""
        plan = self.state.merges.plan(epoch, miner.stage)
        mine = set(plan.partitions_of(miner.hotkey)) if plan is not None else set()
        if not set(done.partitions) | set(done.failed) <= mine:
            raise SchedulingError(
                400, f"the report names partitions other than yours {sorted(mine)}", fault=True
            )
        submitters = set(plan.hotkeys) if plan is not None else set()
        if any(not set(p.sq_norms) <= submitters for p in done.partitions.values()):
            raise SchedulingError(400, "the report names norms of miners that submitted nothing", fault=True)

    def _record_upload(self, miner: MinerRecord, report: PhaseReport, norm: float) -> None:
        epoch = self.scheduler.epoch
        key = keys.pseudo_grad(self.run_id, epoch, miner.stage, miner.hotkey)
        info = self.store.head(key)
        size = 4 * self.n_params[miner.stage]
        if info is None or info.size != size:
            raise SchedulingError(400, f"pseudo-gradient not uploaded with {size} bytes")
        # Work weight from our own ledger (hops this miner completed this epoch), never from its claim.
        hops = self.state.work.done_by(miner.hotkey, epoch)
        upload = UploadRecord(key=key, sha=report.output_sha256, norm=norm, weight=hops)
        self.state.uploads.record(epoch, miner.stage, miner.hotkey, upload)
        self.state.counters.bump("bytes_transferred", size)

    # -- advancing phases -------------------------------------------------------------------------------

    def advance(self, now: float) -> None:
        """Move to the next phase once everyone expected has answered, or the phase has timed out."""
        phase, epoch = self.scheduler.phase, self.scheduler.epoch
        timed_out = now - self._phase_started(epoch, phase, now) > self.settings.phase_timeout_s
        alive = self.state.miners(alive_only=True)
        workers = self.workers(epoch) if phase in (UPLOAD, APPLY) else frozenset()
        if phase == UPLOAD:
            owing = [
                m
                for m in alive
                if m.hotkey in workers and self.state.uploads.get(epoch, m.stage, m.hotkey) is None
            ]
            if not self._waiting(epoch, UPLOAD, owing, timed_out, now) and not self._accused(
                epoch, timed_out, now
            ):
                self._start_merge(epoch, now)
        elif phase == MERGE:
            pending = []
            for spec in self.stages:
                plan = self.state.merges.plan(epoch, spec.index)
                if plan is None:
                    continue
                alive_keys = {m.hotkey for m in alive}
                pending += [
                    h
                    for h in plan.hotkeys
                    if h in alive_keys
                    and plan.partitions_of(h)
                    and self.state.merges.report(epoch, spec.index, h) is None
                ]
            if not pending or timed_out:
                self._finish_merge(epoch, now)
        elif phase == APPLY:
            owing = [m for m in alive if m.hotkey in workers and self.behind(m)]
            if not self._waiting(epoch, APPLY, owing, timed_out, now):
                self.scheduler.next_epoch(now)

    def _waiting(
        self, epoch: int, phase: str, owing: list[MinerRecord], timed_out: bool, now: float
    ) -> list[MinerRecord]:
        """Those of `owing` that `phase` still waits for: those whose lease runs, and within `answer_grace_s` of
        the phase's start those that have not taken their work yet. One whose lease lapsed with its work
        unreported is struck, once, and waited for no longer; a distrusted one is never waited for."""
        leases = self._leases(phase)
        asking = now - self._phase_started(epoch, phase, now) <= self.settings.answer_grace_s
        waiting = []
        for miner in owing:
            lease = leases.until(epoch, miner.stage, miner.hotkey)
            if self.distrusted(miner.hotkey, now):
                continue
            if lease is not None and now > lease:
                self._lapsed(epoch, phase, miner.hotkey, now)
            elif lease is not None or (asking and not timed_out):
                waiting.append(miner)
        return waiting

    def _accused(self, epoch: int, timed_out: bool, now: float) -> list[str]:
        """Submitters of this epoch with a failing verdict on it still unsettled: the merge waits for it (at most
        until the phase times out), so that a failure confirmed meanwhile keeps their pseudo-gradient out."""
        if timed_out:
            return []
        accused = sorted(
            {
                claim.miner
                for claim in self.state.audits.claims().values()
                if claim.epoch == epoch
                and self.state.uploads.get(epoch, claim.stage, claim.miner) is not None
            }
        )
        if accused and self._merge_held != epoch:
            self._merge_held = epoch
            self.state.log(now, "merge_held", None, epoch=epoch, accused=accused)
            logger.info("epoch {}: the merge waits for the verdicts on {} to be settled", epoch, accused)
        return accused

    def _lapsed(self, epoch: int, phase: str, hotkey: str, now: float) -> None:
        if not self._leases(phase).lapse(epoch, hotkey):
            return  # struck already
        why = f"its {phase} of epoch {epoch} was not reported before its lease ended"
        self.state.log(now, "lease_lapsed", hotkey, epoch=epoch, phase=phase)
        logger.warning(
            "epoch {}: {}'s {} lease lapsed; the phase goes on without it", epoch, hotkey[:10], phase
        )
        if self.strike is not None:
            self.strike(hotkey, why, now)

    def _start_merge(self, epoch: int, now: float) -> None:
        # A miner whose audit failed this epoch, confirmed by an independent replay, contributes no update.
        failed = {miner for miner, e in confirmed_failures(self.state.verdicts()) if e == epoch}
        for spec in self.stages:
            submitters = []
            for m in self.state.miners():
                up = self.state.uploads.get(epoch, spec.index, m.hotkey) if m.stage == spec.index else None
                if up is not None and m.hotkey in failed:
                    self.state.log(
                        now, "merge_excluded", m.hotkey, epoch=epoch, reason="confirmed failed audit"
                    )
                    logger.warning(
                        "epoch {}: {}'s pseudo-gradient is left out (failed audit)", epoch, m.hotkey[:10]
                    )
                elif up is not None:
                    submitters.append(
                        Submitter(
                            hotkey=m.hotkey,
                            upload_key=up.key,
                            weight=max(float(up.weight), 1e-9),
                            claimed_norm=up.norm,
                        )
                    )
            if not submitters:
                logger.warning(
                    "epoch {}: no pseudo-gradient for stage {}; it keeps its weights", epoch, spec.index
                )
                continue
            plan = make_plan(
                run=self.run_id,
                epoch=epoch,
                stage=spec.index,
                n_params=self.n_params[spec.index],
                n_partitions=self.settings.partitions,
                submitters=submitters,
                prev_weights=self._prev_weights(epoch, spec.index),
                prev_momentum=self._prev_momentum(spec.index),
                outer=self.settings.outer,
                clip=self.settings.merge_clip or None,
                output_template=keys.merged_template(self.run_id, epoch, spec.index),
            )
            self.state.merges.set_plan(plan)
        self._set_phase(epoch, MERGE, now)

    def _prev_weights(self, epoch: int, stage: int) -> list[FlatRef]:
        ref = FlatRef(key=keys.checkpoint_stage(self.run_id, epoch, stage))
        return [ref] * self._n_partitions(stage)

    def _prev_momentum(self, stage: int) -> list[FlatRef | None]:
        info = self.state.run.checkpoint
        stage_momentum = info.momentum.get(str(stage), {}) if info is not None else {}
        bounds = partition_bounds(self.n_params[stage], self.settings.partitions)
        return [
            FlatRef(key=stage_momentum[str(i)], first=start) if str(i) in stage_momentum else None
            for i, (start, _) in enumerate(bounds)
        ]

    def _n_partitions(self, stage: int) -> int:
        return len(partition_bounds(self.n_params[stage], self.settings.partitions))

    def _finish_merge(self, epoch: int, now: float) -> None:
        """Accept each partition the two owners agree on; recompute the rest; assemble checkpoint epoch + 1."""
        checkpoints = self.checkpoints
        shas, momentum = [], {}
        for spec in self.stages:
            plan = self.state.merges.plan(epoch, spec.index)
            if plan is None:
                kept = self.store.get(keys.checkpoint_stage(self.run_id, epoch, spec.index))
                shas.append(checkpoints.write_stage(epoch + 1, spec.index, kept))
                continue
            accepted, sq_norms = referee.settle(self.state, self.store, plan, now)
            weights = encode_f32(referee.assemble(self.store, plan, accepted))
            shas.append(checkpoints.write_stage(epoch + 1, spec.index, weights))
            # The next merge reads its momentum from copies under the checkpoint, which only we write.
            momentum[str(spec.index)] = {
                str(index): checkpoints.write_momentum(epoch + 1, spec.index, index, result.momentum)
                for index, result in accepted.items()
            }
            self.state.merges.accept(epoch, spec.index, {i: result.owner for i, result in accepted.items()})
            for hotkey in check_claimed_norms(plan, sq_norms):
                self.state.log(now, "norm_mismatch", hotkey, epoch=epoch, stage=spec.index)
        checkpoints.publish(epoch + 1, shas, momentum, now)
        self.state.counters.bump("merges")
        self._set_phase(epoch, APPLY, now)

    def _set_phase(self, epoch: int, phase: str, now: float) -> None:
        self.state.run.set_phase(phase)
        self.state.epochs.set_phase_started(epoch, phase, now)
        self.state.log(now, "phase", None, epoch=epoch, phase=phase)
        self.scheduler.doorbell.ring_all()
        logger.info("epoch {}: phase {}", epoch, phase)


__all__ = ["EpochDriver", "EpochSettings", "TRAIN"]
