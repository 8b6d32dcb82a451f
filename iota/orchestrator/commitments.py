"""What a miner committed at the end of an epoch, as the orchestrator's state holds it: what an audit checks it
against, by URL for a validator (iota.orchestrator.audits), from the store for a recomputation (recheck)."""

from __future__ import annotations

from dataclasses import dataclass, field

from iota.merge import MergePlan
from iota.orchestrator.state import StateStore
from iota.protocol import WeightSketch


@dataclass(frozen=True)
class EpochEnd:
    """A miner's upload and the last step it committed before it; the stage's merge plan and the partitions the
    miner reported merging (keys, not URLs)."""

    upload_key: str | None = None
    upload_sha: str | None = None
    final_step: int = 0
    final_sketch: WeightSketch | None = None
    plan: MergePlan | None = None
    # partition -> the digest the miner reported for it (partitions it owns only)
    digests: dict[int, str] = field(default_factory=dict)
    # every upload of the plan -> the sha256 its submitter reported
    upload_shas: dict[str, str] = field(default_factory=dict)

    def merge_reads(self, owner: str) -> list[str]:
        """Every object a recomputation of the owner's reported partitions reads."""
        if self.plan is None or not self.digests:
            return []
        reads = {s.upload_key for s in self.plan.submitters}
        for index in self.digests:
            partition = self.plan.partitions[index]
            reads.add(partition.prev_weights.key)
            if partition.prev_momentum is not None:
                reads.add(partition.prev_momentum.key)
            reads |= {self.plan.output_key(index, owner, kind) for kind in ("weights", "momentum")}
        return sorted(reads)


def epoch_end(state: StateStore, hotkey: str, epoch: int, stage: int) -> EpochEnd:
    """What `hotkey` committed at the end of `epoch` so far (empty while the epoch is training), from the records
    the epoch driver (uploads, merges) and the challenges (steps) keep."""
    upload = state.uploads.get(epoch, stage, hotkey)
    final = state.steps.last(epoch, hotkey)  # the last step whose report was accepted
    sketch = state.steps.sketch(epoch, hotkey, final) if final else None
    plan = state.merges.plan(epoch, stage)
    digests: dict[int, str] = {}
    shas: dict[str, str] = {}
    if plan is not None:
        owned = set(plan.partitions_of(hotkey))
        reported = state.merges.report(epoch, stage, hotkey)
        # Only digests of partitions it owns are claims.
        for index, claim in (reported or {}).items():
            if index in owned and claim.digest:
                digests[index] = claim.digest
        for submitter in plan.submitters:
            up = state.uploads.get(epoch, stage, submitter.hotkey)
            if up is not None and up.sha:
                shas[up.key] = up.sha
    return EpochEnd(
        upload_key=None if upload is None else upload.key,
        upload_sha=None if upload is None else upload.sha,
        final_step=final,
        final_sketch=sketch,
        plan=plan,
        digests=digests,
        upload_shas=shas,
    )
