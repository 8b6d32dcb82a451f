"""Activation codecs: the grammar a run's config uses, each codec's error bound, exactness where it promises it,
the same bytes from the same seed, the bytes per hop each sends, and a receiver that takes only the run's codec."""

from __future__ import annotations

import itertools
import re

import pytest
import safetensors.torch
import torch
from pydantic import ValidationError

from iota.config import RunSettings
from iota.config.settings import CODEC
from iota.model import codecs, wire
from iota.model.codecs import CodecError, CodecSpec

SHAPE = (2, 16, 64)  # (B, T, W): two sequences of the `test` preset's width
NAMES = ("", "int8", "lowrank:8", "lowrank:8+int8")


def activation(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    """Tokens of very different scales, as a residual stream has: a per-token scale must follow each."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * torch.logspace(-3, 3, shape[-2]).reshape(-1, 1)


def codec(name: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> codecs.Codec:
    return codecs.build(name, SHAPE, dtype, seed)


# -- the grammar -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "spec"),
    [
        ("", CodecSpec()),
        ("int8", CodecSpec(int8=True)),
        ("lowrank:32", CodecSpec(rank=32)),
        ("lowrank:32+int8", CodecSpec(rank=32, int8=True)),
    ],
)
def test_a_codec_name_parses_to_its_parts_and_back(name: str, spec: CodecSpec) -> None:
    assert codecs.parse(name) == spec
    assert spec.name == name
    assert RunSettings(codec=name).codec == name


@pytest.mark.parametrize(
    "name", ["int4", "lowrank", "lowrank:0", "lowrank:-1", "int8+lowrank:32", "lowrank:32+int8+int8", "dense"]
)
def test_an_unknown_codec_is_one_line_at_start_up(name: str) -> None:
    with pytest.raises(ValueError, match="codec") as error:
        codecs.parse(name)
    assert "\n" not in str(error.value)
    with pytest.raises(ValidationError, match="lowrank:R"):
        RunSettings(codec=name)


def test_the_settings_grammar_is_the_codecs() -> None:
    """iota.config may not import the model, so it keeps its own copy of the pattern."""
    assert CODEC.pattern == codecs.GRAMMAR.pattern


def test_a_rank_wider_than_the_wire_is_refused() -> None:
    with pytest.raises(ValueError, match="rank 65 is more than the 64 channels"):
        codecs.build("lowrank:65", SHAPE, torch.bfloat16, 0)


# -- error bounds and exactness --------------------------------------------------------------------------------


@pytest.mark.parametrize("rounding_seed", [None, 7])
def test_int8_is_within_one_step_of_each_tokens_max(rounding_seed: int | None) -> None:
    """Every value within max|token| / 127 of what was sent (half that when rounded to the nearest code)."""
    x = activation()
    c = codec("int8", torch.float32)
    error = (c.decode(c.encode(x, rounding_seed)) - x).abs()
    step = x.abs().amax(dim=-1, keepdim=True) / 127
    bound = step if rounding_seed is not None else step / 2
    assert bool((error <= bound * (1 + 1e-5)).all())
    assert float(error.max()) > 0  # it is a lossy codec: the check above could fail


def test_stochastic_int8_is_unbiased_and_nearest_is_not() -> None:
    """A value a third of a step above a code: stochastic rounding averages back to it over many seeds."""
    x = torch.full(SHAPE, 1 / 3)
    x[..., 0] = 127.0  # each token's max: the step is 1
    c = codec("int8", torch.float32)
    mean = torch.stack([c.roundtrip(x, seed) for seed in range(200)]).mean(dim=0)[..., 1:]
    assert abs(float(mean.mean()) - 1 / 3) < 0.01
    assert float(c.roundtrip(x)[..., 1:].abs().max()) == 0.0  # the nearest code is 0, every time


def test_lowrank_is_exact_on_its_subspace_and_drops_the_rest() -> None:
    c = codec("lowrank:8", torch.float32)
    assert c.basis is not None
    assert torch.allclose(c.basis.T @ c.basis, torch.eye(8), atol=1e-6)  # orthonormal columns
    inside = torch.randn(2, 16, 8) @ c.basis.T
    assert torch.allclose(c.decode(c.encode(inside)), inside, atol=1e-5)
    outside = activation(1) - c.project(activation(1))
    assert float(c.roundtrip(outside).norm()) < 1e-4 * float(outside.norm())


def test_lowrank_backward_is_the_gradient_of_its_forward() -> None:
    """A receiver gets x P P^T, so the sender's gradient is g P P^T: what the codec sends back for g."""
    c = codec("lowrank:8", torch.float32)
    assert c.basis is not None
    x = activation().requires_grad_(True)
    weights = torch.randn(SHAPE)
    received = c.unpack({codecs.LOWRANK_KEY: x @ c.basis})  # the forward with autograd's graph through it
    (received * weights).sum().backward()
    assert x.grad is not None
    assert torch.allclose(c.roundtrip(weights), x.grad, atol=1e-5)


def test_dense_writes_the_bytes_it_always_wrote() -> None:
    x = activation()
    assert codec("").encode(x) == wire.encode(x, torch.bfloat16)
    assert codec("").encode(x, 3) == wire.encode(x, torch.bfloat16, rounding_seed=3)


# -- determinism -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_the_same_seeds_give_the_same_bytes(name: str) -> None:
    x = activation()
    first = codec(name).encode(x, 5)
    codecs.build.cache_clear()
    codecs.subspace.cache_clear()  # rebuilt from the seed, as another role builds it
    assert codec(name).encode(x, 5) == first


def test_the_subspace_and_the_rounding_follow_their_seeds() -> None:
    x = activation()
    assert not torch.equal(codec("lowrank:8", seed=0).basis, codec("lowrank:8", seed=1).basis)  # type: ignore[arg-type]
    assert codec("int8").encode(x, 5) != codec("int8").encode(x, 6)


# -- bytes per hop -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "per_token"),
    [("", 512 * 2), ("int8", 512 + 4), ("lowrank:32", 32 * 2), ("lowrank:32+int8", 32 + 4)],
)
def test_a_hop_sends_the_bytes_its_codec_says(name: str, per_token: int) -> None:
    """Hidden 512 in bf16: int8 sends a byte per channel and an fp32 scale per token; lowrank:32+int8 ~28x less."""
    shape = (8, 256, 512)
    c = codecs.build(name, shape, torch.bfloat16, 0)
    data = c.encode(activation(shape=shape))
    assert len(data) == c.size
    payload = wire.parse(data, max_bytes=c.size, max_header_bytes=1 << 12)
    assert len(payload.body) == 8 * 256 * per_token
    assert c.size - len(payload.body) <= 256  # the header
    dense = codecs.build("", shape, torch.bfloat16, 0).size
    assert dense / c.size == pytest.approx(1024 / per_token, rel=0.01)


