"""Settings of every role, read from the environment and .env once, in the entry point, then passed down."""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from dotenv import dotenv_values
from pydantic import AfterValidator, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

# The names of iota.model.config.PRESETS (a test keeps them equal): this layer may not import the model, and a
# preset misspelt here should fail at start-up, not after the data is prepared.
Preset = Literal["test", "tiny", "w512", "100m", "1b", "15b"]
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
_HTTP_URL = re.compile(r"https?://[^/\s]+\S*")
_SS58 = re.compile(r"[1-9A-HJ-NP-Za-km-z]{46,48}")  # base58 (no 0, O, I, l): a Substrate address
# iota.model.codecs.GRAMMAR, for the same reason as Preset (a test keeps them equal).
CODEC = re.compile(r"(lowrank:[1-9][0-9]{0,6}(\+int8)?|int8)?")


def _device(value: str) -> str:
    if not _DEVICE.fullmatch(value):
        raise ValueError("expected auto, cpu, cuda, cuda:N (N a GPU index) or mps")
    return value


def _url(value: str) -> str:
    # Without a scheme httpx cannot connect, and a client would retry the same bad URL for an hour.
    if value and not _HTTP_URL.fullmatch(value):
        raise ValueError("expected a URL that starts with http:// or https://, e.g. http://203.0.113.7:8000")
    return value


def _state_url(value: str) -> str:
    if value and not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise ValueError("expected sqlite:///path/to/state.db or postgresql://user:password@host:5432/dbname")
    return value


def _ss58(value: str) -> str:
    if value and not _SS58.fullmatch(value):
        raise ValueError(
            "expected an ss58 address (48 characters starting with 5, as `iota wallet create` prints)"
        )
    return value


Device = Annotated[str, AfterValidator(_device)]
Url = Annotated[str, AfterValidator(_url)]
StateUrl = Annotated[str, AfterValidator(_state_url)]
Ss58 = Annotated[str, AfterValidator(_ss58)]


def _codec(value: str) -> str:
    if not CODEC.fullmatch(value):
        raise ValueError("expected '' (dense), int8, lowrank:R or lowrank:R+int8 (R a rank: lowrank:32+int8)")
    return value


Codec = Annotated[str, AfterValidator(_codec)]
Port = Annotated[int, Field(ge=0, le=65535)]


class _Base(BaseSettings):
    # One .env holds every role's settings; each role reads its own and ignores the rest. Only entry points read
    # .env (through `load`), so a library call or a test never picks up a developer's file by accident.
    model_config = SettingsConfigDict(env_prefix="IOTA_", extra="ignore")

    def problems(self) -> list[str]:
        """What stops this role from running though every value parses: one line each, naming the setting."""
        return []


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

    preset: Preset = Field("tiny", description="Model preset: test, tiny, w512, 100m, 1b, 15b")
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
        0.7,
        description="Outer (merge) learning rate; 1 with momentum 0 is plain averaging, which does better when an "
        "epoch is a few dozen inner steps or fewer (iota local's default); 0.7 with 0.9 momentum is DiLoCo's, "
        "for hundreds",
    )
    outer_momentum: float = Field(0.9, description="Outer Nesterov momentum")
    partitions: int = Field(16, description="Partitions of each stage in the butterfly merge")
    merge_clip: float = Field(
        0.0, ge=0.0, description="L2 norm each pseudo-gradient is clipped to at the merge; 0 turns it off"
    )
    wire_dtype: Literal["bf16", "fp32"] = Field(
        "bf16", description="Dtype of activations and their gradients"
    )
    codec: Codec = Field(
        "",
        description="Codec of activations and their gradients between stages: empty sends them dense; int8 "
        "(per-token scaled), lowrank:R (a fixed random rank-R subspace), or lowrank:R+int8",
    )
    heldout_samples: int = Field(16, description="Held-out samples for eval_loss")
    seed: int = Field(0, description="Seed of initialisation and data order")
    data_dir: Path = Field(Path("runs/data"), description="Where tokenizers and prepared shards are cached")


