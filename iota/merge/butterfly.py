"""Butterfly reduce over an object store: each owner merges its partitions from every upload, bit-reproducibly.

Bytes: every vector in the bucket (pseudo-gradients, merged slices, momentum) is raw little-endian fp32, so
elements [a, b) of a vector are the byte range [4a, 4b) and an owner reads only its slices.

Reproducibility: two honest owners must produce the same bits, so that the orchestrator can compare digests.
Everything runs in fp32 on the CPU, uploads in plan order (sorted by hotkey), and every arithmetic step is a
single elementwise torch op (`acc = acc + w * x` as two ops): elementwise IEEE ops round the same on every
machine and thread count, unlike reductions (torch.mean, sum) whose order depends on vector width and threads.
The only reductions (squared norms for clipping and reporting) run in float64, and only a clip factor rounded to
fp32 enters the result.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from loguru import logger

from iota.decoding import DecodeError
from iota.merge.outer import outer_lr, outer_step
from iota.merge.plan import FlatRef, MergePlan, Partition, Submitter
from iota.merge.stores import READ_ERRORS, BlobStore
from iota.model.flat import decode_f32, encode_f32

NORM_RTOL = 1e-3
"""How far (relative) a claimed pseudo-gradient norm may be from the norm of what was uploaded."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def partition_digest(weights: bytes, momentum: bytes) -> str:
    """PartitionResult.digest of a partition's two uploaded slices: what an owner reports, from the bytes alone."""
    return _combined(sha256_hex(weights), sha256_hex(momentum))


def _combined(weights_digest: str, momentum_digest: str) -> str:
    return sha256_hex(f"{weights_digest}:{momentum_digest}".encode())


def pseudo_gradient(theta_start: torch.Tensor, theta_end: torch.Tensor) -> torch.Tensor:
    """What a replica uploads: theta_start - theta_end in fp32 (DiLoCo's outer gradient)."""
    return theta_start.to(torch.float32) - theta_end.to(torch.float32)


def squared_norm(vector: torch.Tensor) -> float:
    """Sum of squares in float64: accurate enough that summing it over slices matches the whole vector's."""
    as64 = vector.to(torch.float64)
    # Not torch.dot: on CPU it goes through BLAS, ~1000x slower than this for slices this size.
    return float((as64 * as64).sum())


# ---------------------------------------------------------------------------------------------------------------
# Merging one partition.


@dataclass
class PartitionResult:
    """One owner's merge of one partition: the new slices, what went in, and the digests of the outputs."""

    index: int
    weights: torch.Tensor  # new theta for the slice, fp32
    momentum: torch.Tensor  # new outer momentum for the slice, fp32
    slice_sq_norms: dict[str, float]  # squared L2 norm of each readable upload's slice, before clipping
    used: list[str]  # hotkeys aggregated, in plan order
    skipped: dict[str, str] = field(default_factory=dict)  # hotkey -> why its upload was left out
    clipped: list[str] = field(default_factory=list)
    weights_digest: str = ""  # sha256 of encode_f32(weights): what the owner uploads
    momentum_digest: str = ""

    @property
    def digest(self) -> str:
        """One digest for both outputs: what the orchestrator compares between the two owners."""
        return _combined(self.weights_digest, self.momentum_digest)


def _read_upload_slice(
    store: BlobStore, submitter: Submitter, partition: Partition, n_params: int
) -> tuple[torch.Tensor | None, str | None]:
    """The upload's slice, or None and the reason it cannot be used."""
    key = submitter.upload_key
    try:
        data = store.get_range(key, partition.start * 4, partition.end * 4)
        # Probe the object's last value and one byte past it: a truncated or over-long upload is then refused by
        # every owner, not only by the owner of the last partition.
        tail = store.get_range(key, n_params * 4 - 4, n_params * 4 + 1)
    except KeyError as error:
        return None, f"missing: {error}"
    except READ_ERRORS as error:
        return None, f"unreadable: {type(error).__name__}: {error}"
    if len(tail) != 4 or len(data) != partition.size * 4:
        return None, f"wrong size: expected {n_params * 4} bytes"
    values = decode_f32(data, partition.size)
    if not bool(torch.isfinite(values).all()):
        return None, "non-finite values in this slice"
    return values, None


