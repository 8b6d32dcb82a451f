"""The local checkpoint directory: manifest.json, one safetensors file per stage, the tokenizer's files."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from iota.checkpoint.manifest import (
    MANIFEST_FILE,
    CheckpointError,
    expected_tensors,
    parse_manifest,
    stage_entry_fields,
    tensor_list,
)
from iota.data.tokenizer import TOKENIZER_FILE, Llama3Tokenizer, Tokenizer, load_tokenizer
from iota.model import flat
from iota.model.config import ModelConfig
from iota.model.llama import Llama
from iota.model.stages import Pipeline, StageSpec


def stage_file(index: int) -> str:
    return f"stage-{index}.safetensors"


def write_local_checkpoint(
    out_dir: Path,
    manifest: Mapping[str, Any],
    stage_states: Sequence[Mapping[str, torch.Tensor]],
    tokenizer: Tokenizer | None,
) -> Path:
    """Write a local checkpoint directory from a manifest (bucket or local form) and each stage's weights.

    Each stage entry's tensor list, size and sha256 are computed from the weights (and must equal the manifest's
    where it states them); "key" becomes "file". The weights must be exactly the stage's parameters.
    manifest.json is written last, so a directory with one is complete. Returns `out_dir`.
    """
    out_dir = Path(out_dir)
    config, stages = parse_manifest(manifest, "manifest to write")
    if len(stage_states) != len(stages):
        raise CheckpointError(f"the manifest has {len(stages)} stages, got weights for {len(stage_states)}")
    tokenizer_info = manifest["tokenizer"]
    if tokenizer is not None and tokenizer.digest != tokenizer_info["digest"]:
        raise CheckpointError(
            f"tokenizer {tokenizer.name} (digest {tokenizer.digest[:16]}) is not the checkpoint's "
            f"({tokenizer_info['kind']}, digest {str(tokenizer_info['digest'])[:16]})"
        )
    local = copy.deepcopy(dict(manifest))
    out_dir.mkdir(parents=True, exist_ok=True)
    # An older checkpoint in the same directory stops counting as complete before any of its files change.
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
    for entry, spec, state in zip(local["stages"], stages, stage_states, strict=True):
        _check_names_and_shapes(
            tensor_list(state), expected_tensors(config, spec), f"stage {spec.index} weights"
        )
        fields = stage_entry_fields(tensor_list(state), flat.sha256(state))
        for name in ("sha256", "n_params", "tensors"):
            if name in entry and entry[name] != fields[name]:
                raise CheckpointError(f"stage {spec.index}: the weights' {name} differs from the manifest's")
        entry.pop("key", None)
        entry.update(fields)
        entry["file"] = stage_file(spec.index)
        tensors = {
            name: t.detach().to(device="cpu", dtype=torch.float32).contiguous() for name, t in state.items()
        }
        tmp = out_dir / f".{entry['file']}.{os.getpid()}.tmp"
        safetensors.torch.save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out_dir / entry["file"])
    if tokenizer is not None:
        tokenizer.save(out_dir)
    _write_atomic(out_dir / MANIFEST_FILE, (json.dumps(local, indent=1) + "\n").encode("utf-8"))
    return out_dir


@dataclass(frozen=True)
class Checkpoint:
    """A loaded, verified local checkpoint."""

    directory: Path
    manifest: dict[str, Any]
    config: ModelConfig
    stages: list[StageSpec]
    states: list[dict[str, torch.Tensor]]

    @property
    def epoch(self) -> int:
        return int(self.manifest["epoch"])

    @property
    def tokens_trained(self) -> int:
        return int(self.manifest.get("tokens_trained", 0))

    @property
    def has_bottleneck(self) -> bool:
        """Whether the stages talk through a bottleneck (which no single unsplit model can express)."""
        return self.config.bottleneck is not None and len(self.stages) > 1

    def merged_state(self) -> dict[str, torch.Tensor]:
        """Every stage's tensors in one dict; names are global, so stages never collide."""
        return {name: t for state in self.states for name, t in state.items()}

    def tokenizer(self) -> Tokenizer:
        """The tokenizer the checkpoint was trained with (its files for BPE), checked against the digest."""
        info = self.manifest["tokenizer"]
        kind = str(info["kind"])
        if kind == "bpe" and not (self.directory / TOKENIZER_FILE).is_file():
            raise CheckpointError(
                f"{self.directory} has no {TOKENIZER_FILE}: pull the checkpoint with the prepared data "
                "directory as tokenizer_dir so its tokenizer is copied"
            )
        tokenizer = Llama3Tokenizer() if kind == "llama3" else load_tokenizer(kind, self.directory)
        if tokenizer.digest != info["digest"]:
            raise CheckpointError(
                f"{self.directory}: tokenizer digest {tokenizer.digest} differs from the manifest's {info['digest']}"
            )
        return tokenizer


