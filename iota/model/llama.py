"""Llama 3 decoder in which any contiguous run of blocks is a pipeline stage (torch only).

One class serves every stage. A stage keeps the blocks its StageSpec names, under their GLOBAL layer index
(`layers.5.attn.wq.weight` is the same tensor name in every split), and what it does not own is None: only the
head has `embed`, only the tail has `norm` and `lm_head`.

    head:  tokens (B, T) long        -> embed -> blocks -> activation (B, T, w)
    body:  activation (B, T, w)      ->          blocks -> activation (B, T, w)
    tail:  activation (B, T, w)      ->          blocks -> norm -> lm_head -> logits (B, T, V)

w is the width sent between stages: `hidden`, or `b` when config.bottleneck = b. The bottleneck keeps an
identity path for the first b channels of the residual stream ("uninterrupted residual flow"):

    sending stage (every non-tail stage), h (B, T, hidden) after its last block:
        out = down(rmsnorm(h)) + h[..., :b]                        # (B, T, b)
    receiving stage (every non-head stage), x (B, T, b) as received:
        h = up(x) + concat(x, zeros(B, T, hidden - b))             # (B, T, hidden)

with down: Linear(hidden -> b) and up: Linear(b -> hidden), both without bias. With bottleneck None, nothing is
added and running the stages one after the other is exactly the whole model.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from iota.model.config import ModelConfig, RopeScaling

if TYPE_CHECKING:
    from iota.model.stages import StageSpec


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 even under bf16 autocast: the mean of squares loses too much in bf16.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.type_as(x)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse rotary frequencies (head_dim / 2,), fp32, with Llama 3 scaling of the long wavelengths."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are stretched by `factor`, short ones kept, the band between interpolated smoothly.
    stretched = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * stretched / scaling.factor + smooth * stretched
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, stretched)


class Rotary(nn.Module):
    """cos/sin tables for every position up to seq_len; derived from the config, so never saved or sent."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        shape = (config.seq_len, config.head_dim)
        self.cos: torch.Tensor
        self.sin: torch.Tensor
        self.register_buffer("cos", torch.empty(shape), persistent=False)
        self.register_buffer("sin", torch.empty(shape), persistent=False)
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        if self.cos.is_meta:
            return
        config = self.config
        # Computed on the CPU in fp32 so every device gets the same table.
        inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        positions = torch.arange(config.seq_len, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)  # (T, head_dim / 2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (T, head_dim): the half-split layout HF Llama uses
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, head_dim) by position; in fp32 so bf16 autocast does not blur positions."""
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.hidden, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.hidden, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.hidden, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # enable_gqa: query head i reads kv head i // (nh / nkv), without materialising repeated k and v.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, C)
        return self.wo(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(config.hidden, config.ffn, bias=False)
        self.up = nn.Linear(config.hidden, config.ffn, bias=False)
        self.down = nn.Linear(config.ffn, config.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.attn_norm(h), cos, sin)  # (B, T, C)
        return h + self.mlp(self.mlp_norm(h))  # (B, T, C)


class Bottleneck(nn.Module):
    """A stage's side of its boundaries: `up` widens what it receives, `norm` + `down` narrow what it sends."""

    def __init__(self, config: ModelConfig, receives: bool, sends: bool) -> None:
        super().__init__()
        assert config.bottleneck is not None
        self.width = config.bottleneck
        self.hidden = config.hidden
        self.up = nn.Linear(self.width, self.hidden, bias=False) if receives else None
        self.norm = RMSNorm(self.hidden, config.norm_eps) if sends else None
        self.down = nn.Linear(self.hidden, self.width, bias=False) if sends else None

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        assert self.up is not None
        identity = F.pad(x, (0, self.hidden - self.width))  # (B, T, b) -> (B, T, C), zeros after channel b
        return self.up(x) + identity  # (B, T, C)

    def compress(self, h: torch.Tensor) -> torch.Tensor:
        assert self.norm is not None and self.down is not None
        return self.down(self.norm(h)) + h[..., : self.width]  # (B, T, b)


