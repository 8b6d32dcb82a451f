"""What a miner needs per stage: memory (estimated on fake tensors, checked live) and bytes moved per epoch.

Memory of one miner holding stage s with P parameters, one micro-batch of B sequences of T tokens, as
iota/train/worker.py and iota/train/optim.py train it (the device is the GPU; the host is the machine's RAM):

    static      = 4P weights (fp32 master) + 4P grads (fp32; counted as always present, as they are while
                  micro-batches accumulate) + 8P AdamW state (exp_avg, exp_avg_sq in fp32) = 16P bytes on the device
    activations = the peak forward + backward under bf16 autocast adds above `static`: the received fp32 input and
                  its gradient, the bf16 weight copies autocast makes (2P, saved for backward), the tensors saved
                  for backward, and the transient gradients of activations
    held        = what one forward keeps until its backward arrives (its graph); every non-tail stage caches up
                  to `in_flight` of them (the worker's cache_size), each with its own bf16 weight copies
    step        = what clipping + the optimizer step add above `static` at their peak: per-tensor AdamW (the
                  project's foreach=False) needs temporaries the size of the largest tensor, foreach AdamW (torch's
                  CUDA default) a 4P sqrt(exp_avg_sq), fused none
    device peak = static + held * (in_flight - 1) + max(activations, step)      (tail: in_flight is 1)
    host        = 12P at UPLOAD: the fp32 epoch-start copy, the flattened end weights and the pseudo-gradient

`activations`, `held` and `step` are measured, not modelled: the stage is built and trained for two steps on fake
tensors (FakeTensorMode: shapes and dtypes, no data, so a 15B stage costs nothing) under a TorchDispatchMode that
adds up the bytes of every live storage. The same program on real CPU tensors, measured by torch's MemTracker,
must agree within 15% for the presets named by --check (else the script exits 1). `--check-device cuda` runs the
real program on a GPU and compares with torch.cuda.max_memory_allocated instead. The estimate runs CPU autocast,
which casts the same ops as CUDA autocast; the GPU column allows for the CUDA context and the caching allocator
(peak * 1.1 + 1 GiB).

Bytes one miner moves per epoch, with wire dtype size d (2 for bf16), wire width w (the bottleneck b, or hidden),
N replicas of the stage, n merge partitions, S samples per epoch shared evenly by the replicas:

    per sample  = B*T*w*d for each of: activation in, its gradient out (not on the head: it reads token ids),
                  activation out, its gradient in (not on the tail: it computes the loss)
    train       = ceil(S / N) * per sample
    merge up    = 4P pseudo-gradient + o * 8P/n (new weights + outer momentum of each owned partition)
    merge down  = o * (N + 1) * 4P/n (every replica's slice of an owned partition + its old momentum) + 4P (APPLY:
                  the new weights of every partition)
    where o = 2n/N partitions owned per miner (two owners per partition, spread evenly; o = n when N = 1),
    so for N >= 2: up = 4P + 16P/N, down = 12P + 8P/N.

Not counted: a weight snapshot the orchestrator may challenge for (4P up, rare), and a late joiner's first
download of the checkpoint (4P).

Run:  python -m bench.memory [--json FILE] [--presets ...] [--micro-batch B] [--in-flight K] [--check tiny,100m]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
import weakref
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from iota.model import (
    Llama,
    ModelConfig,
    StageSpec,
    default_stages,
    plan_stages,
    preset,
    suggested_bottleneck,
)
from iota.model.llama import autocast, sum_loss

GiB = 1024**3
MiB = 1024**2

DEFAULT_PRESETS = ("test", "tiny", "100m", "1b", "15b")
# Tokenizer sizes assumed per preset: the small presets train a BPE on the corpus, 1b and 15b use Llama 3's.
DEFAULT_VOCAB = {"test": 512, "tiny": 4096, "100m": 32000, "1b": 128256, "15b": 128256}
# Micro-batch B per preset: the run's default of 8 sequences where it is cheap, 1 where a stage is billions.
DEFAULT_MICRO_BATCH = {"test": 8, "tiny": 8, "100m": 8, "1b": 1, "15b": 1}
# Live checks run real forward/backward on 2 CPU cores, so they use short shapes (B, T).
CHECK_SHAPES = {"test": (4, 32), "tiny": (4, 128), "100m": (1, 256), "1b": (1, 128), "15b": (1, 64)}
TOLERANCE = 0.15
GPU_SIZES_GIB = (
    16,
    24,
    40,
    48,
    80,
    141,
)  # common cards: T4/A4000, 4090/A10, A100-40, A6000/L40S, A100/H100, H200
CUDA_CONTEXT = 1 * GiB
FRAGMENTATION = 1.10


@dataclass(frozen=True)
class StageMemory:
    """Bytes one miner needs for one stage (see the module docstring for each term)."""

    preset: str
    stage: int
    n_stages: int
    layers: str
    micro_batch: int
    seq_len: int
    params: int
    weights: int
    grads: int
    optimizer: int
    other: int  # rotary tables and the micro-batch's input
    activations: int
    held: int
    step: int
    in_flight: int
    host: int

    @property
    def static(self) -> int:
        return self.weights + self.grads + self.optimizer + self.other

    @property
    def peak(self) -> int:
        """Device bytes at the worst moment of training."""
        return self.static + self.held * (self.in_flight - 1) + max(self.activations, self.step)


@dataclass(frozen=True)
class StageTraffic:
    """Bytes one miner of a stage moves: per sample in training, and per epoch (training + merge)."""

    per_sample: int
    per_sample_full_width: int  # the same without a bottleneck, for comparison
    train_epoch: int
    merge_up: int
    merge_down: int

    @property
    def epoch_total(self) -> int:
        return self.train_epoch + self.merge_up + self.merge_down


class LiveBytes(TorchDispatchMode):
    """Adds up the bytes of every storage an op returns while it is alive; keeps the peak since `reset_peak`."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        # id(storage) -> weakref: the storage's Python object is kept unique by torch, and the weakref's callback
        # takes its bytes off when it is freed.
        self._tracked: dict[int, weakref.ref] = {}

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        ref = self._tracked.get(key)
        if ref is not None and ref() is storage:
            return
        nbytes = storage.nbytes()

        def freed(_: weakref.ref, key: int = key, nbytes: int = nbytes) -> None:
            self.live -= nbytes
            self._tracked.pop(key, None)

        self._tracked[key] = weakref.ref(storage, freed)
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self.track, out)
        return out


