"""A miner's forward and backward hops: fetched, computed and sent, and the inner steps they complete.

Fetched on the prefetch thread, computed on the main thread, sent on the outbox thread (iota.miner.pipeline);
each inner step they complete is committed to by a sketch of the weights, sent with the report that completed
it."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from loguru import logger

from iota.audit.compare import thresholds
from iota.client.orchestrator import Refused
from iota.client.transfers import get, put
from iota.miner.daemon import Daemon
from iota.miner.pipeline import Fetched, Outbox, Prefetcher
from iota.miner.reports import hop_report
from iota.protocol import ReleaseReason, Report, WeightSketch, Work
from iota.protocol.bounds import SNAPSHOT_LEAD
from iota.storage.base import StoreError
from iota.storage.transfer import DigestMismatch
from iota.train.schedule import inner_step_lr
from iota.train.snapshot import Snapshot, StateRing, take_snapshot
from iota.train.worker import InputRefused, sketch_seed


def release_reason(error: BaseException | None) -> ReleaseReason:
    """What the release of a hop not done says. Input bytes that do not hash to the item's digest, or that do
    (the download checked) but do not decode, accuse the miner that produced them: the orchestrator checks the
    claim. Any other error is this miner's own failure (a non-finite output of its own compute included: it
    cannot prove what drove it there, so it sends nothing and accuses nobody); no error, a hop it did not
    start."""
    if error is None:
        return "stopping"
    if isinstance(error, DigestMismatch):
        return "input_mismatch"
    if isinstance(error, InputRefused):  # raised by the worker's decode of its input, and nowhere else
        return "input_undecodable"
    return "failed"


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
        return hop_report(
            self.work,
            self.inner_step,
            input=self.input,
            output=self.output,
            loss=self.loss,
            tokens=self.tokens,
            sketch=self.sketch,
        )


class Hops:
    """The hops of one miner, and what the orchestrator has been told of them.

    The main thread calls `fetch_next`, `take`, `hop`, `drain`, `apply_refusals` and `forget_abandoned`; the stage
    worker (`miner.worker`, replaced when the miner registers on another stage) is touched there only.
    """

    def __init__(self, miner: Daemon, hold_s: float, depth: int = 1):
        self.miner = miner
        self.hold_s = hold_s  # how long the orchestrator may hold a request for work while it has none
        # Depth d: d requests for work (with their downloads) and d outputs sent at once, d more waiting; so a
        # miner holds at most 3d items unreported (3 at depth 1: one prefetched, one computing, one sending).
        self.prefetch = Prefetcher(self._fetch, depth)
        self.outbox: Outbox[Finished, tuple[int, int]] = Outbox(
            self._send,
            depth=depth,
            on_sent=self.prefetch.kick,
            workers=depth,
            barrier=lambda item: item.sketch is not None,
        )
        self._lock = threading.Lock()  # the counters below, read and written from several threads
        self._forwards_pending = 0  # forwards asked for or leased and not begun: they take room in the window
        self._begun = 0  # hops the main thread has begun (a stale `holding` list is not acted on)
        self._polling = False  # a search's request for work is not held (see _fetch)
        self._phase_done: dict[tuple[str, int, int | None, int | None], float] = {}
        # The hop on the main thread, from when it starts computing until it is in the outbox.
        self._computing: Work | None = None
        self._graph_hops: dict[int, int] = {}  # sample -> the item whose forward made its cached graph
        # The sketch of each recent step, and per epoch the last step whose sketch the orchestrator accepted: when
        # the report that completed a step is refused, the next report at that step carries its sketch instead.
        self._sketches: dict[tuple[int, int], WeightSketch] = {}
        self._committed: dict[int, int] = {}
        # The exact state after each recent step: a snapshot challenge names a step some steps back (sized when
        # the first step is kept: the replay depth of the worker's precision, plus how far this miner runs ahead).
        self.states: StateRing | None = None

    # -- main thread ------------------------------------------------------------------------------------

    def admit(self, depth: int) -> None:
        """The orchestrator holds at most `depth` of this miner's requests for work at once, and leases as many
        items as that depth needs: ask no more than that (more would answer one another's held requests)."""
        if depth < self.prefetch.depth:
            logger.warning(
                "IOTA_PIPELINE_DEPTH is {} but the orchestrator admits {} requests at once: using {}",
                self.prefetch.depth,
                depth,
                depth,
            )
            self.prefetch.depth = depth
            self.outbox.depth = depth

    def fetch_next(self, after_s: float = 0.0) -> None:
        """Start looking for the next item, after `after_s` (a `wait` to honour)."""
        self.prefetch.start(self._ask_forward, after_s=after_s)

    def stale(self, fetched: Fetched) -> bool:
        """A phase item or challenge asked for before the same one was done (several searches at once brought it
        twice): not done again. One asked for afterwards is the orchestrator asking again, and is done."""
        done_at = self._phase_done.get(_phase_key(fetched.work))
        return done_at is not None and fetched.asked_at < done_at

    def phase_done(self, work: Work) -> None:
        if len(self._phase_done) > 64:
            self._phase_done.clear()
        self._phase_done[_phase_key(work)] = time.monotonic()

    def take(self) -> Fetched | None:
        """The next item (None: the miner is stopping), once the prefetch thread has it."""
        return self.prefetch.take(stopping=lambda: self.miner.state.stopping)

    def hop(self, fetched: Fetched) -> None:
        """Compute a fetched forward or backward and hand it to the outbox; look for the next item meanwhile."""
        work = fetched.work
        worker = self.miner.loaded_worker
        assert work.sample_id is not None
        self._begun += 1
        if fetched.error is not None or (work.kind == "forward" and not worker.wants_forward()):
            # A failed download; or a forward prefetched on a guess that this window would have room (a worker
            # that counts differently): hand it back as today's loop would have.
            self._taken(work)
            why = fetched.error or "no room in this accumulation window"
            logger.error("{} item {} not done: {}", work.kind, work.hop_id, why)
            self.miner.release(work, release_reason(fetched.error))
            self._search_all()
            return
        self._computing = work
        self._taken(work)  # counted as computing from here
        self._search_all()
        started = time.perf_counter()
        try:
            finished = self.compute(work, fetched.data)
        except (KeyError, ValueError, OSError, StoreError) as error:
            logger.error("{} item {} failed: {}: {}", work.kind, work.hop_id, type(error).__name__, error)
            self.miner.release(work, release_reason(error))
        else:
            self.miner.state.compute_s += time.perf_counter() - started
            self.outbox.put(finished)  # counted as unreported from here on, so clear `_computing` after
        self._computing = None

    def compute(self, work: Work, data: bytes | None) -> Finished:
        """The stage's forward or backward, and the inner step it completes."""
        worker, run = self.miner.loaded_worker, self.miner.run
        assert work.sample_id is not None and work.hop_id is not None
        out: bytes | None
        loss, sketch = None, None
        if work.kind == "forward":
            out, loss = worker.forward(work.sample_id, data)
            if not worker.spec.is_tail:
                self._graph_hops = {s: h for s, h in self._graph_hops.items() if s in worker.cache}
                self._graph_hops[work.sample_id] = work.hop_id
        else:
            if data is None:
                raise ValueError("a backward item names no input")
            out = worker.backward(work.sample_id, data)
        if worker.step_due():
            plan = work.plan
            lr = inner_step_lr(
                self.miner.schedule,
                plan.tokens_at_start,
                worker.inner_step,
                run.accumulate,
                run.micro_batch_tokens,
                plan.replicas,
            )
            worker.step(lr)
            sketch = worker.sketch(sketch_seed(run.seed, work.epoch, worker.inner_step))
            step = worker.inner_step
            self._sketches = {
                k: v for k, v in self._sketches.items() if k[0] == work.epoch and k[1] > step - 4
            }
            self._sketches[(work.epoch, step)] = sketch
            self._keep_state(work.epoch)
        return Finished(work, data, out, loss, worker.inner_step, run.micro_batch_tokens, sketch)

    def _keep_state(self, epoch: int) -> None:
        worker = self.miner.loaded_worker
        if self.states is None:
            delay = thresholds(worker.device.type == "cuda").depth  # what the orchestrator waits for
            self.states = StateRing(delay + SNAPSHOT_LEAD + self.prefetch.depth)
        self.states.keep(epoch, take_snapshot(worker))

    def state_after(self, epoch: int, step: int) -> Snapshot | None:
        """The exact state this miner kept for `step` of `epoch`, if it still holds it."""
        return None if self.states is None else self.states.get(epoch, step)

    def drain(self) -> None:
        """Wait until every finished hop is sent, then act on the refused ones."""
        self.outbox.drain()
        self.apply_refusals()

    def apply_refusals(self) -> None:
        """Forget the graphs of forwards whose report was refused (their backward will never come), unless the
        sample has since been forwarded again here under a new item."""
        for sample_id, hop_id in self.outbox.collect():
            if self.miner.worker is not None and self._graph_hops.get(sample_id) == hop_id:
                del self._graph_hops[sample_id]
                self.miner.worker.forget([sample_id])

    def forget_abandoned(self, fetched: Fetched) -> None:
        """A `wait` lists the samples whose backward is still coming: the other cached graphs never will be (unless
        a hop begun since the request made one)."""
        worker, work = self.miner.worker, fetched.work
        if worker is not None and work.holding is not None and fetched.begun == self._begun:
            holding = set(work.holding)
            worker.forget([s for s in list(worker.cache) if s not in holding])

    # -- prefetch thread --------------------------------------------------------------------------------

    def _fetch(self, forward: bool) -> Fetched:
        """One request for work, and the input of a leased hop."""
        asked_at, begun = time.monotonic(), self._begun
        quiet = self._computing is None and not self.outbox.unsent()
        # A held request answers when work for this miner appears, or when the miner reports, since a report may
        # change what it asks for. Not while it declines forward work only until a forward of its own is
        # reported: that report may reach the orchestrator first, and the request would be held with a stale ask.
        # One search at a time asks so (it is answered at once, and asks again every `wait_s`); the others' requests
        # are held: a stale ask delays only the one that made it.
        with self._lock:
            polls = not forward and self._forward_unreported() and not self._polling
            self._polling = self._polling or polls
        try:
            work = self.miner.client.work(forward=forward, hold_s=0.0 if polls else self.hold_s)
        except BaseException:
            if forward:
                self._release_room()
            raise
        finally:
            if polls:
                self._polling = False
        if forward and work.kind != "forward":
            self._release_room()
        if work.kind not in ("forward", "backward") or not work.input_url:
            return Fetched(work, quiet=quiet, asked_at=asked_at, begun=begun)
        max_bytes = self.miner.loaded_worker.max_bytes
        try:
            data = get(work.input_url, work.input_sha256, max_bytes, self.miner.http)
        except (ValueError, OSError, StoreError) as error:
            return Fetched(work, error=error, asked_at=asked_at, begun=begun)
        return Fetched(work, data, asked_at=asked_at, begun=begun)

    def _ask_forward(self) -> bool:
        """Whether a request may ask for forward work, decided at each request a search makes; a yes takes room in
        the window until the answer (or, if it is a forward, until the main thread begins it)."""
        with self._lock:
            if not self._room():
                return False
            self._forwards_pending += 1
            return True

    def _release_room(self) -> None:
        with self._lock:
            self._forwards_pending -= 1

    def _taken(self, work: Work) -> None:
        """The main thread has taken a fetched item: a forward no longer waits for room."""
        if work.kind == "forward":
            self._release_room()

    def _search_all(self) -> None:
        """Keep the prefetch's searches going while hops compute."""
        while self.prefetch.searching < self.prefetch.depth:
            self.prefetch.start(self._ask_forward)

    def _room(self) -> bool:
        """At most k forwards per window, counting those asked for and leased: the window has room now, or will
        once the hop computing is done (and the inner step it completes taken). The next forward is asked for while
        this one computes and uploads: the orchestrator counts a leased forward among the graphs a miner holds,
        so asking early cannot exceed its limit."""
        worker = self.miner.worker
        if worker is None:
            return True
        k, current = worker.flags.accumulate, self._computing
        pending = self._forwards_pending
        if current is None:
            return worker.window_forwards + pending < k
        forward = current.kind == "forward"
        # StageWorker.forward replaces a cached graph of the same sample; the tail's forward is also a backward.
        forwards = worker.window_forwards + pending + (forward and current.sample_id not in worker.cache)
        micro_batches = worker.micro_batches + (not forward or worker.spec.is_tail)
        if micro_batches >= k:  # the hop computing ends the window: what is asked for now is the next one's
            return pending < k
        return forwards < k

    def _forward_unreported(self) -> bool:
        computing = self._computing
        if computing is not None and computing.kind == "forward":
            return True
        return any(item.work.kind == "forward" for item in self.outbox.unsent())

    # -- outbox thread ----------------------------------------------------------------------------------

    def _send(self, item: Finished) -> tuple[int, int] | None:
        """Upload the output, then report it. Returns (sample, hop) of a refused forward."""
        work, miner = item.work, self.miner
        try:
            if item.output is not None:
                assert work.output_url
                put(work.output_url, item.output, miner.http)
            # The orchestrator refuses a later step until the snapshot is answered.
            miner.phases.wait_answered(before_step=item.inner_step)
            report = item.report()
            if report.sketch is None and item.inner_step > self._committed.get(work.epoch, 0):
                # The report that completed this step was refused (its sample restarted, say): commit it here.
                report.sketch = self._sketches.get((work.epoch, item.inner_step))
            miner.client.report(report)
            if report.sketch is not None:
                self._committed[work.epoch] = max(self._committed.get(work.epoch, 0), item.inner_step)
        except Refused as error:
            logger.warning("{} item {} refused: {}", work.kind, work.hop_id, error)
            if work.kind == "forward" and work.sample_id is not None and work.hop_id is not None:
                return work.sample_id, work.hop_id
            return None
        except (KeyError, ValueError, OSError, StoreError) as error:
            logger.error("{} item {} failed: {}: {}", work.kind, work.hop_id, type(error).__name__, error)
            miner.release(work, "failed")
            return None
        with self._lock:
            miner.state.hops_done += 1
            if item.loss is not None:
                miner.state.last_loss = item.loss
        return None


def _phase_key(work: Work) -> tuple[str, int, int | None, int | None]:
    return work.kind, work.epoch, work.hop_id, work.challenged_step
