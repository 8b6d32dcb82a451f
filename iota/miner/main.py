"""The miner daemon: register, load the stage, then loop over work items until told to stop.

Work kinds: forward / backward (a hop of a sample: iota.miner.hops); snapshot (a challenge: the exact state, copied
between hops and sent beside the next ones), upload (the epoch's pseudo-gradient), merge (this miner's partitions of
the butterfly merge) and apply (the next epoch's weights): iota.miner.phases; wait; stop. The stage worker is used
on the main thread only; while a hop computes, the next item is fetched and the previous outputs uploaded and
reported beside it (iota.miner.pipeline), `depth` of each at once. Every PROGRESS_S a one-line progress is logged
(epoch, what it does, hops, tokens/s, loss, what it waits for). Failures of one item are logged and the item
released; SIGTERM/SIGINT finish the current step, release what is leased (a prefetched item included), send what is
finished, and exit.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
from loguru import logger

from iota.client.orchestrator import OrchestratorClient, Refused
from iota.client.transfers import fetch_data, get
from iota.data import DataPlan, TokenData
from iota.miner.daemon import MinerState
from iota.miner.hops import Hops
from iota.miner.phases import Phases
from iota.model import wire
from iota.model.config import ModelConfig
from iota.model.flat import decode_f32
from iota.model.stages import StageSpec
from iota.protocol import RegisterRequest, ReleaseReason, RunInfo, Work
from iota.train.run import batch_fn
from iota.train.schedule import LRSchedule
from iota.train.snapshot import Snapshot
from iota.train.worker import StageWorker, TrainFlags, stage_clip

HOLD_S = 10.0  # how long the orchestrator may hold a request for work (it answers as soon as there is some)
PROGRESS_S = 30.0  # how often the progress line is logged: often enough to see it move, seldom enough to read


@dataclass
class Progress:
    """What the periodic progress line says: where this miner is, and what it did since the last line."""

    epoch: int = 0
    doing: str = "starting"
    forward: int = 0
    backward: int = 0
    waiting_for: str = ""
    logged_at: float = field(default_factory=time.monotonic)
    forward_logged: int = 0  # `forward` at the last line: the rate is over the interval, not the whole run

    def saw(self, work: Work) -> None:
        self.epoch = work.epoch
        if work.kind == "wait":
            self.waiting_for = work.reason or "work"
            return
        self.waiting_for = ""
        self.doing = "training" if work.kind in ("forward", "backward") else work.kind
        self.forward += work.kind == "forward"
        self.backward += work.kind == "backward"

    def line(self, now: float, tokens_per_hop: int, loss: float | None) -> str:
        """The line to log now; starts the next interval."""
        rate = (self.forward - self.forward_logged) * tokens_per_hop / max(now - self.logged_at, 1e-9)
        self.logged_at, self.forward_logged = now, self.forward
        shown_loss = "-" if loss is None else f"{loss:.3f}"
        waiting = f"; waiting: {self.waiting_for}" if self.waiting_for else ""
        return (
            f"progress: epoch {self.epoch} {self.doing}; hops {self.forward} forward, {self.backward} backward; "
            f"{rate:.0f} tok/s; loss {shown_loss}{waiting}"
        )


class MinerDaemon:
    """One miner process: registration, start-up and the loop. Its hops (`hops`) and phase work (`phases`) use
    what registration loaded here (the run, the stage worker, its schedule) and its clients, and hand an item
    they cannot finish back with `release`."""

    def __init__(
        self,
        client: OrchestratorClient,
        device: torch.device,
        use_autocast: bool,
        cache_size: int,
        memory_bytes: int,
        cache_dir: Path,
        status_file: Path | None = None,
        worker_factory: type[StageWorker] = StageWorker,
        hold_s: float = HOLD_S,
        progress_s: float = PROGRESS_S,
        depth: int = 1,
    ):
        self.client, self.device, self.use_autocast = client, device, use_autocast
        self.cache_size, self.memory_bytes = cache_size, memory_bytes
        self.cache_dir = cache_dir
        self.status_file = status_file
        self.http = httpx.Client(timeout=120.0)
        self.state = MinerState()
        self.session = uuid.uuid4().hex
        self.worker: StageWorker | None = None
        self.worker_factory = worker_factory
        self._status_at = 0.0
        self._heartbeat: threading.Thread | None = None
        self._finished = threading.Event()  # the loop is over: no more heartbeats (the client is closing)
        self.stage = -1
        self.state_id = ""
        self.hops = Hops(self, hold_s, depth)
        self.phases = Phases(self)
        self.progress_s = progress_s
        self.progress = Progress()

    @property
    def loaded_worker(self) -> StageWorker:
        """The stage worker, once `start` has loaded it."""
        assert self.worker is not None
        return self.worker

    # -- start-up ---------------------------------------------------------------------------------------

    def start(self) -> None:
        self.run: RunInfo = self.client.run_info()
        registration = self.client.register(
            RegisterRequest(device=self.device.type, memory_bytes=self.memory_bytes, session=self.session)
        )
        self._start_heartbeat(registration.heartbeat_s)
        self.hops.admit(registration.pipeline_depth)
        same_run_state = registration.state_id == self.state_id
        self.state_id = registration.state_id
        if self.worker is not None and self.stage == registration.stage and same_run_state:
            # Re-registered after a time-out: same stage, so keep the weights; only the cached graphs are void.
            self.worker.cache.clear()
            logger.info("registered again on stage {}", self.stage)
            return
        self.stage = registration.stage
        self.hops.states = None  # another stage: states of the old one answer nothing
        config = ModelConfig.from_dict(self.run.model.model_dump())
        info = self.run.stages[self.stage]
        spec = StageSpec(info.index, len(self.run.stages), info.first_layer, info.last_layer)
        plan = DataPlan.from_dict(self.run.data)
        batch = None
        if spec.is_head or spec.is_tail:
            data = self._load_data(plan, registration.data_urls)
            batch = batch_fn(data, self.run.micro_batch)
        flags = TrainFlags(
            self.run.micro_batch,
            self.run.accumulate,
            self.run.optimizer,
            self.run.weight_decay,
            stage_clip(self.run, self.stage),
            wire.wire_dtype(self.run.wire_dtype),
            self.run.codec,
        )
        self.schedule = LRSchedule.from_dict(self.run.schedule)
        self.worker = self.worker_factory(
            config,
            spec,
            self.run.seed,
            flags,
            batch or _no_data,
            self.device,
            self.use_autocast,
            self.cache_size,
        )
        if registration.checkpoint_url:
            self.load_flat(registration.checkpoint_url, registration.checkpoint_sha256)
        logger.info(
            "miner {} on stage {} of run {} (epoch {})",
            self.client.hotkey[:10],
            self.stage,
            self.run.run_id,
            registration.epoch,
        )

    def _start_heartbeat(self, every_s: float) -> None:
        if self._heartbeat is not None:
            return

        def beat() -> None:
            while not self._finished.wait(every_s) and not self.state.stopping:
                try:
                    self.client.heartbeat()
                except Refused as error:
                    logger.warning("heartbeat refused: {}", error.detail)
                except ConnectionError as error:
                    logger.warning("heartbeat failed: {}", error)

        self._heartbeat = threading.Thread(target=beat, name="heartbeat", daemon=True)
        self._heartbeat.start()

    def _load_data(self, plan: DataPlan, urls: dict[str, str]) -> TokenData:
        return fetch_data(plan, urls, self.cache_dir, self.http)

    def load_flat(self, url: str, sha: str | None) -> None:
        """Load the stage's weights from `url` (a checkpoint at start-up, the next epoch's on `apply`)."""
        worker = self.loaded_worker
        n = worker.flat_weights().numel()
        flat = decode_f32(get(url, sha, 4 * n, self.http))
        if flat.numel() != n:
            raise ValueError(f"stage weights hold {flat.numel()} values, the stage has {n}")
        worker.load_flat(flat)

    # -- the loop ---------------------------------------------------------------------------------------

    def run_forever(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        self.run_until_stopped()

    def run_until_stopped(self) -> None:
        """Register, work until told to stop or the run is done, and leave (signal handlers are the caller's)."""
        self.start()
        try:
            try:
                self._loop()
                self.hops.drain()
            except ConnectionError as error:
                if not self.state.stopping:
                    raise
                logger.warning(
                    "stopped with the orchestrator unreachable ({}); its leases will expire", error
                )
            finally:
                self.hops.outbox.close()
                self.phases.close()
            # Also answers a request for work still held, and hands back whatever that request leased.
            self._leave()
        finally:
            self.hops.prefetch.close()
        self._finished.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5.0)  # one in flight finishes before its client closes
        self.http.close()
        self.client.close()

    def _loop(self) -> None:
        """Compute on this thread; the next item is fetched, and the last ones sent, beside it (iota.miner.hops)."""
        hops = self.hops
        hops.fetch_next()
        while True:
            try:
                fetched = hops.take()
            except Refused as error:
                if not unknown_session(error):
                    raise
                logger.warning("the orchestrator does not know this session ({}); registering again", error)
                hops.drain()  # the old session's reports are refused; their graphs go with start()
                self.session = uuid.uuid4().hex
                self.start()
                hops.fetch_next()
                continue
            hops.apply_refusals()
            if fetched is None or self.state.stopping:
                if fetched is not None:
                    self.release(fetched.work)  # leased (perhaps prefetched) but not begun
                return
            work = fetched.work
            self.progress.saw(work)
            if work.kind == "stop":
                logger.info("run complete: {}", work.reason)
                return
            if work.kind == "wait":
                hops.forget_abandoned(fetched)
                hops.fetch_next(after_s=work.wait_s)
            elif work.kind in ("forward", "backward"):
                hops.hop(fetched)
            elif hops.stale(fetched):
                logger.debug("{} of epoch {} came twice (searches at once): done once", work.kind, work.epoch)
                hops.fetch_next()
            elif work.kind == "snapshot":
                self.phases.do(work)  # copied here; its own thread sends it while the next hops compute
                hops.phase_done(work)
                hops.fetch_next()
            else:
                hops.drain()  # phase work follows the epoch's last reports (and a snapshot's answer)
                self.phases.wait_answered()
                self.phases.do(work)
                hops.phase_done(work)
                hops.fetch_next()
            self._write_status()
            self._log_progress()

    def _leave(self) -> None:
        """Tell the orchestrator at once, so the samples waiting on this miner's graphs restart now."""
        try:
            self.client.leave(give_up_s=10.0)
        except (Refused, ConnectionError) as error:
            logger.warning("could not say goodbye: {}", error)

    def _stop(self, signum: int, frame: Any) -> None:
        logger.info("signal {}: finishing the current step, then releasing leased work", signum)
        self.state.stopping = True
        self.client.interrupt()  # an unreachable orchestrator is not waited for: its leases will expire

    def kept_state(self, epoch: int, step: int) -> Snapshot | None:
        return self.hops.state_after(epoch, step)

    def release(self, work: Work, reason: ReleaseReason = "stopping") -> None:
        """Hand a leased item back, so that another miner may do it; `reason` says why (a bad input accuses
        the miner that produced it)."""
        if work.hop_id is not None:
            try:
                self.client.release(work.hop_id, work.epoch, reason)
            except Refused as error:
                logger.warning("release of item {} refused: {}", work.hop_id, error)

    # -- status -----------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, float | int | str | None]:
        """What the health port and `iota miner status` show."""
        return {
            "hotkey": self.client.hotkey,
            "stage": self.stage,
            "hops_done": self.state.hops_done,
            "compute_s": round(self.state.compute_s, 3),
            "last_loss": self.state.last_loss,
            "inner_step": self.worker.inner_step if self.worker else 0,
            "clock_offset_s": self.client.auth.offset_s,
            "pid": os.getpid(),
            "at": time.time(),
        }

    def _log_progress(self) -> None:
        now = time.monotonic()
        if now - self.progress.logged_at >= self.progress_s:
            logger.info("{}", self.progress.line(now, self.run.micro_batch_tokens, self.state.last_loss))

    def _write_status(self) -> None:
        """For `iota miner status`; at most once a second, off the hot path."""
        if self.status_file is None or time.monotonic() - self._status_at < 1.0:
            return
        self._status_at = time.monotonic()
        tmp = self.status_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.snapshot()))
        tmp.replace(self.status_file)


def unknown_session(error: Refused) -> bool:
    """The orchestrator lost or timed out this miner's registration: registering again is the remedy."""
    return error.status == 404 or (error.status == 409 and "register again" in str(error.detail))


def _no_data(sample_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    raise RuntimeError("a body stage has no data plan")
