"""One committed hop of one miner as a record (its report's fields and the objects it named), and a file of
such records: safetensors, objects as uint8 tensors and fields as JSON metadata, never pickle."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import safetensors.torch
import torch

Direction = Literal["forward", "backward"]


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
        fields.append(
            {
                "epoch": record.epoch,
                "stage": record.stage,
                "direction": record.direction,
                "sample_id": record.sample_id,
                "inner_step": record.inner_step,
                "loss": record.loss,
            }
        )
    return safetensors.torch.save(tensors, metadata={"records": json.dumps(fields)})


def decode_records(data: bytes) -> list[HopRecord]:
    tensors = safetensors.torch.load(data)
    fields = _metadata(data)
    records = []
    for i, f in enumerate(fields):
        objects = {name: tensors.get(f"{i}.{name}") for name in ("input", "output")}
        loss = f["loss"]
        records.append(
            HopRecord(
                epoch=int(f["epoch"]),
                stage=int(f["stage"]),
                direction=f["direction"],
                sample_id=int(f["sample_id"]),
                inner_step=int(f["inner_step"]),
                input=None if objects["input"] is None else objects["input"].numpy().tobytes(),
                output=None if objects["output"] is None else objects["output"].numpy().tobytes(),
                loss=None if loss is None else float(loss),
            )
        )
    return records


def _metadata(data: bytes) -> list[dict]:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return list(json.loads(header["__metadata__"]["records"]))