@dataclass(frozen=True)
class PhasePeaks:
    """Live bytes between steps (static state), after a forward (its graph held), and each phase's peak."""

    static: int
    forward: int
    forward_backward: int
    step: int


ADAMW_KINDS = ("single", "foreach", "fused")
PHASES = ("forward", "forward_backward", "step")  # forward: the live bytes with one graph held


def _inputs(
    config: ModelConfig, spec: StageSpec, batch: int, seq: int, device: str
) -> tuple[torch.Tensor, ...]:
    """The stage's input (token ids on the head, a received fp32 activation elsewhere) and what drives backward."""
    if spec.is_head:
        x = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    else:
        x = torch.randn(batch, seq, config.wire_width, device=device)
    if spec.is_tail:
        return x, torch.randint(0, config.vocab_size, (batch, seq), device=device)
    return x, torch.randn(batch, seq, config.wire_width, device=device, dtype=torch.bfloat16)


class _Miner:
    """The training state a miner's device holds for its stage, and the phases of an inner step."""

    def __init__(
        self, model: Llama, spec: StageSpec, inputs: tuple[torch.Tensor, ...], device_type: str, adamw: str
    ) -> None:
        if adamw not in ADAMW_KINDS:
            raise ValueError(f"adamw must be one of {ADAMW_KINDS}, got {adamw!r}")
        self.model = model
        self.spec = spec
        self.inputs = inputs
        self.device_type = device_type
        self.params = list(model.parameters())
        self.foreach = adamw == "foreach"
        fused = adamw == "fused"
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, foreach=self.foreach, fused=fused or None)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the miner holds between steps, beside the model's own."""
        states = [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        return [*self.inputs, *states]

    def forward(self) -> torch.Tensor:
        """As the worker does it: the received activation goes to fp32 and requires grad, compute under autocast."""
        x, _ = self.inputs
        stage_input = x if self.spec.is_head else x.detach().float().requires_grad_(True)
        with autocast(self.device_type):
            return self.model(stage_input)

    def backward(self, out: torch.Tensor) -> None:
        _, drive = self.inputs
        if self.spec.is_tail:
            sum_loss(out, drive).backward()
        else:
            out.backward(drive.to(out.dtype))

    def step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=self.foreach)
        self.optimizer.step()
        # Zeroed, not freed: with accumulation the grads live through every micro-batch of a step.
        self.optimizer.zero_grad(set_to_none=False)


