"""The end of an epoch: UPLOAD pseudo-gradients, MERGE partitions (two owners each, compared), APPLY the result.

Checkpoint N (flat fp32 per stage, and a manifest written last) holds the weights every replica starts epoch N
from; checkpoint 0 is the seeded initialisation, written here before anyone trains. The orchestrator never
trains: it only plans, compares digests, recomputes a partition whose owners disagree or vanished (the merge is
cheap and deterministic), and assembles the next checkpoint from the accepted slices.

Deadlines are soft for uploads: a pseudo-gradient upload granted before the UPLOAD deadline holds a lease of that
deadline plus its size over `min_upload_bytes_per_s`, and the phase waits for it until then, never longer. What the
checkpoint points at (weights and outer momentum) is written by the orchestrator alone, from the bytes it checked:
an owner's merge outputs stay writable through its presigned URLs, so they are never read again after acceptance.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from loguru import logger

from iota.audit.scoring import confirmed_failures
from iota.checkpoint import bucket_manifest, latest_epoch
from iota.merge import (
    FlatRef,
    MergePlan,
    OuterConfig,
    Partition,
    Submitter,
    make_plan,
    partition_digest,
    read_slice,
    run_owner,
)
from iota.merge.butterfly import check_claimed_norms, sha256_hex
from iota.model.config import ModelConfig
from iota.model.flat import decode_f32, encode_f32, flatten
from iota.model.stages import StageSpec, build_stage
from iota.orchestrator.scheduler import APPLY, DONE, MERGE, TRAIN, UPLOAD, Scheduler, SchedulingError
from iota.orchestrator.state import Miner, StateStore
from iota.protocol import EpochPlan, Report, Work
from iota.storage import keys
from iota.storage.base import ObjectStore

ORCHESTRATOR = "orchestrator"  # owner name under which the orchestrator writes partitions it recomputed


@dataclass(frozen=True)
class EpochSettings:
    partitions: int
    outer: OuterConfig
    seed: int
    url_ttl_s: int
    phase_timeout_s: float  # an end-of-epoch phase moves on without miners that have not answered by then
    min_upload_bytes_per_s: float  # a granted upload gets this much extra time for its size (soft deadline)
    merge_clip: float = 0.0  # global L2 norm C each pseudo-gradient is clipped to at the merge; 0: off


@dataclass(frozen=True)
class _Accepted:
    """One partition's merge result as the orchestrator checked it: the bytes themselves, never a key to re-read."""

    owner: str  # whose result it is: an owner, or ORCHESTRATOR when it recomputed and neither owner matched
    weights: bytes
    momentum: bytes


