"""The orchestrator's own recomputation of a failing verdict that no other validator took up in time.

With one validator, nobody else can confirm its failing verdicts; the orchestrator then replays the same miner's
same epoch itself, from the objects in its own store, with the validators' code (iota.audit.judge), with the
same end-of-epoch checks (pseudo-gradient, merged partitions) a validator's task would carry, and its verdict
confirms or refutes the claim. It runs on a background thread on the CPU, one claim at a time; failing
verdicts are rare, so this costs an honest run nothing.
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from functools import partial

import torch
from loguru import logger

from iota.audit.compare import thresholds
from iota.audit.judge import (
    Evidence,
    FinalClaim,
    MergeClaim,
    decode_challenged,
    decode_pseudo_gradient,
    judge,
    replay_setup,
)
from iota.audit.records import HopRecord
from iota.audit.replay import ReplaySetup
from iota.model.flat import decode_f32
from iota.orchestrator.audits import MAX_AUDIT_HOPS, Auditor
from iota.orchestrator.challenges import Challenges, audit_window, last_session
from iota.orchestrator.commitments import epoch_end
from iota.orchestrator.ledgers import Claim
from iota.orchestrator.state import StateStore
from iota.protocol import AuditVerdict, RunInfo, WeightSketch
from iota.storage import keys
from iota.storage.base import ObjectStore
from iota.train.worker import Batch


class Rechecker:
    def __init__(
        self,
        auditor: Auditor,
        run: RunInfo,
        state: StateStore,
        store: ObjectStore,
        batch: Batch,
        challenges: Challenges | None = None,
        interval_s: float = 5.0,
    ):
        self.auditor, self.run, self.state, self.store, self.batch = auditor, run, state, store, batch
        self.challenges = challenges
        self.interval_s = interval_s
        self._stop = threading.Event()

    def run_once(self) -> int:
        """Recompute every claim now due; returns how many were settled."""
        done = 0
        for audit_id, claim in self.auditor.unconfirmed(self.auditor.clock()):
            if self.challenges is not None and self.challenges.lapsed(claim):
                with self.state.transaction():
                    self.state.audits.drop_claim(audit_id)
                logger.warning(
                    "claim {} lapses unjudged: the miner restarted since, and the snapshot of step {} its "
                    "window started at is of a session that is over",
                    audit_id,
                    claim.start_step,
                )
                continue
            outcome = judge(partial(self._load, claim), "orchestrator", claim.miner, claim.epoch)
            verdict = AuditVerdict(
                audit_id=uuid.uuid4().hex,
                miner=claim.miner,
                epoch=claim.epoch,
                stage=claim.stage,
                passed=outcome.passed,
                hops_replayed=outcome.hops,
                depth=outcome.depth,
                reason=outcome.reason,
                errors=outcome.errors,
            )
            self.auditor.record_recomputation(audit_id, claim, verdict)
            done += 1
        return done

    def _load(self, claim: Claim) -> Evidence:
        """The claim's evidence from the orchestrator's own store: the same window the accuser replayed."""
        epoch, stage, hotkey = claim.epoch, claim.stage, claim.miner
        setup = replay_setup(self.run, stage, claim.plan, claim.bf16, self.batch, torch.device("cpu"))
        shas = self.state.epochs.checkpoint_shas(epoch)
        assert shas is not None  # audits are issued only for epochs whose checkpoint is known
        checkpoint = decode_f32(self._get(keys.checkpoint_stage(self.run.run_id, epoch, stage), shas[stage]))
        first, depth = claim.start_step, thresholds(claim.bf16).depth
        hops = audit_window(self.state, hotkey, epoch, first, depth, MAX_AUDIT_HOPS)
        records = [
            HopRecord(
                epoch,
                stage,
                direction,
                int(sample),
                int(step or 0),
                self._get(in_key, in_sha) if in_key else None,
                self._get(out_key, out_sha) if out_key else None,
                loss,
            )
            for _, (_, direction, sample, step, in_key, in_sha, out_key, out_sha, loss) in hops
        ]
        sessions = [session for session, _ in hops]
        final, merge = self._epoch_end(hotkey, epoch, stage, setup)
        if self.challenges is None:
            return Evidence(setup, checkpoint, records, final=final, merge=merge, sessions=sessions)
        # As the task named them: the start's snapshot and the later ones the window reaches, which a window from
        # the checkpoint compares too (left out here, a validator's right failure there was refuted).
        answered = self.challenges.snapshots(hotkey, epoch)
        snapshots = {
            step: decode_challenged(setup, self._get(snap["key"], snap["sha256"]))
            for step, snap in answered.items()
            if first <= step <= first + depth
        }
        later = {step: snap.weights for step, snap in snapshots.items() if step > first}
        start, sketch = None, None
        if first:
            start, sketch = snapshots[first], WeightSketch.model_validate(answered[first]["sketch"])
        return Evidence(setup, checkpoint, records, start, sketch, later, final, merge, sessions)

    def _epoch_end(
        self, hotkey: str, epoch: int, stage: int, setup: ReplaySetup
    ) -> tuple[FinalClaim | None, MergeClaim | None]:
        """What the miner committed at the epoch's end, as a validator's task would name it, from our store."""
        end = epoch_end(self.state, hotkey, epoch, stage)
        final = None
        if end.upload_key is not None:
            pseudo = decode_pseudo_gradient(setup, self._get(end.upload_key, end.upload_sha))
            final = FinalClaim(
                pseudo, end.final_step, end.final_sketch, last_session(self.state, hotkey, epoch)
            )
        merge = None
        if end.plan is not None and end.digests:
            merge = MergeClaim(end.plan, hotkey, end.digests, self.store, end.upload_shas)
        return final, merge

    def _get(self, key: str, sha: str | None) -> bytes:
        data = self.store.get(key)
        if sha is not None and hashlib.sha256(data).hexdigest() != sha:
            raise ValueError(f"{key} does not match its committed sha256")
        return data

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._loop, name="recheck", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        torch.set_num_threads(1)  # process-wide, but this thread is the orchestrator's only torch compute
        while not self._stop.wait(self.interval_s):
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 (a bug here must not stop the orchestrator: logged, retried)
                logger.exception("recomputing failing verdicts failed; retrying in {} s", self.interval_s)
