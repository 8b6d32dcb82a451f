"""Pipeline throughput: `iota local` (S stages x 1 miner) against `iota baseline` on the same samples, and where
the network's time goes.

Both runs use the same preset, micro-batch, accumulation and token count; the baseline trains the whole model in
this process on every core, the network runs each stage in its own `python -m iota miner` process (torch threads
= the cores this process may use / miners, at least 1, as `iota local` sets them), all on this machine.

How each figure is measured:

- Steady-state tokens/s of the network: from the orchestrator's state database (run_dir/orchestrator/state.db,
  read after the run): `samples.done_at` is when each sample completed (the head reported its backward).
  Steady state = (completed - 1) * tokens per sample / (last done_at - first done_at) over the completions before
  the profiler attaches (below): start-up (processes, data, registration, pipeline fill) happens before the first
  completion, and py-spy takes CPU from the processes it samples, so neither is in the figure. The same over every
  completion (profiled tail included) is printed beside it.
- Steady-state tokens/s of the baseline: `train_baseline`'s own wall clock (it starts after the model is built
  and stops before the held-out evaluation), after a one-step warm-up call in the same process, so the first
  step's allocations and thread-pool start are not in it. It runs at torch's default threads (every core) and at
  1 thread, and the ratio takes the faster: on a machine shared with other work, 2 OpenMP threads on 2 busy cores
  ran 5-7x slower than 1 (a thread spins at each barrier while its partner is descheduled). Each runs before and
  after the network and the two are pooled (total tokens / total seconds), so load from other work that comes
  and goes during the bench weighs on both sides of the ratio.
- Stage view (orchestrator): per hop, `created_at` (queued), lease time (`lease_expires - lease_s`) and `done_at`.
  busy = the part of the steady window in which the stage's miner held at least one leased hop (the union of
  lease-to-report intervals: a miner prefetches its next hop while it reports the last, so they overlap); the
  rest it was asking for work with nothing leased (pipeline bubbles).
- Miner view (py-spy): once --profile-after of the samples are done, `py-spy record --idle --threads
  --nonblocking` samples every thread of every miner (wall clock, idle included) for --profile-s seconds or to
  the end of training. The main thread runs torch (iota/miner/hops.py); beside it a prefetch thread asks for the
  next item and downloads its input, and an outbox thread uploads outputs and reports them
  (iota/miner/pipeline.py). Each main-thread sample is put in the first category whose frames it contains:
  serialise (iota/model/wire.py: safetensors encode/decode, sha256, md5), transfer (iota/storage/transfer.py:
  presigned GET/PUT), rpc (iota/client/orchestrator.py: signed calls to the orchestrator, signing included), compute
  (iota/train/worker.py: forward, backward, optimizer step; `recompute` is the part of backward that re-runs a
  forward because an inner step changed the weights since), wait (blocked in `Prefetcher.take`: no next item
  ready, the orchestrator had none or its request or download was not done), outbox (blocked in `Outbox.put`:
  two outputs were still unsent), other. For the two helper threads, the share of wall time they spent in
  requests and transfers (the rest they sleep between polls or idle). CPU cores used by each process over the
  measured window (before the profiler) come from /proc/<pid>/stat. py-spy is a bench-only tool: `pip install
  py-spy` into the venv; without it the miner view is skipped.

Run:  python -m bench.pipeline [--preset tiny] [--seq-len 0] [--samples 40] [--micro-batch 4] [--accumulate 2]
                               [--profile-s 15] [--profile-after 0.6] [--work-dir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

LEASE_S = 60.0  # what iota/local gives the orchestrator (IOTA_LEASE_S): lease time = lease_expires - LEASE_S
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# Miner stack categories, in the order they are tried: a sample goes to the first whose marker is in its stack.
MINER_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("serialise", ("model/wire.py",)),
    ("transfer", ("storage/transfer.py",)),
    ("rpc", ("client/orchestrator.py",)),
    ("compute", ("train/worker.py",)),
    ("wait", ("Prefetcher.take (iota/miner/pipeline.py",)),
    ("outbox", ("Outbox.put (iota/miner/pipeline.py",)),
)
HELPER_THREADS = ("prefetch", "outbox")  # iota.miner.pipeline's thread name prefixes


# -- py-spy ------------------------------------------------------------------------------------------------------


@dataclass
class Profile:
    """Collapsed stacks of one process from `py-spy record --format raw`: frames root first, and sample counts."""

    pid: int
    stacks: list[tuple[list[str], int]] = field(default_factory=list)
    error: str = ""

    @property
    def samples(self) -> int:
        return sum(n for _, n in self.stacks)


def py_spy() -> str | None:
    """The py-spy executable beside this interpreter, or on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def start_profiles(
    pids: dict[str, int], seconds: float, rate: int, out_dir: Path, idle: bool = True
) -> dict[str, subprocess.Popen[bytes]]:
    """One `py-spy record` per process, without pausing the target; `idle`: wall clock (idle stacks too), else
    only threads that are running."""
    exe = py_spy()
    if exe is None:
        return {}
    out_dir.mkdir(parents=True, exist_ok=True)
    procs = {}
    for name, pid in pids.items():
        cmd = [exe, "record", "-p", str(pid), "-d", str(max(1, round(seconds))), "-r", str(rate)]
        cmd += ["--threads", "--idle"] if idle else ["--threads"]  # --threads roots each stack in its thread
        cmd += ["--nonblocking", "--format", "raw", "-o", str(out_dir / f"{name}.txt")]
        log = open(out_dir / f"{name}.log", "wb")  # noqa: SIM115 (the child writes it)
        procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    return procs


