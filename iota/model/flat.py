"""One stage's weights as one flat fp32 vector, parameters in sorted-name order: the layout the merge partitions,
checkpoints store, snapshots carry and digests cover; and that vector as bytes (raw little-endian float32)."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable, Mapping, MutableMapping

import torch

from iota.decoding import DecodeError

# The bytes are little-endian float32 on every host; torch's own buffers are native-endian, so say so plainly.
if sys.byteorder != "little":
    raise ImportError("iota's flat fp32 layout assumes a little-endian host")

Tensors = torch.nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


def named(tensors: Tensors) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs in sorted-name order: the one order every replica, checkpoint and snapshot agrees on."""
    items: dict[str, torch.Tensor] = {}
    if isinstance(tensors, torch.nn.Module):
        items.update(tensors.named_parameters())
    else:
        items.update(tensors)
    return sorted(items.items(), key=lambda item: item[0])


def parameters(model: torch.nn.Module) -> list[torch.Tensor]:
    """A module's parameters in the flat layout's order."""
    return [p for _, p in named(model)]


def size(model: torch.nn.Module) -> tuple[int, int]:
    """(values, tensors) of the flat layout of `model` (a meta-device model costs nothing to measure)."""
    params = parameters(model)
    return sum(p.numel() for p in params), len(params)


def flatten(tensors: Tensors) -> torch.Tensor:
    """All tensors as one fp32 vector on the CPU, concatenated in sorted-name order."""
    parts = [t.detach().to(device="cpu", dtype=torch.float32).reshape(-1) for _, t in named(tensors)]
    if not parts:
        raise ValueError("flatten needs at least one tensor")
    return torch.cat(parts)


def unflatten_into(target: torch.nn.Module | MutableMapping[str, torch.Tensor], flat: torch.Tensor) -> None:
    """Copy `flat` back into a module's parameters (or a dict of tensors), in place, in sorted-name order.

    Each tensor keeps its own dtype and device; `flat` must have exactly as many elements as the tensors together,
    which is checked before anything is copied.
    """
    tensors = named(target)
    total = sum(t.numel() for _, t in tensors)
    if flat.dim() != 1 or flat.numel() != total:
        raise ValueError(f"flat vector has shape {tuple(flat.shape)}, the tensors need ({total},)")
    offset = 0
    with torch.no_grad():
        for _, tensor in tensors:
            n = tensor.numel()
            tensor.copy_(flat[offset : offset + n].view(tensor.shape))
            offset += n


def encode_f32(vector: torch.Tensor) -> bytes:
    """A 1-D fp32 tensor as raw little-endian float32 bytes."""
    if vector.dim() != 1 or vector.dtype != torch.float32:
        raise ValueError(f"expected a 1-D fp32 tensor, got {vector.dtype} of shape {tuple(vector.shape)}")
    return _bytes(vector)


def decode_f32(data: bytes, count: int | None = None) -> torch.Tensor:
    """Raw little-endian float32 bytes as a 1-D fp32 tensor (a copy, writable); with `count`, exactly that many
    values. Any other bytes are a DecodeError, raised before anything is allocated. Values are not checked: NaN
    and Inf are what the caller decides about (the merge skips such a slice, an audit fails it)."""
    expected = 4 * count if count is not None else None
    if expected is not None and len(data) != expected:
        raise DecodeError(f"{len(data)} bytes, expected {expected} ({count} float32 values)")
    if len(data) % 4:
        raise DecodeError(f"{len(data)} bytes is not a whole number of float32 values")
    if not data:
        return torch.zeros(0)
    return torch.frombuffer(bytearray(data), dtype=torch.float32)


def sha256(tensors: Tensors) -> str:
    """sha256 of `encode_f32(flatten(tensors))`, computed tensor by tensor so a large stage is never copied whole."""
    digest = hashlib.sha256()
    for _, tensor in named(tensors):
        digest.update(_bytes(tensor.detach().to(device="cpu", dtype=torch.float32).reshape(-1)))
    return digest.hexdigest()


def _bytes(vector: torch.Tensor) -> bytes:
    return vector.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
