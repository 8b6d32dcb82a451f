"""Where attribution's data lives in the orchestrator's state: completed samples' paths, losses and order."""

from __future__ import annotations

from iota.audit.attribution import Paths
from iota.orchestrator.state import StateStore


def read_paths(store: StateStore, n_stages: int, epoch: int | None = None) -> Paths:
    """Completed samples with a forward hop done at every stage of their current attempt, and its tail's loss.

    One read-only query of the state's tables: each forward hop names its stage's miner, the tail's carries the
    loss it reported (the same value as the `losses` table, but tied to this attempt's path), and
    `samples.done_at` orders the samples.
    """
    stages: dict[int, dict[int, str]] = {}
    losses: dict[int, float] = {}
    order: dict[int, float] = {}
    for sample_id, stage, miner, loss, done_at in store.work.completed_forwards(epoch):
        sample_id, stage = int(sample_id), int(stage)
        if miner is None or done_at is None:
            continue
        stages.setdefault(sample_id, {})[stage] = str(miner)
        order[sample_id] = float(done_at)
        if stage == n_stages - 1 and loss is not None:
            losses[sample_id] = float(loss)
    paths = {
        sample_id: tuple(by_stage[s] for s in range(n_stages))
        for sample_id, by_stage in stages.items()
        if sample_id in losses and all(s in by_stage for s in range(n_stages))
    }
    return Paths(
        paths,
        {i: losses[i] for i in paths},
        {i: order[i] for i in paths},
    )