def finish_profiles(
    procs: dict[str, subprocess.Popen[bytes]], pids: dict[str, int], out_dir: Path
) -> dict[str, Profile]:
    profiles = {}
    for name, proc in procs.items():
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        profiles[name] = read_profile(pids[name], out_dir / f"{name}.txt", out_dir / f"{name}.log")
    return profiles


def read_profile(pid: int, path: Path, log: Path | None = None) -> Profile:
    profile = Profile(pid)
    if not path.exists():
        profile.error = log.read_text()[-500:] if log and log.exists() else "no output"
        return profile
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            profile.stacks.append((stack.split(";"), int(count)))
    return profile


def thread(profile: Profile, prefix: str) -> Profile:
    """The stacks of the threads whose name starts with `prefix` (`py-spy --threads` roots each stack in
    `thread (TID): NAME`), without that frame."""
    picked = []
    for frames, n in profile.stacks:
        if frames and frames[0].startswith("thread ("):
            name = frames[0].split(": ", 1)[1] if ": " in frames[0] else ""
            if name.startswith(prefix):
                picked.append((frames[1:], n))
    return Profile(profile.pid, picked)


def classify_miner(frames: list[str]) -> str:
    text = ";".join(frames)
    for name, markers in MINER_CATEGORIES:
        if any(m in text for m in markers):
            if name == "compute" and _recompute(frames):
                return "recompute"
            return name
    return "other"


def helper_busy(profile: Profile, wall_samples: int) -> float:
    """Share of the wall clock a helper thread spent in requests or transfers (not sleeping, not idle)."""
    busy = sum(
        n for frames, n in profile.stacks if classify_miner(frames) in ("transfer", "rpc", "serialise")
    )
    return busy / max(wall_samples, 1)


def _recompute(frames: list[str]) -> bool:
    """A forward run inside StageWorker.backward: the graph was stale (an inner step changed the weights)."""
    in_backward = False
    for frame in frames:
        if frame.startswith("backward (iota/train/worker.py"):
            in_backward = True
        elif in_backward and frame.startswith("forward (iota/model/"):
            return True
    return False


def breakdown(profile: Profile, classify: Any) -> dict[str, float]:
    """Fraction of the samples in each category."""
    counts: dict[str, int] = defaultdict(int)
    for frames, n in profile.stacks:
        counts[classify(frames)] += n
    total = max(profile.samples, 1)
    return {name: n / total for name, n in sorted(counts.items(), key=lambda kv: -kv[1])}


