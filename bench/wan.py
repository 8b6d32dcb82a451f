"""The network over emulated internet links: each miner in a network namespace of its own, behind a link with a
round-trip time and a rate (bench/links.py), against the bound its own compute sets.

Layout: the orchestrator and its store in the root namespace (the datacenter), listening on the bridge; each miner
in its own namespace, reaching them through its link's relay. Production code paths throughout: `iota miner` and
`iota orchestrator` processes, started as `iota local` starts them (iota.local.network), only each miner's command
line prefixed with `ip netns exec`. Needs root (network namespaces); everything it creates is removed at the end,
and leftovers of a killed run at the next start.

Per profile the bench trains `--epochs` epochs of `--samples` samples on S stages x 1 miner and reports:

- measured: samples per second of training, from the first hop leased to the last sample done (state.db);
- compute bound: what the miners' own compute allows with no network at all. Each miner's `compute_s` (its
  status file: seconds in forwards, backwards and inner steps) over the samples gives C_s, the compute per sample
  of stage s; an accumulation window of k samples cannot take less than sum_s C_s + (k - 1) max_s C_s (the first
  sample's forward and backward pass every stage, the other k - 1 follow at the slowest stage's pace; windows do
  not overlap: the next window's forwards need the step that ends this one);
- measured / bound, and where the rest went: the hand-off bytes a window's critical path must carry (2 (S - 1)
  hand-offs, each crossing two links at the link's rate), and what is left expressed in round trips per window;
- requests per hop by route while training (each miner's relay counts what it sent; on loopback, the
  orchestrator's GET /metrics), and each merge phase (UPLOAD, MERGE, APPLY: the orchestrator's phase events)
  against its line-rate bound: the most bytes one miner moved in one direction during it, at the link's rate.

`--emulate 1b` runs GPU-speed stages on these CPUs (bench/emulate.py): each miner sleeps the time bench/stage_gpu.py
measured for its stage of the preset on an H100 and sends that stage's wire size (micro-batch 1 at the preset's
sequence length, hidden / 64 channels, bf16: 131 kB per hand-off for 1b). `--depth d` sets each miner's
IOTA_PIPELINE_DEPTH (d requests for work and d uploads in flight at once) and lets the orchestrator admit them.
The links' own bound is printed beside the compute bound: the bytes the busiest miner moved in one direction
while training, at the link's rate.

Profiles: `loopback` (no namespaces, no relay: the reference), `lan` 10 ms 200 Mbit/s, `wan50` 50 ms 100 Mbit/s,
`wan100` 100 ms 20 Mbit/s, `wan200` 200 ms 10 Mbit/s (the issue's 0.5 % loss is not emulated: bench/links.py).

Run:  python -m bench.wan selftest [--profiles lan wan50 ...]
      python -m bench.wan run [--profiles loopback wan50 wan100] [--preset tiny] [--samples 16] [--accumulate 8]
                              [--epochs 1] [--bottleneck 0] [--emulate 1b] [--codec int8] [--depth 1] [--max-in-flight 0]
                              [--work-dir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx

from bench import emulate
from bench.links import Link, Namespaces, relay_command
from iota.local.network import LocalNetwork, LocalOptions
from iota.model.config import preset

PROFILES: dict[str, Link | None] = {
    "loopback": None,
    "lan": Link(10, 200),
    "wan50": Link(50, 100),
    "wan100": Link(100, 20),
    "wan200": Link(200, 10),
}
REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------------------
# Self-test: a relay on loopback (the same code the namespaces run), timed from this process.


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo small messages; b'U<n>\\n' reads n bytes then answers b'k'; b'D<n>\\n' sends n bytes."""
    while line := await reader.readline():
        if line.startswith(b"U"):
            await reader.readexactly(int(line[1:]))
            writer.write(b"k")
        elif line.startswith(b"D"):
            writer.write(b"x" * int(line[1:]))
        else:
            writer.write(line)
        await writer.drain()
    writer.close()


