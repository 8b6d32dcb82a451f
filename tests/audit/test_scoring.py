"""Weights from the score log: reproducible, proportional to validated work, robust to one lying validator."""

from __future__ import annotations

import json
import subprocess
import sys

from iota.audit.scoring import (
    ORCHESTRATOR,
    PENALTY_EPOCHS,
    STRIKES,
    WINDOW_EPOCHS,
    compute_scores,
    confirmed_failures,
    standing,
    weights_by_uid,
    with_burn,
)

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


def _verdict(
    validator: str,
    miner: str,
    passed: bool,
    epoch: int = 1,
    audit: str | None = None,
    confirms: str | None = None,
) -> dict:
    detail = {"audit_id": audit, "confirms": confirms}
    return {"validator": validator, "miner": miner, "epoch": epoch, "passed": passed, "detail": detail}


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
        "import json,sys; from iota.audit.scoring import compute_scores; "
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
        _verdict("liar", "a", False, epoch=0, audit="x1"),
        _verdict("liar", "a", False, epoch=1, audit="x2"),
        _verdict("honest", "a", True),
        _verdict("honest", "b", True),
    ]
    weights = compute_scores({**LOG, "verdicts": lies})
    assert weights["a"] > 0  # one failing voice, unconfirmed, is not a confirmed failure
    assert confirmed_failures(lies) == set()


def test_a_lone_validator_needs_the_orchestrators_recomputation() -> None:
    accused = [_verdict("v1", "b", False, audit="x1")]
    assert "b" in compute_scores({**LOG, "verdicts": accused})  # pending: not yet confirmed
    confirmed = [*accused, _verdict(ORCHESTRATOR, "b", False, confirms="x1")]
    assert "b" not in compute_scores({**LOG, "verdicts": confirmed})
    refuted = [*accused, _verdict(ORCHESTRATOR, "b", True, confirms="x1")]
    assert "b" in compute_scores({**LOG, "verdicts": refuted})
    assert standing(refuted) == {}  # one refutation is not yet a lost standing


def test_a_validator_whose_verdicts_are_refuted_loses_standing() -> None:
    refuted = [
        v
        for i in range(STRIKES)
        for v in (
            _verdict("liar", "a", False, audit=f"x{i}"),
            _verdict(ORCHESTRATOR, "a", True, confirms=f"x{i}"),
        )
    ]
    assert standing(refuted) == {"liar": STRIKES}
    # its later accusation of c, even seconded by an honest validator's own failing audit of another miner,
    # and its "confirmation" of a colluder's verdict on b, no longer count
    later = [
        _verdict("colluder", "b", False, audit="y1"),
        _verdict("liar", "b", False, confirms="y1"),
        _verdict("liar", "c", False, audit="y2"),
        _verdict("honest", "c", True),
    ]
    log = {**LOG, "verdicts": refuted + later}
    assert confirmed_failures(log["verdicts"]) == set()
    assert set(compute_scores(log)) == {"a", "b", "c"}
    # while the same two failing voices from validators in standing would have confirmed b's failure
    assert confirmed_failures(later) == {("b", 1)}


def test_a_contrary_verdict_alone_settles_nothing_and_the_recomputation_decides() -> None:
    """A bought validator passes what an honest one failed: that alone neither clears the miner nor costs the
    accuser anything; the orchestrator's recomputation decides, and the side it contradicts takes the strike."""
    disputes = [
        v
        for i in range(STRIKES)
        for v in (
            _verdict("honest", "b", False, audit=f"x{i}"),
            _verdict("bought", "b", True, audit=f"y{i}", confirms=f"x{i}"),
        )
    ]
    assert standing(disputes) == {} and confirmed_failures(disputes) == set()
    assert "b" in compute_scores({**LOG, "verdicts": disputes})  # pending: nobody has decided yet
    decided = [*disputes, *(_verdict(ORCHESTRATOR, "b", False, confirms=f"x{i}") for i in range(STRIKES))]
    assert standing(decided) == {"bought": STRIKES}
    assert confirmed_failures(decided) == {("b", 1)}
    assert "b" not in compute_scores({**LOG, "verdicts": decided})
    # the other way round: the accuser lied, the validator that passed the miner was right
    cleared = [*disputes, *(_verdict(ORCHESTRATOR, "b", True, confirms=f"x{i}") for i in range(STRIKES))]
    assert standing(cleared) == {"honest": STRIKES}
    assert "b" in compute_scores({**LOG, "verdicts": cleared})


