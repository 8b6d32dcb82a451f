"""The validator daemon: draw audits, replay them, report verdicts; compute weights from the score log and set them.

Each audit replays a miner's committed hops of an epoch from the epoch's checkpoint (or a challenged snapshot; each
session of a miner that restarted from the checkpoint again) with
the miners' own code (iota.audit.replay), in the miner's declared precision, and compares every claim; once the
epoch has ended, also its uploaded pseudo-gradient and the partitions it merged (iota.audit.judge). Weights
follow from the orchestrator's score log by a pure function (iota.audit.scoring), so two validators with the
same log set the same weights; they go to the chain on an interval, retried, and the last result is kept for
`status`.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from loguru import logger

from iota.audit.judge import (
    Evidence,
    FinalClaim,
    MergeClaim,
    activation_limit,
    decode_challenged,
    decode_pseudo_gradient,
    judge,
    replay_setup,
)
from iota.audit.records import HopRecord
from iota.audit.replay import ReplaySetup
from iota.audit.scoring import compute_scores, weights_by_uid, with_burn
from iota.chain.base import Chain, ChainError
from iota.client.orchestrator import OrchestratorClient, Refused
from iota.client.transfers import UrlStore, fetch_data, get
from iota.data import DataPlan
from iota.merge import MergePlan
from iota.model.flat import decode_f32
from iota.protocol import Ack, AuditTask, AuditVerdict, RunInfo
from iota.train.run import batch_fn
from iota.train.worker import Batch

VERSION_KEY = 1  # weights version this validator sets; bumped with incompatible scoring changes


class ValidatorDaemon:
    def __init__(
        self,
        client: OrchestratorClient,
        chain: Chain,
        keypair: Any,
        device: torch.device,
        weights_interval_s: float,
        cache_dir: Path,
        burn_uid: int | None = None,
        burn_fraction: float = 0.0,
        adversary: str = "",
    ):
        self.client, self.chain, self.keypair, self.device = client, chain, keypair, device
        self.weights_interval_s = weights_interval_s
        self.burn_uid, self.burn_fraction = burn_uid, burn_fraction
        self.cache_dir = cache_dir
        self.adversary = adversary  # tests and demos only (ValidatorSettings.adversary)
        self.http = httpx.Client(timeout=120.0)
        self.stopping = False
        self.last_weights_at = 0.0
        self.status: dict[str, Any] = {"audits": 0, "failed": 0, "last_weights": None, "last_error": None}
        self.status_file = cache_dir / f"status-{client.hotkey}.json"

    def run_forever(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        self.run: RunInfo = self.client.run_info()
        while not self.stopping:
            if time.monotonic() - self.last_weights_at >= self.weights_interval_s:
                self.set_weights()
            task = self.next_task()
            if task is None:
                time.sleep(2.0)
                continue
            verdict = self.audit(task)
            try:
                self.client.call("POST", "/validators/verdict", Ack, verdict)
            except Refused as error:
                logger.warning("verdict refused: {}", error)
            self.status["audits"] += 1
            self.status["failed"] += int(not verdict.passed)
            self._write_status()
        self.set_weights()
        self.http.close()

    def _stop(self, signum: int, frame: Any) -> None:
        logger.info("signal {}: finishing the current audit", signum)
        self.stopping = True

    def next_task(self) -> AuditTask | None:
        response = self.client.http.post(
            "/validators/audit", content=b"", headers={"content-type": "application/json"}
        )
        if response.status_code == 204:
            return None
        if response.is_error:
            logger.warning("audit request refused: {} {}", response.status_code, response.text[:200])
            return None
        return AuditTask.model_validate_json(response.content)

    def audit(self, task: AuditTask) -> AuditVerdict:
        """Fetch the task's evidence by its URLs, replay it, and judge it (iota.audit.judge)."""
        if self.adversary == "pass_everything":  # a bought validator: vouches for whatever it is shown
            return AuditVerdict(
                audit_id=task.audit_id,
                miner=task.miner,
                epoch=task.epoch,
                stage=task.stage,
                passed=True,
                hops_replayed=len(task.hops),
                depth=0,
            )

        def load() -> Evidence:
            setup = self._setup(task)
            n = self.run.stages[task.stage].n_params
            checkpoint = decode_f32(get(task.checkpoint_url, task.checkpoint_sha256, 4 * n, self.http))
            limit = activation_limit(self.run, setup)
            records = [
                HopRecord(
                    task.epoch,
                    task.stage,
                    hop.direction,
                    hop.sample_id,
                    hop.inner_step,
                    get(hop.input_url, hop.input_sha256, limit, self.http) if hop.input_url else None,
                    get(hop.output_url, hop.output_sha256, limit, self.http) if hop.output_url else None,
                    hop.loss,
                )
                for hop in task.hops
            ]
            snapshots = {
                s.step: decode_challenged(setup, get(s.url, s.sha256, 16 * n + (1 << 20), self.http))
                for s in task.snapshots
            }
            start = snapshots.pop(task.start_step, None) if task.start_step else None
            if task.start_step and start is None:
                raise ValueError(f"the task starts at step {task.start_step} but names no snapshot of it")
            sketches = {s.step: s.sketch for s in task.snapshots}
            later = {step: snap.weights for step, snap in snapshots.items() if step > task.start_step}
            return Evidence(
                setup,
                checkpoint,
                records,
                start,
                sketches.get(task.start_step),
                later,
                self._final(task, setup, n),
                self._merge(task),
                [hop.session for hop in task.hops],
            )

        outcome = judge(load, "validator", task.miner, task.epoch)
        return AuditVerdict(
            audit_id=task.audit_id,
            miner=task.miner,
            epoch=task.epoch,
            stage=task.stage,
            passed=outcome.passed,
            hops_replayed=outcome.hops,
            depth=outcome.depth,
            reason=outcome.reason,
            errors=outcome.errors,
        )

    def _final(self, task: AuditTask, setup: ReplaySetup, n_params: int) -> FinalClaim | None:
        """The miner's uploaded pseudo-gradient, if the task names one, checked against its reported digest."""
        claim = task.pseudo_gradient
        if claim is None:
            return None
        data = get(claim.url, claim.sha256, 4 * n_params, self.http)
        return FinalClaim(decode_pseudo_gradient(setup, data), claim.step, claim.sketch, claim.session)

    def _merge(self, task: AuditTask) -> MergeClaim | None:
        """The miner's merge as an owner, if the task names one: read through the task's URLs as it recomputes."""
        if task.merge is None:
            return None
        plan = MergePlan.model_validate(task.merge.plan)
        store = UrlStore(task.merge.urls, {}, self.http, 4 * plan.n_params)
        return MergeClaim(plan, task.miner, task.merge.digests, store, task.merge.upload_shas)

    def _setup(self, task: AuditTask) -> ReplaySetup:
        info = self.run.stages[task.stage]
        batch: Batch = _no_batch
        if info.index == 0 or info.index == len(self.run.stages) - 1:
            data = fetch_data(DataPlan.from_dict(self.run.data), task.data_urls, self.cache_dir, self.http)
            batch = batch_fn(data, self.run.micro_batch)
        return replay_setup(self.run, task.stage, task.plan, task.bf16, batch, self.device)

    def set_weights(self) -> None:
        """Weights from the score log, set on the chain; a failure is logged, kept for status, and retried later."""
        self.last_weights_at = time.monotonic()
        try:
            response = httpx.get(f"{str(self.client.http.base_url).rstrip('/')}/scores", timeout=30)
            response.raise_for_status()  # an overloaded orchestrator's 503 is no score log
            weights = compute_scores(response.json())
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as error:
            self.status["last_error"] = f"score log unavailable: {type(error).__name__}: {error}"
            return
        try:
            self.chain.sync()  # whose uid is whose now: a recycled uid must not inherit its last holder's credit
            registered = {n.hotkey: n.uid for n in self.chain.neurons()}
        except ChainError as error:
            self.status["last_error"] = f"metagraph unavailable: {error}"
            return
        by_uid = weights_by_uid(weights, registered)
        pairs = sorted(with_burn(by_uid, self.burn_uid, self.burn_fraction).items())
        if not pairs:
            return
        try:
            self.chain.set_weights(self.keypair, [u for u, _ in pairs], [w for _, w in pairs], VERSION_KEY)
            self.status["last_weights"] = {"at": time.time(), "weights": {str(u): w for u, w in pairs}}
            self.status["last_error"] = None
            logger.info("weights set for {} miners", len(pairs))
        except ChainError as error:
            self.status["last_error"] = f"set_weights failed: {error}"
            logger.warning("set_weights failed (will retry): {}", error)
        self._write_status()

    def _write_status(self) -> None:
        tmp = self.status_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.status))
        tmp.replace(self.status_file)


def _no_batch(sample_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    raise RuntimeError("a body stage reads no data")