def top_frames(profile: Profile, n: int = 12, keep: tuple[str, ...] = ()) -> list[tuple[str, float]]:
    """The frames that take the most samples, as fractions: each sample goes to its leaf frame, or with `keep` to
    its innermost frame containing one of those markers (e.g. the project's own code), else to its leaf."""
    counts: dict[str, int] = defaultdict(int)
    for frames, count in profile.stacks:
        kept = [f for f in frames if any(k in f for k in keep)] if keep else []
        leaf = kept[-1] if kept else (frames[-1] if frames else "?")
        counts[leaf] += count
    total = max(profile.samples, 1)
    return [(frame, c / total) for frame, c in sorted(counts.items(), key=lambda kv: -kv[1])[:n]]


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            kids.append(int(entry.name))
    return kids


def role_of(pid: int) -> str | None:
    """`orchestrator` or the miner's wallet name, from the child's command line and environment."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    if b"orchestrator" in cmdline:
        return "orchestrator"
    if b"miner" in cmdline:
        wallet = next((e for e in env if e.startswith(b"IOTA_WALLET_NAME=")), b"=miner?")
        return wallet.split(b"=", 1)[1].decode()
    return None


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    mem_kb = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    return {
        "nproc": len(os.sched_getaffinity(0)),  # what `nproc` prints: the cores this process may run on
        "cpu_count": os.cpu_count(),
        "cpu": model,
        "ram_gib": round(mem_kb / 2**20, 1),
        "loadavg": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


# -- the two runs ------------------------------------------------------------------------------------------------


def run_values(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    """The run settings both sides use: `iota local`'s defaults with this bench's overrides."""
    from iota.local import LOCAL_DEFAULTS

    return {
        **LOCAL_DEFAULTS,
        "preset": args.preset,
        "stages": args.stages,
        "micro_batch": args.micro_batch,
        "seq_len": args.seq_len,
        "accumulate": args.accumulate,
        "layers_per_stage": args.layers_per_stage,
        "samples_per_epoch": args.samples,
        "epochs": 1,
        "data_dir": str(data_dir),
    }


def baseline(values: dict[str, Any], samples: int, threads: int) -> dict[str, Any]:
    """Train the whole model in this process on samples 0..samples-1 (this also prepares the data once)."""
    import torch

    from iota.config import RunSettings
    from iota.train.baseline import train_baseline
    from iota.train.run import build_run

    run = build_run(RunSettings(**values))
    tokens = samples * run.micro_batch_tokens
    one_step = run.micro_batch_tokens * run.settings.accumulate
    # 0 means every core this process may use, set explicitly: torch keeps the count an earlier run set.
    threads = threads or len(os.sched_getaffinity(0))
    train_baseline(run, one_step, threads=threads, progress=False)  # warm-up: allocator, thread pool
    report = train_baseline(run, tokens, threads=threads, progress=False)
    return {
        "tokens": report["tokens_trained"],
        "seconds": report["wall_seconds"],
        "tokens_per_second": report["tokens_per_second"],
        "final_loss": report["final_loss"],
        "threads": torch.get_num_threads(),
    }


def baselines(values: dict[str, Any], samples: int, thread_counts: list[int]) -> list[dict[str, Any]]:
    runs = []
    for threads in thread_counts:
        runs.append(baseline(values, samples, threads))
        print(f"  {runs[-1]['threads']} threads: {runs[-1]['tokens_per_second']:.0f} tokens/s", flush=True)
    return runs


def pooled(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The baseline before and after the network as one run (total tokens / total seconds): load that comes and
    goes during the bench (a shared machine) then weighs on the baseline as it did on the network between."""
    tokens, seconds = before["tokens"] + after["tokens"], before["seconds"] + after["seconds"]
    return {
        **before,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "before": before["tokens_per_second"],
        "after": after["tokens_per_second"],
    }


def free_port() -> int:
    from iota.local import free_port as pick

    return pick()