# -- a receiver takes only the run's codec ---------------------------------------------------------------------


@pytest.mark.parametrize(("sent", "run"), [p for p in itertools.product(NAMES, NAMES) if p[0] != p[1]])
def test_a_payload_of_another_codec_is_refused(sent: str, run: str) -> None:
    data = codec(sent).encode(activation())
    with pytest.raises(wire.WireError):
        codec(run).decode(data)


@pytest.mark.parametrize(("sent", "claimed"), [("int8", None), ("lowrank:8+int8", "lowrank:9+int8")])
def test_the_codec_is_recorded_in_the_payload(sent: str, claimed: str | None) -> None:
    """The run's own tensors under another codec's name (or none) are refused: the name is part of the format."""
    tensors = codec(sent).pack(activation())
    metadata = None if claimed is None else {codecs.CODEC_KEY: claimed}
    codec(sent).decode(safetensors.torch.save(tensors, metadata={codecs.CODEC_KEY: sent}))
    with pytest.raises(CodecError, match=re.escape(f"codec {claimed or ''!r}, the run's is {sent!r}")):
        codec(sent).decode(safetensors.torch.save(tensors, metadata=metadata))


def _int8_payload(codes: torch.Tensor, scales: torch.Tensor) -> bytes:
    return safetensors.torch.save(
        {codecs.CODES_KEY: codes, codecs.SCALES_KEY: scales}, metadata={codecs.CODEC_KEY: "int8"}
    )


@pytest.mark.parametrize(
    ("code", "scale", "reason"),
    [(-128, 1.0, "int8 code -128"), (1, -1.0, "negative"), (127, 3e38, "overflow")],
)
def test_int8_codes_and_scales_no_encoder_writes_are_refused(code: int, scale: float, reason: str) -> None:
    codes = torch.zeros(SHAPE, dtype=torch.int8)
    codes[0, 0, 0] = code
    scales = torch.ones((*SHAPE[:-1], 1))
    scales[0, 0, 0] = scale
    with pytest.raises(CodecError, match=reason):
        codec("int8").decode(_int8_payload(codes, scales))
