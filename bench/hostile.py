"""Hostile strangers beside a real run: does training keep its rate, lose nothing, and leave a bounded footprint?

Two `iota local` networks run one after the other with the same settings (preset `test`, 3 stages x 1 miner, local
store, SQLite): a quiet one, and one with a mix of hostile clients started beside it once every miner is working.
All the hostile traffic is on loopback and bounded (threads, connections and request rates are fixed below):

- slow bodies: --slow connections from 127.0.0.2 send an unsigned POST's headers, then one body byte every 2 s;
  as many again send their headers one byte every 2 s (reconnecting whenever the server closes them).
- read flood: GET /scores, /metrics, /status and /events round robin from 127.0.0.3 at --read-rate requests/s.
- idle miners: --idle registered miners that only register and heartbeat (they owe the phase waits nothing).
- a hostile registered miner (the project's own client and a real key): it leases work and answers each item in
  turn with an output of the right size whose safetensors header is JSON nested 2,000 deep (correct digests); with
  a well-formed output of the wrong shape that it then re-PUTs with other bytes after its report; and with a report
  whose sha256 names other bytes (forged digest); between items it sends reports with oversized fields (a 600 KB
  string, 2**63, NaN) that must be refused with a 4xx.

Printed for each run: training samples/s (samples completed from the first completion, when the hostile clients
start, to the last epoch, over that time),
samples lost (/status), processes that died, 5xx answers the hostile clients saw and tracebacks in the
orchestrator's log, and per epoch the store's bytes (the run's local store folder) and the state database's bytes
(SQLite file with its WAL). The ratio hostile / quiet of samples/s is the figure (goal >= 0.8).

Run:  python -m bench.hostile [--epochs 20] [--samples 8] [--slow 40] [--read-rate 20] [--idle 2] [--lease-s 15]
                             [--json FILE]
      (--quiet-only / --hostile-only run one side; a 2-core box takes ~2 x 10 minutes at the defaults)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import secrets
import shutil
import socket
import sqlite3
import struct
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from bench.pipeline import machine
from iota.auth import create_wallet
from iota.client.orchestrator import OrchestratorClient, Refused
from iota.local.network import LocalNetwork, LocalOptions
from iota.protocol import RegisterRequest, Report


class Tally:
    """Answers seen by the hostile clients, by client and status class; thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def add(self, who: str, status: int | str) -> None:
        key = f"{who} {status // 100}xx" if isinstance(status, int) else f"{who} {status}"
        with self.lock:
            self.counts[key] += 1

    def fivexx(self) -> int:
        return sum(n for k, n in self.counts.items() if k.endswith(" 5xx") and " 503" not in k)


def _connect(host: str, port: int, source: str) -> socket.socket | None:
    try:
        s = socket.create_connection((host, port), timeout=5, source_address=(source, 0))
        s.setblocking(False)
        return s
    except OSError:
        return None


def slow_clients(url: str, n: int, stop: threading.Event, tally: Tally) -> None:
    """n connections trickling a body (headers sent whole) and n trickling their headers, one byte every 2 s."""
    host, port = url.removeprefix("http://").split(":")
    body_head = (
        b"POST /work HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 4096\r\n\r\n"
    )
    slow_head = b"POST /work HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 4000
    conns: list[list[Any]] = [[None, body_head, True] for _ in range(n)] + [
        [None, slow_head, False] for _ in range(n)
    ]
    while not stop.is_set():
        for conn in conns:
            sock, head, whole = conn
            if sock is None:
                sock = _connect(host, int(port), "127.0.0.2")
                if sock is None:
                    tally.add("slow", "refused-connect")
                    continue
                conn[0], conn[2] = sock, whole
                try:
                    if whole:
                        sock.send(head)
                except OSError:
                    conn[0] = None
                    continue
            try:
                sock.send(b"{" if whole else head[:1])
                if not whole:
                    conn[1] = head[1:] or slow_head
                data = sock.recv(4096)
                if data == b"" or data.startswith(b"HTTP/1.1"):
                    if data.startswith(b"HTTP/1.1"):
                        tally.add("slow", int(data[9:12]))
                    sock.close()
                    conn[0], conn[1] = None, body_head if whole else slow_head
            except BlockingIOError:
                pass
            except OSError:
                sock.close()
                conn[0], conn[1] = None, body_head if whole else slow_head
        stop.wait(2.0)
    for sock, _, _ in conns:
        if sock is not None:
            sock.close()


