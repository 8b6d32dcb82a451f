"""The checkpoint manifest, and a stage's tensors named by it (their flat layout is iota.model.flat's).

A bucket checkpoint (written by the orchestrator) and a local checkpoint directory share one manifest; a bucket
stage entry names its flat object ("key"), a local one its safetensors file ("file").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from iota.data.plan import DataPlan
from iota.decoding import DecodeError, load_json
from iota.model.config import ModelConfig
from iota.model.flat import decode_f32, named
from iota.model.llama import Llama
from iota.model.stages import StageSpec
from iota.train.schedule import LRSchedule

FORMAT = "iota-checkpoint/1"
MANIFEST_FILE = "manifest.json"

TensorList = list[list[Any]]  # [[name, [dim, ...]], ...] sorted by name: JSON-able


MAX_MANIFEST_BYTES = 16 * 1024 * 1024
"""A manifest lists every stage's tensors (~60 bytes each, a few hundred a stage): megabytes at the very most."""

MAX_MANIFEST_DEPTH = 8
"""JSON nesting of a manifest: stages, a stage, its tensor list, a tensor, its shape is 5 levels."""


class CheckpointError(DecodeError):
    """A checkpoint that is missing, incomplete, corrupted, or not what the caller asked for: a DecodeError (so a
    ValueError), since the bytes it refuses come from a store that others write to."""


def tensor_list(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> TensorList:
    """[[name, shape], ...] of a model's parameters (or a state dict's tensors), sorted by name."""
    return [[name, list(tensor.shape)] for name, tensor in named(model_or_state)]


def n_params(tensors: Sequence[Sequence[Any]]) -> int:
    return sum(math.prod(shape) for _, shape in tensors)


def flat_to_state(flat: torch.Tensor, tensors: Sequence[Sequence[Any]]) -> dict[str, torch.Tensor]:
    """The named tensors of a flat vector laid out as `tensors` says; each is its own copy (not a view)."""
    expected = n_params(tensors)
    if flat.dim() != 1 or flat.numel() != expected:
        raise CheckpointError(
            f"flat vector of shape {tuple(flat.shape)} does not hold the {expected} values its tensor list names"
        )
    state = {}
    offset = 0
    for name, shape in sorted(tensors, key=lambda item: item[0]):
        size = math.prod(shape)
        state[name] = flat[offset : offset + size].reshape(shape).to(torch.float32).clone()
        offset += size
    return state


def decode_flat(data: bytes, count: int | None = None) -> torch.Tensor:
    """A stage's flat object as a 1-D fp32 tensor (of `count` values, if given); any other bytes are a
    CheckpointError."""
    try:
        return decode_f32(data, count)
    except DecodeError as error:
        raise CheckpointError(str(error)) from error


def load_manifest(raw: bytes, where: str) -> dict[str, Any]:
    """A manifest's bytes as a JSON object, bounded (MAX_MANIFEST_BYTES, MAX_MANIFEST_DEPTH), else a
    CheckpointError; `parse_manifest` then checks what it says."""
    try:
        manifest = load_json(raw, max_bytes=MAX_MANIFEST_BYTES, max_depth=MAX_MANIFEST_DEPTH, what=where)
    except DecodeError as error:
        raise CheckpointError(f"not a manifest: {error}") from error
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{where}: a manifest is a JSON object, not a {type(manifest).__name__}")
    return manifest


def expected_tensors(model: ModelConfig, spec: StageSpec) -> TensorList:
    """The tensor list a stage of this model has, from a model built without memory."""
    with torch.device("meta"):
        return tensor_list(Llama(model, spec))


def stage_tensor_lists(model: ModelConfig, stages: Sequence[StageSpec]) -> list[TensorList]:
    """`expected_tensors` of every stage: the `tensors_per_stage` argument of `bucket_manifest`."""
    return [expected_tensors(model, spec) for spec in stages]


def base_manifest(
    run_id: str,
    epoch: int,
    model: ModelConfig,
    stages: Sequence[StageSpec],
    tokens_trained: int,
    data_plan: DataPlan | Mapping[str, Any],
    schedule: LRSchedule | Mapping[str, Any],
    data_cursor: int,
    tokenizer_kind: str,
    tokenizer_digest: str,
    momentum: Mapping[Any, Mapping[Any, str]] | None = None,
    preset: str | None = None,
) -> dict[str, Any]:
    """Every manifest field, with stage entries holding only their layers: what `write_local_checkpoint` needs
    to save models directly (it fills in each stage's tensors, size and sha256 from the weights)."""
    _check_stages(stages)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "run_id": run_id,
        "epoch": int(epoch),
        "model": model.to_dict(),
        "stages": [
            {"index": s.index, "first_layer": s.first_layer, "last_layer": s.last_layer} for s in stages
        ],
        # JSON object keys are strings; normalise here so a manifest reads the same before and after a round trip.
        "momentum": {
            str(stage): {str(part): key for part, key in parts.items()}
            for stage, parts in (momentum or {}).items()
        },
        "tokens_trained": int(tokens_trained),
        "data": data_plan.to_dict() if isinstance(data_plan, DataPlan) else dict(data_plan),
        "schedule": schedule.to_dict() if isinstance(schedule, LRSchedule) else dict(schedule),
        "data_cursor": int(data_cursor),
        "tokenizer": {"kind": tokenizer_kind, "digest": tokenizer_digest},
    }
    if preset is not None:
        manifest["preset"] = preset
    return manifest


