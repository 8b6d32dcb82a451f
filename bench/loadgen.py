"""Load generator for bench/orchestrator_load.py: N simulated miners replaying the real miner's request sequence.

One asyncio task per miner, each with its own keep-alive HTTP/1.1 connection from its own loopback address (the
orchestrator caps connections per client IP, and real miners come from their own machines), and every orchestrator
call signed with the miner's own sr25519 hotkey by `iota.auth.sign_headers`, the function `HotkeyAuth` signs with:
the same btauth/1 headers over the same bytes, a fresh nonce for every request, plus the protocol headers. Each
miner: POST /miners/register, then loop: POST /work -> (GET its input from the presigned URL, if --download) ->
PUT its output bytes (the exact size the orchestrator expects, random, digests precomputed) -> POST
/work/{hop_id}/report with the digests (and a loss on the tail). A `wait` answer just ends the cycle. With
--hold-s, POST /work asks the orchestrator to hold it while there is no work (long-poll, as the miner does): its
latency is then counted without the time held (the answer's X-Iota-Held-Ms), which is reported apart. A 503 is
honoured as the miner client does: nothing is sent before its Retry-After has passed, then the request is sent
again.

The client is a minimal HTTP/1.1 one over asyncio streams rather than httpx: httpx cost ~2.7 ms of CPU per signed
request, so on two shared cores the generator, not the orchestrator, capped the load that could be offered. Per
miner, what does not change between requests (its headers, its connection) is prepared once.

Pacing: miners join spread over --ramp-s seconds; then a miner's requests (storage transfers included) are slotted
1/rate seconds apart, from a random phase, so N miners offer N * rate requests/s. A miner that falls behind its
slots sends at once but never bursts to catch up (the offered load then drops: the `late` figures show it).
Latency is measured around the whole call (signing included), per route; a request counts in the measured window
when it was *sent* within it.

It prints WINDOW when the measured window opens, CLOSED when it closes, and with --profile-s, PROFILE when an
unmeasured stretch of the same load begins for the driver's profiler.

Run by orchestrator_load.py:  python -m bench.loadgen --url URL --receiver SS58 --keys FILE --miners N
                              --seconds S [--rate 1] [--warmup-s 5] [--download] [--profile-s P] [--hold-s H]
                              --out FILE
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import resource
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from bittensor.keyfiles import Keypair

import iota
from iota.auth import sign_headers
from iota.protocol import RegisterRequest, Report, RunInfo, Work, WorkRequest
from iota.protocol.version import CLIENT_HEADER, PROTOCOL_VERSION, VERSION_HEADER

MEMORY_BYTES = 1 << 40  # what the simulated miners claim, so any stage fits
HELD_HEADER = b"x-iota-held-ms"  # how long the orchestrator held a POST /work (long-poll) before answering


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
    reconnects: int = 0

    served: list[float] = field(default_factory=list)  # latencies of requests not refused with 503
    held: list[float] = field(default_factory=list)  # how long held requests for work were held

    def record(self, route: str, sent: float, latency: float, outcome: str, held: float = 0.0) -> None:
        """One request; a POST /work held by the orchestrator (long-poll) counts its latency without the hold."""
        if self.window[0] <= sent < self.window[1]:
            if held:
                self.held.append(held)
            if outcome == "held at the end":  # no answer, and none was due yet: nothing to time
                self.status[route][outcome] += 1
                return
            self.latency[route].append(latency - held)
            self.status[route][outcome] += 1
            if outcome != "503":
                self.served.append(latency - held)


class Payload:
    """Output bytes of one size with their digests, computed once: the orchestrator checks size and digests only."""

    def __init__(self, size: int):
        self.data = os.urandom(size)
        self.sha256 = hashlib.sha256(self.data).hexdigest()
        self.md5 = hashlib.md5(self.data).hexdigest()  # noqa: S324 (the store's ETag, not security)


@dataclass
class Response:
    status: int
    headers: dict[bytes, bytes]  # names in lower case
    body: bytes


class ServerClosed(ConnectionError):
    """The server closed a kept-alive connection before answering: it never read the request."""


class Connection:
    """One keep-alive HTTP/1.1 connection from a fixed source address, reopened when the server closes it."""

    def __init__(self, host: str, port: int, source: str, stats: Stats):
        self.host, self.port, self.source, self.stats = host, port, source, stats
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.used = False  # a request has gone over it (so the server may have closed it as idle)

    async def request(self, head: bytes, body: bytes) -> Response:
        """Send the request line and headers `head` (ending in a blank line) and `body`; read the answer."""
        for attempt in range(2):
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(
                    self.host, self.port, local_addr=(self.source, 0)
                )
                self.used = False
            assert self.reader is not None
            reused = self.used
            self.used = True
            try:
                self.writer.write(head + body if len(body) < 65536 else head)
                if len(body) >= 65536:
                    self.writer.write(body)
                return await self._read(self.reader)
            except ServerClosed:
                self.close()
                if not reused or attempt:
                    raise
                self.stats.reconnects += 1  # closed as idle while we wrote: send it again on a new connection
            except BaseException:
                self.close()
                raise
        raise AssertionError("unreachable")

    async def _read(self, reader: asyncio.StreamReader) -> Response:
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as error:
            if not error.partial:
                raise ServerClosed("closed before answering") from error
            raise
        lines = raw[:-4].split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if b"content-length" in headers:
            body = await reader.readexactly(int(headers[b"content-length"]))
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            body = await _read_chunked(reader)
        else:
            body = b""
        if headers.get(b"connection", b"").lower() == b"close":
            self.close()
        return Response(status, headers, body)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


class SimMiner:
    def __init__(
        self,
        keypair: Any,
        receiver: str,
        connection: Connection,
        run: RunInfo,
        stats: Stats,
        period: float,
        download: bool,
        payloads: dict[int, Payload],
        timeout_s: float,
        hold_s: float = 0.0,
    ):
        self.keypair, self.receiver, self.connection = keypair, receiver, connection
        self.hold_s = hold_s
        self.work_body = WorkRequest(forward=True, hold_s=hold_s).model_dump_json().encode()
        self.info, self.stats = run, stats
        self.period, self.download, self.payloads = period, download, payloads
        self.timeout_s = timeout_s + hold_s
        self.tail = len(run.stages) - 1
        self.tokens = run.micro_batch_tokens
        self.slot = 0.0
        self.last_nonce_ns = 0
        host = f"Host: {connection.host}:{connection.port}\r\n"
        # What every signed request of this miner carries besides its signature, as HotkeyAuth adds it.
        self.signed_common = (
            f"{host}Content-Type: application/json\r\n{VERSION_HEADER}: {PROTOCOL_VERSION}\r\n"
            f"{CLIENT_HEADER}: {iota.__version__}\r\n"
        ).encode()
        self.plain_common = host.encode()

    def _head(self, method: str, target: str, body: bytes, signed: bool) -> bytes:
        lines = [f"{method} {target} HTTP/1.1\r\n".encode()]
        if signed:
            # Strictly increasing nonces, as HotkeyAuth keeps them: two requests in one nanosecond still differ.
            nonce_ns = max(time.time_ns(), self.last_nonce_ns + 1)
            self.last_nonce_ns = nonce_ns
            auth = sign_headers(self.keypair, self.receiver, method, target, body, nonce_ns)
            lines += [self.signed_common, "".join(f"{k}: {v}\r\n" for k, v in auth.items()).encode()]
        else:
            lines.append(self.plain_common)
        lines.append(f"Content-Length: {len(body)}\r\n\r\n".encode())
        return b"".join(lines)

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
        self, route: str, method: str, target: str, body: bytes = b"", signed: bool = True
    ) -> Response | None:
        while True:
            late = await self._pace()
            sent = time.monotonic()
            if self.stats.window[0] <= sent < self.stats.window[1]:
                self.stats.late.append(late)
            try:
                head = self._head(method, target, body, signed)
                # asyncio.timeout, not wait_for: in Python 3.11 wait_for can swallow a cancellation that arrives
                # as the answer does, and the miner would then run on after the bench ended.
                async with asyncio.timeout(self.timeout_s):
                    response = await self.connection.request(head, body)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as error:
                self.stats.record(route, sent, time.monotonic() - sent, type(error).__name__)
                return None
            except asyncio.CancelledError:
                # Still waiting when the bench ended: counted, with the time waited so far, so a stalled server
                # cannot hide its slowest answers by never giving them; a request for work within the hold it
                # asked for is held, not slow.
                waited = time.monotonic() - sent
                if route == "work" and waited < self.hold_s:
                    self.stats.record(route, sent, waited, "held at the end", held=waited)
                else:
                    self.stats.record(route, sent, waited, "unanswered")
                raise
            latency = time.monotonic() - sent
            held = int(response.headers.get(HELD_HEADER, b"0")) / 1000
            self.stats.record(route, sent, latency, str(response.status), held)
            if route == "register":
                self.stats.register_latency.append(latency)
            if response.status != 503:
                return response
            # Overloaded: nothing before Retry-After, then the same request again (freshly signed).
            wait_s = float(response.headers.get(b"retry-after", b"1"))
            self.slot = max(self.slot, time.monotonic() + wait_s - self.period)

    async def register(self) -> bool:
        body = RegisterRequest(device="cpu", memory_bytes=MEMORY_BYTES, session=os.urandom(8).hex())
        response = await self._call("register", "POST", "/miners/register", body.model_dump_json().encode())
        return response is not None and response.status == 200

    async def run(self, start: float, stop: float, ramp_s: float) -> None:
        # Miners join over the ramp (real ones don't all start in one second), then keep a random phase.
        self.slot = start + random.uniform(0.0, max(self.period, ramp_s)) - self.period
        try:
            while not await self.register():
                if time.monotonic() >= stop:
                    return
            self.stats.registered += 1
            while time.monotonic() < stop:
                response = await self._call("work", "POST", "/work", self.work_body)
                if response is None or response.status != 200:
                    if response is not None and response.status == 409 and b"register again" in response.body:
                        self.stats.reregistered += 1
                        await self.register()
                    continue
                work = Work.model_validate_json(response.body)
                if self.stats.window[0] <= self.slot < self.stats.window[1]:
                    self.stats.kinds[work.kind] += 1
                    if work.kind == "wait":
                        self.stats.wait_reasons[work.reason.split(" (")[0][:60]] += 1
                if work.kind == "stop":
                    return
                if work.kind in ("forward", "backward"):
                    await self._hop(work)
        finally:
            self.connection.close()

    async def _hop(self, work: Work) -> None:
        assert work.hop_id is not None
        if self.download and work.input_url:
            await self._call("get", "GET", target_of(work.input_url), signed=False)
        payload = None
        if work.output_url and work.output_size:
            payload = self.payloads.setdefault(work.output_size, Payload(work.output_size))
            put = await self._call("put", "PUT", target_of(work.output_url), payload.data, signed=False)
            if put is None or not 200 <= put.status < 300:
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


def target_of(url: str) -> str:
    """The request target (path and query, as presigned) of a URL on the orchestrator."""
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}" if parts.query else parts.path


def source_address(i: int) -> str:
    """Miner i's own loopback address (127.0.0.0/8 is all loopback on Linux)."""
    return f"127.{1 + i // 65536}.{i // 256 % 256}.{i % 256 or 1}"


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
    refused = sum(r["status"].get("503", 0) for r in routes.values())
    every = [v for values in stats.latency.values() for v in values]
    return {
        "held_requests": len(stats.held),
        "held_p50_s": percentile(stats.held, 0.50),
        "seconds": seconds,
        "requests": total,
        "per_second": total / seconds,
        "ok_per_second": ok / seconds,
        "refused_503_per_second": refused / seconds,
        "p50_ms": 1000 * percentile(every, 0.50),
        "p99_ms": 1000 * percentile(every, 0.99),
        # The same without the (fast) 503 refusals: what a request that got its answer waited.
        "served_p50_ms": 1000 * percentile(stats.served, 0.50),
        "served_p99_ms": 1000 * percentile(stats.served, 0.99),
        "routes": routes,
        "late_p50_ms": 1000 * percentile(stats.late, 0.50),
        "late_p99_ms": 1000 * percentile(stats.late, 0.99),
        "work_kinds": dict(stats.kinds),
        "wait_reasons": dict(stats.wait_reasons.most_common(5)),
        "registered": stats.registered,
        "reregistered": stats.reregistered,
        "reconnects": stats.reconnects,
        "register_p50_ms": 1000 * percentile(stats.register_latency, 0.5),
        "register_p99_ms": 1000 * percentile(stats.register_latency, 0.99),
        "loadgen_cpu_cores": cpu_s / seconds,
        "loadgen_cpu_ms_per_request": 1000 * cpu_s / max(total, 1),
    }


