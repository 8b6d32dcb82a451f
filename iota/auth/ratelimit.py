"""Rate limits: token buckets per key (verified hotkey, client IP) and the ASGI middleware that limits by IP.

The per-IP limit runs before authentication, so floods of unsigned or forged requests never reach the signature
check; the per-hotkey limit runs after it (see ``Authenticator``). Buckets live in one process: a server with N
workers admits up to N times the configured rate, which is acceptable for a limit meant against floods.
"""

from __future__ import annotations

import ipaddress
import json
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

RETRY_AFTER_HEADER = "Retry-After"
# The same wait in milliseconds: Retry-After has whole seconds only.
RETRY_AFTER_MS_HEADER = "X-Iota-Retry-After-Ms"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class RateLimiter:
    """Token buckets keyed by a string: ``rate_per_s`` tokens refill each second, up to ``burst``."""

    def __init__(self, rate_per_s: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError(f"rate_per_s must be > 0 and burst >= 1, got {rate_per_s=} {burst=}")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, time of last refill)
        self._lock = threading.Lock()
        self._last_sweep = clock()

    def acquire(self, key: str) -> float:
        """Take one token for ``key``: 0.0 when allowed, otherwise the seconds until a token will be there."""
        now = self._clock()
        with self._lock:
            self._sweep(now)
            tokens, last = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate_per_s)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate_per_s

    def _sweep(self, now: float) -> None:
        # A bucket untouched for burst/rate seconds is full again, the same as a missing one: forget it so the
        # table stays as small as the set of recently active keys.
        refill_s = self.burst / self.rate_per_s
        if now - self._last_sweep < refill_s:
            return
        self._last_sweep = now
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < refill_s}


def retry_after_header(wait_s: float) -> dict[str, str]:
    """The Retry-After header (whole seconds, at least 1) for a refusal that lasts ``wait_s``, and the same wait in
    milliseconds for clients that read it (iota.client): a token bucket refills in milliseconds, and a miner told
    to wait a whole second for it stalls fifty times longer than it must."""
    return {
        RETRY_AFTER_HEADER: str(max(1, math.ceil(wait_s))),
        RETRY_AFTER_MS_HEADER: str(max(0, math.ceil(1000 * wait_s))),
    }


def parse_networks(trusted_proxies: Iterable[str]) -> tuple[IPNetwork, ...]:
    """Addresses or CIDR blocks (``"10.0.0.0/8"``, ``"127.0.0.1"``) as networks."""
    return tuple(ipaddress.ip_network(item.strip(), strict=False) for item in trusted_proxies if item.strip())


def _in_any(address: str, networks: tuple[IPNetwork, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def client_ip(peer: str | None, forwarded_for: str | None, trusted_proxies: tuple[IPNetwork, ...]) -> str:
    """The client's address: the direct peer, unless that peer is a trusted proxy and says whom it forwards.

    X-Forwarded-For is read from the right (the entries our own proxies appended) and the first address that is
    not a trusted proxy is the client; anything further left was written by the client and could be anything.
    From an untrusted peer the header is ignored, so a client cannot pick its own bucket.
    """
    peer = peer or "unknown"
    if not forwarded_for or not _in_any(peer, trusted_proxies):
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _in_any(hop, trusted_proxies):
            return hop
    return hops[0] if hops else peer


def scope_client_ip(scope: Mapping[str, Any], trusted_proxies: tuple[IPNetwork, ...]) -> str:
    """``client_ip`` of an ASGI request."""
    peer = scope["client"][0] if scope.get("client") else None
    # Only a trusted proxy's X-Forwarded-For counts: without any, the headers need not be searched.
    forwarded = _header(scope, b"x-forwarded-for") if trusted_proxies else None
    return client_ip(peer, forwarded, trusted_proxies)


def under(path: str, prefixes: Iterable[str]) -> bool:
    """Whether ``path`` is one of ``prefixes`` or below one (``/storage`` covers ``/storage/objects/k``, not
    ``/storagex``)."""
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)


class IPRateLimitMiddleware:
    """ASGI middleware: one token per HTTP request from each client IP; 429 with Retry-After when empty.

    Add it with ``app.add_middleware(IPRateLimitMiddleware, limiter=..., trusted_proxies=[...])``; paths under
    ``exempt_paths`` (object transfers, health checks) are not counted; with ``only_paths``, only paths under
    those are (a budget of its own for some routes, such as public reads, beside the general one).
    """

    def __init__(
        self,
        app: Any,
        limiter: RateLimiter,
        trusted_proxies: Iterable[str] = (),
        exempt_paths: Iterable[str] = (),
        only_paths: Iterable[str] | None = None,
    ) -> None:
        self.app = app
        self.limiter = limiter
        self.trusted_proxies = parse_networks(trusted_proxies)
        self.exempt_paths = tuple(exempt_paths)
        self.only_paths = None if only_paths is None else tuple(only_paths)

    def _counts(self, path: str) -> bool:
        if self.only_paths is not None and not under(path, self.only_paths):
            return False
        return not under(path, self.exempt_paths)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self._counts(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        ip = scope_client_ip(scope, self.trusted_proxies)
        wait_s = self.limiter.acquire(ip)
        if wait_s == 0.0:
            await self.app(scope, receive, send)
            return
        body = json.dumps(
            {
                "detail": {
                    "code": "rate_limited",
                    "message": f"too many requests from {ip}; retry in {wait_s:.1f} s",
                }
            }
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in retry_after_header(wait_s).items()]
        await send({"type": "http.response.start", "status": 429, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _header(scope: Mapping[str, Any], name: bytes) -> str | None:
    # Several X-Forwarded-For lines are one list, in order (RFC 9110 field combination).
    values = [value.decode("latin-1") for key, value in scope.get("headers", []) if key.lower() == name]
    return ", ".join(values) if values else None
