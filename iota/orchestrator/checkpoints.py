"""The run's checkpoints: the first one (resumed, adopted from the bucket, or the seeded init), each one published
after a merge, and what miners are pointed at to load the latest.

Checkpoint N (flat fp32 per stage, and a manifest written last) holds the weights every replica starts epoch N
from. What it points at (weights and outer momentum) is written by the orchestrator alone, from bytes it checked.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

from loguru import logger

from iota.checkpoint import bucket_manifest, latest_epoch
from iota.checkpoint.manifest import TensorList
from iota.merge import sha256_hex
from iota.model.config import ModelConfig
from iota.model.flat import encode_f32, flatten
from iota.model.stages import StageSpec, build_stage
from iota.orchestrator.ledgers import CheckpointInfo
from iota.orchestrator.retention import Retention
from iota.orchestrator.scheduler import TRAIN
from iota.orchestrator.state import StateStore
from iota.storage import keys
from iota.storage.base import ObjectStore


class Checkpoints:
    def __init__(
        self,
        run_id: str,
        model: ModelConfig,
        stages: list[StageSpec],
        tensors: list[TensorList],
        state: StateStore,
        store: ObjectStore,
        seed: int,
        url_ttl_s: int,
        manifest_extra: Callable[[], dict[str, Any]],
    ):
        """`tensors`: each stage's (name, shape) of its parameters, in flat order."""
        self.run_id, self.model, self.stages, self.tensors = run_id, model, stages, tensors
        self.state, self.store = state, store
        self.seed, self.url_ttl_s, self.manifest_extra = seed, url_ttl_s, manifest_extra
        # Set by the assembly: forgets what the run no longer needs after each checkpoint (None: keeps everything).
        self.retention: Retention | None = None

    def initialize(self, now: float) -> None:
        """Resume from the state store; else from the newest checkpoint in the bucket (a fresh orchestrator with an
        empty state store picks a run up from its bucket alone); else write checkpoint 0, the seeded init."""
        if self.state.run.state_id is None:
            self.state.run.set_state_id(uuid.uuid4().hex)  # miners reload everything when this changes
        if self.state.run.checkpoint is not None:
            return
        latest = latest_epoch(self.store, self.run_id)
        if latest is not None:
            self._adopt(latest, now)
            return
        shas = [
            self.write_stage(0, spec.index, encode_f32(flatten(build_stage(self.model, spec, self.seed))))
            for spec in self.stages
        ]
        self.publish(0, shas, {}, now)

    def _adopt(self, epoch: int, now: float) -> None:
        manifest = json.loads(self.store.get(keys.checkpoint_manifest(self.run_id, epoch)))
        if ModelConfig.from_dict(manifest["model"]) != self.model:
            raise ValueError(f"checkpoint {epoch} in the bucket is for another model: {manifest['model']}")
        shas = [str(stage["sha256"]) for stage in manifest["stages"]]
        momentum = manifest.get("momentum") or {}
        tokens = int(manifest["tokens_trained"])
        self.state.run.set_checkpoint(CheckpointInfo(epoch=epoch, shas=shas, momentum=momentum))
        self.state.epochs.set_checkpoint_shas(epoch, shas)
        self.state.run.set_epoch(epoch)
        self.state.run.set_phase(TRAIN)
        self.state.counters.set("tokens_trained", tokens)
        self.state.epochs.set_tokens_at_start(epoch, tokens)
        self.state.counters.set("cursor", int(manifest["data_cursor"]))
        self.state.counters.set("samples_completed", int(manifest["data_cursor"]))
        self.state.log(now, "resumed", None, epoch=epoch, tokens=tokens)
        logger.info("resumed run {} from checkpoint {} in the bucket", self.run_id, epoch)

    def write_stage(self, epoch: int, stage: int, data: bytes) -> str:
        """Put a stage's flat weights of checkpoint `epoch` in the bucket; returns their sha256."""
        self.store.put(keys.checkpoint_stage(self.run_id, epoch, stage), data)
        return sha256_hex(data)

    def write_momentum(self, epoch: int, stage: int, partition: int, data: bytes) -> str:
        """Put a partition's outer momentum beside checkpoint `epoch`; returns its key (the next merge reads it)."""
        key = keys.checkpoint_momentum(self.run_id, epoch, stage, partition)
        self.store.put(key, data)
        return key

    def publish(self, epoch: int, shas: list[str], momentum: dict[str, dict[str, str]], now: float) -> None:
        """Write checkpoint `epoch`'s manifest (its stages are in the bucket) and make it the latest."""
        stage_keys = [keys.checkpoint_stage(self.run_id, epoch, s.index) for s in self.stages]
        tokens = self.state.counters.get("tokens_trained")
        manifest = bucket_manifest(
            run_id=self.run_id,
            epoch=epoch,
            model=self.model,
            stages=self.stages,
            stage_keys=stage_keys,
            stage_shas=shas,
            tensors_per_stage=self.tensors,
            momentum=momentum,
            tokens_trained=tokens,
            data_cursor=self.state.counters.get("cursor"),
            **self.manifest_extra(),
        )
        self.store.put(keys.checkpoint_manifest(self.run_id, epoch), json.dumps(manifest, indent=1).encode())
        self.state.run.set_checkpoint(CheckpointInfo(epoch=epoch, shas=shas, momentum=momentum))
        self.state.epochs.set_tokens_at_start(epoch, tokens)
        self.state.epochs.set_checkpoint_shas(epoch, shas)  # audits replay an epoch from its own start
        self.state.log(now, "checkpoint", None, epoch=epoch)
        logger.info("published checkpoint {}", epoch)
        if self.retention is not None:
            self.retention.wake()  # on its own thread, whose first transaction waits for this one to end

    def latest(self) -> str | None:
        """The key of the latest checkpoint's manifest."""
        info = self.state.run.checkpoint
        return None if info is None else keys.checkpoint_manifest(self.run_id, info.epoch)

    def weights_url(self, stage: int) -> str | None:
        info = self.state.run.checkpoint
        if info is None:
            return None
        key = keys.checkpoint_stage(self.run_id, info.epoch, stage)
        return self.store.presign_get(key, self.url_ttl_s)

    def weights_sha(self, stage: int) -> str | None:
        info = self.state.run.checkpoint
        return None if info is None else info.shas[stage]
