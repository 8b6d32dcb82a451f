"""Every message between roles. Pure pydantic: the miner, validator and orchestrator all import these."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from iota.protocol.bounds import (
    MAX_ERROR_KINDS,
    MAX_FLAGS,
    MAX_HOPS,
    MAX_MINERS,
    MAX_OBJECTS,
    MAX_PARTITIONS,
    MAX_PIPELINE_DEPTH,
    MAX_SAMPLES,
    MAX_SHAPE,
    MAX_SHARDS,
    MAX_SKETCH,
    MAX_SNAPSHOTS,
    MAX_STAGES,
    MAX_TENSORS,
    Count,
    Dim,
    Epoch,
    Finite,
    Hotkey,
    Id,
    Ident,
    Int64,
    JsonObject,
    Md5,
    Name,
    NonNegative,
    ObjectKey,
    PartitionIndex,
    Positive,
    Replicas,
    Sha256,
    StageIndex,
    Step,
    Text,
    Uid,
    Url,
    Version,
)
from iota.protocol.version import PROTOCOL_VERSION


class Message(BaseModel):
    protocol_version: Version = PROTOCOL_VERSION


class StageInfo(BaseModel):
    index: StageIndex
    first_layer: Count
    last_layer: Count  # exclusive
    n_params: Count


class RopeScalingInfo(BaseModel):
    factor: Finite
    low_freq_factor: Finite
    high_freq_factor: Finite
    original_max_position_embeddings: Dim


class ModelInfo(BaseModel):
    """The run's model shape: iota.model.config.ModelConfig's fields, typed on the wire (ModelConfig validates them)."""

    model_config = ConfigDict(extra="forbid")  # a field this client does not know means it is older: say so

    vocab_size: Dim
    hidden: Dim
    n_layers: Dim
    n_heads: Dim
    n_kv_heads: Dim
    ffn: Dim
    seq_len: Dim
    rope_theta: Finite
    rope_scaling: RopeScalingInfo | None
    norm_eps: Finite
    bottleneck: Dim | None
    init_std: Finite

    @property
    def wire_width(self) -> int:
        """Channels of an activation between stages: the bottleneck's width, else the residual stream's."""
        return self.bottleneck or self.hidden


class RunInfo(Message):
    """What the orchestrator serves so that no client guesses: model, stages, data, schedule and flags."""

    run_id: Ident
    orchestrator_hotkey: Hotkey
    model: ModelInfo
    stages: Annotated[list[StageInfo], Field(min_length=1, max_length=MAX_STAGES)]
    data: JsonObject  # DataPlan.to_dict()
    schedule: JsonObject  # LRSchedule.to_dict()
    micro_batch: Dim
    accumulate: Dim
    optimizer: Literal["adamw", "sgd"]
    weight_decay: NonNegative
    clip: NonNegative
    wire_dtype: Literal["bf16", "fp32"]
    codec: Name = ""  # activation codec between stages (iota.model.codecs parses it); "": dense
    seed: Int64
    flags: Annotated[dict[Name, Text], Field(max_length=MAX_FLAGS)] = Field(default_factory=dict)

    @property
    def micro_batch_tokens(self) -> int:
        """Tokens in one sample (a micro-batch): what a hop trains on, and the unit of the learning-rate schedule."""
        return self.micro_batch * self.model.seq_len


class RegisterRequest(Message):
    device: Name  # "cuda", "cpu"
    memory_bytes: Count
    session: Name  # random per process start: a new session means the old one's work is void


class Registration(Message):
    hotkey: Hotkey
    stage: StageIndex
    epoch: Epoch
    checkpoint_url: Url | None  # the stage's weights from the latest checkpoint; None: seeded initialisation
    checkpoint_sha256: Sha256 | None
    # shard name -> GET URL (heads and tails rebuild samples from these)
    data_urls: Annotated[dict[Name, Url], Field(max_length=MAX_SHARDS)]
    heartbeat_s: Positive  # send POST /miners/heartbeat this often, whatever else the miner is doing
    # changes when the orchestrator starts from a fresh state store: reload from the checkpoint
    state_id: Name
    # requests for work (and so leases) the orchestrator admits from one miner at once: a deeper miner asks no more
    pipeline_depth: Annotated[int, Field(ge=1, le=MAX_PIPELINE_DEPTH)] = 1


class EpochPlan(BaseModel):
    """Published per epoch so every stage, a validator and the baseline agree on the learning rate."""

    epoch: Epoch
    tokens_at_start: Count
    replicas: Replicas  # replicas of the stage this plan is sent to


WorkKind = Literal["forward", "backward", "wait", "upload", "merge", "apply", "snapshot", "stop"]


MAX_HOLD_S = 30.0  # the longest a request for work may ask to be held


class WorkRequest(Message):
    forward: bool = True  # False: only backward work (the miner is finishing its accumulation window)
    # > 0: if there is no work in training, hold the request up to this long and answer when work may be there
    # (long-poll) rather than at once with `wait`.
    hold_s: NonNegative = Field(0.0, le=MAX_HOLD_S)


class MergeOrder(BaseModel):
    """A merge owner's work: the stage's merge plan and a URL for exactly each object it reads or writes."""

    plan: JsonObject  # iota.merge.MergePlan's JSON: the owner validates it with the merge package
    # object key -> GET URL: the uploads, the previous weights and momentum
    get: Annotated[dict[ObjectKey, Url], Field(max_length=MAX_OBJECTS)]
    # object key -> PUT URL: this owner's merged slices
    put: Annotated[dict[ObjectKey, Url], Field(max_length=MAX_OBJECTS)]


class Work(Message):
    kind: WorkKind
    run_id: Ident
    epoch: Epoch
    stage: StageIndex
    plan: EpochPlan
    hop_id: Id | None = None
    sample_id: Id | None = None
    input_url: Url | None = None
    input_sha256: Sha256 | None = None
    input_shape: Annotated[list[Count], Field(max_length=MAX_SHAPE)] | None = None
    output_url: Url | None = None
    output_size: Count | None = None
    lease_expires: Finite | None = None
    wait_s: NonNegative = 0.0
    reason: Text = ""
    # wait without forward work: samples whose backward this miner still owes
    holding: Annotated[list[Id], Field(max_length=MAX_HOPS)] | None = None
    challenged_step: Step | None = None  # snapshot: the inner step the challenge names
    merge: MergeOrder | None = None  # merge: the plan and its URLs


class WeightSketch(BaseModel):
    """A cheap commitment to a miner's weights: per-tensor norms and a seeded projection."""

    norms: Annotated[list[Finite], Field(max_length=MAX_TENSORS)]
    projection: Annotated[list[Finite], Field(max_length=MAX_SKETCH)]


