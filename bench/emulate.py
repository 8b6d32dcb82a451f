"""A miner whose stage computes at GPU speed on a CPU: it sleeps a stage's measured GPU time instead of computing.

`bench/wan.py --emulate 1b` runs its miners with this module in place of `iota miner`: the same daemon, client,
uploads, reports and merge (iota.miner), only the stage worker's forward, backward and inner step replaced. Each
forward sleeps a third of the time bench/stage_gpu.py measured for one micro-batch of that stage (forward, backward
and AdamW step, bf16 autocast on an H100: docs/results/stage_gpu_h100.json), each backward two thirds, the tail's
forward both; the step is inside those figures. What crosses the wire is real: the run is configured so that the
codec's activation has the emulated stage's shape (micro-batch 1 at the preset's sequence length, hidden / 64
channels, bf16 unless the run names a codec), each output is that codec's encoding of a fixed random tensor, and
each input is decoded by the codec (sizes and header checked) before the sleep. The weights the merge moves are the
run's real (small) stage's.

Run:  IOTA_... python -m bench.emulate --preset 1b   (the miner's settings come from the environment, as for
      `iota miner run`)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import ClassVar

import torch

from iota.model.config import preset
from iota.train.worker import Cached, StageWorker

MEASURED = Path(__file__).resolve().parent.parent / "docs" / "results" / "stage_gpu_h100.json"
BOTTLENECK_RATIO = 64  # the 64x bottleneck the public system runs: hidden / 64 channels between stages
FORWARD_SHARE = 1 / 3  # of a micro-batch's forward + backward: a backward costs about two forwards
EMULATED_LOSS = math.log(
    128_256
)  # the tail's reported loss: what a model that knows nothing scores (Llama 3)


def stage_seconds(name: str, path: Path = MEASURED) -> dict[int, float]:
    """Seconds per micro-batch of each stage of preset `name` with bf16 autocast, as bench/stage_gpu.py measured."""
    rows = json.loads(path.read_text())["rows"]
    found = {
        r["stage"]: r["ms_per_microbatch"] / 1000
        for r in rows
        if r["preset"] == name and r["precision"] == "bf16 autocast"
    }
    if not found:
        raise ValueError(f"{path} has no bf16 figures for preset {name!r}")
    return found


def run_overrides(name: str) -> dict[str, int]:
    """Run settings under which the codec's activation has the emulated stage's wire shape and size."""
    shape = preset(name, vocab_size=512)
    return {"seq_len": shape.seq_len, "micro_batch": 1, "bottleneck": shape.hidden // BOTTLENECK_RATIO}


class EmulatedWorker(StageWorker):
    """A stage worker that keeps the real one's bookkeeping (window, cache, steps, sketches) and sleeps its compute."""

    seconds: ClassVar[dict[int, float]] = {}  # stage -> seconds per micro-batch; set before the daemon starts

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        if self.spec.index not in self.seconds:
            raise ValueError(f"no emulated time for stage {self.spec.index}")
        total = self.seconds[self.spec.index]
        self.forward_s, self.backward_s = FORWARD_SHARE * total, (1 - FORWARD_SHARE) * total
        self.payload = self.codec.encode(
            torch.randn(self.act_shape, generator=torch.Generator().manual_seed(0)), 0
        )

    def forward(self, sample_id: int, data: bytes | None) -> tuple[bytes, float | None]:
        self.forget([sample_id])
        if not self.spec.is_head:
            self._decode(data)
        self.window_forwards += 1
        if self.spec.is_tail:
            time.sleep(self.forward_s + self.backward_s)
            self.micro_batches += 1
            return self.payload, EMULATED_LOSS
        time.sleep(self.forward_s)
        self.cache[sample_id] = Cached(torch.empty(0), None, self.inner_step)
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return self.payload, None

    def backward(self, sample_id: int, data: bytes) -> bytes | None:
        if sample_id not in self.cache:
            raise KeyError(f"no cached forward for sample {sample_id}")
        self._decode(data)
        self.cache.pop(sample_id)
        time.sleep(self.backward_s)
        self.micro_batches += 1
        return None if self.spec.is_head else self.payload

    def step(self, lr: float) -> float:
        self.micro_batches = 0
        self.window_forwards = 0
        self.inner_step += 1
        return 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--preset", default="1b", help="whose measured stage times to sleep")
    args = parser.parse_args(argv)
    EmulatedWorker.seconds = stage_seconds(args.preset)
    from iota.cli.roles import cmd_miner

    return cmd_miner(argparse.Namespace(action="run"), worker_factory=EmulatedWorker)


if __name__ == "__main__":
    raise SystemExit(main())
