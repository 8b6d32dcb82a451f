"""Emulated internet links in user space, for bench/wan.py: a delaying, rate-limiting TCP relay and the network
namespaces it runs in. This kernel has no sch_netem (nor ifb), so `tc netem` is not available.

A link joins one role's namespace to the bridge that the orchestrator and store sit on. The relay of a link runs
inside the role's namespace, listens on 127.0.0.1:PORT (the orchestrator's advertised URL, so presigned store
URLs work unchanged) and forwards each connection to BRIDGE_IP:PORT, so every byte the role sends or receives
crosses the link:

- delay: each direction delivers a chunk RTT/2 after the link has finished sending it;
- rate: each direction sends at most `mbit` Mbit/s, shared by all the role's connections (a FIFO: a chunk waits
  for the ones before it, whichever connection they belong to);
- connection set-up: a new connection's first bytes leave one RTT after it opened (TCP's handshake);
- a bounded buffer per connection and direction (QUEUE_CHUNKS chunks of at most CHUNK bytes): a sender faster
  than the link is held back by TCP's flow control, as by a router's full queue.

Loss is not emulated (a TCP relay sees a stream, not packets): a lossy profile's figures are a lower bound on the
harm. `python -m bench.wan selftest` checks a link's RTT and rate against their settings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field

_REQUEST_LINE = re.compile(rb"(GET|PUT|POST|HEAD|DELETE|PATCH) (/[^ \r\n]{0,512}) HTTP/1\.[01]\r\n")
REQUEST_LINE_MAX = 600

CHUNK = 16 * 1024  # bytes read at once: at 10 Mbit/s one chunk takes 13 ms to send
SPIN_S = 0.0015  # the last part of each delay, waited by yielding to the event loop (see _until)
QUEUE_CHUNKS = 64  # per connection and direction: 1 MiB in flight through the relay at most

BRIDGE = "iwbr0"
BRIDGE_IP = "10.77.0.1"
SUBNET = 24


@dataclass(frozen=True)
class Link:
    """One access link: round-trip time and rate, the same both ways."""

    rtt_ms: float
    mbit: float

    @property
    def one_way_s(self) -> float:
        return self.rtt_ms / 2000

    @property
    def bytes_per_s(self) -> float:
        return self.mbit * 1e6 / 8


@dataclass
class Direction:
    """One direction of a link: when its sender is next free, shared by every connection through the relay."""

    link: Link
    free_at: float = 0.0

    def deliver_at(self, n: int, now: float) -> float:
        """When a chunk of n bytes handed to the link at `now` reaches the far end."""
        start = max(now, self.free_at)
        self.free_at = start + n / self.link.bytes_per_s
        return self.free_at + self.link.one_way_s


@dataclass
class Relay:
    link: Link
    target: tuple[str, int]
    up: Direction = field(init=False)
    down: Direction = field(init=False)
    connections: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    requests: dict[str, int] = field(default_factory=dict)  # "METHOD /route" -> requests the role sent

    def __post_init__(self) -> None:
        self.up, self.down = Direction(self.link), Direction(self.link)

    async def serve(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(self._connection, host, port, limit=CHUNK)

    async def _connection(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        opened = loop.time()
        try:
            server_r, server_w = await asyncio.open_connection(*self.target, limit=CHUNK)
        except OSError:
            client_w.close()
            return
        self.connections += 1
        await asyncio.gather(
            self._pipe(
                client_r, server_w, self.up, not_before=opened + self.link.rtt_ms / 1000, upstream=True
            ),
            self._pipe(server_r, client_w, self.down, not_before=0.0, upstream=False),
            return_exceptions=True,
        )
        for writer in (client_w, server_w):  # both ways are done (an end of stream only half-closes)
            with contextlib.suppress(OSError, RuntimeError):
                writer.close()

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        direction: Direction,
        not_before: float,
        upstream: bool,
    ) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_CHUNKS)

        async def deliver() -> None:
            while True:
                at, chunk = await queue.get()
                await _until(loop, at)
                if not chunk:
                    break
                writer.write(chunk)
                await writer.drain()
            with contextlib.suppress(OSError):
                if writer.can_write_eof():
                    writer.write_eof()

        sender = asyncio.create_task(deliver())
        tail = b""  # the end of the previous chunk: a request line may straddle two
        try:
            while chunk := await reader.read(CHUNK):
                if upstream:
                    self.bytes_up += len(chunk)
                    self._count_requests(tail + chunk, already=len(tail))
                    tail = chunk[-REQUEST_LINE_MAX:]
                else:
                    self.bytes_down += len(chunk)
                await queue.put((direction.deliver_at(len(chunk), max(loop.time(), not_before)), chunk))
            # The end of the stream follows the last chunk across the link.
            await queue.put((max(loop.time(), direction.free_at) + direction.link.one_way_s, b""))
            await sender
        except (OSError, asyncio.IncompleteReadError):
            sender.cancel()
            with contextlib.suppress(OSError, RuntimeError):
                writer.close()  # a reset one way ends the other: its far end sees the close

    def _count_requests(self, data: bytes, already: int) -> None:
        """Count the request lines in `data` that end past its first `already` bytes (those were counted)."""
        for match in _REQUEST_LINE.finditer(data):
            if match.end() <= already:
                continue
            method, path = match.groups()
            parts = path.decode("latin-1").split("?")[0].split("/")
            route = "/".join(parts[:3]) if parts[1:2] == ["storage"] else "/".join(parts[:4])
            key = f"{method.decode()} {route}"
            self.requests[key] = self.requests.get(key, 0) + 1

    async def report(self, path: str, every_s: float = 0.5) -> None:
        """Append this link's counters to `path` as a JSON line (wall-clock time) whenever they change."""
        last = None
        while True:
            now = (self.bytes_up, self.bytes_down, sum(self.requests.values()))
            if now != last:
                line = {
                    "t": time.time(),
                    "up": self.bytes_up,
                    "down": self.bytes_down,
                    "requests": self.requests,
                }
                with open(path, "a") as out:
                    out.write(json.dumps(line) + "\n")
                last = now
            await asyncio.sleep(every_s)


