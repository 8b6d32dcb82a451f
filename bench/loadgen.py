"""Load generator for bench/orchestrator_load.py: N simulated miners replaying the real miner's request sequence.

One asyncio task per miner, one shared httpx.AsyncClient (a connection per miner), every orchestrator call signed
with the miner's own sr25519 hotkey by iota.auth.HotkeyAuth, exactly as iota/miner/client.py signs them.
Each miner: POST /miners/register, then loop: POST /work -> (GET its input from the presigned URL, if
--download) -> PUT its output bytes (the exact size the orchestrator expects, random, digests precomputed) ->
POST /work/{hop_id}/report with the digests (and a loss on the tail). A `wait` answer just ends the cycle.

Pacing: miners join spread over --ramp-s seconds; then a miner's requests (storage transfers included) are slotted 1/rate seconds apart, from a random phase,
so N miners offer N * rate requests/s. A miner that falls behind its slots sends at once but never bursts to
catch up (the offered load then drops: the `late` figures show it). Latency is measured around the whole call
(signing included), per route; a request counts in the measured window when it was *sent* within it.

It prints WINDOW when the measured window opens, CLOSED when it closes, and with --profile-s, PROFILE when an
unmeasured stretch of the same load begins for the driver's profiler.

Run by orchestrator_load.py:  python -m bench.loadgen --url URL --receiver SS58 --keys FILE --miners N
                              --seconds S [--rate 1] [--warmup-s 5] [--download] [--profile-s P] --out FILE
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import resource
import ssl
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import httpx
from bittensor.keyfiles import Keypair

from iota.auth import HotkeyAuth
from iota.protocol import RegisterRequest, Report, RunInfo, Work

MEMORY_BYTES = 1 << 40  # what the simulated miners claim, so any stage fits


@dataclass
class Stats:
    """Everything measured, appended to by every miner task (one thread: no locks)."""

    window: tuple[float, float] = (float("inf"), float("inf"))
    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    status: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    late: list[float] = field(default_factory=list)  # send time - slot time, in the window
    kinds: Counter[str] = field(default_factory=Counter)
    wait_reasons: Counter[str] = field(default_factory=Counter)
    register_latency: list[float] = field(default_factory=list)
    registered: int = 0
    reregistered: int = 0

    def record(self, route: str, sent: float, latency: float, outcome: str) -> None:
        if self.window[0] <= sent < self.window[1]:
            self.latency[route].append(latency)
            self.status[route][outcome] += 1


class Payload:
    """Output bytes of one size with their digests, computed once: the orchestrator checks size and digests only."""

    def __init__(self, size: int):
        self.data = os.urandom(size)
        self.sha256 = hashlib.sha256(self.data).hexdigest()
        self.md5 = hashlib.md5(self.data).hexdigest()  # noqa: S324 (the store's ETag, not security)


class SimMiner:
    def __init__(
        self,
        keypair: Any,
        receiver: str,
        client: httpx.AsyncClient,
        run: RunInfo,
        stats: Stats,
        period: float,
        download: bool,
        payloads: dict[int, Payload],
    ):
        self.auth = HotkeyAuth(keypair, receiver)
        self.client, self.info, self.stats = client, run, stats
        self.period, self.download, self.payloads = period, download, payloads
        self.tail = len(run.stages) - 1
        self.tokens = run.micro_batch * int(run.model["seq_len"])
        self.slot = 0.0

    async def _pace(self) -> float:
        """Sleep until this miner's next slot; returns how late the request goes out (0 when on time)."""
        self.slot += self.period
        now = time.monotonic()
        if self.slot > now:
            await asyncio.sleep(self.slot - now)
            return 0.0
        late = now - self.slot
        self.slot = now  # behind (the last answer came late): send now, and don't burst to catch up later
        return late

    async def _call(
        self, route: str, method: str, url: str, body: bytes = b"", signed: bool = True
    ) -> httpx.Response | None:
        late = await self._pace()
        sent = time.monotonic()
        if self.stats.window[0] <= sent < self.stats.window[1]:
            self.stats.late.append(late)
        headers = {"content-type": "application/json"} if signed else {"content-length": str(len(body))}
        try:
            response = await self.client.request(
                method, url, content=body, headers=headers, auth=self.auth if signed else None
            )
        except httpx.HTTPError as error:
            self.stats.record(route, sent, time.monotonic() - sent, type(error).__name__)
            return None
        except asyncio.CancelledError:
            # Still waiting when the bench ended: counted, with the time waited so far, so a stalled server
            # cannot hide its slowest answers by never giving them.
            self.stats.record(route, sent, time.monotonic() - sent, "unanswered")
            raise
        latency = time.monotonic() - sent
        self.stats.record(route, sent, latency, str(response.status_code))
        if route == "register":
            self.stats.register_latency.append(latency)
        return response

    async def register(self) -> bool:
        body = RegisterRequest(device="cpu", memory_bytes=MEMORY_BYTES, session=os.urandom(8).hex())
        response = await self._call("register", "POST", "/miners/register", body.model_dump_json().encode())
        return response is not None and response.status_code == 200

    async def run(self, start: float, stop: float, ramp_s: float) -> None:
        # Miners join over the ramp (real ones don't all start in one second), then keep a random phase.
        self.slot = start + random.uniform(0.0, max(self.period, ramp_s)) - self.period
        while not await self.register():
            if time.monotonic() >= stop:
                return
        self.stats.registered += 1
        while time.monotonic() < stop:
            response = await self._call("work", "POST", "/work")
            if response is None or response.status_code != 200:
                if response is not None and response.status_code == 409 and "register again" in response.text:
                    self.stats.reregistered += 1
                    await self.register()
                continue
            work = Work.model_validate_json(response.content)
            if self.stats.window[0] <= self.slot < self.stats.window[1]:
                self.stats.kinds[work.kind] += 1
                if work.kind == "wait":
                    self.stats.wait_reasons[work.reason.split(" (")[0][:60]] += 1
            if work.kind == "stop":
                return
            if work.kind in ("forward", "backward"):
                await self._hop(work)

    async def _hop(self, work: Work) -> None:
        assert work.hop_id is not None
        if self.download and work.input_url:
            await self._call("get", "GET", work.input_url, signed=False)
        payload = None
        if work.output_url and work.output_size:
            payload = self.payloads.setdefault(work.output_size, Payload(work.output_size))
            response = await self._call("put", "PUT", work.output_url, payload.data, signed=False)
            if response is None or not response.is_success:
                return  # the lease expires and the orchestrator requeues the hop, as for a miner that died
        report = Report(
            run_id=work.run_id,
            epoch=work.epoch,
            hop_id=work.hop_id,
            inner_step=0,
            input_sha256=work.input_sha256,
            output_sha256=payload.sha256 if payload else None,
            output_md5=payload.md5 if payload else None,
            loss=2.0 if work.stage == self.tail and work.kind == "forward" else None,
            tokens=self.tokens,
        )
        await self._call("report", "POST", f"/work/{work.hop_id}/report", report.model_dump_json().encode())


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(stats: Stats, seconds: float, cpu_s: float) -> dict[str, Any]:
    routes: dict[str, dict[str, Any]] = {}
    for route, values in sorted(stats.latency.items()):
        routes[route] = {
            "requests": len(values),
            "per_second": len(values) / seconds,
            "p50_ms": 1000 * percentile(values, 0.50),
            "p99_ms": 1000 * percentile(values, 0.99),
            "max_ms": 1000 * max(values),
            "status": dict(stats.status[route]),
        }
    total = sum(r["requests"] for r in routes.values())
    ok = sum(n for r in routes.values() for s, n in r["status"].items() if s.isdigit() and int(s) < 400)
    every = [v for values in stats.latency.values() for v in values]
    return {
        "seconds": seconds,
        "requests": total,
        "per_second": total / seconds,
        "ok_per_second": ok / seconds,
        "p50_ms": 1000 * percentile(every, 0.50),
        "p99_ms": 1000 * percentile(every, 0.99),
        "routes": routes,
        "late_p50_ms": 1000 * percentile(stats.late, 0.50),
        "late_p99_ms": 1000 * percentile(stats.late, 0.99),
        "work_kinds": dict(stats.kinds),
        "wait_reasons": dict(stats.wait_reasons.most_common(5)),
        "registered": stats.registered,
        "reregistered": stats.reregistered,
        "register_p50_ms": 1000 * percentile(stats.register_latency, 0.5),
        "register_p99_ms": 1000 * percentile(stats.register_latency, 0.99),
        "loadgen_cpu_cores": cpu_s / seconds,
    }


