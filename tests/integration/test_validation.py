"""Validators in a live network: audits of real miner processes, weights on the (local) chain."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from iota.audit.scoring import ORCHESTRATOR, confirmed_failures
from iota.local import LocalNetwork, LocalOptions, run_local
from iota.local.report import print_summary
from iota.protocol import Status

pytestmark = pytest.mark.slow

SMALL = {
    "preset": "test",
    "stages": 3,
    "epochs": 2,
    "samples_per_epoch": 24,
    "micro_batch": 2,
    "accumulate": 2,
    "total_tokens": 10_000,
}


def test_local_run_with_a_validator_sets_weights_for_every_honest_miner(
    tmp_path: Path, net_data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`iota local --stages 3 --miners-per-stage 2 --validators 1 --epochs 2`, on the small preset."""
    report = run_local(
        LocalOptions(
            miners_per_stage=2,
            validators=1,
            run_dir=tmp_path / "run",
            baseline=False,
            progress=False,
            overrides={**SMALL, "data_dir": str(net_data_dir)},
        )
    )
    scores = report["scores"]
    assert scores["audits"] > 0 and scores["audits_failed"] == 0  # no honest miner flagged
    # what the audits cost, in hops replayed against hops done; nothing failed, so nothing was recomputed
    assert scores["hops_replayed"] > 0 and scores["hops_done"] > 0 and scores["hops_recomputed"] == 0
    print_summary(report, tmp_path)
    assert (
        f"replaying {scores['hops_replayed']} hops against {scores['hops_done']} done"
        in capsys.readouterr().out
    )
    uids = {hk: uid for hk, uid in scores["uids"].items()}
    assert len(uids) == 6
    (chain_weights,) = scores["chain_weights"].values()
    assert {int(uid) for uid in uids.values()} == {int(uid) for uid in chain_weights}  # every honest miner
    assert all(value > 0 for value in chain_weights.values())


# Cheats honest only where they believe they are watched, from the challenges they are served: they need
# challenges enough that windows start past the first D steps of their session.
WATCHERS = ("WindowHonest", "WeightPoison", "SelectiveTail")


def registered(n: int) -> Callable[[Status], bool]:
    return lambda status: sum(len(stage.miners) for stage in status.stages) >= n


@pytest.mark.extended
@pytest.mark.parametrize(
    "adversary", ["Int8Weights", "ConsistentBias", "WindowHonest", "WeightPoison", "SelectiveTail"]
)
def test_a_cheating_miner_gets_no_weight(tmp_path: Path, net_data_dir: Path, adversary: str) -> None:
    """One cheater among honest miners (int8 weights; a fixed bias at half of every hop's threshold; noisy outputs,
    a weight poison once an epoch, or a tail's zero gradients and false loss, each only where it believes no audit
    looks): caught by audit, weight 0; honest weights follow their work."""
    overrides = {**SMALL, "epochs": 1, "samples_per_epoch": 40, "data_dir": str(net_data_dir)}
    rate = None
    if adversary in WATCHERS:  # epochs long enough that windows are drawn past their first D steps
        overrides.update(epochs=2, samples_per_epoch=80)
        rate = 1.0
    options = LocalOptions(run_dir=tmp_path / "run", overrides=overrides, progress=False, snapshot_rate=rate)
    net = LocalNetwork(options)
    try:
        net.start_orchestrator()
        # The validator audits while the epochs train: its draws are of the current epoch.
        net.add_validator(weights_interval_s=5.0)
        if adversary == "SelectiveTail":  # empty stages are staffed first: the cheater is the third, the tail
            honest = [net.add_miner(), net.add_miner()]
            net.wait_until(registered(2), timeout_s=60)
            cheater = net.add_miner(adversary=adversary)
            net.wait_until(registered(3), timeout_s=60)
            honest.append(net.add_miner())
        else:
            honest = [net.add_miner() for _ in range(3)]
            cheater = net.add_miner(adversary=adversary)  # joins stage 0 beside honest[0]
        net.wait_until(lambda s: s.phase == "done", timeout_s=300)
        # With one validator, its failing verdicts count once the orchestrator's own recomputation confirms them;
        # after the run it audits each miner's last epoch once more (the end-of-epoch audits).
        deadline = time.monotonic() + 300
        log = net.scores_log()
        while net.hotkey(cheater) not in {miner for miner, _ in confirmed_failures(log["verdicts"])}:
            assert time.monotonic() < deadline, "the cheater's failure was never confirmed"
            time.sleep(2)
            log = net.scores_log()
        net.stop(["validator0"], timeout_s=60)
    finally:
        net.stop()
    from iota.audit.scoring import compute_scores

    hotkey = {name: net.hotkey(name) for name in [*honest, cheater]}
    failed = {v["miner"] for v in log["verdicts"] if not v["passed"]}
    confirmed = {v["miner"] for v in log["verdicts"] if v["validator"] == ORCHESTRATOR and not v["passed"]}
    assert confirmed == {hotkey[cheater]}
    passed = {v["miner"] for v in log["verdicts"] if v["passed"]}
    assert hotkey[cheater] in failed
    assert not failed & {hotkey[h] for h in honest}, "an honest miner was flagged"
    weights = compute_scores(log)
    assert weights.get(hotkey[cheater], 0.0) == 0.0
    assert all(weights[hotkey[h]] > 0 for h in honest)
    assert passed  # the validator also audited honest work
    if overrides["epochs"] > 1:
        return  # shares over several epochs: tests/audit/test_scoring.py
    # Honest weights are proportional to validated work (hops, scaled by stage size).
    work = {row["miner"]: row for rows in log["work"].values() for row in rows}
    mean = sum(log["stage_params"]) / len(log["stage_params"])
    units = {
        hotkey[h]: work[hotkey[h]]["hops"] * log["stage_params"][work[hotkey[h]]["stage"]] / mean
        for h in honest
    }
    total = sum(units.values())
    for key, value in units.items():
        assert weights[key] == pytest.approx(value / total)


