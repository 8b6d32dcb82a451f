"""The end of each epoch as the epoch driver records it: uploads of pseudo-gradients, then each stage's merge."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from pydantic import TypeAdapter, ValidationError

from iota.merge import MergePlan
from iota.orchestrator.ledgers import keys
from iota.orchestrator.ledgers.keys import KeyValues
from iota.orchestrator.ledgers.records import UploadRecord
from iota.protocol import MergeDone, PartitionDone

_PARTITIONS = TypeAdapter(dict[int, PartitionDone])


class Leases:
    """Until when an end-of-epoch phase waits for a miner's upload or apply once it was handed the work (its lease),
    and whether its lapse has been struck."""

    def __init__(self, kv: KeyValues, phase: str, key: Callable[[int, int, str], str]):
        self.kv, self.phase, self.key = kv, phase, key

    def grant(self, epoch: int, stage: int, hotkey: str, until: float) -> None:
        self.kv.put(self.key(epoch, stage, hotkey), until)

    def until(self, epoch: int, stage: int, hotkey: str) -> float | None:
        value = self.kv.get(self.key(epoch, stage, hotkey))
        return None if value is None else float(value)

    def lapse(self, epoch: int, hotkey: str) -> bool:
        """Note that `hotkey`'s lease lapsed with its work unreported; True the first time only (one strike)."""
        key = keys.lapsed(epoch, self.phase, hotkey)
        if self.kv.get(key) is not None:
            return False
        self.kv.put(key, True)
        return True


class Uploads:
    """Each miner's pseudo-gradient upload of an epoch, and the leases of those it was handed."""

    def __init__(self, kv: KeyValues):
        self.kv = kv
        self.leases = Leases(kv, "upload", keys.upload_lease)

    def record(self, epoch: int, stage: int, hotkey: str, upload: UploadRecord) -> None:
        self.kv.put(keys.upload(epoch, stage, hotkey), upload.model_dump())

    def get(self, epoch: int, stage: int, hotkey: str) -> UploadRecord | None:
        data = self.kv.get(keys.upload(epoch, stage, hotkey))
        return None if data is None else UploadRecord.model_validate(data)


class Merges:
    """Each stage's merge: its plan, what each owner reported merging, whose result was accepted for each
    partition, and which miners applied the merged weights (and the leases of those handed the apply)."""

    def __init__(self, kv: KeyValues):
        self.kv = kv
        self.apply_leases = Leases(kv, "apply", keys.apply_lease)

    def set_plan(self, plan: MergePlan) -> None:
        self.kv.put(keys.plan(plan.epoch, plan.stage), plan.model_dump(mode="json"))

    def plan(self, epoch: int, stage: int) -> MergePlan | None:
        data = self.kv.get(keys.plan(epoch, stage))
        return None if data is None else MergePlan.model_validate(data)

    def record_report(self, epoch: int, stage: int, hotkey: str, done: MergeDone) -> None:
        """An owner's merge report: partition -> the digest of its slices and the norms it measured."""
        partitions = {str(index): result.model_dump() for index, result in done.partitions.items()}
        self.kv.put(keys.merged(epoch, stage, hotkey), partitions)

    def report(self, epoch: int, stage: int, hotkey: str) -> dict[int, PartitionDone] | None:
        """What the owner reported merging; None if it sent no report. A stored value that does not parse (a
        database written before reports were typed) holds no claim."""
        data = self.kv.get(keys.merged(epoch, stage, hotkey))
        if data is None:
            return None
        try:
            return _PARTITIONS.validate_python(data)
        except ValidationError:
            return {}

    def accept(self, epoch: int, stage: int, owners: Mapping[int, str]) -> None:
        """Whose result each partition took: an owner, or the orchestrator where it recomputed."""
        self.kv.put(keys.accepted(epoch, stage), {str(index): owner for index, owner in owners.items()})

    def record_applied(self, epoch: int, hotkey: str, sha256: str | None) -> None:
        self.kv.put(keys.applied(epoch, hotkey), sha256)

    def applied(self, epoch: int, hotkey: str) -> str | None:
        return self.kv.get(keys.applied(epoch, hotkey))

    def set_loaded(self, hotkey: str, epoch: int) -> None:
        """The checkpoint whose weights the miner holds: the one it registered with, or the last it applied."""
        self.kv.put(keys.loaded(hotkey), epoch)

    def loaded(self, hotkey: str) -> int | None:
        return self.kv.get(keys.loaded(hotkey))