async def generate(args: argparse.Namespace) -> dict[str, Any]:
    seeds = json.loads(open(args.keys).read())[: args.miners]
    if len(seeds) < args.miners:
        raise SystemExit(f"{args.keys} holds {len(seeds)} keys, fewer than {args.miners} miners")
    keypairs = [Keypair.create_from_seed(bytes.fromhex(seed)) for seed in seeds]
    # A client (and connection) per miner, as real miners have: one shared pool scans all its connections on
    # every request (httpcore), which made the generator, not the orchestrator, the bottleneck at 1000 miners.
    # One TLS context for all (plain http here): building one per client would cost seconds at 5000.
    tls = ssl.create_default_context()
    limits = httpx.Limits(max_connections=2, max_keepalive_connections=2)
    timeout = httpx.Timeout(args.timeout_s, connect=args.timeout_s)
    clients = [
        httpx.AsyncClient(base_url=args.url, limits=limits, timeout=timeout, verify=tls) for _ in keypairs
    ]
    stats = Stats()
    payloads: dict[int, Payload] = {}
    try:
        run = RunInfo.model_validate_json((await clients[0].get("/run")).content)
        miners = [
            SimMiner(kp, args.receiver, client, run, stats, 1.0 / args.rate, args.download, payloads)
            for kp, client in zip(keypairs, clients, strict=True)
        ]
        start = time.monotonic() + 0.5
        # The window opens once every miner is registered (registration is start-up, timed on its own) plus warm-up.
        stop = start + args.max_registration_s + args.warmup_s + args.seconds
        tasks = [asyncio.create_task(m.run(start, stop, args.ramp_s)) for m in miners]
        while stats.registered < len(miners) and time.monotonic() < start + args.max_registration_s:
            await asyncio.sleep(0.1)
        registered_after = time.monotonic() - start
        window_start = time.monotonic() + args.warmup_s
        stats.window = (window_start, window_start + args.seconds)
        await asyncio.sleep(max(0.0, window_start - time.monotonic()))
        print("WINDOW", flush=True)  # the driver starts its CPU count and profiler on this line
        cpu0 = _cpu()
        await asyncio.sleep(args.seconds)
        cpu_s = _cpu() - cpu0
        print("CLOSED", flush=True)
        if args.profile_s > 0:
            # The same load for the driver's profiler, after the measured window: py-spy's attach and sampling
            # slow the orchestrator down, so nothing measured above ran under it.
            print("PROFILE", flush=True)
            await asyncio.sleep(args.profile_s)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await asyncio.gather(*(client.aclose() for client in clients), return_exceptions=True)
    result = summary(stats, args.seconds, cpu_s)
    result.update(
        miners=args.miners,
        rate=args.rate,
        registered_after_s=registered_after,
        offered_per_second=args.miners * args.rate,
    )
    return result


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True)
    parser.add_argument("--receiver", required=True, help="the orchestrator's hotkey (ss58)")
    parser.add_argument("--keys", required=True, help="JSON list of 32-byte sr25519 seeds, hex")
    parser.add_argument("--miners", type=int, required=True)
    parser.add_argument("--rate", type=float, default=1.0, help="requests per second per miner")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument(
        "--ramp-s", type=float, default=10.0, help="miners join spread over this many seconds"
    )
    parser.add_argument("--max-registration-s", type=float, default=120.0)
    parser.add_argument("--timeout-s", type=float, default=30.0)
    parser.add_argument(
        "--profile-s", type=float, default=0.0, help="keep the load on this long after the window"
    )
    parser.add_argument("--download", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    result = asyncio.run(generate(args))
    with open(args.out, "w") as file:
        json.dump(result, file, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
