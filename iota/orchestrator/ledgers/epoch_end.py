"""The end of each epoch as the epoch driver records it: uploads of pseudo-gradients, then each stage's merge."""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import TypeAdapter, ValidationError

from iota.merge import MergePlan
from iota.orchestrator.ledgers import keys
from iota.orchestrator.ledgers.keys import KeyValues
from iota.orchestrator.ledgers.records import UploadRecord
from iota.protocol import MergeDone, PartitionDone

_PARTITIONS = TypeAdapter(dict[int, PartitionDone])


class Uploads:
    """Each miner's pseudo-gradient upload of an epoch, and the time its upload was granted until (its lease)."""

    def __init__(self, kv: KeyValues):
        self.kv = kv

    def record(self, epoch: int, stage: int, hotkey: str, upload: UploadRecord) -> None:
        self.kv.put(keys.upload(epoch, stage, hotkey), upload.model_dump())

    def get(self, epoch: int, stage: int, hotkey: str) -> UploadRecord | None:
        data = self.kv.get(keys.upload(epoch, stage, hotkey))
        return None if data is None else UploadRecord.model_validate(data)

    def grant(self, epoch: int, stage: int, hotkey: str, until: float) -> None:
        self.kv.put(keys.upload_lease(epoch, stage, hotkey), until)

    def lease(self, epoch: int, stage: int, hotkey: str) -> float | None:
        until = self.kv.get(keys.upload_lease(epoch, stage, hotkey))
        return None if until is None else float(until)


class Merges:
    """Each stage's merge: its plan, what each owner reported merging, whose result was accepted for each
    partition, and which miners applied the merged weights."""

    def __init__(self, kv: KeyValues):
        self.kv = kv

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
