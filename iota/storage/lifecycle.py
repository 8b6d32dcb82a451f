"""Expiring what a run no longer needs from its bucket: each epoch's objects once no audit can read them, the
activations no hop names (outputs of leases that lapsed or were released), and checkpoints past the newest few.

The caller (iota.orchestrator.retention) decides what must stay, from the run's state: `Keep`. This module only
turns that into deletions, on any ObjectStore, one listing of the run per pass.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from iota.storage import keys
from iota.storage.base import ObjectStore


@dataclass(frozen=True)
class Keep:
    """What a pass keeps of a run's objects."""

    epochs_from: int  # every object of this epoch and later: audits may still read them
    checkpoints: int  # the newest complete checkpoints kept, besides the checkpoints of kept epochs
    pinned: frozenset[int] = frozenset()  # older epochs an open audit or claim still reads

    def __post_init__(self) -> None:
        if self.checkpoints < 1:
            raise ValueError(f"must keep at least one checkpoint, got {self.checkpoints}")

    def epoch(self, epoch: int) -> bool:
        """Whether the objects of `epoch` (its activations, uploads, merges, snapshots, checkpoint) stay."""
        return epoch >= self.epochs_from or epoch in self.pinned


@dataclass(frozen=True)
class Expired:
    """What one pass deleted."""

    activations: int = 0
    epoch_objects: int = 0  # pseudo-gradients, merged slices and snapshots
    checkpoints: tuple[int, ...] = ()  # epochs whose checkpoint objects were deleted
    scores: int = 0  # mirrored score logs

    @property
    def total(self) -> int:
        return self.activations + self.epoch_objects + self.scores


def expire(store: ObjectStore, run: str, keep: Keep, live: Callable[[], Collection[str]]) -> Expired:
    """Delete what `keep` does not keep of `run`. `live()` names the activations that hops still read or write
    (done or leased). It is read after the listing: every activation listed was uploaded under a lease issued
    before that, so `live()` knows whether its hop is still leased, done, or gave the lease up."""
    listing = store.list(keys.run_prefix(run))
    manifests, others, expired = _doomed(listing, run, keep, live())
    # Manifests first: a pass cut short leaves an incomplete checkpoint, never one that looks whole.
    store.delete_many(manifests)
    store.delete_many(others)
    return expired


def _doomed(
    listing: list[str], run: str, keep: Keep, live: Collection[str]
) -> tuple[list[str], list[str], Expired]:
    """(checkpoint manifests, every other doomed key, the counts) of one listing of the run."""
    activations, epoch_objects = [], []
    checkpoints: dict[int, list[str]] = {}
    scores: dict[int, str] = {}
    for key in listing:
        if (activation := keys.parse_activation(key)) is not None and activation.run == run:
            if not keep.epoch(activation.epoch) or key not in live:
                activations.append(key)
        elif (epoch := keys.parse_epoch_object(key)) is not None:
            if not keep.epoch(epoch):
                epoch_objects.append(key)
        elif (epoch := keys.parse_checkpoint_epoch(key)) is not None:
            checkpoints.setdefault(epoch, []).append(key)
        elif (epoch := keys.parse_scores_epoch(key, run)) is not None:
            scores[epoch] = key
    complete = sorted(e for e, found in checkpoints.items() if keys.checkpoint_manifest(run, e) in found)
    if len(complete) < keep.checkpoints:
        gone_checkpoints: list[int] = []  # fewer complete than kept: keep everything
        gone_scores: list[int] = []
    else:
        # Checkpoints newer than the oldest kept one are never touched, even without a manifest (being written).
        oldest_kept = complete[-keep.checkpoints]
        gone_checkpoints = sorted(e for e in checkpoints if e < oldest_kept and not keep.epoch(e))
        # A resumed run restores the newest score log not newer than its checkpoint: those of kept checkpoints
        # stay, and the newest always (the latest checkpoint's may not be mirrored yet).
        gone_scores = [e for e in scores if e < oldest_kept and e != max(scores)]
    manifests = [m for e in gone_checkpoints if (m := keys.checkpoint_manifest(run, e)) in checkpoints[e]]
    others = [
        *activations,
        *epoch_objects,
        *(key for e in gone_checkpoints for key in checkpoints[e] if key not in manifests),
        *(scores[e] for e in gone_scores),
    ]
    counts = Expired(len(activations), len(epoch_objects), tuple(gone_checkpoints), len(gone_scores))
    return manifests, others, counts