def network(args: argparse.Namespace, values: dict[str, Any], work: Path) -> dict[str, Any]:
    """Run `iota local` as a subprocess, profile its processes once training is steady, and read its state."""
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    port = free_port()
    cmd = [sys.executable, "-m", "iota", "local", "--miners-per-stage", "1", "--validators", "0"]
    cmd += [
        "--no-baseline",
        "--port",
        str(port),
        "--run-dir",
        str(run_dir),
        "--report",
        str(work / "local.json"),
    ]
    for name, value in values.items():
        cmd += ["--" + name.replace("_", "-"), str(value)]
    log_path = work / "local.log"
    url = f"http://127.0.0.1:{port}/status"
    profile_at = max(2, int(args.samples * args.profile_after)) if args.profile_s > 0 else None
    profiles: dict[str, Profile] = {}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    pids: dict[str, int] = {}
    cpu_start: dict[str, float] = {}
    cpu: dict[str, float] = {}
    measure_start = measure_end = float("nan")
    profile_stopped = False
    started = time.time()
    with open(log_path, "wb") as log, httpx.Client(timeout=5) as http:
        local = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=work)
        while local.poll() is None:
            time.sleep(0.25)
            try:
                status = http.get(url).json()
            except (httpx.HTTPError, ValueError):
                continue
            completed, training = int(status["samples_completed"]), status["phase"] == "train"
            if not pids and completed >= 1 and training:
                pids = {r: p for p in children(local.pid) if (r := role_of(p))}
                cpu_start = {r: c for r, p in pids.items() if (c := cpu_seconds(p)) is not None}
                measure_start = time.time()
            end_measure = (profile_at is not None and completed >= profile_at) or not training
            if pids and not cpu and end_measure:
                measure_end = time.time()
                for role, pid in pids.items():
                    now_cpu = cpu_seconds(pid)
                    if now_cpu is not None and role in cpu_start:
                        cpu[role] = (now_cpu - cpu_start[role]) / (measure_end - measure_start)
                if training and profile_at is not None:
                    procs = start_profiles(pids, args.profile_s, args.profile_rate, work / "profiles")
            if procs and not training and not profile_stopped:
                # The profile covers training only: py-spy writes what it has on SIGINT.
                for proc in procs.values():
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGINT)
                profile_stopped = True
        if procs:
            profiles = finish_profiles(procs, pids, work / "profiles")
    if local.returncode != 0:
        raise RuntimeError(f"iota local failed ({local.returncode}); see {log_path}")
    report = json.loads((work / "local.json").read_text())
    timing = read_state(run_dir / "orchestrator" / "state.db", args.stages)
    tokens_per_sample = report["tokens_trained"] // max(report["samples_completed"], 1)
    done = timing["done_at"]
    # Measured: completions before the profiler attached (py-spy takes CPU from the miners it samples).
    measured = [t for t in done if t <= measure_end] if measure_end == measure_end else done
    steady_s = measured[-1] - measured[0] if len(measured) > 1 else float("nan")
    steady_tokens = (len(measured) - 1) * tokens_per_sample
    whole_s = done[-1] - done[0] if len(done) > 1 else float("nan")
    window = (measured[0], measured[-1]) if len(measured) > 1 else (0.0, 0.0)
    profiled_s = max(0.0, done[-1] - measure_end) if procs and done else 0.0
    miners = {}
    for role, profile in sorted(profiles.items()):
        if role == "orchestrator":
            continue
        main = thread(profile, "MainThread")
        miners[role] = {
            "stage": _stage_from_log(run_dir / "logs" / f"{role}.log"),
            "samples": main.samples,
            "error": profile.error,
            "breakdown": breakdown(main, classify_miner),
            "helpers": {h: helper_busy(thread(profile, h), main.samples) for h in HELPER_THREADS},
            "top": top_frames(main, 8),
        }
    return {
        "tokens": report["tokens_trained"],
        "samples": report["samples_completed"],
        "samples_lost": report["samples_lost"],
        "samples_requeued": report["samples_requeued"],
        "wall_seconds_report": report["wall_seconds"],
        "total_seconds": time.time() - started,
        "tokens_per_sample": tokens_per_sample,
        "steady_samples": len(measured),
        "steady_seconds": steady_s,
        "steady_tokens": steady_tokens,
        "tokens_per_second": steady_tokens / steady_s if steady_s > 0 else float("nan"),
        "tokens_per_second_whole": (len(done) - 1) * tokens_per_sample / whole_s
        if whole_s > 0
        else float("nan"),
        "first_sample_after_s": done[0] - timing["registered_at"] if done else None,
        "stages": stage_view(timing, window),
        "cpu_cores": cpu,
        "profiled_training_s": profiled_s,
        "miners": miners,
        "orchestrator_top": top_frames(profiles["orchestrator"], 8) if "orchestrator" in profiles else [],
    }


