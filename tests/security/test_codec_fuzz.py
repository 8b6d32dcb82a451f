"""The codec decoders are total: for any bytes, a valid payload of each codec mutated (its header rewritten, cut,
extended, overwritten, NaN in its body, relabelled) or random, `Codec.decode` returns an activation of the run's
shape that its codec could have sent, or raises DecodeError; never a library's own error, never a tensor of
another shape, never a non-finite value. Same harness as tests/security/test_decoders_fuzz.py."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from hypothesis import given
from hypothesis import strategies as st

from iota.model import codecs
from tests.security.test_decoders_fuzz import FUZZ, mutated, refused_or

SHAPE = (2, 3, 8)  # an activation: (B, T, W)
NAMES = ("", "int8", "lowrank:4", "lowrank:4+int8")
CODECS = {name: codecs.build(name, SHAPE, torch.bfloat16, 0) for name in NAMES}
X = torch.linspace(-3, 3, 48).reshape(SHAPE)
VALID = {name: codec.encode(X, 11) for name, codec in CODECS.items()}


def check(codec: codecs.Codec, value: torch.Tensor) -> None:
    """What a receiver gets: the run's shape, fp32, finite, and inside the codec's subspace."""
    assert value.shape == SHAPE and value.dtype == torch.float32 and bool(torch.isfinite(value).all())
    assert torch.allclose(codec.project(value), value, atol=1e-4 * (1 + float(value.abs().max())))


@pytest.mark.parametrize("name", NAMES)
@FUZZ
@given(data=st.data())
def test_a_mutated_payload_decodes_to_the_runs_shape_or_is_refused(name: str, data: st.DataObject) -> None:
    codec = CODECS[name]
    payload = data.draw(mutated(VALID[name]))
    refused_or(lambda: codec.decode(payload), lambda value: check(codec, value))
    if payload == VALID[name]:
        assert torch.equal(codec.decode(payload), codec.roundtrip(X, 11))


@pytest.mark.parametrize("name", NAMES)
@FUZZ
@given(sent=st.sampled_from(NAMES), label=st.one_of(st.none(), st.sampled_from(NAMES), st.text(max_size=80)))
def test_any_codecs_tensors_under_any_label_are_refused_unless_they_are_the_runs(
    name: str, sent: str, label: str | None
) -> None:
    tensors = CODECS[sent].pack(X, 11)
    payload = safetensors.torch.save(tensors, metadata=None if label is None else {codecs.CODEC_KEY: label})
    accepted = sent == name and label == (name or None)  # as the codec writes it: dense has no metadata
    if accepted:
        check(CODECS[name], CODECS[name].decode(payload))
    else:
        refused_or(
            lambda: CODECS[name].decode(payload), lambda _: pytest.fail("another codec's payload decoded")
        )


@pytest.mark.parametrize("name", ["int8", "lowrank:4+int8"])
@FUZZ
@given(
    codes=st.binary(min_size=1, max_size=48), scale=st.floats(allow_nan=True, allow_infinity=True, width=32)
)
def test_any_int8_codes_and_scale_decode_finite_or_are_refused(name: str, codes: bytes, scale: float) -> None:
    """Codes of any byte (-128 included) and a scale of any float (negative, huge, NaN): refused or finite."""
    codec = CODECS[name]
    valid = codec.pack(X, 11)
    raw = torch.frombuffer(bytearray(codes.ljust(valid[codecs.CODES_KEY].numel(), b"\x7f")), dtype=torch.int8)
    tensors = {
        codecs.CODES_KEY: raw[: valid[codecs.CODES_KEY].numel()]
        .reshape(valid[codecs.CODES_KEY].shape)
        .clone(),
        codecs.SCALES_KEY: torch.full(valid[codecs.SCALES_KEY].shape, scale, dtype=torch.float32),
    }
    payload = safetensors.torch.save(tensors, metadata={codecs.CODEC_KEY: name})
    refused_or(lambda: codec.decode(payload), lambda value: check(codec, value))
