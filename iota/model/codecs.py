"""Activation codecs between stages: how an activation (forward) or its gradient (backward) is packed for the wire.

A run names its codec in one string (RunSettings.codec, served as RunInfo.codec), and every role builds the same
`Codec` from it: a miner encodes what it sends and decodes what it receives, a validator's replay encodes and
decodes the same way. The grammar is `""` (dense: the tensor itself, in the run's wire dtype, as before codecs
existed) or parts joined by "+", applied in this order:

- `lowrank:R`: the W channels that cross a boundary are projected onto a fixed random R-dimensional subspace
  (orthonormal columns, seeded from the run seed, the same on every role and boundary) and lifted back after
  receiving. Backward, the gradient is projected onto the same subspace: the receiver's input is x P P^T, so
  g P P^T is exactly the gradient of the sender's output, and sending g P loses nothing more.
- `int8`: per-token scaled int8. Each token's values are divided by max|x| / 127 (an fp32 scale per token) and
  rounded to an int8 code: to the nearest forward, stochastically backward (unbiased, seeded by
  iota.train.worker.rounding_seed like the bf16 gradient rounding, so a replay reproduces the exact bytes).
  Every value is then within one step, max|x| / 127, of what was sent.

The bottleneck (ModelConfig.bottleneck) is a learned layer of the model, not a codec: it sets W, and a codec acts
on those W channels. The payload is safetensors with the codec's name in its metadata under CODEC_KEY, and tensor
names of the codec's own ("t" dense, "lowrank" coefficients, "int8" codes and "int8.scale" scales), so a receiver
refuses a payload packed by any other codec (`CodecError`) before it builds a tensor.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

import safetensors.torch
import torch

from iota.model import wire

GRAMMAR = re.compile(r"(lowrank:[1-9][0-9]{0,6}(\+int8)?|int8)?")
"""The codec names a run may give (iota.config.settings keeps the same pattern: that layer may not import this)."""

CODEC_KEY = "iota.codec"
"""Metadata key of the payload that names the codec; absent on a dense payload."""

INT8_MAX = 127  # symmetric: -128 is never written, so a receiver refuses it

DENSE_KEY, LOWRANK_KEY, CODES_KEY, SCALES_KEY = wire.SINGLE_KEY, "lowrank", "int8", "int8.scale"


class CodecError(wire.WireError):
    """A payload packed by a codec other than the run's, or whose int8 codes or scales no encoder writes."""


@dataclass(frozen=True)
class CodecSpec:
    """A parsed codec name: the low-rank subspace's rank (None: none) and whether values travel as int8."""

    rank: int | None = None
    int8: bool = False

    @property
    def name(self) -> str:
        """The canonical name, as the wire records it."""
        parts = [f"lowrank:{self.rank}"] if self.rank is not None else []
        return "+".join(parts + (["int8"] if self.int8 else []))

    def check(self, width: int) -> None:
        """Raise a one-line ValueError if this codec cannot carry `width` channels."""
        if self.rank is not None and self.rank > width:
            raise ValueError(
                f"codec {self.name!r}: rank {self.rank} is more than the {width} channels sent between stages"
            )


def parse(name: str) -> CodecSpec:
    """The codec a run's config names; a one-line ValueError for anything else."""
    if not GRAMMAR.fullmatch(name):
        raise ValueError(
            f"unknown codec {name[:64]!r}: expected '' (dense), 'int8', 'lowrank:R' or 'lowrank:R+int8'"
        )
    rank = re.match(r"lowrank:(\d+)", name)
    return CodecSpec(rank=int(rank.group(1)) if rank else None, int8=name.endswith("int8"))


