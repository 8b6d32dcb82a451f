"""What a run keeps, and the pass after each checkpoint that forgets the rest: in the bucket, an epoch's objects
once no audit can read them, activations no hop names, checkpoints past the newest few (iota.storage.lifecycle);
in the state, an expired epoch's hops, values and routine verdicts.

An epoch's objects (activations, pseudo-gradients, merged slices, snapshots, the checkpoint it started from) stay
for `keep_epochs` epochs after it, and for as long as an open audit (unanswered, its URLs still valid) or an
unsettled claim names it. End-of-epoch audits still queued for an epoch past that are dropped unserved. The state
keeps the same epochs' detail, and at least scoring's window (iota.audit.scoring.WINDOW_EPOCHS), so weights follow
from the same work and verdicts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loguru import logger

from iota.audit.scoring import WINDOW_EPOCHS
from iota.orchestrator.ledgers import AuditRecord, EndAuditQueue, ScoreArchive
from iota.orchestrator.ledgers import keys as ledger_keys
from iota.orchestrator.state import StateStore, settles_nothing
from iota.storage import lifecycle
from iota.storage.base import ObjectStore


@dataclass(frozen=True)
class RetentionSettings:
    keep_epochs: int = 4  # epochs before the latest checkpoint's whose objects stay for audits
    keep_checkpoints: int = 2  # newest complete checkpoints kept, besides those of kept epochs
    url_ttl_s: int = 900  # an unanswered audit is open while its URLs live

    def __post_init__(self) -> None:
        if self.keep_epochs < 1 or self.keep_checkpoints < 1:
            raise ValueError(f"keep at least one epoch and one checkpoint: {self}")


@dataclass(frozen=True)
class Pass:
    """What one pass kept and forgot."""

    checkpoint: int
    keep: lifecycle.Keep
    objects: lifecycle.Expired
    rows: dict[str, int]


class Retention:
    def __init__(
        self,
        run_id: str,
        state: StateStore,
        store: ObjectStore,
        settings: RetentionSettings,
        clock: Callable[[], float] = time.time,
    ):
        self.run_id, self.state, self.store, self.settings, self.clock = run_id, state, store, settings, clock
        self._lock = threading.Lock()
        self._due = False
        self._thread: threading.Thread | None = None

    def wake(self) -> None:
        """A checkpoint was published: run a pass on a background thread, off every request's path. One pass
        at a time; a wake during a pass runs another after it. A pass that fails is retried at the next wake."""
        with self._lock:
            self._due = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._passes, name="retention", daemon=True)
                self._thread.start()

    def wait(self, timeout_s: float | None = None) -> None:
        """Return once no pass is running or due (tests, and a clean shutdown)."""
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)

    def _passes(self) -> None:
        while True:
            with self._lock:
                if not self._due:
                    self._thread = None  # under the lock: a wake from now on starts a new thread
                    return
                self._due = False
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 (a failed pass must not stop the orchestrator: logged, retried)
                logger.exception("retention pass failed; the next checkpoint retries it")

    def run_once(self) -> Pass | None:
        """One pass over the bucket and the state, relative to the latest checkpoint; None before the first."""
        with self.state.transaction():  # it waits for the transaction that published the checkpoint to end
            checkpoint = self.state.run.checkpoint
            if checkpoint is None:
                return None
            latest = checkpoint.epoch
            objects_from = latest - self.settings.keep_epochs
            rows_from = min(objects_from, latest - WINDOW_EPOCHS)
            # Before the pins are read: an audit issued from the queue after this names a kept epoch.
            self._drop_unservable_end_audits(objects_from)
        pinned = self._pinned(self.clock())
        keep = lifecycle.Keep(objects_from, self.settings.keep_checkpoints, frozenset(pinned))
        objects = lifecycle.expire(self.store, self.run_id, keep, self.state.live_activations)

        def expired(epoch: int) -> bool:
            return epoch < rows_from and epoch not in pinned

        with self.state.transaction():
            rows = self.state.forget(expired)
            rows["audits"] = self._forget_audits(expired)
            self._compact_archive(expired)
        done = Pass(latest, keep, objects, rows)
        logger.info(
            "retention after checkpoint {}: {} objects and checkpoints {} deleted, rows forgotten {}",
            latest,
            objects.total,
            list(objects.checkpoints),
            rows,
        )
        return done

    def _drop_unservable_end_audits(self, objects_from: int) -> None:
        queue = self.state.audits.end_audits()
        claimed = {claim.epoch for claim in self.state.audits.claims().values()}
        servable = [entry for entry in queue.pending if entry[0] >= objects_from or entry[0] in claimed]
        if len(servable) < len(queue.pending):
            self.state.audits.set_end_audits(EndAuditQueue(through=queue.through, pending=servable))

    def _audits(self) -> list[tuple[str, AuditRecord]]:
        return [
            (key, AuditRecord.model_validate(value))
            for key, value in self.state.items(ledger_keys.audit(""))
            if value is not None
        ]

    def _is_open(self, audit: AuditRecord, now: float) -> bool:
        return audit.answered is None and now < audit.issued + self.settings.url_ttl_s

    def _pinned(self, now: float) -> set[int]:
        """Epochs an open audit or an unsettled claim still reads."""
        claims = {claim.epoch for claim in self.state.audits.claims().values()}
        return claims | {audit.epoch for _, audit in self._audits() if self._is_open(audit, now)}

    def _forget_audits(self, expired: Callable[[int], bool]) -> int:
        """The records of an expired epoch's closed audits (a verdict for one is then refused as unknown)."""
        now = self.clock()
        doomed = [
            key for key, audit in self._audits() if expired(audit.epoch) and not self._is_open(audit, now)
        ]
        self.state.drop(doomed)
        return len(doomed)

    def _compact_archive(self, expired: Callable[[int], bool]) -> None:
        """The score log carried over from the bucket loses what `forget` drops from the state's own. A state
        without one gets an empty one: it is not fresh, and must not restore the bucket's log over its own."""
        archive = self.state.audits.score_archive() or ScoreArchive(work={}, verdicts=[])

        def kept(verdict: dict[str, Any]) -> bool:
            return not (
                expired(int(verdict["epoch"])) and settles_nothing(verdict["passed"], verdict["detail"])
            )

        compacted = archive.model_copy(
            update={
                "work": {e: rows for e, rows in archive.work.items() if not expired(int(e))},
                "verdicts": [v for v in archive.verdicts if kept(v)],
            }
        )
        if compacted != self.state.audits.score_archive():
            self.state.audits.set_score_archive(compacted)