async def _until(loop: asyncio.AbstractEventLoop, at: float) -> None:
    """Sleep until loop time `at`. The event loop's timers wake up to a millisecond late (epoll's timeout is in
    whole milliseconds), so the last SPIN_S are spent yielding to the loop instead."""
    if (wait := at - loop.time() - SPIN_S) > 0:
        await asyncio.sleep(wait)
    while loop.time() < at:
        await asyncio.sleep(0)


async def _run_relay(listen: tuple[str, int], target: tuple[str, int], link: Link, stats: str | None) -> None:
    relay = Relay(link, target)
    server = await relay.serve(*listen)
    if stats:
        reporter = asyncio.create_task(relay.report(stats))  # noqa: F841 (runs as long as the relay)
    print(f"relay {listen[0]}:{listen[1]} -> {target[0]}:{target[1]}: {link}", flush=True)
    async with server:
        await server.serve_forever()


# ---------------------------------------------------------------------------------------------------------------
# Namespaces: a bridge in the root namespace, one namespace per role joined to it by a veth pair.


def _ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True)


class Namespaces:
    """Creates the bridge and one namespace per role; `close` removes everything it made (also stale leftovers of
    a run that was killed: every name starts with `iw`)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.cleanup_stale()
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{BRIDGE_IP}/{SUBNET}", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")

    @staticmethod
    def cleanup_stale() -> None:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        for name in listed:
            if name.startswith("iwns"):
                _ip("netns", "del", name, check=False)
        _ip("link", "del", BRIDGE, check=False)

    def add(self) -> tuple[str, str]:
        """A new namespace joined to the bridge: (its name, its address)."""
        index = len(self.names) + 1
        if index > 200:
            raise RuntimeError("more than 200 namespaces")
        name, host_end, ns_end, address = (
            f"iwns{index}",
            f"iwh{index}",
            f"iwn{index}",
            f"10.77.0.{10 + index}",
        )
        _ip("netns", "add", name)
        self.names.append(name)
        _ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
        _ip("link", "set", ns_end, "netns", name)
        _ip("link", "set", host_end, "master", BRIDGE, "up")
        _ip("-n", name, "addr", "add", f"{address}/{SUBNET}", "dev", ns_end)
        _ip("-n", name, "link", "set", ns_end, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        return name, address

    def close(self) -> None:
        for name in self.names:
            _ip("netns", "del", name, check=False)
        self.names.clear()
        _ip("link", "del", BRIDGE, check=False)


def relay_command(namespace: str, port: int, link: Link, stats: str) -> list[str]:
    """The command that runs a link's relay inside `namespace`, in front of the orchestrator's port."""
    return [
        "ip", "netns", "exec", namespace, sys.executable, "-m", "bench.links",
        "--listen", f"127.0.0.1:{port}", "--to", f"{BRIDGE_IP}:{port}",
        "--rtt-ms", str(link.rtt_ms), "--mbit", str(link.mbit), "--stats", stats,
    ]  # fmt: skip


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one emulated link: a delaying, rate-limiting TCP relay")
    parser.add_argument("--listen", type=_address, required=True)
    parser.add_argument("--to", type=_address, required=True)
    parser.add_argument("--rtt-ms", type=float, required=True)
    parser.add_argument("--mbit", type=float, required=True)
    parser.add_argument("--stats", default=None, help="append the link's byte and request counts here")
    args = parser.parse_args(argv)
    asyncio.run(_run_relay(args.listen, args.to, Link(args.rtt_ms, args.mbit), args.stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
