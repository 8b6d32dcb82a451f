"""The merge's pseudo-gradient codecs: exact residuals, fixed layout, the same bytes every time, total decoders."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from iota.decoding import DecodeError
from iota.merge.codec import CHUNK, Codec, decode, encode, parse_codec

SPECS = ["int:4", "int:8", "topk:0.05", "topk:1"]
SIZES = [1, 7, CHUNK - 1, CHUNK, 2 * CHUNK + 5]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("n", SIZES)
def test_what_is_sent_plus_what_is_left_is_the_input(spec: str, n: int) -> None:
    codec = parse_codec(spec)
    assert codec is not None
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    data, left = encode(x, codec)
    assert len(data) == codec.encoded_size(n)
    sent = decode(data, n, codec)
    assert torch.equal(x - sent, left)  # error feedback keeps exactly what was not sent
    assert encode(x.clone(), codec)[0] == data  # the same input, the same bytes


@pytest.mark.parametrize("spec", SPECS)
def test_a_partition_of_whole_chunks_decodes_from_its_byte_range(spec: str) -> None:
    codec = parse_codec(spec)
    assert codec is not None
    n = 3 * CHUNK + 11
    x = torch.randn(n, generator=torch.Generator().manual_seed(1))
    data, _ = encode(x, codec)
    whole = decode(data, n, codec)
    lo, hi = codec.byte_range(CHUNK, n)
    assert torch.equal(decode(data[lo:hi], n - CHUNK, codec, start=CHUNK), whole[CHUNK:])
    with pytest.raises(ValueError, match="multiple of the chunk"):
        codec.byte_range(CHUNK + 1, n)


def test_topk_keeps_the_largest_and_int4_keeps_every_sign() -> None:
    x = torch.zeros(CHUNK)
    x[[3, 100, 4000]] = torch.tensor([5.0, -7.0, 6.0])
    x[50] = 0.5
    sent = decode(encode(x, Codec("topk", density=3 / CHUNK))[0], CHUNK, Codec("topk", density=3 / CHUNK))
    assert sent.nonzero().flatten().tolist() == [3, 100, 4000]
    assert sent[100] == -7.0  # the largest magnitude is exact
    y = torch.linspace(-1, 1, 15)
    back = decode(encode(y, Codec("int", bits=4))[0], 15, Codec("int", bits=4))
    assert torch.equal(torch.sign(back), torch.sign(torch.round(y * 7)))
    assert float((back - y).abs().max()) <= 1 / 14 + 1e-6


def test_bad_specs_say_what_is_expected() -> None:
    assert parse_codec("none") is None
    for bad in ["int:3", "int:x", "topk:0", "topk:1.5", "topk:nan", "zstd", "topk"]:
        with pytest.raises(ValueError, match="codec"):
            parse_codec(bad)
    with pytest.raises(ValueError, match="non-finite"):
        encode(torch.tensor([1.0, float("inf")]), Codec("int", bits=8))


def _corrupt(data: bytes, at: int, value: bytes) -> bytes:
    return data[:at] + value + data[at + len(value) :]


@pytest.mark.parametrize("spec", SPECS)
def test_decoder_refuses_bytes_that_are_not_an_encoding(spec: str) -> None:
    codec = parse_codec(spec)
    assert codec is not None
    n = CHUNK + 3
    data, _ = encode(torch.randn(n, generator=torch.Generator().manual_seed(2)), codec)
    bad = [
        data[:-1],
        data + b"\0",
        _corrupt(data, 0, torch.tensor([float("nan")]).numpy().tobytes()),
        _corrupt(data, 0, torch.tensor([-1.0]).numpy().tobytes()),
        _corrupt(data, 0, torch.tensor([3e38]).numpy().tobytes()),  # values would overflow to inf
    ]
    if codec.kind == "topk":
        k = codec.kept(CHUNK)
        bad.append(_corrupt(data, 4, (CHUNK).to_bytes(2, "little")))  # an offset past the chunk
        bad.append(_corrupt(data, 4 + 2 * (k - 1), (0).to_bytes(2, "little")))  # offsets not ascending
        bad.append(_corrupt(data, 4 + 2 * k, b"\x80"))  # -128 is outside int8's symmetric range
    elif codec.bits == 8:
        bad.append(_corrupt(data, 4, b"\x80"))
    for blob in bad:
        with pytest.raises(DecodeError):
            decode(blob, n, codec)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=600), spec=st.sampled_from(SPECS), n=st.integers(0, 300))
def test_decoder_is_total(data: bytes, spec: str, n: int) -> None:
    """Any bytes: values, or a DecodeError; never another exception."""
    codec = parse_codec(spec)
    assert codec is not None
    try:
        out = decode(data, n, codec)
    except DecodeError:
        return
    assert out.shape == (n,) and bool(torch.isfinite(out).all())
