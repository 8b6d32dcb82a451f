"""The tensor wire format accepts exactly what the receiver expects and refuses everything else, before parsing."""

import base64
import hashlib
import json
import pickle  # noqa: TID251 - only to build a hostile payload and prove it is never unpickled
import struct

import pytest
import safetensors.torch
import torch

from iota.model import wire
from iota.model.wire import (
    WIRE_DTYPES,
    WireError,
    decode,
    decode_state,
    encode,
    encode_state,
    encoded_size,
    wire_dtype,
)

MB = 1024 * 1024


def _header(data: bytes) -> dict:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length])


def _with_header(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@pytest.mark.parametrize("name", sorted(WIRE_DTYPES))
def test_round_trip_each_wire_dtype(name):
    dtype = wire_dtype(name)
    source = torch.randn(2, 5, 7)
    data = encode(source, dtype)
    out = decode(data, dtype=dtype, shape=(2, 5, 7), max_bytes=MB)
    assert out.dtype == dtype
    assert torch.equal(out, source.to(dtype))
    assert _header(data).keys() == {"t"}  # no metadata rides along


def test_encode_makes_non_contiguous_input_contiguous_and_any_shape_accepted():
    source = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    out = decode(encode(source), dtype=torch.float32, shape=None, max_bytes=MB)
    assert torch.equal(out, source)
    out += 1  # the decoded tensor is the receiver's to use
    assert out[0, 0].item() == 1.0


def test_unknown_wire_dtype_named():
    with pytest.raises(ValueError, match="int4"):
        wire_dtype("int4")


def test_truncated_payload_refused():
    data = encode(torch.ones(4, 4), torch.float32)
    with pytest.raises(WireError, match="truncated"):
        decode(data[:-3], dtype=torch.float32, shape=(4, 4), max_bytes=MB)
    with pytest.raises(WireError, match="too short"):
        decode(data[:5], dtype=torch.float32, shape=(4, 4), max_bytes=MB)


def test_wrong_dtype_names_expected_and_received():
    data = encode(torch.ones(3), torch.float16)
    with pytest.raises(WireError, match=r"expected dtype BF16, got 'F16'"):
        decode(data, dtype=torch.bfloat16, shape=(3,), max_bytes=MB)


def test_wrong_shape_names_expected_and_received():
    data = encode(torch.ones(2, 3), torch.bfloat16)
    with pytest.raises(WireError, match=r"expected shape \[3, 2\], got \[2, 3\]"):
        decode(data, dtype=torch.bfloat16, shape=(3, 2), max_bytes=MB)


def test_oversized_body_refused_before_any_parsing(monkeypatch):
    data = encode(torch.zeros(25 * MB), torch.float32)  # 100 MiB of honest data
    assert len(data) > 100 * MB

    def must_not_parse(*args, **kwargs):
        raise AssertionError("an oversized payload was parsed")

    monkeypatch.setattr(wire.json, "loads", must_not_parse)
    monkeypatch.setattr(wire.safetensors.torch, "load", must_not_parse)
    with pytest.raises(WireError, match=r"more than the 1048576 bytes allowed"):
        decode(data, dtype=torch.float32, shape=None, max_bytes=MB)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_non_finite_values_refused(bad, dtype):
    source = torch.ones(8)
    source[5] = bad
    with pytest.raises(WireError, match="NaN or Inf"):
        decode(encode(source, dtype), dtype=dtype, shape=(8,), max_bytes=MB)


def test_pickled_bytes_refused_without_unpickling(monkeypatch):
    payload = pickle.dumps({"t": torch.ones(4)})

    def forbidden(*args, **kwargs):
        raise AssertionError("the decoder tried to unpickle")

    for attribute in ("loads", "load", "Unpickler", "_loads", "_load", "_Unpickler"):
        monkeypatch.setattr(pickle, attribute, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    with pytest.raises(WireError, match="not a safetensors payload.*pickle"):
        decode(payload, dtype=torch.float32, shape=(4,), max_bytes=MB)


def test_extra_key_in_header_refused():
    body = torch.ones(2).numpy().tobytes() * 2
    header = {
        "t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "u": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
    }
    with pytest.raises(WireError, match=r"unexpected \['u'\]"):
        decode(_with_header(header, body), dtype=torch.float32, shape=(2,), max_bytes=MB)


def test_unknown_field_in_entry_and_duplicate_keys_refused():
    body = torch.ones(2).numpy().tobytes()
    header = {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "note": "x"}}
    with pytest.raises(WireError, match="must have dtype, shape and data_offsets"):
        decode(_with_header(header, body), dtype=torch.float32, shape=(2,), max_bytes=MB)
    entry = '{"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}'
    raw = ('{"t": ' + entry + ', "t": ' + entry + "}").encode()
    with pytest.raises(WireError, match="duplicate keys"):
        decode(struct.pack("<Q", len(raw)) + raw + body, dtype=torch.float32, shape=(2,), max_bytes=MB)


def test_header_claiming_more_data_than_present_refused():
    body = torch.ones(2).numpy().tobytes()
    # Consistent shape and offsets, but 16 bytes claimed and 8 sent.
    header = {"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    with pytest.raises(WireError, match="describes 16 data bytes but 8 arrived"):
        decode(_with_header(header, body), dtype=torch.float32, shape=None, max_bytes=MB)
    # Offsets that disagree with the shape.
    header = {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}
    with pytest.raises(WireError, match="needs 8 bytes"):
        decode(_with_header(header, body), dtype=torch.float32, shape=(2,), max_bytes=MB)


def test_header_length_beyond_payload_refused():
    data = struct.pack("<Q", 10**12) + b"{}"
    with pytest.raises(WireError, match="header length 1000000000000 does not fit"):
        decode(data, dtype=torch.float32, shape=None, max_bytes=MB)


def test_standard_string_metadata_tolerated():
    data = safetensors.torch.save({"t": torch.ones(3)}, metadata={"format": "pt"})
    assert torch.equal(decode(data, dtype=torch.float32, shape=(3,), max_bytes=MB), torch.ones(3))


def test_state_round_trip_keeps_dtypes_and_ties():
    shared = torch.randn(4, 3)
    state = {"embed.weight": shared, "head.weight": shared, "step": torch.tensor([7], dtype=torch.int64)}
    data = encode_state(state)
    expected = {name: (tuple(t.shape), t.dtype) for name, t in state.items()}
    out = decode_state(data, expected=expected, max_bytes=MB)
    assert out.keys() == state.keys()
    for name, tensor in state.items():
        assert out[name].dtype == tensor.dtype
        assert torch.equal(out[name], tensor)


def test_state_mismatch_refused():
    data = encode_state({"a": torch.zeros(2, 2), "b": torch.zeros(3)})
    with pytest.raises(WireError, match=r"missing \['c'\], unexpected \['b'\]"):
        decode_state(data, expected={"a": ((2, 2), torch.float32), "c": ((3,), torch.float32)}, max_bytes=MB)
    with pytest.raises(WireError, match=r"tensor 'b': expected shape \[4\], got \[3\]"):
        decode_state(data, expected={"a": ((2, 2), torch.float32), "b": ((4,), torch.float32)}, max_bytes=MB)
    with pytest.raises(WireError, match=r"tensor 'a': expected dtype BF16"):
        decode_state(data, expected={"a": ((2, 2), torch.bfloat16), "b": ((3,), torch.float32)}, max_bytes=MB)


def test_digests_match_hashlib_and_s3_forms():
    data = encode(torch.arange(5.0))
    assert wire.sha256(data) == hashlib.sha256(data).hexdigest()
    assert wire.md5_hex(data) == hashlib.md5(data).hexdigest()
    assert base64.b64decode(wire.md5_b64(data)) == hashlib.md5(data).digest()


@pytest.mark.parametrize("shape", [(), (0,), (1,), (3, 5), (1, 800, 80), (2, 7, 9, 11)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_encoded_size_is_exact(shape, dtype):
    data = encode(torch.zeros(shape), dtype)
    assert encoded_size(shape, dtype) == len(data)
    decode(data, dtype=dtype, shape=shape, max_bytes=encoded_size(shape, dtype))
    with pytest.raises(WireError, match="more than"):
        decode(data, dtype=dtype, shape=shape, max_bytes=encoded_size(shape, dtype) - 1)


def test_stochastic_bf16_rounding_is_unbiased_reproducible_and_keeps_non_finite_values() -> None:
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0)) * 1e-3
    once = wire.round_bf16_stochastic(x, seed=7)
    assert once.dtype == torch.bfloat16 and torch.equal(once, wire.round_bf16_stochastic(x, seed=7))
    assert not torch.equal(once, wire.round_bf16_stochastic(x, seed=8))
    # Each value goes to one of its two bf16 neighbours: within one bf16 ulp (2^-7 relative at most).
    assert bool(((once.float() - x).abs() <= x.abs() * 2**-7).all())
    # Zero error in expectation, where round-to-nearest keeps its error: the mean over seeds closes in on x.
    mean = torch.stack([wire.round_bf16_stochastic(x, seed).float() for seed in range(32)]).mean(0)
    nearest = x.to(torch.bfloat16).float()
    assert (mean - x).abs().mean() < 0.3 * (nearest - x).abs().mean()
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, 1.0])
    rounded = wire.round_bf16_stochastic(special, seed=1).float()
    assert rounded[0] == float("inf") and rounded[1] == float("-inf") and rounded[2].isnan()
    assert rounded[3] == 0.0 and rounded[4] == 1.0  # exact bf16 values stay as they are


def test_encode_rounds_stochastically_only_to_bf16_when_given_a_seed() -> None:
    x = torch.randn(4, 8) * 1e-3
    data = wire.encode(x, torch.bfloat16, rounding_seed=3)
    bf16 = wire.decode(data, dtype=torch.bfloat16, shape=(4, 8), max_bytes=len(data))
    assert torch.equal(bf16, wire.round_bf16_stochastic(x, 3))
    assert wire.encode(x, torch.float32, rounding_seed=3) == wire.encode(x, torch.float32)
