"""Public reads served from a short-lived cache: however many anonymous callers ask, the orchestrator computes
each answer at most once per ``ttl_s``.

A route takes the app's cache as a dependency and names what it caches::

    @router.get("/scores")
    async def scores(orch: Orch, cache: PublicCache) -> Response:
        body = await cache.get("scores", lambda: orch.run(...))
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request

T = TypeVar("T")

PUBLIC_READ_TTL_S = 1.0  # stale by at most a second: nobody reading the score log or metrics needs it fresher


class Cache:
    """Values by key, each recomputed when older than ``ttl_s``; callers that ask while one is being computed wait
    for that computation instead of starting their own. Keys are chosen by the routes, from a small set (never a
    caller's free text), so the table stays small. Used on the event loop only."""

    def __init__(self, ttl_s: float = PUBLIC_READ_TTL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self._values: dict[Hashable, tuple[float, Any]] = {}  # key -> (when computed, value)
        self._locks: dict[Hashable, asyncio.Lock] = {}
        self.computed = 0  # how many times a value was computed (tests, metrics)

    async def get(self, key: Hashable, compute: Callable[[], Awaitable[T]]) -> T:
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self._values.get(key)
            if cached is not None and self.clock() - cached[0] < self.ttl_s:
                return cached[1]  # type: ignore[no-any-return]
            value = await compute()
            self._values[key] = (self.clock(), value)
            self.computed += 1
            return value


def public_cache(request: Request) -> Cache:
    """FastAPI dependency: the app's cache of public reads (``app.state.public_cache``)."""
    cache: Cache = request.app.state.public_cache
    return cache


PublicCache = Annotated[Cache, Depends(public_cache)]
