"""Every message between roles. Pure pydantic: the miner, validator and orchestrator all import these."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from iota.protocol.version import PROTOCOL_VERSION


class Message(BaseModel):
    protocol_version: int = PROTOCOL_VERSION


class StageInfo(BaseModel):
    index: int
    first_layer: int
    last_layer: int  # exclusive
    n_params: int


class RopeScalingInfo(BaseModel):
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


class ModelInfo(BaseModel):
    """The run's model shape: iota.model.config.ModelConfig's fields, typed on the wire (ModelConfig validates them)."""

    model_config = ConfigDict(extra="forbid")  # a field this client does not know means it is older: say so

    vocab_size: int
    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn: int
    seq_len: int
    rope_theta: float
    rope_scaling: RopeScalingInfo | None
    norm_eps: float
    bottleneck: int | None
    init_std: float

    @property
    def wire_width(self) -> int:
        """Channels of an activation between stages: the bottleneck's width, else the residual stream's."""
        return self.bottleneck or self.hidden


class RunInfo(Message):
    """What the orchestrator serves so that no client guesses: model, stages, data, schedule and flags."""

    run_id: str
    orchestrator_hotkey: str
    model: ModelInfo
    stages: list[StageInfo]
    data: dict[str, Any]  # DataPlan.to_dict()
    schedule: dict[str, Any]  # LRSchedule.to_dict()
    micro_batch: int
    accumulate: int
    optimizer: Literal["adamw", "sgd"]
    weight_decay: float
    clip: float
    wire_dtype: Literal["bf16", "fp32"]
    seed: int
    flags: dict[str, str] = Field(default_factory=dict)

    @property
    def micro_batch_tokens(self) -> int:
        """Tokens in one sample (a micro-batch): what a hop trains on, and the unit of the learning-rate schedule."""
        return self.micro_batch * self.model.seq_len


class RegisterRequest(Message):
    device: str  # "cuda", "cpu"
    memory_bytes: int
    session: str  # random per process start: a new session means the old one's work is void


class Registration(Message):
    hotkey: str
    stage: int
    epoch: int
    checkpoint_url: str | None  # the stage's weights from the latest checkpoint; None: seeded initialisation
    checkpoint_sha256: str | None
    data_urls: dict[str, str]  # shard name -> GET URL (heads and tails rebuild samples from these)
    heartbeat_s: float  # send POST /miners/heartbeat this often, whatever else the miner is doing
    state_id: str  # changes when the orchestrator starts from a fresh state store: reload from the checkpoint


class EpochPlan(BaseModel):
    """Published per epoch so every stage, a validator and the baseline agree on the learning rate."""

    epoch: int
    tokens_at_start: int
    replicas: int  # replicas of the stage this plan is sent to


WorkKind = Literal["forward", "backward", "wait", "upload", "merge", "apply", "snapshot", "stop"]


MAX_HOLD_S = 30.0  # the longest a request for work may ask to be held


class WorkRequest(Message):
    forward: bool = True  # False: only backward work (the miner is finishing its accumulation window)
    # > 0: if there is no work in training, hold the request up to this long and answer when work may be there
    # (long-poll) rather than at once with `wait`.
    hold_s: float = Field(0.0, ge=0.0, le=MAX_HOLD_S)


class MergeOrder(BaseModel):
    """A merge owner's work: the stage's merge plan and a URL for exactly each object it reads or writes."""

    plan: dict[str, Any]  # iota.merge.MergePlan's JSON: the owner validates it with the merge package
    get: dict[str, str]  # object key -> GET URL: the uploads, the previous weights and momentum
    put: dict[str, str]  # object key -> PUT URL: this owner's merged slices


class Work(Message):
    kind: WorkKind
    run_id: str
    epoch: int
    stage: int
    plan: EpochPlan
    hop_id: int | None = None
    sample_id: int | None = None
    input_url: str | None = None
    input_sha256: str | None = None
    input_shape: list[int] | None = None
    output_url: str | None = None
    output_size: int | None = None
    lease_expires: float | None = None
    wait_s: float = 0.0
    reason: str = ""
    holding: list[int] | None = (
        None  # wait without forward work: samples whose backward this miner still owes
    )
    challenged_step: int | None = None  # snapshot: the inner step the challenge names
    merge: MergeOrder | None = None  # merge: the plan and its URLs


class WeightSketch(BaseModel):
    """A cheap commitment to a miner's weights: per-tensor norms and a seeded projection."""

    norms: list[float]
    projection: list[float]


class Report(Message):
    """A hop's result (POST /work/{hop_id}/report)."""

    run_id: str
    epoch: int
    hop_id: int
    inner_step: int
    input_sha256: str | None
    output_sha256: str | None
    output_md5: str | None
    loss: float | None = None  # the tail's loss on this sample
    tokens: int = 0
    sketch: WeightSketch | None = None


class UploadDone(BaseModel):
    """The epoch's pseudo-gradient is uploaded (the report's output digests name it)."""

    kind: Literal["upload"] = "upload"
    norm: float  # its L2 norm, checked against the object by the merge


