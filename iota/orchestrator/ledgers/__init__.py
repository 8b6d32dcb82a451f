"""Typed ledgers over the orchestrator's state: one class per family of records, every key in `keys`.

The state store (iota.orchestrator.state.StateStore) holds one of each (`state.uploads`, `state.merges`...);
callers group their reads and writes with `state.transaction()`. Values are JSON in the `kv` table under the keys
of `keys`; the abuse policy's strikes and bans have tables of their own, and the work done is read from the hops.
"""

from iota.orchestrator.ledgers.abuse import AbuseLedger
from iota.orchestrator.ledgers.audits import Audits
from iota.orchestrator.ledgers.challenges import Snapshots, Steps
from iota.orchestrator.ledgers.epoch_end import Merges, Uploads
from iota.orchestrator.ledgers.records import (
    AuditRecord,
    ChallengeRecord,
    CheckpointInfo,
    Claim,
    EndAuditQueue,
    ScoreArchive,
    SnapshotRecord,
    UploadRecord,
)
from iota.orchestrator.ledgers.run import Counters, EpochValues, RunValues
from iota.orchestrator.ledgers.work import WorkDone

__all__ = [
    "AbuseLedger",
    "AuditRecord",
    "Audits",
    "ChallengeRecord",
    "CheckpointInfo",
    "Claim",
    "Counters",
    "EndAuditQueue",
    "EpochValues",
    "Merges",
    "RunValues",
    "ScoreArchive",
    "SnapshotRecord",
    "Snapshots",
    "Steps",
    "UploadRecord",
    "Uploads",
    "WorkDone",
]