async def fetch_run(host: str, port: int, stats: Stats) -> RunInfo:
    connection = Connection(host, port, "127.0.0.1", stats)
    try:
        response = await connection.request(f"GET /run HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode(), b"")
    finally:
        connection.close()
    return RunInfo.model_validate_json(response.body)


async def generate(args: argparse.Namespace) -> dict[str, Any]:
    seeds = json.loads(open(args.keys).read())[: args.miners]
    if len(seeds) < args.miners:
        raise SystemExit(f"{args.keys} holds {len(seeds)} keys, fewer than {args.miners} miners")
    keypairs = [Keypair.create_from_seed(bytes.fromhex(seed)) for seed in seeds]
    server = urlsplit(args.url)
    host, port = server.hostname or "127.0.0.1", server.port or 80
    stats = Stats()
    payloads: dict[int, Payload] = {}
    run = await fetch_run(host, port, stats)
    miners = [
        SimMiner(
            kp,
            args.receiver,
            Connection(host, port, source_address(i), stats),
            run,
            stats,
            1.0 / args.rate,
            args.download,
            payloads,
            args.timeout_s,
            args.hold_s,
        )
        for i, kp in enumerate(keypairs)
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
    result = summary(stats, args.seconds, cpu_s)
    result.update(
        miners=args.miners,
        rate=args.rate,
        hold_s=args.hold_s,
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
        "--hold-s",
        type=float,
        default=0.0,
        help="POST /work asks to be held this long while there is no work",
    )
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
