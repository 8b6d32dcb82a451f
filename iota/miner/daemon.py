"""What a miner's hops (iota.miner.hops) and phase work (iota.miner.phases) see of the daemon that drives them
(iota.miner.main.MinerDaemon): a structural type, so that neither imports the daemon."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import httpx

from iota.client.orchestrator import OrchestratorClient
from iota.protocol import ReleaseReason, RunInfo, Work
from iota.train.schedule import LRSchedule
from iota.train.snapshot import Snapshot
from iota.train.worker import StageWorker


@dataclass
class MinerState:
    stopping: bool = False
    hops_done: int = 0
    compute_s: float = 0.0  # seconds in forwards, backwards and inner steps (the rest: transfers and waiting)
    last_loss: float | None = None


class SnapshotAnswers(Protocol):
    def wait_answered(self, before_step: int | None = None) -> None: ...


class Daemon(Protocol):
    client: OrchestratorClient
    http: httpx.Client
    state: MinerState
    run: RunInfo  # set by registration, as are the rest
    schedule: LRSchedule
    stage: int
    worker: StageWorker | None  # replaced when the miner registers on another stage

    @property
    def loaded_worker(self) -> StageWorker: ...

    @property
    def phases(self) -> SnapshotAnswers: ...  # a report past a challenged step waits for its answer

    def kept_state(self, epoch: int, step: int) -> Snapshot | None: ...  # the exact state after that step

    def release(self, work: Work, reason: ReleaseReason = "stopping") -> None: ...

    def load_flat(self, url: str, sha: str | None) -> None: ...
