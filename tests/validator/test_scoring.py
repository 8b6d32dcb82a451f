"""Weights from the score log: reproducible, proportional to validated work, robust to one lying validator."""

from __future__ import annotations

import json
import subprocess
import sys

from iota.validator.scoring import compute_scores, confirmed_failures

LOG = {
    "epoch": 1,
    "stage_params": [100, 50, 150],
    "work": {
        "0": [
            {"miner": "a", "stage": 0, "hops": 10},
            {"miner": "b", "stage": 1, "hops": 10},
            {"miner": "c", "stage": 2, "hops": 4},
        ],
        "1": [
            {"miner": "a", "stage": 0, "hops": 6},
            {"miner": "b", "stage": 1, "hops": 8},
            {"miner": "c", "stage": 2, "hops": 2},
        ],
    },
    "verdicts": [],
}


def _verdict(validator: str, miner: str, passed: bool, epoch: int = 1) -> dict:
    return {"validator": validator, "miner": miner, "epoch": epoch, "passed": passed}


def test_weights_are_validated_work_weighted_by_stage_size_with_decay() -> None:
    weights = compute_scores(LOG)
    units = {"a": (10 * 0.5 + 6) * 1.0, "b": (10 * 0.5 + 8) * 0.5, "c": (4 * 0.5 + 2) * 1.5}
    total = sum(units.values())
    assert weights == {k: v / total for k, v in units.items()}


def test_registration_alone_earns_nothing() -> None:
    assert compute_scores({**LOG, "work": {}}) == {}


def test_two_validators_compute_identical_weights_from_the_same_log() -> None:
    log = {**LOG, "verdicts": [_verdict("v1", "a", True), _verdict("v2", "c", True)]}
    script = (
        "import json,sys; from iota.validator.scoring import compute_scores; "
        "print(json.dumps(compute_scores(json.load(sys.stdin))))"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script], input=json.dumps(log), capture_output=True, text=True, check=True
        ).stdout
        for _ in range(2)
    }
    assert len(outputs) == 1
    assert json.loads(outputs.pop()) == compute_scores(log)


def test_a_lying_validator_cannot_zero_an_honest_miner() -> None:
    lies = [
        _verdict("liar", "a", False, epoch=0),
        _verdict("liar", "a", False, epoch=1),
        _verdict("honest", "a", True),
        _verdict("honest", "b", True),
    ]
    weights = compute_scores({**LOG, "verdicts": lies})
    assert weights["a"] > 0  # two validators audit this run: one failing voice is not a confirmed failure
    assert confirmed_failures(lies, validators_seen=2) == set()


def test_a_confirmed_failure_forfeits_the_window() -> None:
    both = [
        _verdict("v1", "c", False, epoch=0),
        _verdict("v2", "c", False, epoch=0),
        _verdict("v1", "a", True),
    ]
    weights = compute_scores({**LOG, "verdicts": both})
    assert "c" not in weights and weights["a"] > 0
    alone = [_verdict("v1", "b", False)]  # with a single validator, its verdict stands
    assert "b" not in compute_scores({**LOG, "verdicts": alone})
