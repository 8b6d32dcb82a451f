"""Our Llama against transformers' LlamaForCausalLM: same rotary frequencies, same logits from the same weights."""

import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from iota.model import RopeScaling, build_full, hf_config_dict, hf_state_dict, preset, rope_inv_freq


@pytest.mark.parametrize("name", ["test", "1b", "15b"])
@pytest.mark.parametrize(
    "scaling", [RopeScaling(), RopeScaling(factor=8.0, original_max_position_embeddings=512), None]
)
def test_rope_inverse_frequencies_match_transformers(name: str, scaling: RopeScaling | None) -> None:
    config = preset(name, 1000, rope_scaling=scaling)
    hf_config = LlamaConfig(**hf_config_dict(config))
    their_module = LlamaRotaryEmbedding(config=hf_config).inv_freq  # what the HF model actually rotates by
    if scaling is not None:
        their_function = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")[0]
        torch.testing.assert_close(their_module, their_function, rtol=0, atol=0)
    ours = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
    assert ours.dtype == torch.float32 and ours.shape == (config.head_dim // 2,)
    torch.testing.assert_close(ours, their_module.float(), rtol=0, atol=1e-7)
    if scaling is not None:  # the scaling must actually have changed something for this to test it
        assert not torch.allclose(ours, rope_inv_freq(config.head_dim, config.rope_theta, None))


def test_logits_match_transformers_fp32() -> None:
    # A larger init than training uses, so logits are O(1) and attention is far from uniform.
    config = preset("test", 1000, seq_len=256, init_std=0.1)
    ours = build_full(config, seed=3).eval()
    hf_config = LlamaConfig(**hf_config_dict(config))
    hf_config._attn_implementation = "eager"
    theirs = LlamaForCausalLM(hf_config).eval()
    missing, unexpected = theirs.load_state_dict(hf_state_dict(ours.state_dict()), strict=False)
    assert not unexpected and all("rotary" in name for name in missing)

    tokens = torch.randint(0, 1000, (2, 256), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        our_logits = ours(tokens)  # (B, T, V)
        their_logits = theirs(tokens).logits
    assert our_logits.shape == (2, 256, config.vocab_size)
    assert our_logits.std() > 0.3  # not a degenerate near-zero comparison
    torch.testing.assert_close(our_logits, their_logits, rtol=0, atol=1e-5)


def test_hf_conversion_refuses_a_bottleneck() -> None:
    config = dataclasses.replace(preset("test", 100), bottleneck=8)
    with pytest.raises(ValueError, match="bottleneck"):
        hf_config_dict(config)
    with pytest.raises(ValueError, match="bottleneck"):
        hf_state_dict({"bottleneck.down.weight": torch.zeros(1)})