class Report(Message):
    """A hop's result (POST /work/{hop_id}/report)."""

    run_id: Ident
    epoch: Epoch
    hop_id: Id
    inner_step: Step
    input_sha256: Sha256 | None
    output_sha256: Sha256 | None
    output_md5: Md5 | None
    loss: Finite | None = None  # the tail's loss on this sample
    tokens: Count = 0
    sketch: WeightSketch | None = None


ReleaseReason = Literal["stopping", "failed", "input_mismatch", "input_undecodable"]


class Release(Message):
    """Why a miner hands an item back unfinished (POST /work/{hop_id}/release).

    stopping: it will not do it (it is stopping, or has no room); failed: it could not (a local error);
    input_mismatch: the input's bytes do not hash to the digest the item names; input_undecodable: they do, but
    are not the tensor the item expects. The last two accuse the miner whose output the input is: the orchestrator
    checks the claim against the store before it strikes anyone (iota.orchestrator.service).
    """

    reason: ReleaseReason = "stopping"


class UploadDone(BaseModel):
    """The epoch's pseudo-gradient is uploaded (the report's output digests name it)."""

    kind: Literal["upload"] = "upload"
    norm: NonNegative  # its L2 norm, checked against the object by the merge


class PartitionDone(BaseModel):
    digest: Sha256  # iota.merge.PartitionResult.digest of the owner's two uploaded slices
    # submitter hotkey -> squared norm of its upload's slice of this partition
    sq_norms: Annotated[dict[Hotkey, NonNegative], Field(max_length=MAX_MINERS)]


class MergeDone(BaseModel):
    """The owner's partitions are merged and uploaded."""

    kind: Literal["merge"] = "merge"
    partitions: Annotated[dict[PartitionIndex, PartitionDone], Field(max_length=MAX_PARTITIONS)]
    # partition -> why this owner could not merge it
    failed: Annotated[dict[PartitionIndex, Text], Field(max_length=MAX_PARTITIONS)] = Field(
        default_factory=dict
    )


class ApplyDone(BaseModel):
    """The next epoch's weights are loaded (the report's output_sha256 is their digest)."""

    kind: Literal["apply"] = "apply"


class SnapshotTaken(BaseModel):
    """The challenged state is copied at `step`; its upload follows, and other work may go on meanwhile."""

    kind: Literal["snapshot_taken"] = "snapshot_taken"
    step: Step


class SnapshotDone(BaseModel):
    """The snapshot taken at `step` is uploaded (the report's output digests name it)."""

    kind: Literal["snapshot"] = "snapshot"
    step: Step


PhaseResult = Annotated[
    UploadDone | MergeDone | ApplyDone | SnapshotTaken | SnapshotDone, Field(discriminator="kind")
]


class PhaseReport(Message):
    """End-of-epoch work or a snapshot challenge's answer (POST /phase/report)."""

    run_id: Ident
    epoch: Epoch
    inner_step: Step
    result: PhaseResult
    input_sha256: Sha256 | None = None
    output_sha256: Sha256 | None = None  # of the object it uploaded, if any
    output_md5: Md5 | None = None


class Ack(Message):
    ok: bool = True
    detail: Text = ""


