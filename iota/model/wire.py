"""Tensor wire format: safetensors bytes, checked against what the receiver expects before any tensor is built."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import struct
from collections.abc import Mapping

import safetensors
import safetensors.torch
import torch

SINGLE_KEY = "t"
"""The one key under which `encode` stores its tensor."""

METADATA_KEY = "__metadata__"

MAX_HEADER_BYTES = 16 * 1024 * 1024
"""A stage's state dict has a few hundred tensors (~100 header bytes each): 16 MiB is far beyond any honest header
and keeps a hostile one from making us parse megabytes of JSON."""

WIRE_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
"""Names a run's config uses for the dtype activations and their gradients travel in."""

# safetensors' dtype names (from its format spec) for the torch dtypes we may send or receive.
_SAFETENSORS_NAMES: dict[torch.dtype, str] = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_TORCH_DTYPES = {name: dtype for dtype, name in _SAFETENSORS_NAMES.items()}

# Protocol 2+ pickles start with PROTO (0x80); torch.save files are zip archives. Named in errors to help senders.
_PICKLE_PROTO = b"\x80"
_ZIP_MAGIC = b"PK\x03\x04"


class WireError(ValueError):
    """A payload that is not the tensor(s) the receiver expects: wrong format, key, dtype, shape, size or value."""


def wire_dtype(name: str) -> torch.dtype:
    """The torch dtype for a wire dtype name ("bf16", "fp32", "fp16")."""
    try:
        return WIRE_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown wire dtype {name!r}; expected one of {sorted(WIRE_DTYPES)}") from None


def sha256(data: bytes) -> str:
    """Hex sha256 of a payload: the digest reports carry for every object."""
    return hashlib.sha256(data).hexdigest()


def md5_hex(data: bytes) -> str:
    """Hex md5: what S3 returns as the ETag of a single-part upload (without the quotes)."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def md5_b64(data: bytes) -> str:
    """Base64 md5: the form of S3's Content-MD5 request header."""
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode("ascii")


def encode(tensor: torch.Tensor, dtype: torch.dtype | None = None, rounding_seed: int | None = None) -> bytes:
    """One tensor as safetensors bytes under key "t", on CPU, contiguous, cast to `dtype` if given.

    `rounding_seed`: cast to bf16 by stochastic rounding with this seed (`round_bf16_stochastic`) rather than to
    the nearest value; other dtypes ignore it.
    """
    target = tensor.dtype if dtype is None else dtype
    _safetensors_name(target)
    if target == torch.bfloat16 and rounding_seed is not None:
        flat = round_bf16_stochastic(tensor, rounding_seed)
    else:
        flat = tensor.detach().to(device="cpu", dtype=target).contiguous()
    return safetensors.torch.save({SINGLE_KEY: flat})


def round_bf16_stochastic(tensor: torch.Tensor, seed: int) -> torch.Tensor:
    """Each value rounded to one of its two bf16 neighbours at random, with the probability of its nearness, from a
    seeded generator: the rounding error is zero in expectation, and the same seed gives the same bits.

    Round-to-nearest errs the same way for the same value every time; in the gradients that cross a narrow
    bottleneck those errors add up (preset `test`, bottleneck 16: held-out loss 4.96 against 4.56 in fp32, and 4.63
    with this rounding; see docs/benchmarks.md). Non-finite values are cast as they are.
    """
    x = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
    noise = torch.randint(
        0, 1 << 16, x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int32
    )
    # Adding up to one bf16 ulp below the cut to the fp32 bits carries into the kept bits with the right odds;
    # the bits below are then cut (-65536 is the mask 0xFFFF0000 as an int32). Two's complement wraps, as bits do.
    rounded = ((x.view(torch.int32) + noise) & -65536).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x).to(torch.bfloat16)


def encoded_size(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Exact length of `encode` for a tensor of this shape and dtype: the `max_bytes` a receiver should allow."""
    nbytes = math.prod(shape) * dtype.itemsize
    entry = {"dtype": _safetensors_name(dtype), "shape": list(shape), "data_offsets": [0, nbytes]}
    # safetensors writes compact JSON and pads the header with spaces to a multiple of 8 bytes.
    header = len(json.dumps({SINGLE_KEY: entry}, separators=(",", ":")).encode())
    return 8 + header + (-header % 8) + nbytes


def decode(data: bytes, *, dtype: torch.dtype, shape: tuple[int, ...] | None, max_bytes: int) -> torch.Tensor:
    """The tensor `encode` wrote, if it has exactly this dtype and shape (None: any shape) and is finite."""
    shapes = {SINGLE_KEY: None if shape is None else tuple(shape)}
    tensors = _decode_checked(data, dtypes={SINGLE_KEY: dtype}, shapes=shapes, max_bytes=max_bytes)
    return tensors[SINGLE_KEY]


def encode_state(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Named tensors (a weight snapshot, a merged slice and its momentum) as safetensors bytes, dtypes kept."""
    flat: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in tensors.items():
        if name == METADATA_KEY:
            raise WireError(f"tensor name {METADATA_KEY!r} is reserved by safetensors")
        _safetensors_name(tensor.dtype)
        cpu = tensor.detach().cpu().contiguous()
        # safetensors refuses tensors that share storage (tied weights); a copy gives each its own bytes.
        storage = cpu.untyped_storage().data_ptr()
        if storage in seen_storages and cpu.numel() > 0:
            cpu = cpu.clone()
        seen_storages.add(cpu.untyped_storage().data_ptr())
        flat[name] = cpu
    return safetensors.torch.save(flat)


def decode_state(
    data: bytes, *, expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]], max_bytes: int
) -> dict[str, torch.Tensor]:
    """Named tensors from `encode_state`, if the names, shapes and dtypes are exactly `expected` and all finite."""
    dtypes = {name: dtype for name, (_, dtype) in expected.items()}
    shapes: dict[str, tuple[int, ...] | None] = {name: tuple(shape) for name, (shape, _) in expected.items()}
    return _decode_checked(data, dtypes=dtypes, shapes=shapes, max_bytes=max_bytes)


