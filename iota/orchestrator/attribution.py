"""Pathway attribution in the orchestrator: where its data lives in the state (completed samples' paths, losses
and order), and the screen that aims audits at the miners it flags."""

from __future__ import annotations

from loguru import logger

from iota.audit.attribution import Paths, attribute
from iota.orchestrator.state import StateStore

SCREEN_EVERY_S = 30.0  # how often the screen refits (a least-squares fit over the epoch's samples: cheap)


class Screen:
    """Which miner to audit next because its samples lose more than its stage-mates' (z > 4): each flagged miner
    once per epoch. The fit and the miners already aimed at are kept in memory: a restart may aim one more audit
    at a flagged miner."""

    def __init__(self, state: StateStore, n_stages: int):
        self.state, self.n_stages = state, n_stages
        self._fit: tuple[int, float, list[str]] = (-1, 0.0, [])  # (epoch, when, flagged miners)
        self._aimed: set[tuple[int, str]] = set()

    def next(self, epoch: int, now: float) -> str | None:
        """A miner flagged this epoch that no audit has been aimed at yet (logged as `audit_targeted`)."""
        fitted, at, flagged = self._fit
        if fitted != epoch or now - at >= SCREEN_EVERY_S:
            paths = read_paths(self.state, self.n_stages, epoch)
            flagged = attribute(paths.paths, paths.losses, paths.order).flagged()
            self._fit = (epoch, now, flagged)
        for hotkey in flagged:
            if (epoch, hotkey) not in self._aimed and self.state.miner(hotkey) is not None:
                self._aimed.add((epoch, hotkey))
                with self.state.transaction():
                    self.state.log(now, "audit_targeted", hotkey, epoch=epoch, screen="pathway attribution")
                logger.info("epoch {}: pathway attribution flags {}: audited next", epoch, hotkey[:10])
                return hotkey
        return None


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
