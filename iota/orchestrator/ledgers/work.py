"""The work the hops record as done, read for the merge's work weights, audit draws, the score log, attribution
and metrics (read-only: the scheduler writes the hops, iota.orchestrator.state)."""

from __future__ import annotations

from collections.abc import Sequence

from iota.state.db import Database


class WorkDone:
    def __init__(self, db: Database):
        self.db = db

    def done_by(self, miner: str, epoch: int) -> int:
        """The hops a miner completed in an epoch: its work weight in the merge."""
        count = self.db.scalar(
            "SELECT COUNT(*) FROM hops WHERE miner = ? AND epoch = ? AND status = 'done'", (miner, epoch)
        )
        return int(count or 0)

    def by_miner(self, epoch: int) -> list[tuple[str, int]]:
        """(miner, hops it completed) for every miner that completed one in the epoch, by hotkey."""
        rows = self.db.execute(
            "SELECT miner, COUNT(*) FROM hops WHERE epoch = ? AND status = 'done' GROUP BY miner ORDER BY miner",
            (epoch,),
        )
        return [(str(r[0]), int(r[1])) for r in rows]

    def credited(self) -> list[tuple[int, str, int, int]]:
        """(epoch, miner, stage, hops completed) over the whole run: the work the score log credits."""
        rows = self.db.execute(
            "SELECT epoch, miner, stage, COUNT(*) FROM hops WHERE status = 'done' GROUP BY epoch, miner, stage "
            "ORDER BY epoch, miner, stage"
        )
        return [(int(r[0]), str(r[1]), int(r[2]), int(r[3])) for r in rows]

    def durations(self, hop_ids: Sequence[int]) -> list[tuple[int, str, float]]:
        """(stage, direction, seconds from queued to done) of those of `hop_ids` that are done: by primary key."""
        if not hop_ids:
            return []
        rows = self.db.execute(
            "SELECT stage, direction, done_at - created_at FROM hops "
            f"WHERE status = 'done' AND id IN ({', '.join('?' * len(hop_ids))})",
            tuple(hop_ids),
        )
        return [(int(r[0]), str(r[1]), float(r[2])) for r in rows]

    def completed_forwards(
        self, epoch: int | None = None
    ) -> list[tuple[int, int, str | None, float | None, float | None]]:
        """(sample, stage, miner, loss, sample's done_at) of every forward hop done in the current attempt of a
        completed sample (of `epoch`, or any): each names its stage's miner, and the tail's carries the loss."""
        where = "AND s.epoch = ?" if epoch is not None else ""
        params: tuple[int, ...] = (epoch,) if epoch is not None else ()
        return self.db.execute(
            "SELECT h.sample_id, h.stage, h.miner, h.loss, s.done_at FROM hops h "
            "JOIN samples s ON s.id = h.sample_id AND s.attempt = h.attempt "
            f"WHERE h.direction = 'forward' AND h.status = 'done' AND s.status = 'done' {where}",
            params,
        )
