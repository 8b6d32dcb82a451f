"""Settings of every role, read from the environment and .env once, in the entry point, then passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class _Base(BaseSettings):
    # One .env holds every role's settings; each role reads its own and ignores the rest. Only entry points read
    # .env (through `load`), so a library call or a test never picks up a developer's file by accident.
    model_config = SettingsConfigDict(env_prefix="IOTA_", extra="ignore")


class WalletSettings(_Base):
    wallet_path: Path = Field(Path("~/.bittensor/wallets"), description="Folder of Bittensor wallets")
    wallet_name: str = Field("default", description="Wallet (coldkey) name")
    wallet_hotkey: str = Field("default", description="Hotkey name inside the wallet; it signs every request")


class ChainSettings(_Base):
    chain: Literal["local", "bittensor"] = Field(
        "local", description="local: a file-backed chain for one machine"
    )
    chain_path: Path = Field(Path("runs/chain.json"), description="File of the local chain")
    network: str = Field("finney", description="Bittensor network (finney, test, or a ws:// endpoint)")
    netuid: int = Field(9, description="Subnet uid")
    metagraph_sync_s: float = Field(120.0, description="Seconds between metagraph syncs")


class RunSettings(_Base):
    """What is trained and how: the orchestrator publishes it, and `iota baseline` reads the same fields."""

    preset: str = Field("tiny", description="Model preset: test, tiny, 100m, 1b, 15b")
    stages: int = Field(3, description="Pipeline stages the model is cut into")
    layers_per_stage: str = Field(
        "",
        description="Comma-separated layer counts per stage; empty evens out the stages' compute (the tail's LM head counted)",
    )
    bottleneck: int = Field(0, description="Bottleneck width between stages; 0 turns it off")
    tokenizer: Literal["bpe", "llama3"] = Field(
        "bpe", description="bpe: trained on the corpus; llama3: splintr's"
    )
    vocab_size: int = Field(0, description="BPE vocabulary size; 0 takes the preset's")
    corpus: str = Field(
        "", description="Comma-separated .txt/.jsonl files or folders; empty uses the KJV Bible"
    )
    seq_len: int = Field(0, description="Tokens per sequence; 0 takes the preset's")
    micro_batch: int = Field(8, description="Sequences per sample (one unit of work)")
    accumulate: int = Field(1, description="Micro-batches per inner optimizer step (k)")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="Inner optimizer")
    lr: float = Field(3e-3, description="Peak inner learning rate")
    min_lr_ratio: float = Field(0.1, description="Final learning rate as a fraction of the peak")
    warmup_tokens: int = Field(50_000, description="Tokens of linear learning-rate warm-up")
    rewarm_steps: int = Field(
        4, ge=0, description="Inner steps over which the lr ramps back up after APPLY resets the optimizer"
    )
    weight_decay: float = Field(0.0, description="AdamW weight decay")
    clip: float = Field(1.0, description="Inner gradient-norm clip; 0 turns it off")
    total_tokens: int = Field(1_000_000, description="Tokens the learning-rate schedule spans")
    samples_per_epoch: int = Field(64, description="Samples completed per epoch before the merge")
    epochs: int = Field(1, description="Epochs the run trains; 0 trains until stopped")
    outer_lr: float = Field(
        0.7, description="Outer (merge) learning rate; 1 with momentum 0 is plain averaging"
    )
    outer_momentum: float = Field(0.9, description="Outer Nesterov momentum")
    partitions: int = Field(16, description="Partitions of each stage in the butterfly merge")
    merge_clip: float = Field(
        0.0, ge=0.0, description="L2 norm each pseudo-gradient is clipped to at the merge; 0 turns it off"
    )
    wire_dtype: Literal["bf16", "fp32"] = Field(
        "bf16", description="Dtype of activations and their gradients"
    )
    heldout_samples: int = Field(16, description="Held-out samples for eval_loss")
    seed: int = Field(0, description="Seed of initialisation and data order")
    data_dir: Path = Field(Path("runs/data"), description="Where tokenizers and prepared shards are cached")


class OrchestratorSettings(RunSettings, ChainSettings, WalletSettings):
    host: str = Field("127.0.0.1", description="Address the orchestrator listens on")
    port: int = Field(8000, description="Port the orchestrator listens on")
    public_url: str = Field(
        "", description="URL miners use to reach this orchestrator; empty: http://host:port"
    )
    run_id: str = Field("run", description="Name of the run; keys in the bucket are under it")
    run_dir: Path = Field(Path("runs/run"), description="Run directory: state database, logs, local store")
    state_url: str = Field("", description="sqlite:///path or postgresql://...; empty: sqlite in run_dir")
    store: Literal["local", "s3"] = Field("local", description="Object store: local folder or an S3 bucket")
    s3_endpoint: str = Field("", description="S3-compatible endpoint URL; empty: AWS")
    s3_bucket: str = Field("iota", description="S3 bucket")
    s3_region: str = Field("us-east-1", description="S3 region")
    s3_access_key: str = Field("", description="S3 access key (only the orchestrator holds it)")
    s3_secret_key: str = Field("", description="S3 secret key")
    url_secret: str = Field("", description="HMAC secret of local-store URLs; empty: random per start")
    url_ttl_s: int = Field(900, description="Lifetime of presigned URLs")
    phase_timeout_s: float = Field(
        600.0, description="An end-of-epoch phase moves on without miners silent this long"
    )
    min_upload_bytes_per_s: float = Field(
        1e6, description="Bandwidth assumed for an upload's grace past a deadline"
    )
    lease_s: float = Field(60.0, description="Seconds a miner has to report a work item")
    miner_timeout_s: float = Field(30.0, description="A miner silent this long is gone; its work is requeued")
    max_in_flight: int = Field(8, description="Samples in flight per head miner (backpressure)")
    operator_hotkey: str = Field("", description="ss58 of the operator key allowed to control the run")
    min_validator_stake: float = Field(0.0, description="Stake a validator needs")
    rate_per_hotkey: float = Field(50.0, description="Requests per second allowed per hotkey")
    rate_per_ip: float = Field(200.0, description="Requests per second allowed per IP before authentication")
    trusted_proxies: str = Field("", description="Comma-separated proxy IPs whose X-Forwarded-For is trusted")
    max_connections: int = Field(
        2048, ge=1, description="Open connections beyond which uvicorn answers 503; keep ulimit -n above it"
    )
    max_hold_s: float = Field(
        10.0,
        ge=0.0,
        description="The longest a miner's request for work is held while there is none (answered as soon as work "
        "comes; at most a third of miner_timeout_s); 0: never held",
    )
    max_requests_in_progress: int = Field(
        32,
        ge=0,
        description="Requests in progress beyond which new ones get 503 and Retry-After; 0: no bound",
    )
    confirm_wait_s: float = Field(
        30.0, description="A failing verdict no other validator confirms this soon is recomputed here"
    )
    recheck: bool = Field(True, description="Recompute unconfirmed failing verdicts in the orchestrator")
    snapshot_rate: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Chance that a miner's inner step is challenged for an exact snapshot",
    )


class MinerSettings(ChainSettings, WalletSettings):
    orchestrator_url: str = Field("http://127.0.0.1:8000", description="The orchestrator's URL")
    orchestrator_hotkey: str = Field("", description="ss58 of the orchestrator; requests are bound to it")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    autocast: bool = Field(True, description="bf16 autocast on CUDA (fp32 master weights)")
    threads: int = Field(0, description="Torch CPU threads; 0 leaves torch's default (all cores)")
    cache_size: int = Field(16, description="Forward graphs kept for their backward")
    hold_s: float = Field(
        10.0,
        ge=0.0,
        le=30.0,
        description="How long the orchestrator may hold a request for work while it has none (it answers as soon "
        "as work comes); 0: ask again every wait instead",
    )
    memory_gb: float = Field(0.0, description="Memory to report; 0 measures the device")
    health_port: int = Field(0, description="Port of GET /health and GET /metrics on 127.0.0.1; 0: off")
    adversary: str = Field(
        "",
        description="Tests and demos only: cheat like this class of iota.audit.adversaries (validators catch it)",
    )
    miner_dir: Path = Field(Path("runs/miner"), description="Where the miner keeps its cache and status")


class ValidatorSettings(ChainSettings, WalletSettings):
    orchestrator_url: str = Field("http://127.0.0.1:8000", description="The orchestrator's URL")
    orchestrator_hotkey: str = Field("", description="ss58 of the orchestrator")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    weights_interval_s: float = Field(600.0, description="Seconds between setting weights")
    burn_uid: int = Field(-1, description="uid that receives burn_fraction of the weights; -1: no burn")
    burn_fraction: float = Field(0.0, ge=0.0, le=1.0, description="Fraction of the weights burnt to burn_uid")
    health_port: int = Field(0, description="Port of GET /health and GET /metrics on 127.0.0.1; 0: off")
    validator_dir: Path = Field(Path("runs/validator"), description="Where the validator keeps its cache")


S = TypeVar("S", bound=BaseSettings)


def load(cls: type[S], env_file: str | None = ".env", **overrides: Any) -> S:
    """Settings of a role from the environment and `env_file` (environment wins), then `overrides`."""
    return cls(_env_file=env_file, **overrides)  # type: ignore[call-arg]


ROLES: dict[str, type[_Base]] = {
    "orchestrator": OrchestratorSettings,
    "miner": MinerSettings,
    "validator": ValidatorSettings,
}


def all_fields() -> dict[str, tuple[object, str]]:
    """Every setting any role reads: env name -> (default, description)."""
    fields: dict[str, tuple[object, str]] = {}
    for cls in ROLES.values():
        for name, info in cls.model_fields.items():
            fields.setdefault(f"IOTA_{name.upper()}", (info.default, info.description or ""))
    return fields


def env_example() -> str:
    """The text of .env.example: every setting with its default and what it does."""
    lines = ["# iota settings. Every role reads this file (and the environment); each takes its own.", ""]
    for env, (default, description) in sorted(all_fields().items()):
        value = "true" if default is True else "false" if default is False else str(default)
        lines += [f"# {description}", f"{env}={value}"]
    return "\n".join(lines) + "\n"
