"""What one stage's merge in one epoch is: the flat layout, its partitions, who owns each, and where bytes live."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from iota.merge.outer import OuterConfig

OutputKind = Literal["weights", "momentum"]

DEFAULT_OUTPUT_TEMPLATE = "runs/{run}/epochs/{epoch}/merge/{stage}/{partition}/{hotkey}-{kind}.f32"
"""Where an owner uploads its merged slice; the orchestrator normally passes its own template from its key layout.
Fields: run, epoch, stage, partition, hotkey, kind ("weights" or "momentum"). Each owner writes its own keys so the
two owners' outputs can be compared."""


def partition_bounds(n_params: int, n_partitions: int) -> list[tuple[int, int]]:
    """[start, end) of each partition: equal sizes of ceil(n/P), the last one shorter.

    Fewer than n_partitions come back when n_params is too small to give every partition an element.
    """
    if n_params <= 0 or n_partitions <= 0:
        raise ValueError(f"need n_params > 0 and n_partitions > 0, got {n_params}, {n_partitions}")
    size = math.ceil(n_params / n_partitions)
    return [(start, min(start + size, n_params)) for start in range(0, n_params, size)]


# ---------------------------------------------------------------------------------------------------------------
# The plan.


class FlatRef(BaseModel):
    """An object holding raw little-endian fp32 elements of the flat vector, from element `first` on.

    A full vector has first=0; an object holding one partition's slice has first=partition.start.
    """

    model_config = ConfigDict(frozen=True)

    key: str
    first: int = Field(default=0, ge=0)

    def byte_range(self, start: int, end: int) -> tuple[int, int]:
        """Byte range [lo, hi) (end exclusive) of elements [start, end) of the flat vector in this object."""
        if start < self.first or end < start:
            raise ValueError(
                f"elements [{start}, {end}) are not in {self.key} (holds from element {self.first})"
            )
        return (start - self.first) * 4, (end - self.first) * 4


class Submitter(BaseModel):
    """One replica whose pseudo-gradient (raw fp32, theta_start - theta_end) is in the bucket."""

    model_config = ConfigDict(frozen=True)

    hotkey: str
    upload_key: str
    weight: float = Field(gt=0, allow_inf_nan=False)  # work weight from the orchestrator's ledger
    claimed_norm: float  # the L2 norm the replica reported for its whole upload


class Partition(BaseModel):
    """One contiguous slice [start, end) of the flat vector and who merges it."""

    model_config = ConfigDict(frozen=True)

    index: int = Field(ge=0)
    start: int = Field(ge=0)
    end: int
    owners: list[str]  # two hotkeys, or the single submitter when there is only one
    prev_weights: FlatRef  # theta at the start of the epoch
    prev_momentum: FlatRef | None  # outer momentum after the last merge; None before the first one

    @property
    def size(self) -> int:
        return self.end - self.start


class MergePlan(BaseModel):
    """Everything an owner needs to merge its partitions, and everyone needs to check or apply the result."""

    model_config = ConfigDict(frozen=True)

    run: str
    epoch: int = Field(ge=0)
    stage: int = Field(ge=0)
    n_params: int = Field(gt=0)
    submitters: list[Submitter]  # sorted by hotkey: the order every aggregation runs in
    partitions: list[Partition]
    outer: OuterConfig
    clip: float | None = Field(default=None, gt=0)  # global L2 clip C; None for no clipping
    trim_fraction: float = Field(default=0.0, ge=0.0, lt=0.5)  # dropped at each end, per coordinate
    audit: bool = False  # a single submitter merged its own upload alone: its result needs an audit
    output_template: str = DEFAULT_OUTPUT_TEMPLATE

    @field_validator("submitters")
    @classmethod
    def _sorted_unique(cls, submitters: list[Submitter]) -> list[Submitter]:
        hotkeys = [s.hotkey for s in submitters]
        if not hotkeys:
            raise ValueError("a merge needs at least one submitter")
        if hotkeys != sorted(set(hotkeys)):
            raise ValueError("submitters must be sorted by hotkey with no duplicates")
        return submitters

    @field_validator("output_template")
    @classmethod
    def _template_names_each_output(cls, template: str) -> str:
        for field in ("{partition}", "{hotkey}", "{kind}"):
            if field not in template:
                raise ValueError(f"output_template must contain {field} so every output has its own key")
        try:
            template.format(run="r", epoch=0, stage=0, partition=0, hotkey="h", kind="weights")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"output_template {template!r} does not format: {error!r}") from error
        return template

    @model_validator(mode="after")
    def _partitions_tile(self) -> MergePlan:
        expected = partition_bounds(self.n_params, len(self.partitions))
        actual = [(p.start, p.end) for p in self.partitions]
        if actual != expected or [p.index for p in self.partitions] != list(range(len(self.partitions))):
            raise ValueError("partitions must be indexed 0.. and tile [0, n_params) as partition_bounds does")
        hotkeys = {s.hotkey for s in self.submitters}
        for p in self.partitions:
            if not p.owners or len(set(p.owners)) != len(p.owners) or not set(p.owners) <= hotkeys:
                raise ValueError(f"partition {p.index} owners {p.owners} must be distinct submitters")
        return self

    @property
    def seed(self) -> bytes:
        return plan_seed(self.run, self.epoch, self.stage)

    @property
    def hotkeys(self) -> list[str]:
        return [s.hotkey for s in self.submitters]

    def partitions_of(self, hotkey: str) -> list[int]:
        """Indices of the partitions `hotkey` owns, ascending."""
        return [p.index for p in self.partitions if hotkey in p.owners]

    def output_key(self, partition: int, hotkey: str, kind: OutputKind) -> str:
        """Where `hotkey` uploads its merged weights or momentum for `partition` (owner or tie-breaker)."""
        return self.output_template.format(
            run=self.run, epoch=self.epoch, stage=self.stage, partition=partition, hotkey=hotkey, kind=kind
        )

    def tiebreaker(self, partition: int, exclude: Collection[str] = ()) -> str | None:
        """The submitter who recomputes `partition` when its owners disagree: never an owner nor in `exclude`.

        Deterministic from the plan's seed; None when no other submitter is left (then a validator must recompute).
        """
        barred = set(self.partitions[partition].owners) | set(exclude)
        candidates = [h for h in self.hotkeys if h not in barred]
        if not candidates:
            return None
        return min(candidates, key=lambda h: _draw(self.seed, "tiebreak", partition, h))


