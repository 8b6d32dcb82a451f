"""Pathway attribution: a bad miner is caught, honest miners are not, a bad partner at another stage or a late
start is not blamed on a miner, and paths are read back from a real scheduler's state."""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable

import pytest

from iota.audit.attribution import Attribution, attribute
from iota.orchestrator.attribution import read_paths
from iota.orchestrator.scheduler import BACKWARD, FORWARD, TRAIN, Policy, Scheduler
from iota.orchestrator.state import Hop, StateStore
from iota.state.db import SqliteDatabase
from tests.support.hops import complete_next

MINERS = [["h0", "h1", "h2"], ["b0", "b1", "b2"], ["t0", "t1", "t2"]]
SIGMA = 0.2  # nats: the spread of a micro-batch's loss the bench measures (bench/attribution.py)

Router = Callable[[random.Random, int], tuple[str, ...]]


def uniform(rng: random.Random, _: int) -> tuple[str, ...]:
    return tuple(rng.choice(stage) for stage in MINERS)


def swarm(
    seed: int,
    n: int,
    bad: dict[str, float],
    route: Router = uniform,
) -> tuple[dict[int, tuple[str, ...]], dict[int, float]]:
    """Synthetic losses: a falling curve, the effects of the miners on the path, and per-sample noise."""
    rng = random.Random(seed)
    paths, losses = {}, {}
    for i in range(n):
        path = route(rng, i)
        curve = 3.0 + 3.0 * math.exp(-i / (n / 4))
        paths[i] = path
        losses[i] = curve + sum(bad.get(m, 0.0) for m in path) + rng.gauss(0.0, SIGMA)
    return paths, losses


def standing(fit: Attribution, miner: str):
    (result,) = fit.of(miner)
    return result


def naive_means(paths: dict[int, tuple[str, ...]], losses: dict[int, float]) -> dict[str, float]:
    """The per-miner mean loss of the paths through it: what a fit without the other stages would say."""
    through: dict[str, list[float]] = {}
    for i, path in paths.items():
        for miner in path:
            through.setdefault(miner, []).append(losses[i])
    return {miner: statistics.fmean(values) for miner, values in through.items()}


def test_a_bad_miner_is_flagged_and_its_effect_measured() -> None:
    paths, losses = swarm(seed=1, n=1500, bad={"b1": 0.1})
    fit = attribute(paths, losses)
    assert fit.flagged() == ["b1"]
    bad = standing(fit, "b1")
    assert bad.identified and bad.samples > 400
    assert abs(bad.effect - 0.1) < 3 * bad.stderr  # the fit recovers the effect, with an honest error bar
    assert abs(fit.sigma - SIGMA) < 0.02  # windows absorb the falling curve: what is left is the sample noise
    for mate in ("b0", "b2"):  # its stage-mates compare well against a mean that includes the bad miner
        assert standing(fit, mate).z < 0


def test_too_few_samples_are_not_flagged() -> None:
    paths, losses = swarm(seed=2, n=60, bad={"b1": 3.0})
    fit = attribute(paths, losses, min_samples=30)
    assert standing(fit, "b1").z > 10 and fit.flagged() == []


def test_honest_miners_are_not_flagged_over_many_seeds() -> None:
    zs: list[float] = []
    for seed in range(200):
        paths, losses = swarm(seed=seed, n=600, bad={})
        fit = attribute(paths, losses)
        assert fit.flagged() == [], (seed, [m for m in fit.miners if m.flagged])
        zs.extend(m.z for m in fit.miners)
    # The standard errors are calibrated: about 5% of honest |z| beyond 1.96 (9 miners x 200 seeds).
    beyond = sum(abs(z) > 1.96 for z in zs) / len(zs)
    assert 0.03 < beyond < 0.075, beyond


def confounded(rng: random.Random, _: int) -> tuple[str, ...]:
    """b0 sends 80% of its samples to t1; the other body miners spread theirs evenly."""
    body = rng.choice(MINERS[1])
    tail = "t1" if body == "b0" and rng.random() < 0.8 else rng.choice(MINERS[2])
    return (rng.choice(MINERS[0]), body, tail)


def test_a_bad_partner_at_another_stage_is_not_blamed_on_the_miner() -> None:
    paths, losses = swarm(seed=3, n=1500, bad={"b1": 0.1, "t1": 0.3}, route=confounded)
    naive = naive_means(paths, losses)
    assert naive["b0"] > naive["b1"] > naive["b2"]  # the mean path loss blames b0 for t1, more than b1 itself
    fit = attribute(paths, losses)
    assert fit.flagged() == ["b1", "t1"]
    assert abs(standing(fit, "b0").z) < 2.5
    assert abs(standing(fit, "t1").effect - 0.3) < 3 * standing(fit, "t1").stderr