def read_flood(url: str, rate: float, stop: threading.Event, tally: Tally) -> None:
    paths = ["/scores", "/metrics", "/status", "/events"]
    transport = httpx.HTTPTransport(local_address="127.0.0.3")
    with httpx.Client(base_url=url, timeout=30, transport=transport) as http:
        i = 0
        while not stop.is_set():
            start = time.monotonic()
            try:
                tally.add("read", http.get(paths[i % len(paths)]).status_code)
            except httpx.HTTPError:
                tally.add("read", "transport-error")
            i += 1
            stop.wait(max(0.0, 1.0 / rate - (time.monotonic() - start)))


def _register(net: LocalNetwork, name: str) -> OrchestratorClient:
    wallet = create_wallet(net.run_dir / "wallets", name, "default", exist_ok=True)
    net.chain.register(wallet.hotkey.ss58_address, wallet.coldkeypub.ss58_address)
    client = OrchestratorClient(net.url, wallet.hotkey, net.orchestrator_hotkey, give_up_s=60)
    client.register(RegisterRequest(device="cpu", memory_bytes=8 * 2**30, session=secrets.token_hex(8)))
    return client


def idle_miner(net: LocalNetwork, name: str, stop: threading.Event, tally: Tally) -> None:
    """Registered, heartbeating, never working."""
    try:
        client = _register(net, name)
    except (Refused, ConnectionError) as error:
        tally.add("idle", f"register-refused {error}"[:60])
        return
    while not stop.wait(3.0):
        try:
            client.heartbeat()
            tally.add("idle", 200)
        except Refused as error:
            tally.add("idle", error.status)
        except ConnectionError:
            tally.add("idle", "unreachable")


