"""Weights from the score log: a pure function, so any validator (or anyone) computes the same weights from it.

The log holds, per epoch, each miner's completed sample-hops and stage, and every audit verdict. A miner's score is
its validated useful work: hops weighted by its stage's compute (parameters relative to the mean stage), summed
over a window of recent epochs with a decay; a confirmed failed audit forfeits the miner's whole score for
PENALTY_EPOCHS from the failed epoch, longer than the window, so a cheater caught once cannot earn again by not
being caught in the next few epochs. Registration alone earns nothing (no hops, no score).

A failing verdict counts only once an independent replay confirms it: another validator's failing verdict on the
same miner and epoch, or a recomputation of the same audit by another validator or by the orchestrator (verdicts
whose detail names the audit they confirm). Where validators disagree, evidence decides, not votes: a validator's
contrary verdict settles nothing alone, the orchestrator recomputes the audit, and whichever side its recomputation
contradicts takes a strike: a failing verdict it passes is refuted, a confirmation that passed what it fails is
contradicted. The orchestrator also recomputes a share of the confirmations two validators agree on; a failing
verdict its recomputation passes, the accuser's or the confirmer's, stops counting and is a strike. A validator
with STRIKES strikes loses its standing and all its verdicts are ignored. So one permit holder can neither zero an
honest miner nor shield a cheater, nor cost an honest validator its standing by contradicting it, and two that
confirm each other's false failures are found out.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

WINDOW_EPOCHS = 4
DECAY = 0.5  # an epoch's work counts DECAY**age
ORCHESTRATOR = "orchestrator"  # the source named by the orchestrator's own recomputations
PENALTY_EPOCHS = 4 * WINDOW_EPOCHS  # a confirmed failure zeroes its miner from its epoch for this many epochs
STRIKES = 2  # verdicts the orchestrator's recomputation proved wrong, after which a validator's stop counting

Verdict = Mapping[str, Any]


def _detail(v: Verdict, key: str) -> Any:
    return (v.get("detail") or {}).get(key)


def _judge(verdicts: Sequence[Verdict]) -> tuple[set[tuple[str, int]], dict[str, int]]:
    """(confirmed failures as (miner, epoch), strikes per validator) over these verdicts. A strike is a verdict the
    orchestrator's recomputation of the same audit proved wrong: a failing verdict it passed, the accuser's or a
    confirmer's (which then does not count toward a confirmation), or a confirmation that passed an audit it
    failed."""
    recomputed = {  # audit id -> the orchestrator's verdict on it
        audit: bool(v["passed"])
        for v in verdicts
        if v["validator"] == ORCHESTRATOR and (audit := _detail(v, "confirms"))
    }

    def disproved(v: Verdict) -> bool:
        """A validator's failing verdict on an audit (its own, or the one it confirmed) the orchestrator passed."""
        audit = _detail(v, "confirms") or _detail(v, "audit_id")
        return not v["passed"] and v["validator"] != ORCHESTRATOR and recomputed.get(audit) is True

    failing_sources: dict[tuple[str, int], set[str]] = defaultdict(set)
    for v in verdicts:
        if not v["passed"] and not disproved(v):
            failing_sources[(v["miner"], int(v["epoch"]))].add(v["validator"])
    confirmed = {key for key, sources in failing_sources.items() if len(sources) >= 2}
    strikes: dict[str, int] = defaultdict(int)
    for v in verdicts:
        if v["validator"] == ORCHESTRATOR:
            continue
        if v["passed"]:
            wrong = recomputed.get(_detail(v, "confirms")) is False  # it passed what the orchestrator failed
        else:
            wrong = disproved(v)
        strikes[v["validator"]] += wrong
    return confirmed, {validator: n for validator, n in strikes.items() if n}


def standing(verdicts: Sequence[Verdict]) -> dict[str, int]:
    """Validators that lost their standing -> how many of their verdicts the orchestrator proved wrong."""
    _, strikes = _judge(verdicts)
    return {v: n for v, n in sorted(strikes.items()) if n >= STRIKES}


def counted(verdicts: Sequence[Verdict]) -> Sequence[Verdict]:
    """The verdicts that count: all but those of validators without standing."""
    lost = standing(verdicts)
    return [v for v in verdicts if v["validator"] not in lost]


def confirmed_failures(verdicts: Sequence[Verdict]) -> set[tuple[str, int]]:
    """(miner, epoch) pairs whose failure two independent sources agree on, among the verdicts that count."""
    confirmed, _ = _judge(counted(verdicts))
    return confirmed


def compute_scores(log: Mapping[str, Any]) -> dict[str, float]:
    """hotkey -> weight in [0, 1], summing to 1 (or empty when nobody did validated work)."""
    work: dict[str, list[dict[str, Any]]] = log["work"]  # epoch (str) -> list of {miner, stage, hops}
    stage_params: list[int] = log["stage_params"]
    current = int(log["epoch"])
    forfeited = {
        miner for miner, epoch in confirmed_failures(log["verdicts"]) if 0 <= current - epoch < PENALTY_EPOCHS
    }
    mean_params = sum(stage_params) / len(stage_params)
    scores: dict[str, float] = defaultdict(float)
    for epoch_key in sorted(work, key=int):
        epoch = int(epoch_key)
        age = current - epoch
        if age < 0 or age >= WINDOW_EPOCHS:
            continue
        for row in sorted(work[epoch_key], key=lambda r: r["miner"]):
            if row["miner"] not in forfeited:
                scores[row["miner"]] += row["hops"] * (stage_params[row["stage"]] / mean_params) * DECAY**age
    total = sum(scores.values())
    if total <= 0:
        return {}
    return {miner: value / total for miner, value in sorted(scores.items()) if value > 0}


def weights_by_uid(weights: Mapping[str, float], registered: Mapping[str, int]) -> dict[int, float]:
    """hotkey weights onto the uids the hotkeys hold on the chain now. A hotkey that left gets nothing, and a uid
    recycled to a new hotkey starts at zero: credit follows the hotkey that earned it, never the uid."""
    return {registered[hk]: w for hk, w in sorted(weights.items()) if hk in registered}


def with_burn(weights: dict[int, float], burn_uid: int | None, burn_fraction: float) -> dict[int, float]:
    """uid -> weight with `burn_fraction` of the total moved to `burn_uid` (the subnet's burn), the rest scaled."""
    if burn_uid is None or burn_fraction <= 0:
        return dict(weights)
    if not 0 < burn_fraction <= 1:
        raise ValueError(f"burn fraction must be in (0, 1], got {burn_fraction}")
    scaled = {uid: w * (1 - burn_fraction) for uid, w in weights.items()} if weights else {}
    if not weights:
        burn_fraction = 1.0  # nobody earned anything: all of it is burnt rather than nothing set
    scaled[burn_uid] = scaled.get(burn_uid, 0.0) + burn_fraction
    return dict(sorted(scaled.items()))