def _weighted_mean(slices: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i x_i with w normalised to 1, accumulated in the given order, one elementwise op per step."""
    total = 0.0
    for w in weights:
        total += w  # float64, fixed order
    acc = torch.zeros_like(slices[0])
    for w, x in zip(weights, slices, strict=True):
        term = x * torch.tensor(w / total, dtype=torch.float32)
        acc = acc + term
    return acc


def _trimmed_mean(slices: Sequence[torch.Tensor], weights: Sequence[float], trim: int) -> torch.Tensor:
    """Per coordinate: drop the `trim` lowest and highest values, weighted mean of the rest."""
    stacked = torch.stack(list(slices))  # (R, n)
    # A stable sort of the same input yields the same permutation everywhere, so ties keep plan order.
    ordered, order = torch.sort(stacked, dim=0, stable=True)
    weight_of = torch.tensor(list(weights), dtype=torch.float32)[
        order
    ]  # (R, n): the weight of each sorted value
    acc = torch.zeros_like(slices[0])
    weight_sum = torch.zeros_like(slices[0])
    for rank in range(trim, len(slices) - trim):
        term = ordered[rank] * weight_of[rank]
        acc = acc + term
        weight_sum = weight_sum + weight_of[rank]
    return acc / weight_sum


def _clip(values: torch.Tensor, sq_norm: float, max_norm: float) -> torch.Tensor | None:
    """values scaled to norm max_norm if larger, else None."""
    norm = math.sqrt(sq_norm)
    if norm <= max_norm:
        return None
    return values * torch.tensor(max_norm / norm, dtype=torch.float32)


def merge_partition(
    store: BlobStore,
    plan: MergePlan,
    partition_index: int,
    prev_weights_slice: torch.Tensor,
    prev_momentum_slice: torch.Tensor | None,
    *,
    fetch_workers: int = 1,
) -> PartitionResult:
    """Aggregate partition `partition_index` of every upload and take the outer step; uploads nothing.

    Unusable uploads (missing, wrong size, non-finite in this slice) are skipped and recorded; the rest are
    optionally clipped to C * sqrt(slice/n_params), then combined by weighted mean (weights renormalised over the
    used uploads) or by coordinate-wise trimmed mean. With no usable upload the slice keeps its previous weights
    and momentum. `fetch_workers` > 1 reads uploads concurrently (the aggregation order does not change).
    """
    partition = plan.partitions[partition_index]
    for name, t in (("prev_weights_slice", prev_weights_slice), ("prev_momentum_slice", prev_momentum_slice)):
        if t is not None and (t.dtype != torch.float32 or tuple(t.shape) != (partition.size,)):
            raise ValueError(
                f"{name} must be fp32 of shape ({partition.size},), got {t.dtype} {tuple(t.shape)}"
            )

    def read(submitter: Submitter) -> tuple[torch.Tensor | None, str | None]:
        return _read_upload_slice(store, submitter, partition, plan.n_params)

    if fetch_workers > 1:
        with ThreadPoolExecutor(max_workers=fetch_workers) as pool:
            reads = list(pool.map(read, plan.submitters))
    else:
        reads = [read(s) for s in plan.submitters]

    used: list[str] = []
    slices: list[torch.Tensor] = []
    weights: list[float] = []
    sq_norms: dict[str, float] = {}
    skipped: dict[str, str] = {}
    clipped: list[str] = []
    max_norm = plan.clip * math.sqrt(partition.size / plan.n_params) if plan.clip is not None else None
    for submitter, (values, reason) in zip(plan.submitters, reads, strict=True):
        if values is None:
            skipped[submitter.hotkey] = reason or "unusable"
            logger.warning(f"merge p{partition.index}: skipping {submitter.hotkey}: {reason}")
            continue
        sq_norms[submitter.hotkey] = squared_norm(values)
        if max_norm is not None:
            scaled = _clip(values, sq_norms[submitter.hotkey], max_norm)
            if scaled is not None:
                values = scaled
                clipped.append(submitter.hotkey)
        used.append(submitter.hotkey)
        slices.append(values)
        weights.append(submitter.weight)

    if not slices:
        new_weights = prev_weights_slice.clone()
        new_momentum = (
            prev_momentum_slice.clone()
            if prev_momentum_slice is not None
            else torch.zeros_like(prev_weights_slice)
        )
    else:
        trim = math.floor(plan.trim_fraction * len(slices))
        grad = _trimmed_mean(slices, weights, trim) if trim >= 1 else _weighted_mean(slices, weights)
        new_weights, new_momentum = outer_step(
            prev_weights_slice,
            prev_momentum_slice,
            grad,
            lr=outer_lr(plan.outer, plan.epoch),
            mu=plan.outer.momentum,
            nesterov=plan.outer.nesterov,
        )
    return PartitionResult(
        index=partition.index,
        weights=new_weights,
        momentum=new_momentum,
        slice_sq_norms=sq_norms,
        used=used,
        skipped=skipped,
        clipped=clipped,
        weights_digest=sha256_hex(encode_f32(new_weights)),
        momentum_digest=sha256_hex(encode_f32(new_momentum)),
    )


def read_slice(store: BlobStore, ref: FlatRef, start: int, end: int) -> torch.Tensor:
    """Elements [start, end) of the flat vector held by `ref`; DecodeError if the object is too short."""
    lo, hi = ref.byte_range(start, end)
    data = store.get_range(ref.key, lo, hi)
    try:
        return decode_f32(data, end - start)
    except DecodeError as error:
        raise DecodeError(f"{ref.key}, elements [{start}, {end}): {error}") from None


def read_previous(store: BlobStore, partition: Partition) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A partition's slice of the previous weights, and of the previous outer momentum if there is one."""
    weights = read_slice(store, partition.prev_weights, partition.start, partition.end)
    if partition.prev_momentum is None:
        return weights, None
    return weights, read_slice(store, partition.prev_momentum, partition.start, partition.end)


@dataclass
class OwnerRun:
    """What one owner did: a result per merged partition, and the partitions it could not merge, with why."""

    hotkey: str
    results: dict[int, PartitionResult] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)


