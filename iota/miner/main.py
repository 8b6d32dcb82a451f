"""The miner daemon: register, load the stage, then loop over work items until told to stop.

Work kinds: forward / backward (a hop of a sample), snapshot (a challenge: the exact state, copied between hops and
sent beside the next ones), upload (the epoch's pseudo-gradient), merge (this miner's partitions of the butterfly
merge), apply (the next epoch's weights), wait, stop. The stage worker is used on the main thread only; while a
hop computes, the next item is fetched and the previous outputs uploaded and reported beside it
(iota.miner.pipeline). Failures of one item are logged and the item released; SIGTERM/SIGINT finish the current
step, release what is leased (a prefetched item included), send what is finished, and exit.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
from loguru import logger

from iota.client.orchestrator import OrchestratorClient, Refused
from iota.client.transfers import UrlStore, fetch_data, get, put
from iota.data import DataPlan, TokenData
from iota.merge import MergePlan, run_owner
from iota.miner.pipeline import Fetched, Outbox, Prefetcher
from iota.model import wire
from iota.model.config import ModelConfig
from iota.model.flat import decode_f32, encode_f32
from iota.model.stages import StageSpec
from iota.protocol import RegisterRequest, Report, RunInfo, WeightSketch, Work
from iota.storage.base import StoreError
from iota.train.run import batch_fn
from iota.train.schedule import LRSchedule, inner_step_lr
from iota.train.snapshot import Snapshot, snapshot_to_f32, take_snapshot
from iota.train.worker import StageWorker, TrainFlags, sketch_seed, stage_clip

HOLD_S = 10.0  # how long the orchestrator may hold a request for work (it answers as soon as there is some)


@dataclass(frozen=True)
class Finished:
    """A computed hop on its way out: its output is uploaded, then its report sent (iota.miner.pipeline.Outbox)."""

    work: Work
    input: bytes | None
    output: bytes | None
    loss: float | None
    inner_step: int  # after the inner step this hop completed, if it did
    tokens: int
    sketch: WeightSketch | None = None  # of the weights after the step this hop completed: a commitment

    def report(self) -> Report:
        work = self.work
        assert work.hop_id is not None
        return Report(
            run_id=work.run_id,
            epoch=work.epoch,
            hop_id=work.hop_id,
            inner_step=self.inner_step,
            input_sha256=wire.sha256(self.input) if self.input is not None else None,
            output_sha256=wire.sha256(self.output) if self.output is not None else None,
            output_md5=wire.md5_hex(self.output) if self.output is not None else None,
            loss=self.loss,
            tokens=self.tokens,
            sketch=self.sketch,
        )


@dataclass
class MinerState:
    stopping: bool = False
    hops_done: int = 0
    last_loss: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Miner:
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
    ):
        self.client, self.device, self.use_autocast = client, device, use_autocast
        self.hold_s = hold_s  # how long the orchestrator may hold a request for work while it has none
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
        self.prefetch = Prefetcher(self._fetch)
        # Depth 1: one output being sent and one waiting, so a miner holds at most three items unreported.
        self.outbox: Outbox[Finished, tuple[int, int]] = Outbox(
            self._send, depth=1, on_sent=self.prefetch.kick
        )
        # A challenged snapshot is uploaded on its own thread: (its inner step, the answer's future).
        self._snapshots = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot")
        self._answering: tuple[int, Future[None]] | None = None
        # The hop on the main thread, from when it starts computing until it is in the outbox.
        self._computing: Work | None = None
        self._graph_hops: dict[int, int] = {}  # sample -> the item whose forward made its cached graph
        # The sketch of each recent step, and per epoch the last step whose sketch the orchestrator accepted: when
        # the report that completed a step is refused, the next report at that step carries its sketch instead.
        self._sketches: dict[tuple[int, int], WeightSketch] = {}
        self._committed: dict[int, int] = {}

    # -- start-up ---------------------------------------------------------------------------------------

    def start(self) -> None:
        self.run: RunInfo = self.client.run_info()
        registration = self.client.register(
            RegisterRequest(device=self.device.type, memory_bytes=self.memory_bytes, session=self.session)
        )
        self._start_heartbeat(registration.heartbeat_s)
        same_run_state = registration.state_id == self.state_id
        self.state_id = registration.state_id
        if self.worker is not None and self.stage == registration.stage and same_run_state:
            # Re-registered after a time-out: same stage, so keep the weights; only the cached graphs are void.
            self.worker.cache.clear()
            logger.info("registered again on stage {}", self.stage)
            return
        self.stage = registration.stage
        config = ModelConfig.from_dict(self.run.model)
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
            self._load_flat(registration.checkpoint_url, registration.checkpoint_sha256)
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

    def _load_flat(self, url: str, sha: str | None) -> None:
        assert self.worker is not None
        n = self.worker.flat_weights().numel()
        flat = decode_f32(get(url, sha, 4 * n, self.http))
        if flat.numel() != n:
            raise ValueError(f"stage weights hold {flat.numel()} values, the stage has {n}")
        self.worker.load_flat(flat)

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
                self.outbox.drain()
                self._apply_refusals()
            except ConnectionError as error:
                if not self.state.stopping:
                    raise
                logger.warning(
                    "stopped with the orchestrator unreachable ({}); its leases will expire", error
                )
            finally:
                self.outbox.close()
                self._snapshots.shutdown(wait=True)
            # Also answers a request for work still held, and hands back whatever that request leased.
            self._leave()
        finally:
            self.prefetch.close()
        self._finished.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5.0)  # one in flight finishes before its client closes
        self.http.close()
        self.client.close()

    def _loop(self) -> None:
        """Compute on this thread; the next item is fetched, and the last ones sent, beside it (iota.miner.pipeline)."""
        self.prefetch.start(self._forward_wanted(None))
        while True:
            try:
                fetched = self.prefetch.take(stopping=lambda: self.state.stopping)
            except Refused as error:
                if not unknown_session(error):
                    raise
                logger.warning("the orchestrator does not know this session ({}); registering again", error)
                self.outbox.drain()  # the old session's reports are refused; their graphs go with start()
                self._apply_refusals()
                self.session = uuid.uuid4().hex
                self.start()
                self.prefetch.start(self._forward_wanted(None))
                continue
            self._apply_refusals()
            if fetched is None or self.state.stopping:
                if fetched is not None:
                    self._release(fetched.work)  # leased (perhaps prefetched) but not begun
                return
            work = fetched.work
            if work.kind == "stop":
                logger.info("run complete: {}", work.reason)
                return
            if work.kind == "wait":
                self._forget_abandoned(work)
                self.prefetch.start(self._forward_wanted(None), after_s=work.wait_s)
            elif work.kind in ("forward", "backward"):
                self._hop(fetched)
            elif work.kind == "snapshot":
                self.do(work)  # copied here; its own thread sends it while the next hops compute
                self.prefetch.start(self._forward_wanted(None))
            else:
                self.outbox.drain()  # phase work follows the epoch's last reports (and a snapshot's answer)
                if self._answering is not None:
                    self._answering[1].result()
                self._apply_refusals()
                self.do(work)
                self.prefetch.start(self._forward_wanted(None))
            self._write_status()

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

    def _release(self, work: Work) -> None:
        if work.hop_id is not None:
            try:
                self.client.release(work.hop_id, work.epoch)
            except Refused as error:
                logger.warning("release of item {} refused: {}", work.hop_id, error)

    # -- hops: fetched on the prefetch thread, computed here, sent on the outbox thread ---------------------

    def _fetch(self, forward: bool) -> Fetched:
        """Prefetch thread: one request for work, and the input of a leased hop."""
        quiet = self._computing is None and not self.outbox.unsent()
        # A held request answers when work for this miner appears, or when the miner reports, since a report may
        # change what it asks for. Not while it declines forward work only until a forward of its own is
        # reported: that report may reach the orchestrator first, and the request would be held with a stale ask.
        hold = self.hold_s if forward or not self._forward_unreported() else 0.0
        work = self.client.work(forward=forward, hold_s=hold)
        if work.kind not in ("forward", "backward") or not work.input_url:
            return Fetched(work, quiet=quiet)
        assert self.worker is not None
        try:
            return Fetched(work, get(work.input_url, work.input_sha256, self.worker.max_bytes, self.http))
        except (ValueError, OSError, StoreError) as error:
            return Fetched(work, error=error)

    def _forward_wanted(self, current: Work | None) -> Callable[[], bool]:
        """Whether a request may ask for forward work, decided at each request the prefetch makes.

        The window has room if it will once `current` is computed (and the inner step it completes taken): at most
        k forwards per window. Above the tail, a miner also asks only once its own forwards are reported: the
        orchestrator counts the graphs a miner holds from its reports, and asking sooner would exceed its limit.
        """
        if self.worker is None:
            return lambda: True
        room = self._window_room_after(current)
        if self.worker.spec.is_tail:
            return lambda: room
        return lambda: room and not self._forward_unreported()

    def _window_room_after(self, current: Work | None) -> bool:
        worker = self.worker
        assert worker is not None
        if current is None:
            return worker.wants_forward()
        forward = current.kind == "forward"
        # StageWorker.forward replaces a cached graph of the same sample; the tail's forward is also a backward.
        forwards = worker.window_forwards + (forward and current.sample_id not in worker.cache)
        micro_batches = worker.micro_batches + (not forward or worker.spec.is_tail)
        return micro_batches >= worker.flags.accumulate or forwards < worker.flags.accumulate

    def _forward_unreported(self) -> bool:
        computing = self._computing
        if computing is not None and computing.kind == "forward":
            return True
        return any(item.work.kind == "forward" for item in self.outbox.unsent())

    def _hop(self, fetched: Fetched) -> None:
        work = fetched.work
        assert self.worker is not None and work.sample_id is not None
        if fetched.error is not None or (work.kind == "forward" and not self.worker.wants_forward()):
            # A failed download; or a forward prefetched on a guess that this window would have room (a worker
            # that counts differently): hand it back as today's loop would have.
            why = fetched.error or "no room in this accumulation window"
            logger.error("{} item {} not done: {}", work.kind, work.hop_id, why)
            self._release(work)
            self.prefetch.start(self._forward_wanted(None))
            return
        self._computing = work
        self.prefetch.start(self._forward_wanted(work))
        try:
            finished = self._compute(work, fetched.data)
        except (KeyError, ValueError, OSError, StoreError) as error:
            logger.error("{} item {} failed: {}: {}", work.kind, work.hop_id, type(error).__name__, error)
            self._release(work)
        else:
            self.outbox.put(finished)  # counted as unreported from here on, so clear `_computing` after
        self._computing = None

    def _compute(self, work: Work, data: bytes | None) -> Finished:
        """Main thread: the stage's forward or backward, and the inner step it completes."""
        assert self.worker is not None and work.sample_id is not None and work.hop_id is not None
        out: bytes | None
        loss, sketch = None, None
        if work.kind == "forward":
            out, loss = self.worker.forward(work.sample_id, data)
            if not self.worker.spec.is_tail:
                self._graph_hops = {s: h for s, h in self._graph_hops.items() if s in self.worker.cache}
                self._graph_hops[work.sample_id] = work.hop_id
        else:
            if data is None:
                raise ValueError("a backward item names no input")
            out = self.worker.backward(work.sample_id, data)
        if self.worker.step_due():
            plan = work.plan
            lr = inner_step_lr(
                self.schedule,
                plan.tokens_at_start,
                self.worker.inner_step,
                self.run.accumulate,
                self.run.micro_batch * int(self.run.model["seq_len"]),
                plan.replicas,
            )
            self.worker.step(lr)
            sketch = self.worker.sketch(sketch_seed(self.run.seed, work.epoch, self.worker.inner_step))
            step = self.worker.inner_step
            self._sketches = {
                k: v for k, v in self._sketches.items() if k[0] == work.epoch and k[1] > step - 4
            }
            self._sketches[(work.epoch, step)] = sketch
        tokens = self.run.micro_batch * int(self.run.model["seq_len"])
        return Finished(work, data, out, loss, self.worker.inner_step, tokens, sketch)

    def _send(self, item: Finished) -> tuple[int, int] | None:
        """Outbox thread: upload the output, then report it. Returns (sample, hop) of a refused forward."""
        work = item.work
        try:
            if item.output is not None:
                assert work.output_url
                put(work.output_url, item.output, self.http)
            answering = self._answering
            if answering is not None and item.inner_step > answering[0]:
                answering[1].result()  # the orchestrator refuses a later step until the snapshot is answered
            report = item.report()
            if report.sketch is None and item.inner_step > self._committed.get(work.epoch, 0):
                # The report that completed this step was refused (its sample restarted, say): commit it here.
                report.sketch = self._sketches.get((work.epoch, item.inner_step))
            self.client.report(report)
            if report.sketch is not None:
                self._committed[work.epoch] = max(self._committed.get(work.epoch, 0), item.inner_step)
        except Refused as error:
            logger.warning("{} item {} refused: {}", work.kind, work.hop_id, error)
            if work.kind == "forward" and work.sample_id is not None and work.hop_id is not None:
                return work.sample_id, work.hop_id
            return None
        except (KeyError, ValueError, OSError, StoreError) as error:
            logger.error("{} item {} failed: {}: {}", work.kind, work.hop_id, type(error).__name__, error)
            self._release(work)
            return None
        self.state.hops_done += 1
        if item.loss is not None:
            self.state.last_loss = item.loss
        return None

    def _apply_refusals(self) -> None:
        """Forget the graphs of forwards whose report was refused (their backward will never come), unless the
        sample has since been forwarded again here under a new item."""
        for sample_id, hop_id in self.outbox.collect():
            if self.worker is not None and self._graph_hops.get(sample_id) == hop_id:
                del self._graph_hops[sample_id]
                self.worker.forget([sample_id])

    def _forget_abandoned(self, work: Work) -> None:
        """A `wait` lists the samples whose backward is still coming: the other cached graphs never will be."""
        if self.worker is not None and "holding" in work.extra:
            holding = set(work.extra["holding"])
            self.worker.forget([s for s in list(self.worker.cache) if s not in holding])

    # -- phase work -----------------------------------------------------------------------------------

    def do(self, work: Work, handler: Callable[[Work], None] | None = None) -> None:
        """Upload, merge or apply, in turn (nothing of the epoch's training is in flight by then); take or answer
        a snapshot challenge."""
        try:
            (handler or getattr(self, f"_{work.kind}"))(work)
        except Refused as error:
            logger.warning("{} item {} refused: {}", work.kind, work.hop_id, error)
        except (KeyError, ValueError, OSError, StoreError) as error:
            logger.error("{} item {} failed: {}: {}", work.kind, work.hop_id, type(error).__name__, error)
            self._release(work)

    def _upload(self, work: Work) -> None:
        assert self.worker is not None and work.output_url
        pseudo = self.worker.pseudo_gradient()
        extra = {"kind": "upload", "norm": float(pseudo.double().norm())}
        self._put_and_report(work, encode_f32(pseudo), self.worker.inner_step, extra)

    def _snapshot(self, work: Work) -> None:
        """A challenge (iota.orchestrator.challenges): copy the exact state as it stands since the last step, say
        so, and leave the upload to the snapshot thread. Uploading it here stalled the whole pipeline (seconds at 100M
        parameters a stage, minutes at billions)."""
        assert self.worker is not None and work.output_url
        snapshot = take_snapshot(self.worker)
        step = snapshot.inner_step
        self.client.phase_report(self._phase_report(work, step, {"kind": "snapshot_taken", "step": step}))
        self._answering = step, self._snapshots.submit(self.do, work, lambda w: self._answer(w, snapshot))

    def _answer(self, work: Work, snapshot: Snapshot) -> None:
        """Snapshot thread: the snapshot `_snapshot` took, encoded, uploaded and reported; a report of a later step
        waits for this (`_send`)."""
        extra = {"kind": "snapshot", "step": snapshot.inner_step}
        self._put_and_report(work, encode_f32(snapshot_to_f32(snapshot)), snapshot.inner_step, extra)
        logger.info(
            "snapshot of inner step {} uploaded (challenged at {})", snapshot.inner_step, work.extra["step"]
        )

    def _put_and_report(self, work: Work, data: bytes, inner_step: int, extra: dict[str, Any]) -> None:
        """Phase work that produces one object: upload it to the item's URL, then report it with its digests."""
        assert work.output_url
        put(work.output_url, data, self.http)
        self.client.phase_report(self._phase_report(work, inner_step, extra, data))

    @staticmethod
    def _phase_report(
        work: Work, inner_step: int, extra: dict[str, Any], data: bytes | None = None
    ) -> Report:
        return Report(
            run_id=work.run_id,
            epoch=work.epoch,
            hop_id=-1,
            inner_step=inner_step,
            input_sha256=None,
            output_sha256=wire.sha256(data) if data is not None else None,
            output_md5=wire.md5_hex(data) if data is not None else None,
            extra=extra,
        )

    def _merge(self, work: Work) -> None:
        plan = MergePlan.model_validate(work.extra["plan"])
        store = UrlStore(work.extra["get"], work.extra["put"], self.http, 4 * plan.n_params)
        result = run_owner(store, plan, self.client.hotkey)
        partitions = {
            str(i): {"digest": r.digest, "sq_norms": r.slice_sq_norms} for i, r in result.results.items()
        }
        assert self.worker is not None
        self.client.phase_report(
            Report(
                run_id=work.run_id,
                epoch=work.epoch,
                hop_id=-1,
                inner_step=self.worker.inner_step,
                input_sha256=None,
                output_sha256=None,
                output_md5=None,
                extra={"kind": "merge", "partitions": partitions, "failed": result.failed},
            )
        )

    def _apply(self, work: Work) -> None:
        assert self.worker is not None and work.input_url
        self._load_flat(work.input_url, work.input_sha256)
        digest = wire.sha256(encode_f32(self.worker.flat_weights()))
        self.client.phase_report(
            Report(
                run_id=work.run_id,
                epoch=work.epoch,
                hop_id=-1,
                inner_step=0,
                input_sha256=work.input_sha256,
                output_sha256=digest,
                output_md5=None,
                extra={"kind": "apply"},
            )
        )
        logger.info("epoch {} applied: stage {} weights {}", work.epoch, self.stage, digest[:12])

    def snapshot(self) -> dict[str, float | int | str | None]:
        """What the health port and `iota miner status` show."""
        return {
            "hotkey": self.client.hotkey,
            "stage": self.stage,
            "hops_done": self.state.hops_done,
            "last_loss": self.state.last_loss,
            "inner_step": self.worker.inner_step if self.worker else 0,
            "clock_offset_s": self.client.auth.offset_s,
            "pid": os.getpid(),
            "at": time.time(),
        }

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
