"""The audit: replay a miner's committed work with the miner's own code, compare every claim, judge, and score.

Pure: records, objects and stores come in as arguments; the validator daemon and the orchestrator's recomputation
both use it, and neither is imported here.
"""

from iota.audit.compare import (
    BF16,
    FP32,
    Thresholds,
    Verdict,
    compare_change,
    compare_loss,
    compare_sketch,
    relative_error,
    thresholds,
)
from iota.audit.records import HopRecord, decode_records, encode_records
from iota.audit.replay import (
    HopCheck,
    ReplayResult,
    ReplaySetup,
    check_loss,
    check_pseudo_gradient,
    check_snapshot,
    check_tokens,
    check_weights,
    replay,
)

__all__ = [
    "BF16",
    "FP32",
    "HopCheck",
    "HopRecord",
    "ReplayResult",
    "ReplaySetup",
    "Thresholds",
    "Verdict",
    "check_loss",
    "check_pseudo_gradient",
    "check_snapshot",
    "check_tokens",
    "check_weights",
    "compare_change",
    "compare_loss",
    "compare_sketch",
    "decode_records",
    "encode_records",
    "relative_error",
    "replay",
    "thresholds",
]
