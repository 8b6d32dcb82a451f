"""Weights from the score log: a pure function, so any validator (or anyone) computes the same weights from it.

The log holds, per epoch, each miner's completed sample-hops and stage, and every audit verdict. A miner's score is
its validated useful work: hops weighted by its stage's compute (parameters relative to the mean stage), summed
over a window of recent epochs with a decay; a confirmed failed audit in the window forfeits the miner's whole
window. Registration alone earns nothing (no hops, no score).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

WINDOW_EPOCHS = 4
DECAY = 0.5  # an epoch's work counts DECAY**age


def confirmed_failures(verdicts: list[Mapping[str, Any]], validators_seen: int) -> set[tuple[str, int]]:
    """(miner, epoch) pairs whose failure is confirmed: by two independent validators, or by the only one there is.

    A single permit holder therefore cannot zero an honest miner once a second validator audits the run: its
    failing verdicts stand only when another validator's replay agrees.
    """
    failing: dict[tuple[str, int], set[str]] = defaultdict(set)
    for v in verdicts:
        if not v["passed"]:
            failing[(v["miner"], int(v["epoch"]))].add(v["validator"])
    needed = 1 if validators_seen <= 1 else 2
    return {key for key, validators in failing.items() if len(validators) >= needed}


def compute_scores(log: Mapping[str, Any]) -> dict[str, float]:
    """hotkey -> weight in [0, 1], summing to 1 (or empty when nobody did validated work)."""
    work: dict[str, list[dict[str, Any]]] = log["work"]  # epoch (str) -> list of {miner, stage, hops}
    stage_params: list[int] = log["stage_params"]
    current = int(log["epoch"])
    verdicts = log["verdicts"]
    validators = {v["validator"] for v in verdicts}
    failed = confirmed_failures(verdicts, len(validators))
    mean_params = sum(stage_params) / len(stage_params)
    scores: dict[str, float] = defaultdict(float)
    forfeited = set()
    for epoch_key in sorted(work, key=int):
        epoch = int(epoch_key)
        age = current - epoch
        if age < 0 or age >= WINDOW_EPOCHS:
            continue
        for row in sorted(work[epoch_key], key=lambda r: r["miner"]):
            if (row["miner"], epoch) in failed:
                forfeited.add(row["miner"])
            scores[row["miner"]] += row["hops"] * (stage_params[row["stage"]] / mean_params) * DECAY**age
    for miner in forfeited:
        scores[miner] = 0.0
    total = sum(scores.values())
    if total <= 0:
        return {}
    return {miner: value / total for miner, value in sorted(scores.items()) if value > 0}