def load_checkpoint(directory: Path) -> Checkpoint:
    """Read a local checkpoint: every stage file decoded with safetensors and checked against the manifest
    (names, shapes, fp32, sha256) and against the stage the model config describes."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: {directory} is not a checkpoint directory")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    config, stages = parse_manifest(manifest, str(path))
    states = []
    for entry, spec in zip(manifest["stages"], stages, strict=True):
        states.append(_load_stage(directory, entry, config, spec))
    return Checkpoint(directory, manifest, config, stages, states)


def _load_stage(
    directory: Path, entry: Mapping[str, Any], config: ModelConfig, spec: StageSpec
) -> dict[str, torch.Tensor]:
    where = f"{directory}: stage {spec.index}"
    name = entry.get("file")
    if not isinstance(name, str) or Path(name).name != name:
        raise CheckpointError(f"{where}: manifest entry has no plain file name: {name!r}")
    path = directory / name
    if not path.is_file():
        raise CheckpointError(f"{where}: {path} is missing")
    try:
        state = safetensors.torch.load_file(str(path))
    except (safetensors.SafetensorError, OSError) as e:
        raise CheckpointError(f"{where}: {path} is not a readable safetensors file: {e}") from e
    bad_dtypes = sorted(n for n, t in state.items() if t.dtype != torch.float32)
    if bad_dtypes:
        raise CheckpointError(f"{where}: tensors {bad_dtypes[:5]} are not float32")
    _check_names_and_shapes(
        tensor_list(state), entry.get("tensors", []), f"{where} ({name}) vs its manifest entry"
    )
    _check_names_and_shapes(
        tensor_list(state), expected_tensors(config, spec), f"{where} vs the model config"
    )
    non_finite = sorted(n for n, t in state.items() if not bool(torch.isfinite(t).all()))
    if non_finite:
        raise CheckpointError(f"{where}: tensors {non_finite[:5]} hold NaN or Inf values")
    sha = flat.sha256(state)
    if sha != entry.get("sha256"):
        raise CheckpointError(
            f"{where}: sha256 of the weights is {sha}, the manifest records {entry.get('sha256')}"
        )
    return state


def _check_names_and_shapes(
    actual: Sequence[Sequence[Any]], expected: Sequence[Sequence[Any]], where: str
) -> None:
    have = {str(n): [int(d) for d in s] for n, s in actual}
    want = {str(n): [int(d) for d in s] for n, s in expected}
    if have == want:
        return
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    wrong = sorted(n for n in set(have) & set(want) if have[n] != want[n])
    details = []
    if missing:
        details.append(f"missing {missing[:5]}")
    if extra:
        details.append(f"unexpected {extra[:5]}")
    if wrong:
        details.append("shape " + ", ".join(f"{n} {have[n]} != {want[n]}" for n in wrong[:5]))
    raise CheckpointError(f"{where}: tensors differ: {'; '.join(details)}")


def _stage_module(
    config: ModelConfig, spec: StageSpec, state: Mapping[str, torch.Tensor], device: str
) -> Llama:
    # Built without memory, then filled from the state: seeded init would be work thrown away.
    with torch.device("meta"):
        model = Llama(config, spec)
    model.to_empty(device=device)
    model.load_state_dict(state, strict=True)
    model.rope.reset()  # the rotary tables are derived, never stored
    return model.eval()


def compose(checkpoint: Checkpoint, device: str = "cpu") -> nn.Module:
    """One module running the whole checkpoint, token ids (B, T) -> logits (B, T, V), in eval mode.

    Without a bottleneck this is a single unsplit Llama holding every stage's tensors (the stages together are
    exactly the whole model); with one, the stage modules chained, since each boundary has its own weights.
    """
    if checkpoint.has_bottleneck:
        modules = [
            _stage_module(checkpoint.config, spec, state, device)
            for spec, state in zip(checkpoint.stages, checkpoint.states, strict=True)
        ]
        return Pipeline(modules).eval()
    whole = StageSpec(index=0, n_stages=1, first_layer=0, last_layer=checkpoint.config.n_layers)
    return _stage_module(checkpoint.config, whole, checkpoint.merged_state(), device)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