class MinerStatus(BaseModel):
    hotkey: Hotkey
    uid: Uid | None
    stage: StageIndex | None
    alive: bool
    hops_done: Count
    last_seen: Finite
    device: Name


class StageStatus(BaseModel):
    index: StageIndex
    miners: Annotated[list[MinerStatus], Field(max_length=MAX_MINERS)]
    queued_forward: Count
    queued_backward: Count
    leased: Count
    paused: Text = ""  # why inflow is paused, if it is


class Status(Message):
    run_id: Ident
    epoch: Epoch
    phase: Name
    paused: bool
    stages: Annotated[list[StageStatus], Field(max_length=MAX_STAGES)]
    tokens_trained: Count
    samples_completed: Count
    samples_in_flight: Count
    samples_requeued: Count
    samples_lost: Annotated[int, Field(ge=-MAX_SAMPLES, le=MAX_SAMPLES)]  # must be 0: a bug shows either way
    latest_loss: Finite | None
    loss_curve: Annotated[list[tuple[Count, Finite]], Field(max_length=MAX_SAMPLES)]
    bytes_transferred: Count
    checkpoint: ObjectKey | None


class AuditHop(BaseModel):
    """One committed hop, with URLs for exactly the objects it names."""

    direction: Literal["forward", "backward"]
    sample_id: Id
    inner_step: Step
    input_url: Url | None
    input_sha256: Sha256 | None
    output_url: Url | None
    output_sha256: Sha256 | None
    loss: Finite | None
    # Which of the miner's sessions of the epoch committed it (0: its first): a restarted miner starts again from
    # the checkpoint at inner step 0, so the replay starts again wherever this changes.
    session: Count = 0


class AuditSnapshot(BaseModel):
    """A challenged snapshot of the audited miner: its exact state after `step`, and the sketch it had committed."""

    step: Step
    url: Url
    sha256: Sha256
    sketch: WeightSketch


class AuditPseudoGradient(BaseModel):
    """The audited miner's uploaded pseudo-gradient, and the last inner step it committed (with that step's sketch)
    before it: the weights it claims to end the epoch with are the checkpoint minus the upload."""

    url: Url
    sha256: Sha256 | None  # as its upload report gave it
    step: Step  # its last inner step of the epoch; 0: it took none, so the upload must be zeros
    sketch: WeightSketch | None  # committed with that step
    session: Count = 0  # its last session of the epoch, the one that uploaded (see AuditHop.session)


class AuditMerge(BaseModel):
    """The partitions the audited miner merged as an owner, to recompute from the same uploads."""

    plan: JsonObject  # the stage's iota.merge.MergePlan
    # partition -> the digest of its (weights, momentum) slices the owner reported
    digests: Annotated[dict[PartitionIndex, Sha256], Field(max_length=MAX_PARTITIONS)]
    # object key -> GET URL: every upload, the previous weights and momentum, its slices
    urls: Annotated[dict[ObjectKey, Url], Field(max_length=MAX_OBJECTS)]
    # upload key -> sha256 its submitter reported
    upload_shas: Annotated[dict[ObjectKey, Sha256], Field(max_length=MAX_MINERS)] = Field(
        default_factory=dict
    )


class AuditTask(Message):
    """A miner's epoch so far, for a validator to replay: the checkpoint it started from and its hops in order."""

    audit_id: Ident
    run_id: Ident
    miner: Hotkey
    stage: StageIndex
    epoch: Epoch
    bf16: bool  # the miner's declared precision (bf16 autocast on CUDA)
    checkpoint_url: Url
    checkpoint_sha256: Sha256
    plan: EpochPlan
    hops: Annotated[list[AuditHop], Field(max_length=MAX_HOPS)]
    data_urls: Annotated[dict[Name, Url], Field(max_length=MAX_SHARDS)]
    # The replay starts from the checkpoint (0) or from the snapshot of this step: the orchestrator's draw.
    start_step: Step = 0
    # the start's and those its window reaches
    snapshots: Annotated[list[AuditSnapshot], Field(max_length=MAX_SNAPSHOTS)] = Field(default_factory=list)
    # Once the epoch has ended: what the miner uploaded, and what it merged as an owner.
    pseudo_gradient: AuditPseudoGradient | None = None
    merge: AuditMerge | None = None


class AuditVerdict(Message):
    audit_id: Ident
    miner: Hotkey
    epoch: Epoch
    stage: StageIndex
    passed: bool
    hops_replayed: Count
    depth: Count  # inner steps replayed
    reason: Text = ""
    # largest relative error per claim kind
    errors: Annotated[dict[Name, Finite], Field(max_length=MAX_ERROR_KINDS)] = Field(default_factory=dict)


class Score(BaseModel):
    hotkey: Hotkey
    uid: Uid | None
    work: NonNegative  # validated sample-hops, weighted by stage compute, over the scoring window
    audits_passed: Count
    audits_failed: Count
    weight: NonNegative  # normalised: what validators set on the chain
