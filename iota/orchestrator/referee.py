"""Settling a stage's merge: a partition is accepted where its two owners agree on what the bucket holds, recomputed
here where they disagree or one never answered, and the stage's new weights are assembled from what was accepted.

The orchestrator keeps the bytes it checked and never reads an accepted result again: an owner's merge outputs
stay writable through its presigned URLs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from iota.merge import MergePlan, Partition, apply_merged, partition_digest, run_owner
from iota.model.flat import decode_f32, encode_f32
from iota.orchestrator.state import StateStore
from iota.protocol import PartitionDone
from iota.storage.base import ObjectStore

ORCHESTRATOR = "orchestrator"  # owner name under which the orchestrator writes partitions it recomputed


@dataclass(frozen=True)
class Accepted:
    """One partition's merge result as the orchestrator checked it: the bytes themselves, never a key to re-read."""

    owner: str  # whose result it is: an owner, or ORCHESTRATOR when it recomputed and neither owner matched
    weights: bytes
    momentum: bytes


def settle(
    state: StateStore, store: ObjectStore, plan: MergePlan, now: float
) -> tuple[dict[int, Accepted], dict[int, dict[str, float]]]:
    """Each partition's accepted result, and the squared norms of each upload's slice its merge measured (what the
    submitters' claimed norms are checked against). A partition whose previous state is unreadable has neither."""
    epoch = plan.epoch
    reports = {h: state.merges.report(epoch, plan.stage, h) or {} for h in plan.hotkeys}
    accepted: dict[int, Accepted] = {}
    sq_norms: dict[int, dict[str, float]] = {}
    for partition in plan.partitions:
        i = partition.index
        digests = {h: _digest(reports[h].get(i)) for h in partition.owners}
        uploaded: dict[str, tuple[bytes, bytes]] = {}
        for h, digest in digests.items():
            if not digest:
                continue
            # A report vouches only for what the bucket holds: else an owner that reports the honest digest
            # over garbage (or NaN) slices would have them accepted whenever its partner agrees.
            slices = _uploaded(store, partition, plan, h)
            if slices is None or partition_digest(*slices) != digest:
                why = (
                    "its uploaded slices are missing, the wrong size or not finite"
                    if slices is None
                    else "its uploaded slices differ from its report"
                )
                state.log(now, "merge_mismatch", h, epoch=epoch, stage=plan.stage, partition=i, why=why)
                digests[h] = None
            else:
                uploaded[h] = slices
        present = [h for h, d in digests.items() if d]
        agreed = len(present) == len(partition.owners) and len({digests[h] for h in present}) == 1
        if agreed:
            owner = present[0]
            weights, momentum = uploaded[owner]
            sq_norms[i] = reports[owner][i].sq_norms
        else:
            # Disagreement, or an owner that never answered: recompute here and keep whichever matches.
            result = run_owner(store, plan, ORCHESTRATOR, partitions=[i]).results.get(i)
            if result is None:
                continue  # previous state unreadable: apply keeps last epoch's values
            owner = next((h for h in present if digests[h] == result.digest), ORCHESTRATOR)
            for h in present:
                if digests[h] != result.digest:
                    state.log(now, "merge_mismatch", h, epoch=epoch, stage=plan.stage, partition=i)
            sq_norms[i] = result.slice_sq_norms
            weights, momentum = encode_f32(result.weights), encode_f32(result.momentum)
        accepted[i] = Accepted(owner=owner, weights=weights, momentum=momentum)
    return accepted, sq_norms


def assemble(store: ObjectStore, plan: MergePlan, accepted: dict[int, Accepted]) -> torch.Tensor:
    """The stage's new flat weights: each accepted partition from its checked bytes; a partition nobody merged
    keeps last epoch's values (from the previous checkpoint, which only we write)."""
    slices = _CheckedSlices({str(index): result.weights for index, result in accepted.items()}, store)
    return apply_merged(slices, plan, {index: str(index) for index in accepted})


class _CheckedSlices:
    """The merge package's BlobStore for `apply_merged`: the accepted slices as checked, in memory, over the
    bucket, from which only last epoch's weights are read."""

    def __init__(self, slices: dict[str, bytes], bucket: ObjectStore):
        self.slices, self.bucket = slices, bucket

    def get(self, key: str) -> bytes:
        return self.slices[key]

    def get_range(self, key: str, start: int, end: int) -> bytes:
        return self.bucket.get_range(key, start, end)

    def put(self, key: str, data: bytes) -> None:
        raise TypeError("the accepted slices are read-only")


def _uploaded(
    store: ObjectStore, partition: Partition, plan: MergePlan, owner: str
) -> tuple[bytes, bytes] | None:
    """The weights and momentum slices `owner` uploaded for `partition`, read once; None if either is missing,
    the wrong size or not finite (two colluding owners must not carry NaN momentum into every later epoch)."""
    try:
        slices = (
            store.get(plan.output_key(partition.index, owner, "weights")),
            store.get(plan.output_key(partition.index, owner, "momentum")),
        )
    except KeyError:  # ObjectNotFound; other store errors fail the request, which is retried
        return None
    for data in slices:
        if len(data) != 4 * partition.size or not bool(torch.isfinite(decode_f32(data)).all()):
            return None
    return slices


def _digest(done: PartitionDone | None) -> str | None:
    return done.digest if done is not None else None