def estimate_peaks(
    config: ModelConfig, spec: StageSpec, batch: int, seq: int, adamw: str = "single"
) -> PhasePeaks:
    """Phase peaks of one stage on fake tensors: exact bytes of the program, no memory or compute spent."""
    with FakeTensorMode():
        model = Llama(config, spec)
        inputs = _inputs(config, spec, batch, seq, "cpu")
        tracker = LiveBytes()
        for tensor in [*model.parameters(), *model.buffers(), *inputs]:
            tracker.track(tensor)
        with tracker:
            miner = _Miner(model, spec, inputs, "cpu", adamw)
            miner.backward(miner.forward())  # the first step creates grads and AdamW state
            miner.step()
            static = tracker.live
            tracker.reset_peak()
            out = miner.forward()
            forward = tracker.live
            miner.backward(out)
            del out
            forward_backward = tracker.peak
            tracker.reset_peak()
            miner.step()
            step = tracker.peak
    return PhasePeaks(static=static, forward=forward, forward_backward=forward_backward, step=step)


def measure_peaks(
    config: ModelConfig, spec: StageSpec, batch: int, seq: int, device: str, adamw: str = "single"
) -> PhasePeaks:
    """Phase peaks of one stage on real tensors: torch's MemTracker on CPU, the CUDA allocator's stats on a GPU."""
    torch.manual_seed(0)
    with torch.device(device):
        model = Llama(config, spec)
    miner = _Miner(model, spec, _inputs(config, spec, batch, seq, device), device, adamw)
    miner.backward(miner.forward())
    miner.step()
    if device == "cuda":
        torch.cuda.synchronize()
        static = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = miner.forward()
        forward = torch.cuda.memory_allocated()
        miner.backward(out)
        del out
        torch.cuda.synchronize()
        forward_backward = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        miner.step()
        torch.cuda.synchronize()
        return PhasePeaks(static, forward, forward_backward, torch.cuda.max_memory_allocated())

    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model, *miner.tensors())
    cpu = torch.device("cpu")

    def total(kind: str) -> int:
        return tracker.get_tracker_snapshot(kind)[cpu]["Total"]

    static = total("current")
    with tracker:  # each entry starts the peak from the current total
        out = miner.forward()
        forward = total("current")
        miner.backward(out)
        del out
    forward_backward = total("peak")
    with tracker:
        miner.step()
    return PhasePeaks(static, forward, forward_backward, total("peak"))


def stage_memory(
    name: str,
    config: ModelConfig,
    spec: StageSpec,
    batch: int,
    seq: int,
    in_flight: int = 1,
    adamw: str = "single",
) -> StageMemory:
    """The table row of one stage, from its fake-tensor run."""
    with torch.device("meta"):
        params = sum(p.numel() for p in Llama(config, spec).parameters())
    peaks = estimate_peaks(config, spec, batch, seq, adamw)
    # The fake run's static state is the 16P of weights, grads and AdamW, plus the rotary tables and the inputs.
    other = peaks.static - 16 * params
    return StageMemory(
        preset=name,
        stage=spec.index,
        n_stages=spec.n_stages,
        layers=f"{spec.first_layer}-{spec.last_layer - 1}",
        micro_batch=batch,
        seq_len=seq,
        params=params,
        weights=4 * params,
        grads=4 * params,
        optimizer=8 * params,
        other=other,
        activations=peaks.forward_backward - peaks.static,
        held=peaks.forward - peaks.static,
        step=peaks.step - peaks.static,
        in_flight=1 if spec.is_tail else in_flight,  # the tail runs its backward at once and caches nothing
        host=12 * params,
    )


def stage_traffic(
    config: ModelConfig,
    spec: StageSpec,
    params: int,
    *,
    batch: int,
    seq: int,
    wire_bytes: int,
    replicas: int,
    partitions: int,
    samples_per_epoch: int,
) -> StageTraffic:
    """Bytes one miner of the stage moves (formulas in the module docstring)."""
    hops = (0 if spec.is_head else 2) + (0 if spec.is_tail else 2)
    per_sample = hops * batch * seq * config.wire_width * wire_bytes
    per_sample_full = hops * batch * seq * config.hidden * wire_bytes
    owned = partitions if replicas == 1 else 2 * partitions / replicas
    slice_bytes = 4 * params / partitions
    merge_up = 4 * params + owned * 2 * slice_bytes
    merge_down = owned * (replicas + 1) * slice_bytes + 4 * params
    return StageTraffic(
        per_sample=per_sample,
        per_sample_full_width=per_sample_full,
        train_epoch=math.ceil(samples_per_epoch / replicas) * per_sample,
        merge_up=round(merge_up),
        merge_down=round(merge_down),
    )


