"""Orchestrator under load: N simulated miners at ~1 request/s each against `python -m iota orchestrator`.

For each N the orchestrator is started fresh as a subprocess (preset `test`, LocalStore, SQLite, LocalChain, IOTA_*
settings, rate limits raised out of the way, an epoch too long to end during the bench), and the load generator
(bench/loadgen.py) runs in a second subprocess: every simulated miner registers, then loops POST /work -> GET
input -> PUT output -> POST /work/{id}/report, signed with its own sr25519 hotkey, paced so the offered load is
N * rate requests/s (storage transfers count as requests: with a LocalStore they are served by the same process).

Measured over a window that opens once every miner is registered plus a warm-up: requests/s achieved (all, those
answered < 400, and those refused with 503 by the orchestrator's admission control, which the simulated miners
honour), p50/p99 latency per route, errors by status, how late the generator sent (if it falls behind its own
schedule the offered load was not offered), CPU of both processes (the orchestrator's per request is the figure to
compare across machines), and afterwards GET /status and the state database for the accounting: samples_lost == 0
and completed + in flight == allocated (the allocation cursor). With py-spy installed, the same load then runs on
for --profile-s seconds, unmeasured, while `py-spy record --gil` (the thread holding the GIL, 100 Hz, non-blocking)
samples the orchestrator (attaching slows the process, so it never runs inside the measured window); its samples
are put in categories by the innermost frame (chain lookup, nonce store, signature check, state database, storage,
scheduler/service, pydantic, HTTP stack). Time in C code that releases the GIL (SQLite's statements) is not in it.

Keys (random seeds) are generated once and cached in the work dir with one LocalChain file per N (registering 5000
hotkeys through LocalChain.register takes a couple of minutes, once).

Each N runs once per --hold-s value: 0, miners ask for work at their pace and get `wait` while there is none
(the protocol before long-polling); H > 0, a request for work is held up to H seconds while there is none and
answered when work comes, as `iota miner` asks (IOTA_HOLD_S, 10 s). Held requests' latencies are counted without
the hold (the orchestrator reports it in X-Iota-Held-Ms); how many were held and for how long is printed apart.

Run:  python -m bench.orchestrator_load [--miners 100,1000,5000] [--hold-s 0,10] [--seconds 30] [--rate 1]
                                       [--max-in-progress N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx

from bench.pipeline import Profile, cpu_seconds, machine, py_spy, read_profile, top_frames

# Orchestrator stack categories, by the innermost frame that matches (leaf first).
ORCH_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("chain lookup", ("iota/chain/",)),
    ("nonce store", ("auth/nonces.py",)),
    ("signature check", ("http_auth", "auth/verify.py", "auth/ratelimit.py")),
    ("state database", ("state/db.py", "orchestrator/state.py")),
    ("storage", ("iota/storage/",)),
    ("scheduler/service", ("iota/orchestrator/", "iota/protocol/")),
    ("pydantic", ("pydantic",)),
    ("HTTP stack", ("fastapi", "starlette", "uvicorn", "anyio", "h11", "httptools", "asyncio", "concurrent")),
)


# Leaf frames of threads that wait (py-spy counts some of them as active): the event loop in epoll, idle workers
# of the thread pool.
IDLE_LEAVES = ("EpollSelector.select (", "Queue.get (", "Condition.wait (", "Event.wait (", "Thread.join (")


def start_gil_profile(pid: int, seconds: float, out_dir: Path) -> subprocess.Popen[bytes]:
    """`py-spy record` of the thread holding the GIL, 100 Hz, without pausing the process: where its one core of
    Python goes. (Time in C code that releases the GIL, such as SQLite's statements, is not in it.)"""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [str(py_spy()), "record", "-p", str(pid), "-d", str(max(1, round(seconds))), "-r", "100", "--gil"]
    cmd += ["--nonblocking", "--format", "raw", "-o", str(out_dir / "orchestrator.txt")]
    log = open(out_dir / "orchestrator.log", "wb")  # noqa: SIM115 (the child writes it)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def classify_orchestrator(frames: list[str]) -> str:
    if frames and frames[-1].startswith(IDLE_LEAVES):
        return "idle"
    for frame in reversed(frames):
        for name, markers in ORCH_CATEGORIES:
            if any(m in frame for m in markers):
                return name
    return "other"


def ensure_keys(work: Path, n: int) -> Path:
    """At least n random sr25519 seeds in work/keys.json (hex), generated once."""
    path = work / "keys.json"
    seeds: list[str] = json.loads(path.read_text()) if path.exists() else []
    if len(seeds) < n:
        seeds += [secrets.token_hex(32) for _ in range(n - len(seeds))]
        path.write_text(json.dumps(seeds))
    return path


def ensure_chain(work: Path, keys: Path, n: int) -> Path:
    """A LocalChain file on which the first n hotkeys are registered (a subnet of n miners)."""
    from bittensor.keyfiles import Keypair

    from iota.chain.local import LocalChain

    path = work / f"chain-{n}.json"
    done = work / f"chain-{n}.done"
    if done.exists():
        return path
    for stale in (path, path.with_name(path.name + ".lock")):
        stale.unlink(missing_ok=True)
    chain = LocalChain(path, max_neurons=max(n, 256))
    started = time.monotonic()
    for seed in json.loads(keys.read_text())[:n]:
        address = Keypair.create_from_seed(bytes.fromhex(seed)).ss58_address
        chain.register(address, address)
    done.write_text(f"{time.monotonic() - started:.1f} s\n")
    return path


def start_orchestrator(
    work: Path, n: int, chain: Path, port: int, args: argparse.Namespace, hold_s: float
) -> tuple[subprocess.Popen[bytes], str]:
    from iota.auth import create_wallet

    run_dir = work / f"run-{n}-hold{hold_s:g}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    wallets = work / "wallets"
    hotkey = create_wallet(wallets, "orchestrator", "default", exist_ok=True).hotkey.ss58_address
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOTA_")}
    env.update(
        {
            "IOTA_CHAIN": "local",
            "IOTA_CHAIN_PATH": str(chain),
            "IOTA_WALLET_PATH": str(wallets),
            "IOTA_WALLET_NAME": "orchestrator",
            "IOTA_WALLET_HOTKEY": "default",
            "IOTA_PORT": str(port),
            "IOTA_RUN_ID": "bench",
            "IOTA_RUN_DIR": str(run_dir),
            "IOTA_PRESET": "test",
            "IOTA_DATA_DIR": str(work / "data"),
            "IOTA_SAMPLES_PER_EPOCH": str(10**9),  # the epoch never ends during the bench: no merge phases
            "IOTA_EPOCHS": "1",
            "IOTA_RATE_PER_HOTKEY": "1000000",
            "IOTA_RATE_PER_IP": "1000000000",
            # Each simulated miner keeps a connection open; uvicorn answers 503 beyond this many.
            "IOTA_MAX_CONNECTIONS": str(max(2048, 2 * n + 256)),
            "IOTA_MAX_HOLD_S": str(hold_s),
        }
    )
    if args.max_in_progress is not None:
        env["IOTA_MAX_REQUESTS_IN_PROGRESS"] = str(args.max_in_progress)
    log = open(run_dir / "orchestrator.log", "wb")  # noqa: SIM115 (the child writes it)
    # cwd = the run dir, so a developer's .env in the repository is not read.
    proc = subprocess.Popen(
        [sys.executable, "-m", "iota", "orchestrator"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=run_dir,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the orchestrator exited; see {run_dir / 'orchestrator.log'}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/status", timeout=2).status_code == 200:
                return proc, hotkey
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the orchestrator did not answer within 300 s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def ledger(state_db: Path) -> dict[str, int]:
    """The sample accounting as the state database holds it (read after the orchestrator stopped)."""
    db = sqlite3.connect(f"file:{state_db}?mode=ro", uri=True)
    try:
        kv = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM kv")}
        active = db.execute("SELECT COUNT(*) FROM samples WHERE status = 'active'").fetchone()[0]
    finally:
        db.close()
    return {
        "allocated": int(kv.get("cursor", 0)),
        "completed": int(kv.get("samples_completed", 0)),
        "in_flight": int(active),
        "requeued": int(kv.get("samples_requeued", 0)),
    }


def status_of(url: str) -> dict[str, Any] | None:
    """GET /status once the load is off; None if the orchestrator is still too backed up to answer."""
    try:
        return httpx.get(f"{url}/status", timeout=30).json()  # type: ignore[no-any-return]
    except (httpx.HTTPError, ValueError):
        return None


def one_level(work: Path, n: int, hold_s: float, keys: Path, args: argparse.Namespace) -> dict[str, Any]:
    from iota.local import free_port

    chain = ensure_chain(work, keys, n)
    port = free_port()
    orch, hotkey = start_orchestrator(work, n, chain, port, args, hold_s)
    run_dir = work / f"run-{n}-hold{hold_s:g}"
    url = f"http://127.0.0.1:{port}"
    out = run_dir / "load.json"
    cmd = [sys.executable, "-m", "bench.loadgen", "--url", url, "--receiver", hotkey, "--keys", str(keys)]
    cmd += ["--miners", str(n), "--rate", str(args.rate), "--seconds", str(args.seconds)]
    cmd += [
        "--warmup-s",
        str(args.warmup_s),
        "--out",
        str(out),
        "--download" if args.download else "--no-download",
        "--profile-s",
        str(args.profile_s if py_spy() else 0),
        "--ramp-s",
        str(args.ramp_s),
        "--hold-s",
        str(hold_s),
    ]
    profile: Profile | None = None
    spies: dict[str, subprocess.Popen[bytes]] = {}
    orch_cpu = float("nan")
    try:
        load = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[1]
        )
        assert load.stdout is not None
        lines: list[str] = []
        cpu0, t0 = None, 0.0
        for raw in load.stdout:
            line = raw.decode(errors="replace").rstrip()
            lines.append(line)
            if line == "WINDOW":  # the generator's measured window opens now
                cpu0, t0 = cpu_seconds(orch.pid), time.monotonic()
            elif line == "PROFILE":  # an unmeasured stretch of the same load, for the profiler
                spies = {"orchestrator": start_gil_profile(orch.pid, args.profile_s, run_dir / "profile")}
            elif line == "CLOSED" and cpu0 is not None:
                cpu1 = cpu_seconds(orch.pid)
                orch_cpu = (cpu1 - cpu0) / (time.monotonic() - t0) if cpu1 is not None else orch_cpu
        if load.wait() != 0 or not out.exists():
            raise RuntimeError("the load generator failed:\n" + "\n".join(lines[-30:]))
        for name, spy in spies.items():
            spy.wait(120)
            profile = read_profile(
                orch.pid, run_dir / "profile" / f"{name}.txt", run_dir / "profile" / f"{name}.log"
            )
        status = status_of(url)
    finally:
        stop(orch)
    result: dict[str, Any] = json.loads(out.read_text())
    result["orchestrator_cpu_cores"] = orch_cpu
    # Checked twice: by the orchestrator's own GET /status, and independently from its database once stopped.
    books: dict[str, Any] = dict(ledger(run_dir / "state.db"))
    books["lost"] = books["allocated"] - books["completed"] - books["in_flight"]
    books["status_lost"] = status["samples_lost"] if status else None
    books["balanced"] = books["lost"] == 0 and (status is None or status["samples_lost"] == 0)
    result["accounting"] = books
    if profile is not None:
        busy = Profile(profile.pid, [(f, c) for f, c in profile.stacks if not f[-1].startswith(IDLE_LEAVES)])
        counts: dict[str, int] = defaultdict(int)
        for frames, count in profile.stacks:
            counts[classify_orchestrator(frames)] += count
        total = max(profile.samples, 1)
        result["orchestrator_profile"] = {
            "samples": profile.samples,
            "error": profile.error,
            "categories": {k: v / total for k, v in sorted(counts.items(), key=lambda kv: -kv[1])},
            "top_self": top_frames(busy, 15),
            # The uvicorn entry (iota/cli/roles.py) is in every stack: a sample with no deeper iota frame goes to its leaf.
            "top_iota": top_frames(
                busy,
                15,
                keep=(
                    "(iota/orchestrator",
                    "(iota/auth",
                    "(iota/state",
                    "(iota/storage",
                    "(iota/chain",
                    "(bittensor/",
                ),
            ),
        }
    return result


def print_level(r: dict[str, Any]) -> None:
    acc = r["accounting"]
    held = (
        f"POST /work held (long-poll, up to {r['hold_s']:g} s): {r['held_requests']} requests held, p50 "
        f"{r['held_p50_s']:.2f} s; latencies below exclude the hold"
        if r["hold_s"]
        else "POST /work not held: a miner without work is told to wait and asks again"
    )
    print(
        f"\n## {r['miners']} miners, {held}\noffered up to {r['offered_per_second']:.0f} req/s, achieved "
        f"{r['per_second']:.0f} req/s "
        f"({r['ok_per_second']:.0f} answered < 400, {r['refused_503_per_second']:.0f} refused 503); "
        f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms; without the 503s p50 {r['served_p50_ms']:.1f} ms, "
        f"p99 {r['served_p99_ms']:.1f} ms"
    )
    orch_ms = 1000 * r["orchestrator_cpu_cores"] / max(r["per_second"], 1e-9)
    print(
        f"registered in {r['registered_after_s']:.1f} s (register p50 {r['register_p50_ms']:.0f} ms, p99 "
        f"{r['register_p99_ms']:.0f} ms); generator late p50 {r['late_p50_ms']:.0f} ms p99 {r['late_p99_ms']:.0f} ms; "
        f"CPU cores: orchestrator {r['orchestrator_cpu_cores']:.2f} ({orch_ms:.2f} ms per request), generator "
        f"{r['loadgen_cpu_cores']:.2f} ({r['loadgen_cpu_ms_per_request']:.2f} ms per request)"
    )
    print("| route | requests/s | p50 ms | p99 ms | max ms | statuses |")
    print("|---|---|---|---|---|---|")
    for route, s in r["routes"].items():
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(s["status"].items()))
        print(
            f"| {route} | {s['per_second']:.0f} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | {s['max_ms']:.0f} | {statuses} |"
        )
    print(
        f"work answers: {r['work_kinds']}; wait reasons: {r['wait_reasons']}; re-registrations {r['reregistered']}"
    )
    seen = (
        "no answer to GET /status"
        if acc["status_lost"] is None
        else f"/status says lost {acc['status_lost']}"
    )
    print(
        f"accounting (state database): allocated {acc['allocated']} = completed {acc['completed']} + in flight "
        f"{acc['in_flight']}; lost {acc['lost']} ({seen}), requeued {acc['requeued']}: "
        f"{'balanced' if acc['balanced'] else 'NOT BALANCED'}"
    )
    prof = r.get("orchestrator_profile")
    if prof:
        cats = ", ".join(f"{k} {v:.0%}" for k, v in prof["categories"].items())
        print(
            f"orchestrator profile ({prof['samples']} samples; shares of the busy ones by innermost iota frame):"
        )
        print(f"  {cats}")
        for frame, share in prof["top_iota"][:8]:
            print(f"  {share:6.1%}  {frame}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--miners", default="100,1000,5000", help="comma-separated simulated miner counts")
    parser.add_argument(
        "--hold-s",
        default="0,10",
        help="comma-separated holds of POST /work (long-poll; 0: none), each run per N",
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="measured window per level")
    parser.add_argument("--rate", type=float, default=1.0, help="requests per second per miner")
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument(
        "--ramp-s", type=float, default=10.0, help="simulated miners join over this many seconds"
    )
    parser.add_argument("--download", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--profile-s",
        type=float,
        default=15.0,
        help="py-spy the orchestrator this long after the window; 0: off",
    )
    parser.add_argument(
        "--max-in-progress",
        type=int,
        default=None,
        help="IOTA_MAX_REQUESTS_IN_PROGRESS of the orchestrator (admission control; 0: no bound); default: its own",
    )
    parser.add_argument("--work-dir", default="runs/bench-orchestrator-load")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    levels = [int(n) for n in args.miners.split(",")]
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    info = machine()
    keys = ensure_keys(work, max(levels))
    results = []
    for n in levels:
        for hold_s in [float(h) for h in args.hold_s.split(",")]:
            print(f"{n} miners, hold {hold_s:g} s ...", flush=True)
            results.append(one_level(work, n, hold_s, keys, args))
            print_level(results[-1])
    m = info
    print(
        f"\nmachine: {m['nproc']} x {m['cpu']}, {m['ram_gib']} GiB; load average at the start {m['loadavg'][0]:.2f}"
    )
    if args.json_path:
        report = {
            "settings": {k: v for k, v in vars(args).items() if k != "json_path"},
            "machine": info,
            "levels": results,
        }
        Path(args.json_path).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
