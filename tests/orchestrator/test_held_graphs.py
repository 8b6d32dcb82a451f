"""The indexed per-request lookups (migration 3) answer exactly what the full scans they replace answered."""

from __future__ import annotations

import random

from iota.orchestrator.scheduler import Policy, Scheduler, SchedulingError
from iota.orchestrator.schema import MIGRATIONS
from iota.orchestrator.state import StateStore
from iota.state import Database
from iota.state.migrations import migrate

POLICY = Policy(
    n_stages=3, samples_per_epoch=10**6, epochs=1, max_in_flight=3, lease_s=10, miner_timeout_s=30
)
TAIL = POLICY.n_stages - 1

# What samples_waiting_on answered before migration 3: a join over every hop the miner ever did.
REFERENCE = (
    "SELECT DISTINCT h.sample_id FROM hops h JOIN samples s ON s.id = h.sample_id AND s.attempt = h.attempt "
    "WHERE h.miner = ? AND h.direction = 'forward' AND h.status = 'done' AND s.status = 'active' AND h.stage < ? "
    "AND NOT EXISTS (SELECT 1 FROM hops b WHERE b.sample_id = h.sample_id AND b.attempt = h.attempt "
    "AND b.stage = h.stage AND b.direction = 'backward' AND b.status = 'done') ORDER BY h.sample_id"
)


def reference(state: StateStore, hotkey: str) -> list[int]:
    return [int(r[0]) for r in state.db.execute(REFERENCE, (hotkey, TAIL))]


def scheduler(db: Database) -> Scheduler:
    return Scheduler(StateStore(db), POLICY, lambda hop, lease: f"act/{hop.id}/{lease}")


def churn(sched: Scheduler, miners: list[str], steps: int, seed: int) -> None:
    """Miners take and report work, let leases lapse, leave and come back, in a random order."""
    rng, now = random.Random(seed), 1000.0
    for step in range(steps):
        now += rng.uniform(0.0, 2.0)
        hotkey = rng.choice(miners)
        try:
            if rng.random() < 0.03:
                sched.register(
                    hotkey, None, "cpu", 1, f"session-{step}", now
                )  # a new session voids its graphs
                continue
            if rng.random() < 0.02:
                sched.sweep(now + POLICY.lease_s + 1)  # every lease lapses
                continue
            hop = sched.next_work(hotkey, now).hop
            if hop is None or rng.random() < 0.1:
                continue  # taken and never reported: its lease will lapse
            with sched.transaction():
                leased = sched.leased_hop(hotkey, hop.id, hop.epoch, now)
                loss = 2.0 if leased.stage == TAIL and leased.direction == "forward" else None
                sha = f"sha-{leased.id}" if leased.output_key else None
                sched.complete(leased, sha, 8 if sha else None, loss, 1, now)
        except SchedulingError:
            sched.register(hotkey, None, "cpu", 1, f"back-{step}", now)  # timed out: register again


def test_indexed_lookups_match_the_scans_they_replace(db: Database) -> None:
    sched = scheduler(db)
    miners = [f"m{i}" for i in range(7)]
    for i, hotkey in enumerate(miners):
        sched.register(hotkey, None, "cpu", 1, "s", now=1000.0 + i)
    for seed in range(4):
        churn(sched, miners, 150, seed)
        for hotkey in miners:
            assert sched.state.samples_waiting_on(hotkey, TAIL) == reference(sched.state, hotkey)
        alive = [m for m in sched.state.miners() if m.alive]
        assert sched.state.staffed_stages(POLICY.n_stages) == {m.stage for m in alive}
        load = {
            s: (sum(m.stage == s for m in alive), sum(m.hops_done for m in alive if m.stage == s))
            for s in {m.stage for m in alive}
        }
        assert sched.state.stage_load() == load
    completed = int(sched.state.get("samples_completed", 0))
    assert completed > 0  # the churn did move samples all the way through


def test_migration_3_fills_held_graphs_for_a_run_in_progress(db: Database) -> None:
    migrate(db, MIGRATIONS[:2])  # a state database written before migration 3
    for hotkey in ("a", "b", "c"):  # one miner per stage: the only queries used are those of migration 2
        db.execute(
            "INSERT INTO miners (hotkey, uid, stage, session, device, memory_bytes, registered_at, last_seen, "
            "alive, hops_done, banned) VALUES (?, NULL, ?, 's', 'cpu', 1, 0, 0, 1, 0, NULL)",
            (hotkey, "abc".index(hotkey)),
        )
    for sample in range(3):
        db.execute(
            "INSERT INTO samples (id, epoch, attempt, status, created_at) VALUES (?, 0, 0, 'active', 0)",
            (sample,),
        )
    # Sample 0 done forward on stages 0 and 1 (both wait for their backward); sample 1 also has stage 1's backward
    # done (only stage 0 waits); sample 2 only stage 0's forward.
    hops = [
        (0, 0, "forward"),
        (0, 1, "forward"),
        (1, 0, "forward"),
        (1, 1, "forward"),
        (1, 1, "backward"),
        (2, 0, "forward"),
    ]
    for i, (sample, stage, direction) in enumerate(hops):
        db.execute(
            "INSERT INTO hops (id, sample_id, attempt, epoch, stage, direction, status, miner, lease_no, created_at) "
            "VALUES (?, ?, 0, 0, ?, ?, 'done', ?, 1, 0)",
            (i, sample, stage, direction, "abc"[stage]),
        )
    state = StateStore(db)  # migrates to the latest
    assert state.samples_waiting_on("a", TAIL) == [0, 1, 2]
    assert state.samples_waiting_on("b", TAIL) == [0]
    assert reference(state, "a") == [0, 1, 2] and reference(state, "b") == [0]
