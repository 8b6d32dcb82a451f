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
    """The snapshot challenge pending for each miner (one at most), and the snapshots it answered per epoch."""

    def __init__(self, kv: KeyValues):
        self.kv = kv

    def pending(self, hotkey: str) -> ChallengeRecord | None:
        data = self.kv.get(keys.challenge(hotkey))
        return None if data is None else ChallengeRecord.model_validate(data)

    def set_pending(self, hotkey: str, challenge: ChallengeRecord | None) -> None:
        """Issue or update the miner's challenge; None: it was answered or dropped."""
        self.kv.put(keys.challenge(hotkey), None if challenge is None else challenge.model_dump())

    def record(self, epoch: int, hotkey: str, step: int, snapshot: SnapshotRecord) -> None:
        self.kv.put(keys.snapshot(epoch, hotkey, step), snapshot.model_dump())
        self.kv.put(keys.snapshots(epoch, hotkey), sorted({*self.steps(epoch, hotkey), step}))

    def forget(self, epoch: int, hotkey: str) -> None:
        """Forget the miner's answered snapshots of the epoch: they are of a session that is over."""
        self.kv.put(keys.snapshots(epoch, hotkey), [])

    def steps(self, epoch: int, hotkey: str) -> list[int]:
        """The steps of the miner's answered snapshots in the epoch, ascending."""
        return [int(step) for step in self.kv.get(keys.snapshots(epoch, hotkey), [])]

    def get(self, epoch: int, hotkey: str, step: int) -> SnapshotRecord | None:
        data = self.kv.get(keys.snapshot(epoch, hotkey, step))
        return None if data is None else SnapshotRecord.model_validate(data)