class OrchestratorSettings(RunSettings, ChainSettings, WalletSettings):
    host: str = Field("127.0.0.1", description="Address the orchestrator listens on")
    port: Port = Field(8000, description="Port the orchestrator listens on")
    public_url: Url = Field(
        "", description="URL miners use to reach this orchestrator; empty: http://host:port"
    )
    run_id: str = Field("run", description="Name of the run; keys in the bucket are under it")
    run_dir: Path = Field(Path("runs/run"), description="Run directory: state database, logs, local store")
    state_url: StateUrl = Field(
        "", description="sqlite:///path or postgresql://...; empty: sqlite in run_dir"
    )
    store: Literal["local", "s3"] = Field("local", description="Object store: local folder or an S3 bucket")
    s3_endpoint: Url = Field("", description="S3-compatible endpoint URL; empty: AWS")
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
    max_in_flight: int = Field(
        8,
        description="Forward graphs a miner above the tail may hold awaiting their backward, its leased "
        "forwards included (backpressure)",
    )
    max_leases_held: int = Field(
        4,
        ge=4,
        description="Work items one miner may hold leased at once; an honest miner holds at most "
        "2 x its pipeline depth + 2 (4 at depth 1: one prefetched, one computing, two in its outbox), so fewer "
        "would refuse honest miners",
    )
    operator_hotkey: Ss58 = Field("", description="ss58 of the operator key allowed to control the run")
    min_validator_stake: float = Field(0.0, description="Stake a validator needs")
    rate_per_hotkey: float = Field(200.0, description="Requests per second allowed per hotkey")
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
    keep_epochs: int = Field(
        4,
        ge=1,
        description="Epochs whose objects and records stay for audits after they end (longer while an open "
        "audit names them)",
    )
    keep_checkpoints: int = Field(
        2, ge=1, description="Newest checkpoints kept in the bucket, besides those of epochs kept for audits"
    )


class MinerSettings(ChainSettings, WalletSettings):
    orchestrator_url: Url = Field("http://127.0.0.1:8000", description="The orchestrator's URL")
    orchestrator_hotkey: Ss58 = Field("", description="ss58 of the orchestrator; requests are bound to it")
    device: Device = Field("auto", description="auto, cpu, cuda, cuda:N or mps")
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
    pipeline_depth: int = Field(
        1,
        ge=1,
        le=16,
        description="Requests for work, downloads and uploads a miner keeps in flight at once: raise it over "
        "long links (the orchestrator must let a miner hold 2 x depth + 2 leases)",
    )
    memory_gb: float = Field(0.0, description="Memory to report; 0 measures the device")
    health_port: Port = Field(0, description="Port of GET /health and GET /metrics on 127.0.0.1; 0: off")
    adversary: str = Field(
        "",
        description="Tests and demos only: cheat like this class of iota.audit.adversaries (validators catch it); "
        "a validator's own: pass_everything",
    )
    miner_dir: Path = Field(Path("runs/miner"), description="Where the miner keeps its cache and status")

    def problems(self) -> list[str]:
        return _orchestrator_hotkey_problems(self.orchestrator_hotkey, self.orchestrator_url)


class ValidatorSettings(ChainSettings, WalletSettings):
    orchestrator_url: Url = Field("http://127.0.0.1:8000", description="The orchestrator's URL")
    orchestrator_hotkey: Ss58 = Field("", description="ss58 of the orchestrator")
    device: Device = Field("auto", description="auto, cpu, cuda, cuda:N or mps")
    weights_interval_s: float = Field(
        1200.0,
        gt=0.0,
        description="Seconds between setting weights; the chain refuses them more often (100 blocks: 1200 s)",
    )
    burn_uid: int = Field(-1, description="uid that receives burn_fraction of the weights; -1: no burn")
    burn_fraction: float = Field(0.0, ge=0.0, le=1.0, description="Fraction of the weights burnt to burn_uid")
    health_port: Port = Field(0, description="Port of GET /health and GET /metrics on 127.0.0.1; 0: off")
    adversary: Literal["", "pass_everything"] = Field(
        "",
        description="Tests and demos only: pass_everything passes every audit without replaying it (the "
        "orchestrator's recomputation proves it wrong)",
    )
    validator_dir: Path = Field(Path("runs/validator"), description="Where the validator keeps its cache")

    def problems(self) -> list[str]:
        return _orchestrator_hotkey_problems(self.orchestrator_hotkey, self.orchestrator_url)


