"""Expiring objects the run no longer needs: activations past their audit window, and old checkpoints."""

from __future__ import annotations

from iota.storage import keys
from iota.storage.base import ObjectStore


def delete_activations_older_than(store: ObjectStore, run: str, epoch_cutoff: int) -> int:
    """Delete every activation of `run` from epochs before epoch_cutoff; returns how many were deleted.

    The caller picks the cutoff so that no audit can still ask for them (the current epoch minus the window).
    """
    deleted = 0
    for key in store.list(keys.activations_prefix(run)):
        parsed = keys.parse_activation(key)
        if parsed is not None and parsed.run == run and parsed.epoch < epoch_cutoff:
            store.delete(key)
            deleted += 1
    return deleted


def keep_last_checkpoints(store: ObjectStore, run: str, k: int) -> list[int]:
    """Keep the k newest complete checkpoints (those with a manifest) and delete every older one's objects.

    Checkpoints newer than the oldest kept one are never touched, even without a manifest: they may be being
    written. Returns the epochs whose objects were deleted.
    """
    if k < 1:
        raise ValueError(f"must keep at least one checkpoint, got k={k}")
    objects_by_epoch: dict[int, list[str]] = {}
    for key in store.list(keys.checkpoints_prefix(run)):
        epoch = keys.parse_checkpoint_epoch(key)
        if epoch is not None:
            objects_by_epoch.setdefault(epoch, []).append(key)
    complete = sorted(
        epoch
        for epoch, objects in objects_by_epoch.items()
        if keys.checkpoint_manifest(run, epoch) in objects
    )
    if len(complete) < k:
        return []  # fewer than k complete: keep everything
    oldest_kept = complete[-k]
    doomed = sorted(epoch for epoch in objects_by_epoch if epoch < oldest_kept)
    for epoch in doomed:
        manifest = keys.checkpoint_manifest(run, epoch)
        # Manifest first: a deletion cut short leaves an incomplete checkpoint, never one that looks whole.
        if manifest in objects_by_epoch[epoch]:
            store.delete(manifest)
        for key in objects_by_epoch[epoch]:
            if key != manifest:
                store.delete(key)
    return doomed
