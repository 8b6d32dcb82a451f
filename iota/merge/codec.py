"""Pseudo-gradient codecs for the merge: every value at a few bits, or the largest values of each chunk.

A vector of n fp32 values is cut into chunks of CHUNK values (the last may be shorter), each with one fp32 scale.
- `int:B` (B = 4 or 8) sends every value as a B-bit integer multiple of the scale (the chunk's largest magnitude
  / (2^(B-1) - 1)), rounded to nearest; 4-bit values are packed two to a byte, low nibble first.
- `topk:D` keeps the kept(L) = ceil(D * L) largest magnitudes of a chunk of L values (ties: the lower index),
  each as its offset in the chunk (uint16, ascending) and an int8 multiple of the scale.
A chunk's bytes are: the scale (fp32), then (topk) the offsets, then the values. Their number depends on L only,
so the encoding of n values has a fixed size and chunk c sits at a fixed byte range: an owner of a partition
can read only its chunks.

What is not sent stays with the sender as its error feedback (`encode` returns it), added to the next epoch's
pseudo-gradient: nothing is lost, only delayed (SparseLoCo, DeMo). Every step is a sort, a gather or one
elementwise IEEE op, so the same input gives the same bytes on every machine and thread count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from iota.decoding import DecodeError

CHUNK = 4096  # values per chunk; offsets fit in uint16
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


@dataclass(frozen=True)
class Codec:
    """kind "int": every value at `bits` bits (4 or 8); kind "topk": a fraction `density` of each chunk, int8."""

    kind: str
    bits: int = 8
    density: float = 1.0

    def __post_init__(self) -> None:
        if self.kind == "int" and self.bits not in (4, 8):
            raise ValueError(f"int codec: bits must be 4 or 8, got {self.bits}")
        if self.kind == "topk" and (not math.isfinite(self.density) or not 0 < self.density <= 1):
            raise ValueError(f"topk codec: density must be in (0, 1], got {self.density}")
        if self.kind not in ("int", "topk") or (self.kind == "topk" and self.bits != 8):
            raise ValueError(f"unknown codec {self.kind!r} with {self.bits} bits")

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def kept(self, length: int) -> int:
        """Values sent of a chunk of `length` values."""
        return length if self.kind == "int" else max(1, math.ceil(self.density * length))

    def chunk_bytes(self, length: int) -> int:
        if self.kind == "int":
            return 4 + (length * self.bits + 7) // 8
        return 4 + 3 * self.kept(length)

    def encoded_size(self, n: int) -> int:
        """Bytes of the encoding of n values."""
        full, rest = divmod(n, CHUNK)
        return full * self.chunk_bytes(CHUNK) + (self.chunk_bytes(rest) if rest else 0)

    def byte_range(self, start: int, end: int) -> tuple[int, int]:
        """The bytes [lo, hi) encoding values [start, end); both must be chunk boundaries (end may be n)."""
        if start % CHUNK:
            raise ValueError(f"start {start} is not a multiple of the chunk size {CHUNK}")
        lo = self.encoded_size(start)
        return lo, lo + self.encoded_size(end - start)

    def __str__(self) -> str:
        return f"int:{self.bits}" if self.kind == "int" else f"topk:{self.density:g}"


def parse_codec(spec: str) -> Codec | None:
    """'none' -> None (dense fp32); 'int:4', 'int:8'; 'topk:D' with 0 < D <= 1."""
    if spec == "none":
        return None
    kind, _, value = spec.partition(":")
    try:
        if kind == "int":
            return Codec("int", bits=int(value))
        if kind == "topk":
            return Codec("topk", density=float(value))
    except ValueError as error:
        raise ValueError(f"merge codec {spec!r}: {error}") from None
    raise ValueError(f"unknown merge codec {spec!r}: expected 'none', 'int:4', 'int:8' or 'topk:DENSITY'")


def _chunks(n: int) -> list[tuple[int, int]]:
    return [(start, min(start + CHUNK, n)) for start in range(0, n, CHUNK)]


def encode(vector: torch.Tensor, codec: Codec) -> tuple[bytes, torch.Tensor]:
    """(the encoding of `vector`, what it leaves out: vector - decode(encoding)) for a 1-D fp32 vector."""
    if vector.dtype != torch.float32 or vector.dim() != 1:
        raise ValueError(f"encode takes a 1-D fp32 vector, got {vector.dtype} of shape {tuple(vector.shape)}")
    if not bool(torch.isfinite(vector).all()):
        raise ValueError("encode: the vector has non-finite values")
    vector = vector.contiguous()
    parts: list[bytes] = []
    sent = torch.zeros_like(vector)
    n = vector.numel()
    full = n // CHUNK * CHUNK
    if full:
        parts.append(_encode_block(vector[:full].view(-1, CHUNK), codec, sent[:full].view(-1, CHUNK)))
    if full < n:
        parts.append(_encode_block(vector[full:].view(1, -1), codec, sent[full:].view(1, -1)))
    return b"".join(parts), vector - sent


def _encode_block(rows: torch.Tensor, codec: Codec, sent: torch.Tensor) -> bytes:
    """Encode equal chunks (one per row) and write their decoded values into `sent` (same shape)."""
    if codec.kind == "int":
        offsets = torch.arange(rows.shape[1]).expand(rows.shape[0], -1)
    else:
        # A stable sort fixes the order of equal magnitudes by index, so the chosen set is the same everywhere.
        order = torch.sort(rows.abs(), dim=1, descending=True, stable=True).indices[
            :, : codec.kept(rows.shape[1])
        ]
        offsets = torch.sort(order, dim=1).values
    values = torch.gather(rows, 1, offsets)
    scale = values.abs().amax(dim=1) / codec.qmax  # amax is exact: no summation order to differ
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(values / safe[:, None]).clamp(-codec.qmax, codec.qmax).to(torch.int8)
    sent.scatter_(1, offsets, q.to(torch.float32) * scale[:, None])
    scales = scale.numpy().astype("<f4")
    if codec.kind == "int":
        body = _pack(q, codec.bits)
    else:
        offs = offsets.numpy().astype("<u2")
        qs = q.numpy()
        body = [offs[r].tobytes() + qs[r].tobytes() for r in range(rows.shape[0])]
    return b"".join(scales[r].tobytes() + body[r] for r in range(rows.shape[0]))


def _pack(q: torch.Tensor, bits: int) -> list[bytes]:
    """Each row of int8 values as bytes: as they are (8 bits) or two to a byte, low nibble first (4 bits)."""
    if bits == 8:
        return [bytes(row) for row in q.numpy()]
    nibbles = (q.to(torch.int16) & 0xF).to(torch.uint8)
    if nibbles.shape[1] % 2:
        nibbles = torch.nn.functional.pad(nibbles, (0, 1))
    packed = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    return [bytes(row) for row in packed.numpy()]


def _unpack(data: bytes, length: int, bits: int) -> torch.Tensor:
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if bits == 8:
        return raw.view(torch.int8)
    both = torch.stack([raw & 0xF, raw >> 4], dim=1).reshape(-1)[:length].to(torch.int16)
    return torch.where(both > 7, both - 16, both).to(torch.int8)


def decode(data: bytes, n: int, codec: Codec, start: int = 0) -> torch.Tensor:
    """The fp32 values [start, start + n) from their encoding `data` (start a chunk boundary); DecodeError for
    bytes that are not one: wrong size, a scale that is negative or would overflow, a value outside +-qmax, offsets
    out of range or not strictly ascending."""
    if start % CHUNK or n < 0:
        raise ValueError(f"decode: start {start} must be a chunk boundary and n {n} >= 0")
    expected = codec.encoded_size(n)
    if len(data) != expected:
        raise DecodeError(f"merge codec {codec}: {len(data)} bytes, expected {expected} for {n} values")
    out = torch.zeros(n, dtype=torch.float32)
    pos = 0
    for lo, hi in _chunks(n):
        length, k = hi - lo, codec.kept(hi - lo)
        chunk = data[pos : pos + codec.chunk_bytes(length)]
        pos += len(chunk)
        scale = float(torch.frombuffer(bytearray(chunk[:4]), dtype=torch.float32)[0])
        if not (math.isfinite(scale) and 0 <= scale <= FLOAT32_MAX / codec.qmax):
            raise DecodeError(f"merge codec {codec}: chunk at {start + lo} has scale {scale}")
        if codec.kind == "int":
            q = _unpack(chunk[4:], length, codec.bits)
            if bool((q.to(torch.int16).abs() > codec.qmax).any()):
                raise DecodeError(f"merge codec {codec}: chunk at {start + lo} has a value out of range")
            out[lo:hi] = q.to(torch.float32) * torch.tensor(scale, dtype=torch.float32)
            continue
        offsets = (
            torch.frombuffer(bytearray(chunk[4 : 4 + 2 * k]), dtype=torch.int16).to(torch.int32) & 0xFFFF
        )
        q = torch.frombuffer(bytearray(chunk[4 + 2 * k :]), dtype=torch.int8)
        if int(offsets[-1]) >= length or (k > 1 and not bool((offsets[1:] > offsets[:-1]).all())):
            raise DecodeError(f"merge codec {codec}: chunk at {start + lo} has offsets out of order or range")
        if bool((q.to(torch.int16).abs() > codec.qmax).any()):
            raise DecodeError(f"merge codec {codec}: chunk at {start + lo} has a value out of range")
        out[lo + offsets.to(torch.int64)] = q.to(torch.float32) * torch.tensor(scale, dtype=torch.float32)
    return out