class EpochDriver:
    def __init__(
        self,
        run_id: str,
        model: ModelConfig,
        stages: list[StageSpec],
        state: StateStore,
        scheduler: Scheduler,
        store: ObjectStore,
        settings: EpochSettings,
        manifest_extra: Callable[[], dict[str, Any]],
        micro_batch_tokens: int,
    ):
        self.run_id, self.model, self.stages = run_id, model, stages
        self.state, self.scheduler, self.store, self.settings = state, scheduler, store, settings
        self.manifest_extra = manifest_extra
        self.micro_batch_tokens = micro_batch_tokens
        with torch.device("meta"):
            metas = [build_stage(model, spec, seed=0, device="meta") for spec in stages]
        self.tensors = [sorted((n, list(p.shape)) for n, p in m.named_parameters()) for m in metas]
        self.n_params = [sum(math.prod(shape) for _, shape in t) for t in self.tensors]

    # -- checkpoints ------------------------------------------------------------------------------------

    def initialize(self, now: float) -> None:
        """Resume from the state store; else from the newest checkpoint in the bucket (a fresh orchestrator with an
        empty state store picks a run up from its bucket alone); else write checkpoint 0, the seeded init."""
        if self.state.get("state_id") is None:
            self.state.put("state_id", uuid.uuid4().hex)  # miners reload everything when this changes
        if self.state.get("checkpoint") is not None:
            return
        latest = latest_epoch(self.store, self.run_id)
        if latest is not None:
            self._adopt(latest, now)
            return
        shas = []
        for spec in self.stages:
            flat = flatten(build_stage(self.model, spec, self.settings.seed))
            data = encode_f32(flat)
            self.store.put(keys.checkpoint_stage(self.run_id, 0, spec.index), data)
            shas.append(sha256_hex(data))
        self._publish(0, shas, {}, now)

    def _adopt(self, epoch: int, now: float) -> None:
        manifest = json.loads(self.store.get(keys.checkpoint_manifest(self.run_id, epoch)))
        if ModelConfig.from_dict(manifest["model"]) != self.model:
            raise ValueError(f"checkpoint {epoch} in the bucket is for another model: {manifest['model']}")
        shas = [str(stage["sha256"]) for stage in manifest["stages"]]
        momentum = manifest.get("momentum") or {}
        self.state.put("checkpoint", {"epoch": epoch, "shas": shas, "momentum": momentum})
        self.state.put(f"checkpoint_shas/{epoch}", shas)
        self.state.put("epoch", epoch)
        self.state.put("phase", TRAIN)
        self.state.put("tokens_trained", int(manifest["tokens_trained"]))
        self.state.put(f"tokens_at_start/{epoch}", int(manifest["tokens_trained"]))
        self.state.put("cursor", int(manifest["data_cursor"]))
        self.state.put("samples_completed", int(manifest["data_cursor"]))
        self.state.log(now, "resumed", None, epoch=epoch, tokens=int(manifest["tokens_trained"]))
        logger.info("resumed run {} from checkpoint {} in the bucket", self.run_id, epoch)

    def _publish(self, epoch: int, shas: list[str], momentum: dict[str, dict[str, str]], now: float) -> None:
        stage_keys = [keys.checkpoint_stage(self.run_id, epoch, s.index) for s in self.stages]
        extra = self.manifest_extra()
        manifest = bucket_manifest(
            run_id=self.run_id,
            epoch=epoch,
            model=self.model,
            stages=self.stages,
            stage_keys=stage_keys,
            stage_shas=shas,
            tensors_per_stage=self.tensors,
            momentum=momentum,
            tokens_trained=int(self.state.get("tokens_trained", 0)),
            data_cursor=int(self.state.get("cursor", 0)),
            **extra,
        )
        self.store.put(keys.checkpoint_manifest(self.run_id, epoch), json.dumps(manifest, indent=1).encode())
        self.state.put("checkpoint", {"epoch": epoch, "shas": shas, "momentum": momentum})
        self.state.put(f"tokens_at_start/{epoch}", int(self.state.get("tokens_trained", 0)))
        self.state.put(f"checkpoint_shas/{epoch}", shas)  # audits replay an epoch from its own start
        self.state.log(now, "checkpoint", None, epoch=epoch)
        logger.info("published checkpoint {}", epoch)

    def latest_checkpoint(self) -> str | None:
        info = self.state.get("checkpoint")
        return None if info is None else keys.checkpoint_manifest(self.run_id, int(info["epoch"]))

    def weights_url(self, stage: int) -> str | None:
        info = self.state.get("checkpoint")
        if info is None:
            return None
        key = keys.checkpoint_stage(self.run_id, int(info["epoch"]), stage)
        return self.store.presign_get(key, self.settings.url_ttl_s)

    def weights_sha(self, stage: int) -> str | None:
        info = self.state.get("checkpoint")
        return None if info is None else str(info["shas"][stage])

    def data_urls(self) -> dict[str, str]:
        names = self.state.get("data_shards", [])
        return {
            n: self.store.presign_get(keys.data_shard(self.run_id, n), self.settings.url_ttl_s) for n in names
        }

    def plan(self, stage: int) -> EpochPlan:
        """The numbers every replica's learning rate follows this epoch (frozen at the epoch's first request)."""
        epoch = self.scheduler.epoch
        name = f"replicas/{epoch}/{stage}"
        replicas = self.state.get(name)
        if replicas is None:
            replicas = max(1, sum(1 for m in self.state.miners(alive_only=True) if m.stage == stage))
            self.state.put(name, replicas)
        return EpochPlan(
            epoch=epoch,
            tokens_at_start=int(self.state.get(f"tokens_at_start/{epoch}", 0)),
            replicas=int(replicas),
        )

    # -- phase work -------------------------------------------------------------------------------------

    def phase_work(self, miner: Miner, now: float) -> Work:
        self.advance(now)
        phase, epoch = self.scheduler.phase, self.scheduler.epoch
        base = dict(run_id=self.run_id, epoch=epoch, stage=miner.stage, plan=self.plan(miner.stage))
        ttl = self.settings.url_ttl_s
        if phase == DONE:
            return Work(kind="stop", reason="the run is complete", **base)
        if phase == UPLOAD and self.state.get(self._upload_name(epoch, miner)) is None:
            lease = self._upload_lease(epoch, miner, now)
            if lease is None:
                return Work(kind="wait", wait_s=0.2, reason="the upload deadline has passed", **base)
            key = keys.pseudo_grad(self.run_id, epoch, miner.stage, miner.hotkey)
            size = 4 * self.n_params[miner.stage]
            return Work(
                kind="upload",
                output_url=self.store.presign_put(key, max(ttl, math.ceil(lease - now)), size),
                output_size=size,
                lease_expires=lease,
                **base,
            )
        if phase == MERGE:
            plan = self._merge_plan(epoch, miner.stage)
            mine = plan.partitions_of(miner.hotkey) if plan is not None else []
            done = self.state.get(f"merged/{epoch}/{miner.stage}/{miner.hotkey}") is not None
            if plan is not None and mine and not done:
                return Work(kind="merge", extra=self._merge_payload(plan, miner.hotkey, mine), **base)
        if phase == APPLY and self.state.get(f"applied/{epoch}/{miner.hotkey}") is None:
            key = keys.checkpoint_stage(self.run_id, epoch + 1, miner.stage)
            return Work(
                kind="apply",
                input_url=self.store.presign_get(key, ttl),
                input_sha256=self.weights_sha(miner.stage),
                **base,
            )
        return Work(kind="wait", wait_s=0.2, reason=f"waiting for other miners to finish {phase}", **base)

    def _upload_name(self, epoch: int, miner: Miner) -> str:
        return f"upload/{epoch}/{miner.stage}/{miner.hotkey}"

    def _upload_lease(self, epoch: int, miner: Miner, now: float) -> float | None:
        """When `miner`'s upload must be reported by: granted once, before the UPLOAD deadline, for the deadline
        plus a grace of its size over the minimum bandwidth (asking again never extends it); None once that has
        passed, or when the deadline passed before it asked."""
        name = f"upload_lease/{epoch}/{miner.stage}/{miner.hotkey}"
        lease = self.state.get(name)
        if lease is None:
            deadline = self._phase_started(epoch, UPLOAD, now) + self.settings.phase_timeout_s
            if now > deadline:
                return None
            lease = deadline + 4 * self.n_params[miner.stage] / self.settings.min_upload_bytes_per_s
            self.state.put(name, lease)
        return float(lease) if now <= float(lease) else None

    def _phase_started(self, epoch: int, phase: str, now: float) -> float:
        """When `phase` of `epoch` began: the first time anyone looked, if it was not set when it began."""
        started = float(self.state.get(f"phase_started/{epoch}/{phase}", now))
        self.state.put(f"phase_started/{epoch}/{phase}", started)
        return started

    def _merge_payload(self, plan: MergePlan, hotkey: str, mine: list[int]) -> dict[str, Any]:
        ttl = self.settings.url_ttl_s
        reads = {s.upload_key for s in plan.submitters}
        for index in mine:
            p = plan.partitions[index]
            reads.add(p.prev_weights.key)
            if p.prev_momentum is not None:
                reads.add(p.prev_momentum.key)
        writes = {}
        for index in mine:
            size = 4 * plan.partitions[index].size
            for kind in ("weights", "momentum"):
                key = plan.output_key(index, hotkey, kind)  # type: ignore[arg-type]
                writes[key] = self.store.presign_put(key, ttl, size)
        return {
            "plan": plan.model_dump(mode="json"),
            "get": {key: self.store.presign_get(key, ttl) for key in sorted(reads)},
            "put": writes,
        }

    def report(self, miner: Miner, report: Report, now: float) -> None:
        phase, epoch = self.scheduler.phase, self.scheduler.epoch
        kind = report.extra.get("kind")
        if report.epoch != epoch:
            raise SchedulingError(409, f"epoch {report.epoch} is closed (current {epoch})")
        if kind == "upload" and phase == UPLOAD:
            lease = self.state.get(f"upload_lease/{epoch}/{miner.stage}/{miner.hotkey}")
            if lease is None or now > float(lease):
                why = "no upload was granted" if lease is None else f"its lease ended {now - lease:.1f} s ago"
                raise SchedulingError(
                    409, f"upload of epoch {epoch} refused: {why}; the merge goes on without it"
                )
            self._record_upload(miner, report, now)
        elif kind == "merge" and phase == MERGE:
            self.state.put(f"merged/{epoch}/{miner.stage}/{miner.hotkey}", report.extra.get("partitions", {}))
        elif kind == "apply" and phase == APPLY:
            expected = self.weights_sha(miner.stage)
            if report.output_sha256 != expected:
                raise SchedulingError(
                    400, f"applied weights digest {report.output_sha256} != checkpoint {expected}"
                )
            self.state.put(f"applied/{epoch}/{miner.hotkey}", report.output_sha256)
        else:
            raise SchedulingError(409, f"a {kind!r} report does not fit phase {phase} of epoch {epoch}")
        self.advance(now)

    def _record_upload(self, miner: Miner, report: Report, now: float) -> None:
        epoch = self.scheduler.epoch
        key = keys.pseudo_grad(self.run_id, epoch, miner.stage, miner.hotkey)
        info = self.store.head(key)
        size = 4 * self.n_params[miner.stage]
        if info is None or info.size != size:
            raise SchedulingError(400, f"pseudo-gradient not uploaded with {size} bytes")
        norm = float(report.extra.get("norm", float("nan")))
        # Work weight from our own ledger (hops this miner completed this epoch), never from its claim.
        hops = self.state.db.scalar(
            "SELECT COUNT(*) FROM hops WHERE miner = ? AND epoch = ? AND status = 'done'",
            (miner.hotkey, epoch),
        )
        self.state.put(
            self._upload_name(epoch, miner),
            {"key": key, "sha": report.output_sha256, "norm": norm, "weight": int(hops or 0)},
        )
        self.state.bump("bytes_transferred", size)

    # -- advancing phases -------------------------------------------------------------------------------

    def advance(self, now: float) -> None:
        """Move to the next phase once everyone expected has answered, or the phase has timed out."""
        phase, epoch = self.scheduler.phase, self.scheduler.epoch
        timed_out = now - self._phase_started(epoch, phase, now) > self.settings.phase_timeout_s
        alive = self.state.miners(alive_only=True)
        if phase == UPLOAD:
            waiting = [m for m in alive if self.state.get(self._upload_name(epoch, m)) is None]
            # Past the deadline, only uploads granted before it are waited for, each until its own lease ends.
            uploading = [m for m in waiting if timed_out and self._upload_lease(epoch, m, now) is not None]
            if not waiting or (timed_out and not uploading):
                self._start_merge(epoch, now)
        elif phase == MERGE:
            pending = []
            for spec in self.stages:
                plan = self._merge_plan(epoch, spec.index)
                if plan is None:
                    continue
                alive_keys = {m.hotkey for m in alive}
                pending += [
                    h
                    for h in plan.hotkeys
                    if h in alive_keys
                    and plan.partitions_of(h)
                    and self.state.get(f"merged/{epoch}/{spec.index}/{h}") is None
                ]
            if not pending or timed_out:
                self._finish_merge(epoch, now)
        elif phase == APPLY:
            waiting = [m for m in alive if self.state.get(f"applied/{epoch}/{m.hotkey}") is None]
            if not waiting or timed_out:
                self.scheduler.next_epoch(now)

    def _start_merge(self, epoch: int, now: float) -> None:
        # A miner whose audit failed this epoch, confirmed by an independent replay, contributes no update.
        failed = {miner for miner, e in confirmed_failures(self.state.verdicts()) if e == epoch}
        for spec in self.stages:
            submitters = []
            for m in self.state.miners():
                up = (
                    self.state.get(f"upload/{epoch}/{spec.index}/{m.hotkey}")
                    if m.stage == spec.index
                    else None
                )
                if up is not None and m.hotkey in failed:
                    self.state.log(
                        now, "merge_excluded", m.hotkey, epoch=epoch, reason="confirmed failed audit"
                    )
                    logger.warning(
                        "epoch {}: {}'s pseudo-gradient is left out (failed audit)", epoch, m.hotkey[:10]
                    )
                elif up is not None:
                    submitters.append(
                        Submitter(
                            hotkey=m.hotkey,
                            upload_key=up["key"],
                            weight=max(float(up["weight"]), 1e-9),
                            claimed_norm=up["norm"],
                        )
                    )
            if not submitters:
                logger.warning(
                    "epoch {}: no pseudo-gradient for stage {}; it keeps its weights", epoch, spec.index
                )
                continue
            plan = make_plan(
                run=self.run_id,
                epoch=epoch,
                stage=spec.index,
                n_params=self.n_params[spec.index],
                n_partitions=self.settings.partitions,
                submitters=submitters,
                prev_weights=self._prev_weights(epoch, spec.index),
                prev_momentum=self._prev_momentum(spec.index),
                outer=self.settings.outer,
                clip=self.settings.merge_clip or None,
                output_template=keys.merged_template(self.run_id, epoch, spec.index),
            )
            self.state.put(f"plan/{epoch}/{spec.index}", plan.model_dump(mode="json"))
        self._set_phase(epoch, MERGE, now)

    def _prev_weights(self, epoch: int, stage: int) -> list[FlatRef]:
        ref = FlatRef(key=keys.checkpoint_stage(self.run_id, epoch, stage))
        return [ref] * self._n_partitions(stage)

    def _prev_momentum(self, stage: int) -> list[FlatRef | None]:
        info = self.state.get("checkpoint") or {}
        stage_momentum = (info.get("momentum") or {}).get(str(stage), {})
        from iota.merge.plan import partition_bounds

        bounds = partition_bounds(self.n_params[stage], self.settings.partitions)
        return [
            FlatRef(key=stage_momentum[str(i)], first=start) if str(i) in stage_momentum else None
            for i, (start, _) in enumerate(bounds)
        ]

    def _n_partitions(self, stage: int) -> int:
        from iota.merge.plan import partition_bounds

        return len(partition_bounds(self.n_params[stage], self.settings.partitions))

    def _merge_plan(self, epoch: int, stage: int) -> MergePlan | None:
        data = self.state.get(f"plan/{epoch}/{stage}")
        return None if data is None else MergePlan.model_validate(data)

    def _finish_merge(self, epoch: int, now: float) -> None:
        """Accept each partition the two owners agree on; recompute the rest; assemble checkpoint epoch + 1."""
        shas, momentum = [], {}
        for spec in self.stages:
            plan = self._merge_plan(epoch, spec.index)
            prev_key = keys.checkpoint_stage(self.run_id, epoch, spec.index)
            if plan is None:
                data = self.store.get(prev_key)
                self.store.put(keys.checkpoint_stage(self.run_id, epoch + 1, spec.index), data)
                shas.append(sha256_hex(data))
                continue
            accepted, sq_norms = self._settle(plan, epoch, now)
            data = encode_f32(self._assemble(plan, accepted))
            self.store.put(keys.checkpoint_stage(self.run_id, epoch + 1, spec.index), data)
            shas.append(sha256_hex(data))
            # The next merge reads its momentum from copies under the checkpoint, which only we write.
            stage_momentum = {}
            for index, result in accepted.items():
                key = keys.checkpoint_momentum(self.run_id, epoch + 1, spec.index, index)
                self.store.put(key, result.momentum)
                stage_momentum[str(index)] = key
            momentum[str(spec.index)] = stage_momentum
            self.state.put(f"accepted/{epoch}/{spec.index}", {str(i): a.owner for i, a in accepted.items()})
            for hotkey in check_claimed_norms(plan, sq_norms):
                self.state.log(now, "norm_mismatch", hotkey, epoch=epoch, stage=spec.index)
        self._publish(epoch + 1, shas, momentum, now)
        self.state.bump("merges")
        self._set_phase(epoch, APPLY, now)

    def _assemble(self, plan: MergePlan, accepted: dict[int, _Accepted]) -> torch.Tensor:
        """The stage's new flat weights: each accepted partition from its checked bytes; a partition nobody merged
        keeps last epoch's values (from the previous checkpoint, which only we write)."""
        flat = torch.empty(plan.n_params, dtype=torch.float32)
        for partition in plan.partitions:
            result = accepted.get(partition.index)
            if result is None:
                logger.warning(
                    "epoch {}: partition {} keeps last epoch's values", plan.epoch, partition.index
                )
                values = read_slice(self.store, partition.prev_weights, partition.start, partition.end)
            else:
                values = decode_f32(result.weights)
            flat[partition.start : partition.end] = values
        return flat

    def _settle(
        self, plan: MergePlan, epoch: int, now: float
    ) -> tuple[dict[int, _Accepted], dict[int, dict[str, float]]]:
        reports = {h: self.state.get(f"merged/{epoch}/{plan.stage}/{h}") or {} for h in plan.hotkeys}
        accepted: dict[int, _Accepted] = {}
        sq_norms: dict[int, dict[str, float]] = {}
        for partition in plan.partitions:
            i = partition.index
            digests = {h: reports[h].get(str(i), {}).get("digest") for h in partition.owners}
            uploaded: dict[str, tuple[bytes, bytes]] = {}
            for h, digest in digests.items():
                if not digest:
                    continue
                # A report vouches only for what the bucket holds: else an owner that reports the honest digest
                # over garbage (or NaN) slices would have them accepted whenever its partner agrees.
                slices = self._uploaded(partition, plan, h)
                if slices is None or partition_digest(*slices) != digest:
                    why = (
                        "its uploaded slices are missing, the wrong size or not finite"
                        if slices is None
                        else "its uploaded slices differ from its report"
                    )
                    self.state.log(
                        now, "merge_mismatch", h, epoch=epoch, stage=plan.stage, partition=i, why=why
                    )
                    digests[h] = None
                else:
                    uploaded[h] = slices
            present = [h for h, d in digests.items() if d]
            agreed = len(present) == len(partition.owners) and len({digests[h] for h in present}) == 1
            if agreed:
                owner = present[0]
                weights, momentum = uploaded[owner]
                sq_norms[i] = reports[owner][str(i)].get("sq_norms", {})
            else:
                # Disagreement, or an owner that never answered: recompute here and keep whichever matches.
                result = run_owner(self.store, plan, ORCHESTRATOR, partitions=[i]).results.get(i)
                if result is None:
                    continue  # previous state unreadable: apply keeps last epoch's values
                owner = next((h for h in present if digests[h] == result.digest), ORCHESTRATOR)
                for h in present:
                    if digests[h] != result.digest:
                        self.state.log(now, "merge_mismatch", h, epoch=epoch, stage=plan.stage, partition=i)
                sq_norms[i] = result.slice_sq_norms
                weights, momentum = encode_f32(result.weights), encode_f32(result.momentum)
            accepted[i] = _Accepted(owner=owner, weights=weights, momentum=momentum)
        return accepted, sq_norms

    def _uploaded(self, partition: Partition, plan: MergePlan, owner: str) -> tuple[bytes, bytes] | None:
        """The weights and momentum slices `owner` uploaded for `partition`, read once; None if either is missing,
        the wrong size or not finite (two colluding owners must not carry NaN momentum into every later epoch)."""
        try:
            slices = (
                self.store.get(plan.output_key(partition.index, owner, "weights")),
                self.store.get(plan.output_key(partition.index, owner, "momentum")),
            )
        except KeyError:  # ObjectNotFound; other store errors fail the request, which is retried
            return None
        for data in slices:
            if len(data) != 4 * partition.size or not bool(torch.isfinite(decode_f32(data)).all()):
                return None
        return slices

    def _set_phase(self, epoch: int, phase: str, now: float) -> None:
        self.state.put("phase", phase)
        self.state.put(f"phase_started/{epoch}/{phase}", now)
        self.state.log(now, "phase", None, epoch=epoch, phase=phase)
        self.scheduler.doorbell.ring_all()
        logger.info("epoch {}: phase {}", epoch, phase)


__all__ = ["EpochDriver", "EpochSettings", "TRAIN"]