def _stage_from_log(path: Path) -> int | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    marker = " on stage "
    at = text.find(marker)
    return int(text[at + len(marker) :].split()[0]) if at >= 0 else None


def read_state(path: Path, n_stages: int) -> dict[str, Any]:
    """Sample completion times and every done hop's queue/lease/done times, from the orchestrator's database."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        done = [
            r[0] for r in db.execute("SELECT done_at FROM samples WHERE status = 'done' ORDER BY done_at")
        ]
        hops = db.execute(
            "SELECT stage, direction, created_at, lease_expires, done_at FROM hops WHERE status = 'done'"
        ).fetchall()
        registered = db.execute("SELECT MAX(registered_at) FROM miners").fetchone()[0]
    finally:
        db.close()
    return {"done_at": done, "hops": hops, "registered_at": registered or 0.0, "n_stages": n_stages}


def stage_view(timing: dict[str, Any], window: tuple[float, float]) -> list[dict[str, Any]]:
    """Per stage over the steady window: hops, mean queue wait and service time per direction, busy fraction."""
    start, end = window
    length = max(end - start, 1e-9)
    rows = []
    for stage in range(timing["n_stages"]):
        held: list[tuple[float, float]] = []
        per_dir: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for s, direction, created, lease_expires, done_at in timing["hops"]:
            if s != stage:
                continue
            leased = lease_expires - LEASE_S
            if min(done_at, end) > max(leased, start):
                held.append((max(leased, start), min(done_at, end)))
            if start <= done_at <= end:
                per_dir[direction].append((leased - created, done_at - leased))
        row: dict[str, Any] = {"stage": stage, "busy": union_length(held) / length}
        for direction, values in per_dir.items():
            row[direction] = {
                "hops": len(values),
                "queued_ms": 1000 * sum(q for q, _ in values) / len(values),
                "service_ms": 1000 * sum(s for _, s in values) / len(values),
            }
        rows.append(row)
    return rows


def union_length(spans: list[tuple[float, float]]) -> float:
    """Total length covered by possibly overlapping intervals."""
    total, reach = 0.0, float("-inf")
    for begin, finish in sorted(spans):
        if finish > reach:
            total += finish - max(begin, reach)
            reach = finish
    return total


# -- report ------------------------------------------------------------------------------------------------------


def print_report(result: dict[str, Any]) -> None:
    net, base = result["network"], result["baseline"]
    m = result["machine"]
    print(
        f"\nmachine: {m['nproc']} x {m['cpu']}, {m['ram_gib']} GiB; load average at the start {m['loadavg'][0]:.2f}"
    )
    print(f"settings: {result['settings']}\n")
    print("| run | tokens (steady) | seconds (steady) | tokens/s |")
    print("|---|---|---|---|")
    for b in result["baselines"]:
        print(
            f"| baseline (1 process, {b['threads']} threads; {b['before']:.0f} before, {b['after']:.0f} after the "
            f"network) | {b['tokens']} | {b['seconds']:.1f} | {b['tokens_per_second']:.0f} |"
        )
    print(
        f"| network ({len(net['stages'])} stages x 1 miner) | {net['steady_tokens']} | {net['steady_seconds']:.1f} "
        f"| {net['tokens_per_second']:.0f} |"
    )
    print(
        f"\nratio network / fastest baseline ({base['threads']} threads): {result['ratio']:.2f} "
        "(target >= 0.8, aim 0.9)"
    )
    print(
        f"network over every completion, the profiled tail included: {net['tokens_per_second_whole']:.0f} tokens/s "
        f"({net['steady_samples']} of {net['samples']} completions measured before the profiler attached)"
    )
    print(
        f"network: {net['samples']} samples, {net['samples_lost']} lost, {net['samples_requeued']} requeued; "
        f"first sample completed {net['first_sample_after_s'] or float('nan'):.1f} s after the last registration; "
        f"whole `iota local` {net['total_seconds']:.0f} s"
    )
    print(
        "\nStages (orchestrator's view over the steady window; service = lease to report, queued = waiting for a miner):"
    )
    print(
        "| stage | busy | forward hops | fwd queued ms | fwd service ms | backward hops | bwd queued ms | bwd service ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in net["stages"]:
        f, b = row.get("forward", {}), row.get("backward", {})
        print(
            f"| {row['stage']} | {row['busy']:.0%} | {f.get('hops', 0)} | {f.get('queued_ms', 0):.0f} "
            f"| {f.get('service_ms', 0):.0f} | {b.get('hops', 0)} | {b.get('queued_ms', 0):.0f} | {b.get('service_ms', 0):.0f} |"
        )
    if net["miners"]:
        cats = ["compute", "recompute", "serialise", "transfer", "rpc", "wait", "outbox", "other"]
        print(
            f"\nMiners (py-spy, wall clock, over the last {net['profiled_training_s']:.0f} s of training; CPU cores "
            "over the measured window before it). Main thread, then the share of wall time each helper thread "
            "spent in requests and transfers:"
        )
        print("| miner | stage | CPU cores | " + " | ".join(cats) + " | " + " | ".join(HELPER_THREADS) + " |")
        print("|---|---|---|" + "---|" * (len(cats) + len(HELPER_THREADS)))
        for role, miner in net["miners"].items():
            shares = " | ".join(f"{miner['breakdown'].get(c, 0.0):.0%}" for c in cats)
            helpers = " | ".join(f"{miner['helpers'].get(h, 0.0):.0%}" for h in HELPER_THREADS)
            print(
                f"| {role} | {miner['stage']} | {net['cpu_cores'].get(role, float('nan')):.2f} | {shares} "
                f"| {helpers} |"
            )
        print(f"orchestrator CPU cores: {net['cpu_cores'].get('orchestrator', float('nan')):.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--samples", type=int, default=40, help="samples (micro-batches) both runs train on")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=0, help="tokens per sequence; 0: the preset's")
    parser.add_argument("--accumulate", type=int, default=2)
    parser.add_argument(
        "--layers-per-stage",
        default="",
        help="comma-separated layers per stage (IOTA_LAYERS_PER_STAGE); empty: even",
    )
    parser.add_argument(
        "--baseline-threads",
        default="0,1",
        help="torch threads of each baseline run (0: torch's default, every core); the ratio takes the fastest",
    )
    parser.add_argument(
        "--profile-s", type=float, default=15.0, help="py-spy window once training is steady; 0: off"
    )
    parser.add_argument("--profile-rate", type=int, default=50, help="py-spy samples per second")
    parser.add_argument(
        "--profile-after",
        type=float,
        default=0.6,
        help="the profiler attaches once this fraction of the samples is done; throughput is measured before",
    )
    parser.add_argument("--work-dir", default="runs/bench-pipeline")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    if args.samples % args.accumulate:
        parser.error("--samples must be a multiple of --accumulate, so both runs train the same tokens")
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    values = run_values(args, work / "data")
    info = machine()
    print(f"baseline: {args.samples} samples of {args.preset} ...", flush=True)
    thread_counts = [int(t) for t in args.baseline_threads.split(",")]
    before = baselines(values, args.samples, thread_counts)
    print("network: `iota local` ...", flush=True)
    net = network(args, values, work)
    print("baseline again, after the network ...", flush=True)
    after = baselines(values, args.samples, thread_counts)
    bases = [pooled(b, a) for b, a in zip(before, after, strict=True)]
    base = max(bases, key=lambda b: b["tokens_per_second"])
    result = {
        "settings": {k: v for k, v in vars(args).items() if k != "json_path"},
        "machine": info,
        "baseline": base,
        "baselines": bases,
        "network": net,
        "ratio": net["tokens_per_second"] / base["tokens_per_second"],
    }
    print_report(result)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
