"""What miners committed during an epoch (the sketch of their weights at each inner step) and the snapshot
challenges that check it (iota.orchestrator.challenges)."""

from __future__ import annotations

from iota.orchestrator.ledgers import keys
from iota.orchestrator.ledgers.keys import KeyValues
from iota.orchestrator.ledgers.records import ChallengeRecord, SnapshotRecord
from iota.protocol import WeightSketch


class Steps:
    """The last inner step each miner's accepted reports reached in an epoch, and its weights' sketch at each."""

    def __init__(self, kv: KeyValues):
        self.kv = kv

    def last(self, epoch: int, hotkey: str) -> int:
        """The last step committed (0: none yet)."""
        return int(self.kv.get(keys.step(epoch, hotkey), 0))

    def commit(self, epoch: int, hotkey: str, step: int, sketch: WeightSketch) -> None:
        self.kv.put(keys.step(epoch, hotkey), step)
        self.kv.put(keys.sketch(epoch, hotkey, step), sketch.model_dump())

    def sketch(self, epoch: int, hotkey: str, step: int) -> WeightSketch | None:
        data = self.kv.get(keys.sketch(epoch, hotkey, step))
        return None if data is None else WeightSketch.model_validate(data)

    def sessions(self, epoch: int, hotkey: str) -> list[tuple[str, int]]:
        """(session, position of its first hop among the miner's done hops of the epoch) of each session that
        committed a hop, in order."""
        known = self.kv.get(keys.sessions(epoch, hotkey), [])
        return [(str(session), int(first)) for session, first in known]

    def new_session(self, epoch: int, hotkey: str, session: str, first: int) -> None:
        """A session's first hop, at `first`: it starts from the checkpoint at inner step 0, so the sketches of an
        earlier session's steps are dropped (a step it reaches again is committed anew)."""
        known = self.sessions(epoch, hotkey)
        for step in range(1, self.last(epoch, hotkey) + 1):
            self.kv.put(keys.sketch(epoch, hotkey, step), None)
        self.kv.put(keys.step(epoch, hotkey), 0)
        self.kv.put(keys.sessions(epoch, hotkey), [*known, (session, first)])


class Snapshots:
    """The snapshot challenges waiting for each miner, oldest first (the oldest is served and answered first), and
    the snapshots it answered per epoch."""

    def __init__(self, kv: KeyValues):
        self.kv = kv

    def queued(self, hotkey: str) -> list[ChallengeRecord]:
        data = self.kv.get(keys.challenge(hotkey)) or []
        queued = [data] if isinstance(data, dict) else data  # one record: as kept before challenges queued
        return [ChallengeRecord.model_validate(challenge) for challenge in queued]

    def pending(self, hotkey: str) -> ChallengeRecord | None:
        """The oldest challenge: the next to be served."""
        queued = self.queued(hotkey)
        return queued[0] if queued else None

    def set_pending(self, hotkey: str, challenge: ChallengeRecord | None) -> None:
        """Update the oldest challenge; None: it was answered or dropped, and the next one moves up."""
        rest = self.queued(hotkey)[1:]
        self._put(hotkey, rest if challenge is None else [challenge, *rest])

    def add(self, hotkey: str, challenge: ChallengeRecord, limit: int) -> bool:
        """Queue a challenge behind the others; False: `limit` are waiting already, and this one is not issued."""
        queued = self.queued(hotkey)
        if len(queued) >= limit:
            return False
        self._put(hotkey, [*queued, challenge])
        return True

    def clear(self, hotkey: str) -> list[ChallengeRecord]:
        """Drop every challenge of the miner (its session ended); returns them."""
        queued = self.queued(hotkey)
        self._put(hotkey, [])
        return queued

    def _put(self, hotkey: str, queued: list[ChallengeRecord]) -> None:
        self.kv.put(keys.challenge(hotkey), [challenge.model_dump() for challenge in queued] or None)

    def record(self, epoch: int, hotkey: str, step: int, snapshot: SnapshotRecord) -> None:
        self.kv.put(keys.snapshot(epoch, hotkey, step), snapshot.model_dump())
        self.kv.put(keys.snapshots(epoch, hotkey), sorted({*self.steps(epoch, hotkey), step}))

    def forget(self, epoch: int, hotkey: str) -> None:
        """Forget the miner's answered snapshots of the epoch: they are of a session that is over."""
        self.kv.put(keys.snapshots(epoch, hotkey), [])

    def steps(self, epoch: int, hotkey: str) -> list[int]:
        """The steps of the miner's answered snapshots in the epoch, ascending."""
        return [int(step) for step in self.kv.get(keys.snapshots(epoch, hotkey), [])]

    def left_unanswered(self, epoch: int, hotkey: str, session: str) -> None:
        """The miner's session ended with a challenge of this epoch unanswered."""
        self.kv.put(keys.unanswered(epoch, hotkey), session)

    def unanswered_by(self, epoch: int, hotkey: str) -> str | None:
        """The last session of the miner that ended with a challenge of this epoch unanswered."""
        session = self.kv.get(keys.unanswered(epoch, hotkey))
        return None if session is None else str(session)

    def forfeit(self, epoch: int, hotkey: str, hops: int) -> None:
        self.kv.put(keys.forfeit(epoch, hotkey), self.forfeited(epoch, hotkey) + hops)

    def forfeited(self, epoch: int, hotkey: str) -> int:
        """Hops of the miner's epoch that earn nothing: their session left a challenge unanswered."""
        return int(self.kv.get(keys.forfeit(epoch, hotkey)) or 0)

    def drawn(self, epoch: int, hotkey: str) -> list[int]:
        """The window starts audits of the miner's epoch were drawn at, in order."""
        return [int(step) for step in self.kv.get(keys.windows(epoch, hotkey)) or []]

    def add_drawn(self, epoch: int, hotkey: str, step: int) -> None:
        self.kv.put(keys.windows(epoch, hotkey), [*self.drawn(epoch, hotkey), step])

    def get(self, epoch: int, hotkey: str, step: int) -> SnapshotRecord | None:
        data = self.kv.get(keys.snapshot(epoch, hotkey, step))
        return None if data is None else SnapshotRecord.model_validate(data)