@functools.lru_cache(maxsize=8)
def subspace(width: int, rank: int, seed: int) -> torch.Tensor:
    """(width, rank) fp32 with orthonormal columns, a Haar-random subspace fixed by `seed`. Cached: do not modify.

    The Gaussian's generator is seeded from a hash of (seed, width, rank), so the subspace is not correlated with
    any weight initialised from the run seed. QR in float64 then cast: every role computes it alike to fp32.
    """
    digest = hashlib.sha256(f"iota.codec.lowrank:{seed}:{width}:{rank}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    gauss = torch.randn(width, rank, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(torch.float64)  # makes the QR unique (and Haar)
    return (q * signs).to(torch.float32).contiguous()


def quantize_int8(x: torch.Tensor, rounding_seed: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., C) fp32 -> int8 codes (..., C) and fp32 scales (..., 1), codes * scales ~ x per token.

    `rounding_seed`: round stochastically (each value up with the probability of its distance from the code
    below) from a generator with this seed; None: to the nearest code.
    """
    scales = x.abs().amax(dim=-1, keepdim=True) / INT8_MAX  # (..., 1)
    steps = x / torch.where(scales > 0, scales, 1.0)  # in [-127, 127] up to the division's rounding
    if rounding_seed is None:
        rounded = torch.round(steps)
    else:
        gen = torch.Generator().manual_seed(rounding_seed)
        rounded = torch.floor(steps + torch.rand(x.shape, generator=gen, dtype=torch.float32))
    return rounded.clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scales


class Codec:
    """A run's codec bound to the activation shape of its boundaries, (B, T, W), and its wire dtype."""

    def __init__(self, spec: CodecSpec, shape: tuple[int, ...], dtype: torch.dtype, seed: int):
        spec.check(shape[-1])
        self.spec, self.shape, self.dtype = spec, tuple(shape), dtype
        self.basis = subspace(shape[-1], spec.rank, seed) if spec.rank is not None else None  # (W, R)
        sent = (*self.shape[:-1], spec.rank if spec.rank is not None else shape[-1])  # (B, T, R or W)
        self.expected: dict[str, tuple[tuple[int, ...] | None, torch.dtype]]
        if spec.int8:
            self.expected = {CODES_KEY: (sent, torch.int8), SCALES_KEY: ((*sent[:-1], 1), torch.float32)}
        else:
            self.expected = {LOWRANK_KEY if spec.rank is not None else DENSE_KEY: (sent, dtype)}
        self.size = self._size(sent)
        """Exact bytes of every payload: the most a receiver accepts, and what a hop puts on the wire."""

    @property
    def name(self) -> str:
        return self.spec.name

    def _size(self, sent: tuple[int, ...]) -> int:
        if not self.spec.name:
            return wire.encoded_size(sent, self.dtype)
        # The header's length depends only on the names, shapes and dtypes: write zeros of what the codec sends.
        zeros = {
            name: torch.zeros(shape or (), dtype=dtype) for name, (shape, dtype) in self.expected.items()
        }
        return len(safetensors.torch.save(zeros, metadata={CODEC_KEY: self.spec.name}))

    # -- tensors: any leading shape, so a one-process study runs the same code as the wire ------------------

    def pack(self, x: torch.Tensor, rounding_seed: int | None = None) -> dict[str, torch.Tensor]:
        """(..., W) -> the named tensors that travel: CPU, contiguous, in their wire dtypes."""
        values = x.detach().to(device="cpu", dtype=torch.float32)
        if self.basis is not None:
            values = values @ self.basis  # (..., R)
        if self.spec.int8:
            codes, scales = quantize_int8(values, rounding_seed)
            return {CODES_KEY: codes.contiguous(), SCALES_KEY: scales.contiguous()}
        key = LOWRANK_KEY if self.basis is not None else DENSE_KEY
        return {key: wire.cast(values, self.dtype, rounding_seed)}

    def unpack(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The named tensors of `pack` -> (..., W) fp32. Codes and scales no encoder writes are a CodecError."""
        if self.spec.int8:
            codes, scales = tensors[CODES_KEY], tensors[SCALES_KEY]
            if codes.numel() and int(codes.min()) < -INT8_MAX:
                raise CodecError(f"int8 code {int(codes.min())}: codes are in [-{INT8_MAX}, {INT8_MAX}]")
            if scales.numel() and float(scales.min()) < 0:
                raise CodecError("a negative int8 scale: scales are a token's max |value| / 127")
            values = codes.float() * scales
            if not bool(torch.isfinite(values).all()):  # a huge scale overflows fp32
                raise CodecError("int8 codes times their scales overflow fp32")
        else:
            values = next(iter(tensors.values())).float()
        return values @ self.basis.T if self.basis is not None else values

    def roundtrip(self, x: torch.Tensor, rounding_seed: int | None = None) -> torch.Tensor:
        """What a receiver gets for `x`, without the bytes: (..., W) -> (..., W) fp32 on x's device."""
        return self.unpack(self.pack(x, rounding_seed)).to(x.device)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """`x` restricted to what the codec can carry at all (its subspace), with no rounding: (..., W) fp32."""
        values = x.detach().float()
        if self.basis is None:
            return values
        basis = self.basis.to(values.device)
        return values @ basis @ basis.T

    # -- bytes -----------------------------------------------------------------------------------------------

    def encode(self, x: torch.Tensor, rounding_seed: int | None = None) -> bytes:
        """(B, T, W) -> a payload. Dense writes exactly what wire.encode writes (no metadata)."""
        if not self.spec.name:
            return wire.encode(x, self.dtype, rounding_seed=rounding_seed)
        return safetensors.torch.save(self.pack(x, rounding_seed), metadata={CODEC_KEY: self.spec.name})

    def decode(self, data: bytes) -> torch.Tensor:
        """A payload -> (B, T, W) fp32, if it is this codec's of exactly this shape; else a WireError (CodecError
        when another codec packed it). Bounded: nothing is built before the size and header are checked."""
        try:
            payload = wire.parse(data, max_bytes=self.size, max_header_bytes=wire.header_limit(self.expected))
        except wire.WireError as error:  # a dense payload in a compressed run is refused here, by its size
            raise wire.WireError(f"not a codec {self.spec.name!r} payload: {error}") from None
        codec = payload.metadata.get(CODEC_KEY, "")
        if codec != self.spec.name:
            raise CodecError(f"payload packed by codec {codec[:64]!r}, the run's is {self.spec.name!r}")
        return wire.bounded(self.unpack(payload.tensors(self.expected)))


@functools.lru_cache(maxsize=16)
def build(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> Codec:
    """The codec `name` for activations of `shape` in `dtype`, in the run seeded `seed`. Cached: one per run."""
    return Codec(parse(name), shape, dtype, seed)
