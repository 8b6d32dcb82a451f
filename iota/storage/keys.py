"""Every object key the system writes, in one place; only the orchestrator calls these to choose keys.

Layout (all under `runs/{run}/`):

    config.json                                                       run_config
    data/{name}                                                       data_shard
    activations/{epoch}/{sample_id}/{stage}-{direction}-{attempt}.safetensors   activation
    epochs/{epoch}/pseudo_grads/{stage}/{hotkey}.f32                  pseudo_grad
    epochs/{epoch}/merged/{stage}/{partition}/{owner}-{kind}.f32      merged_slice (kind: weights, momentum)
    epochs/{epoch}/snapshots/{stage}/{hotkey}/{step}.safetensors      snapshot
    checkpoints/{epoch}/stage-{stage}.f32                             checkpoint_stage
    checkpoints/{epoch}/momentum-{stage}-{partition}.f32              checkpoint_momentum
    checkpoints/{epoch}/manifest.json                                 checkpoint_manifest
    scores/{epoch}.json                                               scores

Flat vectors (`.f32`) are raw little-endian float32 in parameter-name order, so that a merge partition is a byte
range. Checkpoint N holds the weights every replica starts epoch N from (0: the seeded initialisation).
Activations live apart from the per-epoch objects so that lifecycle can list and expire them on their own.
Integers are written in plain decimal (no padding): parse with the functions here, never by sorting strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from iota.storage.base import InvalidKey

Direction = Literal["forward", "backward"]
DIRECTIONS: tuple[Direction, ...] = ("forward", "backward")

# Names (run ids, hotkeys, shard names) are single key segments; ss58 hotkeys are base58, so they fit.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._=-]{0,127}")
_ACTIVATION = re.compile(
    r"runs/(?P<run>[^/]+)/activations/(?P<epoch>0|[1-9][0-9]*)/(?P<sample_id>0|[1-9][0-9]*)/"
    r"(?P<stage>0|[1-9][0-9]*)-(?P<direction>forward|backward)-(?P<attempt>0|[1-9][0-9]*)\.safetensors"
)
_CHECKPOINT = re.compile(r"runs/(?P<run>[^/]+)/checkpoints/(?P<epoch>0|[1-9][0-9]*)/(?P<name>[^/]+)")


def _name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise InvalidKey(f"{what} {value!r} must be 1-128 of [A-Za-z0-9._=-], not starting with '.' or '-'")
    return value


def _index(value: int, what: str) -> int:
    # bool is an int subclass; True as a stage number is always a bug.
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidKey(f"{what} must be a non-negative int, got {value!r}")
    return value


def _run(run: str) -> str:
    return f"runs/{_name(run, 'run')}"


def run_prefix(run: str) -> str:
    """Every object of a run starts with this."""
    return _run(run) + "/"


def run_config(run: str) -> str:
    """The run's model config, data plan, schedule and flags, as served to every role."""
    return f"{_run(run)}/config.json"


def data_shard(run: str, name: str) -> str:
    """One shard of the run's training or held-out data."""
    return f"{_run(run)}/data/{_name(name, 'shard name')}"


def activations_prefix(run: str, epoch: int | None = None) -> str:
    """All activations of a run, or of one epoch."""
    if epoch is None:
        return f"{_run(run)}/activations/"
    return f"{_run(run)}/activations/{_index(epoch, 'epoch')}/"


