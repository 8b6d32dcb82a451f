"""One committed hop of one miner as a record (its report's fields and the objects it named), and a file of
such records: safetensors, objects as uint8 tensors and fields as JSON metadata, never pickle."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import safetensors.torch
import torch

from iota.decoding import load_json
from iota.model import wire

Direction = Literal["forward", "backward"]

MAX_RECORDS = 10_000
"""Records one file may hold: an audit replays at most a few hundred hops."""

# Each record's fields in the file's JSON metadata, in this order.
_FIELDS = ("epoch", "stage", "direction", "sample_id", "inner_step", "loss")
MAX_HEADER_BYTES = MAX_RECORDS * (256 + 2 * (wire.HEADER_BYTES_PER_ENTRY + 16))
"""A header of MAX_RECORDS records: each one's JSON fields and the entries of its two objects."""


@dataclass(frozen=True)
class HopRecord:
    """One committed hop of one miner, as its report and the bucket hold it."""

    epoch: int
    stage: int
    direction: Direction
    sample_id: int
    inner_step: int  # as reported: the miner's inner step after the hop and any step the hop completed
    input: bytes | None  # the object the miner downloaded (None for the head's forward: it reads tokens)
    output: (
        bytes | None
    )  # the object it uploaded (None for the head's backward); the tail's is its input grad
    loss: float | None = None  # the tail's reported loss


def encode_records(records: Sequence[HopRecord]) -> bytes:
    """Records as one safetensors file (objects as uint8 tensors, fields as JSON metadata): no pickle."""
    tensors: dict[str, torch.Tensor] = {}
    fields = []
    for i, record in enumerate(records):
        for name in ("input", "output"):
            data: bytes | None = getattr(record, name)
            if data is not None:
                tensors[f"{i}.{name}"] = (
                    torch.frombuffer(bytearray(data), dtype=torch.uint8)
                    if data
                    else torch.empty(0, dtype=torch.uint8)
                )
        fields.append({name: getattr(record, name) for name in _FIELDS})
    return safetensors.torch.save(tensors, metadata={"records": json.dumps(fields)})


def decode_records(data: bytes) -> list[HopRecord]:
    """The records `encode_records` wrote; any other bytes are a DecodeError.

    The bytes are in memory already: what is bounded is what is built from them, the header (MAX_RECORDS records'
    fields and objects), the records' JSON, and one copy of each object."""
    payload = wire.parse(data, max_bytes=len(data), max_header_bytes=MAX_HEADER_BYTES)
    records_json = payload.metadata.get("records")
    if records_json is None:
        raise wire.WireError("records: the header's metadata has no records")
    fields = load_json(records_json, max_bytes=MAX_HEADER_BYTES, max_depth=2, what="records")
    if not isinstance(fields, list) or len(fields) > MAX_RECORDS:
        raise wire.WireError(f"records: expected a list of at most {MAX_RECORDS} records")
    objects = {f"{i}.{name}" for i in range(len(fields)) for name in ("input", "output")}
    for key, entry in payload.entries.items():
        if key not in objects or entry.dtype != torch.uint8 or len(entry.shape) != 1:
            raise wire.WireError(f"records: {key!r} is not the bytes of a record's input or output")

    def object_bytes(key: str) -> bytes | None:
        entry = payload.entries.get(key)
        return None if entry is None else bytes(payload.body[entry.begin : entry.end])

    return [
        _record(i, f, object_bytes(f"{i}.input"), object_bytes(f"{i}.output")) for i, f in enumerate(fields)
    ]


def _record(index: int, fields: object, input: bytes | None, output: bytes | None) -> HopRecord:
    """One record from its JSON fields, each of its type: an int is no bool, a loss finite or absent."""
    if not isinstance(fields, dict) or set(fields) != set(_FIELDS):
        raise wire.WireError(f"records: record {index} must have exactly the fields {list(_FIELDS)}")
    counts = [fields[name] for name in ("epoch", "stage", "sample_id", "inner_step")]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
        raise wire.WireError(f"records: record {index} has a count that is not a non-negative integer")
    direction, loss = fields["direction"], fields["loss"]
    if direction not in ("forward", "backward"):
        raise wire.WireError(f"records: record {index} has direction {direction!r}")
    if loss is not None and (isinstance(loss, bool) or not isinstance(loss, int | float)):
        raise wire.WireError(f"records: record {index} has a loss that is not a number")
    epoch, stage, sample_id, inner_step = counts
    loss = None if loss is None else float(loss)
    return HopRecord(epoch, stage, direction, sample_id, inner_step, input, output, loss)
