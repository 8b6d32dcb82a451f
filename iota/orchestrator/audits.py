"""Audits: which miner a validator replays next, the URLs it may read, its verdicts, and the score log.

The draw uses the operating system's randomness (a miner cannot predict it) and is weighted by the work a miner
claims this epoch, so claiming more means being watched more. A validator reads only the objects its task names.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Callable
from typing import Any

from loguru import logger

from iota.orchestrator.scheduler import Scheduler, SchedulingError
from iota.orchestrator.state import StateStore
from iota.protocol import Ack, AuditHop, AuditTask, AuditVerdict, EpochPlan, RunInfo
from iota.storage import keys
from iota.storage.base import ObjectStore

MAX_AUDIT_HOPS = 512  # the replay stops at its calibrated depth long before this


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
    ):
        self.run, self.state, self.scheduler, self.store = run, state, scheduler, store
        self.plan, self.data_urls, self.url_ttl_s, self.clock = plan, data_urls, url_ttl_s, clock
        self.random = secrets.SystemRandom()

    def task(self, validator: str) -> AuditTask | None:
        """The next audit for this validator, or None when no miner has committed work this epoch."""
        epoch = self.scheduler.epoch
        shas = self.state.get(f"checkpoint_shas/{epoch}")
        rows = self.state.db.execute(
            "SELECT miner, COUNT(*) FROM hops WHERE epoch = ? AND status = 'done' GROUP BY miner ORDER BY miner",
            (epoch,),
        )
        if not rows or shas is None:
            return None
        miners = [str(r[0]) for r in rows]
        chosen = self.random.choices(miners, weights=[int(r[1]) for r in rows])[0]
        miner = self.state.miner(chosen)
        assert miner is not None
        audit_id = uuid.uuid4().hex
        with self.state.transaction():
            self.state.put(
                f"audit/{audit_id}",
                {
                    "validator": validator,
                    "miner": chosen,
                    "epoch": epoch,
                    "stage": miner.stage,
                    "issued": self.clock(),
                },
            )
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
                chosen, epoch, MAX_AUDIT_HOPS
            )
        ]
        return AuditTask(
            audit_id=audit_id,
            run_id=self.run.run_id,
            miner=chosen,
            stage=miner.stage,
            epoch=epoch,
            bf16=miner.device == "cuda",
            checkpoint_url=self.store.presign_get(
                keys.checkpoint_stage(self.run.run_id, epoch, miner.stage), ttl
            ),
            checkpoint_sha256=str(shas[miner.stage]),
            plan=self.plan(miner.stage),
            hops=hops,
            data_urls=self.data_urls(),
        )

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
            self.state.add_verdict(
                now,
                validator,
                verdict.miner,
                verdict.epoch,
                verdict.stage,
                verdict.passed,
                verdict.hops_replayed,
                verdict.depth,
                {"reason": verdict.reason, "errors": verdict.errors},
            )
            self.state.bump("audits_passed" if verdict.passed else "audits_failed")
            self.state.log(
                now,
                "audit",
                verdict.miner,
                validator=validator,
                passed=verdict.passed,
                epoch=verdict.epoch,
                reason=verdict.reason,
            )
        if not verdict.passed:
            logger.warning(
                "audit of {} failed (validator {}): {}", verdict.miner[:10], validator[:10], verdict.reason
            )
        return Ack(detail="verdict recorded")

    def score_log(self) -> dict[str, Any]:
        """Everything the weights follow from: per-epoch work per miner, stage sizes, and every verdict."""
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
            "work": work,
            "verdicts": self.state.verdicts(),
            "uids": uids,
        }
