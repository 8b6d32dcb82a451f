"""A miner's phase work at the end of an epoch (upload, merge, apply) and its answers to snapshot challenges.

Upload the pseudo-gradient, merge this miner's partitions, apply the next epoch's weights; a challenged
snapshot is copied between hops and uploaded on its own thread while the next hops compute."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from loguru import logger

from iota.client.orchestrator import Refused
from iota.client.transfers import UrlStore, put
from iota.merge import BlobStore, HeldCopies, MergePlan, run_owner
from iota.miner.daemon import Daemon
from iota.miner.reports import phase_report
from iota.model import wire
from iota.model.flat import encode_f32
from iota.protocol import (
    ApplyDone,
    MergeDone,
    PartitionDone,
    PhaseResult,
    SnapshotDone,
    SnapshotTaken,
    UploadDone,
    Work,
)
from iota.storage.base import StoreError
from iota.train.snapshot import Snapshot, snapshot_to_f32

# An owner's merge over a link with a long round trip: partitions merged at once (and as many merged outputs
# uploading meanwhile), each one's uploads read 4 at a time; the bits depend on neither. Memory: about 8 partitions'
# slices at once instead of 1 (each partition being merged holds its slice of every upload and of the previous
# state; one uploading, its two outputs).
MERGE_PARTITIONS = 4
MERGE_FETCHES = 4


class Phases:
    """Upload, merge and apply, in turn, on the main thread (nothing of the epoch's training is in flight by
    then); a snapshot challenge is copied on the main thread and answered on the snapshot thread."""

    def __init__(self, miner: Daemon):
        self.miner = miner
        self._snapshots = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot")
        # The challenged snapshot being uploaded: (the step this miner was at when it took it, the answer's future).
        self.answering: tuple[int, Future[None]] | None = None
        # This epoch's pseudo-gradient as uploaded, (epoch, bytes), until APPLY: the merge reads its own slices here.
        self._uploaded: tuple[int, bytes] | None = None

    def do(self, work: Work, handler: Callable[[Work], None] | None = None) -> None:
        """Do one item of phase work (or `handler(work)`); a refusal is logged, a failure logged and released."""
        handle = handler or getattr(self, work.kind)  # a method per kind: upload, merge, apply, snapshot
        try:
            handle(work)
        except Refused as error:
            logger.warning("{} item {} refused: {}", work.kind, work.hop_id, error)
        except (KeyError, ValueError, OSError, StoreError) as error:
            logger.error("{} item {} failed: {}: {}", work.kind, work.hop_id, type(error).__name__, error)
            self.miner.release(work)

    def wait_answered(self, before_step: int | None = None) -> None:
        """Wait until the last challenged snapshot is answered; with `before_step`, only if this miner was at an
        earlier inner step than that when it took it."""
        answering = self.answering
        if answering is not None and (before_step is None or before_step > answering[0]):
            answering[1].result()

    def close(self) -> None:
        """Wait for the answer being uploaded, if any."""
        self._snapshots.shutdown(wait=True)

    def upload(self, work: Work) -> None:
        worker = self.miner.loaded_worker
        assert work.output_url
        pseudo = worker.pseudo_gradient()
        done = UploadDone(norm=float(pseudo.double().norm()))
        data = encode_f32(pseudo)
        self._put_and_report(work, data, worker.inner_step, done)
        self._uploaded = (work.epoch, data)

    def merge(self, work: Work) -> None:
        if work.merge is None:
            raise ValueError("a merge item without its merge order")
        plan = MergePlan.model_validate(work.merge.plan)
        store: BlobStore = UrlStore(work.merge.get, work.merge.put, self.miner.http, 4 * plan.n_params)
        mine = [s.upload_key for s in plan.submitters if s.hotkey == self.miner.client.hotkey]
        if mine and self._uploaded is not None and self._uploaded[0] == work.epoch:
            # The bytes it sent are what the bucket holds: its own slices are read from them.
            store = HeldCopies(store, {mine[0]: self._uploaded[1]})
        result = run_owner(
            store, plan, self.miner.client.hotkey, fetch_workers=MERGE_FETCHES, workers=MERGE_PARTITIONS
        )
        partitions = {
            i: PartitionDone(digest=r.digest, sq_norms=r.slice_sq_norms) for i, r in result.results.items()
        }
        done = MergeDone(partitions=partitions, failed=result.failed)
        self.miner.client.phase_report(phase_report(work, self.miner.loaded_worker.inner_step, done))

    def apply(self, work: Work) -> None:
        assert work.input_url
        self._uploaded = None
        worker = self.miner.loaded_worker
        self.miner.load_flat(work.input_url, work.input_sha256)
        digest = wire.sha256(encode_f32(worker.flat_weights()))
        self.miner.client.phase_report(
            phase_report(work, 0, ApplyDone(), input_sha256=work.input_sha256, kept_sha256=digest)
        )
        logger.info("epoch {} applied: stage {} weights {}", work.epoch, self.miner.stage, digest[:12])

    def snapshot(self, work: Work) -> None:
        """A challenge (iota.orchestrator.challenges) of a step some steps back: the exact state kept for it, said
        taken, and left to the snapshot thread to upload. Uploading it here stalled the whole pipeline (seconds at
        100M parameters a stage, minutes at billions)."""
        assert work.output_url and work.challenged_step is not None
        worker = self.miner.loaded_worker
        snapshot = self.miner.kept_state(work.epoch, work.challenged_step)
        if snapshot is None:
            raise ValueError(f"the state after inner step {work.challenged_step} is no longer kept")
        worker.challenged(snapshot.inner_step)
        # Reports up to the step this miner is at go on; past it, they wait for the answer (as the orchestrator).
        taken = SnapshotTaken(step=snapshot.inner_step)
        self.miner.client.phase_report(phase_report(work, worker.inner_step, taken))
        self.answering = (
            worker.inner_step,
            self._snapshots.submit(self.do, work, lambda w: self.answer(w, snapshot)),
        )

    def answer(self, work: Work, snapshot: Snapshot) -> None:
        """Snapshot thread: the kept snapshot, encoded, uploaded and reported; a report past the step the miner had
        reached when it took it waits for this (iota.miner.hops)."""
        done = SnapshotDone(step=snapshot.inner_step)
        self._put_and_report(work, encode_f32(snapshot_to_f32(snapshot)), snapshot.inner_step, done)
        logger.info("snapshot of inner step {} uploaded", snapshot.inner_step)

    def _put_and_report(self, work: Work, data: bytes, inner_step: int, result: PhaseResult) -> None:
        """Phase work that produces one object: upload it to the item's URL, then report it with its digests."""
        assert work.output_url
        put(work.output_url, data, self.miner.http)
        self.miner.client.phase_report(phase_report(work, inner_step, result, output=data))
