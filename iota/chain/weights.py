"""Weight vectors as the chain stores them: validated, max-upscaled to u16, zeros dropped."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from bittensor import BittensorError
from bittensor.intents.weights import normalize as _bittensor_normalize

from iota.chain.base import ChainError

U16_MAX = 65535


def check_weights(uids: Sequence[int], weights: Sequence[float]) -> None:
    """Refuse what the chain would refuse: length mismatch, duplicate or out-of-range uids, NaN/inf/negative."""
    if len(uids) != len(weights):
        raise ChainError(f"uids and weights differ in length: {len(uids)} vs {len(weights)}")
    duplicates = sorted(uid for uid, count in Counter(uids).items() if count > 1)
    if duplicates:
        raise ChainError(f"duplicate uids in weights: {duplicates}")
    bad_uids = [uid for uid in uids if not 0 <= uid <= U16_MAX]
    if bad_uids:
        raise ChainError(f"uids outside 0..{U16_MAX}: {bad_uids}")
    bad_weights = [w for w in weights if not math.isfinite(w) or w < 0]
    if bad_weights:
        raise ChainError(f"weights must be finite and non-negative, got {bad_weights}")


def normalize_weights(uids: Sequence[int], weights: Sequence[float]) -> tuple[list[int], list[int]]:
    """Validated (uids, u16 values): the largest weight becomes 65535, zeros (after rounding) are dropped.

    The quantisation is bittensor's own `normalize` (v11: `round(w / max * 65535)`), so what LocalChain
    stores is bit-for-bit what the real chain would receive. All-zero input gives two empty lists.
    """
    check_weights(uids, weights)
    try:
        return _bittensor_normalize([int(uid) for uid in uids], [float(w) for w in weights])
    except BittensorError as error:  # unreachable after check_weights, kept so no SDK type leaks out
        raise ChainError(str(error)) from error
