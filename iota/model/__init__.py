"""Llama model, pipeline stage plan and bottleneck (imports torch only)."""

from iota.model.config import (
    PRESETS,
    ModelConfig,
    RopeScaling,
    default_stages,
    pad_vocab,
    preset,
    suggested_bottleneck,
)
from iota.model.llama import (
    Llama,
    autocast,
    hf_config_dict,
    hf_state_dict,
    init_weights,
    loss_fn,
    param_digest,
    rope_inv_freq,
    sum_loss,
)
from iota.model.stages import StageSpec, build_full, build_stage, plan_stages

__all__ = [
    "PRESETS",
    "Llama",
    "ModelConfig",
    "RopeScaling",
    "StageSpec",
    "autocast",
    "build_full",
    "build_stage",
    "default_stages",
    "hf_config_dict",
    "hf_state_dict",
    "init_weights",
    "loss_fn",
    "pad_vocab",
    "param_digest",
    "plan_stages",
    "preset",
    "rope_inv_freq",
    "suggested_bottleneck",
    "sum_loss",
]