class Llama(nn.Module):
    """The blocks `spec` names, plus the embedding on the head and the norm and LM head on the tail."""

    def __init__(self, config: ModelConfig, spec: StageSpec) -> None:
        super().__init__()
        self.config = config
        self.spec = spec
        self.embed = nn.Embedding(config.vocab_size, config.hidden) if spec.is_head else None
        self.bottleneck = None
        if config.bottleneck is not None and spec.n_stages > 1:
            self.bottleneck = Bottleneck(config, receives=not spec.is_head, sends=not spec.is_tail)
        self.rope = Rotary(config)
        # Keyed by global index so a parameter's name says which block it is, whatever the split.
        self.layers = nn.ModuleDict({str(i): Block(config) for i in spec.layers})
        self.norm = RMSNorm(config.hidden, config.norm_eps) if spec.is_tail else None
        self.lm_head = nn.Linear(config.hidden, config.vocab_size, bias=False) if spec.is_tail else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            h = self.embed(x)  # (B, T) token ids -> (B, T, C)
        elif self.bottleneck is not None:
            h = self.bottleneck.expand(x)  # (B, T, b) -> (B, T, C)
        else:
            h = x  # (B, T, C)
        T = h.shape[1]
        if T > self.config.seq_len:
            raise ValueError(
                f"sequence of {T} tokens is longer than the model's seq_len {self.config.seq_len}"
            )
        cos, sin = self.rope.cos[:T], self.rope.sin[:T]  # (T, hd)
        for block in self.layers.values():
            h = block(h, cos, sin)  # (B, T, C)
        if self.lm_head is not None:
            assert self.norm is not None
            return self.lm_head(self.norm(h))  # (B, T, V)
        if self.bottleneck is not None:
            return self.bottleneck.compress(h)  # (B, T, b)
        return h  # (B, T, C)

    def init_key(self, name: str) -> str:
        """The name a parameter's init seed comes from: its own name, plus the boundary for bottleneck weights."""
        if name.startswith("bottleneck.up."):
            return f"boundary{self.spec.index - 1}.{name}"  # receiving side of the boundary before this stage
        if name.startswith("bottleneck."):
            return f"boundary{self.spec.index}.{name}"  # sending side of the boundary after this stage
        return name


def _generator(seed: int, key: str) -> torch.Generator:
    # sha256, not hash(): Python salts str hashes per process, and every miner must draw the same numbers.
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@torch.no_grad()
def init_weights(model: Llama, seed: int) -> None:
    """Initialise every parameter from (seed, its name) and recompute the rotary tables.

    Each tensor draws from its own CPU generator, so a block starts the same in any stage plan, on any device.
    Norm weights are ones; every linear and embedding weight is Normal(0, init_std).
    """
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, RMSNorm):
                param.fill_(1.0)
                continue
            values = torch.empty(param.shape, dtype=torch.float32)
            values.normal_(0.0, model.config.init_std, generator=_generator(seed, model.init_key(name)))
            param.copy_(values)
    model.rope.reset()


def autocast(device_type: str, enabled: bool = True) -> AbstractContextManager[Any]:
    """bf16 compute for the ops that benefit, while the parameters (master weights) stay fp32."""
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=enabled)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (B, T, V) against targets (B, T), in fp32; reduction "mean" or "sum"."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    flat_logits = logits.float().reshape(-1, logits.shape[-1])  # (B*T, V)
    return F.cross_entropy(flat_logits, targets.reshape(-1), reduction=reduction)


def sum_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy: gradient accumulation divides by the total token count once, at the step."""
    return loss_fn(logits, targets, reduction="sum")


@torch.no_grad()
def param_digest(model: nn.Module) -> str:
    """sha256 over (name, shape, fp32 bytes) of every parameter in name order: equal digests, equal weights."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        values = param.detach().to(device="cpu", dtype=torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(values.shape)).encode())
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()


_HF_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
}
_HF_TOP_NAMES = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}


def hf_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a whole model's tensors to transformers' LlamaForCausalLM names (same layout, no reshaping)."""
    renamed = {}
    for name, tensor in state.items():
        if name.startswith("bottleneck."):
            raise ValueError("a model with a bottleneck has no transformers equivalent")
        if name.startswith("layers."):
            _, index, rest = name.split(".", 2)
            renamed[f"model.layers.{index}.{_HF_BLOCK_NAMES[rest]}"] = tensor
        else:
            renamed[_HF_TOP_NAMES.get(name, name)] = tensor
    return renamed


def hf_config_dict(config: ModelConfig) -> dict[str, Any]:
    """Keyword arguments for transformers.LlamaConfig (also its config.json) describing this model."""
    if config.bottleneck is not None:
        raise ValueError("a model with a bottleneck has no transformers equivalent")
    rope_scaling, context = None, config.seq_len
    if config.rope_scaling is not None:
        # The scaled context, as Llama 3.1's own config states it: transformers warns when the original context
        # exceeds max_position_embeddings. (The llama3 rope frequencies do not depend on it.)
        scaled = config.rope_scaling.original_max_position_embeddings * config.rope_scaling.factor
        context = max(context, int(scaled))
        rope_scaling = {
            "rope_type": "llama3",
            "factor": config.rope_scaling.factor,
            "low_freq_factor": config.rope_scaling.low_freq_factor,
            "high_freq_factor": config.rope_scaling.high_freq_factor,
            "original_max_position_embeddings": config.rope_scaling.original_max_position_embeddings,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden,
        "intermediate_size": config.ffn,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": context,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope_scaling,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": config.init_std,
    }