async def _measure_link(port: int, link: Link, seconds: float) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    started = loop.time()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"ping\n")
    await reader.readline()
    first = loop.time() - started  # handshake + one exchange: 2 RTT
    rtts = []
    for _ in range(20):
        at = loop.time()
        writer.write(b"ping\n")
        await reader.readline()
        rtts.append(loop.time() - at)
    n = int(link.bytes_per_s * seconds)
    at = loop.time()
    writer.write(f"U{n}\n".encode())
    writer.write(b"u" * n)
    await writer.drain()
    await reader.readexactly(1)
    up = loop.time() - at
    at = loop.time()
    writer.write(f"D{n}\n".encode())
    await reader.readexactly(n)
    down = loop.time() - at
    writer.close()
    rtt = statistics.median(rtts)
    # A transfer of n bytes costs n / rate plus one round trip (the request's way out, the last byte's way back).
    return {
        "rtt_ms": 1000 * rtt,
        "first_exchange_rtts": first / (link.rtt_ms / 1000) if link.rtt_ms else float("nan"),
        "up_mbit": n * 8 / 1e6 / max(up - rtt, 1e-9),
        "down_mbit": n * 8 / 1e6 / max(down - rtt, 1e-9),
        "bytes": n,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def selftest(names: list[str], seconds: float) -> list[dict[str, Any]]:
    rows = []
    print(
        f"{'profile':>8} {'rtt set':>8} {'rtt ms':>8} {'first':>6} {'rate set':>9} {'up':>8} {'down':>8}  verdict"
    )
    for name in names:
        link = PROFILES[name]
        if link is None:
            continue

        async def one(link: Link = link) -> dict[str, float]:
            target = await asyncio.start_server(_serve, "127.0.0.1", 0)
            target_port = target.sockets[0].getsockname()[1]
            port = _free_port()
            relay = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.links", "--listen", f"127.0.0.1:{port}",
                "--to", f"127.0.0.1:{target_port}", "--rtt-ms", str(link.rtt_ms), "--mbit", str(link.mbit),
                stdout=asyncio.subprocess.PIPE, cwd=REPO,
            )  # fmt: skip
            assert relay.stdout is not None
            await relay.stdout.readline()  # listening
            try:
                return await _measure_link(port, link, seconds)
            finally:
                relay.terminate()
                await relay.wait()
                target.close()

        m = asyncio.run(one())
        ok_rtt = abs(m["rtt_ms"] - link.rtt_ms) <= 1.0
        ok_rate = all(abs(m[k] - link.mbit) <= 0.1 * link.mbit for k in ("up_mbit", "down_mbit"))
        verdict = (
            "ok"
            if ok_rtt and ok_rate
            else "OFF: " + ("rtt " if not ok_rtt else "") + ("rate" if not ok_rate else "")
        )
        print(
            f"{name:>8} {link.rtt_ms:>8.0f} {m['rtt_ms']:>8.2f} {m['first_exchange_rtts']:>6.2f} {link.mbit:>9.0f} "
            f"{m['up_mbit']:>8.2f} {m['down_mbit']:>8.2f}  {verdict}",
            flush=True,
        )
        rows.append({"profile": name, **m, "ok": ok_rtt and ok_rate})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# A network run across namespaces.


class WanNetwork(LocalNetwork):
    """`iota local`'s processes with every role but the orchestrator in a namespace behind `link`."""

    def __init__(
        self,
        options: LocalOptions,
        link: Link | None,
        namespaces: Namespaces | None,
        emulate: str | None = None,
        depth: int = 1,
    ):
        super().__init__(options)
        self.link, self.namespaces, self.emulate = link, namespaces, emulate
        # Each miner keeps `depth` requests and transfers in flight; the orchestrator lets it hold their leases.
        self.common["IOTA_PIPELINE_DEPTH"] = str(depth)
        self.orch_env["IOTA_MAX_LEASES_HELD"] = str(max(4, 2 * depth + 2))
        # And lets its requests in (the bench measures the protocol, not the orchestrator's limits): a miner's share
        # of the requests in progress is an eighth of the bound; a GPU-speed miner makes 2-4 orchestrator requests
        # per hop, 50 hops a second at a 1b stage; on loopback every miner's requests come from 127.0.0.1, so one
        # address's rate limit would bound them all.
        self.orch_env["IOTA_MAX_REQUESTS_IN_PROGRESS"] = str(max(32, 8 * 2 * (depth + 1)))
        self.orch_env["IOTA_RATE_PER_HOTKEY"] = "400"
        self.orch_env["IOTA_RATE_PER_IP"] = "2000"
        if emulate:
            self.common["PYTHONPATH"] = str(REPO)  # the processes run in the run directory: bench.emulate
        self.relays: list[subprocess.Popen[bytes]] = []
        self.link_stats: dict[str, Path] = {}  # role name -> its relay's counters (JSON lines)
        if link is not None:
            # Listen on the bridge too (on every address of the host, for the bench's length); miners reach
            # 127.0.0.1:port in their namespace, which is their relay, and the bench polls 127.0.0.1:port here.
            self.orch_env["IOTA_HOST"] = "0.0.0.0"
            self.orch_env["IOTA_PUBLIC_URL"] = self.url

    def command(self, name: str, role: str) -> list[str]:
        if role == "miner" and self.emulate:
            own = [sys.executable, "-m", "bench.emulate", "--preset", self.emulate]
        else:
            own = super().command(name, role)
        if self.link is None or self.namespaces is None or role == "orchestrator":
            return own
        namespace, _ = self.namespaces.add()
        stats = self.run_dir / "links" / f"{name}.jsonl"
        stats.parent.mkdir(exist_ok=True)
        self.link_stats[name] = stats
        command = relay_command(namespace, self.port, self.link, str(stats))
        relay = subprocess.Popen(command, stdout=subprocess.PIPE, cwd=REPO)
        assert relay.stdout is not None
        if not relay.stdout.readline():
            raise RuntimeError(f"the relay in {namespace} did not start")
        self.relays.append(relay)
        return ["ip", "netns", "exec", namespace, *own]

    def close_relays(self) -> None:
        for relay in self.relays:
            relay.terminate()
        for relay in self.relays:
            relay.wait(timeout=10)