def activation(run: str, epoch: int, sample_id: int, stage: int, direction: Direction, attempt: int) -> str:
    """The output of `stage` for one sample: forward activations, or the gradient for its input going backward.

    `attempt` grows when a sample is requeued, so a late upload from a previous attempt never overwrites it.
    """
    if direction not in DIRECTIONS:
        raise InvalidKey(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return (
        f"{activations_prefix(run, _index(epoch, 'epoch'))}{_index(sample_id, 'sample_id')}/"
        f"{_index(stage, 'stage')}-{direction}-{_index(attempt, 'attempt')}.safetensors"
    )


@dataclass(frozen=True)
class ActivationKey:
    """The parts of an activation key."""

    run: str
    epoch: int
    sample_id: int
    stage: int
    direction: Direction
    attempt: int


def parse_activation(key: str) -> ActivationKey | None:
    """The parts of an activation key, or None if `key` is not one (exactly as activation() writes them)."""
    match = _ACTIVATION.fullmatch(key)
    if match is None or not _NAME.fullmatch(match["run"]):
        return None
    direction: Direction = "forward" if match["direction"] == "forward" else "backward"
    return ActivationKey(
        run=match["run"],
        epoch=int(match["epoch"]),
        sample_id=int(match["sample_id"]),
        stage=int(match["stage"]),
        direction=direction,
        attempt=int(match["attempt"]),
    )


def _epoch_dir(run: str, epoch: int) -> str:
    return f"{_run(run)}/epochs/{_index(epoch, 'epoch')}"


_EPOCH_OBJECT = re.compile(r"runs/(?P<run>[^/]+)/epochs/(?P<epoch>0|[1-9][0-9]*)/.+")


def parse_epoch_object(key: str) -> int | None:
    """The epoch of any object under a run's epochs/ (pseudo-gradients, merged slices, snapshots), or None."""
    match = _EPOCH_OBJECT.fullmatch(key)
    return int(match["epoch"]) if match else None


def pseudo_grad(run: str, epoch: int, stage: int, hotkey: str) -> str:
    """One replica's fp32 change of its stage's weights over the epoch."""
    return f"{_epoch_dir(run, epoch)}/pseudo_grads/{_index(stage, 'stage')}/{_name(hotkey, 'hotkey')}.f32"


def pseudo_grads_prefix(run: str, epoch: int, stage: int) -> str:
    """Every replica's pseudo-gradient for one stage and epoch."""
    return f"{_epoch_dir(run, epoch)}/pseudo_grads/{_index(stage, 'stage')}/"


def merged_slice(
    run: str, epoch: int, stage: int, partition: int, owner_hotkey: str, kind: str = "weights"
) -> str:
    """One owner's merged weights (or outer momentum) for one partition; each owner writes its own so the two can
    be compared."""
    if kind not in ("weights", "momentum"):
        raise InvalidKey(f"merged slice kind must be weights or momentum, got {kind!r}")
    return (
        f"{_epoch_dir(run, epoch)}/merged/{_index(stage, 'stage')}/{_index(partition, 'partition')}/"
        f"{_name(owner_hotkey, 'owner hotkey')}-{kind}.f32"
    )


def merged_template(run: str, epoch: int, stage: int) -> str:
    """`merged_slice` as the merge plan's output template ({partition}, {hotkey}, {kind} filled in by the plan)."""
    return f"{_epoch_dir(run, epoch)}/merged/{_index(stage, 'stage')}/{{partition}}/{{hotkey}}-{{kind}}.f32"


def snapshot(run: str, epoch: int, stage: int, hotkey: str, step: int) -> str:
    """A miner's exact weights at inner step `step`, uploaded when challenged."""
    return (
        f"{_epoch_dir(run, epoch)}/snapshots/{_index(stage, 'stage')}/{_name(hotkey, 'hotkey')}/"
        f"{_index(step, 'step')}.safetensors"
    )


def checkpoints_prefix(run: str) -> str:
    """All published checkpoints of a run."""
    return f"{_run(run)}/checkpoints/"


def checkpoint_prefix(run: str, epoch: int) -> str:
    """Every object of the checkpoint published after `epoch`."""
    return f"{checkpoints_prefix(run)}{_index(epoch, 'epoch')}/"


def checkpoint_stage(run: str, epoch: int, stage: int) -> str:
    """The global weights of one stage at the start of `epoch`, flat fp32."""
    return f"{checkpoint_prefix(run, epoch)}stage-{_index(stage, 'stage')}.f32"


def checkpoint_momentum(run: str, epoch: int, stage: int, partition: int) -> str:
    """The outer momentum of one partition at the start of `epoch`, flat fp32 (the partition's slice only).

    The orchestrator copies each accepted merge slice here: only it writes under checkpoints/, so an owner's
    still-valid PUT URL for its merge output cannot change what the next epoch's merge reads.
    """
    return f"{checkpoint_prefix(run, epoch)}momentum-{_index(stage, 'stage')}-{_index(partition, 'partition')}.f32"


def checkpoint_manifest(run: str, epoch: int) -> str:
    """The checkpoint's manifest; written last, so its presence means the checkpoint is complete."""
    return f"{checkpoint_prefix(run, epoch)}manifest.json"


def parse_checkpoint_epoch(key: str) -> int | None:
    """The epoch of any object under a run's checkpoints, or None if `key` is not one."""
    match = _CHECKPOINT.fullmatch(key)
    return int(match["epoch"]) if match else None


def scores_prefix(run: str) -> str:
    return f"{_run(run)}/scores/"


def scores(run: str, epoch: int) -> str:
    """The score log as it stood when checkpoint `epoch` was published, kept so credit survives restarts."""
    return f"{scores_prefix(run)}{_index(epoch, 'epoch')}.json"


def parse_scores_epoch(key: str, run: str) -> int | None:
    """The epoch of a mirrored score log's key, or None if `key` is not one."""
    name = key.removeprefix(scores_prefix(run))
    stem = name.removesuffix(".json")
    return int(stem) if name != key and stem != name and stem.isdigit() else None