def test_a_pass_the_recomputation_agrees_with_is_no_strike() -> None:
    verdicts = [
        v
        for i in range(STRIKES)
        for v in (
            _verdict("liar", "a", False, audit=f"x{i}"),
            _verdict("honest", "a", True, audit=f"y{i}", confirms=f"x{i}"),
            _verdict(ORCHESTRATOR, "a", True, confirms=f"x{i}"),
            _verdict(
                "honest", "c", True, audit=f"z{i}"
            ),  # an ordinary pass, never recomputed: no strike either
        )
    ]
    assert standing(verdicts) == {"liar": STRIKES}


def test_a_confirmation_the_recomputation_passes_stops_counting() -> None:
    """Two validators agree on a failure; the orchestrator's spot check passes it: no failure, a strike each."""
    pairs = [
        v
        for i in range(STRIKES)
        for v in (
            _verdict("v1", "a", False, audit=f"x{i}"),
            _verdict("v2", "a", False, audit=f"y{i}", confirms=f"x{i}"),
        )
    ]
    assert confirmed_failures(pairs) == {("a", 1)}  # two voices, unchecked
    checked = [*pairs, *(_verdict(ORCHESTRATOR, "a", True, confirms=f"x{i}") for i in range(STRIKES))]
    assert confirmed_failures(checked) == set() and "a" in compute_scores({**LOG, "verdicts": checked})
    assert standing(checked) == {"v1": STRIKES, "v2": STRIKES}


def test_the_orchestrator_never_loses_standing() -> None:
    verdicts = [
        v
        for i in range(STRIKES + 1)
        for v in (
            _verdict(ORCHESTRATOR, "a", False, audit=f"o{i}"),
            _verdict("v", "a", True, confirms=f"o{i}"),
        )
    ]
    assert standing(verdicts) == {}


def test_a_confirmed_failure_forfeits_the_window() -> None:
    both = [
        _verdict("v1", "c", False, epoch=0, audit="x1"),
        _verdict("v2", "c", False, epoch=0, confirms="x1"),
        _verdict("v1", "a", True),
    ]
    weights = compute_scores({**LOG, "verdicts": both})
    assert "c" not in weights and weights["a"] > 0
    independent = [_verdict("v1", "b", False, audit="x2"), _verdict("v2", "b", False, audit="x3")]
    assert "b" not in compute_scores({**LOG, "verdicts": independent})


def test_a_confirmed_failure_outlasts_the_window() -> None:
    """Caught at epoch 0 and never again: its later work earns nothing until PENALTY_EPOCHS have passed."""
    caught = [
        _verdict("v1", "c", False, epoch=0, audit="x1"),
        _verdict(ORCHESTRATOR, "c", False, epoch=0, confirms="x1"),
    ]
    later = {str(e): [{"miner": m, "stage": s, "hops": 5} for m, s in (("a", 0), ("c", 2))] for e in range(6)}
    log = {**LOG, "work": later, "verdicts": caught}
    assert WINDOW_EPOCHS < 5 < PENALTY_EPOCHS
    assert "c" not in compute_scores(
        {**log, "epoch": 5}
    )  # epoch 0 is out of the window, not out of the penalty
    assert "c" in compute_scores({**log, "epoch": PENALTY_EPOCHS, "work": {str(PENALTY_EPOCHS): later["0"]}})


def test_burn_moves_its_fraction_to_the_burn_uid() -> None:
    assert with_burn({1: 0.5, 2: 0.5}, None, 0.3) == {1: 0.5, 2: 0.5}
    assert with_burn({1: 0.5, 2: 0.5}, 0, 0.2) == {0: 0.2, 1: 0.4, 2: 0.4}
    assert with_burn({}, 7, 0.2) == {7: 1.0}
    try:
        with_burn({1: 1.0}, 0, 1.5)
    except ValueError as error:
        assert "burn fraction" in str(error)
    else:
        raise AssertionError("a burn fraction over 1 must be refused")


def test_a_recycled_uid_starts_at_zero() -> None:
    weights = compute_scores(LOG)  # a, b and c earned weight; a has since been replaced on its uid by d
    registered = {"d": 0, "b": 1, "c": 2}
    by_uid = weights_by_uid(weights, registered)
    assert by_uid == {1: weights["b"], 2: weights["c"]}  # uid 0 (now d's) gets none of a's credit