def run_settings(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    tokens_per_sample = args.micro_batch * args.seq_len_tokens
    total = args.epochs * args.samples * tokens_per_sample
    emulated = emulate.run_overrides(args.emulate) if args.emulate else {}
    return {
        "preset": args.preset,
        "stages": args.stages,
        "epochs": args.epochs,
        "samples_per_epoch": args.samples,
        "micro_batch": args.micro_batch,
        "accumulate": args.accumulate,
        "bottleneck": args.bottleneck,
        "codec": args.codec,
        "warmup_tokens": total // 10,
        "total_tokens": total,
        "data_dir": str(data_dir),
        **emulated,
    }


_METRIC = re.compile(r"^iota_http_request_duration_seconds_count\{(?P<labels>.*)\} (?P<value>\S+)$")


def request_counts(metrics: str) -> dict[str, int]:
    """Requests served by 'METHOD route', from the orchestrator's GET /metrics text."""
    counts: dict[str, int] = defaultdict(int)
    for line in metrics.splitlines():
        match = _METRIC.match(line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
            counts[f"{labels.get('method', '?')} {labels.get('route', '?')}"] += int(float(match["value"]))
    return dict(counts)


def network_run(args: argparse.Namespace, name: str, work: Path) -> dict[str, Any]:
    link = PROFILES[name]
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    options = LocalOptions(
        miners_per_stage=1,
        validators=0,
        run_dir=run_dir,
        overrides=run_settings(args, work / "data"),
        snapshot_rate=0.0,  # nobody audits this run
        max_in_flight=args.max_in_flight or args.accumulate,
        progress=False,
    )
    namespaces = Namespaces() if link is not None else None
    net = WanNetwork(options, link, namespaces, args.emulate, args.depth)
    threads = max(1, len(os.sched_getaffinity(0)) // args.stages)
    try:
        net.start_orchestrator()
        for _ in range(args.stages):
            net.add_miner(threads=threads)
        status = net.wait_until(lambda st: st.phase == "done", args.timeout_s)
        metrics = httpx.get(f"{net.url}/metrics", timeout=10).text
        miners = [_miner_status(run_dir / m) for m in net.miner_names]
    finally:
        net.stop()
        net.close_relays()
        if namespaces is not None:
            namespaces.close()
    links = [_read_lines(net.link_stats[m]) for m in net.miner_names if m in net.link_stats]
    return summarize(
        args, name, link, run_dir, status.samples_completed, metrics, miners, links, options.lease_s
    )


def _read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _counters_at(lines: list[dict[str, Any]], t: float) -> dict[str, Any]:
    """A link's cumulative counters (up, down bytes; requests by route) at wall-clock time t."""
    latest: dict[str, Any] = {"up": 0, "down": 0, "requests": {}}
    for line in lines:
        if line["t"] > t:
            break
        latest = line
    return latest


def _sent(links: list[list[dict[str, Any]]], start: float, end: float) -> dict[str, int]:
    """Requests the roles sent across their links between two times, by route (numbers in paths as {n})."""
    sent: dict[str, int] = defaultdict(int)
    for lines in links:
        before, after = _counters_at(lines, start)["requests"], _counters_at(lines, end)["requests"]
        for route, n in after.items():
            sent[re.sub(r"/\d+(?=/|$)", "/{n}", route)] += n - before.get(route, 0)
    return {route: n for route, n in sent.items() if n}


def _miner_status(miner_dir: Path) -> dict[str, Any]:
    files = sorted(miner_dir.glob("status-*.json"))
    return json.loads(files[0].read_text()) if files else {}


def summarize(
    args: argparse.Namespace,
    name: str,
    link: Link | None,
    run_dir: Path,
    samples: int,
    metrics: str,
    miners: list[dict[str, Any]],
    links: list[list[dict[str, Any]]],
    lease_s: float,
) -> dict[str, Any]:
    db = sqlite3.connect(f"file:{run_dir / 'orchestrator' / 'state.db'}?mode=ro", uri=True)
    try:
        # A hop's lease time is its expiry less the lease length (the orchestrator's IOTA_LEASE_S).
        first = (
            db.execute("SELECT MIN(lease_expires) FROM hops WHERE status = 'done'").fetchone()[0] - lease_s
        )
        done = [
            r[0] for r in db.execute("SELECT done_at FROM samples WHERE status = 'done' ORDER BY done_at")
        ]
        hops = db.execute("SELECT COUNT(*) FROM hops WHERE status = 'done'").fetchone()[0]
        moved, outputs = db.execute(
            "SELECT COALESCE(SUM(output_size), 0), COUNT(*) FROM hops WHERE status = 'done' AND output_size > 0"
        ).fetchone()
        phases = [
            (at, json.loads(detail))
            for at, detail in db.execute("SELECT at, detail FROM events WHERE kind = 'phase'")
        ]
    finally:
        db.close()
    k, stages = args.accumulate, args.stages
    per_sample = [float(m.get("compute_s", 0.0)) / max(samples, 1) for m in miners]
    window_compute = sum(per_sample) + (k - 1) * max(per_sample)
    windows = samples / k
    measured_s = done[-1] - first
    bound_s = windows * window_compute
    handoff_bytes = moved / max(outputs, 1)
    wire_s = 0.0 if link is None else 2 * (stages - 1) * 2 * handoff_bytes / link.bytes_per_s
    lost_s = measured_s / windows - window_compute - wire_s
    if links:  # what the miners sent across their links while training, store transfers included
        requests = _sent(links, first, done[-1])
    else:  # loopback: what the orchestrator served, but the bench's own polling
        requests = request_counts(metrics)
        for own in ("GET /status", "GET /metrics", "GET /events"):
            requests.pop(own, None)
    # The links' own bound: the bytes the busiest miner moved in one direction while training, at the link's rate.
    link_bound_s = _line_rate_s(links, first, done[-1], link) if link is not None and links else 0.0
    merges = _merge_windows(phases)
    merge_bound, merge_requests = [], []
    for start, end in merges:
        if link is None or not links:
            continue
        merge_bound.append(_line_rate_s(links, start, end, link))
        merge_requests.append(sum(_sent(links, start, end).values()) / len(links))
    # UPLOAD, MERGE and APPLY follow one another, so each phase has its own bound: (phase, measured, line rate).
    per_phase = [
        (phase, end - start, _line_rate_s(links, start, end, link) if link and links else None)
        for phase, start, end in _phase_spans(phases)
    ]
    return {
        "profile": name,
        "link": None if link is None else {"rtt_ms": link.rtt_ms, "mbit": link.mbit},
        "samples": samples,
        "hops": hops,
        "measured_s": measured_s,
        "samples_per_s": samples / measured_s,
        "compute_per_sample_s": per_sample,
        "bound_s": bound_s,
        "ratio": bound_s / measured_s,
        "link_bound_s": link_bound_s,
        "ratio_to_both": max(bound_s, link_bound_s) / measured_s,
        "handoff_bytes": handoff_bytes,
        "wire_s_per_window": wire_s,
        "lost_s_per_window": lost_s,
        "round_trips_lost_per_window": None if link is None else lost_s / (link.rtt_ms / 1000),
        "requests_per_hop": {route: n / max(hops, 1) for route, n in sorted(requests.items())},
        "merge_s": [end - start for start, end in merges],
        "merge_line_rate_s": merge_bound,
        "merge_requests_per_miner": merge_requests,
        "merge_phases": per_phase,
    }


def _phase_spans(phases: list[tuple[float, dict[str, Any]]]) -> list[tuple[str, float, float]]:
    """(phase, start, end) of each UPLOAD, MERGE and APPLY, from the orchestrator's phase events."""
    ordered = sorted(phases, key=lambda e: e[0])
    return [
        (detail["phase"], at, next_at)
        for (at, detail), (next_at, _) in zip(ordered, ordered[1:], strict=False)
        if detail.get("phase") in ("upload", "merge", "apply")
    ]


def _merge_windows(phases: list[tuple[float, dict[str, Any]]]) -> list[tuple[float, float]]:
    """Per epoch: from UPLOAD's start to the next TRAIN (or DONE)."""
    spans, upload_at = [], None
    for phase, start, end in _phase_spans(phases):
        if phase == "upload":
            upload_at = start
        elif phase == "apply" and upload_at is not None:
            spans.append((upload_at, end))
            upload_at = None
    return spans


def _line_rate_s(links: list[list[dict[str, Any]]], start: float, end: float, link: Link) -> float:
    """The least time the link allows for what crossed it between two times: the most bytes one miner moved in
    one direction, at the link's rate (its two directions run at once)."""
    moved = []
    for lines in links:
        before, after = _counters_at(lines, start), _counters_at(lines, end)
        moved.append(max(after["up"] - before["up"], after["down"] - before["down"]))
    return max(moved) / link.bytes_per_s


def print_run(r: dict[str, Any]) -> None:
    link = r["link"]
    where = "loopback" if link is None else f"{link['rtt_ms']:.0f} ms, {link['mbit']:.0f} Mbit/s"
    compute = "/".join(f"{c:.2f}" for c in r["compute_per_sample_s"])
    rts = "-" if r["round_trips_lost_per_window"] is None else f"{r['round_trips_lost_per_window']:.1f}"
    print(
        f"{r['profile']:>8} ({where}): {r['samples']} samples in {r['measured_s']:.1f} s = {r['samples_per_s']:.3f}/s;"
        f" compute per sample {compute} s; bound {r['bound_s']:.1f} s; measured/bound {r['ratio']:.2f};"
        f" link bound {r['link_bound_s']:.1f} s; measured/max(bounds) {r['ratio_to_both']:.2f};"
        f" hand-off {r['handoff_bytes'] / 1e3:.1f} kB, wire {r['wire_s_per_window']:.2f} s/window;"
        f" lost {r['lost_s_per_window']:.2f} s/window = {rts} round trips",
        flush=True,
    )
    per_hop = ", ".join(f"{route} {n:.2f}" for route, n in r["requests_per_hop"].items() if n >= 0.01)
    merge = ", ".join(f"{s:.1f}" for s in r["merge_s"])
    bound = ", ".join(f"{s:.1f}" for s in r["merge_line_rate_s"]) or "-"
    merge_requests = ", ".join(f"{n:.0f}" for n in r["merge_requests_per_miner"]) or "-"
    print(f"{'':>10}requests per hop while training: {per_hop}", flush=True)
    phases = "; ".join(
        f"{phase} {took:.1f} s"
        + ("" if bound is None else f" (line rate {bound:.1f} s, {took / bound:.2f}x)")
        for phase, took, bound in r["merge_phases"]
    )
    print(f"{'':>10}{phases}", flush=True)
    print(
        f"{'':>10}merge {merge} s; its line-rate bound {bound} s; requests per miner {merge_requests}",
        flush=True,
    )


def machine() -> str:
    load = os.getloadavg()
    return f"{platform.machine()}, {os.cpu_count()} cores, load {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("what", choices=["selftest", "run"])
    parser.add_argument("--profiles", nargs="+", choices=list(PROFILES), default=None)
    parser.add_argument("--seconds", type=float, default=2.0, help="selftest: seconds of each bulk transfer")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--samples", type=int, default=16, help="samples per epoch")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--accumulate", type=int, default=8)
    parser.add_argument("--bottleneck", type=int, default=0)
    parser.add_argument(
        "--codec", default="", help="the run's activation codec (iota.model.codecs), e.g. int8"
    )
    parser.add_argument("--depth", type=int, default=1, help="each miner's IOTA_PIPELINE_DEPTH")
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=0,
        help="graphs a miner may hold (0: --accumulate, a window's worth)",
    )
    parser.add_argument(
        "--emulate",
        default=None,
        metavar="PRESET",
        help="miners sleep this preset's measured GPU stage times and send its wire size (bench/emulate.py)",
    )
    parser.add_argument("--timeout-s", type=float, default=1800)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench-wan"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    print(f"bench.wan {args.what}: {machine()}", flush=True)
    if args.what == "selftest":
        rows = selftest(args.profiles or [n for n, link in PROFILES.items() if link], args.seconds)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        return 0 if all(r["ok"] for r in rows) else 1
    if os.geteuid() != 0:
        print("bench.wan run needs root (network namespaces)", file=sys.stderr)
        return 2
    if args.emulate:
        args.micro_batch = 1
    args.seq_len_tokens = preset(args.emulate or args.preset, vocab_size=512).seq_len  # for the token count
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.profiles or ["loopback", "wan50", "wan100"]:
        result = network_run(args, name, work)
        print_run(result)
        results.append(result)
    print(f"done: {machine()}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