@pytest.mark.extended
def test_a_bought_validator_neither_shields_a_cheater_nor_costs_an_honest_validator(
    tmp_path: Path, net_data_dir: Path
) -> None:
    """A cheater, an honest validator and one that passes everything (IOTA_ADVERSARY=pass_everything): every
    failing verdict the bought validator is given to confirm and passes goes to the orchestrator's recomputation,
    which fails the cheater; the cheater ends at weight 0, the strikes are the bought validator's, and neither an
    honest miner nor the honest validator is penalised."""
    overrides = {**SMALL, "epochs": 2, "samples_per_epoch": 120, "data_dir": str(net_data_dir)}
    net = LocalNetwork(LocalOptions(run_dir=tmp_path / "run", overrides=overrides, progress=False))
    try:
        net.start_orchestrator()
        net.add_validator("honest")
        net.add_validator("bought", adversary="pass_everything")
        honest = [net.add_miner() for _ in range(3)]
        net.wait_until(lambda s: all(stage.miners for stage in s.stages), timeout_s=120)
        # beside an honest miner of its stage: alone there, it would stall the run at APPLY
        cheater = net.add_miner(adversary="Int8Weights")
        net.wait_until(lambda s: s.phase == "done", timeout_s=400)
        bought, upright, cheat = net.hotkey("bought"), net.hotkey("honest"), net.hotkey(cheater)

        def settled(log: dict) -> bool:
            """The cheater's failure confirmed, the bought validator given a claim, and every dispute decided."""
            decided = {v["detail"]["confirms"] for v in log["verdicts"] if v["validator"] == ORCHESTRATOR}
            disputes = {v["detail"]["confirms"] for v in log["verdicts"] if v["validator"] == bought} - {None}
            caught = cheat in {miner for miner, _ in confirmed_failures(log["verdicts"])}
            return caught and bool(disputes) and disputes <= decided

        deadline = time.monotonic() + 300  # the validators go on auditing the last epoch once the run is done
        log = net.scores_log()
        while not settled(log):
            assert time.monotonic() < deadline, "the cheater was not caught, or a dispute stayed undecided"
            time.sleep(2)
            log = net.scores_log()
    finally:
        net.stop()
    from iota.audit.scoring import STRIKES, compute_scores, standing

    hotkey = {name: net.hotkey(name) for name in [*honest, cheater]}
    verdicts = log["verdicts"]
    disputes = [v for v in verdicts if v["validator"] == bought and v["detail"]["confirms"]]
    recomputed = {v["detail"]["confirms"]: v for v in verdicts if v["validator"] == ORCHESTRATOR}
    assert disputes, "the bought validator was never given a failing verdict to confirm"
    for dispute in disputes:  # each pass it gave a claim was decided against it
        assert dispute["passed"] and not recomputed[dispute["detail"]["confirms"]]["passed"]
    lost = standing(verdicts)
    assert upright not in lost
    assert (bought in lost) == (len(disputes) >= STRIKES)
    weights = compute_scores(log)
    assert weights.get(hotkey[cheater], 0.0) == 0.0
    assert all(weights[hotkey[h]] > 0 for h in honest)
    failed = {v["miner"] for v in verdicts if not v["passed"]}
    assert failed == {hotkey[cheater]}, "an honest miner was failed"