def test_inseparable_miners_are_reported_not_flagged() -> None:
    def locked(rng: random.Random, _: int) -> tuple[str, ...]:
        body = rng.choice(MINERS[1])  # b0 always sends to t0, and t0 only gets b0's samples
        tail = "t0" if body == "b0" else rng.choice(["t1", "t2"])
        return (rng.choice(MINERS[0]), body, tail)

    paths, losses = swarm(seed=4, n=900, bad={"t0": 0.5}, route=locked)
    fit = attribute(paths, losses)
    for miner in ("b0", "t0"):
        assert not standing(fit, miner).identified and math.isnan(standing(fit, miner).z)
    assert fit.flagged() == []
    assert all(standing(fit, m).identified for m in ("h0", "h1", "h2"))


def test_windows_keep_a_late_starter_from_being_blamed_for_the_early_losses() -> None:
    def early(rng: random.Random, i: int) -> tuple[str, ...]:
        body = rng.choice(MINERS[1] if i < 300 else ["b0", "b1"])  # b2 leaves a third of the way in
        return (rng.choice(MINERS[0]), body, rng.choice(MINERS[2]))

    paths, losses = swarm(seed=5, n=900, bad={}, route=early)
    assert standing(attribute(paths, losses, window=None), "b2").flagged  # early samples have higher losses
    fit = attribute(paths, losses)
    assert fit.flagged() == [] and abs(standing(fit, "b2").z) < 2.5


def test_order_not_ids_sorts_samples_into_windows() -> None:
    paths, losses = swarm(seed=6, n=900, bad={"b1": 0.1})
    last = len(paths) - 1  # the same samples under ids that run backwards, with their true order given
    relabelled = {last - i: p for i, p in paths.items()}
    relabelled_losses = {last - i: v for i, v in losses.items()}
    order = {last - i: float(i) for i in paths}
    a = attribute(paths, losses)
    b = attribute(relabelled, relabelled_losses, order)
    assert [round(m.z, 9) for m in a.miners] == [round(m.z, 9) for m in b.miners]


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="one miner per stage"):
        attribute({0: ("a", "b"), 1: ("a",)}, {0: 1.0, 1: 1.0})
    with pytest.raises(ValueError, match="window"):
        attribute({0: ("a",)}, {0: 1.0}, window=1)
    empty = attribute({0: ("a",)}, {0: math.nan})  # a non-finite loss does not count
    assert empty.samples == 0 and empty.miners == []


def test_paths_and_losses_read_from_a_scheduler_state(tmp_path) -> None:
    """Drive the real scheduler over SQLite with 3 stages x 2 miners, note who did each forward, and read back.
    A body miner re-registers midway, so the samples holding its graphs restart: their paths are the new attempt's."""
    store = StateStore(SqliteDatabase(tmp_path / "state.db"))
    policy = Policy(
        n_stages=3, samples_per_epoch=40, epochs=1, max_in_flight=2, lease_s=60, miner_timeout_s=600
    )
    sched = Scheduler(store, policy, output_key=lambda hop, lease: f"k/{hop.id}/{lease}")
    miners = [f"m{i}" for i in range(6)]
    now = 1000.0
    for hotkey in miners:  # stages fill in registration order: m0, m3 head; m1, m4 body; m2, m5 tail
        sched.register(hotkey, None, "cpu", 1 << 40, "s0", now)
    did: dict[int, dict[int, str]] = {}
    reported: dict[int, float] = {}
    completed: dict[int, float] = {}
    rng = random.Random(0)

    def tail_loss(hop: Hop) -> float:
        reported[hop.sample_id] = 2.0 + rng.random()
        return reported[hop.sample_id]

    while int(store.get("samples_completed", 0)) < 30 and sched.phase == TRAIN:
        now += 0.01
        midway = int(store.get("samples_completed", 0)) >= 10 and store.miner("m1").session == "s0"  # type: ignore[union-attr]
        if midway and store.samples_waiting_on("m1", 2):
            sched.register("m1", None, "cpu", 1 << 40, "s1", now)  # a new session voids m1's graphs
        hotkey = rng.choice(miners)
        leased = complete_next(sched, hotkey, now, tail_loss)
        if leased is None:
            continue
        if leased.direction == BACKWARD and leased.stage == 0:
            completed[leased.sample_id] = now
        if leased.direction == FORWARD:
            did.setdefault(leased.sample_id, {})[leased.stage] = hotkey
    read = read_paths(store, n_stages=3)
    done = {int(r[0]) for r in store.db.execute("SELECT id FROM samples WHERE status = 'done'")}
    assert len(done) == 30 and set(read.paths) == done  # in-flight samples are left out
    assert len(did) > len(done)
    restarted = [i for i in done if (store.sample(i) or (0, 0, ""))[1] > 0]
    assert restarted, "no completed sample was restarted"
    for sample_id in done:
        assert read.paths[sample_id] == tuple(did[sample_id][s] for s in range(3))
        assert read.losses[sample_id] == reported[sample_id]
    assert read.order == completed  # the completion time orders the samples
    fit = attribute(read.paths, read.losses, read.order, window=None)
    assert {m.miner for m in fit.miners} == set(miners) and fit.flagged() == []
    assert read_paths(store, n_stages=3, epoch=1).paths == {}
