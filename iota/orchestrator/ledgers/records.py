"""The values the ledgers keep as JSON objects: small frozen models whose fields are the stored format.

Fields added later have defaults, so that what an older iota wrote still reads.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from iota.protocol import EpochPlan


class Record(BaseModel):
    model_config = ConfigDict(frozen=True)


class CheckpointInfo(Record):
    """The latest published checkpoint: its epoch, the digest of each stage's weights, and its outer momentum."""

    epoch: int
    shas: list[str]
    # stage -> partition -> key of the momentum slice the next merge reads (str keys: JSON objects)
    momentum: dict[str, dict[str, str]] = Field(default_factory=dict)


class UploadRecord(Record):
    """A miner's pseudo-gradient upload of an epoch, as the orchestrator checked it."""

    key: str
    sha: str | None
    norm: float  # the norm the miner claimed (NaN when it claimed none)
    weight: (
        int  # its work weight: the hops it completed this epoch, from our own ledger, never from its claim
    )


class ChallengeRecord(Record):
    """A miner's snapshot challenge, issued and waiting (iota.orchestrator.challenges)."""

    epoch: int
    step: int  # the inner step challenged: the snapshot is of the state right after it
    key: str  # where the snapshot is uploaded
    at: float
    # Once the miner copied it (it uploads it meanwhile): its reports past this step wait for the answer.
    taken: int | None = None
    session: str | None = None  # the miner session that took it


class SnapshotRecord(Record):
    """An answered snapshot challenge: the object and the digest the miner reported for it."""

    key: str
    sha256: str


class AuditRecord(Record):
    """An audit issued to a validator (iota.orchestrator.audits), and when it was answered."""

    validator: str
    miner: str
    epoch: int
    stage: int
    issued: float
    plan: EpochPlan
    bf16: bool
    confirms: str | None  # the failing verdict (its audit id) this audit replays to confirm or refute
    start_step: int
    answered: float | None = None


class Claim(Record):
    """A failing verdict waiting for confirmation: what replaying the same window again needs."""

    miner: str
    epoch: int
    stage: int
    accuser: str
    at: float
    plan: EpochPlan
    bf16: bool
    start_step: int = 0
    assigned_at: float = 0.0  # when another validator was last given it to confirm
    # A validator whose verdict on it the orchestrator's recomputation must check: one whose replay passed it (a
    # dispute), or, by a spot check, one whose replay confirmed it.
    recompute_for: str | None = None


class EndAuditQueue(Record):
    """The end-of-epoch audits still to serve (iota.orchestrator.audits)."""

    through: int = -1  # the last merged epoch whose submitters were queued
    pending: list[tuple[int, str, int]] = Field(default_factory=list)  # (epoch, miner, stage), in order


class ScoreArchive(Record):
    """The score log a run resumed from its bucket carried over (the bucket's JSON, as it was)."""

    work: dict[str, Any]
    verdicts: list[Any]
    uids: dict[str, Any] = Field(default_factory=dict)