def bucket_manifest(
    run_id: str,
    epoch: int,
    model: ModelConfig,
    stages: Sequence[StageSpec],
    stage_keys: Sequence[str],
    stage_shas: Sequence[str],
    tensors_per_stage: Sequence[Sequence[Sequence[Any]]],
    momentum: Mapping[Any, Mapping[Any, str]] | None,
    tokens_trained: int,
    data_plan: DataPlan | Mapping[str, Any],
    schedule: LRSchedule | Mapping[str, Any],
    data_cursor: int,
    tokenizer_kind: str,
    tokenizer_digest: str,
    preset: str | None = None,
) -> dict[str, Any]:
    """The manifest the orchestrator writes (last) at `keys.checkpoint_manifest(run_id, epoch)`.

    `stage_keys[s]` holds stage s's flat fp32 vector, whose bytes hash to `stage_shas[s]`; `tensors_per_stage[s]`
    is its `tensor_list` (see `stage_tensor_lists`). `momentum` maps stage -> partition -> key of the outer
    momentum slice (empty at epoch 0).
    """
    counts = {len(stage_keys), len(stage_shas), len(tensors_per_stage)}
    if counts != {len(stages)}:
        raise CheckpointError(
            f"{len(stages)} stages need as many keys, sha256s and tensor lists; got {len(stage_keys)}, "
            f"{len(stage_shas)} and {len(tensors_per_stage)}"
        )
    manifest = base_manifest(
        run_id, epoch, model, stages, tokens_trained, data_plan, schedule, data_cursor,
        tokenizer_kind, tokenizer_digest, momentum, preset,
    )  # fmt: skip
    for entry, key, sha, tensors in zip(
        manifest["stages"], stage_keys, stage_shas, tensors_per_stage, strict=True
    ):
        entry.update(stage_entry_fields(tensors, sha))
        entry["key"] = key
    return manifest


def stage_entry_fields(tensors: Sequence[Sequence[Any]], sha256: str) -> dict[str, Any]:
    """The per-stage fields both formats share besides the layers: sha256, n_params and the tensor list."""
    listed = sorted(
        ([str(name), [int(d) for d in shape]] for name, shape in tensors), key=lambda item: str(item[0])
    )
    return {"sha256": sha256, "n_params": n_params(listed), "tensors": listed}


def parse_manifest(manifest: Mapping[str, Any], where: str) -> tuple[ModelConfig, list[StageSpec]]:
    """The model config and stage specs a manifest describes, after checking its format and stage plan."""
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{where}: format {manifest.get('format')!r} is not {FORMAT!r}")
    missing = [f for f in ("run_id", "epoch", "model", "stages", "tokenizer") if f not in manifest]
    if missing:
        raise CheckpointError(f"{where}: manifest lacks {missing}")
    try:
        config = ModelConfig.from_dict(manifest["model"])
        entries = manifest["stages"]
        stages = [
            StageSpec(index=int(e["index"]), n_stages=len(entries), first_layer=int(e["first_layer"]),
                      last_layer=int(e["last_layer"]))
            for e in entries
        ]  # fmt: skip
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: malformed manifest: {e}") from e
    _check_stages(stages, config)
    _check_fields(manifest, where)
    return config, stages


def _check_fields(manifest: Mapping[str, Any], where: str) -> None:
    """The types of the fields a reader uses as they are, so that a malformed one is refused here, by name."""
    problems = []
    if not isinstance(manifest["run_id"], str):
        problems.append("run_id is not a string")
    if not _is_count(manifest["epoch"]):
        problems.append("epoch is not a non-negative integer")
    tokenizer = manifest["tokenizer"]
    if not (
        isinstance(tokenizer, dict) and all(isinstance(tokenizer.get(f), str) for f in ("kind", "digest"))
    ):
        problems.append("tokenizer is not {kind, digest} strings")
    for index, entry in enumerate(manifest["stages"]):
        tensors = entry.get("tensors", [])
        if not (isinstance(tensors, list) and all(_is_tensor_item(item) for item in tensors)):
            problems.append(f"stage {index}: tensors is not a list of [name, shape]")
        for name, check in _ENTRY_FIELD_CHECKS.items():
            if name in entry and not check(entry[name]):
                problems.append(f"stage {index}: {name} is of the wrong type")
    if problems:
        raise CheckpointError(f"{where}: malformed manifest: {'; '.join(problems[:4])}")


def _is_tensor_item(item: object) -> bool:
    return (
        isinstance(item, list)
        and len(item) == 2
        and isinstance(item[0], str)
        and isinstance(item[1], list)
        and all(_is_count(d) for d in item[1])
    )


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


_ENTRY_FIELD_CHECKS = {"key": _is_str, "file": _is_str, "sha256": _is_str, "n_params": _is_count}


def _check_stages(stages: Sequence[StageSpec], config: ModelConfig | None = None) -> None:
    if not stages:
        raise CheckpointError("a checkpoint needs at least one stage")
    next_layer = 0
    for position, spec in enumerate(stages):
        if spec.index != position or spec.n_stages != len(stages) or spec.first_layer != next_layer:
            raise CheckpointError(
                f"stages must be listed in order and cover the layers contiguously; stage {position} is {spec}"
            )
        next_layer = spec.last_layer
    if config is not None and next_layer != config.n_layers:
        raise CheckpointError(f"the stages cover {next_layer} layers, the model has {config.n_layers}")
