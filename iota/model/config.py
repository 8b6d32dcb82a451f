"""Model configuration: the Llama shape every stage, validator and baseline builds from, plus named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

VOCAB_MULTIPLE = 64  # embedding rows padded so matmuls tile well on GPUs; extra rows are never targets


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 rotary frequency scaling (the values Llama 3.1/3.2 ship with)."""

    factor: float = 32.0  # long wavelengths are stretched by this much
    low_freq_factor: float = 1.0  # wavelengths above original_max / low_freq_factor are fully stretched
    high_freq_factor: float = 4.0  # wavelengths below original_max / high_freq_factor are left alone
    original_max_position_embeddings: int = 8192  # the context the unscaled frequencies were meant for

    def __post_init__(self) -> None:
        if self.factor < 1.0:
            raise ValueError(f"rope_scaling.factor must be >= 1, got {self.factor}")
        if not 0.0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(
                "rope_scaling needs 0 < low_freq_factor < high_freq_factor, got "
                f"{self.low_freq_factor} and {self.high_freq_factor}"
            )
        if self.original_max_position_embeddings <= 0:
            raise ValueError(
                f"rope_scaling.original_max_position_embeddings must be > 0, "
                f"got {self.original_max_position_embeddings}"
            )


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama 3 style decoder. Frozen: a run's config is served by the orchestrator and never changes."""

    vocab_size: (
        int  # padded to a multiple of VOCAB_MULTIPLE by preset(); validated >= the tokenizer's size elsewhere
    )
    hidden: int  # width of the residual stream
    n_layers: int  # transformer blocks in the whole model, split across stages
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (grouped-query attention: n_heads // n_kv_heads queries share one)
    ffn: int  # SwiGLU inner width (about 8/3 * hidden, rounded)
    seq_len: int  # training sequence length, also the most positions the rotary tables cover
    rope_theta: float = 500000.0  # Llama 3 base: long wavelengths keep far tokens distinguishable
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)  # None: plain RoPE
    norm_eps: float = 1e-5
    bottleneck: int | None = None  # width b sent between stages; None sends the full residual stream
    init_std: float = 0.02  # std of every linear and embedding weight at init

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden", "n_layers", "n_heads", "n_kv_heads", "ffn", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.hidden % self.n_heads != 0:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"head_dim (hidden / n_heads = {self.head_dim}) must be even for rotary embeddings"
            )
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(
                f"rope_scaling must be a RopeScaling or None, got {type(self.rope_scaling).__name__}"
            )
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        if self.init_std <= 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")
        if self.bottleneck is not None and not 1 <= self.bottleneck <= self.hidden:
            raise ValueError(
                f"bottleneck must be in [1, hidden={self.hidden}] or None, got {self.bottleneck}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    @property
    def wire_width(self) -> int:
        """Channels of the activation (and its gradient) that cross a stage boundary."""
        return self.bottleneck if self.bottleneck is not None else self.hidden

    def block_params(self) -> int:
        """Parameters of one transformer block."""
        attn = self.hidden * self.hidden * 2 + self.hidden * self.n_kv_heads * self.head_dim * 2
        return attn + 3 * self.hidden * self.ffn + 2 * self.hidden

    def n_params(self) -> int:
        """Parameters of the whole model (no bottleneck: those live only at stage boundaries)."""
        return self.n_layers * self.block_params() + 2 * self.vocab_size * self.hidden + self.hidden

    def lm_head_cost(self) -> float:
        """The LM head's compute in blocks: per token both are a matrix product per weight, forward and backward
        alike (the embedding at the head is a lookup, next to nothing)."""
        return self.vocab_size * self.hidden / self.block_params()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, as the orchestrator serves it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown ModelConfig fields {unknown}: is this client older than the orchestrator?"
            )
        values = dict(data)
        values["rope_scaling"] = _rope_scaling(values.get("rope_scaling"))
        return cls(**values)


def _rope_scaling(value: RopeScaling | dict[str, Any] | None) -> RopeScaling | None:
    if value is None or isinstance(value, RopeScaling):
        return value
    return RopeScaling(**value)


def pad_vocab(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """Round vocab_size up to a multiple of `multiple`."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be > 0, got {vocab_size}")
    return -(-vocab_size // multiple) * multiple


# name -> (shape without vocab, default number of pipeline stages).
_PRESETS: dict[str, tuple[dict[str, Any], int]] = {
    # Unit tests: every code path (GQA, 3 rope frequency bands, uneven splits) in milliseconds.
    "test": (dict(hidden=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn=172, seq_len=32), 3),
    # Trains end to end on 2 CPU cores.
    "tiny": (dict(hidden=256, n_layers=6, n_heads=8, n_kv_heads=4, ffn=688, seq_len=128), 3),
    # Activation codecs' study (bench/codecs.py): wide enough that 32-128x fewer bytes than a bf16 hop still leaves
    # channels to send (hidden 64 has one at 64x), small enough for one GPU or a patient CPU: 23M parameters in
    # its blocks, 32M with an 8k vocabulary.
    "w512": (dict(hidden=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn=1376, seq_len=256), 3),
    # GPT-2 small class: about 76M parameters outside the embeddings.
    "100m": (dict(hidden=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn=2048, seq_len=1024), 3),
    # Llama 3.2 1B shape with untied embeddings: the class of the public 1.5B, 3-stage run.
    "1b": (dict(hidden=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn=8192, seq_len=2048), 3),
    # The public 15B run: 5 stages, trained at 800 tokens.
    "15b": (dict(hidden=5120, n_layers=50, n_heads=40, n_kv_heads=8, ffn=13824, seq_len=800), 5),
}
PRESETS: tuple[str, ...] = tuple(_PRESETS)


def _lookup(name: str) -> tuple[dict[str, Any], int]:
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return _PRESETS[name]


def preset(name: str, vocab_size: int, **overrides: Any) -> ModelConfig:
    """The named shape for a tokenizer of `vocab_size` tokens (padded up), with any field overridden."""
    shape, _ = _lookup(name)
    values: dict[str, Any] = {**shape, "vocab_size": pad_vocab(vocab_size), **overrides}
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise ValueError(f"unknown ModelConfig fields {unknown}")
    if "rope_scaling" in values:
        values["rope_scaling"] = _rope_scaling(values["rope_scaling"])
    return ModelConfig(**values)


def default_stages(name: str) -> int:
    """Pipeline stages a preset is meant to be split into."""
    return _lookup(name)[1]


def suggested_bottleneck(name: str) -> int:
    """The 64x compression the public runs used (hidden / 64); only a suggestion, never applied by preset()."""
    shape, _ = _lookup(name)
    return max(1, shape["hidden"] // 64)