def _safetensors_name(dtype: torch.dtype) -> str:
    try:
        return _SAFETENSORS_NAMES[dtype]
    except KeyError:
        raise WireError(f"dtype {dtype} cannot travel on the wire") from None


def _decode_checked(
    data: bytes,
    *,
    dtypes: Mapping[str, torch.dtype],
    shapes: Mapping[str, tuple[int, ...] | None],
    max_bytes: int,
) -> dict[str, torch.Tensor]:
    """Validate the header against the expectation using only its JSON, then build and check the tensors."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError(f"expected bytes, got {type(data).__name__}")
    size = len(data)
    # The size is checked first: an oversized body is refused before a byte of it is interpreted.
    if size > max_bytes:
        raise WireError(f"payload is {size} bytes, more than the {max_bytes} bytes allowed")
    header_len, header = _read_header(bytes(data[: 8 + min(MAX_HEADER_BYTES, max(size - 8, 0))]), size)
    _check_header(header, dtypes=dtypes, shapes=shapes, body_bytes=size - 8 - header_len)

    try:
        tensors = safetensors.torch.load(bytes(data))
    except safetensors.SafetensorError as error:
        raise WireError(f"safetensors could not parse the payload: {error}") from error
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise WireError(f"tensor {name!r} contains NaN or Inf")
    return tensors


def _read_header(prefix: bytes, size: int) -> tuple[int, dict]:
    """The length and parsed JSON of a safetensors payload's header, from the payload's first bytes."""
    if size < 8:
        raise WireError(f"payload is {size} bytes: too short for a safetensors header")
    (header_len,) = struct.unpack("<Q", prefix[:8])
    if header_len > size - 8 or header_len > MAX_HEADER_BYTES or header_len < 2:
        hint = ""
        if prefix.startswith(_PICKLE_PROTO):
            hint = " (it starts like a pickle, which is never accepted)"
        elif prefix.startswith(_ZIP_MAGIC):
            hint = " (it is a zip archive, as torch.save writes, which is never accepted)"
        raise WireError(
            f"not a safetensors payload{hint}: header length {header_len} does not fit in {size} bytes "
            f"(limit {MAX_HEADER_BYTES})"
        )
    raw = prefix[8 : 8 + header_len]
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, WireError) as error:
        raise WireError(f"not a safetensors payload: header is not valid JSON ({error})") from error
    if not isinstance(header, dict):
        raise WireError(
            f"not a safetensors payload: header is a JSON {type(header).__name__}, expected an object"
        )
    return header_len, header


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    # Two entries under one key would let a sender show the checks one tensor and the parser another.
    keys = [key for key, _ in pairs]
    if len(keys) != len(set(keys)):
        raise WireError(f"duplicate keys in header: {sorted(keys)}")
    return dict(pairs)


def _check_header(
    header: dict,
    *,
    dtypes: Mapping[str, torch.dtype],
    shapes: Mapping[str, tuple[int, ...] | None],
    body_bytes: int,
) -> None:
    """Keys, dtypes, shapes and data offsets as expected, and the offsets tile the body exactly."""
    metadata = header.pop(METADATA_KEY, None)
    # Standard writers may add string metadata such as {"format": "pt"}; it carries no tensor, so it is tolerated.
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise WireError(f"header {METADATA_KEY} must map strings to strings, got {metadata!r}")
    if set(header) != set(dtypes):
        missing = sorted(set(dtypes) - set(header))
        extra = sorted(set(header) - set(dtypes))
        raise WireError(
            f"header keys do not match: expected {sorted(dtypes)}, missing {missing}, unexpected {extra}"
        )

    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise WireError(
                f"tensor {name!r}: header entry must have dtype, shape and data_offsets, got {entry!r}"
            )
        expected_dtype = dtypes[name]
        expected_name = _safetensors_name(expected_dtype)
        if entry["dtype"] != expected_name:
            raise WireError(f"tensor {name!r}: expected dtype {expected_name}, got {entry['dtype']!r}")
        shape = entry["shape"]
        if not isinstance(shape, list) or not all(_is_count(dim) for dim in shape):
            raise WireError(f"tensor {name!r}: shape must be a list of non-negative integers, got {shape!r}")
        expected_shape = shapes[name]
        if expected_shape is not None and tuple(shape) != expected_shape:
            raise WireError(f"tensor {name!r}: expected shape {list(expected_shape)}, got {shape}")
        offsets = entry["data_offsets"]
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise WireError(
                f"tensor {name!r}: data_offsets must be two non-negative integers, got {offsets!r}"
            )
        begin, end = offsets
        nbytes = math.prod(shape) * expected_dtype.itemsize
        if end - begin != nbytes:
            raise WireError(
                f"tensor {name!r}: shape {shape} of {expected_name} needs {nbytes} bytes, "
                f"data_offsets {offsets} span {end - begin}"
            )
        spans.append((begin, end, name))

    # The spans must tile the body from 0 to its end with no gap or overlap: a truncated body, a header claiming
    # more data than arrived, or trailing bytes are all refused here.
    cursor = 0
    for begin, end, name in sorted(spans):
        if begin != cursor:
            raise WireError(f"tensor {name!r}: data starts at {begin}, expected {cursor} (gap or overlap)")
        cursor = end
    if cursor != body_bytes:
        raise WireError(
            f"header describes {cursor} data bytes but {body_bytes} arrived (truncated or padded)"
        )


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