def run_owner(
    store: BlobStore,
    plan: MergePlan,
    hotkey: str,
    *,
    partitions: Sequence[int] | None = None,
    fetch_workers: int = 1,
    workers: int = 1,
) -> OwnerRun:
    """Merge every partition `hotkey` owns (or the given ones, for a tie-breaker) and upload the outputs.

    Each merged slice goes to plan.output_key(index, hotkey, "weights"/"momentum"). A partition whose previous
    weights or momentum cannot be read is recorded in `failed` and nothing is uploaded for it. `workers` > 1 merges
    that many partitions at once and uploads up to that many partitions' outputs while the next are read (over a
    link with a long round trip, one request after another leaves it idle; reads and writes use its two
    directions); each partition is merged exactly as alone. `fetch_workers` > 1 reads a partition's uploads
    concurrently.
    """
    writes = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="merge-put") if workers > 1 else None
    room = threading.Semaphore(workers)  # outputs computed and not yet uploaded, at most
    uploading: list[Future[None]] = []

    def write(index: int, result: PartitionResult) -> None:
        try:
            store.put(plan.output_key(index, hotkey, "weights"), encode_f32(result.weights))
            store.put(plan.output_key(index, hotkey, "momentum"), encode_f32(result.momentum))
        finally:
            room.release()

    def one(index: int) -> PartitionResult | str:
        partition = plan.partitions[index]
        try:
            prev_weights, prev_momentum = read_previous(store, partition)
        except (*READ_ERRORS, ValueError) as error:
            return f"previous state unreadable: {type(error).__name__}: {error}"
        result = merge_partition(store, plan, index, prev_weights, prev_momentum, fetch_workers=fetch_workers)
        room.acquire()
        if writes is None:
            write(index, result)
        else:
            uploading.append(writes.submit(write, index, result))
        return result

    indices = list(partitions if partitions is not None else plan.partitions_of(hotkey))
    try:
        if writes is not None:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="merge") as pool:
                outcomes = list(pool.map(one, indices))
        else:
            outcomes = [one(index) for index in indices]
        for future in uploading:
            future.result()  # raises what an upload raised
    finally:
        if writes is not None:
            writes.shutdown(wait=True)
    run = OwnerRun(hotkey=hotkey)
    for index, outcome in zip(indices, outcomes, strict=True):
        if isinstance(outcome, str):
            run.failed[index] = outcome
            logger.warning(f"merge p{index}: {hotkey} cannot merge: {outcome}")
        else:
            run.results[index] = outcome
    return run


