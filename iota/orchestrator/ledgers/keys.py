"""Every key of the state's `kv` table, in one place: the ledgers read and write their values under these.

The strings are the stored format: an existing state database is read through them, so a key never changes.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol


class KeyValues(Protocol):
    """The `kv` table (iota.orchestrator.state.StateStore): JSON values under string keys."""

    def get(self, key: str, default: Any = None) -> Any: ...

    def put(self, key: str, value: Any) -> None: ...

    def bump(self, key: str, by: int = 1) -> int: ...


# -- run-level values ------------------------------------------------------------------------------------

STATE_ID = "state_id"  # changes when the state is new: miners then reload everything
CHECKPOINT = "checkpoint"  # the latest published checkpoint
EPOCH = "epoch"
PHASE = "phase"
PAUSED = "paused"
FLAGS = "flags"  # the operator's run flags
DATA_SHARDS = "data_shards"  # names of the data shards in the bucket

# Counters, each stored under its own name.
Counter = Literal[
    "cursor",  # the next sample id: samples are allocated in data order
    "tokens_trained",
    "samples_completed",
    "samples_requeued",
    "samples_dropped",  # restarted too often (Policy.max_restarts): out of their epoch, not lost
    "leases_expired",
    "bytes_transferred",
    "merges",
    "audits_passed",
    "audits_failed",
    "challenges_issued",
    "challenges_answered",
    "challenges_missed",
    "lease_serial",  # one per lease: names its output object
    "next_hop_id",
    "next_verdict_id",
    "next_event_id",
]


# -- per epoch -------------------------------------------------------------------------------------------


def allocated(epoch: int) -> str:
    return f"allocated/{epoch}"


def tokens_at_start(epoch: int) -> str:
    return f"tokens_at_start/{epoch}"


def checkpoint_shas(epoch: int) -> str:
    return f"checkpoint_shas/{epoch}"


def replicas(epoch: int, stage: int) -> str:
    return f"replicas/{epoch}/{stage}"


def phase_started(epoch: int, phase: str) -> str:
    return f"phase_started/{epoch}/{phase}"


# -- the end of an epoch: uploads and merges -------------------------------------------------------------


def upload(epoch: int, stage: int, hotkey: str) -> str:
    return f"upload/{epoch}/{stage}/{hotkey}"


def upload_lease(epoch: int, stage: int, hotkey: str) -> str:
    return f"upload_lease/{epoch}/{stage}/{hotkey}"


def apply_lease(epoch: int, stage: int, hotkey: str) -> str:
    return f"apply_lease/{epoch}/{stage}/{hotkey}"


def lapsed(epoch: int, phase: str, hotkey: str) -> str:
    """Set once a miner's upload or apply lease lapsed unreported: it was struck for it (once)."""
    return f"lapsed/{epoch}/{phase}/{hotkey}"


def plan(epoch: int, stage: int) -> str:
    return f"plan/{epoch}/{stage}"


def merged(epoch: int, stage: int, hotkey: str) -> str:
    return f"merged/{epoch}/{stage}/{hotkey}"


def accepted(epoch: int, stage: int) -> str:
    return f"accepted/{epoch}/{stage}"


def applied(epoch: int, hotkey: str) -> str:
    return f"applied/{epoch}/{hotkey}"


def loaded(hotkey: str) -> str:
    return f"loaded/{hotkey}"


# -- inner steps and snapshot challenges -----------------------------------------------------------------


def step(epoch: int, hotkey: str) -> str:
    return f"step/{epoch}/{hotkey}"


def sketch(epoch: int, hotkey: str, step: int) -> str:
    return f"sketch/{epoch}/{hotkey}/{step}"


def sessions(epoch: int, hotkey: str) -> str:
    return f"sessions/{epoch}/{hotkey}"


def challenge(hotkey: str) -> str:
    return f"challenge/{hotkey}"


def snapshot(epoch: int, hotkey: str, step: int) -> str:
    return f"snapshot/{epoch}/{hotkey}/{step}"


def snapshots(epoch: int, hotkey: str) -> str:
    return f"snapshots/{epoch}/{hotkey}"


def windows(epoch: int, hotkey: str) -> str:
    return f"windows/{epoch}/{hotkey}"


def unanswered(epoch: int, hotkey: str) -> str:
    return f"unanswered/{epoch}/{hotkey}"


def forfeit(epoch: int, hotkey: str) -> str:
    return f"forfeit/{epoch}/{hotkey}"


# -- audits ----------------------------------------------------------------------------------------------


def audit(audit_id: str) -> str:
    return f"audit/{audit_id}"


CONFIRMATIONS = "confirmations"  # audit id of a failing verdict -> what confirming it needs
END_AUDITS = "end_audits"  # the end-of-epoch audits still to serve
SCORE_ARCHIVE = "score_archive"  # the score log a run resumed from its bucket carried over
SCORES_MIRRORED = "scores_mirrored"  # the last epoch whose score log is in the bucket


# Families above whose second segment is an epoch: retention (iota.orchestrator.retention) forgets an expired
# epoch's values by these.
PER_EPOCH = (
    "allocated",
    "tokens_at_start",
    "checkpoint_shas",
    "replicas",
    "phase_started",
    "upload",
    "upload_lease",
    "apply_lease",
    "lapsed",
    "plan",
    "merged",
    "accepted",
    "applied",
    "step",
    "sketch",
    "sessions",
    "snapshot",
    "snapshots",
    "windows",
    "unanswered",
    "forfeit",
)


def epoch_of(key: str) -> int | None:
    """The epoch a per-epoch key belongs to; None for any other key."""
    family, _, rest = key.partition("/")
    epoch = rest.split("/", 1)[0]
    return int(epoch) if family in PER_EPOCH and epoch.isdigit() else None