def nested_tensor(size: int) -> bytes:
    """Exactly `size` bytes of safetensors whose header is JSON nested 2,000 deep (less if `size` is too small)."""
    depth = max(1, min(2000, (size - 16) // 2))
    header = b'{"x":' + b"[" * depth + b"]" * depth + b"}"
    body = struct.pack("<Q", len(header)) + header
    return body + b"\0" * max(0, size - len(body))


def wrong_shape(size: int, fill: int) -> bytes:
    """A well-formed bf16 safetensors of `size` bytes whose one tensor is flat (no stage's wire shape)."""
    n = max(0, (size - 8 - 100) // 2)
    header = json.dumps({"x": {"dtype": "BF16", "shape": [n], "data_offsets": [0, 2 * n]}}).encode()
    header += b" " * (size - 8 - len(header) - 2 * n)  # the format allows trailing spaces in the header
    return struct.pack("<Q", len(header)) + header + bytes([fill]) * (2 * n)


def _digests(data: bytes) -> tuple[str, str]:
    return hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest()


def hostile_miner(net: LocalNetwork, stop: threading.Event, tally: Tally) -> None:
    try:
        client = _register(net, "hostile")
    except (Refused, ConnectionError) as error:
        tally.add("hostile", f"register-refused {error}"[:60])
        return
    i = 0
    with httpx.Client(timeout=30) as http:
        while not stop.is_set():
            try:
                work = client.work(hold_s=2.0)
            except Refused as error:
                tally.add("hostile-work", error.status)
                stop.wait(2.0)
                continue
            except ConnectionError:
                tally.add("hostile-work", "unreachable")
                continue
            tally.add("hostile-work", 200)
            if work.hop_id is None or not work.output_url or not work.output_size:
                stop.wait(max(0.2, min(work.wait_s, 2.0)))
                continue
            mode = i % 3
            i += 1
            data = nested_tensor(work.output_size) if mode == 0 else wrong_shape(work.output_size, 1)
            sha, md5 = _digests(data)
            if mode == 2:
                sha = _digests(wrong_shape(work.output_size, 2))[0]  # forged: names other bytes
            try:
                tally.add("hostile-put", http.put(work.output_url, content=data).status_code)
            except httpx.HTTPError:
                tally.add("hostile-put", "transport-error")
            report = dict(
                run_id=work.run_id, epoch=work.epoch, hop_id=work.hop_id, inner_step=0,
                input_sha256=work.input_sha256, output_sha256=sha, output_md5=md5, tokens=0,
            )  # fmt: skip
            try:
                client.report(Report(**report))
                tally.add("hostile-report", 200)
            except Refused as error:
                tally.add("hostile-report", error.status)
            except ConnectionError:
                tally.add("hostile-report", "unreachable")
            if mode == 1:  # the re-PUT after the report
                try:
                    tally.add(
                        "hostile-reput",
                        http.put(work.output_url, content=wrong_shape(len(data), 3)).status_code,
                    )
                except httpx.HTTPError:
                    tally.add("hostile-reput", "transport-error")
            oversized_fields(client, report, tally)


def oversized_fields(client: OrchestratorClient, report: dict[str, Any], tally: Tally) -> None:
    """Reports whose fields are out of every bound, sent raw (pydantic on this side would refuse to build them)."""
    bad = [
        {**report, "output_sha256": "a" * 600_000},
        {**report, "inner_step": 2**63},
        {**report, "loss": "NaN"},
        {**report, "sketch": {"norms": [1.0] * 100_000, "projection": []}},
    ]
    for body in bad:
        content = json.dumps(body).replace('"NaN"', "NaN").encode()
        try:
            response = client.http.post(
                f"/work/{report['hop_id']}/report",
                content=content,
                headers={"content-type": "application/json"},
            )
            tally.add("oversized", response.status_code)
        except httpx.HTTPError:
            tally.add("oversized", "transport-error")


def footprint(net: LocalNetwork) -> tuple[int, int]:
    """(store bytes, state database bytes) of the orchestrator's run directory."""
    store = db = 0
    for folder, _, names in os.walk(net.run_dir / "orchestrator"):  # retention may delete beside the walk
        for name in names:
            try:
                size = (Path(folder) / name).stat().st_size
            except FileNotFoundError:
                continue
            if name.startswith("state.db"):
                db += size
            elif not name.endswith(".log"):
                store += size
    return store, db


def state_rows(net: LocalNetwork) -> int:
    """Rows in all the state database's tables: what its file size (which keeps the WAL's high-water mark and free
    pages) hides."""
    db = sqlite3.connect(f"file:{net.run_dir / 'orchestrator' / 'state.db'}?mode=ro", uri=True, timeout=30)
    try:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return sum(db.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone()[0] for table in tables)
    finally:
        db.close()


def tracebacks(net: LocalNetwork) -> int:
    log = net.run_dir / "logs" / "orchestrator.log"
    return log.read_text(errors="replace").count("Traceback") if log.exists() else 0


def run(args: argparse.Namespace, hostile: bool) -> dict[str, Any]:
    run_dir = Path(args.work_dir) / ("hostile" if hostile else "quiet")
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = dict(
        preset="test", stages=3, epochs=args.epochs, samples_per_epoch=args.samples, micro_batch=2, accumulate=2,
        total_tokens=10**9, warmup_tokens=1000, seed=0,
    )  # fmt: skip
    options = LocalOptions(
        miners_per_stage=1,
        run_dir=run_dir,
        baseline=False,
        progress=False,
        overrides=overrides,
        lease_s=args.lease_s,
    )
    net = LocalNetwork(options)
    stop, tally, threads = threading.Event(), Tally(), []
    per_epoch: list[dict[str, Any]] = []
    try:
        net.start_orchestrator()
        for _ in range(3):
            net.add_miner(threads=1)
        first = net.wait_until(lambda s: s.samples_completed >= 1, timeout_s=600)
        if hostile:
            jobs: list[tuple[Any, tuple[Any, ...]]] = [
                (slow_clients, (net.url, args.slow, stop, tally)),
                (read_flood, (net.url, args.read_rate, stop, tally)),
                (hostile_miner, (net, stop, tally)),
            ]
            jobs += [(idle_miner, (net, f"idle{i}", stop, tally)) for i in range(args.idle)]
            for target, fn_args in jobs:
                threads.append(threading.Thread(target=target, args=fn_args, daemon=True))
                threads[-1].start()
        start, started_with = time.monotonic(), first.samples_completed
        for epoch in range(1, args.epochs + 1):
            status = net.wait_until(lambda s, e=epoch: s.epoch >= e or s.phase == "done", timeout_s=900)
            store, db = footprint(net)
            per_epoch.append(
                dict(epoch=epoch, samples=status.samples_completed, seconds=round(time.monotonic() - start, 1),
                     store_bytes=store, db_bytes=db, db_rows=state_rows(net))
            )  # fmt: skip
            print(
                f"  {'hostile' if hostile else 'quiet  '} epoch {epoch:>2}: samples {status.samples_completed:>4}"
                f"  store {store / 1e6:8.2f} MB  db {db / 1e6:6.2f} MB  {time.monotonic() - start:6.0f} s",
                flush=True,
            )
            if status.phase == "done":
                break
        final = net.status()
        died = [n for n, p in net.procs.items() if p.poll() is not None]
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        net.stop()
    # From the moment the hostile clients start (the first completed sample) to the last epoch: every stall they
    # cause is in it.
    rate = (per_epoch[-1]["samples"] - started_with) / max(1e-9, per_epoch[-1]["seconds"])
    return dict(
        hostile=hostile,
        samples_per_s=rate,
        samples_lost=None if final is None else final.samples_lost,
        died=died,
        fivexx=tally.fivexx(),
        tracebacks=tracebacks(net),
        answers=dict(sorted(tally.counts.items())),
        per_epoch=per_epoch,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--samples", type=int, default=8, help="samples per epoch")
    parser.add_argument(
        "--slow", type=int, default=40, help="slow-body connections (and as many slow-header ones)"
    )
    parser.add_argument("--read-rate", type=float, default=20.0, help="anonymous reads per second")
    parser.add_argument("--idle", type=int, default=2, help="registered miners that only heartbeat")
    parser.add_argument(
        "--lease-s", type=float, default=15.0, help="IOTA_LEASE_S: what a hop of this preset needs, with room"
    )
    parser.add_argument("--work-dir", default="runs/bench-hostile")
    parser.add_argument("--quiet-only", action="store_true")
    parser.add_argument("--hostile-only", action="store_true")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    results: dict[str, Any] = {"machine": machine(), "args": vars(args)}
    for hostile in (False, True):
        if (hostile and args.quiet_only) or (not hostile and args.hostile_only):
            continue
        results["hostile" if hostile else "quiet"] = run(args, hostile)
    results["machine"]["loadavg_end"] = os.getloadavg()
    print(f"\nmachine: {results['machine']['cpu']} x{results['machine']['nproc']}, load {os.getloadavg()}")
    for name in ("quiet", "hostile"):
        r = results.get(name)
        if r is None:
            continue
        sizes = [(e["store_bytes"], e["db_bytes"]) for e in r["per_epoch"]]
        print(
            f"{name:>7}: {r['samples_per_s']:.3f} samples/s, lost {r['samples_lost']}, died {r['died'] or 0}, "
            f"5xx {r['fivexx']}, tracebacks {r['tracebacks']}; store MB by epoch "
            f"{[round(s / 1e6, 1) for s, _ in sizes]}; db MB {[round(d / 1e6, 2) for _, d in sizes]}; "
            f"db rows {[e['db_rows'] for e in r['per_epoch']]}"
        )
        if name == "hostile":
            print("   answers to hostile clients: " + ", ".join(f"{k}: {n}" for k, n in r["answers"].items()))
    if "quiet" in results and "hostile" in results:
        ratio = results["hostile"]["samples_per_s"] / max(1e-12, results["quiet"]["samples_per_s"])
        results["ratio"] = ratio
        print(f"hostile / quiet samples/s: {ratio:.2f} (goal >= 0.8)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    if not all(math.isfinite(results[n]["samples_per_s"]) for n in ("quiet", "hostile") if n in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
