"""A miner's exact state at a step boundary, and its two encodings: what a challenged miner uploads (one flat
fp32 vector, so its PUT URL can sign the exact size) and a named safetensors form.

Both the miner (which takes and uploads snapshots) and the audit (which replays from them) use this format.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from iota.decoding import DecodeError
from iota.model import wire
from iota.model.flat import parameters
from iota.train.worker import StageWorker

MOMENTS = {"adamw": ("exp_avg", "exp_avg_sq"), "sgd": ()}  # inner optimizer state a snapshot carries
MAX_F32_STEP = 1 << 24  # the flat form carries the inner step as fp32, exact below this


@dataclass(frozen=True)
class Snapshot:
    """A miner's exact state at a step boundary (right after inner step `inner_step`, no gradient pending):
    what it uploads when challenged, and what a replay can start from instead of the checkpoint."""

    inner_step: int
    weights: torch.Tensor  # flat fp32, sorted-name order
    steps: torch.Tensor  # per tensor, optimizer steps taken (AdamW's bias correction); 0: no optimizer state
    moments: dict[str, torch.Tensor]  # optimizer state name -> flat fp32 (AdamW: exp_avg, exp_avg_sq)


def take_snapshot(worker: StageWorker) -> Snapshot:
    """The worker's weights and inner optimizer state as they stand since its last step (gradients accumulated
    since do not change them until the next step, and are not part of a snapshot)."""
    params = parameters(worker.model)
    names = MOMENTS[worker.flags.optimizer]
    moments: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    steps = []
    for p in params:
        state = worker.optimizer.state.get(p, {})
        steps.append(float(state.get("step", 0.0)))
        for name in names:
            value = state.get(name)
            moments[name].append(
                torch.zeros(p.numel()) if value is None else value.detach().float().cpu().reshape(-1)
            )
    return Snapshot(
        inner_step=worker.inner_step,
        weights=worker.flat_weights(),
        steps=torch.tensor(steps, dtype=torch.float32),
        moments={name: torch.cat(parts) for name, parts in moments.items()},
    )


class StateRing:
    """The exact state after each of a miner's last `size` inner steps, so that it can answer a challenge of any of
    them: challenges are served only once the steps an audit replays from them are committed
    (iota.orchestrator.challenges). Memory: `size` snapshots (weights and AdamW moments: 3x the stage in fp32)."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"a state ring keeps at least 1 step, got {size}")
        self.size = size
        self._states: dict[tuple[int, int], Snapshot] = {}  # (epoch, inner step), oldest first

    def keep(self, epoch: int, snapshot: Snapshot) -> None:
        key = (epoch, snapshot.inner_step)
        self._states.pop(key, None)  # a restarted session steps again: the newer state is kept, as the newest
        self._states[key] = snapshot
        while len(self._states) > self.size:
            del self._states[next(iter(self._states))]

    def get(self, epoch: int, step: int) -> Snapshot | None:
        return self._states.get((epoch, step))


def restore_snapshot(worker: StageWorker, snapshot: Snapshot, epoch_start: torch.Tensor) -> None:
    """Put a worker in the snapshot's state, in the epoch that started from `epoch_start`."""
    worker.load_flat(snapshot.weights)
    worker.inner_step = snapshot.inner_step
    worker.epoch_start = epoch_start.detach().float().cpu().clone()
    params = parameters(worker.model)
    if snapshot.steps.numel() != len(params):
        raise ValueError(
            f"snapshot has steps for {snapshot.steps.numel()} tensors, the stage has {len(params)}"
        )
    offset = 0
    for p, step in zip(params, snapshot.steps.tolist(), strict=True):
        n = p.numel()
        if step > 0:
            state: dict[str, torch.Tensor] = {"step": torch.tensor(step, dtype=torch.float32)}
            for name, flat in snapshot.moments.items():
                state[name] = flat[offset : offset + n].view_as(p).to(p.device).clone()
            worker.optimizer.state[p] = state
        offset += n


def encode_snapshot(snapshot: Snapshot) -> bytes:
    tensors = {
        "weights": snapshot.weights,
        "steps": snapshot.steps,
        "inner_step": torch.tensor(snapshot.inner_step, dtype=torch.int64),
    }
    tensors.update({f"moment.{name}": flat for name, flat in snapshot.moments.items()})
    return wire.encode_state(tensors)


def snapshot_size(n_params: int, n_tensors: int, optimizer: str) -> int:
    """Bytes of a snapshot in the flat layout the live protocol uploads (exact, so its PUT URL can sign it)."""
    return 4 * (1 + n_tensors + n_params * (1 + len(MOMENTS[optimizer])))


def snapshot_to_f32(snapshot: Snapshot) -> torch.Tensor:
    """[inner_step, steps per tensor, weights, moments in MOMENTS order] as one flat fp32 vector."""
    head = torch.tensor([float(snapshot.inner_step)], dtype=torch.float32)
    moments = [snapshot.moments[name] for name in sorted(snapshot.moments, key=_moment_order)]
    return torch.cat([head, snapshot.steps.float(), snapshot.weights.float(), *[m.float() for m in moments]])


def snapshot_from_f32(flat: torch.Tensor, n_params: int, n_tensors: int, optimizer: str) -> Snapshot:
    """The inverse of `snapshot_to_f32`, for a stage of `n_params` in `n_tensors` tensors; the size and the inner
    step are checked (DecodeError): the vector came from the challenged miner."""
    names = MOMENTS[optimizer]
    expected = snapshot_size(n_params, n_tensors, optimizer) // 4
    if flat.dim() != 1 or flat.numel() != expected:
        raise DecodeError(f"a snapshot of this stage has {expected} values, got {tuple(flat.shape)}")
    step = float(flat[0])
    # fp32 holds every integer up to 2**24 exactly, and no inner step honestly gets there.
    if not (step.is_integer() and 0 <= step < MAX_F32_STEP):
        raise DecodeError(f"snapshot inner step {step} is not a step count")
    steps = flat[1 : 1 + n_tensors].clone()
    body = flat[1 + n_tensors :]
    parts = body.split(n_params)
    return Snapshot(
        int(step), parts[0].clone(), steps, {n: p.clone() for n, p in zip(names, parts[1:], strict=True)}
    )


def _moment_order(name: str) -> int:
    return [n for names in MOMENTS.values() for n in names].index(name)


def decode_snapshot(data: bytes, worker: StageWorker) -> Snapshot:
    """A snapshot for `worker`'s stage and optimizer: names, shapes and dtypes are checked before use, and any other
    bytes are a DecodeError (iota.model.wire.WireError)."""
    params = parameters(worker.model)
    n = sum(p.numel() for p in params)
    moment_names = MOMENTS[worker.flags.optimizer]
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
        "weights": ((n,), torch.float32),
        "steps": ((len(params),), torch.float32),
        "inner_step": ((), torch.int64),
    }
    expected.update({f"moment.{name}": ((n,), torch.float32) for name in moment_names})
    tensors = wire.decode_state(
        data, expected=expected, max_bytes=(len(moment_names) + 2) * 4 * n + (1 << 20)
    )
    inner_step = int(tensors["inner_step"])
    if inner_step < 0:
        raise wire.WireError(f"snapshot inner step {inner_step} is not a step count")
    return Snapshot(
        inner_step=inner_step,
        weights=tensors["weights"],
        steps=tensors["steps"],
        moments={name: tensors[f"moment.{name}"] for name in moment_names},
    )