# ---------------------------------------------------------------------------------------------------------------
# After the merge: checking claimed norms, applying the merged slices.


def check_claimed_norms(
    plan: MergePlan, slice_sq_norms_by_partition: Mapping[int, Mapping[str, float]]
) -> list[str]:
    """Hotkeys whose upload does not match its claim, sorted.

    A hotkey is flagged when it is absent from any reported partition (its upload was missing or unusable
    there), or, when every partition is reported, when its claimed norm differs from sqrt(sum of its squared
    slice norms) by more than NORM_RTOL relative. Pass one accepted owner's `slice_sq_norms` per partition.
    """
    complete = set(slice_sq_norms_by_partition) == {p.index for p in plan.partitions}
    flagged: list[str] = []
    for submitter in plan.submitters:
        reports = [norms.get(submitter.hotkey) for norms in slice_sq_norms_by_partition.values()]
        if any(sq is None for sq in reports):
            flagged.append(submitter.hotkey)
            continue
        if not complete:
            continue
        actual = math.sqrt(sum(sq for sq in reports if sq is not None))
        claimed = submitter.claimed_norm
        if not math.isfinite(claimed) or abs(claimed - actual) > NORM_RTOL * actual:
            flagged.append(submitter.hotkey)
    return flagged


def apply_merged(
    store: BlobStore,
    plan: MergePlan,
    merged_keys: Mapping[int, str],
    previous: torch.Tensor | None = None,
) -> torch.Tensor:
    """The stage's new flat weights: each partition from its accepted merged slice (`merged_keys[index]`).

    A partition nobody merged (absent from merged_keys, or its object missing, the wrong size or non-finite)
    keeps last epoch's values: from `previous` (the replica's own start-of-epoch vector, no download) when given,
    else from the plan's prev_weights reference (whose read errors propagate: without it there is nothing to apply).
    """
    if previous is not None and (
        previous.dtype != torch.float32 or tuple(previous.shape) != (plan.n_params,)
    ):
        raise ValueError(f"previous must be fp32 of shape ({plan.n_params},)")
    flat = torch.empty(plan.n_params, dtype=torch.float32)
    for partition in plan.partitions:
        values = _read_merged(store, merged_keys.get(partition.index), partition)
        if values is None:
            logger.warning(f"apply: partition {partition.index} was not merged; keeping last epoch's values")
            if previous is not None:
                values = previous[partition.start : partition.end]
            else:
                values = read_slice(store, partition.prev_weights, partition.start, partition.end)
        flat[partition.start : partition.end] = values
    return flat


def _read_merged(store: BlobStore, key: str | None, partition: Partition) -> torch.Tensor | None:
    if key is None:
        return None
    try:
        data = store.get(key)
    except READ_ERRORS as error:
        logger.warning(f"apply: merged slice {key} unreadable: {type(error).__name__}: {error}")
        return None
    if len(data) != partition.size * 4:
        logger.warning(f"apply: merged slice {key} has {len(data)} bytes, expected {partition.size * 4}")
        return None
    values = decode_f32(data, partition.size)
    if not bool(torch.isfinite(values).all()):
        logger.warning(f"apply: merged slice {key} has non-finite values")
        return None
    return values