class PartitionDone(BaseModel):
    digest: str  # iota.merge.PartitionResult.digest of the owner's two uploaded slices
    sq_norms: dict[str, float]  # submitter hotkey -> squared norm of its upload's slice of this partition


class MergeDone(BaseModel):
    """The owner's partitions are merged and uploaded."""

    kind: Literal["merge"] = "merge"
    partitions: dict[int, PartitionDone]
    failed: dict[int, str] = Field(default_factory=dict)  # partition -> why this owner could not merge it


class ApplyDone(BaseModel):
    """The next epoch's weights are loaded (the report's output_sha256 is their digest)."""

    kind: Literal["apply"] = "apply"


class SnapshotTaken(BaseModel):
    """The challenged state is copied at `step`; its upload follows, and other work may go on meanwhile."""

    kind: Literal["snapshot_taken"] = "snapshot_taken"
    step: int


class SnapshotDone(BaseModel):
    """The snapshot taken at `step` is uploaded (the report's output digests name it)."""

    kind: Literal["snapshot"] = "snapshot"
    step: int


PhaseResult = Annotated[
    UploadDone | MergeDone | ApplyDone | SnapshotTaken | SnapshotDone, Field(discriminator="kind")
]


class PhaseReport(Message):
    """End-of-epoch work or a snapshot challenge's answer (POST /phase/report)."""

    run_id: str
    epoch: int
    inner_step: int
    result: PhaseResult
    input_sha256: str | None = None
    output_sha256: str | None = None  # of the object it uploaded, if any
    output_md5: str | None = None


class Ack(Message):
    ok: bool = True
    detail: str = ""


class MinerStatus(BaseModel):
    hotkey: str
    uid: int | None
    stage: int | None
    alive: bool
    hops_done: int
    last_seen: float
    device: str


class StageStatus(BaseModel):
    index: int
    miners: list[MinerStatus]
    queued_forward: int
    queued_backward: int
    leased: int
    paused: str = ""  # why inflow is paused, if it is


class Status(Message):
    run_id: str
    epoch: int
    phase: str
    paused: bool
    stages: list[StageStatus]
    tokens_trained: int
    samples_completed: int
    samples_in_flight: int
    samples_requeued: int
    samples_lost: int
    latest_loss: float | None
    loss_curve: list[tuple[int, float]]
    bytes_transferred: int
    checkpoint: str | None


class AuditHop(BaseModel):
    """One committed hop, with URLs for exactly the objects it names."""

    direction: Literal["forward", "backward"]
    sample_id: int
    inner_step: int
    input_url: str | None
    input_sha256: str | None
    output_url: str | None
    output_sha256: str | None
    loss: float | None


class AuditSnapshot(BaseModel):
    """A challenged snapshot of the audited miner: its exact state after `step`, and the sketch it had committed."""

    step: int
    url: str
    sha256: str
    sketch: WeightSketch


class AuditPseudoGradient(BaseModel):
    """The audited miner's uploaded pseudo-gradient, and the last inner step it committed (with that step's sketch)
    before it: the weights it claims to end the epoch with are the checkpoint minus the upload."""

    url: str
    sha256: str | None  # as its upload report gave it
    step: int  # its last inner step of the epoch; 0: it took none, so the upload must be zeros
    sketch: WeightSketch | None  # committed with that step


class AuditMerge(BaseModel):
    """The partitions the audited miner merged as an owner, to recompute from the same uploads."""

    plan: dict[str, Any]  # the stage's iota.merge.MergePlan
    digests: dict[int, str]  # partition -> the digest of its (weights, momentum) slices the owner reported
    urls: dict[str, str]  # object key -> GET URL: every upload, the previous weights and momentum, its slices
    upload_shas: dict[str, str] = Field(default_factory=dict)  # upload key -> sha256 its submitter reported


class AuditTask(Message):
    """A miner's epoch so far, for a validator to replay: the checkpoint it started from and its hops in order."""

    audit_id: str
    run_id: str
    miner: str
    stage: int
    epoch: int
    bf16: bool  # the miner's declared precision (bf16 autocast on CUDA)
    checkpoint_url: str
    checkpoint_sha256: str
    plan: EpochPlan
    hops: list[AuditHop]
    data_urls: dict[str, str]
    # The replay starts from the checkpoint (0) or from the snapshot of this step: the orchestrator's draw.
    start_step: int = 0
    snapshots: list[AuditSnapshot] = Field(default_factory=list)  # the start's and those its window reaches
    # Once the epoch has ended: what the miner uploaded, and what it merged as an owner.
    pseudo_gradient: AuditPseudoGradient | None = None
    merge: AuditMerge | None = None


class AuditVerdict(Message):
    audit_id: str
    miner: str
    epoch: int
    stage: int
    passed: bool
    hops_replayed: int
    depth: int  # inner steps replayed
    reason: str = ""
    errors: dict[str, float] = Field(default_factory=dict)  # largest relative error per claim kind


class Score(BaseModel):
    hotkey: str
    uid: int | None
    work: float  # validated sample-hops, weighted by stage compute, over the scoring window
    audits_passed: int
    audits_failed: int
    weight: float  # normalised: what validators set on the chain
