"""The run's own values: where it stands (epoch, phase, checkpoint...), its counters, and what each epoch fixed."""

from __future__ import annotations

from iota.orchestrator.ledgers import keys
from iota.orchestrator.ledgers.keys import Counter, KeyValues
from iota.orchestrator.ledgers.records import CheckpointInfo


class RunValues:
    """Where the run stands: its state id, latest checkpoint, epoch and phase, pause, flags and data shards."""

    def __init__(self, kv: KeyValues):
        self.kv = kv

    @property
    def state_id(self) -> str | None:
        return self.kv.get(keys.STATE_ID)

    def set_state_id(self, state_id: str) -> None:
        self.kv.put(keys.STATE_ID, state_id)

    @property
    def checkpoint(self) -> CheckpointInfo | None:
        data = self.kv.get(keys.CHECKPOINT)
        return None if data is None else CheckpointInfo.model_validate(data)

    def set_checkpoint(self, info: CheckpointInfo) -> None:
        self.kv.put(keys.CHECKPOINT, info.model_dump())

    @property
    def epoch(self) -> int:
        return int(self.kv.get(keys.EPOCH, 0))

    def set_epoch(self, epoch: int) -> None:
        self.kv.put(keys.EPOCH, epoch)

    @property
    def phase(self) -> str | None:
        """None until the first phase change: the scheduler's default applies."""
        phase = self.kv.get(keys.PHASE)
        return None if phase is None else str(phase)

    def set_phase(self, phase: str) -> None:
        self.kv.put(keys.PHASE, phase)

    @property
    def paused(self) -> bool:
        return bool(self.kv.get(keys.PAUSED, False))

    def set_paused(self, paused: bool) -> None:
        self.kv.put(keys.PAUSED, paused)

    @property
    def flags(self) -> dict[str, str]:
        return dict(self.kv.get(keys.FLAGS, {}))

    def set_flags(self, flags: dict[str, str]) -> None:
        self.kv.put(keys.FLAGS, flags)

    @property
    def data_shards(self) -> list[str]:
        return list(self.kv.get(keys.DATA_SHARDS, []))

    def set_data_shards(self, names: list[str]) -> None:
        self.kv.put(keys.DATA_SHARDS, names)


class Counters:
    """The run's counters (keys.Counter): totals for /status and /metrics, and the allocators of ids."""

    def __init__(self, kv: KeyValues):
        self.kv = kv

    def get(self, name: Counter) -> int:
        return int(self.kv.get(name, 0))

    def set(self, name: Counter, value: int) -> None:
        self.kv.put(name, value)

    def bump(self, name: Counter, by: int = 1) -> int:
        """Add to the counter and return its new value."""
        return self.kv.bump(name, by)


class EpochValues:
    """What each epoch fixed: samples allocated, tokens trained at its start, the digests of the checkpoint it
    started from, each stage's replicas, and when each of its phases began."""

    def __init__(self, kv: KeyValues):
        self.kv = kv

    def allocated(self, epoch: int) -> int:
        return int(self.kv.get(keys.allocated(epoch), 0))

    def set_allocated(self, epoch: int, samples: int) -> None:
        self.kv.put(keys.allocated(epoch), samples)

    def tokens_at_start(self, epoch: int) -> int:
        return int(self.kv.get(keys.tokens_at_start(epoch), 0))

    def set_tokens_at_start(self, epoch: int, tokens: int) -> None:
        self.kv.put(keys.tokens_at_start(epoch), tokens)

    def checkpoint_shas(self, epoch: int) -> list[str] | None:
        """The digest of each stage's weights in checkpoint `epoch` (what audits replay that epoch from)."""
        shas = self.kv.get(keys.checkpoint_shas(epoch))
        return None if shas is None else [str(sha) for sha in shas]

    def set_checkpoint_shas(self, epoch: int, shas: list[str]) -> None:
        self.kv.put(keys.checkpoint_shas(epoch), shas)

    def replicas(self, epoch: int, stage: int) -> int | None:
        replicas = self.kv.get(keys.replicas(epoch, stage))
        return None if replicas is None else int(replicas)

    def set_replicas(self, epoch: int, stage: int, replicas: int) -> None:
        self.kv.put(keys.replicas(epoch, stage), replicas)

    def phase_started(self, epoch: int, phase: str) -> float | None:
        started = self.kv.get(keys.phase_started(epoch, phase))
        return None if started is None else float(started)

    def set_phase_started(self, epoch: int, phase: str, at: float) -> None:
        self.kv.put(keys.phase_started(epoch, phase), at)
