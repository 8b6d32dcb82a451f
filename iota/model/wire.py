"""Tensor wire format: safetensors bytes, checked against what the receiver expects before any tensor is built."""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import safetensors.torch
import torch

from iota.decoding import DecodeError, load_json

SINGLE_KEY = "t"
"""The one key under which `encode` stores its tensor."""

METADATA_KEY = "__metadata__"

HEADER_BYTES_PER_ENTRY = 320
"""Header bytes an entry may take besides its name: {"dtype":"BF16","shape":[...],"data_offsets":[a,b]} with
MAX_DIMS dimensions and two offsets of 20 digits each is under 300. A receiver knows the names it expects, so a
header is bounded before it is read: a single activation's by 1.3 KiB, not by what the sender claims."""

HEADER_METADATA_BYTES = 1024
"""Room for the string metadata standard writers add ({"format": "pt"})."""

MAX_DIMS = 8
"""Dimensions a tensor may have on the wire: an activation has 3, a parameter at most 2."""

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
}  # no BOOL: a bool is one byte whose values other than 0 and 1 mean nothing torch can promise
_TORCH_DTYPES = {name: dtype for dtype, name in _SAFETENSORS_NAMES.items()}

# Protocol 2+ pickles start with PROTO (0x80); torch.save files are zip archives. Named in errors to help senders.
_PICKLE_PROTO = b"\x80"
_ZIP_MAGIC = b"PK\x03\x04"


class WireError(DecodeError):
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
    return safetensors.torch.save(
        {SINGLE_KEY: cast(tensor, tensor.dtype if dtype is None else dtype, rounding_seed)}
    )


def cast(tensor: torch.Tensor, dtype: torch.dtype, rounding_seed: int | None = None) -> torch.Tensor:
    """`tensor` as it travels in `dtype`: on CPU, contiguous; to bf16 by stochastic rounding when `rounding_seed`
    is given (`round_bf16_stochastic`), else to the nearest value."""
    _safetensors_name(dtype)
    if dtype == torch.bfloat16 and rounding_seed is not None:
        return round_bf16_stochastic(tensor, rounding_seed)
    return tensor.detach().to(device="cpu", dtype=dtype).contiguous()


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


# The largest magnitude an activation or gradient on the wire may hold. Finite values near the float maximum
# pass a finiteness check, yet overflow in the receiver's compute: an honest stage would then send Inf onward and
# be blamed for it, and its weights would take a NaN step. Honest residual streams stay far below this (the
# "massive activations" of 7B-70B models are ~1e3-1e4); gradients are smaller still.
MAX_ABS = 2.0**16


def decode(data: bytes, *, dtype: torch.dtype, shape: tuple[int, ...] | None, max_bytes: int) -> torch.Tensor:
    """The activation or gradient `encode` wrote, if it has exactly this dtype and shape (None: any shape), is
    finite and within MAX_ABS."""
    expected = {SINGLE_KEY: (None if shape is None else tuple(shape), dtype)}
    return bounded(_decode(data, expected, max_bytes)[SINGLE_KEY])


def bounded(tensor: torch.Tensor) -> torch.Tensor:
    """An activation or gradient received, if every value is within MAX_ABS; else a WireError."""
    if tensor.is_floating_point() and tensor.numel() and float(tensor.abs().max()) > MAX_ABS:
        raise WireError(f"tensor holds values beyond +-{MAX_ABS:g}, which no honest stage sends")
    return tensor


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
    return _decode(
        data, {name: (tuple(shape), dtype) for name, (shape, dtype) in expected.items()}, max_bytes
    )


def header_limit(names: Iterable[str]) -> int:
    """The largest header a payload of these tensor names may have: an entry's dtype, shape and offsets, however
    large its numbers, fit in HEADER_BYTES_PER_ENTRY bytes besides its name, and standard string metadata
    ({"format": "pt"}) in HEADER_METADATA_BYTES."""
    return HEADER_METADATA_BYTES + sum(HEADER_BYTES_PER_ENTRY + len(name.encode()) for name in names)