def gpu_for(peak: int) -> str:
    """Smallest common GPU whose memory holds the peak with allocator slack and the CUDA context."""
    need = peak * FRAGMENTATION + CUDA_CONTEXT
    for size in GPU_SIZES_GIB:
        if need <= size * GiB:
            return f"{size} GB"
    return f">{GPU_SIZES_GIB[-1]} GB"


def _config(name: str, args: argparse.Namespace, seq: int | None = None) -> ModelConfig:
    vocab = args.vocab_size or DEFAULT_VOCAB[name]
    if args.bottleneck == "none":
        bottleneck = None
    elif args.bottleneck == "suggested":
        bottleneck = suggested_bottleneck(name)
    else:
        bottleneck = int(args.bottleneck)
    overrides: dict[str, Any] = {"bottleneck": bottleneck}
    if seq is not None:
        overrides["seq_len"] = seq
    return preset(name, vocab, **overrides)


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def _size(n: float) -> str:
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    if n >= MiB:
        return f"{n / MiB:.1f} MiB"
    return f"{n / 1024:.1f} KiB"


def check(names: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Fake-tensor estimate against the live peak for each stage of each preset; each row says if it passed.

    On CPU the shapes are CHECK_SHAPES (real bf16 compute on 2 cores is slow); on CUDA the table's own shapes.
    A stage that runs out of GPU memory passes only if the estimate also says it does not fit.
    """
    rows = []
    for name in names:
        if args.check_device == "cuda":
            config = _config(name, args, seq=args.seq_len or None)
            batch, seq = args.micro_batch or DEFAULT_MICRO_BATCH[name], config.seq_len
        else:
            batch, seq = CHECK_SHAPES[name]
            config = _config(name, args, seq=seq)
        for spec in plan_stages(config.n_layers, args.stages or default_stages(name)):
            estimate = estimate_peaks(config, spec, batch, seq, args.adamw)
            row: dict[str, Any] = {"preset": name, "stage": spec.index, "micro_batch": batch, "seq_len": seq}
            try:
                live = measure_peaks(config, spec, batch, seq, args.check_device, args.adamw)
            except torch.cuda.OutOfMemoryError:
                gc.collect()
                torch.cuda.empty_cache()
                capacity = torch.cuda.get_device_properties(0).total_memory
                row.update(
                    oom=True, estimate=max(estimate.forward_backward, estimate.step), capacity=capacity
                )
                row["ok"] = row["estimate"] > capacity / FRAGMENTATION
                rows.append(row)
                continue
            ok = True
            for phase in PHASES:
                est, got = getattr(estimate, phase), getattr(live, phase)
                # Both the total and the part above the static state must agree: the total alone is dominated
                # by the weights and would hide an activation estimate that is far off.
                est_dyn, got_dyn = est - estimate.static, got - live.static
                err = abs(est - got) / got
                # A phase that adds next to nothing (fused AdamW's step) is judged against 1% of its total.
                err_dyn = abs(est_dyn - got_dyn) / max(got_dyn, 0.01 * got)
                row[phase] = {"estimate": est, "live": got, "error": err, "dynamic_error": err_dyn}
                ok = ok and err <= TOLERANCE and err_dyn <= TOLERANCE
            row["ok"] = ok
            rows.append(row)
            del live
            if args.check_device == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--presets", default=",".join(DEFAULT_PRESETS), help="comma-separated presets to tabulate"
    )
    parser.add_argument(
        "--stages", type=int, default=0, help="stages per preset; 0 takes each preset's default"
    )
    parser.add_argument("--micro-batch", type=int, default=0, help="sequences per micro-batch; 0: per preset")
    parser.add_argument("--seq-len", type=int, default=0, help="tokens per sequence; 0 takes the preset's")
    parser.add_argument(
        "--vocab-size", type=int, default=0, help="tokenizer size; 0: per preset (see DEFAULT_VOCAB)"
    )
    parser.add_argument("--bottleneck", default="suggested", help="none, suggested (hidden/64) or a width")
    parser.add_argument(
        "--in-flight",
        type=int,
        default=1,
        help="forward graphs a non-tail miner holds (the worker's cache_size)",
    )
    parser.add_argument(
        "--adamw",
        choices=ADAMW_KINDS,
        default="single",
        help="single: per-tensor, as iota/train/optim.py steps",
    )
    parser.add_argument("--wire-dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--replicas", type=int, default=4, help="miners per stage (N)")
    parser.add_argument("--partitions", type=int, default=16, help="merge partitions per stage (n)")
    parser.add_argument("--samples-per-epoch", type=int, default=64)
    parser.add_argument("--check", default="tiny,100m", help="presets to check live; empty: no check")
    parser.add_argument("--check-device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", dest="json_path", default="", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.replicas < 1 or args.partitions < 1 or args.in_flight < 1:
        parser.error("--replicas, --partitions and --in-flight must be >= 1")
    wire_bytes = 2 if args.wire_dtype == "bf16" else 4
    started = time.monotonic()

    rows: list[dict[str, Any]] = []
    print(
        "| preset | stage | layers | B x T | params | weights | grads | AdamW | activations | held / graph | step "
        "| device peak | GPU | host | act+grad / sample | (no bottleneck) | train / epoch | merge up | merge down |"
    )
    print("|" + "---|" * 19)
    for name in [n for n in args.presets.split(",") if n]:
        config = _config(name, args, seq=args.seq_len or None)
        batch = args.micro_batch or DEFAULT_MICRO_BATCH[name]
        seq = config.seq_len
        for spec in plan_stages(config.n_layers, args.stages or default_stages(name)):
            memory = stage_memory(name, config, spec, batch, seq, args.in_flight, args.adamw)
            traffic = stage_traffic(
                config,
                spec,
                memory.params,
                batch=batch,
                seq=seq,
                wire_bytes=wire_bytes,
                replicas=args.replicas,
                partitions=args.partitions,
                samples_per_epoch=args.samples_per_epoch,
            )
            gpu = gpu_for(memory.peak)
            print(
                f"| {name} | {spec.index}/{spec.n_stages} | {memory.layers} | {batch}x{seq} "
                f"| {memory.params / 1e6:,.1f} M | {_gib(memory.weights)} | {_gib(memory.grads)} "
                f"| {_gib(memory.optimizer)} | {_gib(memory.activations)} | {_gib(memory.held)} "
                f"| {_gib(memory.step)} | **{_gib(memory.peak)}** | {gpu} | {_gib(memory.host)} "
                f"| {_size(traffic.per_sample)} "
                f"| {_size(traffic.per_sample_full_width)} | {_size(traffic.train_epoch)} "
                f"| {_size(traffic.merge_up)} | {_size(traffic.merge_down)} |"
            )
            rows.append(
                {
                    **asdict(memory),
                    "static": memory.static,
                    "peak": memory.peak,
                    "gpu": gpu,
                    "wire_width": config.wire_width,
                    "traffic": {**asdict(traffic), "epoch_total": traffic.epoch_total},
                }
            )
    print(
        f"\nMemory in GiB. Activations: one micro-batch's forward+backward under bf16 autocast; {args.in_flight} "
        f"graph(s) in flight on non-tail stages; AdamW {args.adamw}. GPU: smallest card holding device peak * "
        f"{FRAGMENTATION} + 1 GiB. Host: RAM at UPLOAD. Traffic: wire {args.wire_dtype}, N={args.replicas} replicas, "
        f"n={args.partitions} partitions, {args.samples_per_epoch} samples/epoch."
    )

    checks = check([n for n in args.check.split(",") if n], args) if args.check else []
    if checks:
        print(
            f"\nLive check ({args.check_device}), fake-tensor estimate vs measured peak, tolerance {TOLERANCE:.0%}:"
        )
        print(
            "| preset | stage | B x T | phase | estimate MiB | live MiB | error | above static: error | ok |"
        )
        print("|" + "---|" * 9)
        for row in checks:
            if row.get("oom"):
                print(
                    f"| {row['preset']} | {row['stage']} | {row['micro_batch']}x{row['seq_len']} | out of memory "
                    f"| {row['estimate'] / MiB:.1f} | > {row['capacity'] / MiB:.0f} | - | - "
                    f"| {'yes' if row['ok'] else 'NO'} |"
                )
                continue
            for phase in PHASES:
                figures = row[phase]
                print(
                    f"| {row['preset']} | {row['stage']} | {row['micro_batch']}x{row['seq_len']} | {phase} "
                    f"| {figures['estimate'] / MiB:.1f} | {figures['live'] / MiB:.1f} | {figures['error']:.1%} "
                    f"| {figures['dynamic_error']:.1%} | {'yes' if row['ok'] else 'NO'} |"
                )
    passed = all(row["ok"] for row in checks)
    elapsed = time.monotonic() - started
    print(f"\n{'check passed' if passed else 'CHECK FAILED'}; {elapsed:.1f} s")
    if args.json_path:
        report = {
            "settings": vars(args),
            "stages": rows,
            "checks": checks,
            "passed": passed,
            "seconds": elapsed,
        }
        with open(args.json_path, "w") as file:
            json.dump(report, file, indent=2)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