def _orchestrator_hotkey_problems(hotkey: str, url: str) -> list[str]:
    # Every request is signed for this key: without it each one is refused, and a supervisor restarts the role
    # in a loop. A clear stop at start-up says what to set instead.
    if hotkey:
        return []
    return [
        "IOTA_ORCHESTRATOR_HOTKEY is empty (default): set it to the orchestrator's ss58 hotkey, which its operator "
        f"publishes and {url.rstrip('/')}/run names as orchestrator_hotkey"
    ]


S = TypeVar("S", bound=_Base)


class SettingsError(ValueError):
    """Settings a role cannot start with: one line per problem, each naming the variable, where its value came
    from and what is allowed. The CLI prints the lines and exits 2, without a traceback."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def load(cls: type[S], env_file: str | None = ".env", **overrides: Any) -> S:
    """Settings of a role from the environment and `env_file` (environment wins), then `overrides`, checked:
    SettingsError lists every value that does not parse and every setting the role cannot run without."""
    try:
        settings = cls(_env_file=env_file, **overrides)  # type: ignore[call-arg]
    except ValidationError as error:
        raise SettingsError([_describe(e, env_file, overrides) for e in error.errors()]) from None
    problems = settings.problems()
    if problems:
        raise SettingsError(problems)
    return settings


def source(name: str, env_file: str | None = ".env", overrides: dict[str, Any] | None = None) -> str:
    """Where setting `name` (a field name) comes from: the command line, the environment, the .env file (its
    path), or the default, in the order `load` lets them win."""
    env = f"IOTA_{name.upper()}"
    if overrides and name in overrides:
        return "command line"
    if any(key.upper() == env for key in os.environ):
        return "environment"
    if env_file and any(key.upper() == env for key in _dotenv(env_file)):
        return f"{Path(env_file).resolve()}"
    return "default"


def _describe(error: Any, env_file: str | None, overrides: dict[str, Any]) -> str:
    """One line for one pydantic error: IOTA_NAME='value' (source): what is allowed."""
    name = str(error["loc"][0]) if error["loc"] else "?"
    message = str(error["msg"]).removeprefix("Value error, ")
    value = repr(error.get("input"))
    shown = value if len(value) <= 60 else value[:57] + "..."
    return f"IOTA_{name.upper()}={shown} ({source(name, env_file, overrides)}): {message}"


def _dotenv(env_file: str) -> dict[str, str | None]:
    return dotenv_values(env_file) if Path(env_file).is_file() else {}


_SECRETS = {"s3_secret_key", "url_secret"}


def shown(name: str, value: object) -> str:
    """A setting's value as it may be printed or logged: secrets and a database URL's password hidden."""
    text = str(value)
    if name in _SECRETS and text:
        return "(set, hidden)"
    return re.sub(r"(://[^:/@\s]+:)\S*@", r"\1***@", text)


# Read by the scripts around iota, not by a role (docs/configuration.md, "Outside iota's settings").
SCRIPT_VARIABLES = {"IOTA_SKIP_SETUP", "IOTA_LOG_DIR"}


def unknown_variables(env_file: str | None = ".env") -> list[str]:
    """A warning line for each IOTA_* name in the environment or `env_file` that no role reads (a typo is
    otherwise silently ignored), naming the closest setting."""
    known = set(all_fields()) | SCRIPT_VARIABLES
    found = {key.upper(): "environment" for key in os.environ}
    if env_file:
        for key in _dotenv(env_file):
            found.setdefault(key.upper(), str(Path(env_file).resolve()))
    warnings = []
    for name, where in sorted(found.items()):
        if not name.startswith("IOTA_") or name in known:
            continue
        # Compared without the prefix every name shares, which would make any two names look alike.
        close = difflib.get_close_matches(name[5:], sorted(k[5:] for k in known), n=1, cutoff=0.6)
        hint = f"did you mean IOTA_{close[0]}?" if close else "`iota config` lists every setting"
        warnings.append(f"warning: {name} ({where}) is not an iota setting and is ignored; {hint}")
    return warnings


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


def log_level() -> str:
    """The lowest log level shown: LOGURU_LEVEL (loguru's own variable), DEBUG when unset."""
    return os.environ.get("LOGURU_LEVEL", "DEBUG")