@dataclass(frozen=True)
class Entry:
    """One tensor as its header describes it: bytes [begin, end) of the body."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Payload:
    """A safetensors payload whose header checks out on its own: every entry of a dtype the wire carries, a shape
    whose size is exactly its byte span, the spans tiling the body. No tensor is built until `tensors`."""

    metadata: dict[str, str]
    entries: dict[str, Entry]
    body: memoryview

    def tensors(
        self, expected: Mapping[str, tuple[tuple[int, ...] | None, torch.dtype]]
    ) -> dict[str, torch.Tensor]:
        """The tensors, if their names are exactly `expected`'s, each of its dtype and shape (None: any shape), and
        finite; each is built from its own copy of its bytes."""
        if set(self.entries) != set(expected):
            missing = sorted(set(expected) - set(self.entries))
            extra = sorted(set(self.entries) - set(expected))[:8]
            raise WireError(
                f"header keys do not match: expected {sorted(expected)}, missing {missing}, unexpected {extra}"
            )
        tensors = {}
        for name, (shape, dtype) in expected.items():
            entry = self.entries[name]
            if entry.dtype != dtype:
                got = _SAFETENSORS_NAMES[entry.dtype]
                raise WireError(f"tensor {name!r}: expected dtype {_safetensors_name(dtype)}, got {got!r}")
            if shape is not None and entry.shape != tuple(shape):
                raise WireError(f"tensor {name!r}: expected shape {list(shape)}, got {list(entry.shape)}")
            tensors[name] = self._build(name, entry)
        return tensors

    def _build(self, name: str, entry: Entry) -> torch.Tensor:
        if entry.begin == entry.end:  # no values; torch.frombuffer refuses an empty buffer
            return torch.zeros(entry.shape, dtype=entry.dtype)
        values = torch.frombuffer(bytearray(self.body[entry.begin : entry.end]), dtype=entry.dtype)
        if values.is_floating_point() and not bool(torch.isfinite(values).all()):
            raise WireError(f"tensor {name!r} contains NaN or Inf")
        return values.reshape(entry.shape)


def parse(data: bytes | bytearray | memoryview, *, max_bytes: int, max_header_bytes: int) -> Payload:
    """A safetensors payload of at most `max_bytes`, its header at most `max_header_bytes`, checked on its own.

    Parsed here, not by safetensors: every size is bounded before anything is allocated, the JSON depth before it is
    parsed (iota.decoding.load_json), and one parser decides what the payload says, not two that might disagree.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError(f"expected bytes, got {type(data).__name__}")
    view = memoryview(data).cast("B")
    size = len(view)
    # The size is checked first: an oversized body is refused before a byte of it is interpreted.
    if size > max_bytes:
        raise WireError(f"payload is {size} bytes, more than the {max_bytes} bytes allowed")
    if size < 8:
        raise WireError(f"payload is {size} bytes: too short for a safetensors header")
    header_len = int.from_bytes(view[:8], "little")
    if header_len > size - 8 or header_len > max_header_bytes or header_len < 2:
        hint = ""
        if view[:1] == _PICKLE_PROTO:
            hint = " (it starts like a pickle, which is never accepted)"
        elif view[:4] == _ZIP_MAGIC:
            hint = " (it is a zip archive, as torch.save writes, which is never accepted)"
        raise WireError(
            f"not a safetensors payload{hint}: header length {header_len} does not fit in {size} bytes "
            f"(limit {max_header_bytes})"
        )
    try:
        header = load_json(view[8 : 8 + header_len], max_bytes=header_len, max_depth=3, what="header")
    except DecodeError as error:
        raise WireError(f"not a safetensors payload: {error}") from None
    if not isinstance(header, dict):
        raise WireError(
            f"not a safetensors payload: header is a JSON {type(header).__name__}, expected an object"
        )
    metadata = header.pop(METADATA_KEY, {})
    # Standard writers may add string metadata such as {"format": "pt"}; it carries no tensor, so it is tolerated.
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise WireError(f"header {METADATA_KEY} must map strings to strings, got {_show(metadata)}")
    body = view[8 + header_len :]
    entries = {name: _entry(name, value) for name, value in header.items()}
    _check_tiling(entries, len(body))
    return Payload(metadata, entries, body)


def _decode(
    data: bytes, expected: Mapping[str, tuple[tuple[int, ...] | None, torch.dtype]], max_bytes: int
) -> dict[str, torch.Tensor]:
    payload = parse(data, max_bytes=max_bytes, max_header_bytes=header_limit(expected))
    return payload.tensors(expected)


def _safetensors_name(dtype: torch.dtype) -> str:
    try:
        return _SAFETENSORS_NAMES[dtype]
    except KeyError:
        raise WireError(f"dtype {dtype} cannot travel on the wire") from None


def _entry(name: str, value: object) -> Entry:
    """One header entry, its dtype known, its shape at most MAX_DIMS counts and its offsets exactly its size."""
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
        raise WireError(
            f"tensor {name!r}: header entry must have dtype, shape and data_offsets, got {_show(value)}"
        )
    dtype_name, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    dtype = _TORCH_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise WireError(f"tensor {name!r}: dtype {_show(dtype_name)} is not one the wire carries")
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(_is_count(dim) for dim in shape)):
        raise WireError(
            f"tensor {name!r}: shape must be a list of at most {MAX_DIMS} non-negative integers, got {_show(shape)}"
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise WireError(
            f"tensor {name!r}: data_offsets must be two non-negative integers, got {_show(offsets)}"
        )
    begin, end = offsets
    nbytes = math.prod(shape) * dtype.itemsize  # exact: Python integers, and at most MAX_DIMS of them
    if end - begin != nbytes:
        raise WireError(
            f"tensor {name!r}: shape {shape} of {dtype_name} needs {nbytes} bytes, data_offsets {offsets} span "
            f"{end - begin}"
        )
    return Entry(dtype, tuple(shape), begin, end)


def _check_tiling(entries: Mapping[str, Entry], body_bytes: int) -> None:
    """The spans must tile the body from 0 to its end with no gap or overlap: a truncated body, a header claiming
    more data than arrived (a shape of 2**40 values in a small payload), or trailing bytes are all refused here."""
    cursor = 0
    for begin, end, name in sorted((e.begin, e.end, name) for name, e in entries.items()):
        if begin != cursor:
            raise WireError(f"tensor {name!r}: data starts at {begin}, expected {cursor} (gap or overlap)")
        cursor = end
    if cursor != body_bytes:
        raise WireError(
            f"header describes {cursor} data bytes but {body_bytes} arrived (truncated or padded)"
        )


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _show(value: object) -> str:
    """A value from a header, for an error message: its repr, cut short (a hostile one may be kilobytes)."""
    text = repr(value)
    return text if len(text) <= 120 else text[:120] + "..."
