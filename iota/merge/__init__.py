"""Merge of one stage's replicas at the end of an epoch: partition plan, butterfly reduce, outer optimizer.

Pure: it takes a transport (a BlobStore) and a MergePlan as arguments and never imports the orchestrator,
the miner or any HTTP code.
"""

from iota.merge.butterfly import (
    NORM_RTOL,
    OwnerRun,
    PartitionResult,
    apply_merged,
    check_claimed_norms,
    merge_partition,
    partition_digest,
    pseudo_gradient,
    read_previous,
    read_slice,
    run_owner,
    sha256_hex,
    squared_norm,
)
from iota.merge.outer import OuterConfig, outer_lr, outer_step
from iota.merge.plan import (
    DEFAULT_OUTPUT_TEMPLATE,
    FlatRef,
    MergePlan,
    Partition,
    Submitter,
    assign_owners,
    make_plan,
    partition_bounds,
    plan_seed,
)
from iota.merge.stores import BlobStore, CallerView, DictStore, HeldCopies

__all__ = [
    "DEFAULT_OUTPUT_TEMPLATE",
    "NORM_RTOL",
    "BlobStore",
    "CallerView",
    "DictStore",
    "HeldCopies",
    "FlatRef",
    "MergePlan",
    "OuterConfig",
    "OwnerRun",
    "Partition",
    "PartitionResult",
    "Submitter",
    "apply_merged",
    "assign_owners",
    "check_claimed_norms",
    "make_plan",
    "merge_partition",
    "partition_digest",
    "outer_lr",
    "outer_step",
    "partition_bounds",
    "plan_seed",
    "pseudo_gradient",
    "read_previous",
    "read_slice",
    "run_owner",
    "sha256_hex",
    "squared_norm",
]