def plan_seed(run: str, epoch: int, stage: int) -> bytes:
    """The seed every draw of this merge derives from: anyone can recompute it."""
    return hashlib.sha256(f"iota-merge/{run}/{epoch}/{stage}".encode()).digest()


def _draw(seed: bytes, purpose: str, partition: int, hotkey: str) -> bytes:
    return hashlib.sha256(seed + f"/{purpose}/{partition}/{hotkey}".encode()).digest()


def assign_owners(seed: bytes, hotkeys: Sequence[str], n_partitions: int) -> list[list[str]]:
    """Two distinct owners per partition (one if only one hotkey), balanced: loads differ by at most one.

    Each partition goes to the two least-loaded hotkeys, ties broken by a seeded hash, so pairs vary across
    partitions (a colluding pair controls few partitions together) while every hotkey merges ~2P/R of them.
    """
    ordered = sorted(hotkeys)
    per_partition = min(2, len(ordered))
    load = dict.fromkeys(ordered, 0)
    owners: list[list[str]] = []
    for index in range(n_partitions):
        ranked = sorted(ordered, key=lambda h: (load[h], _draw(seed, "owner", index, h)))
        chosen = sorted(ranked[:per_partition])
        for hotkey in chosen:
            load[hotkey] += 1
        owners.append(chosen)
    return owners


def make_plan(
    *,
    run: str,
    epoch: int,
    stage: int,
    n_params: int,
    n_partitions: int,
    submitters: Sequence[Submitter],
    prev_weights: Sequence[FlatRef],
    prev_momentum: Sequence[FlatRef | None] | None = None,
    outer: OuterConfig | None = None,
    clip: float | None = None,
    trim_fraction: float = 0.0,
    output_template: str = DEFAULT_OUTPUT_TEMPLATE,
) -> MergePlan:
    """Build the plan for one stage and epoch.

    `n_partitions` should be fixed for the run (so partition i is the same slice every epoch and its momentum
    carries over); `prev_weights` / `prev_momentum` give one reference per partition of
    `partition_bounds(n_params, n_partitions)` (the same FlatRef may serve all partitions of a full vector).
    """
    bounds = partition_bounds(n_params, n_partitions)
    momentum_refs = list(prev_momentum) if prev_momentum is not None else [None] * len(bounds)
    if len(prev_weights) != len(bounds) or len(momentum_refs) != len(bounds):
        raise ValueError(f"need one prev_weights/prev_momentum reference per partition ({len(bounds)})")
    ordered = sorted(submitters, key=lambda s: s.hotkey)
    seed = plan_seed(run, epoch, stage)
    owners = assign_owners(seed, [s.hotkey for s in ordered], len(bounds))
    partitions = [
        Partition(
            index=i,
            start=start,
            end=end,
            owners=owners[i],
            prev_weights=prev_weights[i],
            prev_momentum=momentum_refs[i],
        )
        for i, (start, end) in enumerate(bounds)
    ]
    return MergePlan(
        run=run,
        epoch=epoch,
        stage=stage,
        n_params=n_params,
        submitters=ordered,
        partitions=partitions,
        outer=outer if outer is not None else OuterConfig(),
        clip=clip,
        trim_fraction=trim_fraction,
        audit=len(ordered) == 1,
        output_template=output_template,
    )
